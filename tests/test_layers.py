"""Tests for lns_jax.layers: BinaryConv (Eq. 2-4) and binary_weights.

References: operands binarized in NumPy (sign(0) = +1, s = mean|W| per layer / per output
channel / 1), convolved with ``lax.conv_general_dilated`` (itself checked against a NumPy
convolution below). Gradients are derived by hand:
  y = conv(xb, Wb),  Wb = ste_sign(W) * s  (s constant)  =>  dL/dW = dL/dWb * s * 1{|W| <= clip}
  xb = ste_sign(x)                                      =>  dL/dx = dL/dxb * 1{|x| <= 1}
  xb = approx_sign(x)                                   =>  dL/dx = dL/dxb * (2 - 2|x|) 1{|x| < 1}
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lns_jax.layers import LNS_COLLECTION, BinaryConv, conv2d
from lns_jax.layers import binary_weights as _binary_weights_eager

binary_weights = jax.jit(_binary_weights_eager,
                         static_argnames=("weight_binarizer", "weight_scale", "mapping_output"))
from lns_jax.mapping import MappingNet

DN = ("NHWC", "HWIO", "NHWC")


def np_sign(x):
  return np.where(np.asarray(x) >= 0, 1.0, -1.0)


def np_scale(w, mode):
  a = np.abs(np.asarray(w, np.float64))
  return {"layer": a.mean(), "channel": a.mean(axis=(0, 1, 2), keepdims=True),
          "none": 1.0}[mode]


@jax.jit
def _lax_conv_same1(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=DN)


def lax_conv(x, w, strides=(1, 1), padding="SAME"):
  if tuple(strides) == (1, 1) and padding == "SAME":
    return _lax_conv_same1(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  return lax.conv_general_dilated(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32),
                                  tuple(strides), padding, dimension_numbers=DN)


def np_conv(x, w, strides=(1, 1), padding="SAME"):
  """Direct NHWC x HWIO cross-correlation in float64 (TF/XLA SAME padding rule)."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  kh, kw = w.shape[:2]
  sh, sw = strides
  if padding == "SAME":
    pads = []
    for size, k, s in ((x.shape[1], kh, sh), (x.shape[2], kw, sw)):
      total = max((-(-size // s) - 1) * s + k - size, 0)
      pads.append((total // 2, total - total // 2))
  elif padding == "VALID":
    pads = [(0, 0), (0, 0)]
  else:
    pads = [tuple(p) for p in padding]
  x = np.pad(x, ((0, 0), pads[0], pads[1], (0, 0)))
  oh = (x.shape[1] - kh) // sh + 1
  ow = (x.shape[2] - kw) // sw + 1
  out = np.zeros((x.shape[0], oh, ow, w.shape[-1]))
  for i in range(kh):
    for j in range(kw):
      patch = x[:, i:i + sh * (oh - 1) + 1:sh, j:j + sw * (ow - 1) + 1:sw, :]
      out += np.einsum("nhwc,co->nhwo", patch, w[i, j])
  return out


def _x(shape=(2, 6, 6, 3), seed=0):
  x = np.random.default_rng(seed).uniform(-1.6, 1.6, shape).astype(np.float32)
  flat = x.reshape(-1)
  flat[:6] = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5]  # zeros of both signs, the clip boundary
  return x


def _w(shape=(3, 3, 3, 4), seed=1):
  w = np.random.default_rng(seed).uniform(-1.5, 1.5, shape).astype(np.float32)
  flat = w.reshape(-1)
  flat[:6] = [0.0, -0.0, 1.0, -1.0, 0.5, -0.5]
  return w


def _variables(module, x_shape, kernel, seed=2):
  """Variables for ``module`` with the given kernel and NumPy-drawn mapping variables.

  Shapes come from ``jax.eval_shape`` (Flax's threefry initializers compile for seconds
  per shape on 2 cores); ``test_init_*`` run the real init.
  """
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros(x_shape))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if name == "['params']['kernel']":
      assert leaf.shape == kernel.shape
      return jnp.asarray(kernel)
    if "kernel" in name:
      value = rng.normal(scale=np.sqrt(2.0 / np.prod(leaf.shape[:-1])), size=leaf.shape)
    elif "var" in name:
      value = rng.uniform(0.5, 2.0, leaf.shape)
    elif "scale" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(scale=0.3, size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return flax.core.unfreeze(jax.tree_util.tree_map_with_path(fill, abstract))


def _apply(module, train=True, mutable=False):
  return jax.jit(lambda v, x: module.apply(v, x, train=train, mutable=mutable))


# ------------------------------------------------------------------------------- conv2d

@pytest.mark.parametrize("strides,padding", [((1, 1), "SAME"), ((2, 2), "SAME"),
                                             ((1, 1), "VALID"), ((2, 2), "VALID"),
                                             ((2, 1), ((1, 0), (2, 1)))])
def test_conv2d_and_lax_reference_match_numpy(strides, padding):
  x, w = _x((2, 7, 6, 3)), _w((3, 3, 3, 4))
  ref = np_conv(x, w, strides, padding)
  np.testing.assert_allclose(np.asarray(conv2d(jnp.asarray(x), jnp.asarray(w), strides,
                                               padding)), ref, rtol=1e-5, atol=1e-5)
  if isinstance(padding, str):
    np.testing.assert_allclose(np.asarray(lax_conv(x, w, strides, padding)), ref, rtol=1e-5,
                               atol=1e-5)


# -------------------------------------------------------------------- 'sign' and 'float'

# Every stride, padding and scale twice, in six compiles rather than twelve.
@pytest.mark.parametrize("strides,padding,scale", [
    ((1, 1), "SAME", "layer"), ((2, 2), "SAME", "channel"), ((1, 1), "VALID", "none"),
    ((2, 2), "VALID", "layer"), ((2, 2), "SAME", "none"), ((1, 1), "VALID", "channel")])
def test_sign_mode_forward(strides, padding, scale):
  x, w = _x((2, 7, 7, 3)), _w((3, 3, 3, 4))
  module = BinaryConv(4, strides=strides, padding=padding, weight_binarizer="sign",
                      weight_scale=scale)
  variables = _variables(module, x.shape, w)
  assert set(variables) == {"params"} and set(variables["params"]) == {"kernel"}
  y = _apply(module)(variables, jnp.asarray(x))
  ref = lax_conv(np_sign(x), np_sign(w) * np_scale(w, scale), strides, padding)
  assert y.shape == ref.shape and y.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y), np.asarray(ref), rtol=1e-5, atol=1e-5)


def test_float_mode_is_conv_of_binarized_input_and_latent_kernel():
  x, w = _x(), _w()
  module = BinaryConv(4, weight_binarizer="float")
  y = _apply(module)(_variables(module, x.shape, w), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), np_conv(np_sign(x), w), rtol=1e-5, atol=1e-5)


def test_input_binarizer_none_keeps_real_input():
  x, w = _x(), _w()
  module = BinaryConv(4, weight_binarizer="sign", input_binarizer="none")
  y = _apply(module)(_variables(module, x.shape, w), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), np_conv(x, np_sign(w) * np_scale(w, "layer")),
                             rtol=1e-5, atol=1e-5)


def test_use_bias_adds_bias():
  x, w = _x(), _w()
  module = BinaryConv(4, use_bias=True)
  variables = _variables(module, x.shape, w)
  b = np.asarray(variables["params"]["bias"])
  assert b.shape == (4,) and np.any(b != 0)
  y = _apply(module)(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y),
                             np_conv(np_sign(x), np_sign(w) * np_scale(w, "layer")) + b,
                             rtol=1e-5, atol=1e-5)


def _grads(module, variables, x, c, train=True, mutable=False):
  def loss(params, x):
    out = module.apply({**variables, "params": params}, x, train=train, mutable=mutable)
    y = out[0] if mutable else out
    return jnp.sum(y * c)
  return jax.jit(jax.grad(loss, argnums=(0, 1)))(variables["params"], jnp.asarray(x))


def _conv_vjp(xb, wb, c):
  """dL/dxb and dL/dwb of L = sum(conv(xb, wb) * c): the gradient of the binary operands."""
  return jax.grad(lambda a, b: jnp.sum(lax_conv(a, b) * c), argnums=(0, 1))(
      jnp.asarray(xb, jnp.float32), jnp.asarray(wb, jnp.float32))


@pytest.mark.parametrize("scale", ["layer", "channel"])
@pytest.mark.parametrize("clip", [1.0, 0.5])
def test_sign_mode_gradients(scale, clip):
  x, w = _x(), _w()
  c = np.random.default_rng(3).normal(size=(2, 6, 6, 4)).astype(np.float32)
  module = BinaryConv(4, weight_binarizer="sign", weight_scale=scale, clip=clip)
  gp, gx = _grads(module, _variables(module, x.shape, w), x, c)
  s = np_scale(w, scale)
  g_xb, g_wb = _conv_vjp(np_sign(x), np_sign(w) * s, c)
  # Kernel: STE-masked gradient of the binary weights times the (constant) scale.
  ref_w = np.asarray(g_wb, np.float64) * s * (np.abs(w) <= clip)
  np.testing.assert_allclose(np.asarray(gp["kernel"]), ref_w, rtol=1e-4, atol=1e-5)
  # Input: clipped STE with the default clip 1 (inclusive), independent of the weights' clip.
  ref_x = np.asarray(g_xb, np.float64) * (np.abs(x) <= 1.0)
  np.testing.assert_allclose(np.asarray(gx), ref_x, rtol=1e-4, atol=1e-5)
  assert np.any(ref_w == 0) and np.any(ref_w != 0)


def test_approx_sign_input_binarizer_forward_and_gradient():
  x, w = _x(), _w()
  c = np.random.default_rng(4).normal(size=(2, 6, 6, 4)).astype(np.float32)
  module = BinaryConv(4, weight_binarizer="sign", input_binarizer="approx_sign")
  variables = _variables(module, x.shape, w)
  wb = np_sign(w) * np_scale(w, "layer")
  np.testing.assert_allclose(np.asarray(_apply(module)(variables, jnp.asarray(x))),
                             np_conv(np_sign(x), wb), rtol=1e-5, atol=1e-5)
  _, gx = _grads(module, variables, x, c)
  g_xb, _ = _conv_vjp(np_sign(x), wb, c)
  ax = np.abs(x.astype(np.float64))
  ref_x = np.asarray(g_xb, np.float64) * np.where(ax < 1, 2 - 2 * ax, 0.0)
  np.testing.assert_allclose(np.asarray(gx), ref_x, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("bad", [dict(weight_binarizer="xnor"), dict(input_binarizer="relu")])
def test_invalid_binarizers_raise(bad):
  with pytest.raises(ValueError):
    BinaryConv(4, **bad).init(jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 2)))


# ---------------------------------------------------------------------------- 'lns' mode

def _lns_setup(scale="layer", mapping_output="raw", mapping_ste="clip_grad", mapping_clip=1.0):
  x, w = _x(), _w()
  module = BinaryConv(4, weight_binarizer="lns", weight_scale=scale,
                      mapping_output=mapping_output, mapping_ste=mapping_ste,
                      mapping_clip=mapping_clip)
  return module, _variables(module, x.shape, w), x, w


def _mapping_vars(variables):
  return {"params": variables["params"]["mapping"],
          "batch_stats": variables["batch_stats"]["mapping"]}


@pytest.mark.parametrize("train,scale", [(True, "layer"), (False, "channel")])
def test_lns_mode_sows_pairs_and_convolves_sign_of_q_hat(train, scale):
  module, variables, x, w = _lns_setup(scale)
  assert set(variables) == {"params", "batch_stats"}
  assert set(variables["params"]) == {"kernel", "mapping"}
  y, state = _apply(module, train, mutable=[LNS_COLLECTION, "batch_stats"])(
      variables, jnp.asarray(x))
  pairs = state[LNS_COLLECTION]["pairs"]
  assert len(pairs) == 1
  q_hat, q_tilde = pairs[0]
  # Labels: exactly sign(W) (Eq. 1), including sign(0) = sign(-0.0) = +1.
  np.testing.assert_array_equal(np.asarray(q_tilde), np_sign(w))
  assert q_tilde.dtype == jnp.float32 and q_hat.shape == w.shape
  # q_hat = f_theta(W) with this layer's mapping variables.
  if train:
    ref_q, ref_upd = MappingNet().apply(_mapping_vars(variables), jnp.asarray(w), train=True,
                                        mutable=["batch_stats"])
    jax.tree_util.tree_map(
        lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6),
        state["batch_stats"]["mapping"], ref_upd["batch_stats"])
  else:
    ref_q = MappingNet().apply(_mapping_vars(variables), jnp.asarray(w), train=False)
    jax.tree_util.tree_map(np.testing.assert_array_equal, state["batch_stats"],
                           variables["batch_stats"])
  np.testing.assert_allclose(np.asarray(q_hat), np.asarray(ref_q), rtol=1e-5, atol=1e-6)
  # The conv uses sign(q_hat) * s, s from the latent W.
  ref_y = np_conv(np_sign(x), np_sign(np.asarray(q_hat)) * np_scale(w, scale))
  np.testing.assert_allclose(np.asarray(y), ref_y, rtol=1e-5, atol=1e-5)


def test_lns_mode_without_mutable_lns_does_not_sow():
  module, variables, x, _ = _lns_setup()
  y = _apply(module, train=False)(variables, jnp.asarray(x))
  assert y.shape == (2, 6, 6, 4)


def test_lns_mode_tanh_mapping_output():
  module, variables, x, _ = _lns_setup(mapping_output="tanh")
  _, state = _apply(module, True, mutable=[LNS_COLLECTION, "batch_stats"])(
      variables, jnp.asarray(x) * 10)
  q_hat = np.asarray(state[LNS_COLLECTION]["pairs"][0][0])
  assert np.all(np.abs(q_hat) <= 1.0)


@pytest.mark.parametrize("ste,clip", [("clip_grad", 1.0), ("clip_grad", 1e-4), ("window", 1.0)])
def test_lns_mode_gradients(ste, clip):
  module, variables, x, w = _lns_setup(mapping_ste=ste, mapping_clip=clip)
  c = np.random.default_rng(5).normal(size=(2, 6, 6, 4)).astype(np.float32)
  c_pair = np.random.default_rng(6).normal(size=w.shape).astype(np.float32)

  @jax.jit
  def grads(params):
    def run(p):
      y, state = module.apply({**variables, "params": p}, jnp.asarray(x), train=True,
                              mutable=[LNS_COLLECTION, "batch_stats"])
      q_hat, q_tilde = state[LNS_COLLECTION]["pairs"][0]
      return jnp.sum(y * c), jnp.sum(q_hat * c_pair), jnp.sum(q_tilde * c_pair)
    # One compile: the gradients of the output, of q_hat and of q_tilde.
    return jax.jacrev(run)(params)

  gp, g_hat, g_tilde = grads(variables["params"])
  # Gradients reach the latent kernel and every mapping parameter (theta).
  assert np.all(np.isfinite(np.asarray(gp["kernel"]))) and np.any(gp["kernel"] != 0)
  for leaf in jax.tree_util.tree_leaves(gp["mapping"]):
    assert np.all(np.isfinite(np.asarray(leaf))) and np.any(np.asarray(leaf) != 0)
  # No gradient flows through the labels q_tilde (Eq. 1) ...
  for leaf in jax.tree_util.tree_leaves(g_tilde):
    np.testing.assert_array_equal(np.asarray(leaf), 0.0)
  # ... while q_hat is a differentiable path to W and theta.
  assert np.any(np.asarray(g_hat["kernel"]) != 0)
  assert np.any(np.asarray(g_hat["mapping"]["conv3"]["kernel"]) != 0)

  # Chain rule by hand: dL/dWb from the conv, times s, through the STE on q_hat
  # ('window': masked by |q_hat| <= clip; 'clip_grad': the value clipped to
  # [-clip, clip]), pulled back through f_theta (train mode) to W.
  mv = _mapping_vars(variables)
  f = lambda k: MappingNet().apply(mv, k, train=True, mutable=["batch_stats"])[0]
  f_and_pullback = jax.jit(lambda k, g: (f(k), jax.vjp(f, k)[1](g)[0]))
  q_hat, _ = f_and_pullback(jnp.asarray(w), jnp.zeros(w.shape, jnp.float32))
  s = np_scale(w, "layer")
  _, g_wb = _conv_vjp(np_sign(x), np_sign(np.asarray(q_hat)) * s, c)
  g_q = np.asarray(g_wb, np.float64) * s
  if ste == "window":
    g_q = g_q * (np.abs(np.asarray(q_hat)) <= clip)
  else:
    g_q = np.clip(g_q, -clip, clip)
  _, ref_w = f_and_pullback(jnp.asarray(w), jnp.asarray(g_q, jnp.float32))
  np.testing.assert_allclose(np.asarray(gp["kernel"]), np.asarray(ref_w), rtol=1e-3,
                             atol=1e-5)


# --------------------------------------------------------------------------------- init

@pytest.mark.parametrize("binarizer", ["lns", "sign", "float"])
def test_init_leaves_no_lns_collection(binarizer):
  # eval_shape runs init's Python (is_initializing() is true) without compiling it.
  module = BinaryConv(3, weight_binarizer=binarizer)
  abstract = jax.eval_shape(module.init, jax.random.PRNGKey(0), jnp.zeros((1, 5, 5, 2)))
  assert set(abstract) == ({"params", "batch_stats"} if binarizer == "lns" else {"params"})
  assert abstract["params"]["kernel"].shape == (3, 3, 2, 3)
  assert abstract["params"]["kernel"].dtype == jnp.float32


# ---------------------------------------------------------------------- binary_weights

@pytest.mark.parametrize("scale", ["layer", "channel", "none"])
def test_binary_weights(scale):
  module, variables, x, w = _lns_setup(scale)
  mv = _mapping_vars(variables)
  np.testing.assert_array_equal(np.asarray(binary_weights(jnp.asarray(w), "float")), w)
  np.testing.assert_allclose(np.asarray(binary_weights(jnp.asarray(w), "sign",
                                                       weight_scale=scale)),
                             np_sign(w) * np_scale(w, scale), rtol=1e-6)
  bw = np.asarray(binary_weights(jnp.asarray(w), "lns", mv, weight_scale=scale))
  q_eval = np.asarray(MappingNet().apply(mv, jnp.asarray(w), train=False))
  np.testing.assert_allclose(bw, np_sign(q_eval) * np_scale(w, scale), rtol=1e-6)
  # The eval-mode layer is exactly the conv of sign(x) with these inference weights.
  y = _apply(module, train=False)(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), np_conv(np_sign(x), bw), rtol=1e-5, atol=1e-5)
