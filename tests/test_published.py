"""The numbers the README and docs/results.md publish for issue 30 ("Does LNS work?") are
those of the committed records (results/fmnist_r20_strength/strength.json, which
results/fmnist_r20_strength/run.sh copies from the workdir): a table typed by hand cannot
go stale when more seeds come in. Recomputed here with NumPy, not with lns_jax's report
code, from each run's record: final test top-1 (or test top-1 at the best-validation
epoch, or the share of signs changed) minus the baseline's, mean ± sample std over seeds."""

import json
import os
import re

import numpy as np
import pytest

from lns_testutil import ROOT

RESULTS = os.path.join(ROOT, "results", "fmnist_r20_strength")
BASELINES = {"sgd12", "sgd24", "adam24"}  # the rows the README and docs publish


@pytest.fixture(scope="module")
def records():
  with open(os.path.join(RESULTS, "strength.json")) as f:
    return json.load(f)


def _values(res, key="test_top1", minus_baseline=True):
  base = res["baseline"]["test_top1"] if minus_baseline else 0.0
  return {v: [100 * (r[key] - base) for r in runs if "failed" not in r and key in r]
          for v, runs in res["variants"].items()}


def _cell(xs, fmt="{:+.2f}", count=False, seeds=False):
  s = fmt.format(np.mean(xs))
  if len(xs) > 1:
    s += f" ± {np.std(xs, ddof=1):.2f}"
  if count:
    s += f" ({len(xs)})"
  if seeds:
    s += " (" + ", ".join(fmt.format(x) for x in xs) + ")"
  return s


def _rows(text, header_start):
  """``{baseline: [cells]}`` of the markdown table whose header starts ``header_start``
  (rows keyed by the first backticked name in their first cell)."""
  lines = text.splitlines()
  i = next(i for i, l in enumerate(lines) if l.startswith(header_start))
  head = [c.strip() for c in lines[i].strip("|").split("|")]
  out = {}
  for line in lines[i + 2:]:
    if not line.startswith("|"):
      break
    cells = [c.strip().strip("*") for c in line.strip().strip("|").split("|")]
    out[re.search(r"`(\w+)`", cells[0]).group(1)] = dict(zip(head, cells))
  assert out, header_start
  return out


def _read(name):
  with open(os.path.join(ROOT, name)) as f:
    return f.read()


def test_readme_gain_table_is_the_records(records):
  rows = _rows(_read("README.md"), "| baseline (`:paper,val`, batch 128)")
  assert set(rows) == BASELINES
  for name, row in rows.items():
    res = records[name]
    assert row["test top-1"] == f"{100 * res['baseline']['test_top1']:.2f}", name
    for v, xs in _values(res).items():
      assert row[v] == _cell(xs, count=True), (name, v)


def test_results_md_tables_are_the_records(records):
  text = _read(os.path.join("docs", "results.md"))
  gains = _rows(text, "| baseline | test | finetune |")
  signs = _rows(text, "| baseline | finetune | lns_alpha0 |")
  assert set(gains) == set(signs) == BASELINES
  for name in gains:
    res = records[name]
    assert gains[name]["test"] == f"{100 * res['baseline']['test_top1']:.2f}", name
    for v, xs in _values(res).items():
      assert gains[name][v] == _cell(xs, seeds=True), (name, v)
    for v, xs in _values(res, "flip_rate_init", minus_baseline=False).items():
      assert signs[name][v] == _cell(xs, fmt="{:.2f}", count=True), (name, v)


def test_the_seed_counts_the_readme_states(records):
  """The README says how many seeds each row has; the records agree, and a row still short
  of 3 seeds is named as running."""
  readme = _read("README.md")
  short = [n for n in sorted(BASELINES)
           if any(len(xs) < 3 for xs in _values(records[n]).values())]
  for name in short:
    assert f"Still running (issue 30): seeds 1-2 of `{name}`" in readme, name
  if not short:
    assert "Still running (issue 30)" not in readme
