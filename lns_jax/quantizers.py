"""Binarizers: sign with straight-through gradients, and weight scales.

Conventions: ``sign(0) = +1`` (``-0.0`` too, Eq. 1), outputs keep the input's floating
dtype, and every gradient is a ``jax.custom_vjp`` so the rule is explicit and
independent of how XLA differentiates ``jnp.sign``. A ``custom_vjp`` has no forward-mode
rule: the straight-through functions work under ``jax.grad`` / ``jax.vjp`` (reverse mode)
and fail under ``jax.jvp`` / ``jax.jacfwd``.

Integer and bool inputs are computed as the default float dtype (:func:`as_floating`):
no function of the method does integer arithmetic (``mean|W|`` of ``[-2, 0, 3]`` is
1.667, not 1).
"""

from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp

Array = jax.Array

WEIGHT_SCALES = ("layer", "channel", "none")


def as_floating(x, name: str = "x") -> Array:
  """``x`` as a JAX array of a floating dtype (float16, bfloat16, float32, float64 kept).

  Integer and bool arrays (and Python ints) become the default float dtype (float32, or
  float64 under ``jax_enable_x64``), so the method never does integer arithmetic; a
  complex array is a ``TypeError`` naming its dtype. Works on traced values (the dtype
  is static).
  """
  x = jnp.asarray(x)
  if jnp.issubdtype(x.dtype, jnp.floating):
    return x
  if not (jnp.issubdtype(x.dtype, jnp.integer) or x.dtype == jnp.bool_):
    raise TypeError(f"{name} must be a real array (floating, integer or bool), got dtype "
                    f"{x.dtype}.")
  return x.astype(jnp.result_type(float))


def static_float(value, what: str) -> float:
  """A Python float from a static value; a traced one (an argument of ``jit``) is a clear
  ``TypeError``: it selects the gradient rule, which is fixed when the function traces."""
  if isinstance(value, jax.core.Tracer):
    raise TypeError(f"{what} must be a static Python number, not a traced value: pass it "
                    f"as a constant, or mark it static (jax.jit(..., static_argnames=...)).")
  return float(value)


def sign(x: Array) -> Array:
  """``sign(x)`` with ``sign(0) = +1`` (Eq. 1), in ``x``'s floating dtype; no gradient rule.

  ``x >= 0`` is true for ``-0.0``, so negative zero maps to +1 as well. Integer and bool
  ``x`` give float32 (:func:`as_floating`). Its gradient is zero almost everywhere: use
  :func:`ste_sign` inside a network.
  """
  x = as_floating(x)
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
  # Inclusive boundary: |x| == clip still passes the gradient (Eq. 3).
  return (jnp.where(jnp.abs(x) <= clip, g, jnp.zeros_like(g)),)


_ste_sign.defvjp(_ste_sign_fwd, _ste_sign_bwd)


def ste_sign(x: Array, clip: Optional[float] = 1.0) -> Array:
  """Sign with the clipped straight-through estimator (Eq. 1-3).

  Forward: ``sign(x)`` with ``sign(0) = +1``, in ``x``'s floating dtype (integer ``x``:
  float32). Backward: ``g * 1{|x| <= clip}`` (inclusive); ``clip=None`` passes ``g``
  unchanged. ``clip`` is static (a Python number, not traced). Reverse mode only
  (``jax.grad``; ``jax.jvp`` is refused by JAX's ``custom_vjp``).
  """
  if clip is not None:
    clip = static_float(clip, "ste_sign: clip")
    if not clip >= 0:
      raise ValueError(f"ste_sign: clip must be >= 0 or None, got {clip}.")
  return _ste_sign(as_floating(x), clip)


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
  :func:`ste_sign`, whose ``1{|x| <= clip}`` is zero outside the window). ``limit`` is
  static; reverse mode only (a ``custom_vjp``).
  """
  limit = static_float(limit, "sign_clip_grad: limit")
  if not limit > 0:
    raise ValueError(f"sign_clip_grad: limit must be > 0, got {limit}.")
  return _sign_clip_grad(as_floating(x), limit)


# How sign(q_hat) passes gradients to the mapping (config.mapping.ste, DECISIONS.md 1).
MAPPING_STES = ("clip_grad", "window")


def mapping_sign(q_hat: Array, ste: str = "clip_grad", clip: float = 1.0) -> Array:
  """``sign(q_hat)`` with the straight-through rule ``ste`` of the LNS conv.

  ``'window'``: :func:`ste_sign` (gradient ``1{|q_hat| <= clip}``); ``'clip_grad'``:
  :func:`sign_clip_grad` (gradient value clipped to ``[-clip, clip]``, Eq. 3 literally;
  the default, DECISIONS.md 1). ``clip`` is static; reverse mode only.
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
def _approx_sign(x: Array) -> Array:
  return sign(x)


def approx_sign(x: Array) -> Array:
  """Bi-Real Net's ApproxSign: forward ``sign(x)`` (``sign(0) = +1``).

  Backward: ``g * (2 - 2|x|)`` for ``|x| < 1``, else 0 (the derivative of the
  piecewise-quadratic approximation of sign used by the ResNet-18 baseline). Integer
  ``x`` is computed as float32; reverse mode only (a ``custom_vjp``).
  """
  return _approx_sign(as_floating(x))


def _approx_sign_fwd(x):
  return sign(x), x


def _approx_sign_bwd(x, g):
  ax = jnp.abs(x)
  d = jnp.where(ax < 1, 2 - 2 * ax, jnp.zeros_like(ax)).astype(g.dtype)
  return (g * d,)


_approx_sign.defvjp(_approx_sign_fwd, _approx_sign_bwd)


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
  """Scaling factor ``s`` of the binary weights ``sign(W) * s`` (DECISIONS.md 2).

  ``w`` is a kernel in Flax's HWIO layout (output channels last). ``'layer'``:
  ``mean|W|`` over the whole layer (DoReFa); ``'channel'``: ``mean|W|`` per output
  channel (XNOR-Net), shape ``(1, ..., 1, n)``; ``'none'``: 1. The scale is
  differentiable (as in XNOR-Net); it carries no sign information. In ``w``'s floating
  dtype; an integer ``w`` is computed in float32 (``[-2, 0, 3]`` gives 1.667).
  """
  w = as_floating(w, "weight_scale: w")
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
  gradient wrt ``W`` is exactly the STE's, ``g * s * 1{|W| <= clip}``. ``scale``: see
  :func:`weight_scale`; ``clip`` is static; reverse mode only; integer ``w``: float32.
  """
  w = as_floating(w, "binarize_weights: w")
  return ste_sign(w, clip) * jax.lax.stop_gradient(weight_scale(w, scale))
