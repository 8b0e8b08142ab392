"""The binarization mapping ``q_hat = f_theta(W)`` (Eq. 4, Sec. 4.1).

A conv kernel ``W`` of shape ``(k, k, c, n)`` (Flax HWIO) holds ``n`` filters, each a
``k x k`` image with ``c`` channels. ``f_theta`` maps every filter with one set of
parameters: three 3x3 stride-1 SAME convs ``c -> 2c -> 2c -> c`` with BatchNorm + ReLU
after the first two. The filter axis becomes the batch axis, which is the same as
``vmap`` over filters but one batched conv, so BatchNorm statistics are taken over
the layer's filters (and their k x k positions).
"""

from __future__ import annotations

import functools
from typing import Any, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

MAPPING_OUTPUTS = ("raw", "tanh")


def kernel_to_images(kernel: Array) -> Array:
  """``(k, k, c, n)`` HWIO kernel -> ``(n, k, k, c)`` batch of filter images."""
  return jnp.moveaxis(kernel, -1, 0)


def images_to_kernel(images: Array) -> Array:
  """Inverse of :func:`kernel_to_images`."""
  return jnp.moveaxis(images, 0, -1)


class MappingNet(nn.Module):
  """``f_theta`` of Eq. 4: maps a latent kernel to ``q_hat`` of the same shape.

  Attributes:
    output: ``'raw'`` (DESIGN decision 1: the last conv's output is ``q_hat``) or
      ``'tanh'`` (squashed to (-1, 1)).
    bn_momentum: momentum of the running BatchNorm statistics.
  """
  output: str = "raw"
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, kernel: Array, train: bool = True) -> Array:
    if kernel.ndim != 4:
      raise ValueError(f"MappingNet expects a (k, k, c, n) kernel, got shape {kernel.shape}.")
    if self.output not in MAPPING_OUTPUTS:
      raise ValueError(f"mapping output must be one of {MAPPING_OUTPUTS}, got {self.output!r}.")
    c = kernel.shape[2]
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), strides=(1, 1), padding="SAME",
                             dtype=self.dtype)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, dtype=self.dtype)
    x = kernel_to_images(kernel)
    x = nn.relu(norm(name="bn1")(conv(2 * c, use_bias=False, name="conv1")(x)))
    x = nn.relu(norm(name="bn2")(conv(2 * c, use_bias=False, name="conv2")(x)))
    x = conv(c, use_bias=True, name="conv3")(x)
    if self.output == "tanh":
      x = jnp.tanh(x)
    return images_to_kernel(x).astype(kernel.dtype)


def init_mapping(rng: Array, kernel_shape: Tuple[int, ...], output: str = "raw"):
  """Variables ``{'params', 'batch_stats'}`` of a MappingNet for ``kernel_shape``."""
  return MappingNet(output=output).init(rng, jnp.zeros(kernel_shape), train=False)


def map_weights(variables, kernel: Array, train: bool = False, output: str = "raw"):
  """Pure-function form of ``f_theta`` (Eq. 4).

  Returns ``q_hat`` in eval mode (running BatchNorm statistics), or
  ``(q_hat, new_batch_stats)`` in train mode (statistics over the layer's filters).
  """
  net = MappingNet(output=output)
  if train:
    q_hat, updates = net.apply(variables, kernel, train=True, mutable=["batch_stats"])
    return q_hat, updates["batch_stats"]
  return net.apply(variables, kernel, train=False)
