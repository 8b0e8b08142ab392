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
  """NHWC x HWIO convolution (the binary conv of Eq. 2 on +-1 operands).

  ``x``: ``(n, h, w, c)``, ``w``: ``(kh, kw, c, features)``, one floating dtype (integer
  operands are cast to float32); ``padding``: ``'SAME'``, ``'VALID'`` or per-axis pairs.
  """
  x, w = quantizers.as_floating(x, "conv2d: x"), quantizers.as_floating(w, "conv2d: w")
  if not isinstance(padding, str):
    padding = tuple(tuple(p) for p in padding)
  return lax.conv_general_dilated(x, w, window_strides=tuple(strides), padding=padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


class BinaryConv(nn.Module):
  """Convolution with binarized inputs and weights (Eq. 2-4), NHWC in, NHWC out.

  Call: ``y = BinaryConv(features, weight_binarizer=...)(x, train)``; the kernel is HWIO
  (``params/kernel``, float32).

  Weight binarizers (DECISIONS.md 1, 2):
    ``'float'``: the latent kernel as it is (full-precision reference);
    ``'sign'``: ``ste_sign(W) * s`` (baseline, Eq. 1-3);
    ``'lns'``: ``sign(q_hat) * s`` with ``q_hat = f_theta(W)`` (Eq. 4), its own
      ``MappingNet`` (``params/mapping``, ``batch_stats/mapping``); ``(q_hat, q_tilde =
      sign(W))`` is sown into the ``'lns'`` collection (``LNS_COLLECTION``) under
      ``'pairs'``, for Eq. 15-21 without mapping again: :func:`lns_jax.collect_pairs`
      turns it into the objective's input. ``q_tilde`` is under ``stop_gradient`` (Eq. 1:
      labels, not a path). ``mapping_ste`` is how ``sign(q_hat)`` passes the gradient
      (:func:`lns_jax.quantizers.mapping_sign`, DECISIONS.md 1); ``mapping_conv`` how
      f_theta's convs run (``config.mapping.conv``, DECISIONS.md 15).
  Input binarizers (``input_binarizer``): ``'ste_sign'`` (clipped STE, clip 1),
  ``'approx_sign'`` (Bi-Real), ``'none'`` (real-valued inputs). Pitfall: ``sign(0) = +1``,
  so a ReLU right before a binarizing BinaryConv makes every input sign +1 (a constant
  layer); put the BatchNorm and non-linearity after it, as the ``models`` do.

  ``train``: only an ``'lns'`` layer uses it: ``train=True`` moves f_theta's running
  BatchNorm averages (``'batch_stats'`` must then be mutable; they never enter
  ``q_hat``, which is normalised with its filters' own statistics, DECISIONS.md 8).
  Collections to make mutable in ``apply``: ``'batch_stats'`` (train mode) and ``'lns'``
  (to get the pairs; without it nothing is sown and Eq. 21 has no auxiliary term, which
  :func:`lns_jax.lns_objective` refuses for ``alpha > 0``). A layer applied twice sows
  two equal pairs; :func:`lns_jax.collect_pairs` keeps one. ``clip`` and
  ``mapping_clip`` are static; gradients are reverse mode only (straight-through rules).

  The scale ``s`` (``weight_scale``) is computed from the latent ``W`` under
  ``stop_gradient``, as DoReFa does, so gradients to ``W`` are exactly the STE's.
  ``conv`` (``config.model.conv``): ``'xla'`` is XLA's float conv of the ±1 values,
  ``'packed'`` the XNOR/popcount forward with 1-bit residuals
  (:mod:`lns_jax.xnor_conv`; same gradients), ``'bits'`` XLA's float forward with the
  same 1-bit residuals, ``'auto'`` packed on a CPU backend. Packing applies when both
  inputs and weights are binary (not ``'float'``/``'none'``), ``'bits'`` when the inputs
  are (the weights may be real: ReActNet's step 1), and both when ``dtype`` is float32.
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
  conv: str = "xla"  # 'xla' | 'packed' | 'bits' | 'auto' (lns_jax.xnor_conv)
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
    impl = xnor_conv.resolve(self.conv)
    forward = "xla" if impl == "bits" else "packed"
    # The 1-bit-residual paths (lns_jax.xnor_conv): 'packed' needs binary weights, 'bits'
    # (XLA's forward) also takes real ones (ReActNet's step 1).
    one_bit = ((impl == "bits" or (impl == "packed" and self.weight_binarizer != "float"))
               and self.input_binarizer != "none" and jnp.dtype(self.dtype) == jnp.float32)
    # ste_sign is folded into the 1-bit conv (its mask kept as bits); others binarize first.
    fold_ste = one_bit and self.input_binarizer == "ste_sign"
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
    if one_bit:
      s = 1.0 if scale is None else scale  # real weights have no scale
      if fold_ste:
        # The clip binarize_input uses: ste_sign's default (1.0), not self.clip.
        y = xnor_conv.ste_binary_conv(x_real.astype(jnp.float32), w, s, 1.0, self.strides,
                                      self.padding, forward)
      else:
        y = xnor_conv.binary_conv(x.astype(jnp.float32), w, s, self.strides, self.padding,
                                  forward)
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
  ``sign(W)`` for ``'sign'``, the kernel itself for ``'float'``. ``mapping_variables``:
  the layer's ``{'params': ..., 'batch_stats': ...}`` ``'mapping'`` subtrees (``'lns'``
  only); the ``mapping_*`` arguments must be the layer's. An integer kernel: float32.
  """
  kernel = quantizers.as_floating(kernel, "binary_weights: kernel")
  if weight_binarizer == "float":
    return kernel
  scale = quantizers.weight_scale(kernel, weight_scale)
  if weight_binarizer == "sign":
    return quantizers.sign(kernel) * scale
  q_hat = MappingNet(output=mapping_output, start=mapping_init, conv_impl=mapping_conv).apply(
      mapping_variables, kernel, train=False)
  return quantizers.sign(q_hat) * scale
