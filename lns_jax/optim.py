"""A stage's learning-rate schedule and optimizer (DECISIONS.md 9), and the warm start's.

``config.optimizer`` is every stage's default, ``config.<stage>.optimizer`` overrides it.
What trains comes from the stage table (:mod:`lns_jax.stages`): in a stage that trains
only f_theta every other parameter gets a zero update (:func:`train_mapping_only`,
exported as ``lns_jax.train_mapping_only``).
"""

from __future__ import annotations

import optax
from flax import traverse_util

from lns_jax import stages as stages_lib
from lns_jax.binary import is_mapping

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


def train_mapping_only(tx: optax.GradientTransformation) -> optax.GradientTransformation:
  """The warm start's optimizer (DECISIONS.md 4): ``tx`` on the mapping networks f_theta
  (every parameter under a ``'mapping'`` module: a BinaryConv's), a zero update
  (``optax.set_to_zero``, no optimizer state) for every other parameter.

  ``optax.multi_transform`` labels the params tree at ``init`` and each ``update``, so
  the result works with any model's params. Weight decay inside ``tx`` reaches f_theta
  only. Pair it with :func:`lns_jax.keep_network_stats`, which keeps the network's
  BatchNorm running averages; a model with no LNS layer trains nothing.
  """
  def label(params):
    flat = traverse_util.flatten_dict(params)
    return traverse_util.unflatten_dict(
        {k: "train" if is_mapping(k) else "frozen" for k in flat})
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)


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
  if stages_lib.get(stage).trains_only_mapping:
    opt = train_mapping_only(opt)
  return opt
