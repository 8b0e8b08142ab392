"""The paper's Fig. 3 panels from a run's metrics: ``python -m lns_jax.plots --workdir=DIR``.

(a) training cross-entropy, (b) test top-1 accuracy, (c) flip rate of the binary
weights, each against the epoch, one curve per stage (or per run when several
workdirs are given: ``--workdir=A,B``). Writes ``fig3.png`` (and one PNG per panel)
into ``--out`` (default: the first workdir). The records are read with
:mod:`lns_jax.reporting`, which writes them and owns their schema.
"""

from __future__ import annotations

import os
import sys
from typing import Dict, List

import matplotlib

from lns_jax import workdir as workdir_lib
from lns_jax.reporting import curves, read_metrics

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402


PANELS = (("ce", "(a) train cross-entropy", "cross-entropy"),
          ("test_top1", "(b) test accuracy", "top-1"),
          ("flip_rate_epoch", "(c) flip rate", "flipped share of binary weights"))


def plot(workdirs: List[str], out_dir: str) -> List[str]:
  """Draws Fig. 3 (a-c); returns the PNG paths written."""
  runs = {os.path.basename(os.path.normpath(w)) or w: curves(read_metrics(w)) for w in workdirs}
  os.makedirs(out_dir, exist_ok=True)
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  written = []
  for ax, (key, title, ylabel) in zip(axes, PANELS):
    _panel(ax, runs, key, title, ylabel, several=len(runs) > 1)
    single, sax = plt.subplots(figsize=(5.5, 4))
    _panel(sax, runs, key, title, ylabel, several=len(runs) > 1)
    path = os.path.join(out_dir, f"fig3_{key}.png")
    single.tight_layout()
    single.savefig(path, dpi=120)
    plt.close(single)
    written.append(path)
  fig.tight_layout()
  path = os.path.join(out_dir, "fig3.png")
  fig.savefig(path, dpi=120)
  plt.close(fig)
  return [path] + written


def _panel(ax, runs, key, title, ylabel, several):
  for run, stages in runs.items():
    offset = 0.0
    for stage, d in stages.items():
      xs, ys = d[key]
      if xs:
        label = f"{run}: {stage}" if several else stage
        ax.plot([offset + x for x in xs], ys, label=label, marker="." if len(xs) < 30 else None)
        if key == "flip_rate_epoch" and d["flip_rate_init"][0]:
          xi, yi = d["flip_rate_init"]
          ax.plot([offset + x for x in xi], yi, linestyle="--", marker="x",
                  label=f"{label} (vs. start)")
      xs_all = [x for k in d for x in d[k][0]]
      offset += max(xs_all, default=0.0)
  _dress(ax, title, "epoch (stages one after another)", ylabel)


def _dress(ax, title, xlabel, ylabel):
  ax.set_title(title)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  if ax.has_data():
    ax.legend(fontsize=8)


def _stage_series(workdir: str, stage: str) -> Dict[str, tuple]:
  return curves(read_metrics(workdir)).get(stage, {})


def _mean_band(series: List[tuple]):
  """Mean and std over seeds at the x values every seed has."""
  import numpy as np
  common = sorted(set.intersection(*[set(xs) for xs, _ in series])) if series else []
  if not common:
    return [], [], []
  ys = np.array([[dict(zip(xs, v))[x] for x in common] for xs, v in series])
  return common, ys.mean(0), ys.std(0)


# The ablation's Fig. 3: the variants fine-tuning compares with, and the stage they end in.
FIG3_VARIANTS = (("finetune", "finetune", "fine-tuning"), ("lns_alpha0", "lns", "LNS, alpha = 0"),
                 ("lns", "lns", "LNS"))


def ablation_figures(root: str, runs, results: dict) -> List[str]:
  """Fig. 3 (a-c, mean with a std band over seeds, fine-tuning against LNS) and, with
  sweeps, Fig. 4 / 5 (final test top-1 against alpha / rho). Returns the PNG paths."""
  written = [_ablation_fig3(root, runs, results)]
  base = _baseline_figure(results.get("baseline_workdir") or os.path.join(root, "baseline"), root)
  if base:
    written.append(base)
  return written + sweep_figures(root, results)


def sweep_figures(root: str, results: dict) -> List[str]:
  """Fig. 4 and 5 from ``ablation.json``'s content, those whose sweep was run."""
  figs = [_sweep_figure(root, results, name, field, title) for name, field, title in
          (("fig4", "alpha", "Fig. 4: top-1 against alpha"),
           ("fig5", "rho", "Fig. 5: top-1 against rho"))]
  return [p for p in figs if p]


def _ablation_fig3(root: str, runs, results: dict) -> str:
  fig, axes = plt.subplots(1, 3, figsize=(15, 4))
  for ax, (key, title, ylabel) in zip(axes, PANELS):
    for variant, stage, label in FIG3_VARIANTS:
      series = []
      for run in runs:
        if run.variant != variant:
          continue
        wd = run.workdir(root)
        if (not os.path.exists(workdir_lib.path(wd, workdir_lib.METRICS))
            or os.path.exists(os.path.join(wd, "failed.json"))):
          continue
        xs, ys = _stage_series(wd, stage).get(key, ((), ()))
        if xs:
          series.append((xs, ys))
      x, m, sd = _mean_band(series)
      if len(x):
        seeds = f"{len(series)} seed{'s' if len(series) > 1 else ''}"
        ax.plot(x, m, label=f"{label} ({seeds})", marker="." if len(x) < 30 else None)
        ax.fill_between(x, m - sd, m + sd, alpha=0.2)
    if key == "test_top1" and results.get("baseline"):
      ax.axhline(results["baseline"]["test_top1"], color="gray", linestyle="--",
                 label="pretrained baseline")
    _dress(ax, title, "epoch of fine-tuning", ylabel)
  fig.tight_layout()
  path = os.path.join(root, "fig3.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def _baseline_figure(workdir: str, root: str):
  """The baseline's pretraining curves (train cross-entropy; validation and test top-1
  against the epoch): has it converged? ``None`` without its records."""
  if not os.path.exists(workdir_lib.path(workdir, workdir_lib.METRICS)):
    return None
  d = _stage_series(workdir, "pretrain")
  if not d or not d["ce"][0]:
    return None
  fig, (a, b) = plt.subplots(1, 2, figsize=(10, 4))
  a.plot(*d["ce"], label="train (running mean)")
  _dress(a, "baseline: train cross-entropy", "epoch of pretraining", "cross-entropy")
  for key, label in (("val_top1", "validation"), ("test_top1", "test")):
    if d.get(key, ((), ()))[0]:
      b.plot(*d[key], marker=".", label=label)
  _dress(b, "baseline: top-1", "epoch of pretraining", "top-1")
  fig.tight_layout()
  path = os.path.join(root, "baseline.png")
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def sweep_points(results: dict, field: str) -> Dict[float, List[float]]:
  """Fig. 4's (``field='alpha'``) or 5's (``'rho'``) points from ``ablation.json``'s
  content: ``{value: [final test top-1 of each seed]}``, the config's reading only (no
  fine-tuning, no ``_cewarm`` or other-reduction row, no failed run)."""
  points = {}
  for variant, recs in results["variants"].items():
    recs = [r for r in recs if "failed" not in r]
    # The sweeps' points: the config's reading of the warm start and the reduction.
    if (variant == "finetune" or not recs or variant.endswith("_cewarm")
        or recs[0].get("reduction")):
      continue
    if field == "rho" and variant.startswith("lns_alpha"):
      continue
    if field == "alpha" and variant.startswith("lns_rho"):
      continue
    points[recs[0][field]] = [r["test_top1"] for r in recs]
  return points


def _sweep_figure(root: str, results: dict, name: str, field: str, title: str):
  """Fig. 4 (``field='alpha'``) or 5 (``'rho'``); ``None`` when the sweep was not run."""
  import numpy as np
  points = sweep_points(results, field)
  if len(points) < 3:  # the sweep was not asked for
    return None
  xs = sorted(points)
  f, ax = plt.subplots(figsize=(5.5, 4))
  means = [100 * np.mean(points[x]) for x in xs]
  # The sample std over seeds, as Table 1 reports it (none for a 1-seed point).
  stds = [100 * np.std(points[x], ddof=1) if len(points[x]) > 1 else 0.0 for x in xs]
  ax.errorbar(range(len(xs)), means, yerr=stds, marker="o", capsize=3,
              label="LNS (± sample std where 2+ seeds)")
  if results["baseline"]:
    ax.axhline(100 * results["baseline"]["test_top1"], color="gray", linestyle="--",
               label="baseline")
  ax.set_xticks(range(len(xs)), [f"{x:g}" for x in xs])
  ax.set_xlabel(field)
  ax.set_ylabel("final test top-1 (%)")
  ax.set_title(title)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  f.tight_layout()
  path = os.path.join(root, f"{name}.png")
  f.savefig(path, dpi=110)
  plt.close(f)
  return path


def strength_figure(path: str, series: Dict[str, list]):
  """Each variant's gain over its baseline (final test top-1, points; mean and sample
  std over seeds) against the baseline's test top-1 (left) and its final training
  cross-entropy (right): does the gain shrink as the baseline gets better?
  ``series``: ``{variant: [(baseline top-1 %, baseline train CE or None, gain mean,
  gain std)]}`` (:func:`lns_jax.ablation.strength.figure_points`); ``None`` when empty."""
  if not series:
    return None
  fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
  for ax, x_index, xlabel in ((axes[0], 0, "baseline's test top-1 (%)"),
                              (axes[1], 1, "baseline's final train cross-entropy")):
    for variant, pts in series.items():
      pts = sorted(p for p in pts if p[x_index] is not None)
      if pts:
        ax.errorbar([p[x_index] for p in pts], [p[2] for p in pts], yerr=[p[3] for p in pts],
                    marker="o", capsize=3, label=variant)
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
    _dress(ax, "gain over the baseline", xlabel, "test top-1 gain (points)")
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path


def main(argv=None):
  import argparse
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--workdir", required=True, help="a run's workdir, or several, comma-separated")
  p.add_argument("--out", default=None, help="folder for the PNGs (default: the first workdir)")
  args = p.parse_args(argv)
  workdirs = [w for w in args.workdir.split(",") if w]
  try:
    paths = plot(workdirs, args.out or workdirs[0])
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  for path in paths:
    print(path)


if __name__ == "__main__":
  main()
