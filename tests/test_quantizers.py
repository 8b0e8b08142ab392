"""Tests for lns_jax.quantizers: sign, the clipped STE, ApproxSign, weight scales.

Every expectation is computed in NumPy from the paper / DESIGN rules:
  sign(x) = +1 for x >= 0 (also -0.0), -1 otherwise          (Eq. 1)
  d ste_sign / dx := 1{|x| <= clip}  (inclusive; clip=None: 1)  (Eq. 3)
  d approx_sign / dx := 2 - 2|x| for |x| < 1, else 0            (Bi-Real Net)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lns_jax import quantizers
from lns_jax.quantizers import (approx_sign, binarize_weights, sign, ste_sign,
                                weight_scale)

DTYPES = [jnp.float32, jnp.bfloat16, jnp.float16]

# Zeros of both signs, exactly +-clip for clip in {0.5, 1, 2}, values just inside and
# outside those, and large values.
EDGE = np.array([0.0, -0.0, 1.0, -1.0, 0.5, -0.5, 2.0, -2.0, 0.25, -0.25, 0.75, -0.75,
                 1.5, -1.5, 3.0, -3.0, 1e4, -1e4, 1e30, -1e30], np.float32)


def np_sign(x):
  x = np.asarray(x, np.float64)
  return np.where(x >= 0, 1.0, -1.0)  # -0.0 >= 0 is True


def np_ste_grad(x, g, clip):
  x = np.asarray(x, np.float64)
  if clip is None:
    return np.asarray(g, np.float64)
  return np.where(np.abs(x) <= clip, g, 0.0)


def np_approx_grad(x, g):
  ax = np.abs(np.asarray(x, np.float64))
  return np.where(ax < 1, g * (2 - 2 * ax), 0.0)


def _coeffs(n, seed=0):
  # A non-uniform upstream gradient: d/dx sum(sign(x) * c) = c * (estimator derivative).
  return np.random.default_rng(seed).uniform(-3, 3, n).astype(np.float32)


# -------------------------------------------------------------------------------- forward

def test_np_reference_treats_negative_zero_as_positive():
  # Guard on the reference itself: -0.0 really is in the input and compares >= 0.
  assert np.signbit(EDGE[1]) and np_sign(EDGE[1]) == 1.0


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("fn", [sign, ste_sign, approx_sign,
                                lambda x: ste_sign(x, None), lambda x: ste_sign(x, 0.5)],
                         ids=["sign", "ste", "approx", "ste_noclip", "ste_0.5"])
def test_forward_is_sign_with_zero_plus_one_and_keeps_dtype(fn, dtype):
  x = jnp.asarray(EDGE[:18], dtype)  # 1e30 overflows f16/bf16 -> inf; tested in f32 below
  y = fn(x)
  assert y.dtype == dtype
  assert y.shape == x.shape
  np.testing.assert_array_equal(np.asarray(y, np.float64), np_sign(np.asarray(x, np.float64)))
  assert float(fn(jnp.asarray(-0.0, dtype))) == 1.0
  assert float(fn(jnp.asarray(0.0, dtype))) == 1.0


@pytest.mark.parametrize("fn", [sign, ste_sign, approx_sign])
def test_forward_large_and_infinite_values(fn):
  x = jnp.asarray([1e30, -1e30, np.inf, -np.inf, np.finfo(np.float32).tiny,
                   -np.finfo(np.float32).tiny], jnp.float32)
  np.testing.assert_array_equal(np.asarray(fn(x)), [1, -1, 1, -1, 1, -1])


@pytest.mark.parametrize("fn", [sign, ste_sign, approx_sign])
def test_forward_odd_shapes(fn):
  for shape in [(), (0,), (1,), (3, 0, 2), (2, 3, 5, 7)]:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    y = fn(jnp.asarray(x))
    assert y.shape == shape and y.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(y), np_sign(x))


# ------------------------------------------------------------------------------ gradients

@pytest.mark.parametrize("clip", [1.0, 0.5, 2.0, 0.0, None])
@pytest.mark.parametrize("jit", [False, True])
def test_ste_gradient_matches_numpy(clip, jit):
  c = _coeffs(EDGE.size)
  f = lambda x: jnp.sum(ste_sign(x, clip) * c)
  g = jax.grad(f)
  if jit:
    g = jax.jit(g)
  got = np.asarray(g(jnp.asarray(EDGE)))
  np.testing.assert_array_equal(got, np_ste_grad(EDGE, c, clip).astype(np.float32))


def test_ste_default_clip_is_one_and_inclusive():
  x = jnp.asarray([1.0, -1.0, np.nextafter(np.float32(1), np.float32(2)),
                   -np.nextafter(np.float32(1), np.float32(2)), 0.0, -0.0], jnp.float32)
  got = jax.grad(lambda x: jnp.sum(ste_sign(x) * jnp.arange(1.0, 7.0)))(x)
  np.testing.assert_array_equal(np.asarray(got), [1, 2, 0, 0, 5, 6])


@pytest.mark.parametrize("jit", [False, True])
def test_approx_sign_gradient_matches_numpy(jit):
  x = np.concatenate([EDGE, np.float32([0.1, -0.9, 0.999, -0.999])])
  c = _coeffs(x.size, seed=2)
  g = jax.grad(lambda x: jnp.sum(approx_sign(x) * c))
  if jit:
    g = jax.jit(g)
  got = np.asarray(g(jnp.asarray(x)))
  np.testing.assert_allclose(got, np_approx_grad(x, c), rtol=1e-6, atol=1e-6)
  # |x| == 1 exactly is outside (strict), x = 0 and -0.0 get the peak 2 * g.
  assert got[2] == 0 and got[3] == 0
  np.testing.assert_allclose(got[:2], 2 * c[:2], rtol=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradient_dtype_follows_input(dtype):
  x = jnp.asarray([0.0, -0.5, 0.5, 1.0, 1.5], dtype)
  c = jnp.asarray([1.0, 2.0, -3.0, 4.0, 5.0], dtype)
  gs, ga = jax.jit(lambda x: (jax.grad(lambda x: jnp.sum(ste_sign(x) * c))(x),
                              jax.grad(lambda x: jnp.sum(approx_sign(x) * c))(x)))(x)
  assert gs.dtype == dtype and ga.dtype == dtype
  np.testing.assert_array_equal(np.asarray(gs, np.float64), [1, 2, -3, 4, 0])
  np.testing.assert_allclose(np.asarray(ga, np.float64), [2, 2, -3, 0, 0], rtol=1e-2)


def test_gradients_under_vmap():
  rng = np.random.default_rng(3)
  x = rng.uniform(-2.5, 2.5, (4, 7)).astype(np.float32)
  x[0, :3] = [0.0, 1.0, -1.0]
  c = rng.normal(size=(4, 7)).astype(np.float32)

  def per_row(fn):
    grad = jax.vmap(jax.grad(lambda xr, cr: jnp.sum(fn(xr) * cr)))
    return jax.jit(grad)(jnp.asarray(x), jnp.asarray(c))

  np.testing.assert_array_equal(np.asarray(per_row(lambda v: ste_sign(v, 0.5))),
                                np_ste_grad(x, c, 0.5).astype(np.float32))
  np.testing.assert_allclose(np.asarray(per_row(approx_sign)), np_approx_grad(x, c),
                             rtol=1e-6, atol=1e-6)
  # Forward under vmap (and jit of vmap).
  y = jax.jit(jax.vmap(ste_sign))(jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np_sign(x))


def test_sign_has_no_gradient():
  # `sign` is the label function (Eq. 1): no straight-through path.
  g = jax.grad(lambda x: jnp.sum(sign(x) * 3.0))(jnp.asarray([0.0, 0.5, -0.5]))
  np.testing.assert_array_equal(np.asarray(g), [0, 0, 0])


@pytest.mark.parametrize("clip", [-1.0, -1e-9, float("nan"), "abc"])
def test_invalid_clip_raises(clip):
  with pytest.raises(ValueError):
    ste_sign(jnp.ones(3), clip)


def test_input_binarizer_registry():
  assert quantizers.get_input_binarizer("ste_sign") is ste_sign
  assert quantizers.get_input_binarizer("approx_sign") is approx_sign
  x = jnp.asarray([-0.3, 0.7])
  np.testing.assert_array_equal(np.asarray(quantizers.get_input_binarizer("none")(x)),
                                np.asarray(x))
  with pytest.raises(ValueError, match="bogus"):
    quantizers.get_input_binarizer("bogus")


# ------------------------------------------------------------------------- weight scales

def _kernel(shape=(3, 3, 2, 5), seed=4):
  w = np.random.default_rng(seed).normal(size=shape).astype(np.float32)
  w.flat[0] = 0.0
  w.flat[1] = -0.0
  return w


def test_weight_scale_layer_channel_none():
  w = _kernel()
  s_layer = weight_scale(jnp.asarray(w), "layer")
  assert s_layer.shape == () and s_layer.dtype == jnp.float32
  np.testing.assert_allclose(float(s_layer), np.abs(w.astype(np.float64)).mean(), rtol=1e-6)

  s_ch = weight_scale(jnp.asarray(w), "channel")
  assert s_ch.shape == (1, 1, 1, 5)
  ref = np.array([np.abs(w[..., j].astype(np.float64)).mean() for j in range(5)])
  np.testing.assert_allclose(np.asarray(s_ch).reshape(-1), ref, rtol=1e-6)

  s_none = weight_scale(jnp.asarray(w), "none")
  assert float(s_none) == 1.0 and s_none.dtype == jnp.float32

  # Default is the DoReFa per-layer scale.
  np.testing.assert_array_equal(np.asarray(weight_scale(jnp.asarray(w))), np.asarray(s_layer))


def test_weight_scale_keeps_dtype_and_other_ranks():
  w = _kernel((1, 1, 3, 1))
  assert weight_scale(jnp.asarray(w), "channel").shape == (1, 1, 1, 1)
  wb = jnp.asarray(_kernel(), jnp.bfloat16)
  for mode in ("layer", "channel", "none"):
    assert weight_scale(wb, mode).dtype == jnp.bfloat16
  d = np.random.default_rng(0).normal(size=(6, 4)).astype(np.float32)  # a dense kernel
  np.testing.assert_allclose(np.asarray(weight_scale(jnp.asarray(d), "channel")),
                             np.abs(d).mean(axis=0, keepdims=True), rtol=1e-6)


def test_weight_scale_invalid_mode():
  with pytest.raises(ValueError, match="bogus"):
    weight_scale(jnp.ones((3, 3, 1, 1)), "bogus")


def test_weight_scale_gradient_is_mean_abs_derivative():
  # weight_scale itself is differentiable: d mean|W| / dW = sign(W) / N (W != 0).
  w = np.random.default_rng(5).normal(size=(3, 3, 2, 4)).astype(np.float32)
  g = jax.grad(lambda w: weight_scale(w, "layer"))(jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(g), np.sign(w) / w.size, rtol=1e-6)
  gc = jax.grad(lambda w: jnp.sum(weight_scale(w, "channel") * jnp.arange(1.0, 5.0)))(
      jnp.asarray(w))
  np.testing.assert_allclose(np.asarray(gc), np.sign(w) * np.arange(1.0, 5.0) / 18, rtol=1e-6)


@pytest.mark.parametrize("scale", ["layer", "channel", "none"])
def test_binarize_weights_forward(scale):
  w = _kernel()
  got = np.asarray(binarize_weights(jnp.asarray(w), scale))
  a = np.abs(w.astype(np.float64))
  s = {"layer": a.mean(), "channel": a.mean(axis=(0, 1, 2), keepdims=True), "none": 1.0}[scale]
  np.testing.assert_allclose(got, np_sign(w) * s, rtol=1e-6)
  assert got[0, 0, 0, 0] > 0 and got[0, 0, 0, 1] > 0  # 0.0 and -0.0 -> +s


@pytest.mark.parametrize("scale", ["layer", "channel", "none"])
@pytest.mark.parametrize("clip", [1.0, 0.5, None])
def test_binarize_weights_gradient_is_the_ste_times_scale(scale, clip):
  # DoReFa convention (DECISIONS.md 2, as in BinaryConv): s is a constant in the
  # backward pass, so dL/dW = dL/dWb * s * 1{|W| <= clip}.
  w = _kernel() * 0.8
  w.flat[2], w.flat[3] = 1.0, -0.5  # exactly on the clip boundaries
  c = np.random.default_rng(6).normal(size=w.shape).astype(np.float32)
  got = jax.grad(lambda w: jnp.sum(binarize_weights(w, scale, clip) * c))(jnp.asarray(w))
  a = np.abs(w.astype(np.float64))
  s = {"layer": a.mean(), "channel": a.mean(axis=(0, 1, 2), keepdims=True), "none": 1.0}[scale]
  np.testing.assert_allclose(np.asarray(got), np_ste_grad(w, c * s, clip), rtol=1e-5,
                             atol=1e-7)
