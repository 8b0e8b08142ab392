"""The binary conv of a train step on packed bits: XNOR/popcount forward, 1-bit residuals.

``binary_conv(xb, wb, scale, strides, padding)`` is ``conv(xb, wb * scale)`` (NHWC x
HWIO, as :func:`lns_jax.layers.conv2d`) for ±1 inputs ``xb`` and ±1 weights ``wb``:

* forward: ``xb`` packed along channels, ``wb`` along its input axis, the conv done by
  :func:`lns_jax.bitpack.xnor_conv2d_packed` in int32 (exact: an integer sum of ±1
  products), times ``scale`` once;
* saved for the backward pass: the packed ``xb`` (1 bit per activation, 32x less than
  the float32 ±1 tensor autodiff keeps), ``wb`` and ``scale``; :func:`ste_binary_conv`
  takes the real input and folds in ``ste_sign``, keeping the bits of ``1{|x| <= clip}``
  instead of the float input ``ste_sign`` keeps for its mask;
* backward: the gradients autodiff gives the float path, ``d xb = conv^T(g, wb * scale)``
  and ``d wb = conv_w(xb, g) * scale``, by the same XLA convolutions on the same values
  (``xb`` unpacked bit for bit), so they equal the float path's to float rounding;
  ``scale`` gets no gradient (``BinaryConv`` takes it under ``stop_gradient``).

``conv(xb, wb) * scale`` and ``conv(xb, wb * scale)`` differ only by rounding: the
float conv rounds each partial sum of ``±scale``, the packed one multiplies the exact
integer sum once. ``xb`` and ``wb`` must be ±1 (``sign`` outputs, ``sign(0) = +1``):
any other value is taken by its sign (by the packed forward and the backward; XLA's
forward takes it as it is), so this is not a general conv.

Speed (``benchmarks/train_step.py``, rows 'packed'): on the 2-core AVX-512 VPOPCNTDQ
CPU the packed forward of ResNet-20's layers is 3-6x faster than XLA:CPU's float conv
and the whole step ~1.2x. Not measured on a GPU/TPU, whose float convs are far faster
than their elementwise popcounts are likely to be: ``config.model.conv='auto'`` packs on
a CPU backend only.

``config.model.conv='bits'`` keeps the 1-bit residuals and this backward but computes the
forward with XLA's float conv (``forward='xla'``). The packed forward is a chain of
elementwise ops, which XLA fuses into, and so recomputes in, each consumer of the conv's
output; a ReActNet unit has many (BatchNorm, the shortcut, RPReLU, the next RSign and their
gradients), and there 'bits' is the fastest: ReActNet-20's step 179 ms against 211 with
'xla' and 240 packed (DECISIONS 26). ResNet-20's is fastest packed (133 against 150 'bits').
"""

from __future__ import annotations

import functools
from typing import Sequence, Tuple, Union

import jax
import jax.numpy as jnp
from jax import lax

from lns_jax import bitpack, quantizers

Array = jax.Array
Padding = Union[str, Sequence[Tuple[int, int]]]

CONV_IMPLS = ("auto", "xla", "packed", "bits")


def resolve(impl: str) -> str:
  """``'auto'`` -> ``'packed'`` on a CPU backend, ``'xla'`` elsewhere."""
  if impl not in CONV_IMPLS:
    raise ValueError(f"conv must be one of {CONV_IMPLS}, got {impl!r}.")
  if impl == "auto":
    return "packed" if jax.default_backend() == "cpu" else "xla"
  return impl


def _float_conv(x, w, strides, padding):
  return lax.conv_general_dilated(x, w, window_strides=strides, padding=padding,
                                  dimension_numbers=("NHWC", "HWIO", "NHWC"))


def _static(strides, padding):
  strides = tuple(int(s) for s in strides)
  if not isinstance(padding, str):
    padding = tuple((int(lo), int(hi)) for lo, hi in padding)
  return strides, padding


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _binary_conv(xb, wb, scale, strides, padding, float_forward):
  y, _ = _fwd(xb, wb, scale, strides, padding, float_forward)
  return y


def _fwd(xb, wb, scale, strides, padding, float_forward):
  xp = bitpack.pack_bits(xb, axis=-1)
  if float_forward:  # 'bits': XLA's conv, an op XLA never recomputes in its consumers
    y = _float_conv(xb, (wb * scale).astype(xb.dtype), strides, padding)
  else:
    wp = bitpack.pack_bits(wb, axis=2)
    acc = bitpack.xnor_conv2d_packed(xp, wp, xb.shape[-1], strides, padding)
    y = acc.astype(xb.dtype) * scale.astype(xb.dtype)
  return y, (xp, wb, scale)


def _bwd(strides, padding, float_forward, res, g):
  del float_forward  # the backward is the same
  xp, wb, scale = res
  c_in = wb.shape[2]
  xb = bitpack.unpack_bits(xp, c_in, axis=-1, dtype=g.dtype)
  w = (wb * scale).astype(g.dtype)
  _, vjp = jax.vjp(lambda x, w_: _float_conv(x, w_, strides, padding), xb, w)
  dx, dw = vjp(g)
  return dx.astype(g.dtype), (dw * scale).astype(wb.dtype), jnp.zeros_like(scale)


_binary_conv.defvjp(_fwd, _bwd)


# The same conv with the input's sign and its clipped STE (quantizers.ste_sign) folded in:
# the backward needs only the bits of sign(x) and of 1{|x| <= clip}, so nothing of the
# float input is kept (ste_sign alone keeps x itself for its mask).
@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _ste_binary_conv(x, wb, scale, clip, strides, padding, float_forward):
  y, _ = _ste_fwd(x, wb, scale, clip, strides, padding, float_forward)
  return y


def _ste_fwd(x, wb, scale, clip, strides, padding, float_forward):
  # The packed forward packs x's sign itself; XLA's conv needs the ±1 values.
  xb = quantizers.sign(x) if float_forward else x
  y, (xp, wb, scale) = _fwd(xb, wb, scale, strides, padding, float_forward)
  mp = None if clip is None else bitpack.pack_bits(jnp.abs(x) <= clip, axis=-1)
  return y, (xp, mp, wb, scale)


def _ste_bwd(clip, strides, padding, float_forward, res, g):
  xp, mp, wb, scale = res
  dx, dw, ds = _bwd(strides, padding, float_forward, (xp, wb, scale), g)
  if mp is not None:
    inside = bitpack.unpack_bits(mp, wb.shape[2], axis=-1, dtype=dx.dtype) > 0
    dx = jnp.where(inside, dx, jnp.zeros_like(dx))
  return dx, dw, ds


_ste_binary_conv.defvjp(_ste_fwd, _ste_bwd)


def binary_conv(xb: Array, wb: Array, scale, strides=(1, 1),
                padding: Padding = "SAME", forward: str = "packed") -> Array:
  """``conv(xb, wb * scale)`` of ±1 ``xb`` (NHWC) and ±1 ``wb`` (HWIO), 1-bit residuals.

  ``scale``: a scalar or an array broadcasting against the output (``(1, 1, 1, C_out)``
  per channel); no gradient reaches it. Gradients to ``xb`` and ``wb`` are the float
  conv's (module docstring). ``forward``: ``'packed'`` (XNOR/popcount) or ``'xla'``
  (XLA's float conv; ``config.model.conv='bits'``).
  """
  xb, wb = jnp.asarray(xb), jnp.asarray(wb)
  if xb.ndim != 4 or wb.ndim != 4 or xb.shape[-1] != wb.shape[2]:
    raise ValueError(f"expected NHWC input and HWIO kernel with matching channels, got "
                     f"{xb.shape} and {wb.shape}.")
  scale = jnp.asarray(scale, xb.dtype)
  strides, padding = _static(strides, padding)
  return _binary_conv(xb, wb.astype(xb.dtype), scale, strides, padding,
                      _float_forward(forward))


def ste_binary_conv(x: Array, wb: Array, scale, clip=1.0, strides=(1, 1),
                    padding: Padding = "SAME", forward: str = "packed") -> Array:
  """``binary_conv(ste_sign(x, clip), wb, scale)`` with 1-bit residuals only.

  ``x`` is the real input (NHWC): its sign (``sign(0) = +1``) is convolved, and its
  gradient is the conv's times ``1{|x| <= clip}`` (``clip=None``: unmasked), exactly
  :func:`lns_jax.quantizers.ste_sign`'s rule. ``forward`` as :func:`binary_conv`'s.
  """
  x, wb = jnp.asarray(x), jnp.asarray(wb)
  if x.ndim != 4 or wb.ndim != 4 or x.shape[-1] != wb.shape[2]:
    raise ValueError(f"expected NHWC input and HWIO kernel with matching channels, got "
                     f"{x.shape} and {wb.shape}.")
  if clip is not None:
    clip = float(clip)
  scale = jnp.asarray(scale, x.dtype)
  strides, padding = _static(strides, padding)
  return _ste_binary_conv(x, wb.astype(x.dtype), scale, clip, strides, padding,
                          _float_forward(forward))


def _float_forward(forward: str) -> bool:
  if forward not in ("packed", "xla"):
    raise ValueError(f"forward must be 'packed' or 'xla', got {forward!r}.")
  return forward == "xla"
