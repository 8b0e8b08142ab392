"""Binary AlexNet (Table 5): DoReFa-style, first conv and last dense layer full precision.

The five convs follow the single-tower AlexNet (96-256-384-384-256 filters, 11/5/3/3/3
kernels) with BatchNorm after each layer as in DoReFa/XNOR-Net. The two hidden dense
layers (4096) are binary too; they are binarized with ``sign`` even in ``'lns'`` mode,
because a mapping network on a 9216-channel "filter" would be larger than AlexNet
itself (the paper maps conv layers, Sec. 4.1).
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lns_jax.models.common import BinaryNet


class AlexNet(BinaryNet):
  num_classes: int = 1000
  widths: tuple = (96, 256, 384, 384, 256)
  hidden: int = 4096

  @nn.compact
  def __call__(self, x, train: bool = True):
    def binary(features, kernel, name, weights=None):
      conv = self.binary_conv(weight_binarizer=weights or self.weight_binarizer)
      return conv(features, kernel, name=name)
    norm = self.batch_norm(train)
    pool = functools.partial(nn.max_pool, window_shape=(3, 3), strides=(2, 2))
    w = self.widths
    x = nn.Conv(w[0], (11, 11), strides=(4, 4), padding=[(2, 2), (2, 2)], use_bias=False,
                dtype=self.dtype, name="conv1")(x)
    # Every binary layer's input is sign(BN(.)) with the BN right before the sign, as in
    # XNOR-Net (pool -> BN -> sign -> conv): no ReLU (sign(0) = +1 makes sign(relu(.)) +1
    # everywhere) and no max-pool between BN and sign (a max of 9 centred values is almost
    # always positive); either made the output independent of the image.
    x = norm(name="bn1")(pool(x))
    x = norm(name="bn2")(pool(binary(w[1], (5, 5), "conv2")(x, train)))
    x = norm(name="bn3")(binary(w[2], (3, 3), "conv3")(x, train))
    x = norm(name="bn4")(binary(w[3], (3, 3), "conv4")(x, train))
    x = norm(name="bn5")(pool(binary(w[4], (3, 3), "conv5")(x, train)))
    # The dense layers as 1x1 convs over the flattened features (binary, 'sign').
    dense_w = "float" if self.weight_binarizer == "float" else "sign"
    x = x.reshape(x.shape[0], 1, 1, -1)
    x = norm(name="bn6")(binary(self.hidden, (1, 1), "fc6", weights=dense_w)(x, train))
    x = norm(name="bn7")(binary(self.hidden, (1, 1), "fc7", weights=dense_w)(x, train))
    x = nn.relu(x.reshape(x.shape[0], -1))
    return nn.Dense(self.num_classes, dtype=self.dtype, name="fc8")(x)


AlexNetTiny = functools.partial(AlexNet, widths=(4, 8, 8, 8, 8), hidden=16)
