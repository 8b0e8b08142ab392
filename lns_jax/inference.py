"""Inference from an export file: only the binary weights, their scales and the FP layers.

  from lns_jax import inference
  model = inference.load("fmnist_lns.npz")
  logits = inference.predict(model, images)                   # float conv of +-s kernels
  logits = inference.predict(model, images, use_packed=True)  # XNOR/popcount on packed bits

  python -m lns_jax.inference --export=fmnist_lns.npz [--packed] [--split=test]
  python -m lns_jax.inference --export=fmnist_lns.npz --config=configs/fashion_mnist_r20.py

The inference model is the ``'float'`` variant of the trained model: its BinaryConvs
still binarize their inputs with the configured activation binarizer, and use their
kernel as it is. The kernel is set to ``unpacked signs * s`` in float32, which is
bit for bit the ``sign(q_hat) * s`` (or ``sign(W) * s``) the training model computes in
eval mode, so the two give the same logits (up to XLA's freedom to order a reduction
differently in two programs) and the same predictions. (Re-binarizing a ``+-s``
kernel with the ``'sign'`` model instead would recompute ``s`` as ``mean|+-s|``, which is
not always exactly ``s`` in float32.)

``use_packed=True`` computes each binary conv on packed bits instead:
``xnor_conv2d_packed(pack(sign(x)), packed signs) * s`` (integer XNOR/popcount, then
one float multiply), with the weights packed once at load time; equal to the float path
within float32 rounding. Full-precision layers run as before.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Dict, Tuple

import numpy as np

from lns_jax.export import (ExportError, ExportMismatchError, build_inference_model,
                            read_file)


@dataclasses.dataclass
class InferenceModel:
  """A loaded export: the flax model, its variables and the packed binary weights."""
  path: str
  header: dict
  model: Any                      # flax module ('float' variant)
  variables: dict                 # {'params', 'batch_stats'}, binary kernels = signs * s
  packed: Dict[str, dict]         # layer path -> {'w': uint32 (kh, kw, words, C_out), 'scale'}
  _fns: Dict[bool, Any] = dataclasses.field(default_factory=dict, repr=False)

  @property
  def spec(self) -> dict:
    return self.header["model"]

  @property
  def image_shape(self) -> Tuple[int, ...]:
    return tuple(self.spec["image_shape"])

  @property
  def num_classes(self) -> int:
    return int(self.spec["num_classes"])

  def config(self):
    """The training run's config stored in the export (for evaluation)."""
    from lns_jax import config as config_lib
    return config_lib.from_saved_json(self.header["config"])


def check_config(header: dict, config, path: str = "the export") -> None:
  """Raises :class:`ExportMismatchError` if ``config`` describes another model."""
  from lns_jax import data as data_lib
  spec = header["model"]
  info = data_lib.get_info(config.data)
  want = {"model.name": spec["name"], "model.input_binarizer": spec["input_binarizer"],
          "model.weight_scale": spec["weight_scale"], "num_classes": spec["num_classes"],
          "image_shape": tuple(spec["image_shape"])}
  got = {"model.name": config.model.name, "model.input_binarizer": config.model.input_binarizer,
         "model.weight_scale": config.model.weight_scale, "num_classes": info.num_classes,
         "image_shape": tuple(info.image_shape)}
  diffs = [f"{k}: export has {want[k]!r}, config has {got[k]!r}" for k in want if want[k] != got[k]]
  if diffs:
    raise ExportMismatchError(
        f"{path} was exported from another model or config ({'; '.join(diffs)}). Use the "
        f"config the model was trained with, or omit --config to use the one stored in the "
        f"export.")


def load(path: str, config=None) -> InferenceModel:
  """Reads and checks an export; ``config`` (optional) must describe the same model."""
  import jax.numpy as jnp
  from flax import traverse_util
  from lns_jax.binary import abstract_variables

  path = os.path.abspath(os.path.expanduser(path))
  header, members = read_file(path)
  if config is not None:
    check_config(header, config, path)
  spec = header["model"]
  try:
    model = build_inference_model(spec)
    target = abstract_variables(model, spec["image_shape"])
  except Exception as e:  # pylint: disable=broad-except
    raise ExportMismatchError(f"{path}: cannot build model {spec.get('name')!r} from its "
                              f"header ({type(e).__name__}: {e}).") from e

  binary = {l["path"]: l for l in header["binary_layers"]}
  variables, packed, used = {}, {}, set()
  for col, tree in target.items():
    flat = {}
    for key, leaf in traverse_util.flatten_dict(tree).items():
      name = "/".join(key)
      layer = "/".join(key[:-1])
      if col == "params" and key[-1] == "kernel" and layer in binary:
        flat[key], packed[layer] = _binary_kernel(path, spec, binary[layer], members, leaf)
        used.update((f"binary/{layer}/signs", f"binary/{layer}/scale"))
        continue
      member = f"{col}/{name}"
      if member not in members:
        raise ExportMismatchError(f"{path} lacks {member}, which model {spec['name']!r} "
                                  f"needs; the file is inconsistent. Export it again.")
      value = members[member]
      if tuple(value.shape) != tuple(leaf.shape):
        raise ExportMismatchError(f"{path}: {member} has shape {value.shape}, model "
                                  f"{spec['name']!r} needs {tuple(leaf.shape)}.")
      used.add(member)
      flat[key] = jnp.asarray(value, leaf.dtype)
    variables[col] = traverse_util.unflatten_dict(flat)
  unused = sorted(set(members) - used)
  if unused:
    raise ExportMismatchError(f"{path} holds arrays model {spec['name']!r} has no place for "
                              f"({', '.join(unused[:3])}...); the file is inconsistent.")
  return InferenceModel(path, header, model, variables, packed)


def _binary_kernel(path, spec, meta, members, leaf):
  """``(kernel = unpacked signs * s, {'w': packed words, 'scale': s})`` of one layer."""
  import jax.numpy as jnp
  from lns_jax import bitpack
  layer = meta["path"]
  if tuple(meta["shape"]) != tuple(leaf.shape):
    raise ExportMismatchError(
        f"{path}: binary layer {layer} has shape {tuple(meta['shape'])} in the file but "
        f"{tuple(leaf.shape)} in model {spec['name']!r}; the file is inconsistent.")
  try:
    signs = bitpack.unpack_signs_np(members[f"binary/{layer}/signs"], meta["shape"], np.float32)
  except (KeyError, ValueError) as e:
    raise ExportError(f"{path} is damaged: binary layer {layer} ({e}). Export it "
                      f"again.") from e
  scale = np.asarray(members[f"binary/{layer}/scale"], np.float32)
  # float32 +-1 times s: exactly the training model's sign(.) * s.
  return jnp.asarray(signs) * jnp.asarray(scale), {
      "w": bitpack.pack_bits(jnp.asarray(signs), axis=2, word_bits=32),
      "scale": jnp.asarray(scale)}


def _apply(model, variables, packed, images, use_packed: bool):
  import flax.linen as nn
  from lns_jax import bitpack
  from lns_jax.layers import BinaryConv

  if not use_packed:
    return model.apply(variables, images, train=False)

  def interceptor(next_fun, args, kwargs, context):
    m = context.module
    if not (isinstance(m, BinaryConv) and context.method_name == "__call__"):
      return next_fun(*args, **kwargs)
    key = "/".join(m.path)
    if key not in packed or m.input_binarizer == "none":
      return next_fun(*args, **kwargs)  # real-valued activations: the float conv
    x = args[0]
    entry = packed[key]
    # sign(x) with sign(0) = +1 is the bit x >= 0: what ste_sign/approx_sign compute.
    xp = bitpack.pack_bits(x, axis=-1, word_bits=32)
    y = bitpack.xnor_conv2d_packed(xp, entry["w"], x.shape[-1], tuple(m.strides), m.padding)
    y = y.astype(m.dtype) * entry["scale"].astype(m.dtype)
    if m.use_bias:
      y = y + m.variables["params"]["bias"]
    return y

  with nn.intercept_methods(interceptor):
    return model.apply(variables, images, train=False)


def predict(model: InferenceModel, images, use_packed: bool = False):
  """Logits of ``images`` (N, H, W, C), preprocessed as in training, in eval mode."""
  import jax
  import jax.numpy as jnp
  images = jnp.asarray(images, jnp.float32)
  if images.ndim != 4 or tuple(images.shape[1:]) != model.image_shape:
    raise ExportMismatchError(
        f"images have shape {tuple(images.shape)}; the exported model takes "
        f"(N, {', '.join(map(str, model.image_shape))}).")
  use_packed = bool(use_packed)
  if use_packed not in model._fns:  # pylint: disable=protected-access
    model._fns[use_packed] = jax.jit(  # pylint: disable=protected-access
        lambda v, p, x, m=model.model: _apply(m, v, p, x, use_packed))
  return model._fns[use_packed](model.variables, model.packed, images)  # pylint: disable=protected-access


def evaluate(model: InferenceModel, config=None, split: str = "test",
             use_packed: bool = False) -> dict:
  """Top-1/top-5 on ``split`` of ``config``'s dataset (default: the export's config)."""
  import jax.numpy as jnp
  from lns_jax import data as data_lib
  from lns_jax import metrics as metrics_lib
  config = config if config is not None else model.config()
  sums = np.zeros(3)
  for batch in data_lib.eval_iterator(config.data, split, batch_size=config.batch_size):
    logits = predict(model, batch["image"], use_packed)
    top1, top5 = metrics_lib.topk_correct(logits, jnp.asarray(batch["label"]), (1, 5),
                                          jnp.asarray(batch["mask"]))
    sums += [float(top1), float(top5), float(np.sum(batch["mask"]))]
  n = max(sums[2], 1.0)
  return {"top1": sums[0] / n, "top5": sums[1] / n, "count": int(sums[2])}


def main(argv):
  del argv
  from absl import flags
  from lns_jax import cli
  from lns_jax import config as config_lib
  from lns_jax import data as data_lib
  cli.quiet_logging()
  F = flags.FLAGS
  try:
    config = F.config
    if config is not None:
      config_lib.validate(config)
    model = load(F.export, config)
    if config is None:
      config = model.config()
      if F.data_dir:
        config.data.data_dir = F.data_dir
    splits = ("train", "test") + (("validation",) if config.data.get("val_examples") else ())
    if F.split not in splits:
      raise config_lib.ConfigError(f"--split={F.split}: not a split of this config; use one "
                                   f"of {', '.join(splits)}.")
    result = evaluate(model, config, F.split, use_packed=F.packed)
  except (ExportError, config_lib.ConfigError, data_lib.DatasetNotFoundError) as e:
    cli.fail(e)
  src = model.header.get("source", {})
  print(f"{F.export}: {model.spec['name']} (stage {src.get('stage')}, step {src.get('step')}),"
        f" {'packed XNOR/popcount' if F.packed else 'float'} binary convs")
  print(f"{F.split}: top-1 {result['top1']:.4f} top-5 {result['top5']:.4f} "
        f"({result['count']} images)")
  trained = src.get("test")
  if trained and F.split == "test":
    print(f"training run's eval of that stage: top-1 {trained['top1']:.4f} top-5 "
          f"{trained['top5']:.4f} ({trained['count']} images)")


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import flags
  from ml_collections import config_flags
  flags.DEFINE_string("export", None, "Export file written by python -m lns_jax.export.")
  config_flags.DEFINE_config_file("config", None, "Optional config (configs/*.py[:arg]); "
                                  "must describe the exported model. Default: the export's.")
  flags.DEFINE_string("split", "test", "Split to evaluate: test, validation or train.")
  flags.DEFINE_bool("packed", False, "Binary convs on packed bits (XNOR/popcount).")
  flags.DEFINE_string("data_dir", None, "TFDS data_dir (when --config is not given).")
  flags.mark_flags_as_required(["export"])
  from lns_jax import cli
  cli.run(main)  # app.run(main), with bad flags as one `error:` line, exit code 2
