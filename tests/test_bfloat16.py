"""``config.model.dtype='bfloat16'``: the network computes in bfloat16, the rest stays float32.

What stays float32 (``lns_jax.models.DTYPES``): parameters, their gradients and the
optimizer state, the mapping networks (so ``q_hat`` and its signs are the float32 run's bit
for bit), the losses. The binary conv itself sums +-1 products, which bfloat16 holds
exactly; its output is rounded to bfloat16 (8 significant bits, relative error <= 2^-8),
so a layer agrees with float32 to ~1% (the tolerance below). Across a whole binary network
the rounding can move a pre-activation near 0 to the other side of a later ``sign``, so
the network-level test compares the loss, not every gradient.
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lns_jax import binary, models, optim, trainer
from lns_jax.layers import LNS_COLLECTION, BinaryConv
from lns_testutil import smoke_config

RTOL = 2 ** -7  # twice bfloat16's rounding: one rounding of the conv output, one of its grad


def _away_from_zero(rng, shape, low=0.05):
  """Inputs whose sign bfloat16's rounding cannot change (|x| >= low)."""
  x = rng.normal(size=shape)
  return np.where(np.abs(x) < low, np.sign(x + 1e-12) * low, x).astype(np.float32)


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30)


@pytest.mark.parametrize("weights", ["sign", "lns"])
def test_binary_conv_in_bfloat16_equals_float32_within_rounding(weights):
  rng = np.random.default_rng(0)
  x = jnp.asarray(_away_from_zero(rng, (4, 8, 8, 24)) * 0.5)  # some |x| > 1: STE window
  cotangent = jnp.asarray(rng.normal(size=(4, 8, 8, 16)), jnp.float32)

  def make(dtype):
    return BinaryConv(features=16, weight_binarizer=weights, conv="xla", dtype=dtype)

  variables = make(jnp.float32).init(jax.random.key(1), x, train=False)
  # Latent weights away from 0 too, so sign(W) and the STE's window cannot differ.
  variables = flax.core.unfreeze(variables)
  variables["params"]["kernel"] = jnp.asarray(
      _away_from_zero(rng, variables["params"]["kernel"].shape, 0.02) * 0.3)

  def run(dtype):
    def f(params, x):
      y, state = make(dtype).apply({**variables, "params": params}, x, train=True,
                                   mutable=["batch_stats", LNS_COLLECTION])
      return jnp.sum(y.astype(jnp.float32) * cotangent), (y, state)
    (_, (y, state)), grads = jax.jit(jax.value_and_grad(f, argnums=(0, 1), has_aux=True))(
        variables["params"], x)
    return y, state, grads

  y32, s32, (gp32, gx32) = run(jnp.float32)
  y16, s16, (gp16, gx16) = run(jnp.bfloat16)
  assert y16.dtype == jnp.bfloat16 and gx16.dtype == jnp.float32
  assert _rel(y16, y32) < RTOL
  assert _rel(gx16, gx32) < RTOL
  flat32 = traverse_util.flatten_dict(flax.core.unfreeze(gp32), sep="/")
  flat16 = traverse_util.flatten_dict(flax.core.unfreeze(gp16), sep="/")
  assert flat16.keys() == flat32.keys()
  for key in flat32:
    assert flat16[key].dtype == jnp.float32, key
    # The mapping's gradients pass through the conv's bfloat16 weight gradient, once.
    assert _rel(flat16[key], flat32[key]) < RTOL, key
  if weights == "lns":  # f_theta runs in float32: the same q_hat, bit for bit
    (qh32, qt32), = s32[LNS_COLLECTION]["pairs"]
    (qh16, qt16), = s16[LNS_COLLECTION]["pairs"]
    assert qh16.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(qh16), np.asarray(qh32))
    np.testing.assert_array_equal(np.asarray(qt16), np.asarray(qt32))


def test_train_step_in_bfloat16_keeps_float32_state_and_the_float32_loss():
  """The trainer's own LNS step, from one state, in both dtypes."""
  rng = np.random.default_rng(3)
  batch = {"image": jnp.asarray(rng.normal(size=(16, 28, 28, 1)), jnp.float32),
           "label": jnp.asarray(rng.integers(0, 10, 16), jnp.int32),
           "mask": jnp.ones(16, jnp.float32)}
  out = {}
  for dtype in ("float32", "bfloat16"):
    config = smoke_config(model__dtype=dtype)
    model = models.from_config(config, "lns", 10)
    layers = binary.weight_binarizers(model, (28, 28, 1))
    schedule = optim.learning_rate_schedule(config.lns, 10)
    tx = optim.make_optimizer(config, "lns", schedule)
    state = trainer.create_train_state(config, "lns", model, tx, layers, (28, 28, 1),
                                       jax.random.key(0))
    step = jax.jit(trainer.make_train_step(model, tx, config, "lns", layers, schedule))
    new, metrics = step(state, batch)
    out[dtype] = (state, new, jax.device_get(metrics), model)
  s32, n32, m32, _ = out["float32"]
  s16, n16, m16, model16 = out["bfloat16"]
  assert model16.dtype == jnp.bfloat16
  # Same initial state (the dtype does not enter the parameters), all of it float32 after.
  jax.tree.map(np.testing.assert_array_equal, s16.params, s32.params)
  for leaf in jax.tree.leaves((n16.params, n16.opt_state, n16.batch_stats)):
    if jnp.issubdtype(leaf.dtype, jnp.floating):
      assert leaf.dtype == jnp.float32
  assert m16["nonfinite"] == 0
  # Eq. 21's auxiliary term sees the same q_hat; the cross-entropy differs by rounding.
  np.testing.assert_allclose(m16["aux_total"], m32["aux_total"], rtol=1e-6)
  np.testing.assert_allclose(m16["ce"], m32["ce"], rtol=2e-2)
