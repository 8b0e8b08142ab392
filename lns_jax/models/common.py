"""What every binary model shares: the binarization fields and the layer factories."""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from lns_jax.layers import BinaryConv


class BinaryNet(nn.Module):
  """Base of the models: the fields that choose how binary layers binarize.

  ``weight_binarizer`` 'float' | 'sign' | 'lns' switches every BinaryConv at once.
  """
  weight_binarizer: str = "sign"
  input_binarizer: str = "ste_sign"
  weight_scale: str = "layer"
  clip: float = 1.0
  mapping_output: str = "raw"
  mapping_clip: float = 1.0
  mapping_ste: str = "clip_grad"
  mapping_init: str = "random"
  mapping_conv: str = "xla"
  mapping_sharding: Any = None
  conv: str = "xla"  # BinaryConv.conv: 'xla' | 'packed' | 'bits' | 'auto' (config.model.conv)
  bn_momentum: float = 0.9
  dtype: Any = jnp.float32

  def binary_conv(self, **overrides):
    """A BinaryConv factory with this model's binarization (flax-examples style)."""
    kwargs = dict(use_bias=False, weight_binarizer=self.weight_binarizer,
                  input_binarizer=self.input_binarizer, weight_scale=self.weight_scale,
                  clip=self.clip, mapping_output=self.mapping_output,
                  mapping_clip=self.mapping_clip, mapping_ste=self.mapping_ste,
                  mapping_init=self.mapping_init, mapping_conv=self.mapping_conv,
                  mapping_sharding=self.mapping_sharding,
                  conv=self.conv, dtype=self.dtype)
    kwargs.update(overrides)
    return functools.partial(BinaryConv, **kwargs)

  def fp_conv(self):
    """Full-precision conv factory (stem and downsample shortcuts, DECISIONS.md 6)."""
    return functools.partial(nn.Conv, use_bias=False, dtype=self.dtype,
                             kernel_init=nn.initializers.kaiming_normal())

  def batch_norm(self, train: bool):
    return functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=self.bn_momentum, dtype=self.dtype)
