"""What a binary network costs: parameters, memory and FLOPs per layer, as the paper counts.

  python -m lns_jax.summary --config=configs/imagenet_r18.py
  python -m lns_jax.summary --config=configs/imagenet_alexnet.py --json
  python -m lns_jax.summary --config=configs/cifar10_r20.py --config.data.image_size=32

The counted network is the *inference* model: the ``'sign'`` variant of
``config.model`` (binary weights ``sign(.) * s``). LNS's mapping networks f_theta are
training machinery only; after training the paper keeps ``sign(q_hat)`` and nothing
else (Sec. 3), which has exactly the sign model's shapes. Nothing is computed and no
data is read: the layers are found by tracing ``model.init`` with
``jax.eval_shape`` under a Flax method interceptor (:func:`lns_jax.binary.trace`),
which records every module call's input and output shapes; the dataset's image shape
comes from ``data.get_info`` (nominal sizes when the dataset is not built).

What is counted (one row per module that owns variables, plus totals):

* **Memory** = 1 bit per binary weight + 32 bits per every other number the inference
  model keeps: full-precision conv/dense kernels and biases, the binary layers' scale
  factors (1 per layer for ``weight_scale='layer'``, 1 per output channel for
  ``'channel'``), BatchNorm's four numbers per channel (scale, bias, running mean,
  running variance) and PReLU slopes. This is exactly what ``lns_jax.export`` writes,
  so an export file's payload equals this figure (up to padding each binary layer to
  whole bytes). ``Mbit`` is 10^6 bits; JSON also gives ``memory_mibit`` (2^20 bits).
* **FLOPs** (paper, Sec. 4.3, after Bi-Real Net): real-valued multiplications plus
  1/64 of the binary (1-bit x 1-bit) multiplications. A conv or dense layer does
  ``output positions x kernel size`` multiply-accumulates; they are binary when both
  its weights and its inputs are 1 bit, real otherwise. Elementwise layers
  (BatchNorm, PReLU, the binary layers' scale, residual adds, pooling) are not counted:
  the paper and Bi-Real Net count only convolution/dense multiplications. Per image.
* **Full-precision equivalent**: the same network with every number 32-bit (binary
  weights at 32 bits, no scale factors) and every multiply-accumulate real.
"""

from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Dict, List, Optional, Sequence, Tuple

import flax.linen as nn
from flax import traverse_util

from lns_jax import binary as binary_lib
from lns_jax.layers import BinaryConv

MBIT = 1e6            # the paper's ResNet-18 figures (374 Mbit = 11.69M x 32 / 10^6)
MIBIT = float(2**20)  # the paper's AlexNet figures are in 2^20 bits (see README)
BINARY_OPS_PER_FLOP = 64  # "1/64 of the 1-bit multiplications" (Sec. 4.3)
FP_BITS = 32


@dataclasses.dataclass
class LayerCost:
  """One module's share of the inference model."""
  name: str                 # module path, '/'-joined
  type: str                 # module class name
  weight_bits: int          # 1 for binary weights, else 32
  act_bits: int             # 1 when the layer's input is binarized, else 32
  params: int               # numbers stored: weights, biases, scales, BN statistics
  binary_params: int        # of which 1-bit
  memory_bits: int
  real_macs: int            # full-precision multiply-accumulates (per image)
  binary_macs: int          # 1-bit x 1-bit multiply-accumulates (per image)
  fp_params: int            # the full-precision equivalent: numbers stored
  fp_macs: int              # ... and its (real) multiply-accumulates
  input_shape: Tuple[int, ...] = ()
  output_shape: Tuple[int, ...] = ()

  @property
  def flops(self) -> float:
    return self.real_macs + self.binary_macs / BINARY_OPS_PER_FLOP

  @property
  def fp_memory_bits(self) -> int:
    return self.fp_params * FP_BITS

  def as_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.update(flops=self.flops, memory_mbit=self.memory_bits / MBIT,
             fp_memory_bits=self.fp_memory_bits, fp_memory_mbit=self.fp_memory_bits / MBIT,
             fp_flops=self.fp_macs, input_shape=list(self.input_shape),
             output_shape=list(self.output_shape))
    return d


@dataclasses.dataclass
class ModelSummary:
  model: str
  image_shape: Tuple[int, ...]
  layers: List[LayerCost]

  def total(self) -> dict:
    s = lambda f: sum(getattr(l, f) for l in self.layers)
    memory, fp_memory = s("memory_bits"), s("fp_memory_bits")
    flops = sum(l.flops for l in self.layers)
    return {
        "params": s("params"), "binary_params": s("binary_params"),
        "real_params": s("params") - s("binary_params"),
        "memory_bits": memory, "memory_mbit": memory / MBIT, "memory_mibit": memory / MIBIT,
        "real_macs": s("real_macs"), "binary_macs": s("binary_macs"), "flops": flops,
        "fp_params": s("fp_params"), "fp_memory_bits": fp_memory,
        "fp_memory_mbit": fp_memory / MBIT, "fp_memory_mibit": fp_memory / MIBIT,
        "fp_flops": s("fp_macs"),
        "memory_saving": fp_memory / memory if memory else float("nan"),
        "speedup": s("fp_macs") / flops if flops else float("nan"),
    }

  def as_dict(self) -> dict:
    return {"model": self.model, "image_shape": list(self.image_shape),
            "units": {"memory_mbit": "10^6 bits", "memory_mibit": "2^20 bits",
                      "flops": "real multiplications + binary multiplications / 64, "
                               "per image"},
            "layers": [l.as_dict() for l in self.layers], "total": self.total()}


def _num_binary_scales(module: BinaryConv, kernel_shape) -> int:
  if module.weight_scale == "layer":
    return 1
  if module.weight_scale == "channel":
    return int(kernel_shape[-1])
  return 0


def _owned_leaves(variables: dict) -> Dict[Tuple[str, ...], Dict[str, Any]]:
  """``{module path: {collection/name: shape}}`` of the leaves each module owns itself."""
  owned: Dict[Tuple[str, ...], Dict[str, Any]] = {}
  for col, tree in variables.items():
    for key, leaf in traverse_util.flatten_dict(tree).items():
      owned.setdefault(tuple(key[:-1]), {})[f"{col}/{key[-1]}"] = tuple(leaf.shape)
  return owned


def summarize_model(model: nn.Module, image_shape: Sequence[int],
                    name: Optional[str] = None) -> ModelSummary:
  """Per-layer costs of ``model`` on one ``image_shape`` image (shapes only, no compute)."""
  calls, variables = binary_lib.trace(model, image_shape)
  owned = _owned_leaves(variables)
  layers: List[LayerCost] = []
  seen = set()
  for call in calls:
    path, module, in_shape, out_shape = (call.path, call.module, call.input_shape,
                                         call.output_shape)
    leaves = owned.get(path, {})
    is_conv = isinstance(module, (nn.Conv, nn.Dense, BinaryConv))
    if not leaves and not is_conv:
      continue  # containers (blocks, the model) and parameter-free ops
    first_call = path not in seen
    seen.add(path)
    n_own = sum(math.prod(s) for s in leaves.values()) if first_call else 0
    macs = 0
    kernel = leaves.get("params/kernel")
    if is_conv and kernel is not None:
      positions = math.prod(out_shape[1:-1]) if len(out_shape) > 2 else 1
      macs = positions * math.prod(kernel)  # per image (batch 1)
    w_bits, a_bits = FP_BITS, FP_BITS
    binary_params = 0
    memory = n_own * FP_BITS
    params = n_own
    if isinstance(module, BinaryConv):
      if module.input_binarizer != "none":
        a_bits = 1
      if module.weight_binarizer in ("sign", "lns"):
        w_bits = 1
        if first_call:
          binary_params = math.prod(kernel)
          scales = _num_binary_scales(module, kernel)
          params = n_own + scales
          memory = binary_params + (n_own - binary_params + scales) * FP_BITS
    binary = w_bits == 1 and a_bits == 1
    layers.append(LayerCost(
        name="/".join(path), type=type(module).__name__, weight_bits=w_bits, act_bits=a_bits,
        params=params, binary_params=binary_params, memory_bits=memory,
        real_macs=0 if binary else macs, binary_macs=macs if binary else 0,
        fp_params=n_own, fp_macs=macs, input_shape=in_shape[1:], output_shape=out_shape[1:]))

  counted = {c.path for c in calls if c.path in owned}
  missing = [p for p in owned if p not in counted]
  for path in missing:  # variables of a module that was never called (should not happen)
    n = sum(math.prod(s) for s in owned[path].values())
    layers.append(LayerCost("/".join(path), "?", FP_BITS, FP_BITS, n, 0, n * FP_BITS,
                            0, 0, n, 0))
  return ModelSummary(name or type(model).__name__, tuple(image_shape), layers)


def summarize(config) -> ModelSummary:
  """:func:`summarize_model` of ``config``'s inference model at its image size."""
  from lns_jax import data, models
  info = data.get_info(config.data)
  model = models.from_config(config, "sign", info.num_classes)  # the inference model
  return summarize_model(model, info.image_shape, name=config.model.name)


# ----------------------------------------------------------------------------- output


def _fmt_count(n: float) -> str:
  if n >= 1e9:
    return f"{n / 1e9:.2f}G"
  if n >= 1e6:
    return f"{n / 1e6:.2f}M"
  if n >= 1e3:
    return f"{n / 1e3:.1f}K"
  return f"{n:.0f}" if float(n).is_integer() else f"{n:.2f}"


def format_table(summary: ModelSummary) -> str:
  """A Markdown table per layer and in total."""
  head = ("| layer | type | W | A | params | memory (Mbit) | FLOPs | FP memory (Mbit) | "
          "FP FLOPs |")
  rows = [f"{summary.model}, input {'x'.join(map(str, summary.image_shape))}, per image",
          "", head, "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
  for l in summary.layers:
    rows.append(f"| {l.name} | {l.type} | {l.weight_bits} | {l.act_bits} | "
                f"{_fmt_count(l.params)} | {l.memory_bits / MBIT:.4f} | {_fmt_count(l.flops)} | "
                f"{l.fp_memory_bits / MBIT:.4f} | {_fmt_count(l.fp_macs)} |")
  t = summary.total()
  rows.append(f"| **total** | | | | {_fmt_count(t['params'])} | {t['memory_mbit']:.2f} | "
              f"{_fmt_count(t['flops'])} | {t['fp_memory_mbit']:.2f} | "
              f"{_fmt_count(t['fp_flops'])} |")
  rows += ["",
           f"binary weights: {t['binary_params']:,} (1 bit); 32-bit numbers: "
           f"{t['real_params']:,}",
           f"memory: {t['memory_mbit']:.2f} Mbit ({t['memory_mibit']:.2f} Mibit) vs "
           f"{t['fp_memory_mbit']:.2f} Mbit ({t['fp_memory_mibit']:.2f} Mibit) full precision "
           f"(x{t['memory_saving']:.1f} smaller)",
           f"FLOPs: {t['flops'] / 1e6:.2f}M = {t['real_macs'] / 1e6:.2f}M real + "
           f"{t['binary_macs'] / 1e6:.2f}M binary / {BINARY_OPS_PER_FLOP} vs "
           f"{t['fp_flops'] / 1e6:.2f}M full precision (x{t['speedup']:.1f} fewer)"]
  return "\n".join(rows)


def main(argv):
  del argv
  from absl import flags
  from lns_jax import cli
  from lns_jax import config as config_lib
  cli.quiet_logging()
  try:
    config_lib.validate(flags.FLAGS.config)
  except config_lib.ConfigError as e:
    cli.fail(e)
  summary = summarize(flags.FLAGS.config)
  if flags.FLAGS.json:
    print(json.dumps(summary.as_dict(), indent=2))
  else:
    print(format_table(summary))


if __name__ == "__main__":
  import os
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).")
  flags.DEFINE_bool("json", False, "Print JSON instead of a table.")
  flags.mark_flags_as_required(["config"])
  from lns_jax import cli
  cli.run(main)  # app.run(main), with bad flags as one `error:` line, exit code 2
