"""The Table 1 ablation runner (``python -m lns_jax.ablation``) at smoke size, 2 seeds."""

import json
import os
import signal
import sys

import numpy as np
import pytest

from lns_jax import ablation
from lns_jax import workdir as workdir_lib
from lns_testutil import ROOT, assert_one_error_line, smoke_config, trainer_signalled_at


# _config() as command-line flags.
SMOKE_FLAGS = ["--config=" + os.path.join(ROOT, "configs", "fashion_mnist_r20.py") + ":smoke,val",
               "--config.data.val_examples=32", "--config.data.train_examples=64",
               "--config.data.eval_examples=64", "--config.pretrain.epochs=1",
               "--config.warmup.epochs=1", "--config.lns.epochs=1", "--config.log_every_steps=2",
               "--config.checkpoint_every_steps=3"]


def _config():
  c = smoke_config(data__val_examples=32)
  c.data.train_examples = 64  # 2 steps an epoch at batch 32
  c.pretrain.epochs = 1
  return c


def _result_mtimes(root):
  out = {}
  for dirpath, _, files in os.walk(root):
    if "result.json" in files:
      p = os.path.join(dirpath, "result.json")
      out[p] = os.stat(p).st_mtime_ns
  return out


@pytest.mark.slow
def test_ablation_two_seeds_interrupted_then_resumed(cli, tmp_path):
  root = str(tmp_path / "abl")
  config = _config()
  logs = []
  # One of the plan's three rows trains, lns (warm start + LNS stage): finetune and
  # lns_alpha0 are the same runner with other stage configs, checked below from the plan
  # (a fine-tuning row trains through the runner in tests/test_strength.py). An
  # interruption in the middle of seed 1's LNS stage, as a preemption would.
  rows = ["lns"]
  out = ablation.run_ablation(config, root, seeds=2, log=logs.append, variants=rows,
                              stop_at=("lns", 1, "lns", 1))
  assert out == {"interrupted": True, "run": "lns/seed1", "signal": None}
  done_before = _result_mtimes(root)
  # Baseline, lns of seed 0, warmup of lns/seed1.
  assert len([p for p in done_before if p.endswith("pretrain/result.json")]) == 1
  assert os.path.exists(os.path.join(root, "lns", "seed1", "warmup", "result.json"))
  assert not os.path.exists(os.path.join(root, "lns", "seed1", "lns", "result.json"))
  assert os.listdir(os.path.join(root, "lns", "seed1", "lns", "checkpoints"))
  assert any("run 0/2: baseline" in line for line in logs)
  assert any("run 2/2: lns seed 1" in line and "ETA" in line for line in logs)

  logs.clear()
  results = ablation.run_ablation(config, root, seeds=2, log=logs.append, variants=rows)
  # Finished runs are not repeated; only the interrupted one ran again.
  after = _result_mtimes(root)
  for path, mtime in done_before.items():
    assert after[path] == mtime, path
  started = [line for line in logs if "] run " in line]
  assert len(started) == 1 and "lns seed 1" in started[0]

  saved = json.loads((tmp_path / "abl" / "ablation.json").read_text())
  assert set(saved["variants"]) == {"finetune", "lns_alpha0", "lns"}
  # Planned, not run: in the report, empty.
  assert saved["variants"]["lns_alpha0"] == saved["variants"]["finetune"] == []
  for name in rows:
    recs = saved["variants"][name]
    assert [r["seed"] for r in recs] == [0, 1], name
    for r in recs:
      assert 0.0 <= r["test_top1"] <= 1.0 and r["test_top1"] <= r["test_top5"] <= 1.0
      assert 0.0 <= r["val_top1"] <= 1.0 and "best_test_top1" in r
  # A record's alpha is its planned run's (ablation.report.collect).
  planned = {r.variant: r for r in ablation.plan(config, seeds=1)}
  assert planned["lns_alpha0"].alpha == 0.0
  assert saved["variants"]["lns"][0]["alpha"] == config.alpha
  assert "warmup_signs_differ" in saved["variants"]["lns"][0]
  assert 0.0 <= saved["baseline"]["test_top1"] <= 1.0
  assert results["variants"] == saved["variants"]
  # Each variant's run starts from the same baseline checkpoint: the trained run's config
  # as written, and the plan's configs of the others (what the runner writes).
  cfg = json.loads((tmp_path / "abl" / "lns" / "seed0" / "config.json").read_text())
  assert cfg["init_from"].endswith(os.path.join("baseline", "pretrain", "final"))
  base = os.path.join(root, "baseline", "pretrain", "final")
  for r in ablation.plan(config, seeds=2):
    c = ablation.run_config(config, r, base).to_dict()
    assert c["init_from"] == base and c["seed"] == r.seed, r
  fin = next(r for r in ablation.plan(config, seeds=2) if (r.variant, r.seed) == ("finetune", 1))
  fin = ablation.run_config(config, fin, base).to_dict()
  assert fin["finetune"] == fin["lns"] and fin["stages"] == "finetune"

  # The table is built from ablation.json: mean and sample std over the two seeds.
  md = (tmp_path / "abl" / "ablation.md").read_text()
  vals = [100 * r["test_top1"] for r in saved["variants"]["lns"]]
  row = next(line for line in md.splitlines() if line.startswith("| lns |"))
  assert f"{max(vals):.2f} ({np.mean(vals):.2f} ± {np.std(vals, ddof=1):.2f})" in row
  assert "| 2 |" in row
  assert (tmp_path / "abl" / "fig3.png").stat().st_size > 1000
  assert "fig3.png" in md

  # docs/results.md's second ablation command, typed (smoke size): --baseline reuses a pretrained
  # baseline (a stage folder), no pretraining, its result in the table. With the paper
  # recipe's extra rows: lns_alpha0 warms up with alpha > 0 (DECISIONS 17), lns_alpha0_cewarm
  # with alpha 0, and lns_sum (Eq. 17) diverges at a warm start lr the mean trains at: it
  # is recorded as failed and the ablation goes on (DECISIONS 16). Of its rows, lns_sum (the
  # failure) trains here and a sweep point (a result from the reused baseline) in the rerun
  # below; the others' configs are checked from the plan (the configs the runner writes) and
  # the dry run's description of each.
  other = tmp_path / "abl2"
  cmd = [sys.executable, "-m", "lns_jax.ablation", *SMOKE_FLAGS, f"--workdir={other}",
         "--seeds=1", "--baseline=" + os.path.join(root, "baseline", "pretrain"),
         "--extra_rows=alpha0_cewarm,other_reduction", "--config.warmup.lr=3.0",
         "--config.evals_per_epoch=2"]
  p = cli.run_argv(cmd + ["--variants=lns_sum"])
  assert p.returncode == 0, p.stderr[-3000:]
  assert "[ablation] run 1/1: lns_sum seed 0" in p.stdout and "| lns | 0 |" in p.stdout, p.stdout
  reused = json.loads((other / "ablation.json").read_text())
  assert not (other / "baseline").exists()
  assert reused["baseline"] == saved["baseline"]
  assert list(reused["variants"]) == ["finetune", "lns_alpha0", "lns", "lns_alpha0_cewarm",
                                      "lns_sum"]
  assert [len(v) for v in reused["variants"].values()] == [0, 0, 0, 0, 1]
  run_cfg = lambda v: json.loads((other / v / "seed0" / "config.json").read_text())
  assert run_cfg("lns_sum")["reduction"] == "sum"
  plan_cfg = {r.variant: ablation.run_config(config, r, "b").to_dict() for r in
              ablation.plan(config, 1, extra_rows=["alpha0_cewarm", "other_reduction"])}
  assert plan_cfg["lns_alpha0"]["warmup"]["alpha"] == 1.0 and plan_cfg["lns_alpha0"]["alpha"] == 0
  assert plan_cfg["lns_alpha0_cewarm"]["warmup"]["alpha"] == 0.0
  assert plan_cfg["finetune"]["finetune"]["alpha"] is None
  (failed,) = reused["variants"]["lns_sum"]
  assert "NaN/Inf" in failed["failed"] and (other / "lns_sum" / "seed0" / "failed.json").exists()
  md2 = (other / "ablation.md").read_text()
  assert "| lns_sum | 0 (+1 failed: non-finite) |" in md2 and "lns_sum seed 0 failed:" in md2
  assert (other / "baseline.png").stat().st_size > 1000  # the reused baseline's curves
  # Rerun with one more sweep point and --variants: only that point runs, from the reused
  # baseline, into the table; the failed lns_sum is not retried and stays in the table.
  p2 = cli.run_argv(cmd + ["--alphas=0.5", "--variants=lns_alpha0.5,lns_sum"])
  assert p2.returncode == 0, p2.stderr[-3000:]
  started = [line for line in p2.stdout.splitlines() if line.startswith("[ablation] run")]
  assert len(started) == 1 and "run 1/2: lns_alpha0.5 seed 0" in started[0], p2.stdout[-2000:]
  assert "| lns_alpha0.5 | 1 |" in p2.stdout, p2.stdout[-2000:]
  again = json.loads((other / "ablation.json").read_text())
  assert again["variants"]["lns_alpha0.5"][0]["alpha"] == 0.5
  assert "test_top1" in again["variants"]["lns_alpha0.5"][0]
  assert run_cfg("lns_alpha0.5")["reduction"] == "mean"
  assert again["variants"]["lns_sum"] == reused["variants"]["lns_sum"]
  # --dry_run on that workdir: each run's state (the rows never trained left), nothing written.
  before = _result_mtimes(other)
  p3 = cli.run_argv(cmd + ["--alphas=0.5", "--dry_run"])
  assert p3.returncode == 0, p3.stderr[-3000:]
  assert "lns_sum seed 0: warmup,lns, alpha 1, rho 0.005, warm start alpha 1, reduction sum; " \
         "failed" in p3.stdout and "lns_alpha0.5 seed 0: " in p3.stdout, p3.stdout
  for line in ("lns_alpha0 seed 0: warmup,lns, alpha 0, rho 0.005, warm start alpha 1; to run",
               "lns_alpha0_cewarm seed 0: warmup,lns, alpha 0, rho 0.005, warm start alpha 0; "
               "to run", "finetune seed 0: finetune, alpha 0, rho 0.005; to run",
               "lns seed 0: warmup,lns, alpha 1, rho 0.005, warm start alpha 1; to run",
               "lns_alpha0.5 seed 0: warmup,lns, alpha 0.5, rho 0.005, warm start alpha 1; "
               "done"):
    assert line in p3.stdout, (line, p3.stdout)
  assert "baseline: reused; found" in p3.stdout and "dry run: 4 of 7 runs left" in p3.stdout
  assert _result_mtimes(other) == before


def test_table_from_ablation_json_numbers():
  results = {"baseline": {"test_top1": 0.9, "val_top1": 0.8},
             "variants": {"finetune": [{"seed": 0, "test_top1": 0.91, "val_top1": 0.81,
                                        "best_test_top1": 0.905},
                                       {"seed": 1, "test_top1": 0.93, "val_top1": 0.83,
                                        "best_test_top1": 0.925}],
                          "lns": []}}
  lines = ablation.table(results).splitlines()
  assert lines[2] == "| baseline (pretrained) | - | 90.00 | - | 80.00 |"
  assert lines[3] == "| finetune | 2 | 93.00 (92.00 ± 1.41) | 91.50 ± 1.41 | 82.00 ± 1.41 |"
  assert lines[4] == "| lns | 0 | - | - | - |"


def test_plan_names_sweep_variants():
  c = _config()
  runs = ablation.plan(c, seeds=1, alphas=[0, 0.1, 1, 10], rhos=[0, 0.005, 0.05])
  names = [r.variant for r in runs]
  assert names == ["finetune", "lns_alpha0", "lns", "lns_alpha0.1", "lns_alpha10",
                   "lns_rho0", "lns_rho0.05"]
  by = {r.variant: r for r in runs}
  assert by["lns_alpha10"].alpha == 10 and by["lns_alpha10"].rho == c.rho
  assert by["lns_rho0.05"].rho == 0.05 and by["lns_rho0.05"].alpha == c.alpha
  assert by["finetune"].stages == "finetune" and by["lns_alpha0"].stages == "warmup,lns"


def test_select_runs_only_the_named_rows():
  runs = ablation.plan(_config(), seeds=2, alphas=[0.1], sweep_seeds=1)
  picked = ablation.select(runs, ["lns_alpha0.1", "finetune"])
  assert [(r.variant, r.seed) for r in picked] == [("finetune", 0), ("lns_alpha0.1", 0),
                                                  ("finetune", 1)]
  assert ablation.select(runs) == runs
  with pytest.raises(ablation.AblationError, match="lns_rho0 not in this ablation's plan"):
    ablation.select(runs, ["lns_rho0"])


def test_reused_baseline_dir_from_another_config_is_refused(tmp_path):
  base = tmp_path / "baseline"
  base.mkdir()
  other = _config()
  other.pretrain.lr = 0.5
  (base / "config.json").write_text(other.to_json_best_effort())
  with pytest.raises(ablation.AblationError, match="config.pretrain"):
    ablation.check_baseline_dir(ablation.baseline_config(_config()), str(base))
  ablation.check_baseline_dir(ablation.baseline_config(other), str(base))  # same: fine


def test_nested_preemption_is_the_outer_one():
  before = signal.getsignal(signal.SIGTERM)
  with workdir_lib.Preemption() as outer:
    with workdir_lib.Preemption() as inner:  # a run's trainer inside an ablation
      assert inner is outer
      os.kill(os.getpid(), signal.SIGTERM)
    assert outer.signal == signal.SIGTERM  # not lost with the run's handler
    assert signal.getsignal(signal.SIGTERM) == outer._handle
  assert signal.getsignal(signal.SIGTERM) == before
  with workdir_lib.Preemption() as again:  # a later one starts clean
    assert again is not outer and again.signal is None


def test_signal_after_a_runs_last_step_stops_before_the_next_run(monkeypatch, tmp_path):
  """A SIGTERM that reaches a run in its final evaluation (after its last step check) is
  not lost: the ablation stops before its next run (it once trained on to the end)."""
  from lns_jax import trainer
  calls = []
  monkeypatch.setattr(trainer, "train", trainer_signalled_at(calls, at=1))  # the baseline
  before = signal.getsignal(signal.SIGTERM)
  out = ablation.run_ablation(_config(), str(tmp_path / "abl"), seeds=1, log=lambda _: None)
  assert out == {"interrupted": True, "run": "finetune/seed0", "signal": signal.SIGTERM,
                 "before": True}
  assert calls == [str(tmp_path / "abl" / "baseline")]  # the baseline, then nothing
  assert signal.getsignal(signal.SIGTERM) == before


# (--seeds=0, --alphas=0,x and --rhos=-1 are rows of test_cli.py's BAD_CASES.)
@pytest.mark.parametrize("flags,expect", [
    (["--variants=lns_alpha7"], "--variants: lns_alpha7 not in this ablation's plan"),
    (["--config.rho=0.7"], "config.rho"),
    (["--baseline=/nonexistent/pretrain"], "--baseline=/nonexistent/pretrain: no readable"),
])
def test_cli_bad_input_one_line(cli, tmp_path, flags, expect):
  r = cli.run("lns_jax.ablation",
              "--config=" + os.path.join(ROOT, "configs", "fashion_mnist_r20.py") + ":smoke,val",
              f"--workdir={tmp_path / 'w'}", *flags)
  assert_one_error_line(r, expect)
  assert not (tmp_path / "w").exists()  # nothing written


def test_plots_cli_bad_workdir_is_one_line_exit_2(cli, tmp_path):
  r = cli.run("lns_jax.plots", f"--workdir={tmp_path / 'none'}")
  assert_one_error_line(r, "metrics.jsonl")


def test_sweep_points_and_figures_from_ablation_json(tmp_path):
  """Fig. 4 / 5 from ablation.json's content: a point per value of the config's reading
  (the extra rows, failed runs and fine-tuning left out); one PNG each, none without a sweep."""
  from lns_jax import plots
  rec = lambda seed, top1, alpha, rho, **kw: dict(seed=seed, test_top1=top1, alpha=alpha,  # noqa: E731
                                                  rho=rho, reduction=None, **kw)
  results = {"baseline": {"test_top1": 0.80}, "variants": {
      "finetune": [rec(0, 0.81, 0.0, 0.005)],
      "lns_alpha0": [rec(0, 0.84, 0.0, 0.005), rec(1, 0.86, 0.0, 0.005)],
      "lns": [rec(0, 0.82, 1.0, 0.005)],
      "lns_alpha0.1": [rec(0, 0.83, 0.1, 0.005)],
      "lns_rho0": [rec(0, 0.79, 1.0, 0.0)],
      "lns_rho0.05": [rec(0, 0.78, 1.0, 0.05)],
      "lns_alpha0_cewarm": [rec(0, 0.5, 0.0, 0.005)],
      "lns_sum": [{"seed": 0, "failed": "non-finite"}],
      "lns_mean": [rec(0, 0.1, 1.0, 0.005) | {"reduction": "mean"}]}}
  assert plots.sweep_points(results, "alpha") == {0.0: [0.84, 0.86], 1.0: [0.82], 0.1: [0.83]}
  assert plots.sweep_points(results, "rho") == {0.005: [0.82], 0.0: [0.79], 0.05: [0.78]}
  paths = [plots._sweep_figure(str(tmp_path), results, n, f, n) for n, f in
           (("fig4", "alpha"), ("fig5", "rho"))]
  assert [os.path.basename(p) for p in paths] == ["fig4.png", "fig5.png"]
  assert all(os.path.getsize(p) > 1000 for p in paths)
  del results["variants"]["lns_rho0.05"]  # two rho points: no Fig. 5
  assert plots._sweep_figure(str(tmp_path / "x"), results, "fig5", "rho", "") is None
