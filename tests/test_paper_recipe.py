"""The paper's reading of the objective through the command line: a warm start with its own
alpha, Eq. 16 / 17 inside the train step, record points within an epoch, and a run folder
of another reading refused. (The ablation's new rows: tests/test_ablation.py.)"""

import json
import os
import sys

import numpy as np
import pytest

from lns_jax import ablation
from lns_jax import checkpoint as ckpt_lib
from lns_jax import binary
from lns_testutil import SMOKE_FLAGS, smoke_config

pytestmark = pytest.mark.slow


def _train(cli, workdir, *flags):
  p = cli.run_argv([sys.executable, "train.py", *SMOKE_FLAGS, f"--workdir={workdir}", *flags])
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
  return [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]


@pytest.fixture(scope="module")
def runs(cli, full_run, tmp_path_factory):
  """warmup (alpha 1) then lns (alpha 0) with the mean, and a warmup with the sum, both
  from the shared smoke baseline, with a train record at every step."""
  base = os.path.join(full_run[0], "pretrain", "final")
  tmp = tmp_path_factory.mktemp("paper_recipe")
  common = [f"--config.init_from={base}", "--config.log_every_steps=1"]
  mean = _train(cli, tmp / "mean", *common, "--config.stages=warmup,lns", "--config.alpha=0",
                "--config.warmup.alpha=1", "--config.evals_per_epoch=2")
  total = _train(cli, tmp / "sum", *common, "--config.stages=warmup", "--config.reduction=sum",
                 "--config.on_nonfinite=skip")
  return base, mean, total


def test_warm_start_alpha_then_lns_alpha0(runs):
  _, records, _ = runs
  train = {s: [r for r in records if r["kind"] == "train" and r["stage"] == s]
           for s in ("warmup", "lns")}
  assert train["warmup"] and train["lns"]
  for r in train["warmup"]:  # Eq. 21 with warmup.alpha = 1
    assert r["aux_total"] > 0
    np.testing.assert_allclose(r["loss"], r["ce"] + r["aux_total"], rtol=1e-5)
  for r in train["lns"]:  # config.alpha = 0: the auxiliary loss is computed, not added
    assert r["aux_total"] > 0
    np.testing.assert_allclose(r["loss"], r["ce"], rtol=1e-6)


def test_evals_per_epoch_adds_record_points(runs):
  _, records, _ = runs
  epochs = [r for r in records if r["kind"] == "epoch" and r["stage"] == "lns"]
  # One epoch of 4 steps, evals_per_epoch=2: points at steps 2 and 4, each evaluated.
  assert [r["step"] for r in epochs] == [2, 4]
  assert [r["epoch"] for r in epochs] == [0.5, 1.0]
  assert all("test_top1" in r and 0 <= r["flip_rate_epoch"] <= 1 for r in epochs)


def test_sum_is_layer_size_times_mean_in_the_train_step(runs):
  """Eq. 17 against Eq. 16 in the step itself: at step 1 both runs see the same state
  and batch, so each layer's sum is its element count times its mean."""
  base, mean_records, sum_records = runs
  first = lambda recs: next(r for r in recs if r["kind"] == "train" and r["stage"] == "warmup")
  m, s = first(mean_records), first(sum_records)
  assert m["step"] == s["step"] == 1
  params = ckpt_lib.load_variables(base)["params"]
  layers = [k[len("aux/"):] for k in m if k.startswith("aux/")]
  assert layers and set(layers) == {k[len("aux/"):] for k in s if k.startswith("aux/")}
  total = 0.0
  for name in layers:
    n = binary.subtree(params, name.split("/"))["kernel"].size
    np.testing.assert_allclose(s[f"aux/{name}"], n * m[f"aux/{name}"], rtol=1e-4)
    total += s[f"aux/{name}"]
  np.testing.assert_allclose(s["aux_total"], total, rtol=1e-5)
  np.testing.assert_allclose(s["loss"], s["ce"] + s["aux_total"], rtol=1e-5)


def test_a_run_folder_of_another_reading_is_refused(tmp_path):
  """An lns_alpha0 folder made when its warm start had alpha 0 is not read as the new row."""
  c = smoke_config()
  (run,) = [r for r in ablation.plan(c, 1) if r.variant == "lns_alpha0"]
  old = ablation.run_config(c, run, "/b")
  old.warmup.alpha = None  # the earlier reading: the warm start had config.alpha = 0
  wd = tmp_path / "lns_alpha0" / "seed0"
  wd.mkdir(parents=True)
  (wd / "config.json").write_text(old.to_json_best_effort())
  with pytest.raises(ablation.AblationError, match="warmup.alpha = 0.0 where this ablation "
                                                   "plans 1.0"):
    ablation.check_run_dir(ablation.run_config(c, run, "/b"), str(wd), run.stages)
