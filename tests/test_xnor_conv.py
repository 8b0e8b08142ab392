"""The packed train-step conv (lns_jax.xnor_conv) against XLA's float conv, with its forward
packed (``'packed'``) or XLA's (``'bits'``: the same 1-bit residuals and backward).

Forward: the ±1 conv is an exact integer sum; times the scale it equals the float conv
of ``wb * scale`` to float32 rounding. Backward: the same XLA convs on the same values,
so gradients match the float path to rounding too (``rtol`` 1e-5 below).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lns_jax import config as config_lib
from lns_jax import binary, models, optim, parallel, trainer, xnor_conv
from lns_jax.layers import BinaryConv

DN = ("NHWC", "HWIO", "NHWC")


def _pm1(rng, shape):
  return jnp.asarray(np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32))


def _float(xb, wb, scale, strides, padding):
  return lax.conv_general_dilated(xb, wb * scale, strides, padding, dimension_numbers=DN)


GEOMETRIES = [  # (input NHWC, C_out, strides, padding)
    ((2, 8, 8, 16), 16, (1, 1), "SAME"),
    ((2, 9, 7, 3), 5, (2, 2), "SAME"),
    ((1, 6, 6, 40), 8, (1, 1), "VALID"),
    ((2, 7, 7, 33), 4, (2, 1), ((1, 0), (2, 1))),
]


@pytest.mark.parametrize("shape,c_out,strides,padding", GEOMETRIES)
@pytest.mark.parametrize("per_channel", [False, True])
@pytest.mark.parametrize("forward", ["packed", "xla"])
def test_forward_and_gradients_match_the_float_conv(shape, c_out, strides, padding,
                                                    per_channel, forward):
  rng = np.random.default_rng(sum(shape) + c_out)
  xb = _pm1(rng, shape)
  wb = _pm1(rng, (3, 3, shape[-1], c_out))
  scale = (jnp.asarray(rng.uniform(0.1, 2.0, (1, 1, 1, c_out)), jnp.float32) if per_channel
           else jnp.float32(0.37))

  def loss(f, x, w):
    y = f(x, w, scale, strides, padding)
    return jnp.sum(y * jnp.cos(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))), y

  grad = lambda f: jax.jit(jax.grad(functools.partial(loss, f), argnums=(0, 1), has_aux=True))
  (gx_p, gw_p), y_p = grad(functools.partial(xnor_conv.binary_conv, forward=forward))(xb, wb)
  (gx_f, gw_f), y_f = grad(_float)(xb, wb)
  np.testing.assert_allclose(y_p, y_f, rtol=1e-6, atol=1e-5)
  # The ±1 part is exact: the packed output over the scale is an integer.
  k = np.asarray(y_p / scale)
  np.testing.assert_allclose(k, np.round(k), atol=1e-4)
  np.testing.assert_allclose(gx_p, gx_f, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw_p, gw_f, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("clip", [1.0, 0.5, None])
@pytest.mark.parametrize("forward", ["packed", "xla"])
def test_ste_binary_conv_equals_ste_sign_then_float_conv(clip, forward):
  from lns_jax import quantizers
  rng = np.random.default_rng(3)
  # Values on the clip boundary, at 0 and -0.0 included.
  x = jnp.asarray(rng.choice([-2.0, -1.0, -0.5, -0.0, 0.0, 0.3, 0.5, 1.0, 1.5],
                             (2, 6, 6, 20)), jnp.float32)
  wb = _pm1(rng, (3, 3, 20, 7))
  scale = jnp.float32(0.61)
  r = jnp.asarray(rng.standard_normal((2, 6, 6, 7)), jnp.float32)
  packed = lambda x, w: jnp.sum(r * xnor_conv.ste_binary_conv(x, w, scale, clip,
                                                              forward=forward))
  ref = lambda x, w: jnp.sum(r * _float(quantizers.ste_sign(x, clip), w, scale, (1, 1), "SAME"))
  vp, (gxp, gwp) = jax.jit(jax.value_and_grad(packed, argnums=(0, 1)))(x, wb)
  vr, (gxr, gwr) = jax.jit(jax.value_and_grad(ref, argnums=(0, 1)))(x, wb)
  np.testing.assert_allclose(vp, vr, rtol=1e-5, atol=1e-4)  # a sum with cancellation
  np.testing.assert_allclose(gxp, gxr, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gwp, gwr, rtol=1e-5, atol=1e-5)
  if clip is not None:  # the mask is exact: zero outside the window
    assert np.all(np.asarray(gxp)[np.abs(np.asarray(x)) > clip] == 0)


def test_bad_shapes_and_impls_raise():
  with pytest.raises(ValueError):
    xnor_conv.binary_conv(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 2, 4)), 1.0)
  with pytest.raises(ValueError):
    xnor_conv.resolve("cudnn")
  with pytest.raises(ValueError, match="forward must be 'packed' or 'xla'"):
    xnor_conv.binary_conv(jnp.ones((1, 4, 4, 3)), jnp.ones((3, 3, 3, 4)), 1.0, forward="bits")
  assert xnor_conv.resolve("bits") == "bits"
  assert xnor_conv.resolve("xla") == "xla"
  assert xnor_conv.resolve("auto") == ("packed" if jax.default_backend() == "cpu" else "xla")


# 'bits' also takes real weights (ReActNet's step 1); 'packed' leaves those to XLA's conv.
@pytest.mark.parametrize("weights,impl", [("sign", "packed"), ("lns", "packed"),
                                          ("sign", "bits"), ("lns", "bits"), ("float", "bits")])
@pytest.mark.parametrize("scale", ["layer", "channel"])
@pytest.mark.parametrize("inputs", ["ste_sign", "approx_sign"])
def test_binary_conv_layer_packed_equals_xla(weights, scale, inputs, impl):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((2, 6, 6, 8)), jnp.float32)
  kw = dict(features=12, strides=(2, 2), weight_binarizer=weights, weight_scale=scale,
            input_binarizer=inputs)
  ref, packed = BinaryConv(conv="xla", **kw), BinaryConv(conv=impl, **kw)
  variables = ref.init(jax.random.key(0), x, train=False)

  def loss(m, params, x):
    y, _ = m.apply({**variables, "params": params}, x, mutable=["batch_stats", "lns"])
    return jnp.sum(y * jnp.sin(jnp.arange(y.size, dtype=jnp.float32).reshape(y.shape))), y

  out = {}
  for name, m in (("xla", ref), ("packed", packed)):
    out[name] = jax.jit(jax.grad(functools.partial(loss, m), argnums=(0, 1), has_aux=True))(
        variables["params"], x)
  (gp_x, gx_x), y_x = out["xla"]
  (gp_p, gx_p), y_p = out["packed"]
  np.testing.assert_allclose(y_p, y_x, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx_p, gx_x, rtol=1e-5, atol=1e-6)
  for a, b in zip(jax.tree.leaves(gp_p), jax.tree.leaves(gp_x)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("stage", ["pretrain", "lns"])
def test_train_step_packed_equals_xla(stage):
  """Two ResNet-tiny train steps: the same loss, and parameters to rounding.

  ``weight_scale='none'``: the binary convs' outputs are then integers, exact in both
  paths. With a scale the two differ by rounding, and a BatchNorm output that is 0 in
  exact arithmetic (integer conv outputs tie with their mean now and then in so small a
  net) can take either sign: one flipped activation changes the loss at the 1e-2 level.
  (XLA's own jit and eager runs of the same float path differ that way too.)"""
  image_shape, batch = (8, 8, 3), 8
  rng = np.random.default_rng(0)
  data = {"image": jnp.asarray(rng.standard_normal((batch, *image_shape)), jnp.float32),
          "label": jnp.asarray(rng.integers(0, 10, batch), jnp.int32),
          "mask": jnp.ones(batch, jnp.float32)}
  results = {}
  for impl in ("xla", "packed"):
    c = config_lib.base_config()
    c.model.name = "resnet_tiny"
    c.model.conv = impl
    c.model.weight_scale = "none"
    config_lib.validate(c)
    model = models.from_config(c, stage, 10)
    layers = binary.weight_binarizers(model, image_shape)
    schedule = optim.learning_rate_schedule(c[stage], 10)
    tx = optim.make_optimizer(c, stage, schedule)
    state = trainer.create_train_state(c, stage, model, tx, layers, image_shape,
                                       jax.random.key(0))
    # Compiled as the trainer compiles its step (parallel.compiler_options, the tests'
    # quick compiles) rather than with XLA's full optimisation: 113 -> 83 s for both here.
    step = jax.jit(trainer.make_train_step(model, tx, c, stage, layers, schedule),
                   compiler_options=parallel.compiler_options())
    losses = []
    for _ in range(2):
      state, m = step(state, data)
      losses.append(float(m["loss"]))
    results[impl] = (losses, state)
  (l_x, s_x), (l_p, s_p) = results["xla"], results["packed"]
  np.testing.assert_allclose(l_p, l_x, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(s_p.params), jax.tree.leaves(s_x.params)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(s_p.batch_stats), jax.tree.leaves(s_x.batch_stats)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_config_rejects_an_unknown_conv():
  c = config_lib.base_config()
  c.model.conv = "winograd"
  with pytest.raises(config_lib.ConfigError, match="model.conv"):
    config_lib.validate(c)
