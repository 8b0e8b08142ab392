"""The paper's Table 1 ablation as one command, across seeds (Sec. 4.2, Fig. 3-5).

  python -m lns_jax.ablation --config=configs/fashion_mnist_r20.py:val --workdir=DIR --seeds=3
  python -m lns_jax.ablation ... --alphas=0,0.1,1,10 --rhos=0,0.005,0.05     # Fig. 4 / Fig. 5
  python -m lns_jax.ablation ... --extra_rows=alpha0_cewarm,other_reduction
  python -m lns_jax.ablation ... --alphas=0,0.1,1 --variants=lns_alpha0.1  # just those rows
  python -m lns_jax.ablation ... --dry_run      # the plan and each run's state; writes nothing

The baseline is pretrained once (``DIR/baseline``, or reused with ``--baseline=PATH``);
then, from that same baseline and for each seed, three variants with the same epochs,
schedule and batch (``finetune`` runs with ``config.lns``'s epochs and schedule):

  finetune     continue the baseline with sign(W), cross-entropy;
  lns_alpha0   warmup + lns with alpha = 0 in the LNS stage ("w/o noisy supervision"),
               after the same warm start as ``lns`` (f_theta fitted to sign(W) with
               the warm start's alpha: the paper's reading, DECISIONS 17);
  lns          warmup + lns with the config's alpha and rho;

plus ``lns_alpha<a>`` / ``lns_rho<r>`` for the sweeps (the LNS stage's alpha or rho;
every LNS row has the same warm start's alpha), and with ``--extra_rows``:

  lns_alpha0_cewarm   alpha = 0 in the warm start too (the earlier reading: f_theta
                      warmed up with cross-entropy alone from its random init);
  lns_<reduction>     lns with the other reduction of Eq. 15 (``sum``, Eq. 17, or
                      ``mean``, Eq. 16) than the config's.

A run that stops on a non-finite loss (``config.on_nonfinite='stop'``) is recorded as
failed (``failed.json`` in its folder, a row of the table) and the ablation goes on. The seed changes the data order
and the mapping's initialisation. Every run is a ``train.py`` workdir
(``DIR/<variant>/seed<k>``): a finished run is not repeated, an interrupted one resumes
from its newest checkpoint. Results: ``DIR/ablation.json`` (top-1 as fractions),
``DIR/ablation.md`` (Table 1 and the figures), ``fig3*.png``, ``fig4.png``, ``fig5.png``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import time
from typing import Dict, List, Optional, Sequence

import numpy as np

from lns_jax import reporting

BASELINE = "baseline"
# Fields that make two baselines the same baseline (a reused DIR/baseline must match).
BASELINE_FIELDS = ("seed", "model", "data", "batch_size", "optimizer", "momentum",
                   "weight_decay", "pretrain", "teacher", "step1", "distill")
# Relative cost of an epoch, for the ETA: the mapping networks make LNS steps dearer.
_COST = {"pretrain": 1.0, "finetune": 1.0, "warmup": 1.2, "lns": 1.2, "teacher": 1.0,
         "step1": 1.0}
EXTRA_ROWS = ("alpha0_cewarm", "other_reduction")
FAILED = "failed.json"


class AblationError(ValueError):
  """Bad ablation arguments or a workdir from another ablation; one line."""


@dataclasses.dataclass(frozen=True)
class Run:
  variant: str
  seed: int
  stages: str
  alpha: float
  rho: float
  warmup_alpha: Optional[float] = None  # the warm start's alpha (LNS rows)
  reduction: str = ""                   # '' = the config's

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.variant, f"seed{self.seed}")

  @property
  def last_stage(self) -> str:
    return self.stages.split(",")[-1]


def _fmt(x: float) -> str:
  return f"{x:g}"


def plan(config, seeds: int, alphas: Sequence[float] = (), rhos: Sequence[float] = (),
         extra_rows: Sequence[str] = (), sweep_seeds: Optional[int] = None) -> List[Run]:
  """Every run of the ablation, seed-major (all variants of seed 0 first); the sweeps'
  points and the extra rows for the first ``sweep_seeds`` seeds (default: all)."""
  if seeds < 1:
    raise AblationError(f"--seeds={seeds}: give at least 1.")
  sweep_seeds = seeds if sweep_seeds is None else sweep_seeds
  if not 0 <= sweep_seeds <= seeds:
    raise AblationError(f"--sweep_seeds={sweep_seeds}: give 0 to --seeds ({seeds}).")
  for row in extra_rows:
    if row not in EXTRA_ROWS:
      raise AblationError(f"--extra_rows: {row!r} is not one of {', '.join(EXTRA_ROWS)}.")
  alpha, rho = float(config.alpha), config.rho
  # The warm start of every LNS row fits f_theta with the same alpha (DECISIONS 17).
  warm = float(config.alpha if config.warmup.get("alpha") is None else config.warmup.alpha)
  lns = lambda a, r, **kw: dict(stages="warmup,lns", alpha=a, rho=r, warmup_alpha=warm, **kw)
  variants = {"finetune": dict(stages="finetune", alpha=0.0, rho=rho),
              "lns_alpha0": lns(0.0, rho), "lns": lns(alpha, rho)}
  sweep = set()
  for a in alphas:
    if a != alpha and a != 0:
      variants[f"lns_alpha{_fmt(a)}"] = lns(float(a), rho)
      sweep.add(f"lns_alpha{_fmt(a)}")
  for r in rhos:
    if r != rho:
      variants[f"lns_rho{_fmt(r)}"] = lns(alpha, float(r))
      sweep.add(f"lns_rho{_fmt(r)}")
  if "alpha0_cewarm" in extra_rows:
    variants["lns_alpha0_cewarm"] = lns(0.0, rho) | {"warmup_alpha": 0.0}
    sweep.add("lns_alpha0_cewarm")
  if "other_reduction" in extra_rows:
    other = "sum" if config.reduction == "mean" else "mean"
    variants[f"lns_{other}"] = lns(alpha, rho, reduction=other)
    sweep.add(f"lns_{other}")
  return [Run(v, s, **spec) for s in range(seeds) for v, spec in variants.items()
          if v not in sweep or s < sweep_seeds]


def select(runs: List[Run], variants: Sequence[str] = ()) -> List[Run]:
  """The runs of ``variants`` (all when empty); an unplanned name is one error line."""
  planned = list(dict.fromkeys(r.variant for r in runs))
  unknown = [v for v in variants if v not in planned]
  if unknown:
    raise AblationError(f"--variants: {', '.join(unknown)} not in this ablation's plan; "
                        f"choose from {', '.join(planned)} (the sweeps' rows need --alphas/"
                        f"--rhos, the extra rows --extra_rows).")
  return [r for r in runs if not variants or r.variant in variants]


def run_config(config, run: Run, baseline_final: str):
  """The config of one run: the ablation's config with its variant's fields."""
  from lns_jax import config as config_lib
  c = copy.deepcopy(config)
  c.stages = run.stages
  c.seed = run.seed
  c.alpha = run.alpha
  c.rho = run.rho
  c.init_from = baseline_final
  if config_lib.teacher_is_stage(c.distill.teacher):
    # The baseline run trained the teacher (docs/reactnet.md): every variant distils from it.
    stage_dir = os.path.normpath(baseline_final)
    if os.path.basename(stage_dir) == "final":
      stage_dir = os.path.dirname(stage_dir)
    c.distill.teacher = os.path.join(os.path.dirname(stage_dir), c.distill.teacher)
  c.warmup.alpha = run.warmup_alpha
  c.lns.alpha = None  # the LNS stage's alpha is the run's: config.alpha
  if run.reduction:
    c.reduction = run.reduction
  # Same epochs, schedule and optimizer for fine-tuning as for the LNS stage.
  for key in c.lns.keys():
    if key != "alpha":  # fine-tuning's objective is cross-entropy alone
      c.finetune[key] = c.lns[key]
  return c


# The objective's fields of a run, read back from its config.json to refuse a folder
# made under another reading (e.g. lns_alpha0 before its warm start had its own alpha).
def _objective(config, stages: str) -> dict:
  from lns_jax import config as config_lib
  out = {"rho": json.dumps(config.rho), "reduction": config.reduction}
  for s in stages.split(","):
    out[f"{s}.alpha"] = config_lib.stage_alpha(config, s)
  return out


def check_run_dir(config, workdir: str, stages: str) -> None:
  """A run folder that exists must hold the same objective as the run planned now."""
  saved = _saved_config(workdir)
  if saved is None:
    return
  saved, now = _objective(saved, stages), _objective(config, stages)
  for key, value in now.items():
    if saved[key] != value:
      raise AblationError(
          f"{workdir} was run with {key} = {saved[key]} where this ablation plans {value} "
          f"(an ablation of another config or an earlier reading of the row); use another "
          f"--workdir.")


def baseline_config(config):
  from lns_jax import config as config_lib
  c = copy.deepcopy(config)
  # The stages up to the baseline: a teacher and ReActNet's step 1 where the config has them.
  names = config_lib.stage_names(config)
  c.stages = ",".join(names[:names.index("pretrain") + 1]) if "pretrain" in names else "pretrain"
  c.init_from = ""
  return c


def _saved_config(workdir: str):
  """``workdir``'s ``config.json`` (fields added since it was saved take their
  defaults), or None where the folder has none."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return None
  from lns_jax import config as config_lib
  with open(path) as f:
    return config_lib.from_saved_json(f.read())


def check_baseline_dir(config, baseline_dir: str) -> None:
  """A reused ``DIR/baseline`` must have been trained with this config's baseline fields."""
  saved = _saved_config(baseline_dir)
  if saved is None:
    return
  saved = json.loads(saved.to_json_best_effort())
  now = json.loads(config.to_json_best_effort())
  for field in BASELINE_FIELDS:
    if field in saved and saved[field] != now.get(field):
      raise AblationError(
          f"{baseline_dir} was pretrained with another config.{field} "
          f"({json.dumps(saved[field])[:80]} there, {json.dumps(now.get(field))[:80]} now); "
          f"use another --workdir, or --baseline=PATH to reuse a baseline on purpose.")


# ----------------------------------------------------------------------------- results


def run_record(run: Run, workdir: str) -> Optional[dict]:
  """``{'seed', 'test_top1', 'test_top5', ...}`` of a finished run, else None.

  ``best_test_top1`` is the test top-1 at the epoch of the best validation top-1 when
  the config has a validation split (never chosen on test), else the final one.
  """
  path = os.path.join(workdir, run.last_stage, "result.json")
  failed = os.path.join(workdir, FAILED)
  if os.path.exists(failed) and not os.path.exists(path):
    with open(failed) as f:
      return {"seed": run.seed, "failed": json.load(f)["error"]}
  if not os.path.exists(path):
    return None
  with open(path) as f:
    result = json.load(f)
  rec = {"seed": run.seed, "test_top1": result["test"]["top1"],
         "test_top5": result["test"]["top5"], "flip_rate_init": result.get("flip_rate_init")}
  if "validation" in result:
    rec["val_top1"] = result["validation"]["top1"]
  epochs = [r for r in reporting.epoch_records(workdir, run.last_stage) if "test_top1" in r]
  with_val = [r for r in epochs if "val_top1" in r]
  if with_val:
    best = max(with_val, key=lambda r: r["val_top1"])  # first of equals: the earliest
    rec.update(best_test_top1=best["test_top1"], best_val_top1=best["val_top1"],
               best_epoch=best["epoch"])
  if run.stages.startswith("warmup"):
    warm = os.path.join(workdir, "warmup", "result.json")
    if os.path.exists(warm):
      with open(warm) as f:
        w = json.load(f)
      rec["warmup_test_top1"] = w["test"]["top1"]
      rec["warmup_signs_differ"] = w.get("flip_rate_init")
  return rec


def _baseline_result(root: str, baseline: str = "") -> str:
  """``result.json`` of the baseline: ``DIR/baseline``'s, or that of ``--baseline``'s stage."""
  if not baseline:
    return os.path.join(root, BASELINE, "pretrain", "result.json")
  path = os.path.abspath(os.path.expanduser(baseline))
  if os.path.basename(os.path.normpath(path)) == "final":
    path = os.path.dirname(os.path.normpath(path))
  return os.path.join(path, "result.json")


def collect(root: str, runs: List[Run], baseline: str = "") -> dict:
  """The ``ablation.json`` content from the runs' workdirs (finished runs only)."""
  out = {"baseline": {}, "variants": {}}
  bres = _baseline_result(root, baseline)
  if os.path.exists(bres):
    with open(bres) as f:
      b = json.load(f)
    out["baseline"] = {"test_top1": b["test"]["top1"], "test_top5": b["test"]["top5"]}
    if "validation" in b:
      out["baseline"]["val_top1"] = b["validation"]["top1"]
  for run in runs:
    out["variants"].setdefault(run.variant, [])
    rec = run_record(run, run.workdir(root))
    if rec is not None:
      rec.update(alpha=run.alpha, rho=run.rho, warmup_alpha=run.warmup_alpha,
                 reduction=run.reduction or None)
      out["variants"][run.variant].append(rec)
  return out


def _mean_std(values) -> str:
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  m = 100 * float(np.mean(values))
  if len(values) == 1:
    return f"{m:.2f}"
  return f"{m:.2f} ± {100 * float(np.std(values, ddof=1)):.2f}"


def _best_mean_std(values) -> str:
  """The paper's "best (mean ± std)" over runs (Table 2), in %."""
  values = [v for v in values if v is not None]
  if len(values) < 2:
    return _mean_std(values)
  return f"{100 * max(values):.2f} ({_mean_std(values)})"


def table(results: dict) -> str:
  """Table 1: the baseline and each variant's final test top-1 over seeds, as the paper
  reports it: best (mean ± sample std); with a validation split also the test top-1 at
  the epoch of best validation top-1, and the final validation top-1."""
  has_val = "val_top1" in results["baseline"] or any(
      "val_top1" in r for rs in results["variants"].values() for r in rs)
  head = ["variant", "seeds", "test top-1 (%): best (mean ± std)"]
  if has_val:
    head += ["test top-1 at best val epoch (%)", "val top-1 (%)"]
  rows = ["| " + " | ".join(head) + " |", "|" + "---|" + "---:|" * (len(head) - 1)]
  b = results["baseline"]
  if b:
    row = ["baseline (pretrained)", "-", _mean_std([b["test_top1"]])]
    if has_val:
      row += ["-", _mean_std([b.get("val_top1")])]
    rows.append("| " + " | ".join(row) + " |")
  for name, all_recs in results["variants"].items():
    recs = [r for r in all_recs if "failed" not in r]
    failed = len(all_recs) - len(recs)
    row = [name, str(len(recs)), _best_mean_std([r["test_top1"] for r in recs])]
    if failed:
      row[1] += f" (+{failed} failed: non-finite)"
    if has_val:
      row += [_mean_std([r.get("best_test_top1") for r in recs]),
              _mean_std([r.get("val_top1") for r in recs])]
    rows.append("| " + " | ".join(row) + " |")
  return "\n".join(rows)


def write_report(root: str, runs: List[Run], config, extra: Optional[dict] = None,
                 baseline: str = "") -> str:
  """Writes ablation.json, ablation.md and the figures; returns the table."""
  from lns_jax import plots
  results = collect(root, runs, baseline)
  results.update(extra or {})
  tmp = os.path.join(root, "ablation.json.tmp")
  with open(tmp, "w") as f:
    json.dump(results, f, indent=2)
  os.replace(tmp, os.path.join(root, "ablation.json"))
  tab = table(results)
  failures = [(name, r) for name, rs in results["variants"].items() for r in rs if "failed" in r]
  figs = plots.ablation_figures(root, runs, results)
  lines = ["# Ablation (Table 1)", "",
           f"Config: `{extra.get('config_arg', '') if extra else ''}`; top-1 in %, mean ± "
           f"sample std over seeds; finished runs only.", "", tab, ""]
  if not any("val_top1" in r for rs in results["variants"].values() for r in rs):
    lines += ["No validation split in this config: only final test accuracy is reported "
              "(no epoch is chosen on the test split).", ""]
  for name, r in failures:
    lines += [f"- {name} seed {r['seed']} failed: {r['failed']}"]
  if failures:
    lines += [""]
  for path in figs:
    lines += [f"![{os.path.basename(path)}]({os.path.basename(path)})", ""]
  with open(os.path.join(root, "ablation.md"), "w") as f:
    f.write("\n".join(lines))
  return tab


# --------------------------------------------------------------------------------- run


def _run_cost(config, run: Run) -> float:
  return sum(float(config[s].epochs) * _COST[s]
             for s in run.stages.split(",")) if run.stages != "finetune" else (
                 float(config.lns.epochs) * _COST["finetune"])


def _finished(workdir: str, stages: str) -> bool:
  """Done: its last stage's result, or a recorded failure (a rerun would fail alike)."""
  return (os.path.exists(os.path.join(workdir, stages.split(",")[-1], "result.json"))
          or os.path.exists(os.path.join(workdir, FAILED)))


def run_ablation(config, workdir: str, seeds: int, alphas=(), rhos=(),
                 baseline: str = "", *, extra_rows=(), sweep_seeds=None, variants=(),
                 config_arg: str = "", dry_run: bool = False, log=print,
                 stop_at=None) -> dict:
  """Runs (or resumes) the whole ablation; returns ``ablation.json``'s content.

  ``dry_run`` (``--dry_run``) checks every run's config and prints the plan (each run,
  its state in ``workdir``, the epochs left) without training or writing anything.

  ``variants`` (``--variants``) runs only those rows of the plan (e.g. one sweep's
  points); the report still covers every planned run finished in ``workdir``.

  ``stop_at=(variant, seed, stage, step)`` interrupts one run as a preemption would
  (tests). Returns ``{'interrupted': True, ...}`` when a run was stopped.
  """
  from lns_jax import parallel, trainer

  root = os.path.abspath(os.path.expanduser(workdir))
  runs = plan(config, seeds, alphas, rhos, extra_rows, sweep_seeds)
  todo = select(runs, variants)
  base_dir = os.path.join(root, BASELINE)
  baseline_final = baseline or os.path.join(base_dir, "pretrain", "final")
  bcfg = baseline_config(config)
  _check_before_writing(config, runs, bcfg, baseline, baseline_final, base_dir,
                        load_baseline=not dry_run)
  if dry_run:
    return _print_plan(config, root, todo, baseline, base_dir, log)
  os.makedirs(root, exist_ok=True)
  t0, done_cost = time.time(), 0.0
  costs = {r: _run_cost(config, r) for r in todo}

  def eta() -> str:
    left = sum(c for r, c in costs.items() if not _finished(r.workdir(root), r.stages))
    if not baseline and not _finished(base_dir, "pretrain"):
      left += _baseline_epochs(bcfg)
    if done_cost <= 0:
      return "ETA after the first run"
    return f"ETA {_duration((time.time() - t0) / done_cost * left)}"

  if not baseline and not _finished(base_dir, "pretrain"):
    log(f"[ablation] run 0/{len(todo)}: baseline ({bcfg.stages}, {_baseline_epochs(bcfg):g} epochs) "
        f"in {base_dir}; {eta()}")
    res = trainer.train(bcfg, base_dir, stop_at=_stop(stop_at, BASELINE, None))
    if any(r.get("interrupted") for r in res.values()):
      return {"interrupted": True, "run": BASELINE, "signal": _signal(res)}
    done_cost += _baseline_epochs(bcfg)

  stage_dir = os.path.normpath(baseline_final)
  if os.path.basename(stage_dir) == "final":
    stage_dir = os.path.dirname(stage_dir)
  extra = {"config_arg": config_arg, "seeds": seeds, "baseline_checkpoint": baseline_final,
           "baseline_workdir": os.path.dirname(stage_dir)}
  for i, run in enumerate(todo, 1):
    wd = run.workdir(root)
    if _finished(wd, run.stages):
      continue
    log(f"[ablation] run {i}/{len(todo)}: {run.variant} seed {run.seed} "
        f"({run.stages}, alpha {run.alpha:g}, rho {run.rho}"
        + (f", warm start alpha {run.warmup_alpha:g}" if run.warmup_alpha is not None else "")
        + (f", reduction {run.reduction}" if run.reduction else "") + f") in {wd}; {eta()}")
    try:
      res = trainer.train(run_config(config, run, baseline_final), wd,
                          stop_at=_stop(stop_at, run.variant, run.seed))
    except trainer.NonFiniteError as e:
      # A divergence is a result of the row (e.g. Eq. 17's sum with SGD); the rest runs.
      log(f"[ablation] {run.variant} seed {run.seed} failed: {e}")
      if parallel.is_main_process():
        from lns_jax import workdir as workdir_lib
        workdir_lib.write_json_atomic(os.path.join(wd, FAILED), {"error": str(e)})
        write_report(root, runs, config, extra, baseline)
      continue
    if any(r.get("interrupted") for r in res.values()):
      return {"interrupted": True, "run": f"{run.variant}/seed{run.seed}", "signal": _signal(res)}
    done_cost += costs[run]
    if parallel.is_main_process():
      write_report(root, runs, config, extra, baseline)
  results = collect(root, runs, baseline)
  if parallel.is_main_process():
    log("\n" + write_report(root, runs, config, extra, baseline))
    log(f"[ablation] done: {os.path.join(root, 'ablation.md')}")
  return results


def _state(workdir: str, stages: str) -> str:
  if os.path.exists(os.path.join(workdir, FAILED)):
    return "failed"
  if _finished(workdir, stages):
    return "done"
  return "started" if os.path.exists(workdir) else "to run"


def _baseline_epochs(bcfg) -> float:
  """The epochs of the baseline's stages (a teacher and ReActNet's step 1 included)."""
  return sum(float(bcfg[s].epochs) for s in bcfg.stages.split(","))


def _print_plan(config, root, todo, baseline, base_dir, log) -> dict:
  """``--dry_run``: one line per run and the epochs left; nothing is written."""
  rows = []
  if baseline:
    rows.append(("baseline", "-", "reused", baseline, "found" if os.path.exists(baseline)
                 else "missing", 0.0))
  else:
    state = _state(base_dir, "pretrain")
    bcfg = baseline_config(config)
    rows.append(("baseline", "-", f"{bcfg.stages}, {_baseline_epochs(bcfg):g} epochs", base_dir,
                 state, 0.0 if state == "done" else _baseline_epochs(bcfg)))
  for r in todo:
    wd = r.workdir(root)
    state = _state(wd, r.stages)
    desc = f"{r.stages}, alpha {r.alpha:g}, rho {r.rho}" + (
        f", warm start alpha {r.warmup_alpha:g}" if r.warmup_alpha is not None else "") + (
        f", reduction {r.reduction}" if r.reduction else "")
    rows.append((r.variant, str(r.seed), desc, wd, state,
                 0.0 if state in ("done", "failed") else _run_cost(config, r)))
  for variant, seed, desc, wd, state, _ in rows:
    who = variant if seed == "-" else f"{variant} seed {seed}"
    log(f"[ablation] {who}: {desc}; {state} ({wd})")
  left = sum(c for *_, c in rows)
  log(f"[ablation] dry run: {sum(1 for *_, c in rows if c)} of {len(rows)} runs left, "
      f"{left:g} epoch-equivalents (an LNS epoch counts {_COST['lns']:g}); nothing written.")
  return {"dry_run": True, "runs": [dict(zip(("variant", "seed", "run", "workdir", "state",
                                              "epochs_left"), row)) for row in rows]}


def _check_before_writing(config, runs, bcfg, baseline, baseline_final, base_dir,
                          load_baseline=True):
  """Every config is checked, and the baseline found, before anything is written."""
  from lns_jax import checkpoint as ckpt_lib
  from lns_jax import config as config_lib
  from lns_jax import parallel
  num_devices = parallel.make_mesh().size
  config_lib.validate(bcfg, num_devices=num_devices)
  for r in runs:
    cfg_check = run_config(config, r, baseline_final)
    config_lib.validate(cfg_check, num_devices=num_devices)
    check_run_dir(cfg_check, r.workdir(os.path.abspath(os.path.dirname(base_dir))), r.stages)
  if baseline:
    if not load_baseline:  # --dry_run: says whether it is there instead
      return
    try:
      ckpt_lib.load_variables(baseline)
    except ckpt_lib.CheckpointMismatchError:
      raise AblationError(
          f"--baseline={baseline}: no readable checkpoint there; give the pretrain stage "
          f"folder of a finished run (e.g. DIR/baseline/pretrain) or its final/ folder.") from None
  else:
    check_baseline_dir(bcfg, base_dir)


def _signal(results):
  return next((r.get("signal") for r in results.values() if r.get("interrupted")), None)


def _stop(stop_at, variant, seed):
  if stop_at and stop_at[0] == variant and stop_at[1] == seed:
    return (stop_at[2], stop_at[3])
  return None


def _duration(seconds: float) -> str:
  seconds = max(0, int(seconds))
  h, rem = divmod(seconds, 3600)
  return f"{h} h {rem // 60:02d} min" if h else f"{rem // 60} min {rem % 60:02d} s"


def parse_floats(text: str, flag: str) -> List[float]:
  """``'0,0.1,1'`` -> ``[0.0, 0.1, 1.0]``; one-line :class:`AblationError` otherwise."""
  if not text:
    return []
  out = []
  for part in text.split(","):
    try:
      v = float(part)
    except ValueError:
      raise AblationError(f"--{flag}={text!r}: {part.strip()!r} is not a number; give "
                          f"comma-separated numbers like 0,0.1,1.") from None
    if not math.isfinite(v) or v < 0:
      raise AblationError(f"--{flag}={text!r}: {part.strip()} must be finite and >= 0.")
    out.append(v)
  return out


# --------------------------------------------------------------------------------- CLI


def _names(text: str) -> List[str]:
  """``'a, b,'`` -> ``['a', 'b']`` (a comma-separated flag)."""
  return [v.strip() for v in text.split(",") if v.strip()]


def main(argv):
  """``python -m lns_jax.ablation``: flags as in the module docstring."""
  import sys

  from absl import flags

  from lns_jax import config as config_lib
  from lns_jax import trainer
  from lns_jax.checkpoint import CheckpointMismatchError
  from lns_jax.cli import quiet_logging
  from lns_jax.data import DatasetNotFoundError
  del argv
  quiet_logging()
  fl = flags.FLAGS
  config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  try:
    out = run_ablation(fl.config, fl.workdir, fl.seeds, parse_floats(fl.alphas, "alphas"),
                       parse_floats(fl.rhos, "rhos"), fl.baseline, config_arg=config_arg,
                       extra_rows=_names(fl.extra_rows),
                       sweep_seeds=None if fl.sweep_seeds < 0 else fl.sweep_seeds,
                       variants=_names(fl.variants),
                       dry_run=fl.dry_run)
  except (AblationError, config_lib.ConfigError, DatasetNotFoundError,
          CheckpointMismatchError, trainer.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("[ablation] interrupted; run the same command again to resume.", file=sys.stderr)
    sys.exit(130)
  if out.get("interrupted"):
    print(f"[ablation] {out['run']} stopped after a checkpoint; run the same command again "
          f"to resume.", flush=True)
    sys.exit(128 + int(out.get("signal") or 15))


if __name__ == "__main__":
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  from absl import flags
  from ml_collections import config_flags
  config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                  lock_config=True)
  flags.DEFINE_string("workdir", None, "The ablation's folder (resumable).")
  flags.DEFINE_integer("seeds", 3, "Seeds per variant.")
  flags.DEFINE_string("alphas", "", "Fig. 4 sweep, e.g. 0,0.1,1,10.")
  flags.DEFINE_string("rhos", "", "Fig. 5 sweep, e.g. 0,0.005,0.05.")
  flags.DEFINE_integer("sweep_seeds", -1, "Seeds of the sweeps' points and the extra rows "
                       "(default: --seeds).")
  flags.DEFINE_string("extra_rows", "", "Extra rows: alpha0_cewarm (alpha 0 in the warm "
                      "start too), other_reduction (lns with the other reduction of Eq. 15).")
  flags.DEFINE_string("variants", "", "Run only these rows of the plan, e.g. "
                      "lns_alpha0.1,lns_rho0 (the report covers every finished run).")
  flags.DEFINE_bool("dry_run", False, "Check every run's config and print the plan (each "
                    "run and its state, the epochs left); train and write nothing.")
  flags.DEFINE_string("baseline", "", "Reuse this pretrained baseline (a stage or final/ "
                      "folder) instead of pretraining one in WORKDIR/baseline.")
  flags.mark_flags_as_required(["config", "workdir"])
  from lns_jax import cli
  cli.run(main)  # app.run(main), with bad flags as one `error:` line, exit code 2
