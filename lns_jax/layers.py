"""``BinaryConv``: a drop-in Flax conv with binary weights and activations (Eq. 2-4)."""

from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple, Union

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from lns_jax import quantizers, xnor_conv
from lns_jax.mapping import MappingNet

Array = jax.Array

WEIGHT_BINARIZERS = ("float", "sign", "lns")
# The collection BinaryConv sows (q_hat, q_tilde) into, for the objective of Eq. 21.
LNS_COLLECTION = "lns"

PaddingLike = Union[str, Sequence[Tuple[int, int]]]


def conv2d(x: Array, w: Array, strides=(1, 1), padding: PaddingLike = "SAME") -> Array:
  """NHWC x HWIO convolution (the binary conv of Eq. 2 on +-1 operands)."""
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
  return lax.conv_general_dilated(x, w, window_strides=tuple(strides), padding=padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BinaryConv(nn.Module):
  """Convolution with binarized inputs and weights.

  Weight binarizers (DESIGN decisions 1-2):
    ``'float'``: the latent kernel as it is (full-precision reference);
    ``'sign'``: ``ste_sign(W) * s`` (baseline, Eq. 1-3);
    ``'lns'``: ``sign(q_hat) * s`` with ``q_hat = f_theta(W)`` (Eq. 4), its own
      ``MappingNet``; ``(q_hat, q_tilde = sign(W))`` is sown into the ``'lns'``
      collection under ``'pairs'`` so the trainer computes Eq. 15-21 without mapping
      again. ``q_tilde`` is under ``stop_gradient`` (Eq. 1: labels, not a path).
      ``mapping_ste`` is how ``sign(q_hat)`` passes the gradient
      (:func:`lns_jax.quantizers.mapping_sign`; DESIGN decision 1, DECISIONS 1);
      ``mapping_conv`` how f_theta's convs run (``config.mapping.conv``, DECISIONS 15).
  The scale ``s`` (``weight_scale``) is computed from the latent ``W`` under
  ``stop_gradient``, as DoReFa does, so gradients to ``W`` are exactly the STE's.
  ``conv`` (``config.model.conv``): ``'xla'`` is XLA's float conv of the ±1 values,
  ``'packed'`` the XNOR/popcount forward with 1-bit residuals
  (:mod:`lns_jax.xnor_conv`; same gradients), ``'auto'`` packed on a CPU backend.
  Packing applies when both inputs and weights are binary (not ``'float'``/``'none'``)
  and ``dtype`` is float32.
  """
  features: int
  kernel_size: Sequence[int] = (3, 3)
  strides: Sequence[int] = (1, 1)
  padding: PaddingLike = "SAME"
  use_bias: bool = False
  weight_binarizer: str = "sign"
  input_binarizer: str = "ste_sign"
  weight_scale: str = "layer"
  clip: Optional[float] = 1.0
  mapping_output: str = "raw"
  mapping_clip: Optional[float] = 1.0
  mapping_ste: str = "clip_grad"
  mapping_init: str = "random"
  mapping_conv: str = "xla"  # MappingNet.conv_impl (config.mapping.conv)
  mapping_sharding: Any = None  # MappingNet.filter_sharding: split f_theta over devices
  conv: str = "xla"  # 'xla' | 'packed' | 'auto' (lns_jax.xnor_conv)
  kernel_init: Callable = nn.initializers.kaiming_normal()
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: Array, train: bool = True) -> Array:
    if self.weight_binarizer not in WEIGHT_BINARIZERS:
      raise ValueError(f"weight_binarizer must be one of {WEIGHT_BINARIZERS}, "
                       f"got {self.weight_binarizer!r}.")
    binarize_input = quantizers.get_input_binarizer(self.input_binarizer)
    kernel = self.param("kernel", self.kernel_init,
                        (*self.kernel_size, x.shape[-1], self.features), jnp.float32)
    packed = (xnor_conv.resolve(self.conv) == "packed" and self.weight_binarizer != "float"
              and self.input_binarizer != "none" and jnp.dtype(self.dtype) == jnp.float32)
    # ste_sign is folded into the packed conv (1-bit residuals); others binarize first.
    fold_ste = packed and self.input_binarizer == "ste_sign"
    x_real = x
    if not fold_ste:
      x = binarize_input(x)
    scale = None
    if self.weight_binarizer == "float":
      w = kernel
    elif self.weight_binarizer == "sign":
      # = quantizers.binarize_weights(kernel, ...): ste_sign(W) * s, s under stop_gradient
      w = quantizers.ste_sign(kernel, self.clip)
      scale = lax.stop_gradient(quantizers.weight_scale(kernel, self.weight_scale))
    else:
      scale = lax.stop_gradient(quantizers.weight_scale(kernel, self.weight_scale))
      q_hat = MappingNet(output=self.mapping_output, start=self.mapping_init,
                         conv_impl=self.mapping_conv, filter_sharding=self.mapping_sharding,
                         name="mapping")(kernel, train=train)
      q_tilde = lax.stop_gradient(quantizers.sign(kernel))
      if not self.is_initializing():  # init must not leave stale pairs in the variables
        self.sow(LNS_COLLECTION, "pairs", (q_hat, q_tilde))
      w = quantizers.mapping_sign(q_hat, self.mapping_ste, self.mapping_clip)
    if fold_ste:
      # The clip binarize_input uses: ste_sign's default (1.0), not self.clip.
      y = xnor_conv.ste_binary_conv(x_real.astype(jnp.float32), w, scale, 1.0,
                                    self.strides, self.padding)
    elif packed:
      y = xnor_conv.binary_conv(x.astype(jnp.float32), w, scale, self.strides, self.padding)
    else:
      if scale is not None:
        w = w * scale
      y = conv2d(x.astype(self.dtype), w.astype(self.dtype), self.strides, self.padding)
    if self.use_bias:
      y = y + self.param("bias", nn.initializers.zeros, (self.features,), jnp.float32)
    return y


def binary_weights(kernel: Array, weight_binarizer: str, mapping_variables=None,
                   weight_scale: str = "layer", mapping_output: str = "raw",
                   mapping_init: str = "random", mapping_conv: str = "xla") -> Array:
  """Inference-time weights of a BinaryConv: ``sign(.) * s`` without gradients.

  ``sign(q_hat)`` for ``'lns'`` (the paper keeps only these; the mapping normalises with
  its filters' statistics, so these are the train step's signs bit for bit),
  ``sign(W)`` for ``'sign'``, the kernel itself for ``'float'``.
  """
  if weight_binarizer == "float":
    return kernel
  scale = quantizers.weight_scale(kernel, weight_scale)
  if weight_binarizer == "sign":
    return quantizers.sign(kernel) * scale
  q_hat = MappingNet(output=mapping_output, start=mapping_init, conv_impl=mapping_conv).apply(
      mapping_variables, kernel, train=False)
  return quantizers.sign(q_hat) * scale
