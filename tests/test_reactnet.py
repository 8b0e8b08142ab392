"""ReActNet's blocks (lns_jax.models.reactnet) against independent NumPy references.

RSign and RPReLU, forward and every gradient; a ReActNet unit (same width, and the
downsampling one: pooled shortcut, two concatenated convs) forward and the gradients
to its input, RSign threshold and latent kernels, with 'sign' weights; with 'lns'
weights its two convs each sow their (q_hat, q_tilde) pair. The NumPy side writes the
conv, BatchNorm (eval mode), pooling and straight-through rules out by hand.
"""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lns_jax.layers import LNS_COLLECTION, BinaryConv
from lns_jax.models import reactnet

_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
EPS = 1e-5  # flax BatchNorm


def _np_sign(x):
  return np.where(x >= 0, 1.0, -1.0)


def _np_ste(u, binarizer):
  """d sign(u) / du of the straight-through rules (Eq. 3; Bi-Real's ApproxSign)."""
  if binarizer == "ste_sign":
    return (np.abs(u) <= 1).astype(np.float64)
  return np.where(np.abs(u) < 1, 2 - 2 * np.abs(u), 0.0)


@pytest.mark.parametrize("binarizer", ["ste_sign", "approx_sign"])
def test_rsign_forward_and_gradients(binarizer):
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 3, 3, 5)).astype(np.float32)
  beta = rng.normal(scale=0.5, size=5).astype(np.float32)
  x[0, 0, 0, 0] = beta[0]  # x == beta: sign(0) = +1
  g = rng.normal(size=x.shape).astype(np.float32)
  y, vjp = jax.vjp(lambda a, b: reactnet.rsign(a, b, binarizer), x, beta)
  gx, gbeta = vjp(g)
  u = x.astype(np.float64) - beta
  np.testing.assert_array_equal(np.asarray(y), _np_sign(u))
  want = g * _np_ste(u, binarizer)
  np.testing.assert_allclose(np.asarray(gx), want, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(gbeta), -want.sum((0, 1, 2)), rtol=1e-5, atol=1e-5)
  # 'none': the shift alone (a unit's BinaryConv binarizes).
  np.testing.assert_allclose(np.asarray(reactnet.rsign(x, beta, "none")), u, rtol=1e-6)


def test_rprelu_forward_and_gradients():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(2, 3, 3, 4)).astype(np.float32)
  gamma, zeta = (rng.normal(scale=0.5, size=4).astype(np.float32) for _ in range(2))
  slope = rng.uniform(0, 0.5, 4).astype(np.float32)
  g = rng.normal(size=x.shape).astype(np.float32)
  y, vjp = jax.vjp(reactnet.rprelu, x, gamma, slope, zeta)
  gx, ggamma, gslope, gzeta = vjp(g)
  u = x.astype(np.float64) - gamma
  np.testing.assert_allclose(np.asarray(y), np.where(u >= 0, u, slope * u) + zeta, rtol=1e-6,
                             atol=1e-6)
  dudx = np.where(u >= 0, 1.0, slope)
  np.testing.assert_allclose(np.asarray(gx), g * dudx, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(np.asarray(ggamma), -(g * dudx).sum((0, 1, 2)), rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(np.asarray(gslope), (g * np.where(u < 0, u, 0)).sum((0, 1, 2)),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(gzeta), g.sum((0, 1, 2)), rtol=1e-5, atol=1e-5)


def test_modules_initialise_as_the_paper_and_apply_the_functions():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 2, 2, 3)), jnp.float32)
  v = reactnet.RSign().init(jax.random.key(0), x)
  np.testing.assert_array_equal(v["params"]["beta"], np.zeros(3))
  np.testing.assert_array_equal(reactnet.RSign().apply(v, x), np.where(x >= 0, 1.0, -1.0))
  v = reactnet.RPReLU().init(jax.random.key(0), x)
  p = v["params"]
  np.testing.assert_array_equal(p["slope"], np.full(3, 0.25))
  np.testing.assert_array_equal(p["gamma"], np.zeros(3))
  np.testing.assert_array_equal(p["zeta"], np.zeros(3))
  np.testing.assert_allclose(reactnet.RPReLU().apply(v, x), np.where(x >= 0, x, 0.25 * x))


# --------------------------------------------------------------------------- the unit


def _np_conv(x, w, s):
  """NHWC x HWIO conv with XLA's SAME padding; returns (y, padded x, pads)."""
  n, h, wd, _ = x.shape
  kh, kw, _, o = w.shape
  oh, ow = -(-h // s), -(-wd // s)
  ph, pw = max((oh - 1) * s + kh - h, 0), max((ow - 1) * s + kw - wd, 0)
  pads = ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0))
  xp = np.pad(x, pads)
  y = np.zeros((n, oh, ow, o))
  for i in range(oh):
    for j in range(ow):
      y[:, i, j] = np.einsum("nhwc,hwco->no", xp[:, i * s:i * s + kh, j * s:j * s + kw], w)
  return y, xp, pads


def _np_conv_grads(x, w, s, gy):
  """Gradients of :func:`_np_conv` to ``x`` and ``w``."""
  _, xp, pads = _np_conv(x, w, s)
  kh, kw = w.shape[:2]
  gxp, gw = np.zeros_like(xp), np.zeros_like(w)
  for i in range(gy.shape[1]):
    for j in range(gy.shape[2]):
      win = (slice(None), slice(i * s, i * s + kh), slice(j * s, j * s + kw))
      gxp[win] += np.einsum("no,hwco->nhwc", gy[:, i, j], w)
      gw += np.einsum("nhwc,no->hwco", xp[win], gy[:, i, j])
  h0, w0 = pads[1][0], pads[2][0]
  return gxp[:, h0:h0 + x.shape[1], w0:w0 + x.shape[2]], gw


def _pool(x, s):
  n, h, w, c = x.shape
  return x if s == 1 else x.reshape(n, h // 2, 2, w // 2, 2, c).mean((2, 4))


def _unpool(g, s):
  return g if s == 1 else np.repeat(np.repeat(g, 2, 1), 2, 2) / 4


def _np_unit(x, p, stats, convs, s, g):
  """Forward and backward of a unit in NumPy: (y, gx, gbeta, {conv: g kernel})."""
  u = x - p["rsign"]["beta"]
  b = _np_sign(u)
  sc = _pool(x, s)
  outs, parts = [], {}
  for name, bn in convs:
    w = p[name]["kernel"]
    scale = np.abs(w).mean((0, 1, 2), keepdims=True)  # weight_scale='channel'
    z, _, _ = _np_conv(b, _np_sign(w) * scale, s)
    k = p[bn]["scale"] / np.sqrt(stats[bn]["var"] + EPS)
    outs.append((z - stats[bn]["mean"]) * k + p[bn]["bias"] + sc)
    parts[name] = (w, scale, k)
  y = np.concatenate(outs, -1)
  r = p["rprelu"]
  v = y - r["gamma"]
  out = np.where(v >= 0, v, r["slope"] * v) + r["zeta"]
  gy = g * np.where(v >= 0, 1.0, r["slope"])
  gb, gkernels, gsc = 0.0, {}, 0.0
  for (name, _), gy_k in zip(convs, np.split(gy, len(convs), -1)):
    w, scale, k = parts[name]
    gb_k, gw_eff = _np_conv_grads(b, _np_sign(w) * scale, s, gy_k * k)
    gb = gb + gb_k
    gkernels[name] = gw_eff * scale * (np.abs(w) <= 1)  # ste_sign, s under stop_gradient
    gsc = gsc + gy_k
  gu = gb * _np_ste(u, "approx_sign")
  return out, gu + _unpool(gsc, s), -gu.sum((0, 1, 2)), gkernels


@pytest.mark.parametrize("filters,strides,convs", [
    (4, 1, [("conv", "bn")]),
    (8, 2, [("conv1", "bn1"), ("conv2", "bn2")]),  # ReActNet's downsampling
])
def test_unit_matches_numpy_forward_and_gradients(filters, strides, convs):
  conv = functools.partial(BinaryConv, weight_binarizer="sign", input_binarizer="approx_sign",
                           weight_scale="channel", conv="xla")
  norm = functools.partial(nn.BatchNorm, use_running_average=True)
  unit = reactnet.ReActUnit(filters, strides, conv=conv, norm=norm)
  rng = np.random.default_rng(3)
  x = rng.normal(size=(2, 4, 4, 4)).astype(np.float32)
  abstract = jax.eval_shape(lambda: unit.init(jax.random.key(0), x, train=False))
  fill = {"kernel": lambda sh: rng.normal(scale=0.7, size=sh), "beta": lambda sh: rng.normal(
      scale=0.3, size=sh), "slope": lambda sh: rng.uniform(0, 0.5, sh),
          "scale": lambda sh: rng.uniform(0.5, 1.5, sh), "var": lambda sh: rng.uniform(0.5, 2, sh)}
  variables = jax.tree_util.tree_map_with_path(
      lambda path, a: np.asarray(fill.get(path[-1].key, lambda sh: rng.normal(
          scale=0.3, size=sh))(a.shape), np.float32), abstract)
  g = rng.normal(size=(2, 4 // strides, 4 // strides, filters)).astype(np.float32)

  def f(x, params):
    return unit.apply({"params": params, "batch_stats": variables["batch_stats"]}, x,
                      train=False)

  y, (gx, gp) = _jit(lambda x, p: (f(x, p), jax.vjp(f, x, p)[1](g)))(x, variables["params"])
  as64 = jax.tree.map(lambda a: np.asarray(a, np.float64), variables)
  want, want_gx, want_gbeta, want_gk = _np_unit(x.astype(np.float64), as64["params"],
                                                as64["batch_stats"], convs, strides, g)
  np.testing.assert_allclose(np.asarray(y), want, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gx), want_gx, rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(np.asarray(gp["rsign"]["beta"]), want_gbeta, rtol=1e-4, atol=1e-4)
  for name, _ in convs:
    np.testing.assert_allclose(np.asarray(gp[name]["kernel"]), want_gk[name], rtol=1e-4,
                               atol=1e-4)


def test_downsampling_unit_takes_lns_weights():
  """'lns' plugs in unchanged: both convs of the downsampling unit map their weights."""
  conv = functools.partial(BinaryConv, weight_binarizer="lns", input_binarizer="approx_sign",
                           conv="xla")
  unit = reactnet.ReActUnit(8, 2, conv=conv, norm=functools.partial(
      nn.BatchNorm, use_running_average=False))
  x = jnp.zeros((1, 4, 4, 4))
  abstract = jax.eval_shape(lambda: unit.init(jax.random.key(0), x, train=False))
  assert {"conv1", "conv2"} <= set(abstract["params"])
  assert all("mapping" in abstract["params"][c] for c in ("conv1", "conv2"))
  out, state = jax.eval_shape(lambda v: unit.apply(v, x, mutable=["batch_stats", LNS_COLLECTION]),
                              abstract)
  assert out.shape == (1, 2, 2, 8)
  assert set(state[LNS_COLLECTION]) == {"conv1", "conv2"}
  with pytest.raises(ValueError, match="twice"):
    reactnet.ReActUnit(12, 2, conv=conv, norm=nn.BatchNorm).init(jax.random.key(0), x)
