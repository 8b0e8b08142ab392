"""Running an ablation: the baseline, then every planned run, resumable; ``--dry_run``.

Every run is a ``train.py`` workdir (``DIR/<variant>/seed<k>``): a finished run is not
repeated, an interrupted one resumes from its newest checkpoint, a run that went
non-finite is recorded as failed (``failed.json``) and the ablation goes on.
"""

from __future__ import annotations

import os
import time

from lns_jax.ablation.plan import (BASELINE, FAILED, AblationError, Run, baseline_config,
                                   baseline_epochs, check_baseline_dir, check_run_dir, plan,
                                   run_config, select)
from lns_jax.ablation.report import collect, write_report

# Relative cost of an epoch, for the ETA: the mapping networks make LNS steps dearer.
_COST = {"pretrain": 1.0, "finetune": 1.0, "warmup": 1.2, "lns": 1.2, "teacher": 1.0,
         "step1": 1.0}


def _run_cost(config, run: Run) -> float:
  """The run's epochs, an LNS epoch counted as ``_COST['lns']`` (the ETA's unit)."""
  if run.stages == "finetune":
    return float(run_config(config, run, "").finetune.epochs) * _COST["finetune"]
  return sum(float(config[s].epochs) * _COST[s] for s in run.stages.split(","))


def _finished(workdir: str, stages: str) -> bool:
  """Done: its last stage's result, or a recorded failure (a rerun would fail alike)."""
  return (os.path.exists(os.path.join(workdir, stages.split(",")[-1], "result.json"))
          or os.path.exists(os.path.join(workdir, FAILED)))


class Ablation:
  """One ablation in one folder: its plan, its baseline, the runs still to do.

  Built by :meth:`prepare`, which checks every run's config and the baseline before
  anything is written (``python -m lns_jax.ablation --baselines`` prepares every
  baseline's ablation before it trains any).
  """

  def __init__(self, config, workdir, runs, todo, baseline, config_arg=""):
    self.config, self.runs, self.todo, self.baseline = config, runs, todo, baseline
    self.root = os.path.abspath(os.path.expanduser(workdir))
    self.base_dir = os.path.join(self.root, BASELINE)
    self.baseline_final = baseline or os.path.join(self.base_dir, "pretrain", "final")
    stage_dir = os.path.normpath(self.baseline_final)
    if os.path.basename(stage_dir) == "final":
      stage_dir = os.path.dirname(stage_dir)
    self.extra = {"config_arg": config_arg, "seeds": max([r.seed for r in runs], default=0) + 1,
                  "baseline_checkpoint": self.baseline_final,
                  "baseline_workdir": os.path.dirname(stage_dir)}

  @classmethod
  def prepare(cls, config, workdir: str, seeds: int, alphas=(), rhos=(), baseline: str = "",
              *, extra_rows=(), sweep_seeds=None, variants=(), config_arg: str = "",
              load_baseline: bool = True) -> "Ablation":
    runs = plan(config, seeds, alphas, rhos, extra_rows, sweep_seeds)
    ab = cls(config, workdir, runs, select(runs, variants), baseline, config_arg)
    _check_before_writing(config, runs, baseline_config(config), baseline,
                          ab.baseline_final, ab.base_dir, load_baseline=load_baseline)
    return ab

  def needs_baseline(self) -> bool:
    return not self.baseline and not _finished(self.base_dir, "pretrain")

  def epochs_left(self) -> float:
    left = sum(_run_cost(self.config, r) for r in self.todo
               if not _finished(r.workdir(self.root), r.stages))
    return left + (baseline_epochs(self.config) if self.needs_baseline() else 0.0)

  def report(self) -> str:
    from lns_jax import parallel
    if parallel.is_main_process():
      return write_report(self.root, self.runs, self.config, self.extra, self.baseline)
    return ""

  def run(self, log=print, stop_at=None, eta=None) -> dict:
    """Trains what is left; ``{'interrupted': True, ...}`` when a run was stopped.
    ``eta(done_epochs)`` is the ETA's text after that much work (default: this one's)."""
    from lns_jax import workdir as workdir_lib
    # One handler over every run (each run's trainer shares it): a signal that reaches a
    # run after its last step, in its final evaluation or between runs, stops the
    # ablation before the next run instead of being lost with that run's handler.
    with workdir_lib.Preemption() as preempt:
      return self._run(log, stop_at, eta, preempt)

  def _run(self, log, stop_at, eta, preempt) -> dict:
    from lns_jax import parallel, trainer
    t0, done = time.time(), [0.0]
    eta = eta or (lambda d: _eta(t0, d, self.epochs_left()))
    todo = len(self.todo)

    def stopped(before):  # a collective: every process checks at the same point
      if parallel.any_process(preempt.signal is not None):
        return {"interrupted": True, "run": before, "signal": preempt.signal, "before": True}

    if self.needs_baseline():
      if out := stopped(BASELINE):
        return out
      log(f"[ablation] run 0/{todo}: baseline ({baseline_config(self.config).stages}, "
          f"{baseline_epochs(self.config):g} epochs) in {self.base_dir}; {eta(0.0)}")
      res = trainer.train(baseline_config(self.config), self.base_dir,
                          stop_at=_stop(stop_at, BASELINE, None))
      if any(r.get("interrupted") for r in res.values()):
        return {"interrupted": True, "run": BASELINE, "signal": _signal(res)}
      done[0] += baseline_epochs(self.config)
    for i, run in enumerate(self.todo, 1):
      wd = run.workdir(self.root)
      if _finished(wd, run.stages):
        continue
      if out := stopped(f"{run.variant}/seed{run.seed}"):
        return out
      log(f"[ablation] run {i}/{todo}: {run.variant} seed {run.seed} ({run.describe()}) "
          f"in {wd}; {eta(done[0])}")
      out = self._train(run, wd, log, stop_at)
      if out is not None:
        return out
      done[0] += _run_cost(self.config, run)
      self.report()
    return collect(self.root, self.runs, self.baseline)

  def _train(self, run: Run, wd: str, log, stop_at):
    from lns_jax import parallel, trainer
    try:
      res = trainer.train(run_config(self.config, run, self.baseline_final), wd,
                          stop_at=_stop(stop_at, run.variant, run.seed))
    except trainer.NonFiniteError as e:
      # A divergence is a result of the row (e.g. Eq. 17's sum with SGD); the rest runs.
      log(f"[ablation] {run.variant} seed {run.seed} failed: {e}")
      if parallel.is_main_process():
        from lns_jax import workdir as workdir_lib
        workdir_lib.write_json_atomic(os.path.join(wd, FAILED), {"error": str(e)})
      return None
    if any(r.get("interrupted") for r in res.values()):
      return {"interrupted": True, "run": f"{run.variant}/seed{run.seed}",
              "signal": _signal(res)}
    return None


def _eta(t0: float, done: float, left: float) -> str:
  if done <= 0:
    return "ETA after the first run"
  return f"ETA {_duration((time.time() - t0) / done * left)}"


def run_ablation(config, workdir: str, seeds: int, alphas=(), rhos=(),
                 baseline: str = "", *, extra_rows=(), sweep_seeds=None, variants=(),
                 config_arg: str = "", dry_run: bool = False, report_only: bool = False,
                 log=print, stop_at=None) -> dict:
  """Runs (or resumes) the whole ablation; returns ``ablation.json``'s content.

  ``dry_run`` (``--dry_run``) checks every run's config and prints the plan (each run,
  its state in ``workdir``, the epochs left) without training or writing anything.

  ``variants`` (``--variants``) runs only those rows of the plan (e.g. one sweep's
  points); the report still covers every planned run finished in ``workdir``.
  ``report_only`` (``--report_only``) writes the report of what is finished, trains nothing.

  ``stop_at=(variant, seed, stage, step)`` interrupts one run as a preemption would
  (tests). Returns ``{'interrupted': True, ...}`` when a run was stopped.
  """
  ab = Ablation.prepare(config, workdir, seeds, alphas, rhos, baseline,
                        extra_rows=extra_rows, sweep_seeds=sweep_seeds, variants=variants,
                        config_arg=config_arg, load_baseline=not dry_run)
  if dry_run:
    return _print_plan(config, ab.root, ab.todo, baseline, ab.base_dir, log)
  os.makedirs(ab.root, exist_ok=True)
  out = collect(ab.root, ab.runs, baseline) if report_only else ab.run(log, stop_at)
  if out.get("interrupted"):
    return out
  table = ab.report()
  if table:
    log("\n" + table)
    log(f"[ablation] done: {os.path.join(ab.root, 'ablation.md')}")
  return out


def _state(workdir: str, stages: str) -> str:
  if os.path.exists(os.path.join(workdir, FAILED)):
    return "failed"
  if _finished(workdir, stages):
    return "done"
  return "started" if os.path.exists(workdir) else "to run"


def _print_plan(config, root, todo, baseline, base_dir, log) -> dict:
  """``--dry_run``: one line per run and the epochs left; nothing is written."""
  rows = []
  if baseline:
    rows.append(("baseline", "-", "reused", baseline, "found" if os.path.exists(baseline)
                 else "missing", 0.0))
  else:
    state = _state(base_dir, "pretrain")
    rows.append(("baseline", "-", f"{baseline_config(config).stages}, "
                 f"{baseline_epochs(config):g} epochs", base_dir, state,
                 0.0 if state == "done" else baseline_epochs(config)))
  for r in todo:
    wd = r.workdir(root)
    state = _state(wd, r.stages)
    desc = r.describe()
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
