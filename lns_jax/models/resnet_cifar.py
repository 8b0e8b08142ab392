"""CIFAR-style binary ResNet-20 (He et al., 2016), the paper's DoReFa-style baseline.

Full precision (DECISIONS.md 6): the first conv, the downsample shortcuts and the
last dense layer. Every other conv is a ``BinaryConv`` whose input is binarized with
the clipped STE (decision 7). Blocks are the standard two-conv basic block; the
residual stream stays real-valued.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax.numpy as jnp

from lns_jax.models.common import BinaryNet

ModuleDef = Any


class BasicBlock(nn.Module):
  """``bn(conv(bn(conv(x)))) + shortcut(x)`` with binary convs, FP 1x1 downsample."""
  filters: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef
  fp_conv: ModuleDef

  @nn.compact
  def __call__(self, x, train: bool = True):
    residual = x
    y = self.conv(self.filters, strides=(self.strides,) * 2, name="conv1")(x, train)
    y = self.norm(name="bn1")(y)
    y = self.conv(self.filters, name="conv2")(y, train)
    y = self.norm(name="bn2")(y)
    if residual.shape != y.shape:
      residual = self.fp_conv(self.filters, (1, 1), strides=(self.strides,) * 2,
                              name="downsample_conv")(residual)
      residual = self.norm(name="downsample_bn")(residual)
    return y + residual


class ResNetCifar(BinaryNet):
  """ResNet-(6n+2) for 32x32 (or 28x28) inputs; ``stage_sizes=(3, 3, 3)`` is ResNet-20.

  ``imagenet_stem``: a 7x7 stride-2 stem and a 3x3 stride-2 max-pool instead of the 3x3
  stem, for 224x224 inputs (the DoReFa ResNet-18 of Table 4, ``models/resnet_imagenet.py``).
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = (3, 3, 3)
  width: int = 16
  imagenet_stem: bool = False

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, fp_conv, norm = self.binary_conv(), self.fp_conv(), self.batch_norm(train)
    if self.imagenet_stem:
      x = fp_conv(self.width, (7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)],
                  name="conv_init")(x)
    else:
      x = fp_conv(self.width, (3, 3), name="conv_init")(x)
    # No ReLU before the first binary conv: with sign(0) = +1, sign(relu(.)) is +1
    # everywhere and that conv would see a constant input (as in Bi-Real Net's stem).
    x = norm(name="bn_init")(x)
    if self.imagenet_stem:
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        strides = 2 if i > 0 and j == 0 else 1
        x = BasicBlock(self.width * 2**i, strides, conv=conv, norm=norm, fp_conv=fp_conv,
                       name=f"stage{i + 1}_block{j + 1}")(x, train)
    x = nn.relu(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet20 = functools.partial(ResNetCifar, stage_sizes=(3, 3, 3), width=16)
# For tests: one block per stage, 4 channels.
ResNetTiny = functools.partial(ResNetCifar, stage_sizes=(1, 1, 1), width=4)
