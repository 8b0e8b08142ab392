"""ReActNet on the Bi-Real ResNet backbone (Liu et al., "ReActNet: Towards Precise Binary
Neural Network with Generalized Activation Functions", ECCV 2020).

ReActNet's two generalised activations, as pure functions and linen modules:

* RSign (Eq. 1 of ReActNet): ``sign(x - beta)``, a learnable threshold ``beta`` per
  channel; its gradient is the activation binarizer's (ApproxSign or the clipped STE);
* RPReLU (Eq. 2 of ReActNet): ``prelu(x - gamma) + zeta``, a learnable shift before
  and after a per-channel PReLU.

A unit (:class:`ReActUnit`) is one binary conv with its own real-valued shortcut, as
in Bi-Real Net: ``rprelu(bn(bconv(rsign(x))) + shortcut(x))``. Where the unit halves
the resolution its shortcut is a 2x2 average pool; where it doubles the channels, two
binary convs of ``C -> C`` each add the (pooled) input and are concatenated (ReActNet's
downsampling block, Fig. 4 of the paper): no real-valued 1x1 conv anywhere. RPReLU
follows the addition, as in ReActNet's code. The stem (first conv) and the classifier
are full precision. ``reactnet18`` is the Bi-Real ResNet-18 backbone (65.9% on ImageNet
in the paper); ``reactnet20`` its CIFAR-sized kin with the binary weights of ResNet-20
(its 18 binary convs' weights, in 20 convs: each downsampling conv is two).

In a unit, RSign's threshold is applied by :class:`RSign` with ``binarizer='none'`` and
the sign by the BinaryConv's own activation binarizer (``config.model.input_binarizer``):
``sign(x - beta)`` exactly, and the packed XNOR conv, the export and Larq Compute
Engine see the shift and the binary conv where they expect them. With real-valued
activations (the ``teacher`` stage) the same network is real-valued throughout.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from lns_jax import quantizers
from lns_jax.models.common import BinaryNet

Array = jax.Array
ModuleDef = Any


def rsign(x: Array, beta: Array, binarizer: str = "approx_sign") -> Array:
  """RSign (ReActNet Eq. 1): ``sign(x - beta)``, ``beta`` per channel (last axis).

  ``binarizer``: the straight-through rule (``'approx_sign'``, ``'ste_sign'``), or
  ``'none'`` for the shift alone (a unit's BinaryConv then binarizes).
  """
  return quantizers.get_input_binarizer(binarizer)(x - beta.astype(x.dtype))


def rprelu(x: Array, gamma: Array, slope: Array, zeta: Array) -> Array:
  """RPReLU (ReActNet Eq. 2): ``prelu(x - gamma) + zeta``, all three per channel."""
  y = x - gamma.astype(x.dtype)
  return jnp.where(y >= 0, y, slope.astype(x.dtype) * y) + zeta.astype(x.dtype)


class RSign(nn.Module):
  """:func:`rsign` with a learnable ``beta`` per channel, initialised at 0."""
  binarizer: str = "approx_sign"

  @nn.compact
  def __call__(self, x):
    beta = self.param("beta", nn.initializers.zeros, (x.shape[-1],), jnp.float32)
    return rsign(x, beta, self.binarizer)


class RPReLU(nn.Module):
  """:func:`rprelu` with learnable shifts (0 at init) and slopes (0.25, as PReLU)."""

  @nn.compact
  def __call__(self, x):
    c = (x.shape[-1],)
    gamma = self.param("gamma", nn.initializers.zeros, c, jnp.float32)
    slope = self.param("slope", nn.initializers.constant(0.25), c, jnp.float32)
    zeta = self.param("zeta", nn.initializers.zeros, c, jnp.float32)
    return rprelu(x, gamma, slope, zeta)


def avg_pool_2x2(x: Array) -> Array:
  """The downsampling shortcut: 2x2 average pool, stride 2 (ReActNet, Bi-Real Net)."""
  return nn.avg_pool(x, (2, 2), strides=(2, 2), padding="SAME")


class ReActUnit(nn.Module):
  """``rprelu(bn(bconv(rsign(x))) + shortcut(x))``; ``filters`` is ``C`` or ``2C``.

  ``2C`` (ReActNet's downsampling): two ``C -> C`` binary convs (``conv1``, ``conv2``,
  each with its BatchNorm) on the same ``rsign(x)``, each plus the shortcut, then
  concatenated. ``strides=2`` pools the shortcut (:func:`avg_pool_2x2`).
  """
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = True):
    c = x.shape[-1]
    if self.filters not in (c, 2 * c):
      raise ValueError(f"ReActUnit: filters must be the input's {c} channels or twice "
                       f"that, got {self.filters}.")
    shifted = RSign(binarizer="none", name="rsign")(x)  # the conv applies the sign
    shortcut = avg_pool_2x2(x) if self.strides > 1 else x
    strides = (self.strides,) * 2
    if self.filters == c:
      y = self.norm(name="bn")(self.conv(c, strides=strides, name="conv")(shifted, train))
      y = y + shortcut
    else:
      y = jnp.concatenate([
          self.norm(name=f"bn{i}")(self.conv(c, strides=strides, name=f"conv{i}")(
              shifted, train)) + shortcut for i in (1, 2)], axis=-1)
    return RPReLU(name="rprelu")(y)


class ReActNet(BinaryNet):
  """ReActNet units on a Bi-Real ResNet: two units a basic block, ``stage_sizes`` blocks.

  ``stem='imagenet'``: 7x7 stride-2 conv, BatchNorm, 3x3 stride-2 max pool (Bi-Real
  ResNet-18); ``'cifar'``: 3x3 conv and BatchNorm (28x28 / 32x32 inputs). Both full
  precision, as the classifier.
  """
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  stem: str = "imagenet"
  input_binarizer: str = "approx_sign"
  weight_scale: str = "channel"

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, fp_conv, norm = self.binary_conv(), self.fp_conv(), self.batch_norm(train)
    if self.stem == "imagenet":
      x = fp_conv(self.width, (7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)],
                  name="conv_init")(x)
    else:
      x = fp_conv(self.width, (3, 3), name="conv_init")(x)
    # No ReLU: the first unit's RSign thresholds the stem's output itself.
    x = norm(name="bn_init")(x)
    if self.stem == "imagenet":
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        for k in range(2):  # a basic block's two convs, each its own unit
          strides = 2 if i > 0 and j == 0 and k == 0 else 1
          x = ReActUnit(self.width * 2**i, strides, conv=conv, norm=norm,
                        name=f"stage{i + 1}_block{j + 1}_unit{k + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ReActNet18 = functools.partial(ReActNet, stage_sizes=(2, 2, 2, 2), width=64)
ReActNet18Tiny = functools.partial(ReActNet, stage_sizes=(1, 1, 1, 1), width=4)
# ResNet-20's size: 3 stages of 3 basic blocks, 16-32-64 channels; ResNet-20's binary
# weights (its C -> 2C downsampling conv is two C -> C convs here) and no 1x1 convs.
ReActNet20 = functools.partial(ReActNet, stage_sizes=(3, 3, 3), width=16, stem="cifar",
                               num_classes=10)
ReActNetTiny = functools.partial(ReActNet, stage_sizes=(1, 1, 1), width=4, stem="cifar",
                                 num_classes=10)
