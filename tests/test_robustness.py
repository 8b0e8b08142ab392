"""Interruptions, faults and bad input never lose work (kill -9, SIGTERM, damage, NaN, ...)."""

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lns_jax import checkpoint as ckpt_lib
from lns_jax import data as data_lib
from lns_jax import trainer
from lns_testutil import ROOT, SMOKE_FLAGS, assert_same_variables, smoke_config

pytestmark = pytest.mark.slow


def _steps(folder):
  return sorted(int(d) for d in os.listdir(folder) if d.isdigit()) if os.path.isdir(folder) else []


def _start(workdir):
  env = dict(os.environ, PYTHONUNBUFFERED="1")
  return subprocess.Popen([sys.executable, os.path.join(ROOT, "train.py"), *SMOKE_FLAGS,
                           f"--workdir={workdir}"], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _wait_for(predicate, proc, timeout=240):
  t0 = time.time()
  while not predicate():
    if proc.poll() is not None:
      raise AssertionError("train.py ended early:\n" + proc.stdout.read())
    if time.time() - t0 > timeout:
      proc.kill()
      raise AssertionError("timed out waiting for train.py")
    time.sleep(0.05)


def test_sigterm_then_kill9_then_resume_matches_uninterrupted(full_run, tmp_path):
  reference, _ = full_run
  workdir = str(tmp_path / "run")
  # 1. SIGTERM (preemption) in pretrain once a first checkpoint exists.
  proc = _start(workdir)
  _wait_for(lambda: _steps(os.path.join(workdir, "pretrain", "checkpoints")), proc)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=120)
  assert proc.returncode == 128 + signal.SIGTERM, out
  assert "Resume with the same command" in out and "--workdir=" in out
  assert "Traceback" not in out
  stopped = max(_steps(os.path.join(workdir, "pretrain", "checkpoints")))
  assert not os.path.exists(os.path.join(workdir, "pretrain", "result.json"))
  # 2. kill -9 in the middle of the lns stage, right after one of its checkpoints.
  proc = _start(workdir)
  _wait_for(lambda: _steps(os.path.join(workdir, "lns", "checkpoints")), proc)
  proc.kill()
  proc.communicate(timeout=60)
  assert os.path.exists(os.path.join(workdir, "warmup", "result.json"))
  assert not os.path.exists(os.path.join(workdir, "lns", "result.json"))
  assert stopped >= 1
  # 3. The same command again finishes and ends where the uninterrupted run ended.
  trainer.train(smoke_config(), workdir)
  for stage in ("pretrain", "warmup", "lns"):
    assert_same_variables(ckpt_lib.load_variables(os.path.join(reference, stage)),
                          ckpt_lib.load_variables(os.path.join(workdir, stage)))


def test_damaged_latest_checkpoint_falls_back_to_the_previous(full_run, tmp_path, capsys):
  reference, _ = full_run
  workdir = str(tmp_path / "run")
  # Stopped at step 7 (4-step epochs, a checkpoint every 3 steps and at each epoch's end):
  # 4, 6 and 7 are kept, and the fallback from a damaged 7 resumes in the middle of an
  # epoch (step 6 = epoch 1, batch 2), the data order replayed from there.
  trainer.train(smoke_config(stages="pretrain"), workdir, stop_at=("pretrain", 7))
  ckdir = os.path.join(workdir, "pretrain", "checkpoints")
  assert _steps(ckdir)[-2:] == [6, 7]
  for root, _, files in os.walk(os.path.join(ckdir, "7", "state")):
    for f in files:  # damage every file of the newest checkpoint
      with open(os.path.join(root, f), "r+b") as fh:
        fh.truncate(max(0, os.path.getsize(os.path.join(root, f)) // 3))
  capsys.readouterr()
  trainer.train(smoke_config(stages="pretrain"), workdir)
  out = capsys.readouterr().out
  assert "checkpoint" in out and "/7 is damaged and was skipped" in out
  assert "resuming from step 6" in out
  assert any(d.startswith("damaged-7") for d in os.listdir(ckdir))  # kept aside, not deleted
  assert_same_variables(ckpt_lib.load_variables(os.path.join(reference, "pretrain")),
                        ckpt_lib.load_variables(os.path.join(workdir, "pretrain")))


def _poison(monkeypatch, at_step):
  real = data_lib.train_iterator

  def poisoned(data, *, batch_size, epoch, start_step=0, **kw):
    for i, batch in enumerate(real(data, batch_size=batch_size, epoch=epoch,
                                   start_step=start_step, **kw)):
      step = epoch * data_lib.steps_per_epoch(data, batch_size) + start_step + i
      if step == at_step:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(data_lib, "train_iterator", poisoned)


def test_nan_stops_with_stage_and_step_and_keeps_last_good_checkpoint(monkeypatch, tmp_path):
  _poison(monkeypatch, at_step=5)
  workdir = str(tmp_path / "run")
  with pytest.raises(trainer.TrainingError, match=r"\[pretrain\].*NaN/Inf at step 5"):
    trainer.train(smoke_config(stages="pretrain"), workdir)
  ckdir = os.path.join(workdir, "pretrain", "checkpoints")
  assert _steps(ckdir) and max(_steps(ckdir)) <= 5
  restored = ckpt_lib.load_variables(os.path.join(workdir, "pretrain"))
  assert all(np.isfinite(x).all() for x in
             __import__("jax").tree.leaves(restored["params"]))


def test_nan_steps_can_be_skipped_and_counted(monkeypatch, tmp_path):
  _poison(monkeypatch, at_step=2)
  results = trainer.train(smoke_config(stages="pretrain", on_nonfinite="skip"),
                          str(tmp_path / "run"))
  assert results["pretrain"]["skipped_steps"] == 1


def test_failed_save_keeps_the_previous_checkpoint(monkeypatch, tmp_path):
  real, calls = ckpt_lib.save, []

  def flaky(mngr, step, *a, **kw):
    calls.append(step)
    if len(calls) == 3:
      raise OSError(errno.ENOSPC, "No space left on device")
    return real(mngr, step, *a, **kw)

  monkeypatch.setattr(ckpt_lib, "save", flaky)
  workdir = str(tmp_path / "run")
  with pytest.raises(trainer.TrainingError, match="disk full.*previous checkpoint"):
    trainer.train(smoke_config(stages="pretrain"), workdir)
  ckdir = os.path.join(workdir, "pretrain", "checkpoints")
  kept = _steps(ckdir)
  assert kept
  assert ckpt_lib.load_variables(os.path.join(ckdir, str(kept[-1])))["params"]


def test_unwritable_workdir_is_a_clear_error_before_training(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("not a folder")
  with pytest.raises(trainer.TrainingError, match="not writable"):
    trainer.train(smoke_config(), str(blocker / "workdir"))


def test_two_runs_on_one_workdir_the_second_refuses(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  with open(workdir / ".lock", "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as a first run would
    with pytest.raises(trainer.WorkdirLockedError, match="Another run is using workdir"):
      trainer.train(smoke_config(), str(workdir))
