"""Distillation from a real-valued teacher: ReActNet's distribution loss in any stage.

ReActNet (Liu et al., ECCV 2020, Sec. 3.3) trains the binary network to match the
softmax of a real-valued teacher, ``l_kd = KL(p_teacher || p_student)`` averaged over the
batch (its ``DistributionLoss`` is the cross-entropy against ``p_teacher``, which differs
from the KL by the teacher's entropy, a constant: same gradients). ``config.distill``:

  ``teacher``      a stage of ``config.stages`` (its ``final/`` checkpoint in this run),
                   or a checkpoint path (a stage folder, its ``final/``, or a step folder
                   of any lns-jax run: the model is rebuilt from the config and stage its
                   meta records, so a ResNet-34 teacher may distil into a ReActNet-18);
  ``weight``       ``w_kd``; ``temperature`` ``T`` (both softmaxes, ``l_kd`` times ``T^2``);
  ``cls_weight``   ``w_cls`` (0 = ReActNet: the distribution loss replaces l_cls);
  ``stages``       which stages distil ('' = every stage after the teacher).

A distilled stage's objective is Eq. 21 with the distribution loss added,
``L = w_kd l_kd + w_cls l_cls + alpha * sum_i l~_i`` (alpha = 0 where the stage's
objective is cross-entropy). The teacher runs in eval mode (running BatchNorm
statistics) inside the same jitted train step, its variables an argument of the step,
replicated like the student's state while the batch is sharded; they are under
``stop_gradient`` and outside the train state, so they get no gradient, no optimizer
state, and are never saved with the student's checkpoints.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional

import jax
import jax.numpy as jnp
import optax

from lns_jax import checkpoint as ckpt_lib
from lns_jax import config as config_lib
from lns_jax import models, parallel
from lns_jax import workdir as workdir_lib
from lns_jax.errors import ConfigError

Array = jax.Array


def kd_loss(student_logits: Array, teacher_logits: Array, temperature: float = 1.0,
            mask: Optional[Array] = None) -> Array:
  """``T^2 * mean_batch KL(softmax(t / T) || softmax(s / T))`` (ReActNet Sec. 3.3; the
  ``T^2`` keeps the gradient's scale across temperatures, Hinton et al., 2015)."""
  t = float(temperature)
  log_p_s = jax.nn.log_softmax(student_logits.astype(jnp.float32) / t, axis=-1)
  log_p_t = jax.nn.log_softmax(teacher_logits.astype(jnp.float32) / t, axis=-1)
  kl = optax.losses.kl_divergence_with_log_targets(log_p_s, log_p_t) * (t * t)
  if mask is None:
    return jnp.mean(kl)
  return jnp.sum(kl * mask) / jnp.maximum(jnp.sum(mask), 1.0)


@dataclasses.dataclass(frozen=True)
class Teacher:
  """The teacher of a distilled stage: its model, host variables and the loss weights."""
  model: Any
  variables: Any
  weight: float
  temperature: float
  cls_weight: float
  source: str

  def logits(self, variables, images: Array) -> Array:
    """The teacher's logits in eval mode, with no gradient to anything of the teacher."""
    out = self.model.apply(variables, images, train=False)
    return jax.lax.stop_gradient(out.astype(jnp.float32))

  def objective(self, aux: dict, alpha: float, logits: Array, batch: dict):
    """Eq. 21 with the distribution loss: ``(L, aux + {'kd'})`` from ``lns_objective``'s
    ``aux`` (its ``ce`` and ``aux_total``) and the batch's ``teacher_logits``."""
    kd = kd_loss(logits, batch["teacher_logits"], self.temperature, batch["mask"])
    total = self.weight * kd + self.cls_weight * aux["ce"] + alpha * aux["aux_total"]
    return total, {**aux, "kd": kd}


def _step_dir(path: str) -> str:
  """The step folder of a checkpoint path (stage folder, ``final/`` or a step folder)."""
  for sub in (workdir_lib.FINAL, ""):
    found = workdir_lib.step_dirs(os.path.join(path, sub))
    if found:
      return found[-1]
  return path


def teacher_for(config, workdir: str, stage: str, num_classes: int,
                image_shape) -> Optional[Teacher]:
  """The :class:`Teacher` of ``stage`` (``None`` where it does not distil).

  Raises :class:`ConfigError` (one line) when the checkpoint is missing or its model does
  not take this data (other classes or image size).
  """
  d = config.distill
  if stage not in config_lib.distilled_stages(config):
    return None
  if config_lib.teacher_is_stage(d.teacher):
    path, teacher_config, teacher_stage = workdir_lib.path(workdir, d.teacher), config, d.teacher
  else:
    path = os.path.abspath(os.path.expanduser(d.teacher))
    if not os.path.isdir(path):
      raise ConfigError(f"config.distill.teacher: no checkpoint at {d.teacher!r}; give a "
                        f"stage folder of a finished run (e.g. WORKDIR/teacher), its final/ "
                        f"folder, or a stage name.")
    meta = ckpt_lib.load_meta(_step_dir(path))
    if "config" not in meta or meta.get("stage") not in config_lib.STAGES:
      raise ConfigError(f"config.distill.teacher: {path} holds no lns-jax checkpoint with "
                        f"its config (meta); give a stage folder of a finished run.")
    teacher_config = config_lib.from_saved_json(meta["config"])
    teacher_stage = meta["stage"]
  try:
    variables = ckpt_lib.load_variables(path)
    model = models.from_config(teacher_config, teacher_stage, num_classes)
    from lns_jax import binary
    shapes = binary.abstract_variables(model, image_shape)
    ckpt_lib.from_start({"params": shapes["params"]}, {"params": variables["params"]},
                        "the teacher")
  except (ckpt_lib.CheckpointMismatchError, ValueError, TypeError) as e:
    raise ConfigError(f"config.distill.teacher={d.teacher!r}: cannot use it as the "
                      f"teacher of this run's {num_classes}-class {tuple(image_shape)} "
                      f"data ({str(e)[:300]}).") from None
  variables = {"params": variables["params"], "batch_stats": variables["batch_stats"]}
  return Teacher(model, variables, float(d.weight), float(d.temperature),
                 float(d.cls_weight), path)


def check_teacher(config, num_classes: int, image_shape) -> None:
  """Reads a checkpoint-path teacher now, so that a missing or mismatched one fails (one
  line) before any stage writes anything; a stage teacher is trained by the run."""
  if config.distill.teacher and not config_lib.teacher_is_stage(config.distill.teacher):
    taught = config_lib.distilled_stages(config)
    if taught:
      teacher_for(config, "", taught[0], num_classes, image_shape)


def jit_train_step(step_fn, teacher: Optional[Teacher], mesh, **jit_kwargs):
  """``step(state, batch)`` jitted over ``mesh`` (:func:`lns_jax.parallel.jit_data_parallel`);
  with a teacher, its variables are the step's replicated third argument, placed on the
  devices once."""
  if teacher is None:
    return parallel.jit_data_parallel(step_fn, mesh, **jit_kwargs)
  jitted = parallel.jit_data_parallel(step_fn, mesh, replicated_after=1, **jit_kwargs)
  variables = jax.device_put(teacher.variables, parallel.replicated(mesh))
  return lambda state, batch: jitted(state, batch, variables)
