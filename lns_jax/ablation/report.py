"""An ablation's results: each run's record, ``ablation.json``, Table 1 and its figures.

Reads finished runs' folders (their ``result.json`` and ``metrics.jsonl``); writes
``DIR/ablation.json`` (top-1 as fractions), ``DIR/ablation.md`` (Table 1, best (mean ±
sample std) over seeds as the paper reports it) and the figures (:mod:`lns_jax.plots`).
"""

from __future__ import annotations

import json
import os
from typing import List, Optional

import numpy as np

from lns_jax import reporting
from lns_jax import workdir as workdir_lib
from lns_jax.ablation.plan import BASELINE, FAILED, Run


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


def train_ce_tail(workdir: str, stage: str = "pretrain") -> dict:
  """How flat the stage's training cross-entropy ended: ``train_ce_final`` (the mean of
  the logged running means over its last epoch) and ``train_ce_last_quarter`` (the
  means over the first and the second half of its last quarter). Empty without records."""
  try:
    xs, ys = reporting.curves(reporting.read_metrics(workdir)).get(stage, {}).get(
        "ce", ((), ()))
  except FileNotFoundError:
    return {}
  if not xs:
    return {}
  xs, ys, end = np.asarray(xs), np.asarray(ys), float(xs[-1])
  mean = lambda lo, hi: float(ys[(xs > lo) & (xs <= hi)].mean())  # noqa: E731
  q = end / 4
  out = {"train_ce_final": mean(end - min(1.0, end), end)}
  if ((xs > end - q) & (xs <= end - q / 2)).any():
    out["train_ce_last_quarter"] = [mean(end - q, end - q / 2), mean(end - q / 2, end)]
  return out


def train_seconds(workdir: str, stage: str = "pretrain") -> Optional[float]:
  """Seconds the stage spent in its train steps: each logged interval's images over its
  measured images/s, summed (compiles, restarts and the time of an interval a kill cut
  are not counted; eval time inside an interval is). The machine's load is in it: a
  shared machine's intervals are slower. None without records."""
  try:
    records = [r for r in reporting.epoch_records(workdir, stage, reporting.TRAIN)
               if r.get("images_per_sec")]
    batch_size = workdir_lib.read_json(workdir_lib.path(workdir, workdir_lib.CONFIG))[
        "batch_size"]
  except (FileNotFoundError, KeyError):
    return None
  if not records:
    return None
  # A resumed run repeats the steps after its checkpoint: the last record of a step
  # stands, and an interval covers the steps since the previous step logged.
  steps = [0] + [r["step"] for r in records]
  return float(sum((s - prev) * batch_size / r["images_per_sec"]
                   for prev, s, r in zip(steps, steps[1:], records)))


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
    bdir = os.path.dirname(os.path.dirname(bres))
    out["baseline"].update(train_ce_tail(bdir))
    secs = train_seconds(bdir)
    if secs is not None:
      out["baseline"]["train_hours"] = secs / 3600
  for run in runs:
    out["variants"].setdefault(run.variant, [])
    rec = run_record(run, run.workdir(root))
    if rec is not None:
      rec.update(alpha=run.alpha, rho=run.rho, warmup_alpha=run.warmup_alpha,
                 reduction=run.reduction or None)
      out["variants"][run.variant].append(rec)
  return out


def mean_std(values, sign: str = "", one: str = "") -> str:
  """``'m ± s'`` in % (sample std) of the non-None fractions; ``'m' + one`` for one value,
  ``'-'`` for none. ``sign='+'`` writes the mean's sign (a gain)."""
  values = [v for v in values if v is not None]
  if not values:
    return "-"
  m = 100 * float(np.mean(values))
  if len(values) == 1:
    return f"{m:{sign}.2f}{one}"
  return f"{m:{sign}.2f} ± {100 * float(np.std(values, ddof=1)):.2f}"





def _best_mean_std(values) -> str:
  """The paper's "best (mean ± std)" over runs (Table 2), in %."""
  values = [v for v in values if v is not None]
  if len(values) < 2:
    return mean_std(values)
  return f"{100 * max(values):.2f} ({mean_std(values)})"


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
    row = ["baseline (pretrained)", "-", mean_std([b["test_top1"]])]
    if has_val:
      row += ["-", mean_std([b.get("val_top1")])]
    rows.append("| " + " | ".join(row) + " |")
  for name, all_recs in results["variants"].items():
    recs = [r for r in all_recs if "failed" not in r]
    failed = len(all_recs) - len(recs)
    row = [name, str(len(recs)), _best_mean_std([r["test_top1"] for r in recs])]
    if failed:
      row[1] += f" (+{failed} failed: non-finite)"
    if has_val:
      row += [mean_std([r.get("best_test_top1") for r in recs]),
              mean_std([r.get("val_top1") for r in recs])]
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
