"""Export a trained binary network: its binary weights packed 1 bit each, nothing else.

  python -m lns_jax.export --workdir=workdirs/fmnist --out=fmnist_lns.npz
  python -m lns_jax.export --workdir=workdirs/fmnist --out=fmnist_base.npz --stage=pretrain

After training, LNS keeps only ``sign(q_hat)`` (Sec. 3): the latent weights ``W`` and
the mapping networks ``f_theta`` are training machinery. The export reads a stage's
final checkpoint (read only: the workdir is never written) and writes one file with

* the binary weights of every binary layer: ``sign(q_hat)`` for an LNS layer, with
  ``q_hat = f_theta(W)`` in eval mode (the mapping's running BatchNorm statistics),
  or ``sign(W)`` for a baseline layer; packed 1 bit per weight with
  :func:`lns_jax.bitpack.pack_signs_np` (``np.packbits`` layout, C order of the HWIO
  kernel, bit set = +1);
* their scale factors ``s`` as float32 (shape ``()`` for ``weight_scale='layer'``,
  ``(1, 1, 1, C_out)`` for ``'channel'``), computed from the latent ``W`` exactly as
  the training model computes them;
* every full-precision variable of the inference model: the first conv, the
  downsample shortcuts, the classifier, BatchNorm scale/bias/mean/variance, PReLU
  slopes, ReActNet's RSign thresholds and RPReLU shifts and slopes;
* a JSON header.

File format (``EXPORT_FORMAT_VERSION = "1.1"``): an uncompressed NumPy ``.npz`` (a zip of
``.npy`` files; readable with ``numpy.load`` alone). Members:

  ``header``                        uint8: UTF-8 JSON, see below
  ``binary/<layer path>/signs``     uint8: the packed signs, ``ceil(n / 8)`` bytes
  ``binary/<layer path>/scale``     float32: ``s``
  ``params/<module path>/<name>``   float32: full-precision parameters
  ``batch_stats/<module path>/<name>`` float32: BatchNorm running statistics

The header holds ``format`` ("lns-jax-export"), ``version`` (the format's
"major.minor"), ``lns_jax_version`` (the lns-jax that wrote it), ``model`` (what
rebuilds the inference model: ``name``, ``num_classes``, ``image_shape``,
``input_binarizer``, ``weight_scale``, ``clip``), ``binary_layers`` (per layer: path,
kernel shape, scale shape, the binarizer it was trained with, strides, padding),
``arrays`` (every member's shape, dtype and SHA-256, checked on load), ``source``
(workdir, stage, step, the stage's test result) and ``config`` (the run's config as
JSON, for evaluation). Binary layers with ``input_binarizer='none'`` or
``weight_binarizer='float'`` do not occur in the paper's models; a ``'float'`` layer
is exported as a full-precision kernel.

:mod:`lns_jax.inference` loads the file and runs the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
import zipfile
import zlib
from typing import Dict, Optional, Tuple

import numpy as np

from lns_jax import workdir as workdir_lib

FORMAT = "lns-jax-export"
# The file format's version, "major.minor". A reader reads its own major version with
# any minor version up to its own; another major or a newer minor is an
# ExportVersionError. 1.0 (written as the integer 1) had no ``lns_jax_version``.
EXPORT_FORMAT_VERSION = "1.1"
FORMAT_VERSION = EXPORT_FORMAT_VERSION  # the name before 1.1


class ExportError(ValueError):
  """An export file cannot be used: damaged, truncated, not an export, or mismatched."""


class ExportMismatchError(ExportError):
  """The export does not fit the model, config or inputs it is used with."""


class ExportVersionError(ExportError):
  """The export was written in a format version this lns-jax cannot read."""


# ----------------------------------------------------------------------------- the run


def default_stage(workdir: str) -> str:
  """The last stage listed in ``summary.json``, else the last finished stage."""
  stage = workdir_lib.last_summary_stage(workdir)
  if stage is not None:
    return stage
  done = workdir_lib.finished_stages(workdir)
  if not done:
    raise ExportError(f"{workdir} holds no finished stage (no <stage>/final/<step> "
                      f"checkpoint); train first (python train.py ... --workdir={workdir}) "
                      f"or give --workdir of a finished run.")
  return done[-1]


def load_stage(workdir: str, stage: str):
  """``(config, variables, meta, step_dir)`` of a finished stage, read only."""
  from lns_jax import config as config_lib
  from lns_jax import checkpoint as ckpt_lib
  step_dir = workdir_lib.final_step_dir(workdir, stage)
  if step_dir is None:
    done = workdir_lib.finished_stages(workdir)
    raise ExportError(
        f"stage {stage!r} of {workdir} has not finished (no {stage}/final/<step> "
        f"checkpoint). Finished stages: {', '.join(done) or 'none'}; pass one of them "
        f"with --stage, or finish the run first.")
  meta = ckpt_lib.load_meta(step_dir)
  config_json = meta.get("config")
  config_file = workdir_lib.path(workdir, workdir_lib.CONFIG)
  if config_json is None and os.path.exists(config_file):
    with open(config_file) as f:
      config_json = f.read()
  if config_json is None:
    raise ExportError(f"{step_dir} has no config (meta) and {workdir} has no config.json; "
                      f"cannot tell which model it holds.")
  config = config_lib.from_saved_json(config_json)
  try:
    with warnings.catch_warnings():  # orbax: "Sharding info not provided" (we want host arrays)
      warnings.filterwarnings("ignore", message="Sharding info not provided")
      variables = ckpt_lib.load_variables(step_dir)
  except ckpt_lib.CheckpointMismatchError as e:
    raise ExportError(f"cannot read the checkpoint of stage {stage!r}: {e}") from e
  return config, variables, meta, step_dir


# --------------------------------------------------------------------------- building


def model_spec(config, num_classes: int, image_shape) -> dict:
  """What rebuilds the inference model (the header's ``model``)."""
  return {"name": str(config.model.name), "num_classes": int(num_classes),
          "image_shape": [int(d) for d in image_shape],
          "input_binarizer": str(config.model.input_binarizer),
          "weight_scale": str(config.model.weight_scale), "clip": float(config.model.clip)}


def spec_config(spec: dict):
  """The header's ``model`` as a config for :func:`lns_jax.models.from_config`."""
  import ml_collections
  return ml_collections.ConfigDict({"model": {k: spec[k] for k in (
      "name", "input_binarizer", "weight_scale", "clip")}})


def build_inference_model(spec: dict):
  """The ``'float'`` variant of the model: a BinaryConv then uses its kernel as it is,
  so a kernel of ``unpacked signs * s`` gives exactly the training model's ``sign(.) * s``
  (the same float32 products), with the same activation binarizer."""
  from lns_jax import models
  return models.from_config(spec_config(spec), "float", spec["num_classes"])


def _geometry(m) -> dict:
  """What the header records of a BinaryConv ``m``: strides, padding, binarizers."""
  pad = m.padding if isinstance(m.padding, str) else [list(map(int, p)) for p in m.padding]
  return {"strides": [int(s) for s in m.strides], "padding": pad,
          "kernel_size": [int(k) for k in m.kernel_size], "input_binarizer": m.input_binarizer,
          "weight_binarizer": m.weight_binarizer, "use_bias": bool(m.use_bias)}


def _sha256(a: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()


def export_arrays(config, variables: dict, stage: str) -> Tuple[dict, Dict[str, np.ndarray]]:
  """``(header without 'arrays', members)`` for the inference model of ``stage``."""
  from lns_jax import binary, models
  from lns_jax import data as data_lib
  info = data_lib.get_info(config.data)
  spec = model_spec(config, info.num_classes, info.image_shape)
  trained_with = binary.weight_binarizers(  # {path: 'sign'|'lns'|'float'}
      models.from_config(config, stage, info.num_classes), info.image_shape)
  calls, target = binary.trace(build_inference_model(spec), info.image_shape)
  geometry = {c.path: _geometry(c.module) for c in calls
              if isinstance(c.module, binary.BinaryConv)}
  members, layers_meta = _binary_members(config, variables, trained_with, geometry)
  binary_kernels = {tuple(l["path"].split("/")) + ("kernel",) for l in layers_meta}
  members.update(_full_precision_members(config, variables, target, binary_kernels))
  header = {"format": FORMAT, "version": FORMAT_VERSION, "model": spec,
            "binary_layers": layers_meta}
  return header, members


def _binary_members(config, variables, trained_with, geometry):
  """The packed signs and the scale of each sign / LNS layer, and the header's entries."""
  from lns_jax import binary, quantizers
  params, bstats = variables["params"], variables.get("batch_stats", {})
  members: Dict[str, np.ndarray] = {}
  layers_meta = []
  for path, binarizer in sorted(trained_with.items()):
    if binarizer == "float":
      continue
    try:
      signs = binary.layer_signs({path: binarizer}, params, bstats, config.mapping.output,
                                 config.mapping.init, config.mapping.get("conv", "xla"))[path]
      kernel = np.asarray(binary.subtree(params, path)["kernel"], np.float32)
    except (KeyError, TypeError) as e:
      raise ExportMismatchError(
          f"the checkpoint has no weights for binary layer {'/'.join(path)} of "
          f"{config.model.name!r} ({type(e).__name__}: {e}); it was saved from another "
          f"model or config.") from None
    scale = np.asarray(quantizers.weight_scale(kernel, config.model.weight_scale), np.float32)
    packed, shape = pack_signs(signs)
    key = "/".join(path)
    members[f"binary/{key}/signs"] = packed
    members[f"binary/{key}/scale"] = scale
    layers_meta.append({"path": key, "shape": list(shape), "scale_shape": list(scale.shape),
                        "trained_with": binarizer, "bits": int(np.prod(shape)),
                        **geometry.get(path, {})})
  return members, layers_meta


def _full_precision_members(config, variables, target, binary_kernels):
  """Every other variable of the inference model (``target``: its abstract variables)."""
  from flax import traverse_util
  members = {}
  for col, tree in target.items():
    flat_src = traverse_util.flatten_dict(variables.get(col, {}))
    for key, leaf in traverse_util.flatten_dict(tree).items():
      if col == "params" and key in binary_kernels:
        continue
      if key not in flat_src:
        raise ExportMismatchError(
            f"the checkpoint lacks {col}/{'/'.join(key)} which model "
            f"{config.model.name!r} needs; it was saved from another model or config.")
      value = np.asarray(flat_src[key])
      if tuple(value.shape) != tuple(leaf.shape):
        raise ExportMismatchError(
            f"{col}/{'/'.join(key)} has shape {value.shape} in the checkpoint but "
            f"{tuple(leaf.shape)} in model {config.model.name!r}; it was saved from another "
            f"model or config.")
      members[f"{col}/{'/'.join(key)}"] = value.astype(np.float32)
  return members


def pack_signs(signs) -> Tuple[np.ndarray, Tuple[int, ...]]:
  from lns_jax.bitpack import pack_signs_np
  return pack_signs_np(np.asarray(signs))


# ------------------------------------------------------------------------------ file


def write_file(path: str, header: dict, members: Dict[str, np.ndarray]) -> int:
  """Writes the ``.npz`` atomically (temp file + rename); returns its size in bytes."""
  from lns_jax import __version__
  header = dict(header)
  header.setdefault("version", EXPORT_FORMAT_VERSION)
  header.setdefault("lns_jax_version", __version__)
  header["arrays"] = {k: {"shape": list(v.shape), "dtype": str(v.dtype), "sha256": _sha256(v)}
                      for k, v in sorted(members.items())}
  blob = np.frombuffer(json.dumps(header, sort_keys=True).encode("utf-8"), np.uint8)
  path = os.path.abspath(os.path.expanduser(path))
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:  # a file object: numpy does not append '.npz'
      np.savez(f, header=blob, **members)
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)
  return os.path.getsize(path)


def _damaged(path, why):
  return ExportError(
      f"{path} is damaged or truncated ({why}); it cannot be loaded. Export the model "
      f"again: python -m lns_jax.export --workdir=<run> --out={path}")


def parse_format_version(version) -> Tuple[int, int]:
  """``(major, minor)`` of a header's ``version``: ``1`` (format 1.0) or ``"1.1"``."""
  if isinstance(version, int) and not isinstance(version, bool):
    return version, 0
  parts = str(version).split(".") if isinstance(version, str) else []
  if len(parts) != 2 or not all(p.isdigit() for p in parts):
    raise ValueError(f"not a 'major.minor' version: {version!r}")
  return int(parts[0]), int(parts[1])


def check_format_version(header: dict, path: str = "the export") -> None:
  """Raises :class:`ExportVersionError` (one line) unless this lns-jax reads ``header``."""
  from lns_jax import __version__
  ours = parse_format_version(EXPORT_FORMAT_VERSION)
  writer = header.get("lns_jax_version")
  by = f"lns-jax {writer}" if writer else "an lns-jax that did not record its version"
  fix = (f"Export the run again with this lns-jax (python -m lns_jax.export "
         f"--workdir=<run> --out={path})" + (f", or load it with {by}." if writer else "."))
  try:
    theirs = parse_format_version(header.get("version"))
  except ValueError:
    raise ExportVersionError(f"{path} has an unreadable export format version "
                             f"{header.get('version')!r} (written by {by}). {fix}") from None
  if theirs[0] != ours[0] or theirs[1] > ours[1]:
    raise ExportVersionError(
        f"{path} was written by {by} in export format {theirs[0]}.{theirs[1]}; this lns-jax "
        f"({__version__}) reads formats {ours[0]}.0 to {ours[0]}.{ours[1]}. {fix}")


def read_file(path: str) -> Tuple[dict, Dict[str, np.ndarray]]:
  """``(header, members)`` of an export, every member checked against the header."""
  if not os.path.isfile(path):
    raise ExportError(f"{path}: no such export file. Write one with "
                      f"python -m lns_jax.export --workdir=<run> --out={path}")
  try:
    with np.load(path, allow_pickle=False) as z:
      names = set(z.files)
      if "header" not in names:
        raise ExportError(f"{path} is a .npz file but not an lns-jax export (no header "
                          f"member); give a file written by python -m lns_jax.export.")
      header = json.loads(bytes(z["header"]).decode("utf-8"))
      members = {k: z[k] for k in names if k != "header"}
  except ExportError:
    raise
  except (zipfile.BadZipFile, EOFError, OSError, ValueError, KeyError, UnicodeDecodeError,
          zlib.error) as e:
    raise _damaged(path, f"{type(e).__name__}: {str(e)[:200]}") from e
  if not isinstance(header, dict) or header.get("format") != FORMAT:
    raise ExportError(f"{path} is not an lns-jax export (format "
                      f"{header.get('format') if isinstance(header, dict) else None!r}); give "
                      f"a file written by python -m lns_jax.export.")
  check_format_version(header, path)
  listed = header.get("arrays", {})
  if set(listed) != set(members):
    missing = sorted(set(listed) - set(members))
    extra = sorted(set(members) - set(listed))
    raise _damaged(path, f"members missing: {missing[:3]}, unexpected: {extra[:3]}")
  for k, meta in listed.items():
    a = members[k]
    if list(a.shape) != meta["shape"] or str(a.dtype) != meta["dtype"] or \
        _sha256(a) != meta["sha256"]:
      raise _damaged(path, f"member {k} does not match its checksum")
  return header, members


# ------------------------------------------------------------------------------- API


def export(workdir: str, out: str, stage: Optional[str] = None) -> dict:
  """Exports ``stage`` (default: :func:`default_stage`) of ``workdir`` to ``out``.

  Returns a report: the file's size, the payload (the arrays' bytes) and the
  summary's memory figure for the same model (:mod:`lns_jax.summary`).
  """
  from lns_jax import models
  from lns_jax import summary as summary_lib
  from lns_jax.stages import STAGES
  workdir = os.path.abspath(os.path.expanduser(workdir))
  out = os.path.abspath(os.path.expanduser(out))
  if not os.path.isdir(workdir):
    raise ExportError(f"--workdir={workdir} does not exist; give the workdir of a run.")
  if os.path.commonpath([workdir, out]) == workdir:
    raise ExportError(f"--out={out} is inside the run's workdir {workdir}; export never "
                      f"writes into a workdir. Give a path outside it.")
  stage = stage or default_stage(workdir)
  if stage not in STAGES:
    raise ExportError(f"--stage={stage!r} is not a stage; use one of {sorted(STAGES)}.")
  if STAGES[stage].activations != "binary":  # the inference model binarizes activations
    raise ExportError(f"--stage={stage}: its activations are real-valued (a distillation "
                      f"teacher, docs/reactnet.md), not a binary network; export a binary "
                      f"stage (pretrain, lns, finetune, step1).")
  config, variables, meta, step_dir = load_stage(workdir, stage)
  header, members = export_arrays(config, variables, stage)
  result = None
  result_path = workdir_lib.path(workdir, stage, workdir_lib.RESULT)
  if os.path.exists(result_path):
    try:
      result = workdir_lib.read_json(result_path).get("test")
    except (OSError, ValueError):
      result = None
  header["source"] = {"workdir": workdir, "stage": stage, "step": meta.get("step"),
                      "checkpoint": step_dir, "weights": STAGES[stage].weights,
                      "test": result}
  header["config"] = config.to_json_best_effort()
  info = header["model"]
  model = models.from_config(config, "sign", info["num_classes"])  # the inference model
  total = summary_lib.summarize_model(model, info["image_shape"], config.model.name).total()
  header["summary"] = {k: total[k] for k in ("memory_bits", "memory_mbit", "flops",
                                             "binary_params", "real_params")}
  size = write_file(out, header, members)
  payload = sum(int(v.nbytes) for v in members.values())
  pad_bits = sum(8 * math.ceil(l["bits"] / 8) - l["bits"] for l in header["binary_layers"])
  return {"out": out, "stage": stage, "file_bytes": size, "file_mbit": size * 8 / 1e6,
          "payload_bytes": payload, "payload_bits": payload * 8, "padding_bits": pad_bits,
          "summary_memory_bits": total["memory_bits"], "summary_memory_mbit":
          total["memory_mbit"], "overhead_bytes": size - payload,
          "num_binary_layers": len(header["binary_layers"]),
          "binary_bits": sum(l["bits"] for l in header["binary_layers"])}


def format_report(r: dict) -> str:
  return (f"wrote {r['out']} (stage {r['stage']}, {r['num_binary_layers']} binary layers, "
          f"{r['binary_bits']:,} binary weights)\n"
          f"  file size:       {r['file_bytes']:,} bytes = {r['file_mbit']:.4f} Mbit\n"
          f"  arrays (payload): {r['payload_bytes']:,} bytes = {r['payload_bits'] / 1e6:.4f} Mbit"
          f" (of which {r['padding_bits']} bits pad binary layers to whole bytes)\n"
          f"  summary memory:  {r['summary_memory_bits'] / 8:,.0f} bytes = "
          f"{r['summary_memory_mbit']:.4f} Mbit\n"
          f"  file - payload:  {r['overhead_bytes']:,} bytes (header JSON, zip and .npy "
          f"headers)")


def main(argv):
  del argv
  from absl import flags
  from lns_jax import cli
  cli.quiet_logging()
  F = flags.FLAGS
  try:
    report = export(F.workdir, F.out, F.stage or None)
  except ExportError as e:
    cli.fail(e)
  print(format_report(report))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import flags
  flags.DEFINE_string("workdir", None, "The run's workdir (read only).")
  flags.DEFINE_string("out", None, "The export file to write (.npz).")
  flags.DEFINE_string("stage", None, "Stage to export; default: the last one run.")
  flags.mark_flags_as_required(["workdir", "out"])
  from lns_jax import cli
  cli.run(main)  # app.run(main), with bad flags as one `error:` line, exit code 2
