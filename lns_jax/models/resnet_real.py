"""A real-valued ImageNet ResNet (He et al., 2016), the distillation teacher of ReActNet.

ReActNet (Liu et al., ECCV 2020, Sec. 4.1) distils from a real-valued ResNet-34. This is
torchvision's layout: 7x7 stride-2 conv, BatchNorm, ReLU, 3x3 stride-2 max pool, basic
blocks ``relu(bn(conv(relu(bn(conv(x))))) + shortcut(x))`` with a 1x1 conv + BatchNorm
shortcut where the shape changes, global average pool, dense. Every layer is full
precision whatever the binarization fields say (it subclasses ``BinaryNet`` only to
take them, so that :func:`lns_jax.models.from_config` builds it like any model). It is
a teacher only: not deployable with Larq Compute Engine (it has no binary conv).
"""

from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp

from lns_jax.models.common import BinaryNet


class RealResNet(BinaryNet):
  """Real-valued ResNet with basic blocks; ``stage_sizes=(3, 4, 6, 3)`` is ResNet-34."""
  num_classes: int = 1000
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 64

  @nn.compact
  def __call__(self, x, train: bool = True):
    conv, norm = self.fp_conv(), self.batch_norm(train)
    x = conv(self.width, (7, 7), strides=(2, 2), padding=[(3, 3), (3, 3)], name="conv_init")(x)
    x = nn.relu(norm(name="bn_init")(x))
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding="SAME")
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        filters, s = self.width * 2**i, (2, 2) if i > 0 and j == 0 else (1, 1)
        name = f"stage{i + 1}_block{j + 1}"
        y = nn.relu(norm(name=f"{name}_bn1")(conv(filters, (3, 3), strides=s,
                                                  name=f"{name}_conv1")(x)))
        y = norm(name=f"{name}_bn2")(conv(filters, (3, 3), name=f"{name}_conv2")(y))
        if x.shape != y.shape:
          x = norm(name=f"{name}_downsample_bn")(
              conv(filters, (1, 1), strides=s, name=f"{name}_downsample_conv")(x))
        x = nn.relu(y + x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="head")(x)


ResNet34 = functools.partial(RealResNet, stage_sizes=(3, 4, 6, 3), width=64)
ResNet34Tiny = functools.partial(RealResNet, stage_sizes=(1, 1, 1, 1), width=4)
