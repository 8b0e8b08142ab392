"""Where TensorFlow is not: the model, the step, the config, the benchmarks and training
with config.data.loader='numpy' run in processes in which `import tensorflow` and
`import tensorflow_datasets` fail (stub packages first on PYTHONPATH)."""

import json
import os
import subprocess
import sys

import pytest

from lns_testutil import ROOT, SMOKE_FLAGS

from lns_jax import data

BLOCKED = ("tensorflow", "tensorflow_datasets")


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """Environment of a subprocess without TensorFlow (checked, not assumed)."""
  stubs = tmp_path_factory.mktemp("no_tf")
  for name in BLOCKED:
    (stubs / name).mkdir()
    (stubs / name / "__init__.py").write_text(
        f"raise ModuleNotFoundError(\"No module named '{name}' (blocked by the test)\", "
        f"name={name!r})\n")
  e = dict(os.environ, PYTHONPATH=os.pathsep.join([str(stubs), ROOT]), JAX_PLATFORMS="cpu")
  for name in BLOCKED:
    r = subprocess.run([sys.executable, "-c", f"import {name}"], env=e, capture_output=True,
                       text=True)
    assert r.returncode != 0 and "blocked by the test" in r.stderr
  return e


IMPORTS_AND_STEP = r"""
import sys
import lns_jax, lns_jax.trainer, lns_jax.checkpoint, lns_jax.parallel, lns_jax.data
from lns_jax import config as config_lib
from lns_jax.data import numpy_loader
sys.path.insert(0, "benchmarks")
import train_step, scaling

c = config_lib.base_config()
config_lib.validate(c)
assert c.data.loader == "tfds" and lns_jax.data.default_data_config().loader == "tfds"
# One tiny step of the benchmark's own step (scaling.py's worker imports nothing more;
# the LNS step runs in the CLI test).
c = train_step.make_config("resnet_tiny", 8, 1, 8)
r = train_step.bench_step(c, "pretrain", (8, 8, 1), 10, steps=1, warmup=0)
assert r["ms"] > 0 and r["gflop"] > 0, r
print("bench_step", r)
# The TFDS loader says what to do instead.
c.data.loader = "tfds"
try:
  lns_jax.data.prepare(c.data)
except ImportError as e:  # also a ConfigError: train.py prints it as one `error:` line
  assert isinstance(e, config_lib.ConfigError)
  print("TFDS:", e)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "tensorflow_datasets"))
print("tensorflow modules:", loaded)
"""


def test_model_step_config_and_benchmarks_import_and_run(env):
  r = subprocess.run([sys.executable, "-c", IMPORTS_AND_STEP], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=300)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "bench_step {'ms'" in r.stdout
  assert "TFDS: config.data.loader: 'tfds' needs tensorflow" in r.stdout
  assert "--config.data.loader=numpy" in r.stdout
  assert "tensorflow modules: []" in r.stdout


@pytest.mark.slow
def test_train_cli_with_the_numpy_loader_equals_the_tfds_run(env, full_run, tmp_path):
  """`python train.py ... --config.data.loader=numpy` on real Fashion-MNIST without
  TensorFlow: all three stages, and the same results as the TFDS run of the same config
  (conftest's full_run), since the batches are the same."""
  if not os.path.isfile(os.path.join(data.FASHION_MNIST_DEBIAN_DIR,
                                     "train-images-idx3-ubyte.gz")):
    pytest.skip("apt-get install dataset-fashion-mnist")
  workdir = tmp_path / "run"
  cmd = [sys.executable, os.path.join(ROOT, "train.py"), *SMOKE_FLAGS,
         "--config.data.loader=numpy", f"--workdir={workdir}"]
  r = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "Traceback" not in r.stderr
  got = json.loads((workdir / "summary.json").read_text())["stages"]
  with open(os.path.join(full_run[0], "summary.json")) as f:
    want = json.load(f)["stages"]
  assert list(got) == ["pretrain", "warmup", "lns"]
  for stage in got:
    assert got[stage]["test"]["count"] == 64
    for k in ("top1", "top5", "ce"):
      assert got[stage]["test"][k] == pytest.approx(want[stage]["test"][k], rel=1e-5), (stage, k)
  config = json.loads((workdir / "config.json").read_text())
  assert config["data"]["loader"] == "numpy"
