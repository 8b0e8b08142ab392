"""The binarization mapping ``q_hat = f_theta(W)`` (Eq. 4, Sec. 4.1).

A conv kernel ``W`` of shape ``(k, k, c, n)`` (Flax HWIO) holds ``n`` filters, each a
``k x k`` image with ``c`` channels. ``f_theta`` maps every filter with one set of
parameters: three 3x3 stride-1 SAME convs ``c -> 2c -> 2c -> c`` with BatchNorm + ReLU
after the first two. The filter axis becomes the batch axis, which is the same as
``vmap`` over filters but one batched conv, so BatchNorm statistics are taken over
the layer's filters (and their k x k positions).

``config.mapping.conv`` (``MappingNet.conv_impl``) runs those convs as XLA's conv or as
Winograd F(3x3, 3x3) (:func:`winograd_conv3x3`: a 3x3 SAME conv over a 3x3 image with
25 products per channel pair instead of 49 taps), which is faster on a CPU for layers of
256 channels or more (``'auto'``, the default; DECISIONS 15); the parameters are the same.

The mapping normalises with those statistics in training *and* evaluation: the
"batch" is the layer's own filters, not data, so ``f_theta(W)`` is a deterministic
function of ``W`` and theta, and evaluation, flip rates and export binarize with
exactly the weights the train step used (the 'prove LNS' issue measured 0.15-0.4% of
signs differing when evaluation used lagging running averages). The running averages
are still kept (``train=True`` updates them) for inspection and old checkpoints.
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lns_jax.quantizers import as_floating

Array = jax.Array

MAPPING_OUTPUTS = ("raw", "tanh")
# How f_theta starts (config.mapping.init): the paper's random network, or at sign(W).
MAPPING_INITS = ("random", "sign")
# How f_theta's convs run (config.mapping.conv): XLA's conv, Winograd F(3x3, 3x3), or
# 'auto': Winograd on a CPU backend for layers of WINOGRAD_MIN_CHANNELS input channels
# or more, where it measured faster (DECISIONS 15), XLA's conv otherwise.
MAPPING_CONVS = ("xla", "winograd", "auto")
WINOGRAD_MIN_CHANNELS = 256

# Winograd F(3, 3) on a length-3 signal with one zero of padding each side: the three
# outputs are the middle coefficients of the product of two degree-2 polynomials (the
# signal's and the reversed taps'), so five products, at 0, 1, -1, 2 and infinity, give
# them. _B evaluates the signal, _G the taps, _A interpolates: y = _A[(_B x) * (_G w)].
_POINTS = (0.0, 1.0, -1.0, 2.0)
_B = np.array([[p**k for k in range(3)] for p in _POINTS] + [[0, 0, 1]], np.float64)
_G = _B[:, ::-1]
_A = np.linalg.inv(np.array([[p**k for k in range(5)] for p in _POINTS] + [[0, 0, 0, 0, 1]],
                            np.float64))[1:4]


def _along(m, x, axis):
  """``m @ x`` along ``axis`` as weighted sums of slices (m is 5x3 or 3x5: elementwise
  ops that XLA fuses, where a dot would be a tiny matmul each)."""
  parts = [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]
  rows = []
  for row in m:
    terms = [p * jnp.asarray(c, x.dtype) for c, p in zip(row, parts) if abs(c) > 1e-12]
    rows.append(sum(terms[1:], terms[0]))
  return jnp.stack(rows, axis)


def winograd_conv3x3(x: Array, kernel: Array) -> Array:
  """SAME, stride-1 3x3 conv of ``(n, 3, 3, c)`` images with a ``(3, 3, c, d)`` HWIO
  kernel as Winograd F(3x3, 3x3): 25 products per channel pair instead of the 49 taps
  that land inside a 3x3 image (25 ``(n, c) @ (c, d)`` matmuls). Equals
  ``lax.conv_general_dilated`` to float rounding, gradients included (autodiff)."""
  if x.ndim != 4 or x.shape[1:3] != (3, 3) or kernel.shape[:2] != (3, 3):
    raise ValueError(f"winograd_conv3x3 takes (n, 3, 3, c) images and a (3, 3, c, d) kernel, "
                     f"got {x.shape} and {kernel.shape}.")
  n, c, d = x.shape[0], x.shape[-1], kernel.shape[-1]
  xe = _along(_B, _along(_B, x, 1), 2)                            # (n, 5, 5, c)
  ke = _along(_G, _along(_G, kernel, 0), 1).reshape(25, c, d)      # (25, c, d)
  xe = jnp.transpose(xe, (1, 2, 0, 3)).reshape(25, n, c)
  m = jax.lax.dot_general(xe, ke, (((2,), (1,)), ((0,), (0,))))   # (25, n, d)
  m = jnp.transpose(m.reshape(5, 5, n, d), (2, 0, 1, 3))
  return _along(_A, _along(_A, m, 1), 2)


def _winograd_conv_general(lhs, rhs, window_strides, padding, **kwargs):
  """``lax.conv_general_dilated`` as ``nn.Conv`` calls it inside :class:`MappingNet`
  (NHWC x HWIO, 3x3 over 3x3 images, SAME, stride 1), done by :func:`winograd_conv3x3`."""
  plain = (tuple(window_strides) == (1, 1) and padding == "SAME"
           and kwargs.get("feature_group_count", 1) == 1
           and all(tuple(kwargs.get(k) or (1, 1)) == (1, 1)
                   for k in ("lhs_dilation", "rhs_dilation")))
  if not plain:
    raise ValueError("the Winograd mapping conv supports only f_theta's 3x3 SAME stride-1 convs.")
  return winograd_conv3x3(lhs, rhs)


def resolve_conv(conv: str, channels: int) -> str:
  """``config.mapping.conv`` for a layer of ``channels`` input channels: 'xla' or
  'winograd' (``'auto'``: Winograd on a CPU backend from WINOGRAD_MIN_CHANNELS up)."""
  if conv not in MAPPING_CONVS:
    raise ValueError(f"mapping conv must be one of {MAPPING_CONVS}, got {conv!r}.")
  if conv == "auto":
    cpu = jax.default_backend() == "cpu"
    return "winograd" if cpu and channels >= WINOGRAD_MIN_CHANNELS else "xla"
  return conv


def kernel_to_images(kernel: Array) -> Array:
  """``(k, k, c, n)`` HWIO kernel -> ``(n, k, k, c)`` batch of filter images."""
  return jnp.moveaxis(kernel, -1, 0)


def images_to_kernel(images: Array) -> Array:
  """Inverse of :func:`kernel_to_images`."""
  return jnp.moveaxis(images, 0, -1)


class FilterNorm(nn.Module):
  """BatchNorm whose statistics are always those of its input (the layer's filters).

  Same variables as ``flax.linen.BatchNorm`` (``params: scale, bias``; ``batch_stats:
  mean, var``) and the same arithmetic (``var = E[x^2] - E[x]^2``); ``update_stats``
  moves the running averages, which never enter the output.
  """
  momentum: float = 0.9
  epsilon: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, update_stats: bool = False) -> Array:
    features = x.shape[-1]
    scale = self.param("scale", nn.initializers.ones, (features,), jnp.float32)
    bias = self.param("bias", nn.initializers.zeros, (features,), jnp.float32)
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    axes = tuple(range(x.ndim - 1))
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axes)
    var = jnp.maximum(0.0, jnp.mean(jnp.square(xf), axes) - jnp.square(mean))
    if update_stats and not self.is_initializing():
      ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
      ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var
    y = (xf - mean) * (jax.lax.rsqrt(var + self.epsilon) * scale) + bias
    return y.astype(self.dtype)


class MappingNet(nn.Module):
  """``f_theta`` of Eq. 4: maps a latent kernel to ``q_hat`` of the same shape.

  Called on a ``(k, k, c, n)`` HWIO kernel (an integer kernel is computed in float32);
  ``q_hat`` has the kernel's shape and floating dtype. Variables: ``params`` and
  ``batch_stats`` (the running averages, moved only with ``train=True`` and
  ``'batch_stats'`` mutable; they never enter ``q_hat``: DECISIONS.md 8).

  Attributes:
    output: ``'raw'`` (DECISIONS.md 1b: the last conv's output is ``q_hat``) or
      ``'tanh'`` (squashed to (-1, 1)).
    start: ``'random'`` (the paper's Sec. 4.1) or ``'sign'`` (DECISIONS.md 1c).
    bn_momentum: momentum of the running BatchNorm statistics.
  """
  output: str = "raw"
  start: str = "random"  # config.mapping.init; `init` is taken by nn.Module.init
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32
  # A NamedSharding over a 1-D device mesh: each device maps 1/N of the layer's filters
  # (the filter axis is f_theta's batch axis), BatchNorm statistics are reduced across
  # devices, and q_hat is gathered whole for the conv. A layer whose filter count N
  # does not divide stays replicated. None: no constraint (one device, or replicated).
  filter_sharding: Any = None
  # config.mapping.conv: 'xla' | 'winograd' | 'auto' (resolve_conv); the parameters are the
  # same either way, q_hat agrees to float rounding.
  conv_impl: str = "xla"

  @nn.compact
  def __call__(self, kernel: Array, train: bool = True) -> Array:
    """``q_hat``; with ``start='sign'`` it is ``W / mean|W| + net(W)`` whose last conv
    starts at zero, so ``sign(q_hat) = sign(W)`` before training (an option of ours, not
    the paper's Sec. 4.1 network; it spares warmup from undoing a random start)."""
    kernel = as_floating(kernel, "MappingNet: kernel")
    if kernel.ndim != 4:
      raise ValueError(f"MappingNet expects a (k, k, c, n) kernel, got shape {kernel.shape}.")
    if self.output not in MAPPING_OUTPUTS:
      raise ValueError(f"mapping output must be one of {MAPPING_OUTPUTS}, got {self.output!r}.")
    if self.start not in MAPPING_INITS:
      raise ValueError(f"mapping init must be one of {MAPPING_INITS}, got {self.start!r}.")
    c = kernel.shape[2]
    winograd = ({"conv_general_dilated": _winograd_conv_general}
                if resolve_conv(self.conv_impl, c) == "winograd" else {})
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), strides=(1, 1), padding="SAME",
                             dtype=self.dtype, **winograd)
    norm = functools.partial(FilterNorm, momentum=self.bn_momentum, dtype=self.dtype)
    x = kernel_to_images(kernel)
    split = self.filter_sharding is not None and x.shape[0] % self.filter_sharding.mesh.size == 0
    if split:
      x = jax.lax.with_sharding_constraint(x, self.filter_sharding)
    x = nn.relu(norm(name="bn1")(conv(2 * c, use_bias=False, name="conv1")(x), train))
    x = nn.relu(norm(name="bn2")(conv(2 * c, use_bias=False, name="conv2")(x), train))
    if self.start == "sign":
      x = conv(c, use_bias=True, kernel_init=nn.initializers.zeros, name="conv3")(x)
      scale = jax.lax.stop_gradient(jnp.mean(jnp.abs(kernel)) + 1e-12)
      x = x + kernel_to_images(kernel) / scale
    else:
      x = conv(c, use_bias=True, name="conv3")(x)
    if self.output == "tanh":
      x = jnp.tanh(x)
    if split:  # the whole q_hat on every device, for the conv and the auxiliary loss
      x = jax.lax.with_sharding_constraint(
          x, jax.sharding.NamedSharding(self.filter_sharding.mesh, jax.sharding.PartitionSpec()))
    return images_to_kernel(x).astype(kernel.dtype)


def init_mapping(rng: Array, kernel_shape: Tuple[int, ...], output: str = "raw",
                 init: str = "random"):
  """Variables ``{'params', 'batch_stats'}`` of a MappingNet for ``kernel_shape``.

  ``kernel_shape``: ``(k, k, c, n)``; theta depends on ``c`` only (one f_theta maps
  every filter). ``output`` and ``init``: :class:`MappingNet`'s ``output`` and ``start``;
  pass the same to :func:`map_weights`.
  """
  return MappingNet(output=output, start=init).init(rng, jnp.zeros(kernel_shape), train=False)


def map_weights(variables, kernel: Array, train: bool = False, output: str = "raw",
                init: str = "random", conv: str = "xla"):
  """Pure-function form of ``f_theta`` (Eq. 4): ``q_hat`` of ``kernel`` (``(k, k, c, n)``).

  ``variables``: :func:`init_mapping`'s, or a BinaryConv's ``'mapping'`` subtree of
  ``params`` and ``batch_stats``. BatchNorm always uses the statistics of the layer's
  filters, so ``q_hat`` is the same in both modes; ``train=True`` also returns the
  updated running averages: ``(q_hat, new_batch_stats)``. ``conv``:
  ``config.mapping.conv``. An integer kernel is computed in float32.
  """
  net = MappingNet(output=output, start=init, conv_impl=conv)
  if train:
    q_hat, updates = net.apply(variables, kernel, train=True, mutable=["batch_stats"])
    return q_hat, updates["batch_stats"]
  return net.apply(variables, kernel, train=False)
