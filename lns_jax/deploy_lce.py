"""The converter behind ``python -m lns_jax.deploy``: runs in the deployment environment.

  .venv-lce/bin/python lns_jax/deploy_lce.py convert --export=E.npz --out=M.tflite [--float]
  .venv-lce/bin/python lns_jax/deploy_lce.py run --model=M.tflite --images=X.npy --out=Y.npy
  .venv-lce/bin/python lns_jax/deploy_lce.py ops --model=M.tflite

This file is run by path in ``.venv-lce`` (``requirements-lce.txt``: TensorFlow 2.16,
tf-keras, larq, Larq Compute Engine, numpy < 2), never imported by lns-jax: it imports
no JAX and nothing of the ``lns_jax`` package (whose ``__init__`` imports JAX). The
export file is the whole interface: it is read with numpy alone, its format version and
every member's SHA-256 checked as :func:`lns_jax.export.read_file` checks them.

``convert`` rebuilds the exported inference model as a larq / tf-keras model and converts
it with ``larq_compute_engine.convert_keras_model``. Every binary conv of lns-jax
(``conv(sign(x), sign(.) * s)``, ``sign(0) = +1``, the binarised input zero-padded) is

  ``QuantConv2D(input_quantizer='ste_sign', kernel_quantizer='ste_sign',
  padding=<the layer's>, pad_values=0.0, use_bias=False)`` with the ±1 kernel, then
  ``Scale`` (a multiply by ``s``, per layer or per output channel),

which LCE turns into ``LceQuantize`` + ``LceBconv2d`` (the multiply and the following
BatchNorm fused into the bconv's output transform). ``pad_values=0.0`` is lns-jax's zero
padding: larq's padding of the *binarised* input, not one-padding, which LCE computes
with its zero-padding correction. TensorFlow's SAME is XLA's SAME (``lo = total // 2``),
so stride-2 SAME convs pad alike. Full-precision layers are ordinary Keras layers:
``Conv2D`` (explicit padding as ``ZeroPadding2D``), ``BatchNormalization`` (flax's
``epsilon=1e-5``), ``PReLU``, pooling, ``Dense``. ``--float`` converts the same Keras
model with TensorFlow's own converter (no LCE ops: float convs of ±1 values), for
comparison.

Failures print one line ``error: ...`` on stderr and exit 2; the output is written to a
temporary file and renamed, so nothing half-written is ever at ``--out``. On success the
last line of stdout is a JSON report.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import time
import zipfile
import zlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# larq builds on tf.keras: with TensorFlow 2.16 that is Keras 3 unless this is set, and
# LCE's converter takes tf-keras (Keras 2) models only.
os.environ["TF_USE_LEGACY_KERAS"] = "1"

import numpy as np  # noqa: E402

# The Keras layers and one builder per model family, beside this file (run by path, this
# folder is on sys.path; imported as lns_jax.deploy_lce_models it is there too).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from deploy_lce_models import BUILDERS, Scale  # noqa: E402  pylint: disable=wrong-import-position

FORMAT = "lns-jax-export"
# The export format versions this converter reads: major 1, minor up to 1 (= lns-jax's
# EXPORT_FORMAT_VERSION; tests/test_deploy.py checks they agree).
READS_FORMAT = (1, 1)
BN_EPSILON = 1e-5  # flax.linen.BatchNorm's default, which every lns-jax model uses
# lns-jax model name -> network family (the builders below); widths and depths are read
# from the arrays' shapes and names.
FAMILIES = {
    "resnet20": "resnet_cifar", "resnet_tiny": "resnet_cifar",
    "resnet18_dorefa": "resnet_dorefa", "resnet18_dorefa_tiny": "resnet_dorefa",
    "resnet18": "bireal", "resnet18_tiny": "bireal",
    "alexnet": "alexnet", "alexnet_tiny": "alexnet",
    "reactnet18": "reactnet", "reactnet18_tiny": "reactnet", "reactnet20": "reactnet",
    "reactnet_tiny": "reactnet",
}
# Activation binarizers whose inference forward is sign(x) with sign(0) = +1 (ApproxSign
# differs from the clipped STE only in its gradient): larq's 'ste_sign' forward.
SIGN_BINARIZERS = ("ste_sign", "approx_sign")


class ConvertError(Exception):
  """The export cannot be converted; its message is one line for the user."""


# ------------------------------------------------------------------------ the export


def _sha256(a):
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def _version(v):
  if isinstance(v, int) and not isinstance(v, bool):
    return v, 0
  parts = v.split(".") if isinstance(v, str) else []
  if len(parts) != 2 or not all(p.isdigit() for p in parts):
    return None
  return int(parts[0]), int(parts[1])


def read_export(path):
  """``(header, members)`` of an lns-jax export, checked as lns_jax.export.read_file does."""
  again = f"Export the model again: python -m lns_jax.export --workdir=<run> --out={path}"
  if not os.path.isfile(path):
    raise ConvertError(f"{path}: no such export file. Write one with python -m "
                       f"lns_jax.export --workdir=<run> --out={path}")
  try:
    with np.load(path, allow_pickle=False) as z:
      if "header" not in z.files:
        raise ConvertError(f"{path} is a .npz file but not an lns-jax export (no header "
                           f"member); give a file written by python -m lns_jax.export.")
      header = json.loads(bytes(z["header"]).decode("utf-8"))
      members = {k: z[k] for k in z.files if k != "header"}
  except ConvertError:
    raise
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError,
          zlib.error) as e:
    raise ConvertError(f"{path} is damaged or truncated ({type(e).__name__}: "
                       f"{str(e)[:200]}); it cannot be converted. {again}") from None
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise ConvertError(f"{path} is not an lns-jax export; give a file written by "
                       f"python -m lns_jax.export.")
  theirs = _version(header.get("version"))
  writer = header.get("lns_jax_version")
  by = f"lns-jax {writer}" if writer else "an lns-jax that did not record its version"
  if theirs is None or theirs[0] != READS_FORMAT[0] or theirs[1] > READS_FORMAT[1]:
    shown = f"{theirs[0]}.{theirs[1]}" if theirs else repr(header.get("version"))
    raise ConvertError(
        f"{path} was written by {by} in export format {shown}; this converter reads "
        f"formats {READS_FORMAT[0]}.0 to {READS_FORMAT[0]}.{READS_FORMAT[1]}. Export the run "
        f"again with this lns-jax (python -m lns_jax.export --workdir=<run> --out={path}).")
  listed = header.get("arrays", {})
  if set(listed) != set(members):
    raise ConvertError(f"{path} is damaged or truncated (members missing or unexpected); "
                       f"{again}")
  for k, meta in listed.items():
    a = members[k]
    if list(a.shape) != meta["shape"] or str(a.dtype) != meta["dtype"] or \
        _sha256(a) != meta["sha256"]:
      raise ConvertError(f"{path} is damaged (member {k} does not match its SHA-256); "
                         f"{again}")
  return header, members


# ---------------------------------------------------------------------- the network


class _Builder:
  """Builds the Keras layers of one export, taking each array once (all must be used)."""

  def __init__(self, path, header, members):
    import larq
    import tf_keras as keras
    self.keras, self.larq = keras, larq
    self.path, self.header, self.members = path, header, members
    self.spec = header["model"]
    self.binary = {l["path"]: l for l in header["binary_layers"]}
    self.used = set()
    self.weights = []  # (layer, [arrays]): set once the model is built
    self.num_binary = 0

  def take(self, name):
    if name not in self.members:
      raise ConvertError(f"{self.path} lacks {name}, which model {self.spec['name']!r} "
                         f"needs; the file is inconsistent. Export it again.")
    self.used.add(name)
    return np.asarray(self.members[name], np.float32)

  def has(self, prefix):
    return any(k.startswith(f"params/{prefix}/") for k in self.members)

  def _layer(self, layer, x, arrays):
    self.weights.append((layer, arrays))
    return layer(x)

  def fp_conv(self, x, name, strides=1, padding="same"):
    """A full-precision conv; ``padding``: 'same', 'valid' or an int (both sides)."""
    L = self.keras.layers
    kernel = self.take(f"params/{name}/kernel")
    arrays = [kernel]
    if f"params/{name}/bias" in self.members:
      arrays.append(self.take(f"params/{name}/bias"))
    if isinstance(padding, int):
      x = zero_pad(L, x, padding, kernel.shape[:2], strides, name.replace("/", "_") + "_pad")
      padding = "valid"
    layer = L.Conv2D(kernel.shape[-1], kernel.shape[:2], strides=strides, padding=padding,
                     use_bias=len(arrays) == 2, name=name.replace("/", "_"))
    return self._layer(layer, x, arrays)

  def binary_conv(self, x, name, strides=1):
    """lns-jax's BinaryConv: ``QuantConv2D`` of the ±1 kernel, then the scale ``s``."""
    lq = self.larq
    binarizer = self.spec["input_binarizer"]
    if binarizer not in SIGN_BINARIZERS:
      raise ConvertError(f"{self.path}: input_binarizer {binarizer!r} has no binary "
                         f"activations for LCE (supported: {', '.join(SIGN_BINARIZERS)}).")
    meta = self.binary.get(name)
    if meta is None:
      # A layer trained with 'float' weights (not in the paper's models): real kernel,
      # binarised input, ordinary TFLite ops.
      kernel = self.take(f"params/{name}/kernel")
      layer = lq.layers.QuantConv2D(kernel.shape[-1], kernel.shape[:2], strides=strides,
                                    padding="same", pad_values=0.0, use_bias=False,
                                    input_quantizer="ste_sign", kernel_quantizer=None,
                                    name=name.replace("/", "_"))
      return self._layer(layer, x, [kernel])
    if meta.get("strides") not in (None, [strides, strides]):
      raise ConvertError(f"{self.path}: binary layer {name} has strides {meta['strides']}, "
                         f"the {self.spec['name']} network {[strides, strides]}; the file "
                         f"does not describe this network.")
    padding = meta.get("padding", "SAME")
    if padding not in ("SAME", "VALID"):
      raise ConvertError(f"{self.path}: binary layer {name} has padding {padding!r}; the "
                         f"converter supports 'SAME' and 'VALID'.")
    if meta.get("use_bias"):
      raise ConvertError(f"{self.path}: binary layer {name} has a bias, which no lns-jax "
                         f"model has; the converter does not support it.")
    shape = tuple(meta["shape"])
    n = int(np.prod(shape))
    packed = self.members.get(f"binary/{name}/signs")
    if packed is None or packed.size != (n + 7) // 8:
      raise ConvertError(f"{self.path} is damaged: binary layer {name} has no signs of "
                         f"shape {shape}. Export it again.")
    self.used.add(f"binary/{name}/signs")
    # np.packbits layout, C order of the HWIO kernel, bit set = +1 (lns_jax.bitpack).
    signs = np.where(np.unpackbits(packed, count=n).reshape(shape) == 1, 1.0, -1.0)
    scale = self.take(f"binary/{name}/scale")
    layer = lq.layers.QuantConv2D(shape[-1], shape[:2], strides=strides,
                                  padding=padding.lower(), pad_values=0.0, use_bias=False,
                                  input_quantizer="ste_sign", kernel_quantizer="ste_sign",
                                  kernel_constraint=None, name=name.replace("/", "_"))
    y = self._layer(layer, x, [signs.astype(np.float32)])
    self.num_binary += 1
    return Scale(np.reshape(scale, (-1,)) if scale.ndim else scale,
                 name=name.replace("/", "_") + "_scale")(y)

  def bn(self, x, name):
    layer = self.keras.layers.BatchNormalization(epsilon=BN_EPSILON,
                                                 name=name.replace("/", "_"))
    return self._layer(layer, x, [self.take(f"params/{name}/scale"),
                                  self.take(f"params/{name}/bias"),
                                  self.take(f"batch_stats/{name}/mean"),
                                  self.take(f"batch_stats/{name}/var")])

  def prelu(self, x, name):
    slope = self.take(f"params/{name}/slope")
    layer = self.keras.layers.PReLU(shared_axes=[1, 2], name=name.replace("/", "_"))
    return self._layer(layer, x, [slope.reshape(1, 1, -1)])

  def dense(self, x, name):
    layer = self.keras.layers.Dense(self.members[f"params/{name}/kernel"].shape[-1],
                                    name=name.replace("/", "_"))
    return self._layer(layer, x, [self.take(f"params/{name}/kernel"),
                                  self.take(f"params/{name}/bias")])

  def blocks(self, pattern):
    """The ``stage{i}_block{j}`` names present (with ``pattern``'s suffix), in order."""
    names = sorted({k.split("/")[1] for k in self.members if k.count("/") >= 2
                    and k.split("/")[1].startswith("stage")},
                   key=lambda s: [int("".join(c for c in p if c.isdigit()) or 0)
                                  for p in s.split("_")])
    return [n for n in names if pattern(n)]

  def finish(self, inputs, outputs):
    model = self.keras.Model(inputs, outputs, name=self.spec["name"])
    for layer, arrays in self.weights:
      want = [tuple(w.shape) for w in layer.get_weights()]
      if want != [tuple(a.shape) for a in arrays]:
        raise ConvertError(f"{self.path}: layer {layer.name} needs weights of shapes "
                           f"{want}, the file has {[a.shape for a in arrays]}; the file "
                           f"does not describe a {self.spec['name']} network.")
      layer.set_weights(arrays)
    unused = sorted(set(self.members) - self.used)
    if unused:
      raise ConvertError(f"{self.path} holds arrays the {self.spec['name']} network has no "
                         f"place for ({', '.join(unused[:3])}); the file is inconsistent.")
    return model


def zero_pad(L, x, pad, kernel, strides, name):
  """``pad`` zeros on every side of ``x`` before a VALID conv, as ``ZeroPadding2D``.

  The trailing pads no window of the conv reaches are left out (same output, same
  windows). This is not cosmetic: LCE 0.16's fuse-padding pass rewrites PAD + VALID
  CONV_2D into a SAME CONV_2D when the pads are ``(k - 1) / 2`` on both sides, also for
  strides > 1, where SAME pads ``(2, 3)`` rather than ``(3, 3)``; the 7x7 stride-2 stems
  of the ResNet-18s came out shifted by one pixel. Trimmed, the pads are ``(3, 2)`` there,
  which the pass leaves alone.
  """
  pads = []
  for axis, k in ((1, kernel[0]), (2, kernel[1])):
    size = int(x.shape[axis])
    unused = (size + 2 * pad - k) % strides
    pads.append((pad, pad - min(unused, pad)))
  return L.ZeroPadding2D(tuple(pads), name=name)(x)


def build_keras_model(path, header, members):
  """``(the larq/tf-keras model of the export, number of binary convs)``."""
  spec = header.get("model", {})
  name = spec.get("name")
  if name not in FAMILIES:
    raise ConvertError(f"{path}: model {name!r} is not supported by the LCE converter "
                       f"(supported: {', '.join(sorted(FAMILIES))}).")
  b = _Builder(path, header, members)
  inputs = b.keras.Input(tuple(spec["image_shape"]), batch_size=1, name="image")
  try:
    outputs = BUILDERS[FAMILIES[name]](b, inputs)
  except ValueError as e:  # a Keras shape error: the arrays do not fit the network
    raise ConvertError(f"{path}: the arrays do not build a {name} network "
                       f"({str(e).splitlines()[0][:200]}).") from None
  return b.finish(inputs, outputs), b.num_binary


# ------------------------------------------------------------------ the flatbuffer


def op_counts(flatbuffer: bytes) -> dict:
  """``{op name: count}`` over every subgraph, read from the flatbuffer's operator codes."""
  from tensorflow.lite.python import schema_py_generated as schema
  model = schema.ModelT.InitFromObj(schema.Model.GetRootAsModel(flatbuffer, 0))
  names = {getattr(schema.BuiltinOperator, k): k for k in dir(schema.BuiltinOperator)
           if not k.startswith("_")}
  codes = []
  for c in model.operatorCodes:
    builtin = max(c.builtinCode, c.deprecatedBuiltinCode)
    if builtin == schema.BuiltinOperator.CUSTOM:
      codes.append(c.customCode.decode() if isinstance(c.customCode, bytes)
                   else str(c.customCode))
    else:
      codes.append(names.get(builtin, str(builtin)))
  counts = {}
  for g in model.subgraphs:
    for op in g.operators or []:
      counts[codes[op.opcodeIndex]] = counts.get(codes[op.opcodeIndex], 0) + 1
  return dict(sorted(counts.items()))


def _write_atomic(out, blob: bytes):
  out = os.path.abspath(out)
  os.makedirs(os.path.dirname(out), exist_ok=True)
  tmp = f"{out}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(blob)
    os.replace(tmp, out)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def convert(export_path, out, float_model=False) -> dict:
  """Converts an export to a flatbuffer at ``out``; returns the report."""
  header, members = read_export(export_path)
  model, num_binary = build_keras_model(export_path, header, members)
  if float_model:
    import tensorflow as tf
    blob = tf.lite.TFLiteConverter.from_keras_model(model).convert()
  else:
    import larq_compute_engine as lce
    blob = lce.convert_keras_model(model)
  ops = op_counts(blob)
  if not float_model and ops.get("LceBconv2d", 0) != num_binary:
    raise ConvertError(f"LCE made {ops.get('LceBconv2d', 0)} LceBconv2d ops of the "
                       f"{num_binary} binary convs of {export_path}; not converting "
                       f"(ops: {ops}).")
  _write_atomic(out, blob)
  return {"out": os.path.abspath(out), "bytes": len(blob), "ops": ops,
          "binary_convs": num_binary, "model": header["model"]["name"],
          "float": bool(float_model), "summary": header.get("summary"),
          "versions": versions()}


def versions() -> dict:
  import larq
  import larq_compute_engine as lce
  import tensorflow as tf
  return {"tensorflow": tf.__version__, "larq": larq.__version__,
          "larq_compute_engine": lce.__version__, "numpy": np.__version__,
          "python": sys.version.split()[0]}


def run_model(model_path, images, runtime="lce", threads=1, repeat=0):
  """Logits of ``images`` (N, H, W, C) one image at a time, and images/s when ``repeat``.

  ``runtime``: ``'lce'`` (LCE's interpreter, its optimised bconv kernels), ``'lce_ref'``
  (LCE's reference bconv kernels) or ``'tflite'`` (TensorFlow's own TFLite interpreter,
  which knows no LCE ops).
  """
  with open(model_path, "rb") as f:
    blob = f.read()
  if runtime == "tflite":
    import tensorflow as tf
    interp = tf.lite.Interpreter(model_content=blob, num_threads=threads)
    interp.allocate_tensors()
    inp, outp = interp.get_input_details()[0]["index"], interp.get_output_details()[0]["index"]

    def one(x):
      interp.set_tensor(inp, x[None])
      interp.invoke()
      return interp.get_tensor(outp)[0]
  else:
    from larq_compute_engine import testing  # an alias, not a module: no 'from ... import'
    interp = testing.Interpreter(blob, num_threads=threads, use_reference_bconv=runtime == "lce_ref")

    def one(x):
      return np.asarray(interp.predict(x[None])).reshape(-1)
  logits = np.stack([one(x) for x in images]).astype(np.float32)
  ips = None
  if repeat:
    n = min(len(images), repeat)
    one(images[0])
    t0 = time.perf_counter()
    for x in images[:n]:
      one(x)
    ips = n / (time.perf_counter() - t0)
  return logits, ips


def _fail(message):
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(2)


def main(argv=None):
  p = argparse.ArgumentParser(prog="deploy_lce.py", description=__doc__.split("\n")[0])
  sub = p.add_subparsers(dest="cmd", required=True)
  c = sub.add_parser("convert")
  c.add_argument("--export", required=True)
  c.add_argument("--out", required=True)
  c.add_argument("--float", action="store_true", help="TFLite's float model, no LCE ops")
  r = sub.add_parser("run")
  r.add_argument("--model", required=True)
  r.add_argument("--images", required=True, help=".npy of (N, H, W, C) float32")
  r.add_argument("--out", required=True, help=".npy of the logits")
  r.add_argument("--runtime", choices=("lce", "lce_ref", "tflite"), default="lce")
  r.add_argument("--threads", type=int, default=1)
  r.add_argument("--time", type=int, default=0, help="time this many images (images/s)")
  o = sub.add_parser("ops")
  o.add_argument("--model", required=True)
  args = p.parse_args(argv)
  try:
    if args.cmd == "convert":
      report = convert(args.export, args.out, args.float)
    elif args.cmd == "run":
      images = np.load(args.images).astype(np.float32)
      logits, ips = run_model(args.model, images, args.runtime, args.threads, args.time)
      _write_atomic(args.out, _npy_bytes(logits))
      report = {"count": len(logits), "images_per_s": ips, "runtime": args.runtime,
                "threads": args.threads, "versions": versions()}
    else:
      with open(args.model, "rb") as f:
        report = {"ops": op_counts(f.read())}
  except ConvertError as e:
    _fail(e)
  except (OSError, RuntimeError) as e:
    _fail(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
  print(json.dumps(report, sort_keys=True))


def _npy_bytes(a):
  import io
  buf = io.BytesIO()
  np.save(buf, a)
  return buf.getvalue()


if __name__ == "__main__":
  main()
