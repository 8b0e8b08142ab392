"""Runs command-line entry points with argv, each in a forked copy of one warm process.

Starting Python and importing TensorFlow and JAX takes seconds; the CLI tests run
dozens of command lines. This process imports them once, without starting any JAX
backend, then forks a child per command line, which runs the entry point as
``__main__`` (``runpy``) with that ``sys.argv``, its stdout and stderr in files:
the same code path as ``python train.py ...``, from a fresh interpreter state.

Protocol: one JSON request a line on stdin, ``{"entry": "train.py" | "lns_jax.export"
..., "args": [...], "stop_after_validation": bool, "timeout": s, "env": {...}}``; one JSON reply a
line on stdout, ``{"rc", "stdout", "stderr", "config"}``. ``stop_after_validation``
replaces ``trainer.train`` with ``config.validate`` plus a dump of the config
(``config`` in the reply): the command line is parsed and checked, nothing trains.
"""

import json
import os
import runpy
import signal
import sys
import tempfile
import time
import traceback
import warnings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _warm_up():
  import absl.flags  # noqa: F401
  import ml_collections  # noqa: F401
  import tensorflow  # noqa: F401
  import tensorflow_datasets  # noqa: F401
  import jax  # noqa: F401  (imported, no backend started: children start their own)
  from lns_jax import checkpoint, cli, config, data, export, inference, summary, trainer  # noqa: F401


def _stop_after_validation(dump):
  from lns_jax import config as config_lib
  from lns_jax import parallel, trainer

  def train(config, workdir, **kwargs):
    config_lib.validate(config, num_devices=parallel.make_mesh().size)
    with open(dump, "w") as f:
      f.write(config.to_json_best_effort())
    return {}

  trainer.train = train


def _child(request, out, err, dump):
  code = 1
  try:
    os.dup2(out, 1)
    os.dup2(err, 2)
    sys.stdout = os.fdopen(1, "w", closefd=False)
    sys.stderr = os.fdopen(2, "w", closefd=False)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
    os.chdir(ROOT)
    entry = request["entry"]
    # Read when the child starts its JAX backend (the warm process started none): e.g.
    # XLA_FLAGS with another number of fake devices.
    os.environ.update(request.get("env", {}))
    if request.get("stop_after_validation"):
      _stop_after_validation(dump)
    try:
      if entry.endswith(".py"):
        sys.argv = [entry, *request["args"]]
        # As `python path/x.py` does: x.py's folder first on sys.path (benchmarks/mapping.py
        # imports benchmarks/train_step.py).
        sys.path.insert(0, os.path.dirname(os.path.join(ROOT, entry)))
        runpy.run_path(os.path.join(ROOT, entry), run_name="__main__")
      else:
        sys.argv = [entry, *request["args"]]
        runpy.run_module(entry, run_name="__main__", alter_sys=True)
      code = 0
    except SystemExit as e:
      if isinstance(e.code, str):
        print(e.code, file=sys.stderr)
        code = 1
      else:
        code = e.code or 0
    except BaseException:  # pylint: disable=broad-except
      traceback.print_exc()
      code = 1
  finally:
    try:
      sys.stdout.flush()
      sys.stderr.flush()
    finally:
      os._exit(code)


def run(request):
  with tempfile.TemporaryDirectory() as tmp:
    paths = [os.path.join(tmp, n) for n in ("out", "err", "config.json")]
    out, err = (os.open(p, os.O_WRONLY | os.O_CREAT) for p in paths[:2])
    pid = os.fork()
    if pid == 0:
      _child(request, out, err, paths[2])
    os.close(out)
    os.close(err)
    deadline = time.time() + request.get("timeout", 300)
    while True:
      done, status = os.waitpid(pid, os.WNOHANG)
      if done:
        break
      if time.time() > deadline:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        status = -1
        break
      time.sleep(0.02)
    rc = os.waitstatus_to_exitcode(status) if status != -1 else "timeout"
    text = [open(p).read() for p in paths[:2]]
    config = json.load(open(paths[2])) if os.path.exists(paths[2]) else None
  return {"rc": rc, "stdout": text[0], "stderr": text[1], "config": config}


def main():
  _warm_up()
  reply = sys.stdout
  sys.stdout = sys.stderr  # nothing else may write into the replies
  print(json.dumps({"ready": True}), file=reply, flush=True)
  for line in sys.stdin:
    if line.strip():
      print(json.dumps(run(json.loads(line))), file=reply, flush=True)


if __name__ == "__main__":
  main()
