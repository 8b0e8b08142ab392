"""What an ablation runs: its rows (variants x seeds), each run's config, the baselines.

Pure bookkeeping on configs and folders: nothing here trains. A :class:`Run` is one row
and seed; :func:`plan` lists them, :func:`run_config` turns one into the config that
``train.py`` would run, :func:`with_baseline` gives the config of one of
``config.baselines``' pretraining recipes (``--baselines``), and the checks refuse a
folder made by another config before anything is written.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
from typing import List, Optional, Sequence

BASELINE = "baseline"
# Fields that make two baselines the same baseline (a reused DIR/baseline must match).
BASELINE_FIELDS = ("seed", "model", "data", "batch_size", "optimizer", "momentum",
                   "weight_decay", "pretrain", "teacher", "step1", "distill")
# The rows --extra_rows adds. The two fine-tuning controls (issue 30): finetune_lr10x
# starts from 10x the LNS stage's lr (same schedule); finetune_matched runs as many
# epochs as the warm start and the LNS stage together, the LNS runs' lr trajectory
# (warmup's constant lr, then the LNS stage's schedule shifted by the warm start).
EXTRA_ROWS = ("alpha0_cewarm", "other_reduction", "finetune_lr10x", "finetune_matched")
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
  lr_scale: float = 1.0                 # fine-tuning controls: x the LNS stage's lr
  matched: bool = False                 # fine-tuning as long as warmup + lns

  def workdir(self, root: str) -> str:
    return os.path.join(root, self.variant, f"seed{self.seed}")

  @property
  def last_stage(self) -> str:
    return self.stages.split(",")[-1]

  def describe(self) -> str:
    """``'warmup,lns, alpha 1, rho 0.005, warm start alpha 1'``: the run's log line."""
    return (f"{self.stages}, alpha {self.alpha:g}, rho {self.rho}"
            + (f", warm start alpha {self.warmup_alpha:g}" if self.warmup_alpha is not None
               else "")
            + (f", reduction {self.reduction}" if self.reduction else "")
            + (f", lr x{self.lr_scale:g}" if self.lr_scale != 1 else "")
            + (", as long as warmup + lns" if self.matched else ""))


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
  finetune = lambda **kw: dict(stages="finetune", alpha=0.0, rho=rho, **kw)
  variants = {"finetune": finetune(), "lns_alpha0": lns(0.0, rho), "lns": lns(alpha, rho)}
  sweep = set()
  for a in alphas:
    if a != alpha and a != 0:
      variants[f"lns_alpha{_fmt(a)}"] = lns(float(a), rho)
      sweep.add(f"lns_alpha{_fmt(a)}")
  for r in rhos:
    if r != rho:
      variants[f"lns_rho{_fmt(r)}"] = lns(alpha, float(r))
      sweep.add(f"lns_rho{_fmt(r)}")
  extra = {"alpha0_cewarm": ("lns_alpha0_cewarm", lns(0.0, rho) | {"warmup_alpha": 0.0}),
           "finetune_lr10x": ("finetune_lr10x", finetune(lr_scale=10.0)),
           "finetune_matched": ("finetune_matched", finetune(matched=True))}
  other = "sum" if config.reduction == "mean" else "mean"
  extra["other_reduction"] = (f"lns_{other}", lns(alpha, rho, reduction=other))
  for row in EXTRA_ROWS:  # in a fixed order, whatever the flag's
    if row in extra_rows:
      name, spec = extra[row]
      variants[name] = spec
      sweep.add(name)
  return [Run(v, s, **spec) for s in range(seeds) for v, spec in variants.items()
          if v not in sweep or s < sweep_seeds]


def select(runs: List[Run], variants: Sequence[str] = ()) -> List[Run]:
  """The runs of ``variants`` (all when empty); an unplanned name is one error line.
  ``baseline`` names no run: ``--variants=baseline`` pretrains the baseline alone."""
  planned = list(dict.fromkeys(r.variant for r in runs))
  unknown = [v for v in variants if v not in planned and v != BASELINE]
  if unknown:
    raise AblationError(f"--variants: {', '.join(unknown)} not in this ablation's plan; "
                        f"choose from {', '.join([BASELINE] + planned)} (the sweeps' rows "
                        f"need --alphas/--rhos, the extra rows --extra_rows).")
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
  if run.lr_scale != 1:
    c.finetune.lr = float(c.lns.lr) * run.lr_scale
  if run.matched:
    # The LNS runs' compute and lr trajectory: the warm start's epochs first, then the
    # LNS stage's schedule shifted by them (its decay points move, the lr stays lns.lr).
    w = float(c.warmup.epochs)
    c.finetune.epochs = round(w + float(c.lns.epochs), 6)
    c.finetune.decay_epochs = tuple(round(w + float(e), 6) for e in c.lns.decay_epochs)
  return c


def baseline_config(config):
  """The baseline's run: the stages up to ``pretrain`` (a teacher and ReActNet's step 1
  where the config has them), from scratch."""
  from lns_jax import config as config_lib
  c = copy.deepcopy(config)
  names = config_lib.stage_names(config)
  c.stages = ",".join(names[:names.index("pretrain") + 1]) if "pretrain" in names else "pretrain"
  c.init_from = ""
  return c


def baseline_epochs(config) -> float:
  """The epochs of the baseline's stages (a teacher and ReActNet's step 1 included)."""
  bcfg = baseline_config(config)
  return sum(float(bcfg[s].epochs) for s in bcfg.stages.split(","))


def baseline_names(config) -> List[str]:
  """The pretraining recipes ``config.baselines`` names (``--baselines``)."""
  return list(config.get("baselines") or {})


def with_baseline(config, name: str):
  """``config`` with ``config.pretrain`` updated by ``config.baselines[name]`` (the
  baseline's recipe); its fine-tuning stages are the config's, whatever the baseline."""
  recipes = config.get("baselines") or {}
  if name not in recipes:
    known = ", ".join(recipes) or "none: this config defines no config.baselines"
    raise AblationError(f"--baselines: {name!r} is not a baseline of this config; choose "
                        f"from {known}.")
  c = copy.deepcopy(config)
  for key, value in recipes[name].items():
    if key not in c.pretrain:
      raise AblationError(f"config.baselines.{name}.{key}: not a field of config.pretrain.")
    c.pretrain[key] = tuple(value) if isinstance(value, list) else value
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
  saved = saved_config(workdir)
  if saved is None:
    return
  saved, now = _objective(saved, stages), _objective(config, stages)
  for key, value in now.items():
    if saved[key] != value:
      raise AblationError(
          f"{workdir} was run with {key} = {saved[key]} where this ablation plans {value} "
          f"(an ablation of another config or an earlier reading of the row); use another "
          f"--workdir.")


def saved_config(workdir: str):
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
  saved = saved_config(baseline_dir)
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


def names(text: str) -> List[str]:
  """``'a, b,'`` -> ``['a', 'b']`` (a comma-separated flag)."""
  return [v.strip() for v in text.split(",") if v.strip()]
