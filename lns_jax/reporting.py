"""What a run reports: ``metrics.jsonl`` and its record schema, TensorBoard, the progress
bar, the results table.

``metrics.jsonl`` holds one JSON record per line, two kinds, both with ``stage``,
``kind``, ``step`` (the stage's step) and ``epoch`` (``step / steps_per_epoch``,
fractional between epoch ends):

``kind='train'`` (every ``log_every_steps`` and at each epoch end), means over the steps
since the last record: ``ce``, ``aux_total``, ``loss``, ``top1``, ``top5``, ``lr``,
``nonfinite``, ``aux/<layer>``, ``dead/<layer>``, ``dead_frac``, and ``images_per_sec``,
``input_wait_frac``.

``kind='epoch'`` (each epoch end): ``flip_rate_epoch``, ``flip_rate_init`` (Fig. 3c,
DECISIONS.md 5) and, on evaluation epochs, ``test_ce``, ``test_top1``, ``test_top5``,
``test_count`` (and ``val_*`` with a validation split).

:func:`train_record` and :func:`epoch_record` write them, :func:`read_metrics` and
:func:`curves` read them (``lns_jax.plots``, ``lns_jax.ablation``). Process 0 writes.
"""

from __future__ import annotations

import json
import logging
import math
import os
import sys
import time
from typing import Dict, List, Optional

import jax
import numpy as np

from lns_jax import parallel
from lns_jax import workdir as workdir_lib

TRAIN, EPOCH = "train", "epoch"  # the record kinds
# The per-epoch series a figure draws: Fig. 3 (b) and (c).
EPOCH_SERIES = ("test_top1", "val_top1", "flip_rate_epoch", "flip_rate_init")


def train_record(stage: str, step: int, epoch: float, means: Dict[str, float],
                 images_per_sec: float, input_wait_frac: float) -> dict:
  return {"stage": stage, "kind": TRAIN, "step": step, "epoch": epoch, **means,
          "images_per_sec": images_per_sec, "input_wait_frac": input_wait_frac}


def epoch_record(stage: str, step: int, epoch: float, flips, evals: Dict[str, dict]) -> dict:
  """``flips``: ``(since the previous epoch, since the start)``; ``evals``:
  ``{'test': evaluate(...), 'val': ...}`` on evaluation epochs, else ``{}``."""
  rec = {"stage": stage, "kind": EPOCH, "step": step, "epoch": epoch,
         "flip_rate_epoch": flips[0], "flip_rate_init": flips[1]}
  for prefix, ev in evals.items():
    rec.update({f"{prefix}_{k}": v for k, v in ev.items()})
  return rec


def read_metrics(workdir: str) -> List[dict]:
  """The records of ``workdir``'s ``metrics.jsonl``; a line cut by a kill is skipped."""
  path = workdir_lib.path(workdir, workdir_lib.METRICS)
  if not os.path.exists(path):
    raise FileNotFoundError(f"{path} does not exist: is {workdir} the --workdir of a run?")
  records = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          records.append(json.loads(line))
        except json.JSONDecodeError:
          pass  # a line cut by a kill: skip it, the rest is good
  return records


def curves(records: List[dict]) -> Dict[str, Dict[str, tuple]]:
  """``{stage: {series: (epochs, values)}}`` with the train ``ce`` and
  :data:`EPOCH_SERIES`; a resumed run's repeated steps keep the last."""
  out: Dict[str, Dict[str, dict]] = {}
  for r in records:
    stage = r.get("stage", "?")
    d = out.setdefault(stage, {"ce": {}, **{k: {} for k in EPOCH_SERIES}})
    if r.get("kind") == TRAIN:
      d["ce"][r["epoch"]] = r["ce"]
    elif r.get("kind") == EPOCH:
      for key in EPOCH_SERIES:
        if key in r:
          d[key][r["epoch"]] = r[key]
  return {s: {k: tuple(zip(*sorted(v.items()))) if v else ((), ()) for k, v in d.items()}
          for s, d in out.items()}


def epoch_records(workdir: str, stage: str, kind: str = EPOCH) -> List[dict]:
  """``stage``'s records of ``kind`` (epoch records by default, or :data:`TRAIN`) in step
  order (a resumed run's repeats: the last)."""
  by_step = {}
  for r in read_metrics(workdir):
    if r.get("stage") == stage and r.get("kind") == kind:
      by_step[r["step"]] = r
  return [by_step[k] for k in sorted(by_step)]


class Meter:
  """The train step metrics and timings since the last train record."""

  def __init__(self):
    self.pending, self.t_log, self.steps, self.wait = [], time.time(), 0, 0.0

  def add(self, metrics):
    self.pending.append(metrics)
    self.steps += 1

  def record(self, stage: str, step: int, steps_per_epoch: int, batch_size: int) -> dict:
    """The train record: the means of the steps' metrics, images/s, input wait share."""
    ms = jax.device_get(self.pending)
    mean = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
    dt = max(time.time() - self.t_log, 1e-9)
    return train_record(stage, step, step / steps_per_epoch, mean,
                        self.steps * batch_size / dt, self.wait / dt)


class Writer:
  """JSONL + TensorBoard, process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = parallel.is_main_process()
    self._tb = None
    if self.enabled:
      self._jsonl = open(workdir_lib.path(workdir, workdir_lib.METRICS), "a")
      try:
        from flax.metrics import tensorboard
        self._tb = tensorboard.SummaryWriter(workdir_lib.path(workdir, workdir_lib.TENSORBOARD))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard logging is off (%s).", e)

  def write(self, record: dict, step: Optional[int] = None):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None and step is not None:
      prefix = f"{record.get('stage', '')}/{record.get('kind', '')}"
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("step", "epoch"):
          self._tb.scalar(f"{prefix}/{k}", v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.flush()


class Progress:
  """A progress bar with ETA on a terminal; a line per epoch otherwise."""

  def __init__(self, stage, total_steps, start_step):
    self.stage, self.total, self.start = stage, total_steps, start_step
    self.t0 = time.time()
    self.tty = sys.stderr.isatty() and parallel.is_main_process()

  def update(self, step, info=""):
    if not self.tty:
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    sys.stderr.write(f"\r{self.stage:>8} [{bar}] {step}/{self.total} "
                     f"ETA {format_time(eta)} {info}   ")
    sys.stderr.flush()

  def line(self, text):
    if not parallel.is_main_process():
      return
    if self.tty:
      sys.stderr.write("\r" + " " * 100 + "\r")
    print(text, flush=True)


def format_time(s):
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


def epoch_line(stage: str, ep: float, step: int, total_steps: int, train: dict,
               rec: dict) -> str:
  """The line printed at each epoch end."""
  return (f"[{stage}] epoch {round(ep, 3):g} step {step}/{total_steps}: train ce "
          f"{train['ce']:.4f} top1 {train['top1']:.4f}"
          + (f" | test top1 {rec['test_top1']:.4f} top5 {rec['test_top5']:.4f}"
             if "test_top1" in rec else "")
          + f" | flips {rec['flip_rate_epoch']:.4f}/{rec['flip_rate_init']:.4f}"
          + f" | {train['images_per_sec']:.0f} img/s")


def results_table(results: Dict[str, dict]) -> str:
  """Table 1 style Markdown: each stage's final test (and validation) top-1/top-5."""
  has_val = any("validation" in r for r in results.values())
  head = "| stage | epochs | test top-1 | test top-5 |" + (" val top-1 | val top-5 |" if has_val else "")
  sep = "|---|---:|---:|---:|" + ("---:|---:|" if has_val else "")
  rows = [head, sep]
  for stage, r in results.items():
    row = (f"| {stage} | {r['epochs']:.2f} | {100 * r['test']['top1']:.2f}% | "
           f"{100 * r['test']['top5']:.2f}% |")
    if has_val:
      v = r.get("validation")
      row += (f" {100 * v['top1']:.2f}% | {100 * v['top5']:.2f}% |" if v else " - | - |")
    rows.append(row)
  return "\n".join(rows)


def write_summary(workdir: str, results: Dict[str, dict]) -> str:
  """``summary.json`` and ``results.md`` (process 0); returns the table, printed there."""
  table = results_table(results)
  if parallel.is_main_process():
    with open(workdir_lib.path(workdir, workdir_lib.SUMMARY), "w") as f:
      json.dump({"stages": results, "workdir": workdir}, f, indent=2)
    with open(workdir_lib.path(workdir, workdir_lib.RESULTS_TABLE), "w") as f:
      f.write(table + "\n")
    print("\n" + table, flush=True)
  return table
