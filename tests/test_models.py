"""Tests for lns_jax.models: shapes, which layers are binary, the sown LNS pairs, Eq. 21 grads.

Variables come from ``jax.eval_shape(model.init)`` filled with NumPy values (Flax's
threefry initializers compile for seconds per shape on 2 cores; eval_shape runs the same
init code, so it shows what init leaves). Real inits are tested for BinaryConv and
MappingNet. Full-size models are only traced (``jax.eval_shape``), never compiled.
"""

import functools

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lns_jax.layers import LNS_COLLECTION, BinaryConv
from lns_jax.loss import lns_objective
from lns_jax.models import MODELS, get_model

# XLA's CPU backend spends most of these tests compiling; its LLVM optimisation level
# does not change what is computed, and level 0 compiles the tiny models 2-3x faster.
_jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})

# name -> (input shape, binary convs with a mapping in 'lns' mode, other binary layers)
TINY = {
    "resnet_tiny": ((2, 32, 32, 3), 6, 0),
    "resnet18_tiny": ((2, 64, 64, 3), 8, 0),
    "alexnet_tiny": ((2, 64, 64, 3), 4, 2),  # fc6/fc7 are binary with 'sign' weights
    # 2 + 3 + 3: each stage's doubling unit has two convs (ReActNet's downsampling).
    "reactnet_tiny": ((2, 28, 28, 1), 8, 0),
}
NUM_CLASSES = 7


def _fill(abstract, seed=0):
  """NumPy values for an abstract variable tree: He-normal kernels, BN scale 1, mean 0,
  var 1, PReLU slopes 0.25, small random biases and BN shifts."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name = jax.tree_util.keystr(path)
    last = name.rsplit("[", 1)[-1]
    if "kernel" in last:
      value = rng.normal(scale=np.sqrt(2.0 / np.prod(leaf.shape[:-1])), size=leaf.shape)
    elif "scale" in last or "var" in last:
      value = np.ones(leaf.shape)
    elif "mean" in last:
      value = np.zeros(leaf.shape)
    elif "slope" in last:
      value = np.full(leaf.shape, 0.25)
    else:  # BatchNorm shifts, conv / dense biases
      value = rng.normal(scale=0.3, size=leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return flax.core.unfreeze(jax.tree_util.tree_map_with_path(fill, abstract))


def _abstract(model, shape):
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros(shape)))


def _pairs(lns_state):
  """{'path/to/conv': (q_hat, q_tilde)} from the sown collection."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(lns_state))
  out = {}
  for key, value in flat.items():
    assert key[-1] == "pairs" and len(value) == 1
    out["/".join(key[:-1])] = value[0]
  return out


def _trace(name, mode, shape=None):
  return _trace_cached(name, mode, tuple(shape or TINY[name][0]))


@functools.lru_cache(maxsize=None)
def _trace_cached(name, mode, shape):
  """Traces init and a train-mode apply of a model without compiling (cached per module).

  Returns (model, abstract variables, {path: (module class, weight_binarizer or None)} for
  every module call, abstract logits, abstract mutated state incl. the 'lns' collection).
  """
  model = get_model(name, num_classes=NUM_CLASSES, weight_binarizer=mode)
  abstract = _abstract(model, shape)
  seen = {}

  def interceptor(next_fun, args, kwargs, context):
    if context.method_name == "__call__":
      mod = context.module
      seen["/".join(mod.path)] = (type(mod), getattr(mod, "weight_binarizer", None))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    logits, state = jax.eval_shape(
        lambda v: model.apply(v, jnp.zeros(shape), train=True,
                              mutable=["batch_stats", LNS_COLLECTION]), abstract)
  return model, abstract, seen, logits, state


# ------------------------------------------------------------------------------ forward

# (name, mode, input shape). The 'lns' forward of resnet_tiny runs in the Eq. 21 test; that
# of resnet18_tiny is only traced (test_lns_sows_one_pair_per_binary_conv): compiled, it
# costs ~10 s of the suite's 90 s on 2 cores, and its BinaryConv 'lns' layers are the
# ones test_layers.py checks.
FORWARD_CASES = [
    ("resnet_tiny", "float", (2, 32, 32, 3)),
    ("resnet_tiny", "sign", (2, 28, 28, 1)),  # MNIST-shaped input
    ("resnet18_tiny", "float", (2, 64, 64, 3)),
    ("resnet18_tiny", "sign", (2, 64, 64, 3)),
    ("alexnet_tiny", "float", (2, 64, 64, 3)),
    ("alexnet_tiny", "sign", (2, 64, 64, 3)),
    ("alexnet_tiny", "lns", (2, 64, 64, 3)),
    ("reactnet_tiny", "sign", (2, 28, 28, 1)),
]


@pytest.mark.parametrize("name,mode,shape", FORWARD_CASES)
def test_forward_logits_shape_and_binary_inputs(name, mode, shape):
  model, abstract, _, _, _ = _trace(name, mode, shape)
  assert ("mapping" in str(jax.tree_util.tree_structure(abstract))) == (mode == "lns")
  variables = _fill(abstract)
  x = jnp.asarray(np.random.default_rng(1).normal(size=shape), jnp.float32)

  def forward(v, x):
    inputs = {}

    def record(next_fun, args, kwargs, context):
      if isinstance(context.module, BinaryConv) and context.method_name == "__call__":
        inputs["/".join(context.module.path)] = args[0]
      return next_fun(*args, **kwargs)

    with nn.intercept_methods(record):
      logits, state = model.apply(v, x, train=True, mutable=["batch_stats", LNS_COLLECTION])
    return logits, state, inputs

  logits, state, inputs = _jit(forward)(variables, x)
  assert logits.shape == (shape[0], NUM_CLASSES) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(np.asarray(logits)))
  assert not np.allclose(np.asarray(logits)[0], np.asarray(logits)[1])
  if mode == "lns":
    assert set(state) == {"batch_stats", LNS_COLLECTION}
    assert len(_pairs(state[LNS_COLLECTION])) == TINY[name][1]
  else:
    assert set(state) == {"batch_stats"}  # nothing sown outside 'lns' mode
  # Every binary conv binarizes an input that takes both signs: a ReLU right before
  # sign() (with sign(0) = +1) would make it +1 everywhere, whatever the image.
  assert len(inputs) == TINY[name][1] + TINY[name][2]
  for path, a in inputs.items():
    a = np.asarray(a)
    assert (a < 0).any() and (a >= 0).any(), path
    # ... and the two images differ after binarization.
    assert np.any(np.sign(a[0]) != np.sign(a[1])), path


# --------------------------------------------------------------------- pairs and layers

@pytest.mark.parametrize("name", sorted(TINY))
def test_lns_sows_one_pair_per_binary_conv(name):
  shape, n_mapped, n_sign = TINY[name]
  _, abstract, types, logits, state = _trace(name, "lns")
  assert set(abstract) == {"params", "batch_stats"}  # init leaves no 'lns' collection
  assert logits.shape == (shape[0], NUM_CLASSES)
  pairs = _pairs(state[LNS_COLLECTION])
  assert len(pairs) == n_mapped
  params = traverse_util.flatten_dict(flax.core.unfreeze(abstract["params"]), sep="/")
  for path, (q_hat, q_tilde) in pairs.items():
    kernel = params[path + "/kernel"]
    assert q_hat.shape == q_tilde.shape == kernel.shape
    assert any(k.startswith(path + "/mapping/") for k in params)
  # Exactly the binary convs with 'lns' weights have a mapping network.
  mapped = {k.split("/mapping/")[0] for k in params if "/mapping/" in k}
  assert mapped == set(pairs)
  binary = {p: b for p, (t, b) in types.items() if t is BinaryConv}
  assert len(binary) == n_mapped + n_sign
  assert {p for p, b in binary.items() if b == "lns"} == set(pairs)
  assert sum(b == "sign" for b in binary.values()) == n_sign


@pytest.mark.parametrize("name,full_precision", [
    ("resnet_tiny", {"conv_init": nn.Conv, "stage2_block1/downsample_conv": nn.Conv,
                     "stage3_block1/downsample_conv": nn.Conv, "head": nn.Dense}),
    ("resnet18_tiny", {"conv_init": nn.Conv, "stage2_block1_unit1/downsample_conv": nn.Conv,
                       "stage3_block1_unit1/downsample_conv": nn.Conv,
                       "stage4_block1_unit1/downsample_conv": nn.Conv, "head": nn.Dense}),
    ("alexnet_tiny", {"conv1": nn.Conv, "fc8": nn.Dense}),
    # ReActNet: no real-valued downsample conv (pooled shortcut, concatenated convs).
    ("reactnet_tiny", {"conv_init": nn.Conv, "head": nn.Dense}),
])
@pytest.mark.parametrize("mode", ["sign", "lns"])
def test_first_conv_downsample_and_head_are_full_precision(name, full_precision, mode):
  _, abstract, types, _, _ = _trace(name, mode)
  for path, cls in full_precision.items():
    assert types[path][0] is cls, (path, types[path])
  # Every downsample conv is full precision; nothing else is a plain conv or dense layer
  # outside the mapping networks.
  plain = {p for p, (t, _) in types.items()
           if t in (nn.Conv, nn.Dense) and "/mapping/" not in p}
  assert plain == set(full_precision)
  params = traverse_util.flatten_dict(flax.core.unfreeze(abstract["params"]), sep="/")
  for path, cls in full_precision.items():
    leaves = {k[len(path) + 1:] for k in params if k.startswith(path + "/")}
    assert leaves == ({"kernel"} if cls is nn.Conv else {"kernel", "bias"}), (path, leaves)


@pytest.mark.parametrize("name,shape,n_pairs", [
    ("resnet20", (1, 32, 32, 3), 18),
    ("reactnet20", (1, 28, 28, 1), 20),  # ResNet-20's 18 binary convs' weights, in 20 convs
    ("reactnet18", (1, 224, 224, 3), 19),  # 16 units, 3 of them two convs
])
def test_full_models_pair_count_by_eval_shape(name, shape, n_pairs):
  model = get_model(name, num_classes=10, weight_binarizer="lns")
  abstract = _abstract(model, shape)
  logits, state = jax.eval_shape(
      lambda v: model.apply(v, jnp.zeros(shape), train=True,
                            mutable=["batch_stats", LNS_COLLECTION]), abstract)
  assert logits.shape == (1, 10)
  pairs = _pairs(state[LNS_COLLECTION])
  assert len(pairs) == n_pairs
  if name in ("resnet20", "reactnet20"):
    widths = sorted({q.shape[-1] for q, _ in pairs.values()})
    assert widths == [16, 32, 64]
    assert all(q.shape[:2] == (3, 3) for q, _ in pairs.values())


def test_get_model_registry():
  assert set(MODELS) >= {"resnet20", "resnet_tiny", "resnet18", "resnet18_tiny", "alexnet",
                         "alexnet_tiny", "reactnet18", "reactnet20", "resnet34"}
  m = get_model("resnet_tiny", num_classes=3, weight_binarizer="lns", weight_scale="channel")
  assert m.num_classes == 3 and m.weight_binarizer == "lns" and m.weight_scale == "channel"
  with pytest.raises(ValueError, match="nope"):
    get_model("nope", num_classes=3)


# ----------------------------------------------------------------------- Eq. 21 gradient

# The jitted grad compiles for ~10 s per tiny model on 2 cores. ResNet-20's family is the
# paper's main CIFAR model; AlexNet's is the only ImageNet LNS objective checked (its trainer
# run in test_configs_run.py is pretrain only); the others' 'lns' forwards run in the forward test.
@pytest.mark.parametrize("name", ["resnet_tiny", "alexnet_tiny"])
def test_jitted_train_grad_of_eq21_objective(name):
  shape, n_mapped, _ = TINY[name]
  model, abstract, _, _, _ = _trace(name, "lns")
  variables = _fill(abstract, seed=3)
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.normal(size=shape), jnp.float32)
  y = jnp.asarray(rng.integers(0, NUM_CLASSES, shape[0]), jnp.int32)
  alpha, rho = 1.0, 0.005

  def loss(params):
    logits, state = model.apply({"params": params, "batch_stats": variables["batch_stats"]},
                                x, train=True, mutable=["batch_stats", LNS_COLLECTION])
    pairs = _pairs(state[LNS_COLLECTION])
    total, aux = lns_objective(logits, y, pairs, alpha, rho)
    return total, (logits, pairs)

  (total, (logits, pairs)), grads = _jit(jax.value_and_grad(loss, has_aux=True))(
      variables["params"])
  assert logits.shape == (shape[0], NUM_CLASSES)
  assert len(pairs) == n_mapped
  # The value is Eq. 21, recomputed in NumPy from the returned logits and pairs.
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  ce = -(z - np.log(np.exp(z).sum(-1, keepdims=True)))[np.arange(shape[0]), np.asarray(y)]
  aux = 0.0
  for q_hat, q_tilde in pairs.values():
    qh, qt = np.asarray(q_hat, np.float64), np.asarray(q_tilde, np.float64)
    np.testing.assert_array_equal(np.abs(qt), 1.0)
    aux += np.mean(((1 - rho) * (qh - qt) ** 2 - rho * (qh + qt) ** 2) / (1 - 2 * rho))
  np.testing.assert_allclose(float(total), ce.mean() + alpha * aux, rtol=1e-4)

  flat = traverse_util.flatten_dict(flax.core.unfreeze(grads), sep="/")
  for key, g in flat.items():
    assert np.all(np.isfinite(np.asarray(g))), key
  for path in pairs:
    assert np.any(np.asarray(flat[path + "/kernel"]) != 0), path
    mapping = {k: g for k, g in flat.items() if k.startswith(path + "/mapping/")}
    assert len(mapping) == 8  # conv1, bn1 (2), conv2, bn2 (2), conv3 (2)
    for key, g in mapping.items():
      assert np.any(np.asarray(g) != 0), key
  # Full-precision parameters get gradients too.
  first = "conv1" if name.startswith("alexnet") else "conv_init"
  assert np.any(np.asarray(flat[first + "/kernel"]) != 0)
