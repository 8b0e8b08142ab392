"""Deploy an export with Larq Compute Engine: a TFLite flatbuffer of ``LceBconv2d`` ops.

  python -m lns_jax.deploy --export=fmnist.npz --out=fmnist.tflite
  python -m lns_jax.deploy --export=fmnist.npz --out=fmnist_float.tflite --float

LCE (its converter and its runtime) needs TensorFlow 2.16, tf-keras, larq and numpy < 2,
which cannot share this environment (TensorFlow 2.21, numpy 2), so the conversion runs
in a separate deployment environment, created once with

  python3.11 -m venv .venv-lce && .venv-lce/bin/pip install -r requirements-lce.txt

This module finds its python (``$LNS_LCE_PYTHON``, else ``.venv-lce/bin/python`` at the
repository root) and runs :mod:`lns_jax.deploy_lce` there by path, as a subprocess: the
two sides share nothing but the export file (format, header, SHA-256 of every array) and
the flatbuffer. Every binary conv of the export becomes one ``LceBconv2d`` (the
converter refuses otherwise); ``--float`` writes TensorFlow's own float conversion of the
same network instead (no LCE ops), for comparison. A bad export, another format version,
an unsupported model or a missing deployment environment is one ``error:`` line and exit
code 2, with nothing written at ``--out``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from typing import Optional, Tuple

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy_lce.py")
ENV_VAR = "LNS_LCE_PYTHON"
DEFAULT_PYTHON = os.path.join(REPO, ".venv-lce", "bin", "python")
CREATE = ("python3.11 -m venv .venv-lce && .venv-lce/bin/pip install -r "
          "requirements-lce.txt")


class DeployError(Exception):
  """The conversion failed; the message is one line for the user."""


def lce_python(python: Optional[str] = None) -> str:
  """The deployment environment's python: ``python``, ``$LNS_LCE_PYTHON`` or the default."""
  python = python or os.environ.get(ENV_VAR) or DEFAULT_PYTHON
  if not (os.path.isfile(python) and os.access(python, os.X_OK)):
    raise DeployError(
        f"the deployment environment is missing (no python at {python}); create it at the "
        f"repository root with: {CREATE} (or point ${ENV_VAR} at its python).")
  return python


def _call(args, python=None, timeout=3600) -> dict:
  """Runs the converter script with ``args``; its JSON report, or a DeployError."""
  python = lce_python(python)
  # Nothing of this environment may leak into the other: its paths hold numpy 2.
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
  env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
  r = subprocess.run([python, CONVERTER, *args], capture_output=True, text=True, env=env,
                     timeout=timeout, check=False)
  errors = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
  if r.returncode == 2 and errors:
    raise DeployError(errors[-1][len("error: "):])
  if r.returncode != 0:
    tail = [l for l in r.stderr.splitlines() if l.strip()][-1:] or ["no output"]
    raise DeployError(f"the converter ({python} {os.path.basename(CONVERTER)}) failed "
                      f"with exit code {r.returncode}: {tail[0][:300]}")
  return json.loads(r.stdout.strip().splitlines()[-1])


def convert(export: str, out: str, float_model: bool = False,
            python: Optional[str] = None) -> dict:
  """Converts ``export`` to the flatbuffer ``out``; the converter's report (bytes, ops)."""
  args = ["convert", f"--export={os.path.abspath(export)}", f"--out={os.path.abspath(out)}"]
  return _call(args + (["--float"] if float_model else []), python)


def run(model: str, images, runtime: str = "lce", threads: int = 1, repeat: int = 0,
        python: Optional[str] = None) -> Tuple[np.ndarray, dict]:
  """Logits of ``images`` from a flatbuffer in the deployment environment, and its report.

  ``runtime``: ``'lce'`` (LCE's interpreter), ``'lce_ref'`` (its reference bconv kernels)
  or ``'tflite'`` (TensorFlow's TFLite interpreter); ``repeat``: images timed (images/s in
  the report's ``images_per_s``), one at a time on ``threads`` threads.
  """
  with tempfile.TemporaryDirectory(prefix="lns-deploy-") as d:
    np.save(os.path.join(d, "x.npy"), np.asarray(images, np.float32))
    report = _call(["run", f"--model={os.path.abspath(model)}",
                    f"--images={os.path.join(d, 'x.npy')}", f"--out={os.path.join(d, 'y.npy')}",
                    f"--runtime={runtime}", f"--threads={threads}", f"--time={repeat}"], python)
    return np.load(os.path.join(d, "y.npy")), report


def op_counts(model: str, python: Optional[str] = None) -> dict:
  """``{op name: count}`` of a flatbuffer, read from its operator codes."""
  return _call(["ops", f"--model={os.path.abspath(model)}"], python)["ops"]


def format_report(r: dict) -> str:
  ops = r["ops"]
  kind = "TFLite float model" if r["float"] else (
      f"{ops.get('LceBconv2d', 0)} LceBconv2d ops for the export's {r['binary_convs']} "
      f"binary convs")
  lines = [f"wrote {r['out']} ({r['model']}: {kind})",
           f"  flatbuffer:      {r['bytes']:,} bytes = {r['bytes'] * 8 / 1e6:.4f} Mbit"]
  if r.get("summary"):
    bits = r["summary"]["memory_bits"]
    lines.append(f"  summary memory:  {bits / 8:,.0f} bytes = {bits / 1e6:.4f} Mbit")
  lines.append("  ops:             " + ", ".join(f"{k} {v}" for k, v in ops.items()))
  v = r["versions"]
  lines.append(f"  converted with larq-compute-engine {v['larq_compute_engine']}, larq "
               f"{v['larq']}, tensorflow {v['tensorflow']}")
  return "\n".join(lines)


def main(argv):
  del argv
  from absl import flags
  from lns_jax import cli
  F = flags.FLAGS
  try:
    report = convert(F.export, F.out, F.float, F.lce_python)
  except DeployError as e:
    cli.fail(e)
  print(format_report(report))


if __name__ == "__main__":
  from absl import flags
  flags.DEFINE_string("export", None, "Export file written by python -m lns_jax.export.")
  flags.DEFINE_string("out", None, "The flatbuffer to write (.tflite).")
  flags.DEFINE_bool("float", False, "TFLite's float model of the network (no LCE ops).")
  flags.DEFINE_string("lce_python", None, f"The deployment environment's python; default "
                      f"${ENV_VAR}, else .venv-lce/bin/python.")
  flags.mark_flags_as_required(["export", "out"])
  from lns_jax import cli
  cli.run(main)  # app.run(main), with bad flags as one `error:` line, exit code 2
  sys.exit(0)
