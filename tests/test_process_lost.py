"""A process of a multi-host run dies: the others end with one ``error:`` line.

The first slow test runs the README's two-process command on this machine (``train.py`` with
``--coordinator_address=127.0.0.1:<port> --num_processes=2 --process_id=i``, 2 CPU
devices each, gloo), kills process 1 with SIGKILL (its whole process group, as a lost
host) once a checkpoint is written, and checks that process 0 ends within the
heartbeat timeout (``LNS_HEARTBEAT_TIMEOUT_S=10`` here; JAX's 100 s by default) with
exit code 3 and one line naming process 1, the kept checkpoint and its own command,
and no abort or stack trace; then that the same two commands resume from that
checkpoint and finish. The second kills process 0, whose process hosts the coordination
service: process 1 ends at once, with the line naming the coordinator. The fast tests check the parent's reading of what XLA prints
(lines taken from such runs) and when ``train.py`` becomes a parent at all.
"""

import os
import shlex
import signal
import socket
import subprocess
import sys
import time

import pytest

from lns_jax import supervisor
from lns_testutil import ROOT

HEARTBEAT_S = 10
# One stage: what is checked is how a run ends when a process is lost and that the same
# commands resume it; a two-process run through pretrain and LNS, stopped and resumed, is
# tests/test_multihost.py's.
FLAGS = ["--config=configs/fashion_mnist_r20.py:smoke", "--config.stages=pretrain",
         "--config.data.train_examples=64", "--config.data.eval_examples=32",
         "--config.pretrain.epochs=3", "--config.checkpoint_every_steps=1",
         "--config.log_every_steps=1"]

# What the survivor's child printed in runs like the slow test's (shortened).
HEARTBEAT_TEXT = """\
error: [pretrain] saving the checkpoint of step 2 in /tmp/mh/pretrain/checkpoints failed (JaxRuntimeError: UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:547] Connection closed by peer [127.0.0.1]:11180). Is the disk full?
F1202 09:43:59.627603    8504 client.h:80] Terminating process because the JAX distributed service detected fatal errors.
Barrier result: 'INTERNAL: Barrier failed because: task is set to ERROR: UNAVAILABLE: Task 1 heartbeat timeout. This indicates that the remote task has failed
E1202 09:43:59.628045    9210 coordination_service.cc:1549] Use error polling to propagate the following error to all tasks: UNAVAILABLE: The following tasks are unhealthy (stopped sending heartbeats):
1
The tasks have crashed. Check the task logs for an earlier error
*** Check failure stack trace: ***
Fatal Python error: Aborted
"""
COORDINATOR_TEXT = """\
E1202 09:56:40.043288   20430 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
W1202 09:47:23.739017   12355 preemption_sync_manager.cc:147] Failed to retrieve preemption notice from coordination service: UNAVAILABLE: Socket closed
E1202 09:47:23.739251   12355 coordination_service_agent.cc:289] Polled an error from coordination service (this can be an error from this or another task).
F1202 09:47:23.739257   12355 client.h:80] Terminating process because the JAX distributed service detected fatal errors.
"""


def test_which_process_stopped_answering():
  assert supervisor.lost_processes(HEARTBEAT_TEXT, 0, 2) == [1]
  assert supervisor.lost_processes(HEARTBEAT_TEXT, 0, 4) == [1]  # named by the service
  assert supervisor.lost_processes(COORDINATOR_TEXT, 2, 4) == [0]
  gloo_only = HEARTBEAT_TEXT.splitlines()[0]
  assert supervisor.lost_processes(gloo_only, 1, 2) == [0]  # two processes: the other one
  assert supervisor.lost_processes(gloo_only, 1, 4) == []
  # Seen first (a 2-core machine under load) when the coordinator was killed:
  cancel = ("E1202 14:50:34.166717   18054 preemption_sync_manager.cc:159] Failed to cancel "
            "preemption barrier: FAILED_PRECONDITION: Tried to cancel non-existent barrier "
            "PREEMPTION_SYNC_BARRIER. [type.googleapis.com/tensorflow.CoordinationServiceError='']")
  for text in (HEARTBEAT_TEXT, COORDINATOR_TEXT, gloo_only, cancel):
    assert supervisor.LOST.search(text.splitlines()[0])
  assert not supervisor.LOST.search("[pretrain] epoch 1 step 2/6: train ce 2.3 | 40 img/s")


def test_the_message_names_the_process_the_checkpoint_and_the_command(tmp_path):
  (tmp_path / "config.json").write_text('{"stages": "pretrain,lns"}')
  for step in ("1", "3", "4.orbax-checkpoint-tmp"):
    (tmp_path / "pretrain" / "checkpoints" / step).mkdir(parents=True)
  argv = [f"--workdir={tmp_path}", "--num_processes=2", "--process_id=0"]
  env = {supervisor.HEARTBEAT_ENV: "10"}
  line = supervisor.lost_message(HEARTBEAT_TEXT, argv, "python train.py X", "/tmp/x.log", env)
  assert line == ("process 1 of 2 stopped answering (no heartbeat for 10 s), so process 0 "
                  "stopped too. Kept checkpoints: pretrain step 3. To resume, run the same "
                  "command on every process again; process 0's: python train.py X (its full "
                  "output: /tmp/x.log)")
  argv = [f"--workdir={tmp_path}/none", "--num_processes", "4", "--process_id", "2"]
  line = supervisor.lost_message(COORDINATOR_TEXT, argv, "c", "l", {})
  assert line.startswith("process 0 of 4 (the coordinator) stopped answering, so process 2 "
                         "stopped too. No checkpoint was written.")


def test_the_relay_passes_lines_on_until_a_process_is_lost():
  import io
  traceback = ["Traceback (most recent call last):\n", '  File "x.py", line 1, in <module>\n',
               "    f()\n"]
  lines = (["[pretrain] step 1\n"] + traceback + ["ValueError: something else\n", "warning\n"]
           + traceback + ["jax.errors.JaxRuntimeError: UNKNOWN: Gloo AllReduce failed: "
                          "Connection closed by peer [127.0.0.1]:1234\n", "F1202 abort\n"])
  out = io.BytesIO()
  stream = io.BytesIO("".join(lines).encode())
  relay = supervisor._Relay(stream, out)  # pylint: disable=protected-access
  relay.run()
  assert out.getvalue().decode() == "".join(lines[:6])  # the other error's traceback too
  assert b"".join(relay.held).decode() == "".join(lines[6:]) and relay.lost_at is not None


def test_only_multi_process_runs_get_a_parent():
  assert not supervisor.wanted(["train.py", "--config=c", "--workdir=w"], {})
  assert supervisor.wanted(["train.py", "--coordinator_address=auto"], {})
  assert supervisor.wanted(["train.py", "--process_id", "1"], {})
  assert supervisor.wanted(["train.py"], {"LNS_COORDINATOR_ADDRESS": "h:1"})
  assert not supervisor.wanted(["train.py", "--process_id=1"], {supervisor.SUPERVISED_ENV: "1"})
  assert supervisor.heartbeat_timeout_s({}) is None
  assert supervisor.heartbeat_timeout_s({supervisor.HEARTBEAT_ENV: "7"}) == 7
  with pytest.raises(ValueError, match="LNS_HEARTBEAT_TIMEOUT_S='0'"):
    supervisor.heartbeat_timeout_s({supervisor.HEARTBEAT_ENV: "0"})


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _start(commands, out, env):
  procs = []
  for i, cmd in enumerate(commands):
    procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True,
                                  stdout=open(out / f"out{i}.txt", "w"),
                                  stderr=open(out / f"err{i}.txt", "w")))
  return procs


def _wait(procs, timeout_s):
  deadline = time.time() + timeout_s
  try:
    for p in procs:
      p.wait(timeout=max(1.0, deadline - time.time()))
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()


def _newest(folder):
  return max((int(d) for d in os.listdir(folder) if d.isdigit()), default=None)


def _setup(tmp_path):
  workdir, port = tmp_path / "w", _free_port()
  commands = [[sys.executable, "train.py", *FLAGS, f"--workdir={workdir}",
               f"--coordinator_address=127.0.0.1:{port}", "--num_processes=2",
               f"--process_id={i}"] for i in range(2)]
  env = {k: v for k, v in os.environ.items()
         if not k.startswith(("LNS_COORDINATOR", "LNS_NUM_PROCESSES", "LNS_PROCESS_ID",
                              "LNS_SUPERVISED", "JAX_COORDINATOR", "XLA_FLAGS"))}
  env.update({"JAX_PLATFORMS": "cpu", "XLA_FLAGS": "--xla_force_host_platform_device_count=2",
              "LNS_FAST_COMPILE": "1", "LNS_COORDINATOR_BIND_ADDRESS": f"127.0.0.1:{port}",
              supervisor.HEARTBEAT_ENV: str(HEARTBEAT_S), "CUDA_VISIBLE_DEVICES": "",
              "JAX_COMPILATION_CACHE_DIR": str(tmp_path / "jax_cache")})
  return workdir, commands, env


def _kill_one(tmp_path, workdir, commands, env, killed):
  """Starts both commands, SIGKILLs process ``killed`` (its process group, as a lost host)
  once a checkpoint is written; returns the survivor's (exit code, stderr, seconds it
  took to end after the kill)."""
  out = tmp_path / "first"
  out.mkdir()
  checkpoints = workdir / "pretrain" / "checkpoints"
  procs = _start(commands, out, env)
  survivor = procs[1 - killed]
  try:
    deadline = time.time() + 400
    while time.time() < deadline and survivor.poll() is None and (
        not checkpoints.is_dir() or _newest(checkpoints) is None):
      time.sleep(0.2)
    assert checkpoints.is_dir() and _newest(checkpoints) is not None, (
        (out / f"err{1 - killed}.txt").read_text()[-3000:])
    os.killpg(procs[killed].pid, signal.SIGKILL)
    killed_at = time.time()
    _wait([survivor], HEARTBEAT_S + supervisor.GRACE_S + 60)
    took = time.time() - killed_at
  finally:
    _wait(procs, 1)
  return survivor.returncode, (out / f"err{1 - killed}.txt").read_text(), took


def _one_line(rc, err, took):
  lines = [l for l in err.splitlines() if l.strip()]
  assert rc == supervisor.EXIT_PROCESS_LOST, err[-3000:]
  assert "Fatal Python error" not in err and "Check failure stack trace" not in err, err[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), err[-3000:]  # nothing else
  assert took < HEARTBEAT_S + supervisor.GRACE_S, took
  log = lines[0].rsplit("(its full output: ", 1)[1].rstrip(")")
  with open(log) as f:
    held = f.read()
  os.remove(log)
  print(f"ended {took:.1f} s after the kill:\n{lines[0]}")
  return lines[0], held


@pytest.mark.slow
def test_a_killed_process_ends_the_other_with_one_line_and_the_same_commands_resume(tmp_path):
  workdir, commands, env = _setup(tmp_path)
  line, held = _one_line(*_kill_one(tmp_path, workdir, commands, env, killed=1))
  kept = _newest(workdir / "pretrain" / "checkpoints")
  assert line.startswith(
      f"error: process 1 of 2 stopped answering (no heartbeat for {HEARTBEAT_S} s), so process 0 "
      f"stopped too. Kept checkpoints: pretrain step {kept}. To resume, run the same command "
      f"on every process again; process 0's: {shlex.join(commands[0])} (its full output: "), (
          line, kept)
  assert "heartbeat" in held  # the coordination service named it

  second = tmp_path / "second"
  second.mkdir()
  procs = _start(commands, second, env)  # the same two commands
  _wait(procs, 600)
  outs = [(second / f"out{i}.txt").read_text() + (second / f"err{i}.txt").read_text()
          for i in range(2)]
  assert [p.returncode for p in procs] == [0, 0], "\n".join(o[-3000:] for o in outs)
  assert f"[pretrain] resuming from step {kept}" in outs[0], outs[0][-3000:]
  assert (workdir / "pretrain" / "result.json").is_file()


@pytest.mark.slow
def test_a_killed_coordinator_ends_the_other_at_once_with_one_line(tmp_path):
  workdir, commands, env = _setup(tmp_path)
  line, _ = _one_line(*_kill_one(tmp_path, workdir, commands, env, killed=0))
  kept = _newest(workdir / "pretrain" / "checkpoints")
  assert line.startswith(
      f"error: process 0 of 2 (the coordinator) stopped answering, so process 1 stopped too. "
      f"Kept checkpoints: pretrain step {kept}. To resume, run the same command on every "
      f"process again; process 1's: {shlex.join(commands[1])} (its full output: "), line
