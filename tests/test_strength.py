"""Table 1 from baselines of several strengths (``--baselines``), the fine-tuning controls
(``--extra_rows=finetune_lr10x,finetune_matched``) and the strength report (issue 30)."""

import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

from lns_jax import ablation
from lns_jax import config as config_lib
from lns_jax.ablation import strength
from lns_testutil import ROOT, assert_one_error_line, load_config, trainer_signalled_at

CONFIG = os.path.join(ROOT, "configs", "fashion_mnist_r20.py")
# :paper,smoke,val at the smallest size: 2 steps an epoch at batch 32.
FLAGS = [f"--config={CONFIG}:paper,smoke,val", "--config.data.val_examples=32",
         "--config.data.train_examples=64", "--config.data.eval_examples=32",
         "--config.lns.epochs=0.5", "--config.warmup.epochs=0.5", "--config.log_every_steps=1",
         "--config.checkpoint_every_steps=1"]


def _config():
  c = load_config("fashion_mnist_r20.py", "paper,smoke,val")
  c.data.val_examples, c.data.train_examples, c.data.eval_examples = 32, 64, 32
  c.lns.epochs = c.warmup.epochs = 0.5
  c.log_every_steps = c.checkpoint_every_steps = 1
  return c


def _mtimes(root):
  return {os.path.join(d, f): os.stat(os.path.join(d, f)).st_mtime_ns
          for d, _, files in os.walk(root) for f in files if f == "result.json"}


def test_the_controls_rows_in_the_plan():
  c = load_config("fashion_mnist_r20.py", "paper,val")
  runs = ablation.plan(c, seeds=3, extra_rows=["finetune_matched", "finetune_lr10x"])
  assert [r.variant for r in runs if r.seed == 0] == [
      "finetune", "lns_alpha0", "lns", "finetune_lr10x", "finetune_matched"]
  assert len(runs) == 15  # every row at every seed: the controls get 3 seeds too
  by = {r.variant: r for r in runs if r.seed == 2}
  base = ablation.run_config(c, by["finetune"], "/b").finetune
  lr10 = ablation.run_config(c, by["finetune_lr10x"], "/b").finetune
  matched = ablation.run_config(c, by["finetune_matched"], "/b").finetune
  assert (base.lr, base.epochs, base.decay_epochs) == (0.01, 3.6, (0.9, 1.8, 2.7))
  assert (lr10.lr, lr10.epochs, lr10.decay_epochs) == (0.1, 3.6, (0.9, 1.8, 2.7))
  # Compute-matched: warmup (0.5) + lns (3.6) epochs, the LNS stage's decays after the warm start.
  assert (matched.lr, matched.epochs, matched.decay_epochs) == (0.01, 4.1, (1.4, 2.3, 3.2))
  assert by["finetune_matched"].describe().endswith("as long as warmup + lns")
  assert by["finetune_lr10x"].describe() == "finetune, alpha 0, rho 0.005, lr x10"
  with pytest.raises(ablation.AblationError, match="finetune_lr100x"):
    ablation.plan(c, 1, extra_rows=["finetune_lr100x"])


def test_named_baselines_update_pretraining_only():
  c = load_config("fashion_mnist_r20.py", "paper,val")
  assert ablation.baseline_names(c) == ["adam12", "adam24", "adam48", "sgd12", "sgd24", "sgd48"]
  sgd48, adam12 = ablation.with_baseline(c, "sgd48"), ablation.with_baseline(c, "adam12")
  assert (sgd48.pretrain.epochs, sgd48.pretrain.decay_epochs) == (48.0, (24.0, 36.0))
  assert (adam12.pretrain.optimizer, adam12.pretrain.schedule) == ("adam", "cosine")
  for b in (sgd48, adam12):
    assert b.lns.to_dict() == c.lns.to_dict() and b.finetune == c.finetune
    config_lib.validate(b)
  assert ablation.with_baseline(c, "sgd12").pretrain == c.pretrain  # :paper's own baseline
  with pytest.raises(ablation.AblationError, match="'sgd96' is not a baseline of this config"):
    ablation.with_baseline(c, "sgd96")
  c.baselines.sgd12.epochs = 3.0  # a recipe is checked like the pretrain fields it sets
  bad = load_config("fashion_mnist_r20.py", "paper")
  bad.baselines.sgd12 = {"epocs": 3.0}
  with pytest.raises(config_lib.ConfigError, match=r"config.baselines.sgd12.epocs: unknown"):
    config_lib.validate(bad)


def _res(base_top1, ce, **variants):
  rec = lambda s, t: {"seed": s, "test_top1": t}  # noqa: E731
  return {"baseline": {"test_top1": base_top1, "train_ce_final": ce}, "recipe": "r",
          "variants": {v: [rec(s, t) for s, t in enumerate(ts)] for v, ts in variants.items()}}


def test_strength_table_and_figure_from_hand_built_records(tmp_path):
  from lns_jax import plots
  records = {"weak": _res(0.80, 0.45, finetune=[0.81, 0.83], lns_alpha0=[0.845, 0.85, 0.84]),
             "strong": _res(0.90, 0.20, finetune=[0.9], lns_alpha0=[0.899, 0.901]),
             "empty": {"baseline": {}, "variants": {"finetune": []}}}
  records["strong"]["baseline"].update(train_hours=2.25, train_ce_last_quarter=[0.2012, 0.2004])
  g = strength.gains(records["weak"])
  np.testing.assert_allclose(g["lns_alpha0"], [0.045, 0.05, 0.04])
  lines = strength.table(records).splitlines()
  weak_ft = 100 * np.array([0.01, 0.03])
  assert lines[0].startswith("| baseline | recipe | train time | test top-1 | val top-1 | "
                             "train CE (end) | train CE, last quarter | finetune |")
  assert lines[2] == (f"| weak | r | - | 80.00 | - | 0.450 | - | +{weak_ft.mean():.2f} ± "
                      f"{weak_ft.std(ddof=1):.2f} | +4.50 ± 0.50 |")
  assert lines[3] == ("| strong | r | 2.2 h | 90.00 | - | 0.200 | 0.201 → 0.200 | "
                      "+0.00 (1 seed) | +0.00 ± 0.14 |")
  assert lines[4].startswith("| empty |") and lines[4].endswith("| - | - |")
  points = strength.figure_points(records)
  assert points["lns_alpha0"] == [(80.0, 0.45, pytest.approx(4.5), pytest.approx(0.5)),
                                  (90.0, 0.2, pytest.approx(0.0), pytest.approx(0.1414, 1e-3))]
  path = plots.strength_figure(str(tmp_path / "strength.png"), points)
  assert os.path.getsize(path) > 5000
  assert plots.strength_figure(str(tmp_path / "none.png"), {}) is None


def test_signs_table_from_hand_built_records():
  records = {"weak": _res(0.80, 0.45, finetune=[0.81, 0.83], lns_alpha0=[0.845]),
             "strong": _res(0.90, 0.20, finetune=[0.9], lns_alpha0=[0.899, 0.901, 0.9])}
  flips = {("weak", "finetune"): [0.0015, 0.0019], ("weak", "lns_alpha0"): [0.131],
           ("strong", "finetune"): [0.0007], ("strong", "lns_alpha0"): [0.08, 0.09, None]}
  for (name, v), fs in flips.items():
    for rec, f in zip(records[name]["variants"][v], fs):
      rec["flip_rate_init"] = f
  records["strong"]["variants"]["finetune"].append({"seed": 1, "failed": "non-finite"})
  lines = strength.signs_table(records).splitlines()
  assert lines[0] == "| baseline | test top-1 | finetune | lns_alpha0 |"
  ft = 100 * np.array(flips[("weak", "finetune")])
  assert lines[2] == f"| weak | 80.00 | {ft.mean():.2f} ± {ft.std(ddof=1):.2f} | 13.10 |"
  # A run without the record (one from before it was kept) and a failed one are left out.
  assert lines[3] == "| strong | 90.00 | 0.07 | 8.50 ± 0.71 |"


def test_best_val_table_from_hand_built_records():
  """The gains at each run's best-validation epoch: its test top-1 there minus the
  baseline's final one; a failed run and one without the record are left out."""
  records = {"weak": _res(0.80, 0.45, finetune=[0.81, 0.83], lns_alpha0=[0.84, 0.85, 0.7995]),
             "strong": _res(0.90, 0.20, finetune=[0.9], lns_alpha0=[0.899, 0.901]),
             "empty": {"baseline": {}, "variants": {"finetune": []}}}
  best = {("weak", "finetune"): [0.815, 0.825], ("weak", "lns_alpha0"): [0.858, 0.853, 0.8482],
          ("strong", "finetune"): [0.897], ("strong", "lns_alpha0"): [0.896, None]}
  for (name, v), bs in best.items():
    for rec, b in zip(records[name]["variants"][v], bs):
      if b is not None:
        rec["best_test_top1"] = b
  records["strong"]["variants"]["finetune"].append({"seed": 1, "failed": "non-finite",
                                                    "best_test_top1": 0.1})
  lines = strength.best_val_table(records).splitlines()
  assert lines[0] == "| baseline | test top-1 | finetune | lns_alpha0 |"
  la0 = 100 * (np.array(best[("weak", "lns_alpha0")]) - 0.80)
  assert lines[2] == f"| weak | 80.00 | +2.00 ± 0.71 | +{la0.mean():.2f} ± {la0.std(ddof=1):.2f} |"
  assert lines[3] == "| strong | 90.00 | -0.30 (1 seed) | -0.40 (1 seed) |"
  assert lines[4] == "| empty | - | - | - |"


def test_convergence_lines_pair_a_recipe_with_itself_at_twice_the_epochs():
  sgd = lambda epochs, decay: dict(optimizer="", epochs=epochs, lr=0.1,  # noqa: E731
                                   schedule="piecewise", decay_epochs=decay, decay_factor=0.1)
  records = {"sgd24": _res(0.8861, 0.30), "sgd48": _res(0.8866, 0.29),
             "sgd12": _res(0.8289, 0.45), "adam12": _res(0.8994, 0.27)}
  records["sgd24"].update(pretrain=sgd(24.0, [12.0, 18.0]))
  records["sgd24"]["baseline"]["train_ce_last_quarter"] = [0.30, 0.297]
  records["sgd48"].update(pretrain=sgd(48.0, [24.0, 36.0]))
  records["sgd12"].update(pretrain=sgd(12.0, [6.0, 9.0]))
  # adam12 at twice sgd12's epochs, and sgd12 at another lr: neither pairs.
  records["adam12"].update(pretrain={**sgd(24.0, [12.0, 18.0]), "optimizer": "adam"})
  lines = strength.convergence(records)
  assert lines == [
      "- `sgd24` against `sgd48` (its recipe at twice the epochs): test top-1 88.61 → 88.66 "
      "(+0.05), within 1 point; its train CE over the last quarter 0.300 → 0.297 (-1.0%).",
      "- `sgd12` against `sgd24` (its recipe at twice the epochs): test top-1 82.89 → 88.61 "
      "(+5.72), not within 1 point."]
  records["sgd24"]["pretrain"]["decay_epochs"] = [12.0, 20.0]  # not sgd12's points scaled
  assert len(strength.convergence(records)) == 0
  assert strength.convergence({"sgd24": records["sgd24"], "x": {"baseline": {}}}) == []


def test_train_ce_tail_from_a_metrics_file(tmp_path):
  from lns_jax import reporting
  from lns_jax import workdir as workdir_lib
  os.makedirs(tmp_path / "run")
  xs = np.arange(1, 81) / 10  # 8 epochs, a record every tenth of an epoch
  ys = 1.0 / xs
  with open(workdir_lib.path(str(tmp_path / "run"), workdir_lib.METRICS), "w") as f:
    for x, y in zip(xs, ys):
      f.write(json.dumps({"kind": reporting.TRAIN, "stage": "pretrain", "step": int(x * 10),
                          "epoch": float(x), "ce": float(y)}) + "\n")
  out = ablation.train_ce_tail(str(tmp_path / "run"))
  assert out["train_ce_final"] == pytest.approx(ys[xs > 7].mean())
  assert out["train_ce_last_quarter"] == [pytest.approx(ys[(xs > 6) & (xs <= 7)].mean()),
                                          pytest.approx(ys[xs > 7].mean())]
  assert ablation.train_ce_tail(str(tmp_path / "none")) == {}


def test_train_seconds_from_a_resumed_metrics_file(tmp_path):
  """Each logged interval's images over its images/s; a resumed run's repeated steps
  count once (the last record), and other stages and epoch records are not counted."""
  from lns_jax import reporting
  from lns_jax import workdir as workdir_lib
  run = str(tmp_path / "run")
  os.makedirs(run)
  with open(workdir_lib.path(run, workdir_lib.CONFIG), "w") as f:
    json.dump({"batch_size": 4}, f)
  rec = lambda stage, step, ips: {"kind": reporting.TRAIN, "stage": stage,  # noqa: E731
                                  "step": step, "epoch": step / 10, "ce": 1.0,
                                  "images_per_sec": ips}
  lines = [rec("pretrain", 10, 8.0), rec("pretrain", 20, 4.0),
           rec("pretrain", 20, 2.0),  # killed after step 20 and resumed: this one stands
           {"kind": reporting.EPOCH, "stage": "pretrain", "step": 20, "epoch": 2.0},
           rec("pretrain", 25, 5.0), rec("finetune", 10, 1.0)]
  with open(workdir_lib.path(run, workdir_lib.METRICS), "w") as f:
    f.write("".join(json.dumps(r) + "\n" for r in lines))
  # 10 steps of 4 images at 8/s, 10 at 2/s, 5 at 5/s.
  assert ablation.train_seconds(run) == pytest.approx(40 / 8 + 40 / 2 + 20 / 5)
  assert ablation.train_seconds(run, "finetune") == pytest.approx(40.0)
  assert ablation.train_seconds(run, "lns") is None
  assert ablation.train_seconds(str(tmp_path / "none")) is None


@pytest.mark.parametrize("flags,expect", [
    (["--baselines=sgd12,nope"], "--baselines: 'nope' is not a baseline of this config; "
                                 "choose from adam12, adam24, adam48, sgd12, sgd24, sgd48"),
    (["--baselines=sgd12,sgd12"], "a name is given twice"),
    (["--baselines=sgd12", "--baseline=/x/pretrain"], "--baseline and --baselines: give one"),
    (["--baselines=sgd12", "--config.baselines.sgd12.epochs=-1"], "config.pretrain.epochs"),
    (["--extra_rows=finetune_lr3x"], "--extra_rows: 'finetune_lr3x' is not one of"),
])
def test_cli_bad_input_one_line(cli, tmp_path, flags, expect):
  r = cli.run("lns_jax.ablation", *FLAGS, f"--workdir={tmp_path / 'w'}", *flags)
  assert_one_error_line(r, expect)
  assert not (tmp_path / "w").exists()


def _store(verb, workdir, state, **env):
  """results/store.sh's store_save / store_restore, as run.sh calls them."""
  p = subprocess.run(["bash", "-c", f'source results/store.sh && store_{verb} "$0" "$1"',
                      str(workdir), str(state)], capture_output=True, text=True, cwd=ROOT,
                     env=dict(os.environ, **env))
  assert p.returncode == 0, p.stderr
  return p.stdout


def _archived(path):
  import tarfile
  with tarfile.open(path) as t:
    return set(t.getnames())


def _fake_run(d, stages, mb=0):
  """A run's workdir as the trainer leaves it: stages {name: (finished, [checkpoint steps])},
  each checkpoint holding `mb` MB of incompressible bytes."""
  (d / "tensorboard").mkdir(parents=True)
  (d / "config.json").write_text("{}")
  (d / "metrics.jsonl").write_text("{}\n")
  rng = np.random.default_rng(0)
  for name, (finished, steps) in stages.items():
    for sub, ss in (("checkpoints", steps), ("best", steps[:1]), ("final", steps[-1:])):
      for n in ss if finished or sub != "final" else []:
        (d / name / sub / str(n)).mkdir(parents=True)
        (d / name / sub / str(n) / "state").write_bytes(rng.bytes(mb << 20))
    if finished:
      (d / name / "result.json").write_text("{}")


def test_store_keeps_of_a_running_run_what_its_resume_reads(tmp_path):
  """results/store.sh's running archive: a finished stage's final/ (the next stage starts
  from it) but not its checkpoints/ or best/; the running stage's newest checkpoint and its
  best; an archive over LNS_STORE_MAX_MB is not kept, and says so."""
  w, state = tmp_path / "w", tmp_path / "state"
  _fake_run(w / "a" / "lns" / "seed0", {"warmup": (True, [195]), "lns": (False, [390, 500, 585])})
  out = _store("save", w, state)
  assert "saved" in out and "not saved" not in out, out
  got = _archived(state / "running" / "a" / "lns" / "seed0.tar.gz")
  assert {"./warmup/result.json", "./warmup/final/195/state", "./lns/checkpoints/585/state",
          "./lns/best/390/state", "./config.json", "./metrics.jsonl"} <= got
  assert not any(m.startswith(("./warmup/checkpoints", "./warmup/best", "./tensorboard"))
                 or m.startswith(("./lns/checkpoints/390", "./lns/checkpoints/500"))
                 for m in got), sorted(got)
  big = tmp_path / "big"
  _fake_run(big / "b" / "baseline", {"pretrain": (False, [1, 2])}, mb=2)
  out = _store("save", big, state, LNS_STORE_MAX_MB="3")
  assert "not saved" in out and "LNS_STORE_MAX_MB=3" in out, out
  assert not list((state / "running" / "b").glob("*")), "neither the archive nor its .tmp"


@pytest.mark.slow
def test_signal_in_one_baselines_last_run_stops_before_the_next_baseline(monkeypatch,
                                                                         tmp_path):
  """A SIGTERM in the final evaluation of the first baseline's last run stops the
  strength ablation before the second baseline trains (it once trained on)."""
  from lns_jax import trainer
  from lns_jax.ablation import runner
  calls = []
  monkeypatch.setattr(trainer, "train", trainer_signalled_at(calls, at=2))  # sgd12's run
  monkeypatch.setattr(runner, "collect", lambda *a, **k: {})  # the reports read no fakes
  monkeypatch.setattr(runner.Ablation, "report", lambda self: "")
  monkeypatch.setattr(strength, "write_report", lambda *a, **k: {})
  before = signal.getsignal(signal.SIGTERM)
  out = ablation.run_strength(_config(), str(tmp_path), ["sgd12", "adam12"], 1,
                              log=lambda _: None, extra_rows=["finetune_matched"],
                              variants=["finetune_matched"])
  assert out == {"interrupted": True, "run": "adam12/baseline", "signal": signal.SIGTERM,
                 "before": True}
  assert [os.path.relpath(c, tmp_path) for c in calls] == [
      "sgd12/baseline", "sgd12/finetune_matched/seed0"]
  assert signal.getsignal(signal.SIGTERM) == before


def test_several_baselines_through_the_cli_interrupted_then_resumed(cli, tmp_path):
  """Two baselines (SGD, Adam), the compute-matched fine-tuning control from each (plain
  fine-tuning is the same stage at another length, trained in tests/test_ablation.py):
  interrupted in the middle of the second baseline's pretraining, packed by
  results/store.sh and unpacked on a "new machine", then the same command resumes it;
  the first baseline's runs are not repeated."""
  root = tmp_path / "strength"
  names, rows = ["sgd12", "adam12"], dict(extra_rows=["finetune_matched"],
                                          variants=["finetune_matched"])
  logs = []
  out = ablation.run_strength(_config(), str(root), names, 1, log=logs.append,
                              stop_at=("adam12", "baseline", None, "pretrain", 1), **rows)
  assert out == {"interrupted": True, "run": "adam12/baseline", "signal": None}
  assert (root / "sgd12" / "finetune_matched" / "seed0" / "finetune" / "result.json").exists()
  assert os.listdir(root / "adam12" / "baseline" / "pretrain" / "checkpoints")
  # A new machine: the workdir is gone but for what results/store.sh packed into state/.
  state = tmp_path / "state"
  _store("save", root, state)
  assert _archived(state / "done" / "sgd12" / "baseline.tar.gz") >= {
      "./summary.json", "./metrics.jsonl", "./pretrain/result.json"}
  assert any("/pretrain/final/" in m for m in _archived(state / "done" / "sgd12" /
                                                      "baseline.tar.gz"))
  run0 = _archived(state / "done" / "sgd12" / "finetune_matched" / "seed0.tar.gz")
  assert "./finetune/result.json" in run0 and not any("final/" in m for m in run0)
  running = _archived(state / "running" / "adam12" / "baseline.tar.gz")
  assert any("/pretrain/checkpoints/" in m for m in running)
  assert any("/pretrain/best/" in m for m in running)  # the best so far, still to beat
  assert not any("tensorboard" in m or ".lock" in m for m in running | run0)
  mtime = (state / "running" / "adam12" / "baseline.tar.gz").stat().st_mtime_ns
  assert "saved" not in _store("save", root, state)  # nothing changed: nothing rewritten
  assert (state / "running" / "adam12" / "baseline.tar.gz").stat().st_mtime_ns == mtime
  os.rename(root, tmp_path / "lost")
  _store("restore", root, state)
  before = _mtimes(root)
  cmd = [sys.executable, "-m", "lns_jax.ablation", *FLAGS, f"--workdir={root}", "--seeds=1",
         "--baselines=sgd12,adam12", "--extra_rows=finetune_matched",
         "--variants=finetune_matched"]
  p = cli.run_argv(cmd)
  assert p.returncode == 0, p.stderr[-3000:]
  started = [line for line in p.stdout.splitlines() if line.startswith("[ablation] run")]
  assert [s.split(" in ")[0] for s in started] == [
      "[ablation] run 0/1: baseline (pretrain, 1 epochs)",
      "[ablation] run 1/1: finetune_matched seed 0 (finetune, alpha 0, rho 0.005, as long as "
      "warmup + lns)"], p.stdout
  after = _mtimes(root)
  assert all(after[k] == v for k, v in before.items())  # sgd12's runs were not repeated
  assert "[pretrain] resuming from step" in p.stdout  # adam12's from its restored checkpoint
  _store("save", root, state)  # adam12's baseline now done: its running archive goes
  assert (state / "done" / "adam12" / "baseline.tar.gz").exists()
  assert not (state / "running" / "adam12" / "baseline.tar.gz").exists()
  saved = json.loads((root / "strength.json").read_text())
  assert set(saved) == set(names)
  for name in names:
    res = saved[name]
    one = json.loads((root / name / "ablation.json").read_text())
    assert (res["baseline"], res["variants"]) == (one["baseline"], one["variants"])
    assert 0 < res["baseline"]["test_top1"] <= 1 and res["baseline"]["train_ce_final"] > 0
    assert 0 < res["baseline"]["train_hours"] < 1
    assert [len(res["variants"][v]) for v in ("finetune", "finetune_matched")] == [0, 1]
    assert (root / name / "baseline.png").stat().st_size > 1000
  assert saved["adam12"]["pretrain"]["optimizer"] == "adam"
  assert saved["sgd12"]["recipe"] == "sgd lr 0.1, 1 epochs, piecewise x0.1 at 0.5, 0.75, batch 32"
  cfg = json.loads((root / "adam12" / "finetune_matched" / "seed0" / "config.json").read_text())
  assert cfg["finetune"]["epochs"] == 1.0 and cfg["pretrain"]["optimizer"] == "adam"
  md = (root / "strength.md").read_text()
  assert "| sgd12 |" in md and "| adam12 |" in md and "strength.png" in md
  # The gains at the best-validation epoch, from the runs' own records.
  assert strength.best_val_table(saved) in md
  assert saved["sgd12"]["variants"]["finetune_matched"][0]["best_test_top1"] > 0
  assert (root / "strength.png").stat().st_size > 5000
  # (A rerun of the finished command starting nothing is test_ablation's p2.)
  # A baseline alone (adam12's convergence check at twice the epochs): the report keeps
  # every baseline of the workdir, weakest first.
  p3 = cli.run_argv(cmd[:-3] + ["--baselines=adam24", "--variants=baseline"])
  assert p3.returncode == 0 and "run 0/0: baseline (pretrain, 2 epochs)" in p3.stdout, p3.stdout
  assert not (root / "adam24" / "finetune").exists()
  again = json.loads((root / "strength.json").read_text())
  assert set(again) == {"sgd12", "adam12", "adam24"}
  assert not any(again["adam24"]["variants"].values())
  tops = [r["baseline"]["test_top1"] for r in again.values()]
  assert tops == sorted(tops)
  assert "- `adam12` against `adam24` (its recipe at twice the epochs)" in (
      root / "strength.md").read_text()
  # --report_only: the report of what is finished, for every baseline; nothing trains,
  # not even a baseline that was never pretrained (sgd24).
  (root / "strength.md").unlink()
  finished = _mtimes(root)
  p4 = cli.run_argv(cmd[:-3] + ["--baselines=sgd12,sgd24", "--report_only"])
  assert p4.returncode == 0 and "[ablation] run" not in p4.stdout, p4.stdout[-2000:]
  assert "| adam24 |" in (root / "strength.md").read_text()
  assert not (root / "sgd24" / "baseline").exists() and _mtimes(root) == finished
  # results/fmnist_r20_strength/run.sh as typed, at smoke size: `report` copies the report
  # (every baseline's Table 1 and curve), `save` packs the workdir; neither trains.
  out = tmp_path / "results"
  env = dict(os.environ, LNS_STRENGTH_DIR=str(root), LNS_STRENGTH_RESULTS=str(out),
             LNS_STRENGTH_CONFIG=f"{CONFIG}:paper,smoke,val", PYTHON=sys.executable,
             LNS_STRENGTH_FLAGS=" ".join(FLAGS[1:]))
  for verb in ("report", "save"):
    p5 = subprocess.run(["bash", "results/fmnist_r20_strength/run.sh", verb], env=env,
                        capture_output=True, text=True, cwd=ROOT, timeout=900)
    assert p5.returncode == 0 and "[ablation] run" not in p5.stdout, p5.stderr[-2000:]
  assert {"strength.md", "strength.png", "adam12_ablation.md", "adam24_baseline.png",
          "sgd12_fig3.png"} <= set(os.listdir(out))
  assert "| adam48 |" in (out / "strength.md").read_text()  # planned, not trained: a row of -
  assert (out / "state" / "done" / "adam24" / "baseline.tar.gz").exists()
  assert _mtimes(root) == finished


@pytest.mark.parametrize("script,verbs", [("fmnist_r20_strength", "nothing, extra, report or save"),
                                          ("fmnist_reactnet", "nothing, report or save")])
def test_results_run_sh_refuses_an_unknown_verb_in_one_line(tmp_path, script, verbs):
  """`bash results/<name>/run.sh <typo>` trains nothing and says what it takes."""
  env = dict(os.environ, LNS_STRENGTH_DIR=str(tmp_path / "w"), LNS_REACTNET_DIR=str(tmp_path / "w"),
             LNS_STRENGTH_RESULTS=str(tmp_path / "r"), LNS_REACTNET_RESULTS=str(tmp_path / "r"))
  p = subprocess.run(["bash", f"results/{script}/run.sh", "reprot"], env=env, cwd=ROOT,
                     capture_output=True, text=True, timeout=60)
  assert_one_error_line({"rc": p.returncode, "stdout": p.stdout, "stderr": p.stderr},
                        f"takes {verbs}; got 'reprot'")
  assert not (tmp_path / "w").exists() and not (tmp_path / "r").exists()
