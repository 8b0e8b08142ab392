"""The unbiased noisy-supervision loss (Eq. 15-17) and the LNS objective (Eq. 21)."""

from __future__ import annotations

import math
from typing import Iterable, Mapping, Sequence, Tuple, Union

import jax
import jax.numpy as jnp
import optax

Array = jax.Array
Rho = Union[float, Tuple[float, float]]

REDUCTIONS = ("mean", "sum", "none")


def check_rho(rho: Rho) -> Tuple[float, float]:
  """Validates a noise rate and returns ``(rho_pos, rho_neg)`` (Eq. 8-9).

  ``rho_pos = P(q_tilde = -1 | q = +1)``, ``rho_neg = P(q_tilde = +1 | q = -1)``.
  Both must be finite and ``>= 0`` with ``rho_pos + rho_neg < 1``; otherwise the
  correction of Eq. 15 divides by zero or flips sign.
  """
  if isinstance(rho, (tuple, list)):
    if len(rho) != 2:
      raise ValueError(f"rho must be a float or a pair (rho_pos, rho_neg), got {rho!r}.")
    pair = tuple(rho)
  else:
    pair = (rho, rho)
  try:
    pos, neg = (float(r) for r in pair)
  except (TypeError, ValueError):
    raise ValueError(f"rho must be a float or a pair of floats, got {rho!r}.") from None
  for name, value in (("rho_pos", pos), ("rho_neg", neg)):
    if not math.isfinite(value) or value < 0:
      raise ValueError(f"rho: {name}={value!r} must be finite and >= 0 (got rho={rho!r}).")
  if pos + neg >= 1:
    raise ValueError(
        f"rho: rho_pos + rho_neg = {pos + neg!r} must be < 1 (Eq. 9; got rho={rho!r}).")
  return pos, neg


def _is_concrete(x) -> bool:
  return not isinstance(x, jax.core.Tracer)


def _rho_pair(rho):
  if isinstance(rho, (tuple, list)):
    if all(_is_concrete(r) for r in rho):
      return check_rho(rho)
    return tuple(rho)
  if _is_concrete(rho):
    return check_rho(rho)
  return rho, rho


def lns_loss(q_hat: Array, q_tilde: Array, rho: Rho, reduction: str = "mean") -> Array:
  """Unbiased estimator of the squared error under label noise (Eq. 15).

  ``l~(q_hat, q_t) = ((1 - rho_{-q_t}) l(q_hat, q_t) - rho_{q_t} l(q_hat, -q_t))
  / (1 - rho_pos - rho_neg)`` with ``l(a, b) = (a - b)^2``.

  Args:
    q_hat: mapped weights ``f_theta(W)`` (Eq. 4), any shape.
    q_tilde: noisy labels ``sign(W)`` in {-1, +1}, same shape (Eq. 1).
    rho: ``rho`` (symmetric) or ``(rho_pos, rho_neg)`` (Eq. 8-9). Concrete values
      are validated (``ValueError``); traced values are used as given.
    reduction: ``'mean'`` over elements (Eq. 16), ``'sum'`` (Eq. 17) or ``'none'``.
  """
  if reduction not in REDUCTIONS:
    raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
  rho_pos, rho_neg = _rho_pair(rho)
  q_hat = jnp.asarray(q_hat)
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


def auxiliary_losses(pairs: Mapping[str, Tuple[Array, Array]], rho: Rho,
                     reduction: str = "mean") -> dict:
  """Per-layer auxiliary losses ``l~_i`` (Eq. 16/17) from ``{layer: (q_hat, q_tilde)}``."""
  return {name: lns_loss(q_hat, q_tilde, rho, reduction)
          for name, (q_hat, q_tilde) in pairs.items()}


def cross_entropy(logits: Array, labels: Array, mask: Array | None = None) -> Array:
  """Mean softmax cross-entropy ``l_cls`` over the (masked) batch."""
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
  if mask is None:
    return jnp.mean(losses)
  return jnp.sum(losses * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def lns_objective(logits: Array, labels: Array,
                  pairs: Mapping[str, Tuple[Array, Array]], alpha: float, rho: Rho,
                  reduction: str = "mean", mask: Array | None = None):
  """The LNS objective ``L = l_cls + alpha * sum_i l~_i`` (Eq. 21).

  Returns ``(L, aux)`` where ``aux`` holds ``ce``, ``aux_total`` and ``aux_layers``
  (a dict of per-layer ``l~_i``). With no binary layers the auxiliary sum is 0.
  """
  ce = cross_entropy(logits, labels, mask)
  layers = auxiliary_losses(pairs, rho, reduction)
  aux_total = sum(layers.values(), jnp.zeros((), ce.dtype))
  total = ce + alpha * aux_total
  return total, {"ce": ce, "aux_total": aux_total, "aux_layers": layers}
