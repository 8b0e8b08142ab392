"""The unbiased noisy-supervision loss (Eq. 15-17) and the LNS objective (Eq. 21).

Every function computes in float (integer ``q_hat`` or logits are cast:
:func:`lns_jax.quantizers.as_floating`). rho is a number or a pair ``(rho_pos, rho_neg)``
(a tuple, a list, or an array of shape ``()`` or ``(2,)``), eager and under ``jit``
alike; its form is checked always, its values only where they are concrete (a traced
rho, an argument of ``jit``, is used as given: check it first with :func:`check_rho`).
"""

from __future__ import annotations

import math
from typing import Mapping, Tuple, Union

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lns_jax.quantizers import as_floating

Array = jax.Array
Rho = Union[float, Tuple[float, float]]

REDUCTIONS = ("mean", "sum", "none")
_RHO_FORM = "rho must be a number or a pair (rho_pos, rho_neg)"


def _rho_parts(rho) -> Tuple:
  """``(rho_pos, rho_neg)`` as given (numbers, or 0-d arrays, traced or not): the form of
  rho checked, not its values. Strings, bools, None, other shapes are a ``ValueError``."""
  if isinstance(rho, (str, bytes)):
    raise ValueError(f"{_RHO_FORM}, got the string {rho!r}.")
  if isinstance(rho, (tuple, list)):
    if len(rho) != 2:
      raise ValueError(f"{_RHO_FORM}, got {rho!r} ({len(rho)} values).")
    parts = tuple(rho)
  elif isinstance(rho, (np.ndarray, np.generic, jax.Array)):
    if np.ndim(rho) == 0:
      parts = (rho, rho)
    elif np.shape(rho) == (2,):
      parts = (rho[0], rho[1])
    else:
      raise ValueError(f"{_RHO_FORM}: an array of shape () or (2,), got shape {np.shape(rho)}.")
  else:
    parts = (rho, rho)
  for part in parts:
    if isinstance(part, (np.ndarray, np.generic, jax.Array)):
      ok = np.ndim(part) == 0 and (jnp.issubdtype(part.dtype, jnp.floating)
                                   or jnp.issubdtype(part.dtype, jnp.integer))
    else:
      ok = isinstance(part, (int, float)) and not isinstance(part, bool)
    if not ok:
      raise ValueError(f"{_RHO_FORM} of real numbers, got {rho!r}.")
  return parts


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def check_rho(rho: Rho) -> Tuple[float, float]:
  """Validates a noise rate and returns ``(rho_pos, rho_neg)`` as floats (Eq. 8-9).

  ``rho_pos = P(q_tilde = -1 | q = +1)``, ``rho_neg = P(q_tilde = +1 | q = -1)``.
  ``rho``: a number (symmetric) or a pair: a tuple, a list, or a NumPy / JAX array of
  shape ``(2,)``. Both rates must be finite and ``>= 0`` with ``rho_pos + rho_neg < 1``;
  otherwise the correction of Eq. 15 divides by zero or flips sign. Anything else (a
  string, a bool, three values) is a ``ValueError``. Needs concrete values: a traced rho
  is a ``TypeError`` (call it outside ``jit``).
  """
  parts = _rho_parts(rho)
  if not all(_is_concrete(r) for r in parts):
    raise TypeError("check_rho needs concrete values; a traced rho (an argument of jit) "
                    "cannot be checked: check it before jit, or pass it as a static argument.")
  pos, neg = (float(r) for r in parts)
  for name, value in (("rho_pos", pos), ("rho_neg", neg)):
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"rho: {name}={value!r} must be finite and >= 0 (got rho={rho!r}).")
  if pos + neg >= 1:
    raise ValueError(
        f"rho: rho_pos + rho_neg = {pos + neg!r} must be < 1 (Eq. 9; got rho={rho!r}).")
  return pos, neg


def _rho_pair(rho):
  """Concrete rho: :func:`check_rho`'s floats. Traced: the parts as given, in float."""
  parts = _rho_parts(rho)
  if all(_is_concrete(r) for r in parts):
    return check_rho(rho)
  return tuple(as_floating(r, "rho") for r in parts)


def lns_loss(q_hat: Array, q_tilde: Array, rho: Rho, reduction: str = "mean") -> Array:
  """Unbiased estimator of the squared error under label noise (Eq. 15).

  ``l~(q_hat, q_t) = ((1 - rho_{-q_t}) l(q_hat, q_t) - rho_{q_t} l(q_hat, -q_t))
  / (1 - rho_pos - rho_neg)`` with ``l(a, b) = (a - b)^2``.

  Args:
    q_hat: mapped weights ``f_theta(W)`` (Eq. 4), any shape.
    q_tilde: noisy labels ``sign(W)`` in {-1, +1}, same shape (Eq. 1); not checked:
      take them from :func:`lns_jax.sign` (``sign(0) = +1``), not ``jnp.sign`` (0 at 0,
      which this loss reads as -1).
    rho: ``rho`` (symmetric) or ``(rho_pos, rho_neg)`` (Eq. 8-9): a number, a tuple,
      a list or a shape-``(2,)`` array. Concrete values are validated
      (:func:`check_rho`, ``ValueError``); traced values (an argument of ``jit``) are
      used as given, unchecked.
    reduction: ``'mean'`` over elements (Eq. 16), ``'sum'`` (Eq. 17) or ``'none'``.

  In ``q_hat``'s floating dtype (an integer ``q_hat`` is computed in float32). The
  gradient wrt ``q_hat`` is Eq. 18 (plain autodiff, forward and reverse mode).
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  rho_pos, rho_neg = _rho_pair(rho)
  q_hat = as_floating(q_hat, "lns_loss: q_hat")
  q_tilde = jnp.asarray(q_tilde, q_hat.dtype)
  if q_hat.shape != q_tilde.shape:
    raise ValueError(f"q_hat {q_hat.shape} and q_tilde {q_tilde.shape} must have one shape.")
  positive = q_tilde > 0
  rho_same = jnp.where(positive, rho_pos, rho_neg)     # rho_{q_t}
  rho_other = jnp.where(positive, rho_neg, rho_pos)    # rho_{-q_t}
  loss_same = jnp.square(q_hat - q_tilde)              # l(q_hat, q_t)
  loss_flip = jnp.square(q_hat + q_tilde)              # l(q_hat, -q_t)
  denom = 1.0 - rho_pos - rho_neg
  loss = ((1.0 - rho_other) * loss_same - rho_same * loss_flip) / denom
  loss = loss.astype(q_hat.dtype)
  if reduction == "none":
    return loss
  if reduction == "sum":
    return jnp.sum(loss)
  # The mean of an empty layer is 0, not NaN: it contributes nothing to Eq. 21.
  return jnp.sum(loss) / max(loss.size, 1)


_RAW = ("pass lns_jax.collect_pairs(updates), which turns the 'lns' collection of "
        "model.apply(..., mutable=['batch_stats', 'lns']) into {layer: (q_hat, q_tilde)}")


def _is_pair(value) -> bool:
  """A ``(q_hat, q_tilde)`` pair: two arrays (not the sown ``((q_hat, q_tilde),)``)."""
  return (isinstance(value, (tuple, list)) and len(value) == 2
          and not any(isinstance(v, (tuple, list, Mapping)) for v in value))


def check_pairs(pairs) -> Mapping[str, Tuple[Array, Array]]:
  """``pairs`` if it is ``{layer: (q_hat, q_tilde)}``; the raw ``'lns'`` collection or the
  whole ``updates`` of ``model.apply`` (nested dicts, ``{'pairs': ((q_hat, q_tilde),)}``)
  is a ``TypeError`` that names :func:`lns_jax.collect_pairs`."""
  if not isinstance(pairs, Mapping):
    raise TypeError(f"pairs must be a dict {{layer: (q_hat, q_tilde)}}, got "
                    f"{type(pairs).__name__}: {_RAW}.")
  for name, value in pairs.items():
    if not _is_pair(value):
      what = ("a collection of model.apply's updates" if isinstance(value, Mapping)
              else f"a {type(value).__name__}")
      raise TypeError(f"pairs[{name!r}] is {what}, not a (q_hat, q_tilde) pair: {_RAW}.")
  return pairs


def auxiliary_losses(pairs: Mapping[str, Tuple[Array, Array]], rho: Rho,
                     reduction: str = "mean") -> dict:
  """Per-layer auxiliary losses ``{layer: l~_i}`` (Eq. 16/17) from ``{layer: (q_hat, q_tilde)}``.

  ``pairs`` is what :func:`lns_jax.collect_pairs` returns; the raw ``'lns'`` collection
  (``{layer: {'pairs': ((q_hat, q_tilde),)}}``) is refused with a ``TypeError`` naming it.
  ``rho`` and ``reduction``: :func:`lns_loss`.
  """
  return {name: lns_loss(q_hat, q_tilde, rho, reduction)
          for name, (q_hat, q_tilde) in check_pairs(pairs).items()}


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
  """Mean softmax cross-entropy ``l_cls`` over the (masked) batch (Eq. 21's first term).

  ``logits``: ``(batch, classes)``, computed in float (integer logits are cast);
  ``labels``: integer class indices ``(batch,)`` (a float array is a ``TypeError``: it is
  usually one-hot or a mix-up, which this loss does not take); ``mask``: ``(batch,)``
  weights, 1 for real examples and 0 for padding (``None``: all 1). An all-zero mask
  gives 0.
  """
  logits = as_floating(logits, "cross_entropy: logits")
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise TypeError(f"cross_entropy: labels must be integer class indices, got dtype "
                    f"{labels.dtype}.")
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lns_objective(logits: Array, labels: Array,
                  pairs: Mapping[str, Tuple[Array, Array]], alpha: float, rho: Rho,
                  reduction: str = "mean", mask: Array | None = None):
  """The LNS objective ``L = l_cls + alpha * sum_i l~_i`` (Eq. 21).

  Args:
    logits, labels, mask: :func:`cross_entropy`.
    pairs: ``{layer: (q_hat, q_tilde)}`` from :func:`lns_jax.collect_pairs` (the raw
      ``'lns'`` collection is refused, naming it). Empty only with ``alpha = 0``: a
      concrete ``alpha > 0`` without pairs is a ``ValueError`` (the model was applied
      without ``'lns'`` in ``mutable``, or has no ``weight_binarizer='lns'`` layer);
      a traced alpha is not checked.
    alpha: the weight of the auxiliary terms; ``0`` computes them but adds nothing.
    rho, reduction: :func:`lns_loss` (``'mean'``: Eq. 16, ``'sum'``: Eq. 17).

  Returns ``(L, aux)``: ``aux`` holds ``ce``, ``aux_total`` and ``aux_layers`` (a dict of
  the per-layer ``l~_i``).
  """
  ce = cross_entropy(logits, labels, mask)
  layers = auxiliary_losses(pairs, rho, reduction)
  if _is_concrete(alpha):
    if not (math.isfinite(float(alpha)) and float(alpha) >= 0):
      raise ValueError(f"lns_objective: alpha must be finite and >= 0, got {alpha!r}.")
    if float(alpha) > 0 and not layers:
      raise ValueError(
          f"lns_objective: alpha={alpha!r} but no (q_hat, q_tilde) pairs: apply the model "
          f"with 'lns' in mutable (mutable=['batch_stats', 'lns']) and pass "
          f"lns_jax.collect_pairs(updates); a model without weight_binarizer='lns' layers "
          f"has no auxiliary term (use alpha=0, or cross_entropy).")
  aux_total = sum(layers.values(), jnp.zeros((), ce.dtype))
  total = ce + alpha * aux_total
  return total, {"ce": ce, "aux_total": aux_total, "aux_layers": layers}
