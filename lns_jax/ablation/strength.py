"""Table 1 from baselines of several strengths: does LNS's gain shrink as the baseline
gets better? (``python -m lns_jax.ablation ... --baselines=sgd12,sgd48,adam12``).

Each name is one of ``config.baselines``' pretraining recipes; its ablation is an
ordinary one in ``DIR/<name>`` (the baseline in ``DIR/<name>/baseline``, its runs
beside it) with the same fine-tuning stages whatever the baseline. Every baseline's
ablation is checked before any trains; then they run in the order given, each resumable.
``DIR/strength.json`` holds every baseline's ``ablation.json`` content and recipe;
``DIR/strength.md`` one table (each variant's gain over its baseline, mean ± sample
std over seeds) and ``DIR/strength.png`` the gain against the baseline's test top-1 and
its final training cross-entropy.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List, Optional, Sequence

import numpy as np

from lns_jax.ablation.plan import AblationError, baseline_names, with_baseline
from lns_jax.ablation.report import mean_std
from lns_jax.ablation.runner import Ablation, _duration, _print_plan


def prepare(config, workdir: str, names: Sequence[str], seeds: int,
            **kwargs) -> Dict[str, Ablation]:
  """``{name: its Ablation}``, every one checked (configs, folders) before any trains."""
  if len(set(names)) != len(names):
    raise AblationError(f"--baselines={','.join(names)}: a name is given twice.")
  root = os.path.abspath(os.path.expanduser(workdir))
  return {name: Ablation.prepare(with_baseline(config, name), os.path.join(root, name),
                                 seeds, **kwargs) for name in names}


def run_strength(config, workdir: str, names: Sequence[str], seeds: int, *, alphas=(),
                 rhos=(), extra_rows=(), sweep_seeds=None, variants=(), config_arg="",
                 dry_run=False, report_only=False, log=print, stop_at=None) -> dict:
  """Runs (or resumes) the ablation from each named baseline, in order; returns
  ``strength.json``'s content, or ``{'interrupted': True, ...}`` when a run was stopped
  (``stop_at=(baseline name, variant, seed, stage, step)``, tests). ``report_only``
  (``--report_only``) writes the report of what is finished and trains nothing."""
  import time

  from lns_jax import workdir as workdir_lib
  abls = prepare(config, workdir, names, seeds, alphas=alphas, rhos=rhos,
                 extra_rows=extra_rows, sweep_seeds=sweep_seeds, variants=variants,
                 config_arg=config_arg, load_baseline=not dry_run)
  root = os.path.abspath(os.path.expanduser(workdir))
  # The report covers every baseline of the config with a folder in DIR, not only these.
  others = [n for n in baseline_names(config) if n not in abls and os.path.isdir(
      os.path.join(root, n))]
  reported = {**abls, **prepare(config, root, others, seeds, alphas=alphas, rhos=rhos,
                                extra_rows=extra_rows, sweep_seeds=sweep_seeds,
                                load_baseline=False)}
  if dry_run:
    for name, ab in abls.items():
      log(f"[ablation] baseline {name}: {_recipe_text(ab.config)}")
      _print_plan(ab.config, ab.root, ab.todo, "", ab.base_dir, log)
    return {"dry_run": True}
  os.makedirs(root, exist_ok=True)
  t0, done = time.time(), [0.0]
  left0 = sum(ab.epochs_left() for ab in abls.values())

  def eta(d):  # over every baseline's ablation, not only the current one's
    total = done[0] + d
    return ("ETA after the first run" if total <= 0 else
            f"ETA {_duration((time.time() - t0) / total * (left0 - total))}")

  # One handler over every baseline's ablation (theirs share it), so a signal in one's
  # last run stops the next before it trains.
  with workdir_lib.Preemption():
    for name, ab in abls.items():
      if report_only:  # each baseline's own Table 1 and figures, refreshed
        if os.path.isdir(ab.root):
          ab.report()
        continue
      before = ab.epochs_left()
      stop = stop_at[1:] if stop_at and stop_at[0] == name else None
      out = ab.run(log, stop, eta=eta)
      if out.get("interrupted"):
        return out | {"run": f"{name}/{out['run']}"}
      ab.report()
      done[0] += before
      write_report(root, reported, config_arg)
  summary = write_report(root, reported, config_arg)
  log("\n" + summary["table"])
  log(f"[ablation] done: {os.path.join(root, 'strength.md')}")
  return summary["results"]


def _recipe_text(config) -> str:
  p = config.pretrain
  opt = p.optimizer or config.optimizer
  sched = p.schedule + (f" x{p.decay_factor:g} at {', '.join(f'{e:g}' for e in p.decay_epochs)}"
                        if p.schedule == "piecewise" and p.decay_epochs else "")
  return f"{opt} lr {p.lr:g}, {p.epochs:g} epochs, {sched}, batch {config.batch_size}"


def collect(root: str, abls: Dict[str, Ablation]) -> dict:
  """``strength.json``'s content: per baseline its recipe and its ablation's results."""
  from lns_jax.ablation.report import collect as collect_one
  out = {}
  for name, ab in abls.items():
    res = collect_one(ab.root, ab.runs, ab.baseline)
    res["recipe"] = _recipe_text(ab.config)
    res["pretrain"] = json.loads(ab.config.pretrain.to_json_best_effort())
    out[name] = res
  # Rows from the weakest baseline to the strongest (those without a result last).
  order = sorted(out, key=lambda n: out[n]["baseline"].get("test_top1", 2.0))
  return {n: out[n] for n in order}


def gains(results: dict, key: str = "test_top1",
          base_key: Optional[str] = None) -> Dict[str, List[float]]:
  """``{variant: [its runs' key - the baseline's base_key (default: key)]}`` (finished
  runs; fractions)."""
  base = results.get("baseline", {}).get(base_key or key)
  if base is None:
    return {}
  return {v: [r[key] - base for r in recs if key in r and "failed" not in r]
          for v, recs in results["variants"].items()}


def figure_points(strength: dict) -> Dict[str, list]:
  """``{variant: [(baseline test top-1 %, baseline final train CE, gain mean, gain
  sample std)]}`` in points, one per baseline with a finished run of the variant."""
  series: Dict[str, list] = {}
  for res in strength.values():
    b = res.get("baseline", {})
    for variant, g in gains(res).items():
      if g:
        series.setdefault(variant, []).append(
            (100 * b["test_top1"], b.get("train_ce_final"), 100 * float(np.mean(g)),
             100 * float(np.std(g, ddof=1)) if len(g) > 1 else 0.0))
  return series


def _variants(strength: dict) -> List[str]:
  """Every variant of any baseline, in the order the plans first name them."""
  return list(dict.fromkeys(v for res in strength.values() for v in res["variants"]))


def _pm(values: List[float]) -> str:
  return mean_std(values, sign="+", one=" (1 seed)")


def table(strength: dict) -> str:
  """One row per baseline: its recipe, its train steps' time, test/val top-1, final train
  cross-entropy and its means over the two halves of the last quarter (flat when
  converged), and each variant's test top-1 gain over it in points (mean ± sample std
  over seeds)."""
  variants = _variants(strength)
  head = ["baseline", "recipe", "train time", "test top-1", "val top-1", "train CE (end)",
          "train CE, last quarter", *variants]
  rows = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
  for name, res in strength.items():
    b = res.get("baseline", {})
    pct = lambda k: f"{100 * b[k]:.2f}" if k in b else "-"  # noqa: E731
    ce = f"{b['train_ce_final']:.3f}" if "train_ce_final" in b else "-"
    quarter = ("{:.3f} → {:.3f}".format(*b["train_ce_last_quarter"])
               if "train_ce_last_quarter" in b else "-")
    hours = f"{b['train_hours']:.1f} h" if "train_hours" in b else "-"
    g = gains(res)
    rows.append("| " + " | ".join([name, res.get("recipe", ""), hours, pct("test_top1"),
                                    pct("val_top1"), ce, quarter] +
                                   [_pm(g.get(v, [])) for v in variants]) + " |")
  return "\n".join(rows)


def _per_variant_table(strength: dict, cells) -> str:
  """One row per baseline: its test top-1, then ``cells(its record)[variant]`` per variant
  (``-`` where missing)."""
  variants = _variants(strength)
  rows = ["| baseline | test top-1 | " + " | ".join(variants) + " |",
          "|---|---:|" + "---:|" * len(variants)]
  for name, res in strength.items():
    b = res.get("baseline", {})
    top1 = f"{100 * b['test_top1']:.2f}" if "test_top1" in b else "-"
    row = cells(res)
    rows.append("| " + " | ".join([name, top1, *(row.get(v, "-") for v in variants)]) + " |")
  return "\n".join(rows)


def best_val_table(strength: dict) -> str:
  """Each variant's gain measured at the epoch of its best validation top-1
  (``best_test_top1``: chooses nothing on the test split), in points, mean ± sample std
  over seeds. A run's last evaluation can sit a point or two off its neighbours (issue 30's
  sgd12, lns_alpha0 seed 2: -0.05 final, +1.82 here), so the final-epoch table is read
  beside this one."""
  return _per_variant_table(strength, lambda res: {
      v: _pm(g) for v, g in gains(res, "best_test_top1", base_key="test_top1").items()})


def signs_table(strength: dict) -> str:
  """Per variant, the share of the binary weights whose sign at the run's end differs from
  sign(W) at its last stage's start (the run's ``flip_rate_init``: from the baseline's
  signs, but for LNS rows from the warm-started W, which moves as little as fine-tuning
  moves it), in %, mean ± sample std over seeds. Fig. 3c's measure, for what a variant
  changed as against what it gained."""
  return _per_variant_table(strength, lambda res: {
      v: mean_std([r.get("flip_rate_init") for r in recs if "failed" not in r])
      for v, recs in res["variants"].items()})


def _doubled(short: dict, long: dict) -> bool:
  """Whether pretraining recipe ``long`` is ``short`` at twice the epochs (its decay
  points scaled), everything else the same."""
  scaled = {"epochs", "decay_epochs"}
  if set(short) != set(long) or any(short[k] != long[k] for k in set(short) - scaled):
    return False
  twice = lambda v: [2 * x for x in v] if isinstance(v, list) else 2 * v  # noqa: E731
  return all(long.get(k) == twice(short[k]) for k in scaled & set(short)
             if short[k] is not None)


def convergence(strength: dict) -> List[str]:
  """Issue 30's check of convergence, one line per baseline whose recipe at twice the
  epochs is also in the workdir (both pretrained): its test top-1 against that recipe's
  (converged when within 1 point) and its training cross-entropy over the two halves of
  its last quarter (flat when converged)."""
  lines = []
  for name, res in strength.items():
    b = res.get("baseline", {})
    for other, res2 in strength.items():
      b2 = res2.get("baseline", {})
      if (other == name or "test_top1" not in b or "test_top1" not in b2 or
          not _doubled(res.get("pretrain", {}), res2.get("pretrain", {}))):
        continue
      diff = 100 * (b2["test_top1"] - b["test_top1"])
      ce = b.get("train_ce_last_quarter")
      flat = (f"; its train CE over the last quarter {ce[0]:.3f} → {ce[1]:.3f} "
              f"({100 * (ce[1] - ce[0]) / ce[0]:+.1f}%)" if ce else "")
      lines.append(f"- `{name}` against `{other}` (its recipe at twice the epochs): test top-1 "
                   f"{100 * b['test_top1']:.2f} → {100 * b2['test_top1']:.2f} ({diff:+.2f}), "
                   f"{'within' if abs(diff) <= 1 else 'not within'} 1 point{flat}.")
  return lines


def write_report(root: str, abls: Dict[str, Ablation], config_arg: str = "") -> dict:
  """Writes ``strength.json``, ``strength.md`` and ``strength.png``."""
  from lns_jax import parallel, plots
  from lns_jax import workdir as workdir_lib
  strength = collect(root, abls)
  tab = table(strength)
  if parallel.is_main_process():
    workdir_lib.write_json_atomic(os.path.join(root, "strength.json"), strength)
    fig = plots.strength_figure(os.path.join(root, "strength.png"),
                                figure_points(strength))
    lines = ["# LNS against how far the baseline was trained", "",
             f"Config: `{config_arg}`; each variant's final test top-1 minus its baseline's, "
             f"in points, mean ± sample std over seeds; finished runs only. Each baseline's "
             f"full Table 1: `<name>/ablation.md`.", "", tab, ""]
    if fig:
      lines += [f"![{os.path.basename(fig)}]({os.path.basename(fig)})", ""]
    lines += ["The same gains measured at each run's epoch of best validation top-1 (the test "
              "top-1 there, which chooses nothing on the test split), in points:", "",
              best_val_table(strength), ""]
    lines += ["Signs changed: the share of the binary weights whose sign at the end differs "
              "from sign(W) at the last stage's start, in %, mean ± sample std over seeds:",
              "", signs_table(strength), ""]
    check = convergence(strength)
    if check:
      lines += ["Convergence (a baseline is converged when the same recipe at twice the "
                "epochs gains at most 1 point and its training cross-entropy is flat):", "",
                *check, ""]
    with open(os.path.join(root, "strength.md"), "w") as f:
      f.write("\n".join(lines))
  return {"results": strength, "table": tab}
