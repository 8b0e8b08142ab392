"""The binarization mapping ``q_hat = f_theta(W)`` (Eq. 4, Sec. 4.1).

A conv kernel ``W`` of shape ``(k, k, c, n)`` (Flax HWIO) holds ``n`` filters, each a
``k x k`` image with ``c`` channels. ``f_theta`` maps every filter with one set of
parameters: three 3x3 stride-1 SAME convs ``c -> 2c -> 2c -> c`` with BatchNorm + ReLU
after the first two. The filter axis becomes the batch axis, which is the same as
``vmap`` over filters but one batched conv, so BatchNorm statistics are taken over
the layer's filters (and their k x k positions).

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

Array = jax.Array

MAPPING_OUTPUTS = ("raw", "tanh")
# How f_theta starts (config.mapping.init): the paper's random network, or at sign(W).
MAPPING_INITS = ("random", "sign")


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

  Attributes:
    output: ``'raw'`` (DESIGN decision 1: the last conv's output is ``q_hat``) or
      ``'tanh'`` (squashed to (-1, 1)).
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

  @nn.compact
  def __call__(self, kernel: Array, train: bool = True) -> Array:
    """``q_hat``; with ``start='sign'`` it is ``W / mean|W| + net(W)`` whose last conv
    starts at zero, so ``sign(q_hat) = sign(W)`` before training (an option of ours, not
    the paper's Sec. 4.1 network; it spares warmup from undoing a random start)."""
    if kernel.ndim != 4:
      raise ValueError(f"MappingNet expects a (k, k, c, n) kernel, got shape {kernel.shape}.")
    if self.output not in MAPPING_OUTPUTS:
      raise ValueError(f"mapping output must be one of {MAPPING_OUTPUTS}, got {self.output!r}.")
    if self.start not in MAPPING_INITS:
      raise ValueError(f"mapping init must be one of {MAPPING_INITS}, got {self.start!r}.")
    c = kernel.shape[2]
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), strides=(1, 1), padding="SAME",
                             dtype=self.dtype)
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
  """Variables ``{'params', 'batch_stats'}`` of a MappingNet for ``kernel_shape``."""
  return MappingNet(output=output, start=init).init(rng, jnp.zeros(kernel_shape), train=False)


def map_weights(variables, kernel: Array, train: bool = False, output: str = "raw",
                init: str = "random"):
  """Pure-function form of ``f_theta`` (Eq. 4).

  BatchNorm always uses the statistics of the layer's filters, so ``q_hat`` is the
  same in both modes; ``train=True`` also returns the updated running averages:
  ``(q_hat, new_batch_stats)``.
  """
  net = MappingNet(output=output, start=init)
  if train:
    q_hat, updates = net.apply(variables, kernel, train=True, mutable=["batch_stats"])
    return q_hat, updates["batch_stats"]
  return net.apply(variables, kernel, train=False)
