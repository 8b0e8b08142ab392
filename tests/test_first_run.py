"""The first five minutes: the README's first command, and the first screen of a run.

* The first command installs Fashion-MNIST with apt as root without sudo (a container)
  and as a user with sudo. Its apt part runs here under fake ``id``/``apt-get``/``sudo``
  programs that record their arguments (nothing is installed).
* ``train.py`` in a fresh TFDS data_dir builds Fashion-MNIST and trains, and what it
  prints is what it does: no TensorFlow/absl start-up lines, no TFDS "Downloading ..."
  or progress bars.
"""

import os
import pathlib
import re
import shutil
import subprocess
import sys
import tempfile

import pytest

from lns_testutil import ROOT, SMOKE_FLAGS


def _first_command():
  """The first command line of the README's first code block."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
  return next(l for l in block.splitlines() if l.strip() and not l.startswith("#"))


def test_readme_opens_with_the_two_commands():
  """The README's first thing after its title is the bash block of the two commands: set up
  and train (one line), then run the tests; the findings live in docs/ (issue 26)."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  assert readme.startswith("# lns-jax\n\n```bash\n"), readme[:200]
  block = re.search(r"```bash\n(.*?)```", readme, re.S).group(1)
  lines = [l for l in block.splitlines() if l.strip() and not l.startswith("#")]
  assert len(lines) == 2, lines
  assert lines[0].startswith("S=$(") and lines[0].endswith(
      ".venv/bin/python train.py --config=configs/fashion_mnist_r20.py:quick "
      "--workdir=workdirs/fmnist_quick"), lines[0]
  assert lines[1] == ".venv/bin/python -m pytest -q"


def _python_blocks():
  """``{section heading: its Python block}`` of the README, in order."""
  readme = open(os.path.join(ROOT, "README.md")).read()
  blocks = {}
  for section in re.split(r"^## ", readme, flags=re.M)[1:]:
    for block in re.findall(r"```python\n(.*?)```", section, re.S):
      blocks.setdefault(section.splitlines()[0], block)
  return blocks


def _run_block(heading):
  scope = {}
  exec(compile(_python_blocks()[heading], f"README.md ({heading})", "exec"), scope)  # noqa: S102
  return scope


def test_readme_has_a_python_block_per_section_and_each_is_tested():
  assert list(_python_blocks()) == ["The method as pure functions", "LNS in your own model"]


def test_readme_python_block_runs_as_typed():
  """The README's Python block of "The method as pure functions" runs as written."""
  scope = _run_block("The method as pure functions")
  assert scope["q_hat"].shape == scope["w"].shape and scope["g"].shape == scope["w"].shape
  assert scope["y"].shape == (8, 16, 16, 32) and "lns" in scope["coll"]


def test_readme_own_model_block_runs_as_typed():
  """"LNS in your own model": the warm start then LNS, in the user's own jitted step."""
  import jax
  import numpy as np
  from flax import traverse_util
  scope = _run_block("LNS in your own model")
  assert np.isfinite(float(scope["loss"]))
  start = traverse_util.flatten_dict(scope["variables"]["params"])
  end = traverse_util.flatten_dict(jax.device_get(scope["params"]))
  assert start.keys() == end.keys() and any("mapping" in k for k in end)
  base = traverse_util.flatten_dict(scope["baseline"]["params"])
  for k, v in base.items():  # started from the baseline, then trained by the LNS steps
    np.testing.assert_array_equal(start[k], v)
    assert not np.array_equal(end[k], v), k


def _apt_part(command):
  """The command up to its last ``apt-get`` step (venv, pip and training not run)."""
  steps = command.split(" && ")
  last = max(i for i, s in enumerate(steps) if "apt-get" in s)
  return " && ".join(steps[:last + 1])


def _run_as(tmp_path, command, uid, with_sudo):
  """Runs ``command`` in bash with only fake id/apt-get (and sudo) on PATH."""
  bindir = pathlib.Path(tempfile.mkdtemp(prefix="bin-", dir=tmp_path))
  log = bindir / "calls.log"
  programs = {
      "id": f'[ "$1" = -u ] && echo {uid} || echo "uid={uid}"',
      "apt-get": f'echo "apt-get $*" >> {log}',
  }
  if with_sudo:
    programs["sudo"] = f'echo "sudo $*" >> {log}; exec "$@"'
  for name, body in programs.items():
    path = bindir / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
  bash = shutil.which("bash")
  r = subprocess.run([bash, "-c", command], env={"PATH": str(bindir), "HOME": str(tmp_path)},
                     cwd=tmp_path, capture_output=True, text=True, timeout=60)
  calls = log.read_text().splitlines() if log.exists() else []
  return r, calls


def test_readme_first_command_installs_data_as_root_and_with_sudo(tmp_path):
  command = _first_command()
  assert "dataset-fashion-mnist" in command and "python3 -m venv .venv" in command
  assert "pip install -r requirements.txt" in command and "train.py --config=" in command
  apt = _apt_part(command)
  install = "apt-get install -y dataset-fashion-mnist"

  # root, no sudo on PATH (a container): apt-get itself.
  r, calls = _run_as(tmp_path, apt, uid=0, with_sudo=False)
  assert r.returncode == 0, r.stderr
  assert calls == ["apt-get update", install], calls
  # a user with sudo: through sudo.
  r, calls = _run_as(tmp_path, apt, uid=1000, with_sudo=True)
  assert r.returncode == 0, r.stderr
  assert calls == ["sudo apt-get update", "apt-get update", f"sudo {install}", install], calls
  # The old first command fails where there is no sudo: the check above can tell.
  r, calls = _run_as(tmp_path, "sudo apt-get update", uid=0, with_sudo=False)
  assert r.returncode == 127 and calls == []


# What TensorFlow, absl and TFDS printed before: none of it says what the run does.
NOISE = ("oneDNN custom operations", "absl::InitializeLog", "dataset_info.json",
         "Downloading and preparing", "Unknown size", "downloaded and prepared",
         "Generating splits", "Extraction completed", "Shuffling", "examples/s")


@pytest.mark.slow
def test_first_screen_of_a_run_is_readable(tmp_path):
  """train.py at smoke size, one stage, in a fresh data_dir (so Fashion-MNIST is built)."""
  env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", LNS_FAST_COMPILE="1")
  for key in ("XLA_FLAGS", "TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS", "TFDS_DATA_DIR"):
    env.pop(key, None)  # as a user's shell: train.py must quieten TensorFlow itself
  data_dir = tmp_path / "tensorflow_datasets"
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), *SMOKE_FLAGS,
         "--config.stages=pretrain", "--config.pretrain.epochs=1",
         f"--config.data.data_dir={data_dir}", f"--workdir={tmp_path / 'run'}"]
  r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                     text=True, timeout=600)
  out = r.stdout
  assert r.returncode == 0, out[-3000:]
  found = [n for n in NOISE if n in out]
  assert not found, f"noise on the first screen: {found}\n{out[:3000]}"
  lines = [l for l in out.splitlines() if l.strip()]
  assert lines[0].startswith("building Fashion-MNIST from the local files in "), lines[:3]
  assert re.match(r"built Fashion-MNIST \(60,000 train, 10,000 test\) in \d+ s$", lines[1]), \
      lines[:3]
  assert lines[2].startswith("[pretrain] 1 epoch = 4 steps of batch 32"), lines[:4]
  assert lines[3].startswith("[pretrain] epoch 1 step 4/4: train ce"), lines[:4]
  assert not [l for l in lines if re.match(r"^(WARNING|[IWE]\d{4} )", l)], lines
  assert (data_dir / "fashion_mnist").is_dir()
