"""The converter's Keras layers and networks: one builder per lns-jax model family.

Run in the deployment environment beside ``deploy_lce.py``, which imports it (the
script's folder is on ``sys.path``); like that script it imports no JAX and nothing of
the ``lns_jax`` package. Each builder takes deploy_lce's ``_Builder`` ``b`` (the export's
arrays as Keras layers: ``b.fp_conv``, ``b.binary_conv``, ``b.bn``, ``b.prelu``,
``b.dense``) and the input tensor, and mirrors the flax model's ``__call__`` layer by
layer; :data:`BUILDERS` maps ``deploy_lce.FAMILIES``' names to them.
"""

from __future__ import annotations

import functools

import numpy as np


@functools.lru_cache(maxsize=None)
def _scale_layer():
  import tf_keras as keras

  class _Scale(keras.layers.Layer):
    """``x * s``: the binary layer's scale (a scalar or one per output channel); with
    ``add``, ``x + s`` (ReActNet's per-channel shifts)."""

    def __init__(self, scale, add=False, **kwargs):
      super().__init__(**kwargs)
      self.scale, self.add = np.asarray(scale, np.float32), add

    def call(self, x):
      import tensorflow as tf
      return x + tf.constant(self.scale) if self.add else x * tf.constant(self.scale)

  return _Scale


def Scale(scale, name):  # pylint: disable=invalid-name
  return _scale_layer()(scale, name=name)


def offset(x, values, name):
  """``x + values`` (one per channel) as a layer: TFLite's ADD of a constant."""
  return _scale_layer()(values, add=True, name=name)(x)


def _stage_of(name):
  return int(name.split("_")[0][len("stage"):])


def _unit_strides(unit):
  """A Bi-Real/ReActNet unit ``stage<i>_block<j>_unit<k>``: 2 for the first unit of every
  stage but the first (as the models), else 1."""
  j, k = (int(p) for p in unit.split("_block")[1].split("_unit"))
  return 2 if _stage_of(unit) > 1 and j == 1 and k == 1 else 1


def _stem(b, x, imagenet):
  """conv_init + bn_init; the ImageNet stem's 7x7 stride-2 conv then a 3x3 max pool."""
  if not imagenet:
    return b.bn(b.fp_conv(x, "conv_init"), "bn_init")
  x = b.bn(b.fp_conv(x, "conv_init", strides=2, padding=3), "bn_init")
  return b.keras.layers.MaxPooling2D(3, 2, padding="same")(x)  # -inf pads, as flax's max_pool


def _resnet_cifar(b, x, imagenet_stem):
  """lns_jax.models.resnet_cifar.ResNetCifar (ResNet-20; DoReFa ResNet-18 with the stem)."""
  L = b.keras.layers
  x = _stem(b, x, imagenet_stem)
  for block in b.blocks(lambda n: "unit" not in n):
    i, j = _stage_of(block), int(block.split("_block")[1])
    strides = 2 if i > 1 and j == 1 else 1
    y = b.bn(b.binary_conv(x, f"{block}/conv1", strides), f"{block}/bn1")
    y = b.bn(b.binary_conv(y, f"{block}/conv2"), f"{block}/bn2")
    residual = x
    if b.has(f"{block}/downsample_conv"):
      residual = b.bn(b.fp_conv(x, f"{block}/downsample_conv", strides),
                      f"{block}/downsample_bn")
    x = L.Add()([y, residual])
  x = L.GlobalAveragePooling2D()(L.ReLU()(x))
  return b.dense(x, "head")


def _same_avg_pool_2x2(L, x):
  """flax's ``avg_pool(x, (2, 2), (2, 2), 'SAME')``: zero-padded, the pads counted."""
  h, w = int(x.shape[1]), int(x.shape[2])
  if h % 2 or w % 2:  # SAME pads (0, 1) on an odd side; flax counts the pad's zeros
    x = L.ZeroPadding2D(((0, h % 2), (0, w % 2)))(x)
  return L.AveragePooling2D(2, 2, padding="valid")(x)


def _bireal(b, x):
  """lns_jax.models.resnet_imagenet.BiRealResNet (Bi-Real ResNet-18)."""
  L = b.keras.layers
  x = _stem(b, x, imagenet=True)
  for unit in b.blocks(lambda n: "unit" in n):
    strides = _unit_strides(unit)
    y = b.prelu(b.bn(b.binary_conv(x, f"{unit}/conv", strides), f"{unit}/bn"),
                f"{unit}/prelu")
    residual = x
    if b.has(f"{unit}/downsample_conv"):
      if strides > 1:
        residual = _same_avg_pool_2x2(L, residual)
      residual = b.bn(b.fp_conv(residual, f"{unit}/downsample_conv"),
                      f"{unit}/downsample_bn")
    x = L.Add()([y, residual])
  return b.dense(L.GlobalAveragePooling2D()(x), "head")


def _alexnet(b, x):
  """lns_jax.models.alexnet.AlexNet: FP conv1 and fc8, binary conv2-5 and fc6-7 (1x1)."""
  L = b.keras.layers

  def pool(t):
    return L.MaxPooling2D(3, 2, padding="valid")(t)  # flax max_pool's default VALID

  x = b.fp_conv(x, "conv1", strides=4, padding=2)
  x = b.bn(pool(x), "bn1")
  x = b.bn(pool(b.binary_conv(x, "conv2")), "bn2")
  x = b.bn(b.binary_conv(x, "conv3"), "bn3")
  x = b.bn(b.binary_conv(x, "conv4"), "bn4")
  x = b.bn(pool(b.binary_conv(x, "conv5")), "bn5")
  x = L.Reshape((1, 1, -1))(x)  # C order over (h, w, c), as jnp's reshape
  x = b.bn(b.binary_conv(x, "fc6"), "bn6")
  x = b.bn(b.binary_conv(x, "fc7"), "bn7")
  x = L.Flatten()(L.ReLU()(x))
  return b.dense(x, "fc8")


def _rprelu(b, x, name):
  """``prelu(x - gamma) + zeta`` (ReActNet Eq. 2)."""
  x = offset(x, -b.take(f"params/{name}/gamma"), name.replace("/", "_") + "_gamma")
  x = b.prelu(x, name)  # the PReLU slopes: params/<name>/slope
  return offset(x, b.take(f"params/{name}/zeta"), name.replace("/", "_") + "_zeta")


def _reactnet(b, x):
  """lns_jax.models.reactnet.ReActNet (Liu et al., ECCV 2020). A unit

    ``rprelu(bn(bconv(sign(x - beta))) + shortcut(x))``

  becomes ``x + (-beta)`` (TFLite ADD: RSign's threshold, before the ``LceQuantize`` of
  the binary conv's input), ``QuantConv2D`` + ``Scale`` (``LceBconv2d``), BatchNorm, ADD
  of the shortcut (a 2x2 average pool where the unit strides), and RPReLU as ADD,
  ``PReLU``, ADD; the downsampling unit's two convs share the one thresholded input and
  are concatenated after their shortcut additions."""
  L = b.keras.layers
  x = _stem(b, x, imagenet=b.members["params/conv_init/kernel"].shape[0] == 7)
  for unit in b.blocks(lambda n: "unit" in n):
    strides = _unit_strides(unit)
    shifted = offset(x, -b.take(f"params/{unit}/rsign/beta"), f"{unit}_rsign")
    shortcut = _same_avg_pool_2x2(L, x) if strides > 1 else x
    convs = ([("conv", "bn")] if f"binary/{unit}/conv/signs" in b.members
             else [("conv1", "bn1"), ("conv2", "bn2")])
    outs = [L.Add()([b.bn(b.binary_conv(shifted, f"{unit}/{c}", strides), f"{unit}/{n}"),
                     shortcut]) for c, n in convs]
    x = outs[0] if len(outs) == 1 else L.Concatenate()(outs)
    x = _rprelu(b, x, f"{unit}/rprelu")
  return b.dense(L.GlobalAveragePooling2D()(x), "head")


BUILDERS = {
    "reactnet": _reactnet,
    "resnet_cifar": lambda b, x: _resnet_cifar(b, x, imagenet_stem=False),
    "resnet_dorefa": lambda b, x: _resnet_cifar(b, x, imagenet_stem=True),
    "bireal": _bireal,
    "alexnet": _alexnet,
}
