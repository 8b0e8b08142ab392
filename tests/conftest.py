"""Test setup: 2 fake CPU devices, set before JAX starts, for the sharding tests."""

import os

# Every test shards its batch (and the mapping's filters) over 2 fake devices, and its
# subprocesses inherit them; tests/test_parallel.py runs its main test in a process of
# its own on 8 (LNS_TEST_DEVICES=8). Measured on the 2-core AMD EPYC (session 16): one
# smoke run of 3 stages (the full_run fixture) takes 45.9 CPU-s on 8 devices, 39.0 on 2.
_DEVICES = os.environ.get("LNS_TEST_DEVICES", "2")

# Compile time dominates the tiny test models: every jit of the tests (not only the
# trainer's, see LNS_FAST_COMPILE below) compiles with parallel._FAST_COMPILE's options.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           f" --xla_force_host_platform_device_count={_DEVICES}"
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

# Files in order of cost, heaviest first, so that the two xdist workers (--dist loadfile
# without xdist's by-test-count reorder, see pyproject.toml) end close together rather
# than one of them running the last heavy file alone. test_reactnet_train is first (266 s
# in the suite on the 2-core EPYC, session 20: its run.sh test and its five-stage fixture),
# test_ablation second (150 s); test_export third: the worker that is free first
# trains the shared smoke run (full_run below), which neither of the first two uses.
# Files not listed keep their collection order, after these.
# Update the list when a file's cost changes a lot (`pytest --durations=0`).
_FILE_ORDER = [
    "test_reactnet_train.py", "test_ablation.py", "test_export.py", "test_configs_run.py",
    "test_deploy.py", "test_cpu_options.py", "test_cli.py", "test_process_lost.py",
    "test_robustness.py", "test_strength.py", "test_multihost.py", "test_notebook.py",
    "test_paper_recipe.py", "test_xnor_conv.py", "test_lns_effect.py", "test_first_run.py",
    "test_train.py", "test_no_tensorflow.py", "test_api.py", "test_objective_scale.py",
    "test_mapping.py",
]


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(_FILE_ORDER)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable within a file


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


@pytest.fixture(scope="session")
def cli():
  """A warm process that runs entry points with argv (tests/cli_zygote.py), one per xdist
  worker, started on first use: a command line that fails at its flags costs 0.3 s
  through it instead of the 3 s of a fresh interpreter importing TensorFlow and JAX, and
  a successful run saves the same imports (about 8 CPU-s on the 2-core Xeon;
  ``run_argv`` takes a subprocess command line). Tests about processes themselves
  (signals, supervisors, no TensorFlow) use real subprocesses; so do one bad input of
  train.py (test_cli) and of lns_jax.deploy, and one successful run of each entry point."""
  from lns_testutil import Zygote
  z = Zygote()
  yield z
  z.close()
