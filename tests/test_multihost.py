"""Two processes on this machine train together, as two hosts would.

Each process is ``train.py`` (through ``tests/multihost_worker.py``, which only
observes) with ``--coordinator_address=127.0.0.1:<port> --num_processes=2
--process_id=i``, 2 fake CPU devices, gloo collectives over loopback: a 4-device mesh
over 2 processes. The run is the smoke config shrunk further (a two-block ResNet,
32 training images = one global batch per epoch, stages pretrain and lns).

It is run in two launches: in the first, only process 1 gets SIGTERM during pretrain
(a preemption notice that reaches one host); both processes must stop after the same
step with one collective checkpoint and exit 128+15. The second launch resumes
(restoring that checkpoint collectively) and runs to the end.

The tests then check that both processes end with identical parameters, that each
read only its shard of the data, that only process 0 wrote logs and summaries, and
that the checkpoints restore in one process on another number of devices.
Only loopback is used; every subprocess has a timeout.
"""

import fcntl
import glob
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from lns_jax import checkpoint as ckpt_lib
from lns_jax import data as data_lib
from lns_jax import parallel
from lns_testutil import ROOT, load_config, set_field

# One module fixture runs both launches: keep its tests on one xdist worker.
pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("multihost")]

WORKER = os.path.join(ROOT, "tests", "multihost_worker.py")
LAUNCH_TIMEOUT_S = 300  # each launch; the test takes ~1-3 minutes on 2 busy cores
OVERRIDES = {
    "model.name": "resnet_micro",  # registered by the worker
    "stages": "pretrain,lns",
    "data.train_examples": 32,
    "data.eval_examples": 32,
    "pretrain.epochs": 2,
    "lns.epochs": 1,
    "log_every_steps": 1,
    "checkpoint_every_steps": 1,
}
FLAGS = (["--config=" + os.path.join(ROOT, "configs", "fashion_mnist_r20.py") + ":smoke"]
         + [f"--config.{k}={v}" for k, v in OVERRIDES.items()])


def _config():
  c = load_config("fashion_mnist_r20.py", "smoke")
  for k, v in OVERRIDES.items():
    if k != "model.name":
      set_field(c, k, v)
  return c


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(out_dir, workdir, cache_dir, extra_env=None):
  """Starts both processes, waits for both (bounded); returns [(returncode, log)]."""
  port = _free_port()
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("LNS_COORDINATOR", "LNS_NUM_PROCESSES", "LNS_PROCESS_ID",
                              "LNS_TEST_", "JAX_COORDINATOR", "XLA_FLAGS"))}
  env.update({
      "JAX_PLATFORMS": "cpu",
      # 2 devices per process; level 0 makes XLA's CPU compiles several times faster.
      "XLA_FLAGS": "--xla_force_host_platform_device_count=2 --xla_backend_optimization_level=0",
      "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
      "LNS_FAST_COMPILE": "1",  # the trainer's quick compiles, as in the other tests
      "LNS_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",  # loopback only
      "JAX_COMPILATION_CACHE_DIR": cache_dir,  # the second launch reuses the first's
      "TF_CPP_MIN_LOG_LEVEL": "2",
      "CUDA_VISIBLE_DEVICES": "",
      **(extra_env or {}),
  })
  os.makedirs(out_dir, exist_ok=True)
  procs, logs = [], []
  for i in range(2):
    log = open(os.path.join(out_dir, f"log_p{i}.txt"), "w")
    cmd = [sys.executable, WORKER, out_dir, "--", *FLAGS, f"--workdir={workdir}",
           f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2", f"--process_id={i}"]
    procs.append(subprocess.Popen(cmd, env=env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT))
    logs.append(log)
  deadline = time.time() + LAUNCH_TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  except subprocess.TimeoutExpired:
    pass
  finally:
    timed_out = [p for p in procs if p.poll() is None]
    for p in timed_out:
      p.kill()
      p.wait()
    for log in logs:
      log.close()
  out = []
  for i, p in enumerate(procs):
    with open(os.path.join(out_dir, f"log_p{i}.txt")) as f:
      out.append((p.returncode, f.read()))
  if timed_out:
    pytest.fail(f"the two-process run did not end within {LAUNCH_TIMEOUT_S} s:\n"
                + "\n".join(f"--- process {i} (rc {rc}):\n{log[-3000:]}"
                            for i, (rc, log) in enumerate(out)))
  return out


def _report(out_dir, i):
  with open(os.path.join(out_dir, f"report_p{i}.json")) as f:
    return json.load(f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  # Once per test session even when pytest-xdist spreads these tests over workers
  # (the folder above basetemp is shared by the workers): the first builds it under a
  # lock, the others wait and read it.
  base = tmp_path_factory.getbasetemp().parent / "multihost"
  base.mkdir(exist_ok=True)
  with open(base / "lock", "a+") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    done = base / "run.json"
    if not done.exists():
      workdir, cache = str(base / "workdir"), str(base / "jax_cache")
      try:
        first = _launch(str(base / "launch1"), workdir, cache,
                        {"LNS_TEST_SIGTERM_AT": "pretrain:1:1"})  # stage:step:process
        second = _launch(str(base / "launch2"), workdir, cache)
        result = {"workdir": workdir, "first": first, "second": second,
                  "out1": str(base / "launch1"), "out2": str(base / "launch2")}
      except BaseException as e:  # the other workers fail the same way, without a rerun
        result = {"error": f"{type(e).__name__}: {e}"}
      done.write_text(json.dumps(result))
    result = json.loads(done.read_text())
  if "error" in result:
    pytest.fail(result["error"])
  return result


def _logs(launch):
  return "\n".join(f"--- process {i} (rc {rc}):\n{log[-4000:]}" for i, (rc, log) in enumerate(launch))


def test_a_preemption_of_one_host_stops_both_after_the_same_step(run):
  rcs = [rc for rc, _ in run["first"]]
  assert rcs == [128 + signal.SIGTERM] * 2, _logs(run["first"])
  assert "[pretrain] stopped at step 1" in run["first"][0][1]
  # The one checkpoint both wrote is of step 1, and the second launch resumed from it.
  assert "[pretrain] resuming from step 1" in run["second"][0][1], _logs(run["second"])


def test_the_run_finishes_with_identical_parameters_on_both_processes(run):
  assert [rc for rc, _ in run["second"]] == [0, 0], _logs(run["second"])
  r0, r1 = _report(run["out2"], 0), _report(run["out2"], 1)
  for r in (r0, r1):
    assert (r["process_count"], r["devices"], r["local_devices"]) == (2, 4, 2)
  assert set(r0["hashes"]) == {"pretrain", "lns"}
  assert r0["hashes"] == r1["hashes"]  # every leaf of the state, every local device
  for stage in ("pretrain", "lns"):
    a = np.load(os.path.join(run["out2"], f"final_{stage}_p0.npz"))
    b = np.load(os.path.join(run["out2"], f"final_{stage}_p1.npz"))
    assert set(a.files) == set(b.files)
    for k in a.files:
      np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Each process restored the final checkpoints collectively into the live state.
  assert r0["restored_equal"] == r1["restored_equal"] == {"pretrain": True, "lns": True}


def test_each_process_reads_only_its_shard(run):
  config = _config()
  for out, stage, epochs in ((run["out1"], "pretrain", [0]), (run["out2"], "pretrain", [1]),
                             (run["out2"], "lns", [0])):
    r = [_report(out, i) for i in range(2)]
    for epoch in epochs:
      got = [r[i]["batches"][f"{stage}/{epoch}"] for i in range(2)]
      for i in range(2):
        want = [_image_hashes(b) for b in data_lib.train_iterator(
            config.data, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
            process_index=i, process_count=2)]
        assert got[i] == want, (stage, epoch, i)
        assert all(len(b) == config.batch_size // 2 for b in got[i])
      # Disjoint shards that together are the epoch a single process would read.
      mine = [set(sum(g, [])) for g in got]
      assert not mine[0] & mine[1]
      single = set(sum((_image_hashes(b) for b in data_lib.train_iterator(
          config.data, batch_size=config.batch_size, seed=config.seed, epoch=epoch,
          process_index=0, process_count=1)), []))
      assert mine[0] | mine[1] == single


def _image_hashes(batch):
  return [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in batch["image"]]


_CHECKPOINT_DIRS = re.compile(r"/(checkpoints|best|final)(/|$)")


def test_only_process_zero_writes_logs_and_summaries(run):
  workdir = run["workdir"]
  for out in (run["out1"], run["out2"]):
    w0, w1 = (_report(out, i)["writes"] for i in range(2))
    mine = lambda ws: {os.path.relpath(p, workdir) for p in ws
                       if p.startswith(workdir + os.sep) and not _CHECKPOINT_DIRS.search(p)}
    # Process 1 touched only its own lock and write probe (checkpoints are collective).
    assert all(re.fullmatch(r"\.lock\.1|\.write_probe_1_\d+", p) for p in mine(w1)), mine(w1)
    assert {"config.json", "metrics.jsonl"} <= mine(w0)
  w0 = mine(_report(run["out2"], 0)["writes"])
  assert {"summary.json", "results.md", "lns/result.json.tmp",
          "pretrain/result.json.tmp"} <= w0
  for name in ("config.json", "metrics.jsonl", "summary.json", "results.md",
               "pretrain/result.json", "lns/result.json"):
    assert os.path.isfile(os.path.join(workdir, name)), name
  # TensorBoard writes from C++ (no Python open): its files are named after the pid.
  pids0 = {_report(run["out1"], 0)["pid"], _report(run["out2"], 0)["pid"]}
  events = glob.glob(os.path.join(workdir, "tensorboard", "**", "events.out.tfevents.*"),
                     recursive=True)
  pids = {int(re.search(r"\.(\d+)\.\d+\.v2$", e).group(1)) for e in events}  # ...host.PID.N.v2
  assert events and pids <= pids0, events
  # One record per step: a second writer would have doubled them.
  records = [json.loads(l) for l in open(os.path.join(workdir, "metrics.jsonl"))]
  keys = [(r["stage"], r["kind"], r["step"]) for r in records]
  assert len(keys) == len(set(keys)) and ("lns", "train", 1) in keys
  # And only process 0 printed progress and the results table.
  for launch in (run["first"], run["second"]):
    assert "[pretrain]" in launch[0][1] + run["second"][0][1]
    assert not re.search(r"^\[(pretrain|lns)\]|^\| stage", launch[1][1], re.M), launch[1][1]
  assert "| lns |" in run["second"][0][1]


def test_checkpoints_restore_in_one_process_on_other_devices(run):
  workdir = run["workdir"]
  saved = np.load(os.path.join(run["out2"], "final_lns_p0.npz"))
  # init_from's reader: host arrays, whatever devices or processes wrote them.
  variables = ckpt_lib.load_variables(os.path.join(workdir, "lns"))
  saved = {_norm(k): saved[k] for k in saved.files}
  flat = _flat(variables)
  assert set(flat) == {k for k in saved if k.split("/")[0] in ("params", "batch_stats")}
  for key, value in flat.items():
    np.testing.assert_array_equal(value, saved[key], err_msg=key)
  # The whole train state, as a resume restores it, onto 1 and onto all (2) devices of this
  # single process (the run had 4 devices over 2 processes).
  final = os.path.join(workdir, "lns", "final")
  mngr = ckpt_lib.manager(final, read_only=True)
  step = mngr.latest_step()
  from etils import epath
  import orbax.checkpoint as ocp
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(final) / str(step) / "state").tree
  for devices in (jax.devices()[:1], jax.devices()):
    rep = parallel.replicated(parallel.make_mesh(devices))
    target = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=rep), tree)
    state, meta = ckpt_lib.restore(mngr, step, target)
    assert meta["stage"] == "lns"
    leaves = _flat(state)
    assert set(leaves) == set(saved)
    for key, value in leaves.items():
      assert value.sharding.device_set == set(devices)
      np.testing.assert_array_equal(np.asarray(value), saved[key], err_msg=key)


def _norm(keystr: str) -> str:
  """``.opt_state[0].trace['conv']`` and ``['opt_state']['0']['trace']['conv']`` -> one form."""
  return "/".join(a or b or c for a, b, c in re.findall(r"\['([^']*)'\]|\[(\d+)\]|\.(\w+)", keystr))


def _flat(tree) -> dict:
  return {_norm(jax.tree_util.keystr(k)): v for k, v in jax.tree_util.tree_flatten_with_path(tree)[0]}
