"""The converter's ReActNet builder (lns_jax.models.reactnet), beside ``deploy_lce.py``.

Run in the deployment environment as that script's sibling (never imported by lns-jax,
no JAX): ``deploy_lce.py`` puts this folder on ``sys.path`` and calls :func:`build` with
its ``_Builder`` and helpers. A ReActNet unit (Liu et al., ECCV 2020)

  ``rprelu(bn(bconv(sign(x - beta))) + shortcut(x))``

becomes ``x + (-beta)`` (TFLite ADD: RSign's threshold, before the ``LceQuantize`` of the
binary conv's input), ``QuantConv2D`` + ``Scale`` (``LceBconv2d``), BatchNorm, ADD of
the shortcut (a 2x2 average pool where the unit strides), and RPReLU as ADD, ``PReLU``,
ADD; the downsampling unit's two convs share the one thresholded input and are
concatenated after their shortcut additions.
"""

from __future__ import annotations


def rprelu(b, x, name, offset):
  """``prelu(x - gamma) + zeta`` (ReActNet Eq. 2); ``offset(x, values, name)``: ``x + values``."""
  x = offset(x, -b.take(f"params/{name}/gamma"), name.replace("/", "_") + "_gamma")
  x = b.prelu(x, name)  # the PReLU slopes: params/<name>/slope
  return offset(x, b.take(f"params/{name}/zeta"), name.replace("/", "_") + "_zeta")


def _strides(unit):
  """2 for the first unit of every stage but the first (as the model), else 1."""
  i = int(unit.split("_")[0][len("stage"):])
  j, k = (int(p) for p in unit.split("_block")[1].split("_unit"))
  return 2 if i > 1 and j == 1 and k == 1 else 1


def build(b, x, avg_pool_2x2, zero_pad_conv, offset):
  """The Keras graph of a ReActNet export; ``b``: deploy_lce's ``_Builder``, the others its
  helpers (the pooled shortcut, the 7x7 stem's padded conv, a per-channel ADD)."""
  L = b.keras.layers
  if b.members["params/conv_init/kernel"].shape[0] == 7:  # the ImageNet stem
    x = b.bn(zero_pad_conv(x, "conv_init"), "bn_init")
    x = L.MaxPooling2D(3, 2, padding="same")(x)  # -inf padding, as flax's max_pool
  else:
    x = b.bn(b.fp_conv(x, "conv_init"), "bn_init")
  for unit in b.blocks(lambda n: "unit" in n):
    strides = _strides(unit)
    shifted = offset(x, -b.take(f"params/{unit}/rsign/beta"), f"{unit}_rsign")
    shortcut = avg_pool_2x2(L, x) if strides > 1 else x
    convs = ([("conv", "bn")] if f"binary/{unit}/conv/signs" in b.members
             else [("conv1", "bn1"), ("conv2", "bn2")])
    outs = [L.Add()([b.bn(b.binary_conv(shifted, f"{unit}/{c}", strides), f"{unit}/{n}"),
                     shortcut]) for c, n in convs]
    x = outs[0] if len(outs) == 1 else L.Concatenate()(outs)
    x = rprelu(b, x, f"{unit}/rprelu", offset)
  return b.dense(L.GlobalAveragePooling2D()(x), "head")
