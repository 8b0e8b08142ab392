"""The numbers the README and docs/results.md publish for issue 30 ("Does LNS work?") and
issue 32 (LNS on a ReActNet) are those of the committed records
(results/fmnist_r20_strength/strength.json and results/fmnist_reactnet/, which each
results/*/run.sh copies from its workdir): a table typed by hand cannot go stale when more
seeds come in. Recomputed here with NumPy, not with lns_jax's report code, from each
run's record: final test top-1 (or test top-1 at the best-validation epoch, or the share
of signs changed) minus the baseline's, mean ± sample std over seeds."""

import json
import os
import re
import types

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


# Issue 32: LNS on a ReActNet-20 (results/fmnist_reactnet, which its run.sh copies from the
# workdir): the teacher's, step 1's and step 2's test top-1 (baseline_stages.md, the
# baseline's own stage table), each variant's records (ablation.json), the convergence
# checks (baseline_x2_stages.md, teacher_x2_stages.md) and the LCE flatbuffer
# (lns_alpha0_seed0_deploy.txt).
REACTNET = os.path.join(ROOT, "results", "fmnist_reactnet")
DOREFA = "adam24"  # the DoReFa ResNet-20 of the same size, converged, on the same split


def _stage_top1(name):
  """``{stage: (epochs, test top-1 in %)}`` of a committed stage table."""
  rows = {}
  for line in _read(os.path.join("results", "fmnist_reactnet", name)).splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if line.startswith("|") and len(cells) > 2 and re.fullmatch(r"[\d.]+%", cells[2]):
      rows[cells[0]] = (float(cells[1]), float(cells[2].rstrip("%")))
  return rows


def _reactnet_records(name):
  """The ablation's records (``None`` before run.sh copied them) and its finished rows'
  test top-1 per seed, in %."""
  path = os.path.join(REACTNET, name)
  if not os.path.exists(path):
    return None, {}
  with open(path) as f:
    res = json.load(f)
  return res, {v: xs for v, xs in _values(res, minus_baseline=False).items() if xs}


@pytest.fixture(scope="module")
def reactnet():
  """Issue 32's records, read once: the rows from step 2 (``res``, ``tops``) and from the
  check's step 2 (``again``, ``tops2``), the stage tables (``stages``; ``x2``, the checks'
  at twice the epochs, the baseline's and the teacher's, each absent before it ran) and
  the DoReFa baseline's test top-1."""
  res, tops = _reactnet_records("ablation.json")
  again, tops2 = _reactnet_records("ablation_from_x2.json")
  with open(os.path.join(RESULTS, "strength.json")) as f:
    dorefa = 100 * json.load(f)[DOREFA]["baseline"]["test_top1"]
  x2 = {}  # steps 1 and 2 from the baseline's check, the teacher from its own
  for name in ("baseline_x2_stages.md", "teacher_x2_stages.md"):
    if os.path.exists(os.path.join(REACTNET, name)):
      x2.update(_stage_top1(name))
  return types.SimpleNamespace(res=res, tops=tops, again=again, tops2=tops2, dorefa=dorefa,
                               stages=_stage_top1("baseline_stages.md"), x2=x2)


def test_readme_reactnet_table_is_the_records(reactnet):
  r = reactnet
  res, tops, stages, dorefa, x2, again, tops2 = (r.res, r.tops, r.stages, r.dorefa, r.x2,
                                                 r.again, r.tops2)
  rows = _rows(_read("README.md"), "| ReActNet-20 (`fashion_mnist_reactnet.py:val`")
  # the same run: ablation.json's baseline is step 2 (the stage table rounds to 0.01)
  assert 100 * res["baseline"]["test_top1"] == pytest.approx(stages["pretrain"][1], abs=5e-3)
  assert set(rows) == {"teacher", "step1", "pretrain"} | set(tops)
  for stage in ("teacher", "step1", "pretrain"):
    assert rows[stage]["test top-1"] == f"{stages[stage][1]:.2f}", stage
  assert rows["pretrain"][f"minus `{DOREFA}`"] == f"{stages['pretrain'][1] - dorefa:+.2f}"
  for v, xs in tops.items():
    assert rows[v]["test top-1"] == _cell(xs, fmt="{:.2f}", count=True), v
    assert rows[v]["minus step 2"] == _cell(_values(res)[v]), v
    assert rows[v][f"minus `{DOREFA}`"] == f"{np.mean(xs) - dorefa:+.2f}", v
  # At twice the epochs: the stages of the check, and the rows from its step 2.
  for stage in ("teacher", "step1", "pretrain"):
    want = f"{x2[stage][1]:.2f}" if stage in x2 else ""
    assert rows[stage]["at twice the epochs"] == want, stage
  if again:  # the same run: from_x2's baseline is the check's step 2
    assert 100 * again["baseline"]["test_top1"] == pytest.approx(x2["pretrain"][1], abs=5e-3)
  for v in tops:
    xs = tops2.get(v)
    assert rows[v]["at twice the epochs"] == (
        _cell(xs, fmt="{:.2f}", count=True) if xs else "-"), v
    assert rows[v]["minus its step 2"] == (_cell(_values(again)[v]) if xs else "-"), v


def _check_seed_table(text, header, res, tops):
  rows = _rows(text, header)
  assert set(rows) == set(tops)
  for v, xs in tops.items():
    assert rows[v]["test top-1 per seed"] == ", ".join(f"{x:.2f}" for x in xs), v
    assert rows[v]["minus step 2"] == _cell(_values(res)[v]), v
    assert rows[v]["at the best-val epoch, minus step 2"] == _cell(
        _values(res, "best_test_top1")[v]), v
    assert rows[v]["signs changed (%)"] == _cell(
        _values(res, "flip_rate_init", minus_baseline=False)[v], fmt="{:.2f}"), v


def test_results_md_reactnet_tables_are_the_records(reactnet):
  r = reactnet
  res, tops, stages, x2, again, tops2 = r.res, r.tops, r.stages, r.x2, r.again, r.tops2
  text = _read(os.path.join("docs", "results.md"))
  _check_seed_table(text, "| ReActNet-20 variant | test top-1 per seed |", res, tops)
  # The rows again from the check's step 2, once they ran.
  header = "| ReActNet-20 variant, from the 16 + 16 baseline | test top-1 per seed |"
  assert (header in text) == bool(tops2)
  if tops2:
    _check_seed_table(text, header, again, tops2)
  # The check of convergence: the same stages at twice the epochs.
  check = _rows(text, "| ReActNet-20 stage | epochs | test top-1 |")
  assert set(check) == set(stages)
  for stage, (epochs, top1) in stages.items():
    assert check[stage]["epochs"] == f"{epochs:g}", stage
    assert check[stage]["test top-1"] == f"{top1:.2f}", stage
    want = (f"{x2[stage][1]:.2f} ({x2[stage][0]:g} epochs)" if stage in x2 else "-")
    assert check[stage]["at twice the epochs"] == want, stage


def test_the_lce_flatbuffer_size_is_the_converted_one():
  """The size the docs give is the one run.sh's conversion printed; none before it ran."""
  path = os.path.join(REACTNET, "lns_alpha0_seed0_deploy.txt")
  size = (re.search(r"flatbuffer:\s+([\d,]+) bytes", _read(path)).group(1)
          if os.path.exists(path) else None)
  for doc in ("README.md", os.path.join("docs", "results.md")):
    stated = re.findall(r"ReActNet-20's LCE flatbuffer: ([\d,]+) bytes", _read(doc))
    assert stated == ([size] if size else []), doc


def test_the_lce_agreement_is_the_benchmarks():
  """How many test images LCE's interpreter classifies as lns_jax.inference does: the
  figure benchmarks/deploy.py printed (committed beside the conversion); none before."""
  path = os.path.join(REACTNET, "lns_alpha0_seed0_deploy_bench.txt")
  agree = None
  if os.path.exists(path):
    differ, total = map(int, re.search(r"\| LCE interpreter \| (\d+) of (\d+) \|",
                                       _read(path)).groups())
    agree = (f"{total - differ:,}", f"{total:,}")
  for doc in ("README.md", os.path.join("docs", "results.md")):
    stated = re.findall(r"top-1 class on ([\d,]+) of the ([\d,]+) test images", _read(doc))
    assert stated == ([agree] if agree else []), doc


def test_the_reactnet_seed_counts_the_readme_states(reactnet):
  """"Still running" until every row has 3 seeds from each baseline and both checks
  (the baseline's and the teacher's) ran."""
  again = reactnet.again
  counts = [len(xs) for r in (reactnet.res, again) if r for xs in _values(r).values()]
  done = again and min(counts) >= 3 and {"teacher", "step1", "pretrain"} <= set(reactnet.x2)
  assert ("Still running (issue 32)" in _read("README.md")) != bool(done)
