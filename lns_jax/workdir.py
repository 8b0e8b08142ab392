"""A run's directory: its layout, its lock, the preemption handler, the resume command.

Layout of ``DIR`` (the ``--workdir``)::

  config.json           the run's config
  metrics.jsonl         one record per log step and per epoch (lns_jax.reporting)
  tensorboard/          the same as TensorBoard events
  summary.json          every stage's result, when all stages are done
  results.md            the Table-1-style table of summary.json
  <stage>/              one folder per stage (checkpoint layout: lns_jax.checkpoint)
    checkpoints/<step>/ the last ``keep_checkpoints``
    best/<step>/        the best eval top-1 so far
    final/<step>/       written once when the stage ends
    result.json         written after final/: the stage is done
  .lock, .lock.<i>      held by the run's process 0, i (fcntl; freed by the OS on kill -9)

Everything that joins these names lives here; nothing here reads a checkpoint, and
JAX is imported only by the lock and the write probe (the export reads runs without it).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
from typing import List, Optional

CONFIG, METRICS, TENSORBOARD = "config.json", "metrics.jsonl", "tensorboard"
SUMMARY, RESULTS_TABLE, RESULT = "summary.json", "results.md", "result.json"
CHECKPOINTS, BEST, FINAL = "checkpoints", "best", "final"
STATE, META = "state", "meta"  # the two items of a checkpoint step folder


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite values, a bad workdir, ...)."""


class NonFiniteError(TrainingError):
  """A step went NaN/Inf: the run is deterministic, so running it again fails alike."""


class WorkdirLockedError(TrainingError):
  """Another run holds the workdir."""


def path(workdir: str, *parts: str) -> str:
  """``workdir/part/...``: e.g. ``path(DIR, METRICS)``, ``path(DIR, stage, FINAL)``."""
  return os.path.join(workdir, *parts)


def read_json(file: str):
  with open(file) as f:
    return json.load(f)


def write_json_atomic(file: str, value) -> None:
  """Writes JSON to a temporary file and renames it: a reader never sees half a file."""
  tmp = file + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, file)


def step_dirs(folder: str) -> List[str]:
  """The ``<step>`` folders of a manager's folder that hold a state, oldest first."""
  if not os.path.isdir(folder):
    return []
  steps = [d for d in os.listdir(folder)
           if d.isdigit() and os.path.isdir(os.path.join(folder, d, STATE))]
  return [os.path.join(folder, d) for d in sorted(steps, key=int)]


def final_step_dir(workdir: str, stage: str) -> Optional[str]:
  """``DIR/<stage>/final/<step>`` of a finished stage, else ``None``."""
  found = step_dirs(path(workdir, stage, FINAL))
  return found[-1] if found else None


def _listed_stages(workdir: str) -> list:
  """Stage names in run order from ``summary.json``, then ``config.json``."""
  order = []
  try:
    order = list(read_json(path(workdir, SUMMARY)).get("stages", {}))
  except (OSError, ValueError):
    pass
  try:
    stages = read_json(path(workdir, CONFIG)).get("stages", "")
    order += [s.strip() for s in str(stages).split(",") if s.strip() and s.strip() not in order]
  except (OSError, ValueError):
    pass
  return order


def finished_stages(workdir: str) -> list:
  """Stages of ``workdir`` in run order that have a final checkpoint."""
  from lns_jax.stages import NAMES
  order = _listed_stages(workdir)
  order += [s for s in NAMES if s not in order]
  return [s for s in order if final_step_dir(workdir, s) is not None]


def last_summary_stage(workdir: str) -> Optional[str]:
  """The last stage listed in ``summary.json`` if it has a final checkpoint."""
  try:
    stages = list(read_json(path(workdir, SUMMARY)).get("stages", {}))
  except (OSError, ValueError):
    return None
  return stages[-1] if stages and final_step_dir(workdir, stages[-1]) is not None else None


# ------------------------------------------------------------------- lock, writable


@contextlib.contextmanager
def lock(workdir: str):
  """An exclusive lock on ``workdir`` (released by the OS even after kill -9).

  One lock file per process of a multi-process run (``.lock`` for process 0, the one
  a single-process run takes, ``.lock.<i>`` for process i): the processes of one run
  share the workdir, another run's process i finds its lock taken.
  """
  import jax
  pi = jax.process_index()
  lock_path = path(workdir, ".lock" if pi == 0 else f".lock.{pi}")
  f = open(lock_path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.close()
    raise WorkdirLockedError(
        f"Another run is using workdir {workdir} (it holds {lock_path}). Wait for it to end, "
        f"or give this run another --workdir.") from None
  try:
    f.seek(0); f.truncate(); f.write(f"{os.getpid()}\n"); f.flush()
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def check_writable(workdir: str) -> None:
  """Creates ``workdir`` and writes (and fsyncs) a probe file, or raises TrainingError."""
  import jax
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = path(workdir, f".write_probe_{jax.process_index()}_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("x" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f"workdir {workdir} is not writable ({e.strerror}); give a "
                        f"--workdir this user can write to, on a disk with free space.") from e


# ------------------------------------------------------------------------ preemption


class Preemption:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and stops cleanly.

  Nested, the inner one is the outer one (``with Preemption() as p`` gives the active
  handler): a signal that reaches a run after its last step (its final evaluation) is
  then still seen by the ablation that runs it, which stops before its next run instead
  of losing the signal with the run's handler.
  """

  _active = None  # the outermost handler entered in this process

  def __init__(self):
    self.signal = None
    self._old = {}
    self._outer = None

  def __enter__(self):
    if Preemption._active is not None:
      self._outer = Preemption._active
      return self._outer
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    if self._old:
      Preemption._active = self
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal = signum

  def __exit__(self, *exc):
    if self._outer is not None:
      self._outer = None
      return
    if Preemption._active is self:
      Preemption._active = None
    for sig, old in self._old.items():
      signal.signal(sig, old)
    self._old = {}


def resume_command(workdir: str) -> str:
  """The command that resumes this run: this process's own ``train.py`` command line."""
  argv = [a for a in sys.argv if not a.startswith("--workdir")]
  if argv and argv[0].endswith("train.py"):
    return "python " + " ".join(argv + [f"--workdir={workdir}"])
  return f"python train.py --config=... --workdir={workdir}"
