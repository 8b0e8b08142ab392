"""Tests for lns_jax.mapping: f_theta of Eq. 4 / Sec. 4.1 against a NumPy forward pass.

f_theta maps a (k, k, c, n) HWIO kernel filter by filter: each filter is a k x k image with
c channels; three 3x3 stride-1 SAME convs c -> 2c -> 2c -> c, BatchNorm + ReLU after the
first two, BatchNorm statistics over the layer's filters (and k x k positions).
"""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lns_jax import mapping
from lns_jax.mapping import MappingNet, init_mapping
from lns_jax.mapping import map_weights as _map_weights_eager

EPS = 1e-5        # flax BatchNorm default epsilon
MOMENTUM = 0.9    # MappingNet default bn_momentum

# Op-by-op dispatch compiles every primitive per shape; one jit per shape is cheaper.
map_weights = jax.jit(_map_weights_eager, static_argnames=("train", "output", "init"))

SHAPES = [(3, 2, 4), (1, 3, 2), (3, 1, 5), (3, 2, 1), (5, 2, 3), (1, 1, 1)]


def _kernel(k, c, n, seed=0):
  return np.random.default_rng(seed).normal(scale=0.7, size=(k, k, c, n)).astype(np.float32)


def np_conv_same3(x, w, b=None):
  """3x3 stride-1 SAME (zero-padded) NHWC x HWIO cross-correlation in float64."""
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  n, h, wd, _ = x.shape
  xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  out = np.zeros((n, h, wd, w.shape[-1]))
  for di in range(3):
    for dj in range(3):
      out += np.einsum("nhwc,co->nhwo", xp[:, di:di + h, dj:dj + wd, :], w[di, dj])
  return out if b is None else out + np.asarray(b, np.float64)


def np_bn(x, scale, bias, mean, var):
  return (x - mean) / np.sqrt(np.asarray(var, np.float64) + EPS) * scale + bias


def np_mapping(variables, kernel, train, output="raw"):
  """Independent forward of f_theta; returns (q_hat, batch statistics used per BN)."""
  p, s = variables["params"], variables["batch_stats"]
  x = np.moveaxis(np.asarray(kernel, np.float64), -1, 0)  # (n, k, k, c)
  stats = {}
  for conv, bn in (("conv1", "bn1"), ("conv2", "bn2")):
    h = np_conv_same3(x, p[conv]["kernel"])
    if train:
      mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
    else:
      mean, var = np.asarray(s[bn]["mean"]), np.asarray(s[bn]["var"])
    stats[bn] = (mean, var)
    x = np.maximum(np_bn(h, p[bn]["scale"], p[bn]["bias"], mean, var), 0.0)
  x = np_conv_same3(x, p["conv3"]["kernel"], p["conv3"]["bias"])
  if output == "tanh":
    x = np.tanh(x)
  return np.moveaxis(x, 0, -1), stats


def _variables(kernel_shape, seed=1, output="raw", fresh_stats=False):
  """MappingNet variables with NumPy-drawn values (shapes from ``jax.eval_shape``).

  Flax's initializers compile threefry per shape (seconds each on 2 cores), so the
  values come from NumPy: random kernels, nontrivial BN scale/bias, conv3 bias and
  running statistics (``fresh_stats``: mean 0, var 1, as at init), so every part matters.
  """
  rng = np.random.default_rng(seed)
  abstract = jax.eval_shape(lambda: init_mapping(jax.random.PRNGKey(0), kernel_shape, output))

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.normal(scale=np.sqrt(2.0 / fan_in), size=leaf.shape)
    elif "var" in name:
      value = np.ones(leaf.shape) if fresh_stats else rng.uniform(0.5, 2.0, leaf.shape)
    elif "mean" in name and fresh_stats:
      value = np.zeros(leaf.shape)
    elif "scale" in name:
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:
      value = rng.normal(scale=0.5, size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, abstract)


def _shapes(tree):
  return jax.tree_util.tree_map(lambda a: tuple(a.shape), flax.core.unfreeze(tree))


# ------------------------------------------------------------------------------- shapes

def _expected_shapes(c):
  return {
      "params": {
          "conv1": {"kernel": (3, 3, c, 2 * c)},
          "bn1": {"scale": (2 * c,), "bias": (2 * c,)},
          "conv2": {"kernel": (3, 3, 2 * c, 2 * c)},
          "bn2": {"scale": (2 * c,), "bias": (2 * c,)},
          "conv3": {"kernel": (3, 3, 2 * c, c), "bias": (c,)},
      },
      "batch_stats": {"bn1": {"mean": (2 * c,), "var": (2 * c,)},
                      "bn2": {"mean": (2 * c,), "var": (2 * c,)}},
  }


def test_init_mapping_real_init():
  # A non-threefry key: threefry compiles for seconds per shape on 2 cores.
  variables = jax.jit(init_mapping, static_argnums=(1, 2))(jax.random.key(0, impl="rbg"),
                                                          (3, 3, 2, 3))
  assert _shapes(variables) == _expected_shapes(2)
  # Flax defaults at init: BN scale 1, bias 0, running mean 0, var 1; conv3 bias 0.
  for bn in ("bn1", "bn2"):
    np.testing.assert_array_equal(np.asarray(variables["params"][bn]["scale"]), 1.0)
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"][bn]["var"]), 1.0)
    np.testing.assert_array_equal(np.asarray(variables["batch_stats"][bn]["mean"]), 0.0)
  np.testing.assert_array_equal(np.asarray(variables["params"]["conv3"]["bias"]), 0.0)
  assert np.std(np.asarray(variables["params"]["conv1"]["kernel"])) > 0


@pytest.mark.parametrize("k,c,n", SHAPES)
def test_output_and_parameter_shapes(k, c, n):
  kernel = _kernel(k, c, n)
  variables = _variables(kernel.shape)
  assert _shapes(variables) == _expected_shapes(c)
  assert set(variables) == {"params", "batch_stats"}
  assert _shapes(variables["params"]) == {
      "conv1": {"kernel": (3, 3, c, 2 * c)},
      "bn1": {"scale": (2 * c,), "bias": (2 * c,)},
      "conv2": {"kernel": (3, 3, 2 * c, 2 * c)},
      "bn2": {"scale": (2 * c,), "bias": (2 * c,)},
      "conv3": {"kernel": (3, 3, 2 * c, c), "bias": (c,)},
  }
  assert _shapes(variables["batch_stats"]) == {
      "bn1": {"mean": (2 * c,), "var": (2 * c,)}, "bn2": {"mean": (2 * c,), "var": (2 * c,)}}
  q_hat = map_weights(variables, jnp.asarray(kernel))
  assert q_hat.shape == kernel.shape and q_hat.dtype == jnp.float32


def test_parameter_shapes_independent_of_n_and_k():
  shapes = [_shapes(jax.eval_shape(lambda s=s: init_mapping(jax.random.PRNGKey(0), s)))
            for s in [(3, 3, 4, 1), (3, 3, 4, 17), (5, 5, 4, 2), (1, 1, 4, 300)]]
  assert all(x == shapes[0] for x in shapes)
  assert shapes[0] == _expected_shapes(4)


def test_invalid_inputs_raise():
  with pytest.raises(ValueError):
    MappingNet().init(jax.random.PRNGKey(0), jnp.zeros((3, 3, 2)), train=False)
  with pytest.raises(ValueError):
    MappingNet(output="sigmoid").init(jax.random.PRNGKey(0), jnp.zeros((3, 3, 2, 2)),
                                      train=False)


# ------------------------------------------------------------------ forward vs NumPy

@pytest.mark.parametrize("k,c,n,output", [(3, 2, 4, "raw"), (1, 3, 2, "tanh"), (5, 1, 3, "raw")])
def test_eval_forward_matches_numpy(k, c, n, output):
  # Eval mode normalises with the statistics of the layer's filters, as training does
  # (the mapping's "batch" is the layer's filters: f_theta(W) is deterministic in W).
  kernel = _kernel(k, c, n, seed=2)
  variables = _variables(kernel.shape, seed=5, output=output)
  got = map_weights(variables, jnp.asarray(kernel), train=False, output=output)
  ref, _ = np_mapping(variables, kernel, train=True, output=output)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-4, atol=1e-5)


def test_eval_and_train_mode_give_identical_q_hat_whatever_the_running_averages():
  kernel = jnp.asarray(_kernel(3, 2, 5, seed=14))
  variables = _variables(kernel.shape, seed=15)
  stale = jax.tree_util.tree_map(lambda x: x * 0 + 7.0, variables["batch_stats"])
  q_train, _ = map_weights(variables, kernel, train=True)
  for bs in (variables["batch_stats"], stale):
    q_eval = map_weights({"params": variables["params"], "batch_stats": bs}, kernel)
    np.testing.assert_array_equal(np.asarray(q_eval), np.asarray(q_train))


@pytest.mark.parametrize("k,c,n", [(3, 2, 4), (1, 2, 3), (3, 1, 1)])
def test_train_forward_and_batch_statistics_match_numpy(k, c, n):
  kernel = _kernel(k, c, n, seed=3)
  variables = _variables(kernel.shape, seed=4)
  q_hat, new_stats = map_weights(variables, jnp.asarray(kernel), train=True)
  ref, stats = np_mapping(variables, kernel, train=True)
  np.testing.assert_allclose(np.asarray(q_hat), ref, rtol=1e-4, atol=1e-4)
  # Running statistics: m <- momentum * m + (1 - momentum) * batch statistic, where the
  # batch statistic is over (filters, k, k) of the conv output (biased variance).
  for bn in ("bn1", "bn2"):
    mean, var = stats[bn]
    old = variables["batch_stats"][bn]
    np.testing.assert_allclose(np.asarray(new_stats[bn]["mean"]),
                               MOMENTUM * np.asarray(old["mean"]) + (1 - MOMENTUM) * mean,
                               rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(new_stats[bn]["var"]),
                               MOMENTUM * np.asarray(old["var"]) + (1 - MOMENTUM) * var,
                               rtol=1e-4, atol=1e-5)


def test_bn1_batch_statistics_over_filters_from_intermediates():
  kernel = _kernel(3, 2, 6, seed=5)
  variables = _variables(kernel.shape, fresh_stats=True)
  _, state = MappingNet().apply(variables, jnp.asarray(kernel), train=True,
                                mutable=["batch_stats", "intermediates"],
                                capture_intermediates=True)
  h = np.asarray(state["intermediates"]["conv1"]["__call__"][0], np.float64)
  assert h.shape == (6, 3, 3, 4)  # (filters, k, k, 2c): filters are the batch axis
  # conv1 of the filter images, recomputed in NumPy.
  np.testing.assert_allclose(h, np_conv_same3(np.moveaxis(kernel, -1, 0),
                                              variables["params"]["conv1"]["kernel"]),
                             rtol=1e-4, atol=1e-5)
  mean, var = h.mean(axis=(0, 1, 2)), h.var(axis=(0, 1, 2))
  np.testing.assert_allclose(np.asarray(state["batch_stats"]["bn1"]["mean"]),
                             (1 - MOMENTUM) * mean, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(state["batch_stats"]["bn1"]["var"]),
                             MOMENTUM + (1 - MOMENTUM) * var, rtol=1e-4, atol=1e-6)
  bn1 = np.asarray(state["intermediates"]["bn1"]["__call__"][0], np.float64)
  p = variables["params"]["bn1"]
  np.testing.assert_allclose(bn1, np_bn(h, p["scale"], p["bias"], mean, var), rtol=1e-3,
                             atol=1e-4)


# ------------------------------------------------------------------ filter independence

def test_filters_are_coupled_through_batchnorm_in_both_modes():
  # The statistics are over the layer's filters: changing one filter changes the others'
  # q_hat, in train and in eval mode alike.
  kernel = _kernel(3, 2, 4, seed=8)
  variables = _variables(kernel.shape, seed=9)
  other = kernel.copy()
  other[..., 0] *= 3.0
  for train in (True, False):
    a = map_weights(variables, jnp.asarray(kernel), train=train)
    b = map_weights(variables, jnp.asarray(other), train=train)
    a, b = (a[0], b[0]) if train else (a, b)
    assert not np.allclose(np.asarray(a)[..., 1:], np.asarray(b)[..., 1:], atol=1e-6)


# --------------------------------------------------------------------- pure function API

def test_map_weights_equals_module_apply():
  kernel = jnp.asarray(_kernel(3, 2, 3, seed=10))
  variables = _variables(kernel.shape, seed=11)
  np.testing.assert_allclose(np.asarray(_map_weights_eager(variables, kernel)),
                             np.asarray(MappingNet().apply(variables, kernel, train=False)),
                             rtol=1e-6, atol=1e-7)
  q, stats = _map_weights_eager(variables, kernel, train=True)
  q_ref, upd = MappingNet().apply(variables, kernel, train=True, mutable=["batch_stats"])
  np.testing.assert_array_equal(np.asarray(q), np.asarray(q_ref))
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats, upd["batch_stats"])
  # Pure: the input variables are not modified.
  assert not np.allclose(np.asarray(stats["bn1"]["mean"]),
                         np.asarray(variables["batch_stats"]["bn1"]["mean"]))


def test_tanh_output_in_open_interval_and_is_tanh_of_raw():
  kernel = jnp.asarray(_kernel(3, 2, 4, seed=12) * 50.0)
  variables = _variables(kernel.shape, seed=13)
  raw = np.asarray(map_weights(variables, kernel, output="raw"), np.float64)
  t = np.asarray(map_weights(variables, kernel, output="tanh"), np.float64)
  assert np.abs(raw).max() > 1.0  # the raw mapping leaves (-1, 1) here
  assert np.all(np.abs(t) <= 1.0)
  np.testing.assert_allclose(t, np.tanh(raw), rtol=1e-5, atol=1e-6)
  small = np.asarray(map_weights(variables, kernel * 1e-3, output="tanh"))
  assert np.all(np.abs(small) < 1.0)


def test_sign_init_starts_at_sign_of_w_and_trains_away_from_it():
  kernel = jnp.asarray(_kernel(3, 4, 6, seed=16))
  v = init_mapping(jax.random.PRNGKey(3), kernel.shape, init="sign")
  q_hat = np.asarray(map_weights(v, kernel, init="sign"))
  # The last conv starts at zero: q_hat = W / mean|W|, so sign(q_hat) = sign(W).
  np.testing.assert_allclose(q_hat, np.asarray(kernel) / np.mean(np.abs(np.asarray(kernel))),
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(v["params"]["conv3"]["kernel"]), 0.0)
  # theta still gets a gradient (through the zero-initialised last conv) ...
  g = jax.grad(lambda p: jnp.sum(map_weights({**v, "params": p}, kernel, init="sign") ** 3))(
      v["params"])
  assert np.abs(np.asarray(g["conv3"]["kernel"])).max() > 0
  # ... and the random init does not start at sign(W).
  q_rand = np.asarray(map_weights(init_mapping(jax.random.PRNGKey(3), kernel.shape), kernel))
  assert np.mean(np.sign(q_rand) != np.sign(np.asarray(kernel))) > 0.1


# config.mapping.conv: f_theta's convs as Winograd F(3x3, 3x3) (lns_jax.mapping).
def _xla_conv(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME",
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


@pytest.mark.parametrize("n,c,d", [(5, 4, 6), (1, 1, 1), (16, 8, 3)])
def test_winograd_conv3x3_equals_xlas_conv_with_gradients(n, c, d):
  rng = np.random.default_rng(n)
  x, k, g = (jnp.asarray(rng.standard_normal(s), jnp.float32)
             for s in [(n, 3, 3, c), (3, 3, c, d), (n, 3, 3, d)])
  y_ref, vjp_ref = jax.vjp(_xla_conv, x, k)
  y, vjp = jax.vjp(mapping.winograd_conv3x3, x, k)
  for a, b in zip((y, *vjp(g)), (y_ref, *vjp_ref(g))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6 * float(jnp.max(jnp.abs(b))))


def test_winograd_conv3x3_refuses_other_shapes():
  with pytest.raises(ValueError, match="takes \\(n, 3, 3, c\\) images"):
    mapping.winograd_conv3x3(jnp.zeros((2, 4, 4, 3)), jnp.zeros((3, 3, 3, 5)))


@pytest.mark.parametrize("output,init", [("raw", "random"), ("tanh", "sign")])
def test_winograd_mapping_equals_the_xla_one_with_gradients_and_statistics(output, init):
  """Same parameters, q_hat to float rounding; gradients to theta and W and the running
  statistics likewise, and no convolution left in the program."""
  kernel = jnp.asarray(_kernel(3, 6, 10))
  v = init_mapping(jax.random.key(0), kernel.shape, output, init)

  def run(conv):
    net = MappingNet(output=output, start=init, conv_impl=conv)

    def objective(params, w):
      q, upd = net.apply({"params": params, "batch_stats": v["batch_stats"]}, w, train=True,
                         mutable=["batch_stats"])
      return jnp.sum(jnp.square(q - jnp.sign(w))), (q, upd["batch_stats"])
    fn = jax.jit(jax.grad(objective, argnums=(0, 1), has_aux=True))
    return fn.lower(v["params"], kernel).as_text(), fn(v["params"], kernel)

  hlo_x, ref = run("xla")
  hlo_w, out = run("winograd")
  assert "convolution" in hlo_x and "convolution" not in hlo_w
  for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * float(jnp.max(jnp.abs(b))))


def test_auto_is_winograd_on_a_cpu_from_256_channels(monkeypatch):
  assert mapping.resolve_conv("auto", 255) == "xla"
  assert mapping.resolve_conv("auto", mapping.WINOGRAD_MIN_CHANNELS) == "winograd"
  assert mapping.resolve_conv("winograd", 1) == "winograd"
  assert mapping.resolve_conv("xla", 4096) == "xla"
  with pytest.raises(ValueError, match="mapping conv must be one of"):
    mapping.resolve_conv("fft", 8)

  def hlo(c):
    k = jnp.zeros((3, 3, c, 2))
    net = MappingNet(conv_impl="auto")
    v = jax.eval_shape(lambda: net.init(jax.random.key(0), k, train=False))
    return jax.jit(lambda v, k: net.apply(v, k, train=False)).lower(v, k).as_text()
  assert "convolution" in hlo(255) and "convolution" not in hlo(256)
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")  # not measured there: XLA's
  assert mapping.resolve_conv("auto", 4096) == "xla" and "convolution" in hlo(256)
