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
DESIGN decision 8) or ``sign(W)`` for a sign layer; :func:`latent_signs`: ``sign(W)``.

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


def lns_pairs(updates, labels=None) -> Dict[str, Tuple[jax.Array, jax.Array]]:
  """``{layer: (q_hat, q_tilde)}`` the LNS layers sowed in a ``model.apply``'s mutable
  ``updates``; ``q_tilde`` from ``labels`` (``sign(W0)``, ``config.labels='pretrained'``)
  where given."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(updates.get(LNS_COLLECTION, {})))
  flat_labels = traverse_util.flatten_dict(labels) if labels else {}
  pairs = {}
  for key, sown in flat.items():
    path = key[:-1]  # drop the 'pairs' name
    (q_hat, q_tilde), = sown
    if path in flat_labels:
      q_tilde = flat_labels[path].astype(q_hat.dtype)
    pairs["/".join(path)] = (q_hat, q_tilde)
  return pairs
