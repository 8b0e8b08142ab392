"""Binarizers: sign with straight-through gradients, and weight scales.

Conventions (DESIGN.md): ``sign(0) = +1`` (``-0.0`` too), outputs keep the input's
dtype, and every gradient is a ``jax.custom_vjp`` so the rule is explicit and
independent of how XLA differentiates ``jnp.sign``.
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

WEIGHT_SCALES = ("layer", "channel", "none")


def sign(x: Array) -> Array:
  """``sign(x)`` with ``sign(0) = +1`` in ``x``'s dtype (Eq. 1); no gradient rule.

  ``x >= 0`` is true for ``-0.0``, so negative zero maps to +1 as well.
  """
  x = jnp.asarray(x)
  one = jnp.ones((), x.dtype)
  return jnp.where(x >= 0, one, -one)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _ste_sign(x, clip):
  return sign(x)


def _ste_sign_fwd(x, clip):
  return sign(x), x


def _ste_sign_bwd(clip, x, g):
  if clip is None:
    return (g,)
  # Inclusive boundary: |x| == clip still passes the gradient (DESIGN, Eq. 3).
  return (jnp.where(jnp.abs(x) <= clip, g, jnp.zeros_like(g)),)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def ste_sign(x: Array, clip: Optional[float] = 1.0) -> Array:
  """Sign with the clipped straight-through estimator (Eq. 1-3).

  Forward: ``sign(x)`` with ``sign(0) = +1``, in ``x``'s dtype.
  Backward: ``g * 1{|x| <= clip}`` (inclusive); ``clip=None`` passes ``g`` unchanged.
  """
  if clip is not None:
    clip = float(clip)
    if not clip >= 0:
      raise ValueError(f"ste_sign: clip must be >= 0 or None, got {clip}.")
  return _ste_sign(jnp.asarray(x), clip)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _sign_clip_grad(x, limit):
  return sign(x)


def _sign_clip_grad_fwd(x, limit):
  return sign(x), None


def _sign_clip_grad_bwd(limit, _, g):
  return (jnp.clip(g, -limit, limit),)


_sign_clip_grad.defvjp(_sign_clip_grad_fwd, _sign_clip_grad_bwd)


def sign_clip_grad(x: Array, limit: float = 1.0) -> Array:
  """Sign whose backward pass clips the gradient's *value*: Eq. 3 read literally.

  Forward: ``sign(x)`` (``sign(0) = +1``). Backward: ``clip(g, -limit, limit)``, with
  no window on ``x``: the gradient reaches ``x`` wherever ``x`` is (unlike
  :func:`ste_sign`, whose ``1{|x| <= clip}`` is zero outside the window).
  """
  limit = float(limit)
  if not limit > 0:
    raise ValueError(f"sign_clip_grad: limit must be > 0, got {limit}.")
  return _sign_clip_grad(jnp.asarray(x), limit)


# How sign(q_hat) passes gradients to the mapping (config.mapping.ste, DESIGN decision 1).
MAPPING_STES = ("clip_grad", "window")


def mapping_sign(q_hat: Array, ste: str = "clip_grad", clip: float = 1.0) -> Array:
  """``sign(q_hat)`` with the straight-through rule ``ste`` of the LNS conv.

  ``'window'``: :func:`ste_sign` (gradient ``1{|q_hat| <= clip}``); ``'clip_grad'``:
  :func:`sign_clip_grad` (gradient value clipped to ``[-clip, clip]``, Eq. 3 literally).
  """
  if ste == "window":
    return ste_sign(q_hat, clip)
  if ste == "clip_grad":
    return sign_clip_grad(q_hat, clip)
  raise ValueError(f"mapping ste must be one of {MAPPING_STES}, got {ste!r}.")


def dead_mask(x: Array, ste: str, clip: Optional[float]) -> Array:
  """``True`` where the straight-through gradient of ``sign(x)`` is exactly zero.

  ``'window'`` (:func:`ste_sign`): ``|x| > clip``; ``'clip_grad'``: nowhere.
  """
  if ste == "clip_grad" or clip is None:
    return jnp.zeros(jnp.shape(x), bool)
  return jnp.abs(x) > clip


@jax.custom_vjp
def approx_sign(x: Array) -> Array:
  """Bi-Real Net's ApproxSign: forward ``sign(x)`` (``sign(0) = +1``).

  Backward: ``g * (2 - 2|x|)`` for ``|x| < 1``, else 0 (the derivative of the
  piecewise-quadratic approximation of sign used by the ResNet-18 baseline).
  """
  return sign(x)


def _approx_sign_fwd(x):
  return sign(x), x


def _approx_sign_bwd(x, g):
  ax = jnp.abs(x)
  d = jnp.where(ax < 1, 2 - 2 * ax, jnp.zeros_like(ax)).astype(g.dtype)
  return (g * d,)


approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


def identity(x: Array) -> Array:
  """No binarization (full-precision activations)."""
  return x


INPUT_BINARIZERS = {
    "ste_sign": ste_sign,
    "approx_sign": approx_sign,
    "none": identity,
}


def get_input_binarizer(name: str):
  """Looks up an activation binarizer by its config name."""
  if name not in INPUT_BINARIZERS:
    raise ValueError(f"input binarizer must be one of {sorted(INPUT_BINARIZERS)}, got {name!r}.")
  return INPUT_BINARIZERS[name]


def weight_scale(w: Array, mode: str = "layer") -> Array:
  """Scaling factor ``s`` of the binary weights ``sign(W) * s`` (DESIGN decision 2).

  ``w`` is a kernel in Flax's HWIO layout (output channels last). ``'layer'``:
  ``mean|W|`` over the whole layer (DoReFa); ``'channel'``: ``mean|W|`` per output
  channel (XNOR-Net), shape ``(1, ..., 1, n)``; ``'none'``: 1. The scale is
  differentiable (as in XNOR-Net); it carries no sign information.
  """
  if mode == "layer":
    return jnp.mean(jnp.abs(w)).astype(w.dtype)
  if mode == "channel":
    axes = tuple(range(w.ndim - 1))
    return jnp.mean(jnp.abs(w), axis=axes, keepdims=True).astype(w.dtype)
  if mode == "none":
    return jnp.ones((), w.dtype)
  raise ValueError(f"weight_scale must be one of {WEIGHT_SCALES}, got {mode!r}.")


def binarize_weights(w: Array, scale: str = "layer", clip: Optional[float] = 1.0) -> Array:
  """Baseline weight binarizer ``sign(W) * s`` with the clipped STE (Eq. 1-3).

  As in ``BinaryConv`` (DoReFa convention), ``s`` is under ``stop_gradient``: the
  gradient wrt ``W`` is exactly the STE's, ``g * s * 1{|W| <= clip}``.
  """
  return ste_sign(w, clip) * jax.lax.stop_gradient(weight_scale(w, scale))
