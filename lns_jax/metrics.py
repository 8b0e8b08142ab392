"""Classification metrics; flip rates live with the trainer (they need its state)."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp


def topk_correct(logits: jax.Array, labels: jax.Array, ks: Sequence[int] = (1, 5),
                 mask: jax.Array | None = None):
  """Number of (masked) examples whose label is among the top-k logits, per k.

  Ties count against the example: a label is in the top k when fewer than k classes
  have a strictly larger logit and it is not beaten by k or more equal ones ahead of
  it in ``lax.top_k`` order. ``k`` larger than the number of classes counts all.
  """
  num_classes = logits.shape[-1]
  if mask is None:
    mask = jnp.ones(labels.shape, jnp.float32)
  label_logit = jnp.take_along_axis(logits, labels[:, None], axis=-1)
  # Rank = classes with a strictly higher logit; equal logits rank by class index.
  higher = jnp.sum(logits > label_logit, axis=-1)
  idx = jnp.arange(num_classes)
  ties_before = jnp.sum((logits == label_logit) & (idx[None, :] < labels[:, None]), axis=-1)
  rank = higher + ties_before
  return tuple(jnp.sum((rank < min(k, num_classes)).astype(jnp.float32) * mask) for k in ks)
