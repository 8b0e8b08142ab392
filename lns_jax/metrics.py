"""Metrics: top-k, the flip rates of the binary weights (Fig. 3c), dead STE gradients."""

from __future__ import annotations

from typing import Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from lns_jax import quantizers
from lns_jax.binary import subtree


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


def flip_rates(prev, now, init) -> Tuple[float, float]:
  """Share of binary weights whose sign changed since ``prev`` and since ``init``.

  Host trees of int8 signs (:func:`lns_jax.binary.effective_signs`), one leaf per
  binary layer; DECISIONS.md 5.
  """
  leaves_now = jax.tree.leaves(now)
  total = sum(x.size for x in leaves_now)
  if total == 0:
    return 0.0, 0.0
  since_prev = sum(int(np.sum(a != b)) for a, b in zip(jax.tree.leaves(prev), leaves_now))
  since_init = sum(int(np.sum(a != b)) for a, b in zip(jax.tree.leaves(init), leaves_now))
  return since_prev / total, since_init / total


def dead_fractions(config, layers, params, pairs) -> Dict[str, Tuple[jax.Array, int]]:
  """``{layer: (share of its binary weights with a zero STE gradient, count)}``.

  LNS layers: ``sign(q_hat)`` under ``config.mapping.ste`` (zero outside the window
  for ``'window'``, never for ``'clip_grad'``); sign layers: ``|W| > config.model.clip``.
  This is the quantity the 'prove LNS' issue found at 21-34% with a window of 1.
  """
  out = {}
  for path, binarizer in layers.items():
    name = "/".join(path)
    if binarizer == "lns" and name in pairs:
      dead = quantizers.dead_mask(pairs[name][0], config.mapping.ste, config.mapping.clip)
    elif binarizer == "sign":
      dead = quantizers.dead_mask(subtree(params, path)["kernel"], "window", config.model.clip)
    else:
      continue
    out[name] = (jnp.mean(dead.astype(jnp.float32)), int(dead.size))
  return out


def train_metrics(aux, logits, batch, total, lr, ok) -> dict:
  """The train step's metrics (the train record of ``metrics.jsonl``, lns_jax.reporting):
  ``aux`` from :func:`lns_jax.loss.lns_objective` plus ``'dead'`` (:func:`dead_fractions`)."""
  top1, top5 = topk_correct(logits, batch["label"], (1, 5), batch["mask"])
  n = jnp.sum(batch["mask"])
  m = {"ce": aux["ce"], "aux_total": aux["aux_total"], "loss": total,
       "top1": top1 / n, "top5": top5 / n, "lr": lr, "nonfinite": (~ok).astype(jnp.float32)}
  if "kd" in aux:  # a distilled stage's distribution loss (lns_jax.distill)
    m["kd"] = aux["kd"]
  for name, value in aux["aux_layers"].items():
    m[f"aux/{name}"] = value
  counts = {name: n for name, (_, n) in aux["dead"].items()}
  for name, (frac, _) in aux["dead"].items():
    m[f"dead/{name}"] = frac
  if counts:
    m["dead_frac"] = sum(f * counts[k] for k, (f, _) in aux["dead"].items()) / sum(
        counts.values())
  return m
