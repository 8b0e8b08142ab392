"""A stage's learning-rate schedule and optimizer (DESIGN decision 9).

``config.optimizer`` is every stage's default, ``config.<stage>.optimizer`` overrides it.
What trains comes from the stage table (:mod:`lns_jax.stages`): in a stage that trains
only f_theta every other parameter gets a zero update.
"""

from __future__ import annotations

import optax
from flax import traverse_util

from lns_jax import stages as stages_lib

OPTIMIZERS = ("sgd", "adam")
SCHEDULES = ("piecewise", "cosine", "constant", "linear")


def learning_rate_schedule(stage_cfg, steps_per_epoch: int) -> optax.Schedule:
  """The stage's schedule in steps: piecewise constant (paper), cosine, constant, or
  linear decay to 0 over the stage (ReActNet's, Liu et al. 2020, Sec. 4.1)."""
  total = max(1, int(round(stage_cfg.epochs * steps_per_epoch)))
  if stage_cfg.schedule == "linear":
    return optax.linear_schedule(stage_cfg.lr, 0.0, total)
  if stage_cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(stage_cfg.lr, total)
  if stage_cfg.schedule == "constant":
    return optax.constant_schedule(stage_cfg.lr)
  boundaries = {int(round(e * steps_per_epoch)): stage_cfg.decay_factor
                for e in stage_cfg.decay_epochs}
  return optax.piecewise_constant_schedule(stage_cfg.lr, boundaries)


def stage_weight_decay(config, stage: str) -> float:
  """``config.<stage>.weight_decay``, else ``config.weight_decay`` (ReActNet: 1e-5 in its
  step 1, 0 in step 2)."""
  own = config[stage].get("weight_decay")
  return float(config.weight_decay if own is None else own)


def make_optimizer(config, stage: str, schedule) -> optax.GradientTransformation:
  """The stage's optimizer: ``config.<stage>.optimizer``, or ``config.optimizer`` if empty."""
  name = config[stage].optimizer or config.optimizer
  wd = stage_weight_decay(config, stage)
  if name == "adam":
    opt = optax.adamw(schedule, weight_decay=wd)
  else:
    opt = optax.chain(optax.add_decayed_weights(wd),
                      optax.sgd(schedule, momentum=config.momentum or None))
  table = stages_lib.get(stage)
  if table.trains_only_mapping:
    def label(params):
      flat = traverse_util.flatten_dict(params)
      return traverse_util.unflatten_dict(
          {k: "train" if table.trainable(k) else "frozen" for k in flat})
    opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, label)
  return opt
