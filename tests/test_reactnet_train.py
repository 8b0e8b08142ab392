"""The ReActNet stages end to end at smoke size (configs/fashion_mnist_reactnet.py:smoke).

teacher (real-valued), step1 (binary activations, real weights), pretrain (step 2),
warmup, lns: every stage after the teacher distils from it. The run is stopped in the
middle of step 2 as a preemption would and resumed by the same call; its step 2 ends
bit for bit where an uninterrupted run's does. The teacher is in no student checkpoint.
The trained LNS stage is exported: lns_jax.inference (float and packed convs) gives the
training model's logits; results/fmnist_reactnet/run.sh's flatbuffer of a trained ReActNet
gives Larq Compute Engine's interpreter the same predictions.
"""

import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import traverse_util

from lns_jax import checkpoint as ckpt_lib
from lns_jax import data, deploy, export, inference, models, reporting, trainer
from lns_testutil import ROOT, assert_same_variables, load_config

pytestmark = pytest.mark.slow


def _config(stages="teacher,step1,pretrain,warmup,lns"):
  c = load_config("fashion_mnist_reactnet.py", "smoke")
  c.data.train_examples = 128  # 4 steps an epoch
  c.data.eval_examples = 64
  c.warmup.epochs = c.lns.epochs = 0.5
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  c.stages = stages
  return c


@pytest.fixture(scope="module")
def reactnet_run(tmp_path_factory):
  """The five stages, stopped at step 2 of step 2, then resumed to the end."""
  run = str(tmp_path_factory.mktemp("reactnet") / "run")
  starts, run_stage = {}, trainer.run_stage

  def spy(ctx, start):  # what each stage starts from
    starts[ctx.stage] = start
    return run_stage(ctx, start)

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(trainer, "run_stage", spy)
    out = trainer.train(_config(), run, stop_at=("pretrain", 2))
  assert list(out) == ["teacher", "step1", "pretrain"] and out["pretrain"]["interrupted"]
  # The teacher and step 1 start fresh (the teacher is standalone); step 2 from step 1.
  assert starts["teacher"] is None and starts["step1"] is None
  assert_same_variables(starts["pretrain"], ckpt_lib.load_variables(f"{run}/step1"), atol=0)
  return run, trainer.train(_config(), run)  # the same call resumes step 2 at step 2


def test_two_step_training_distils_and_resumes_in_step_two(reactnet_run, tmp_path):
  run, out = reactnet_run
  assert list(out) == ["teacher", "step1", "pretrain", "warmup", "lns"]
  assert all(r["steps"] == (2 if s in ("warmup", "lns") else 4) for s, r in out.items())

  train = [r for r in reporting.read_metrics(run) if r["kind"] == reporting.TRAIN]
  for stage in ("teacher", "step1", "pretrain", "warmup", "lns"):
    recs = [r for r in train if r["stage"] == stage]
    assert recs and all(("kd" in r) == (stage != "teacher") for r in recs), stage
    assert all(np.isfinite(r["kd"]) and r["kd"] >= 0 for r in recs if "kd" in r)

  # Only the student is saved: the checkpoints hold the model's variables, no teacher's.
  saved = ckpt_lib.load_variables(os.path.join(run, "pretrain", "final"))
  teacher = ckpt_lib.load_variables(os.path.join(run, "teacher", "final"))
  assert set(saved) == {"params", "batch_stats"}
  flat = traverse_util.flatten_dict(saved["params"])
  assert set(flat) == set(traverse_util.flatten_dict(teacher["params"]))  # same shape family

  # An uninterrupted run of the same stages ends step 2 where the resumed one did. Its
  # teacher and step 1 are the run's (finished before the interruption, so not run again):
  # step 2 starts from the same variables and distils from the same teacher.
  ref = str(tmp_path / "ref")
  for stage in ("teacher", "step1"):
    shutil.copytree(os.path.join(run, stage), os.path.join(ref, stage))
  assert list(trainer.train(_config("teacher,step1,pretrain"), ref)) == [
      "teacher", "step1", "pretrain"]
  assert not os.path.exists(os.path.join(ref, "step1", "checkpoints", "1"))
  assert_same_variables(ckpt_lib.load_variables(os.path.join(ref, "pretrain", "final")), saved)


def _test_images(cfg):
  """The config's test split, every image, as one array."""
  return np.concatenate([b["image"] for b in data.eval_iterator(cfg.data, "test",
                                                                batch_size=cfg.batch_size)])


def _have_lce():
  try:
    deploy.lce_python()
    return True
  except deploy.DeployError:
    return False


def test_export_and_inference_agree_with_the_trained_model(reactnet_run, tmp_path):
  run, _ = reactnet_run
  cfg = _config()
  npz = str(tmp_path / "reactnet.npz")
  with pytest.raises(export.ExportError, match="real-valued"):
    export.export(run, npz, stage="teacher")
  export.export(run, npz)  # the last stage: lns
  header, members = export.read_file(npz)
  assert len(header["binary_layers"]) == 8
  # RSign's thresholds and RPReLU's parameters travel as full-precision arrays.
  assert sum(k.endswith("/rsign/beta") for k in members) == 6
  assert sum(k.endswith("/rprelu/zeta") for k in members) == 6
  info = data.get_info(cfg.data)
  train_model = models.from_config(cfg, "lns", info.num_classes)
  variables = ckpt_lib.load_variables(f"{run}/lns")
  images = _test_images(cfg)
  want = np.asarray(jax.jit(lambda v, x: train_model.apply(v, x, train=False))(variables, images))
  model = inference.load(npz, config=cfg)
  got = np.asarray(inference.predict(model, images))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  packed = np.asarray(inference.predict(model, images, use_packed=True))
  np.testing.assert_allclose(packed, got, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(packed.argmax(-1), want.argmax(-1))
  # LCE's predictions of a trained ReActNet: test_results_run_sh_as_typed_at_smoke_size, on
  # the flatbuffer that run.sh writes (one conversion for both tests: 20 CPU-s each).


def test_results_run_sh_as_typed_at_smoke_size(tmp_path):
  """results/fmnist_reactnet/run.sh (issue 32's measurement) as typed, one row at smoke
  size: the baseline trains its teacher, step 1 and step 2 once; the row warm-starts
  from step 2 and distils from the baseline's teacher; the baseline's check of
  convergence (steps 1 and 2 at twice the epochs) distils from the same teacher, and the
  row runs again from it; the teacher's check trains it alone at twice its epochs; the
  all-seeds command skips the finished run; the report copies the tables and deploys the
  row through LCE."""
  w, out = tmp_path / "w", tmp_path / "results"
  env = dict(os.environ, LNS_REACTNET_DIR=str(w), LNS_REACTNET_RESULTS=str(out),
             LNS_REACTNET_CONFIG="configs/fashion_mnist_reactnet.py:smoke,val",
             LNS_REACTNET_SEEDS="1", PYTHON=sys.executable,
             LNS_REACTNET_FLAGS="--variants=lns_alpha0 --config.data.train_examples=64 "
                                "--config.data.eval_examples=32 --config.data.val_examples=32 "
                                "--config.warmup.epochs=0.5 --config.lns.epochs=0.5")
  def run_sh(*args):
    return subprocess.run(["bash", "results/fmnist_reactnet/run.sh", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)

  p = run_sh()
  assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
  assert p.stdout.count("[ablation] run 0/1: baseline (teacher,step1,pretrain") == 1
  assert p.stdout.count("[ablation] run 1/1: lns_alpha0 seed 0 (") == 2  # from each baseline
  for row in (w, w / "from_x2"):
    assert p.stdout.count(f") in {row / 'lns_alpha0' / 'seed0'};") == 1
  row = w / "lns_alpha0" / "seed0"
  cfg = json.loads((row / "config.json").read_text())
  assert cfg["distill"]["teacher"] == str(w / "baseline" / "teacher")
  assert cfg["init_from"] == str(w / "baseline" / "pretrain" / "final")
  kd = [json.loads(l).get("kd") for l in (row / "metrics.jsonl").read_text().splitlines()]
  assert any(k is not None and k > 0 for k in kd)  # the distribution loss was trained on
  assert {"ablation.md", "baseline_stages.md", "fig3.png"} <= set(os.listdir(out))
  assert "| teacher |" in (out / "baseline_stages.md").read_text()
  # The baseline's check of convergence: steps 1 and 2 at twice the epochs, from the
  # same teacher (not trained again), the baseline alone.
  x2 = json.loads((w / "x2" / "baseline" / "config.json").read_text())
  base = json.loads((w / "baseline" / "config.json").read_text())
  assert x2["stages"] == "step1,pretrain" and base["stages"] == "teacher,step1,pretrain"
  assert x2["distill"]["teacher"] == str(w / "baseline" / "teacher")
  assert [x2[s]["epochs"] for s in ("step1", "pretrain")] == [
      2 * base[s]["epochs"] for s in ("step1", "pretrain")]
  assert not (w / "x2" / "baseline" / "teacher").exists()
  assert not (w / "x2" / "lns_alpha0").exists()
  assert "| pretrain |" in (out / "baseline_x2_stages.md").read_text()
  # The rows again from the check's baseline, distilling from the same teacher.
  again = json.loads((w / "from_x2" / "lns_alpha0" / "seed0" / "config.json").read_text())
  assert again["init_from"] == str(w / "x2" / "baseline" / "pretrain")  # --baseline
  assert again["distill"]["teacher"] == str(w / "baseline" / "teacher")
  assert not (w / "from_x2" / "baseline").exists()
  table = (out / "ablation_from_x2.md").read_text()
  assert "| lns_alpha0 | 1 |" in table
  assert "(fig3_from_x2.png)" in table and (out / "fig3_from_x2.png").exists()
  report = json.loads((out / "ablation_from_x2.json").read_text())
  assert report["baseline_checkpoint"] == str(w / "x2" / "baseline" / "pretrain")
  assert {v for v, runs in report["variants"].items() if runs} == {"lns_alpha0"}
  # The teacher's check of convergence: the teacher alone at twice its epochs, through
  # train.py with the --config.* flags only (train.py would refuse --variants).
  tx2 = json.loads((w / "teacher_x2" / "config.json").read_text())
  assert tx2["stages"] == "teacher"
  assert tx2["teacher"]["epochs"] == 2 * base["teacher"]["epochs"]
  assert tx2["data"]["train_examples"] == 64 and tx2["lns"]["epochs"] == 0.5
  assert "| teacher |" in (out / "teacher_x2_stages.md").read_text()
  # One LCE conversion: the LNS row's (same layers, same flatbuffer size as step 2's).
  assert not (out / "baseline_deploy.txt").exists()
  if not _have_lce():
    pytest.skip(f"no deployment environment ({deploy.DEFAULT_PYTHON}); {deploy.CREATE}")
  assert "LceBconv2d 8" in (out / "lns_alpha0_seed0_deploy.txt").read_text()
  # On a new machine a finished row has no checkpoints (state/ keeps its records): the
  # report converts the export it committed beside the tables, and fails nothing.
  shutil.rmtree(row / "lns" / "final")
  (out / "lns_alpha0_seed0_deploy.txt").unlink()
  p = run_sh("report")
  assert p.returncode == 0, (p.stdout + p.stderr)[-3000:]
  assert "LceBconv2d 8" in (out / "lns_alpha0_seed0_deploy.txt").read_text()
  # LCE's interpreter gives lns_jax.inference's logits (packed convs) on the test images.
  c = load_config("fashion_mnist_reactnet.py", "smoke,val")
  c.data.eval_examples = 32
  images = _test_images(c)
  model = inference.load(str(out / "lns_alpha0_seed0.npz"), config=c)
  packed = np.asarray(inference.predict(model, images, use_packed=True))
  lce, _ = deploy.run(str(w / "lns_alpha0_seed0.tflite"), images)
  np.testing.assert_array_equal(lce.argmax(-1), packed.argmax(-1))
  np.testing.assert_allclose(lce, packed, rtol=0, atol=1e-4 + 1e-5 * np.abs(packed).max())
