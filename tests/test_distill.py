"""Distillation (lns_jax.distill), the new stages' table rows, and their config fields.

The distribution loss against a NumPy KL (temperature, mask), the objective it joins
(Eq. 21 plus ``w_kd l_kd``), zero gradient to the teacher, the linear schedule and
per-stage weight decay, and the config's checks of ``config.distill``.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lns_jax import config as config_lib
from lns_jax import distill, models, optim, stages
from lns_testutil import load_config


def _np_kl(s, t, temperature, mask):
  def log_softmax(z):
    z = z / temperature
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))
  lp_s, lp_t = log_softmax(s), log_softmax(t)
  kl = (np.exp(lp_t) * (lp_t - lp_s)).sum(-1) * temperature**2
  return (kl * mask).sum() / mask.sum()


@pytest.mark.parametrize("temperature", [1.0, 4.0])
def test_kd_loss_is_the_kl_of_the_softmaxes(temperature):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, 6, 5)) * 3
  mask = np.array([1, 1, 0, 1, 1, 0], np.float32)
  got = distill.kd_loss(jnp.asarray(s), jnp.asarray(t), temperature, jnp.asarray(mask))
  np.testing.assert_allclose(float(got), _np_kl(s, t, temperature, mask), rtol=1e-5)
  assert float(distill.kd_loss(jnp.asarray(t), jnp.asarray(t), temperature)) == pytest.approx(
      0, abs=1e-6)


class _Dense(nn.Module):
  """A one-layer teacher with the models' ``train`` argument."""

  @nn.compact
  def __call__(self, x, train=True):
    return nn.Dense(4)(x)


def test_objective_adds_the_distribution_loss_and_the_teacher_gets_no_gradient():
  teacher_model = _Dense()
  x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 5)), jnp.float32)
  tvars = teacher_model.init(jax.random.key(0), x)
  teacher = distill.Teacher(teacher_model, tvars, weight=0.7, temperature=2.0, cls_weight=0.3,
                            source="test")
  logits = jnp.asarray(np.random.default_rng(2).normal(size=(3, 4)), jnp.float32)
  aux = {"ce": jnp.float32(1.5), "aux_total": jnp.float32(0.2)}
  mask = jnp.ones(3)

  def total(tv, logits):
    batch = {"teacher_logits": teacher.logits(tv, x), "mask": mask}
    return teacher.objective(aux, 2.0, logits, batch)[0]

  t_logits = teacher_model.apply(tvars, x)
  kd = _np_kl(np.asarray(logits), np.asarray(t_logits), 2.0, np.ones(3))
  np.testing.assert_allclose(float(total(tvars, logits)), 0.7 * kd + 0.3 * 1.5 + 2.0 * 0.2,
                             rtol=1e-5)
  g_teacher, g_student = jax.grad(total, argnums=(0, 1))(tvars, logits)
  for leaf in jax.tree.leaves(g_teacher):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  assert np.any(np.asarray(g_student) != 0)


def test_stage_rows_and_the_models_they_build():
  assert stages.get("teacher").standalone and stages.get("teacher").activations == "real"
  assert stages.get("step1").weights == "float" and stages.get("step1").activations == "binary"
  assert stages.chained(["teacher", "step1", "pretrain"]) == ["step1", "pretrain"]
  # The earlier rows keep their index: their random seeds (fold_in) are unchanged.
  assert stages.NAMES[:4] == ("pretrain", "warmup", "lns", "finetune")
  c = load_config("fashion_mnist_reactnet.py", "smoke")
  teacher = models.from_config(c, "teacher", 10)
  assert teacher.weight_binarizer == "float" and teacher.input_binarizer == "none"
  step1 = models.from_config(c, "step1", 10)
  assert step1.weight_binarizer == "float" and step1.input_binarizer == "approx_sign"


def test_linear_schedule_and_per_stage_weight_decay():
  c = load_config("fashion_mnist_reactnet.py", "")
  sched = optim.learning_rate_schedule(c.step1, steps_per_epoch=10)
  total = int(c.step1.epochs * 10)
  np.testing.assert_allclose([float(sched(0)), float(sched(total // 2)), float(sched(total))],
                             [c.step1.lr, c.step1.lr / 2, 0.0], rtol=1e-6, atol=1e-12)
  assert optim.stage_weight_decay(c, "step1") == 1e-5
  assert optim.stage_weight_decay(c, "pretrain") == 0.0
  c.weight_decay = 3e-4
  assert optim.stage_weight_decay(c, "lns") == 3e-4  # None: config.weight_decay


@pytest.mark.parametrize("overrides,message", [
    ({"distill.teacher": "teachr"}, "config.distill.teacher: 'teachr' is neither a stage"),
    ({"distill.teacher": "finetune"}, "config.distill.teacher: stage 'finetune' is not in"),
    ({"distill.stages": "teacher"}, "config.distill.stages: 'teacher' runs before (or is)"),
    ({"distill.stages": "finetune"}, "config.distill.stages: 'finetune' is not in"),
    ({"distill.temperature": 0.0}, "config.distill.temperature: 0.0 must be > 0"),
    ({"step1.weight_decay": -1.0}, "config.step1.weight_decay: -1.0 must be >= 0"),
    ({"teacher.schedule": "linearr"}, "config.teacher.schedule: 'linearr' is not one of"),
])
def test_config_checks_distill_and_the_new_stages(overrides, message):
  c = load_config("fashion_mnist_reactnet.py", "smoke")
  config_lib.validate(c)
  assert config_lib.distilled_stages(c) == ["step1", "pretrain", "warmup", "lns"]
  for k, v in overrides.items():
    node = c
    *parents, last = k.split(".")
    for p in parents:
      node = node[p]
    node[last] = v
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c)
  assert str(e.value).startswith(message), e.value


def test_a_path_teacher_distils_every_chained_stage():
  c = load_config("fashion_mnist_reactnet.py", "smoke")
  c.stages = "pretrain,warmup,lns"
  c.distill.teacher = "/somewhere/teacher"
  config_lib.validate(c)  # the path is read by the trainer, before any stage runs
  assert config_lib.distilled_stages(c) == ["pretrain", "warmup", "lns"]
  with pytest.raises(config_lib.ConfigError, match="no checkpoint at '/somewhere/teacher'"):
    distill.check_teacher(c, 10, (28, 28, 1))
