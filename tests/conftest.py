"""Test setup: 8 fake CPU devices, set before JAX starts, for the sharding tests."""

import os

# Compile time dominates the tiny test models: every jit of the tests (not only the
# trainer's, see LNS_FAST_COMPILE below) compiles with parallel._FAST_COMPILE's options.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0"
                           " --xla_llvm_disable_expensive_passes=true").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tf.data is only the input pipeline: keep TensorFlow off any accelerator and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")
# Compile time dominates the tiny test models: skip XLA's optimisation passes.
os.environ.setdefault("LNS_FAST_COMPILE", "1")
# The end-to-end tests train the same smoke models many times over (the ablation test
# alone runs nine trainings, in-process and by subprocess), each recompiling the same
# steps: one persistent compilation cache for this test session, shared by the xdist
# workers and the subprocesses through the environment, halves that test (457 -> 256 s
# here). It is created by the first process that imports this file and removed when
# that process exits; JAX keys entries by the program, options and versions, so a hit
# runs exactly what a fresh compile would.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  import atexit
  import shutil
  import tempfile
  _cache = tempfile.mkdtemp(prefix="lns-jax-test-jit-cache-")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.2")
  atexit.register(shutil.rmtree, _cache, ignore_errors=True)

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def full_run(tmp_path_factory):
  """One uninterrupted run of all stages of the smoke config, shared by the e2e tests.

  Under pytest-xdist every worker shares one run: the first trains it under a file
  lock, the others wait and read its results. Tests must not write into it.
  """
  import fcntl
  import json
  from lns_jax import trainer
  from lns_testutil import smoke_config
  base = tmp_path_factory.getbasetemp()
  shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
  workdir = shared / "full_run"
  with open(shared / "full_run.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    summary = workdir / "summary.json"
    if summary.exists():
      results = json.loads(summary.read_text())["stages"]
    else:
      results = trainer.train(smoke_config(), str(workdir))
  return str(workdir), results
