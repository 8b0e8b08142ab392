"""The binary layers of a model: where they are, their effective signs, their variables.

One mechanism finds them: :func:`trace` runs ``model.init`` under ``jax.eval_shape``
(shapes only, nothing computed) with a Flax method interceptor that records every
module call. From that one trace come

* :func:`binary_convs`: ``{module path: the BinaryConv}`` (its binarizers, strides,
  padding, ...), used by the trainer (flip rates, dead fractions), the export (what to
  pack, the layer geometry) and the summary (all calls, for the costs);
* :func:`abstract_variables`: the model's variables as ``ShapeDtypeStruct`` s;

and from a model's variables, :func:`layer_signs` / :func:`effective_signs`: the signs
the binary convs compute with, ``sign(q_hat)`` for an LNS layer (f_theta in eval mode,
DECISIONS.md 8) or ``sign(W)`` for a sign layer; :func:`latent_signs`: ``sign(W)``.

The public helpers for training LNS in one's own model (exported by ``lns_jax``, used by
the trainer): :func:`collect_pairs` (Eq. 21's input from ``model.apply``'s updates),
:func:`keep_network_stats` (the warm start's BatchNorm rule, DECISIONS.md 4) and
:func:`from_baseline` (an LNS model's variables started from a ``sign`` baseline's).

This module sits below the trainer, the export and the summary; it imports only the
method's modules.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable, List, Sequence, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from lns_jax import quantizers
from lns_jax.layers import LNS_COLLECTION, BinaryConv, binary_weights

Path = Tuple[str, ...]
# The name of a BinaryConv's f_theta submodule (lns_jax.layers): every variable under it
# belongs to a mapping network.
MAPPING = "mapping"


@dataclasses.dataclass(frozen=True)
class Call:
  """One module call seen while tracing ``model.init`` (batch of 1)."""
  path: Path
  module: nn.Module
  input_shape: Tuple[int, ...]
  output_shape: Tuple[int, ...]


def _dummy_input(image_shape: Sequence[int]):
  return jnp.zeros((1, *image_shape), jnp.float32)


def abstract_variables(model: nn.Module, image_shape: Sequence[int]) -> dict:
  """``model``'s variables on ``image_shape`` inputs, as shapes and dtypes (no compute)."""
  x = _dummy_input(image_shape)
  return dict(jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False)))


def trace(model: nn.Module, image_shape: Sequence[int]) -> Tuple[List[Call], dict]:
  """``(calls, abstract variables)``: every module ``__call__`` of ``model.init`` in call
  order (returns first), with input and output shapes; nothing is computed."""
  calls: List[Call] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if context.method_name == "__call__":
      x = args[0] if args else None
      calls.append(Call(tuple(context.module.path), context.module,
                        tuple(x.shape) if hasattr(x, "shape") else (),
                        tuple(out.shape) if hasattr(out, "shape") else ()))
    return out

  with nn.intercept_methods(interceptor):
    variables = abstract_variables(model, image_shape)
  return calls, variables


def binary_convs(model: nn.Module, image_shape: Sequence[int]) -> Dict[Path, BinaryConv]:
  """``{module path: BinaryConv}`` of every binary conv of ``model`` (no compute)."""
  calls, _ = trace(model, image_shape)
  return {c.path: c.module for c in calls if isinstance(c.module, BinaryConv)}


def weight_binarizers(model: nn.Module, image_shape: Sequence[int]) -> Dict[Path, str]:
  """``{module path: weight_binarizer}`` ('float' | 'sign' | 'lns') of every BinaryConv."""
  return {p: m.weight_binarizer for p, m in binary_convs(model, image_shape).items()}


def subtree(tree, path: Iterable[str]):
  """``tree[path[0]][path[1]]...``: a module's variables in a collection."""
  for p in path:
    tree = tree[p]
  return tree


def is_mapping(key: Iterable[str]) -> bool:
  """Whether a flattened variable key belongs to a mapping network f_theta."""
  return MAPPING in tuple(key)


def layer_signs(layers: Dict[Path, str], params, batch_stats, mapping_output: str = "raw",
                mapping_init: str = "random", mapping_conv: str = "xla") -> Dict[Path, jax.Array]:
  """``{path: +-1 float}``: the signs each sign / LNS layer computes with (not scaled).

  ``sign(q_hat)`` with f_theta in eval mode for ``'lns'``, ``sign(W)`` for ``'sign'``;
  ``'float'`` layers are left out. A missing variable raises ``KeyError``/``TypeError``.
  """
  out = {}
  for path, binarizer in layers.items():
    if binarizer == "float":
      continue
    p = subtree(params, path)
    mapping = None
    if binarizer == "lns":
      mapping = {"params": p[MAPPING], "batch_stats": subtree(batch_stats, path)[MAPPING]}
    out[path] = binary_weights(p["kernel"], binarizer, mapping, weight_scale="none",
                               mapping_output=mapping_output, mapping_init=mapping_init,
                               mapping_conv=mapping_conv)
  return out


def effective_signs(layers: Dict[Path, str], params, batch_stats, mapping_output: str = "raw",
                    mapping_init: str = "random", mapping_conv: str = "xla") -> dict:
  """:func:`layer_signs` as an int8 tree (the flip rates' reference, Fig. 3c)."""
  signs = layer_signs(layers, params, batch_stats, mapping_output, mapping_init, mapping_conv)
  return traverse_util.unflatten_dict(
      {path: (w > 0).astype(jnp.int8) * 2 - 1 for path, w in signs.items()})


def latent_signs(layers: Dict[Path, str], params, only=("sign", "lns")) -> dict:
  """``sign(W)`` (int8) of the layers whose binarizer is in ``only``."""
  return traverse_util.unflatten_dict({
      path: quantizers.sign(subtree(params, path)["kernel"]).astype(jnp.int8)
      for path, b in layers.items() if b in only})


def collect_pairs(updates, labels=None) -> Dict[str, Tuple[jax.Array, jax.Array]]:
  """``{layer: (q_hat, q_tilde)}`` for Eq. 21 from ``model.apply``'s mutable ``updates``.

  ``updates``: the second output of ``model.apply(variables, x, mutable=['batch_stats',
  'lns'])`` (or its ``'lns'`` collection alone); ``layer`` is the module path joined by
  ``/``. A layer applied several times (a shared module) sows one pair per call, all
  equal (one ``W``, one theta; f_theta normalises with its filters' statistics,
  DECISIONS.md 8): it is one entry, the last pair, so one ``W`` gives one auxiliary
  term. The last, because an ``'lns'`` collection passed back into ``apply`` keeps its
  old pairs in front of the new ones. ``labels``: ``{layer path: sign(W0)}`` (the
  ``config.labels='pretrained'`` reading, DECISIONS.md 3) replaces ``q_tilde``. A model
  applied without ``'lns'`` in ``mutable`` gives ``{}``, which
  :func:`lns_jax.lns_objective` refuses for ``alpha > 0``.
  """
  updates = flax.core.unfreeze(updates)
  if not isinstance(updates, dict):
    raise TypeError(f"collect_pairs takes model.apply's updates (a dict), got "
                    f"{type(updates).__name__}.")
  sown = updates.get(LNS_COLLECTION, updates)
  flat = traverse_util.flatten_dict(sown)
  flat_labels = traverse_util.flatten_dict(labels) if labels else {}
  if LNS_COLLECTION not in updates and any(k[-1] != "pairs" for k in flat):
    return {}  # the updates of an apply without 'lns' in mutable (or of no LNS layer)
  pairs = {}
  for key, calls in flat.items():
    path = key[:-1]  # drop the 'pairs' name
    if not (isinstance(calls, tuple) and calls
            and all(isinstance(c, tuple) and len(c) == 2 for c in calls)):
      raise TypeError(f"collect_pairs: {'/'.join(key)} is not what BinaryConv sows (a "
                      f"tuple of (q_hat, q_tilde) pairs); pass model.apply's updates.")
    q_hat, q_tilde = calls[-1]
    if path in flat_labels:
      q_tilde = flat_labels[path].astype(q_hat.dtype)
    pairs["/".join(path)] = (q_hat, q_tilde)
  return pairs


def keep_network_stats(batch_stats, new_batch_stats):
  """The warm start's BatchNorm rule (DECISIONS.md 4): ``new_batch_stats``' running
  averages of the mapping networks f_theta, ``batch_stats``' of everything else.

  Use it after a train-mode ``apply`` when only f_theta trains
  (:func:`lns_jax.train_mapping_only`): the network still normalises with batch
  statistics, but its running averages, which evaluation uses, stay the baseline's.
  Both are ``batch_stats`` trees of one model; the result has ``batch_stats``' keys.
  """
  flat_new = traverse_util.flatten_dict(flax.core.unfreeze(new_batch_stats))
  flat_old = traverse_util.flatten_dict(flax.core.unfreeze(batch_stats))
  missing = [k for k in flat_old if is_mapping(k) and k not in flat_new]
  if missing:
    raise ValueError(f"keep_network_stats: new_batch_stats lacks {'/'.join(missing[0])}; "
                     f"both must be batch_stats of the same model.")
  return traverse_util.unflatten_dict(
      {k: flat_new[k] if is_mapping(k) else flat_old[k] for k in flat_old})


def _merge(target, source, what: str, col: str) -> dict:
  """``source``'s leaves in ``target``'s tree; leaves only in ``target`` must be f_theta's."""
  flat_t = traverse_util.flatten_dict(flax.core.unfreeze(target))
  flat_s = traverse_util.flatten_dict(flax.core.unfreeze(source))
  name = lambda k: "/".join((col, *k))  # noqa: E731
  extra = [k for k in flat_s if k not in flat_t]
  if extra:
    raise ValueError(
        f"{what}: {name(extra[0])} (and {len(extra) - 1} more) is not in the model; the "
        f"variables are of another model (or another config.model).")
  out = {}
  for k, v in flat_t.items():
    if k in flat_s:
      if tuple(np.shape(flat_s[k])) != tuple(v.shape):
        raise ValueError(
            f"{what}: {name(k)} has shape {np.shape(flat_s[k])} there but "
            f"{tuple(v.shape)} in the model (another width, dataset or model?).")
      out[k] = jnp.asarray(flat_s[k], v.dtype)
    elif is_mapping(k):
      out[k] = v
    else:
      raise ValueError(f"{what}: {name(k)} is missing; only the mapping networks (new in "
                       f"an LNS model) may be, so the variables are of another model.")
  return traverse_util.unflatten_dict(out)


def from_baseline(variables, baseline, what: str = "baseline") -> dict:
  """An LNS model's variables started from a trained network's (Sec. 4.1's warm start).

  ``variables``: a fresh ``init`` of the model with ``weight_binarizer='lns'`` (its
  mapping networks f_theta are kept as initialised); ``baseline``: the variables of the
  same network with ``'sign'`` weights (or of an earlier LNS stage). Every leaf of the
  baseline is copied in, in the model's dtype; collections of ``variables`` that the
  baseline lacks are kept. A leaf of the baseline that the model lacks, one of another
  shape, or a model leaf outside f_theta that the baseline lacks is a ``ValueError``
  naming it (and ``what``). Works on abstract variables (``jax.eval_shape``) and under jit.
  """
  variables, baseline = flax.core.unfreeze(variables), flax.core.unfreeze(baseline)
  extra = sorted(c for c in baseline if c not in variables and baseline[c])
  if extra:
    raise ValueError(f"{what}: has the collection {extra[0]!r}, which the model does not.")
  return {**variables, **{col: _merge(variables[col], baseline[col], what, col)
                          for col in baseline if col in variables}}
