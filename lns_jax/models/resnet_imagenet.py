"""ImageNet ResNet-18s: Bi-Real + PReLU (Table 3, 59.0%) and DoReFa (Table 4, 52.5%).

Every binary conv has its own real-valued identity shortcut (Liu et al., 2018), its
input is binarized with ApproxSign, and a PReLU follows its BatchNorm (DECISIONS.md
7). Full precision: the 7x7 stem, the downsample shortcuts (2x2 average pool, 1x1 conv,
BatchNorm, as in Bi-Real Net) and the classifier.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lns_jax.models.common import BinaryNet
from lns_jax.models.resnet_cifar import ResNetCifar

ModuleDef = Any


class PReLU(nn.Module):
  """Per-channel PReLU (He et al., 2015), slopes initialised at 0.25."""

  @nn.compact
  def __call__(self, x):
    slope = self.param("slope", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
    return jnp.where(x >= 0, x, slope.astype(x.dtype) * x)


class BiRealBlock(nn.Module):
  """One binary conv with its own shortcut: ``prelu(bn(conv(x))) + shortcut(x)``."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  fp_conv: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = True):
    residual = x
    y = self.conv(self.filters, strides=(self.strides,) * 2, name="conv")(x, train)
    y = PReLU(name="prelu")(self.norm(name="bn")(y))
    if residual.shape != y.shape:
      if self.strides > 1:
        residual = nn.avg_pool(residual, (2, 2), strides=(2, 2), padding="SAME")
      residual = self.fp_conv(self.filters, (1, 1), name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return y + residual


class BiRealResNet(BinaryNet):
  """Bi-Real ResNet; ``stage_sizes=(2, 2, 2, 2)`` is ResNet-18 (two convs a basic block)."""
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (2, 2, 2, 2)
  width: int = 64
  input_binarizer: str = "approx_sign"
  weight_scale: str = "channel"

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, fp_conv, norm = self.binary_conv(), self.fp_conv(), self.batch_norm(train)
    x = fp_conv(self.width, (7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)],
                name="conv_init")(x)
    # No ReLU (Bi-Real Net's stem is conv-BN-maxpool): with sign(0) = +1, sign(relu(.))
    # is +1 everywhere and the first binary conv would see a constant input.
    x = norm(name="bn_init")(x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        for k in range(2):  # a basic block's two convs, each its own Bi-Real unit
          strides = 2 if i > 0 and j == 0 and k == 0 else 1
          x = BiRealBlock(self.width * 2**i, strides, conv=conv, norm=norm, fp_conv=fp_conv,
                          name=f"stage{i + 1}_block{j + 1}_unit{k + 1}")(x, train)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet18 = functools.partial(BiRealResNet, stage_sizes=(2, 2, 2, 2), width=64)
ResNet18Tiny = functools.partial(BiRealResNet, stage_sizes=(1, 1, 1, 1), width=4)


# The DoReFa binary ResNet-18 of Table 4 (baseline 52.5%): the basic-block ResNet of
# ResNet-20 (two binary convs a block, clipped-STE sign activations, layer-wise scale,
# full-precision 1x1 downsample shortcuts and classifier) with the ImageNet 7x7 stem.
DoReFaResNet = functools.partial(ResNetCifar, imagenet_stem=True, num_classes=1000)
ResNet18DoReFa = functools.partial(DoReFaResNet, stage_sizes=(2, 2, 2, 2), width=64)
ResNet18DoReFaTiny = functools.partial(DoReFaResNet, stage_sizes=(1, 1, 1, 1), width=4)
