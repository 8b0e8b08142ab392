"""One line, not an abort, when another process of a multi-host run stops answering.

When one process of a ``jax.distributed`` run dies (``kill -9``, a host lost), the
others cannot go on: their next collective fails at once ("Connection closed by peer"),
and the coordination service, once the dead process has missed its heartbeats for
``heartbeat_timeout_seconds``, ends every other process from inside XLA with a C++
``LOG(FATAL)``: ``Fatal Python error: Aborted`` and several hundred lines of stack
traces. A process whose coordinator (process 0) died is ended the same way, at once.
Nothing in the process can turn that into a message: JAX 0.10.2's Python binding of the
client's ``missed_heartbeat_callback`` fails with ``std::bad_cast`` when called, and the
abort comes from a C++ thread.

So ``train.py`` with ``--coordinator_address`` (or ``LNS_COORDINATOR_ADDRESS``) runs the
training in a child process, the same command line, and this module is its parent:

* the child's stdout is the parent's; its stderr passes through the parent line by line,
  unchanged, until a line shows that a process was lost (a collective's connection
  closed by its peer, a heartbeat timeout, the coordination service unreachable);
* from then on the child's stderr is kept in a file instead (the trainer's own error
  about the failed collective, XLA's logs, the abort), and when the child has ended the
  parent prints one line: which process stopped answering (as the coordination service
  named it), the newest checkpoint of each stage in ``--workdir``, and the command to run
  again on every process to resume -- this process's own, as typed; exit code
  :data:`EXIT_PROCESS_LOST`;
* if the child ends normally after all, what was kept is printed as it was.

The wait is bounded by the coordination service's heartbeat timeout, JAX's 100 s unless
``LNS_HEARTBEAT_TIMEOUT_S`` is set (:func:`lns_jax.parallel.initialize_distributed`);
the parent ends the child itself if it is still there :data:`GRACE_S` after that.
SIGTERM (a preemption notice) is passed on to the child, which stops after a
checkpoint as in a one-process run; SIGINT from a terminal reaches the child directly
(the same process group). If the parent itself is killed, the child gets SIGTERM.

Only the standard library is imported at the top: the parent never starts JAX.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Mapping, Optional, Sequence

EXIT_PROCESS_LOST = 3
SUPERVISED_ENV = "LNS_SUPERVISED"  # set in the child: run the training, not a parent
HEARTBEAT_ENV = "LNS_HEARTBEAT_TIMEOUT_S"
JAX_HEARTBEAT_TIMEOUT_S = 100  # jax.distributed.initialize's default
GRACE_S = 60  # after the heartbeat timeout, before the parent ends the child itself

# A line of the child's stderr that means a process of the run is gone. The preemption
# sync manager's failed cancel can come first when the coordinator is killed (seen under
# load: it leaked before the one error line).
LOST = re.compile(
    r"Connection (closed|reset) by peer|heartbeat timeout|stopped sending heartbeats|"
    r"Failed to cancel preemption barrier|"
    r"JAX distributed service detected fatal errors|Polled an error from coordination service|"
    r"Failed to send RPC to coordination service|coordination service.*(UNAVAILABLE|Socket closed)")
_HEARTBEAT_TASKS = (re.compile(r"Task (\d+) heartbeat timeout"),
                    re.compile(r"stopped sending heartbeats\):\s*([\d,\s]+?)\s*(?:The tasks|$)"))
_COORDINATOR_GONE = re.compile(
    r"Failed to send RPC to coordination service|coordination service.*UNAVAILABLE|Socket closed")
_MULTI_PROCESS_FLAGS = ("coordinator_address", "num_processes", "process_id")
_MULTI_PROCESS_ENV = ("LNS_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "LNS_NUM_PROCESSES",
                      "LNS_PROCESS_ID")


def flag_value(argv: Sequence[str], name: str) -> Optional[str]:
  """The value of ``--name=V`` or ``--name V`` in ``argv`` (the last one), else None."""
  value = None
  for i, arg in enumerate(argv):
    if arg.startswith(f"--{name}="):
      value = arg.split("=", 1)[1]
    elif arg == f"--{name}" and i + 1 < len(argv):
      value = argv[i + 1]
  return value


def wanted(argv: Sequence[str], environ: Mapping[str, str] = os.environ) -> bool:
  """Whether ``train.py argv`` starts a multi-process run and is not the child already."""
  if environ.get(SUPERVISED_ENV) == "1":
    return False
  # Bad process flags are the CLI's to report (one error line), not a child's to run.
  n, pid = flag_value(argv, "num_processes"), flag_value(argv, "process_id")
  try:
    if n is not None and int(n) < 1 or pid is not None and not 0 <= int(pid) < int(n or 1 << 30):
      return False
  except ValueError:
    return False
  return (any(flag_value(argv, f) is not None for f in _MULTI_PROCESS_FLAGS) or
          any(environ.get(v) for v in _MULTI_PROCESS_ENV))


def heartbeat_timeout_s(environ: Mapping[str, str] = os.environ) -> Optional[int]:
  """``LNS_HEARTBEAT_TIMEOUT_S`` as seconds (None: unset, JAX's default)."""
  text = environ.get(HEARTBEAT_ENV, "").strip()
  if not text:
    return None
  try:
    value = int(text)
  except ValueError:
    value = 0
  if value < 1:
    raise ValueError(f"{HEARTBEAT_ENV}={text!r}: give a whole number of seconds >= 1.")
  return value


def kept_checkpoints(workdir: str, stages: Optional[Sequence[str]] = None) -> str:
  """Which checkpoints a stopped run leaves to resume from, as a sentence.

  ``stages``: in run order; by default those of ``workdir/config.json``, else every
  stage folder with checkpoints.
  """
  workdir = os.path.expanduser(workdir)
  if stages is None:
    try:
      with open(os.path.join(workdir, "config.json")) as f:
        stages = [s.strip() for s in str(json.load(f)["stages"]).split(",") if s.strip()]
    except (OSError, ValueError, KeyError, TypeError):
      stages = sorted(os.listdir(workdir)) if os.path.isdir(workdir) else []
  kept = []
  for stage in stages:
    folder = os.path.join(workdir, stage, "checkpoints")
    steps = [int(d) for d in os.listdir(folder) if d.isdigit()] if os.path.isdir(folder) else []
    if steps:
      kept.append(f"{stage} step {max(steps)}")
  return f"Kept checkpoints: {', '.join(kept)}." if kept else "No checkpoint was written."


def lost_processes(text: str, me: Optional[int], count: Optional[int]) -> List[int]:
  """The processes the child's last output says stopped answering ([] when it does not)."""
  for pattern in _HEARTBEAT_TASKS:
    found = sorted({int(t) for m in pattern.finditer(text) for t in re.findall(r"\d+", m.group(1))})
    found = [t for t in found if t != me]
    if found:
      return found
  if me != 0 and _COORDINATOR_GONE.search(text):
    return [0]
  if count == 2 and me in (0, 1):  # a collective's peer: with two processes, the other one
    return [1 - me]
  return []


def lost_message(text: str, argv: Sequence[str], command: str, log_path: str,
                 environ: Mapping[str, str] = os.environ) -> str:
  """The one line (without ``error: ``) for a child that ended because a process was lost."""
  def number(flag, env):
    value = flag_value(argv, flag) or environ.get(env)
    return int(value) if value is not None and value.strip().isdigit() else None

  me = number("process_id", "LNS_PROCESS_ID")
  count = number("num_processes", "LNS_NUM_PROCESSES")
  lost = lost_processes(text, me, count)
  of = f" of {count}" if count else ""
  if not lost:
    who = "another process of the run stopped answering"
  elif lost == [0] and me != 0 and not _HEARTBEAT_TASKS[0].search(text):
    who = f"process 0{of} (the coordinator) stopped answering"
  else:
    who = (f"process {lost[0]}{of} stopped answering" if len(lost) == 1 else
           f"processes {', '.join(map(str, lost))}{of} stopped answering")
  timeout = heartbeat_timeout_s(environ) or JAX_HEARTBEAT_TIMEOUT_S
  if _HEARTBEAT_TASKS[0].search(text) or _HEARTBEAT_TASKS[1].search(text):
    who += f" (no heartbeat for {timeout} s)"
  this = f"process {me}" if me is not None else "this process"
  workdir = flag_value(argv, "workdir")
  kept = kept_checkpoints(workdir) if workdir else "No --workdir given."
  return (f"{who}, so {this} stopped too. {kept} To resume, run the same command on every "
          f"process again; {this}'s: {command} (its full output: {log_path})")


class _Relay(threading.Thread):
  """Copies the child's stderr to ours until a line says a process was lost; keeps the rest.

  A Python traceback is held until its exception line: the collective that failed
  because its peer is gone raises in the trainer, and that traceback is kept too.
  """

  def __init__(self, stream, out):
    super().__init__(daemon=True)
    self.stream, self.out = stream, out
    self.held: List[bytes] = []
    self.lost_at: Optional[float] = None

  def run(self):
    pending: List[bytes] = []  # a traceback up to its exception line
    for line in iter(self.stream.readline, b""):
      text = line.decode("utf-8", "replace")
      if self.lost_at is None and LOST.search(text):
        self.lost_at = time.monotonic()
      if self.lost_at is not None:
        self.held += pending + [line]
        pending = []
      elif pending or text.startswith("Traceback (most recent call last):"):
        pending.append(line)
        if len(pending) > 1 and text[:1] not in (" ", "\t", "\n", "") and not text.startswith(
            "Traceback"):  # the exception line: no lost process in it
          self._write(pending)
          pending = []
      else:
        self._write([line])
    if self.lost_at is None:
      self._write(pending)

  def _write(self, lines):
    self.out.write(b"".join(lines))
    self.out.flush()


def _die_with_parent():  # in the child, before exec: SIGTERM when the parent goes
  try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
  except Exception:  # pylint: disable=broad-except  # not Linux: no such guarantee
    pass


def run(argv: Optional[Sequence[str]] = None, command: Optional[Sequence[str]] = None) -> int:
  """Runs ``command`` (default: this interpreter's own command line) as the child; returns
  the exit code for this process (the child's, or :data:`EXIT_PROCESS_LOST`)."""
  argv = list(sys.argv if argv is None else argv)
  command = list(command or [sys.executable, *sys.orig_argv[1:]])
  shown = shlex.join(sys.orig_argv if command[1:] == sys.orig_argv[1:] else command)
  try:
    heartbeat_timeout_s()
  except ValueError as e:  # before anything starts
    print(f"error: {e}", file=sys.stderr, flush=True)
    return 2
  child = subprocess.Popen(command, env={**os.environ, SUPERVISED_ENV: "1"},
                           stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
  old = {signal.SIGTERM: signal.signal(signal.SIGTERM, lambda s, f: child.send_signal(s)),
         # A terminal's Ctrl-C reaches the child itself (the same process group).
         signal.SIGINT: signal.signal(signal.SIGINT, lambda s, f: None)}
  relay = _Relay(child.stderr, sys.stderr.buffer)
  relay.start()
  deadline = (heartbeat_timeout_s() or JAX_HEARTBEAT_TIMEOUT_S) + GRACE_S
  try:
    while child.poll() is None:
      if relay.lost_at is not None and time.monotonic() - relay.lost_at > deadline:
        child.kill()  # XLA did not end it: end it here, the run cannot go on
      time.sleep(0.2)
    relay.join(timeout=10)
  finally:
    for sig, handler in old.items():
      signal.signal(sig, handler)
  rc = child.returncode if child.returncode >= 0 else 128 - child.returncode
  if relay.lost_at is None:
    return rc
  held = b"".join(relay.held)
  if rc == 0:  # it went on after all: nothing was lost, show what was kept
    sys.stderr.buffer.write(held)
    sys.stderr.flush()
    return 0
  fd, log_path = tempfile.mkstemp(prefix="lns_jax_stderr_", suffix=".log")
  with os.fdopen(fd, "wb") as f:
    f.write(held)
  message = lost_message(held.decode("utf-8", "replace"), argv[1:], shown, log_path)
  print(f"error: {' '.join(message.split())}", file=sys.stderr, flush=True)
  return EXIT_PROCESS_LOST
