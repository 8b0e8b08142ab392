"""The models, and the one place a model is built from a config: :func:`from_config`.

``get_model(name, num_classes=..., **fields)`` instantiates a registered model with
explicit binarization fields; :func:`from_config` reads them from ``config.model`` and
``config.mapping`` for a stage's weights (``'sign'`` / ``'lns'`` / ``'float'``, or a stage
name, :mod:`lns_jax.stages`). The trainer, the summary (the ``'sign'`` inference model),
the export and the inference (the ``'float'`` model of an export) all build with it.
"""

from __future__ import annotations

import jax.numpy as jnp

from lns_jax.models.alexnet import AlexNet, AlexNetTiny
from lns_jax.models.reactnet import ReActNet18, ReActNet18Tiny, ReActNet20, ReActNetTiny
from lns_jax.models.resnet_cifar import ResNet20, ResNetCifar, ResNetTiny
from lns_jax.models.resnet_imagenet import (BiRealResNet, DoReFaResNet, ResNet18,
                                            ResNet18DoReFa, ResNet18DoReFaTiny, ResNet18Tiny)
from lns_jax.models.resnet_real import ResNet34, ResNet34Tiny

MODELS = {
    "resnet20": ResNet20,
    "resnet_tiny": ResNetTiny,
    "resnet18": ResNet18,
    "resnet18_tiny": ResNet18Tiny,
    "resnet18_dorefa": ResNet18DoReFa,
    "resnet18_dorefa_tiny": ResNet18DoReFaTiny,
    "alexnet": AlexNet,
    "alexnet_tiny": AlexNetTiny,
    "reactnet18": ReActNet18,       # ReActNet on Bi-Real ResNet-18 (models/reactnet.py)
    "reactnet18_tiny": ReActNet18Tiny,
    "reactnet20": ReActNet20,       # its ResNet-20-sized kin (Fashion-MNIST, CIFAR-10)
    "reactnet_tiny": ReActNetTiny,
    "resnet34": ResNet34,           # real-valued: a distillation teacher only
    "resnet34_tiny": ResNet34Tiny,
}
# Real-valued models: teachers (config.distill), never exported or deployed.
TEACHERS = ("resnet34", "resnet34_tiny")


# config.model.dtype: the dtype the network computes in (convs, BatchNorm, dense layers).
# Parameters, optimizer state, the mapping networks f_theta, the losses and the logits
# the losses see stay float32: q_hat's signs are the weights, and evaluation and export
# must binarize bit for bit as the train step did. bfloat16 is for GPUs and TPUs; a CPU
# gains nothing from it (XLA:CPU's bf16 convs measured no faster) and the packed binary
# conv (config.model.conv) is float32 only, so 'auto' runs XLA's conv in bfloat16.
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def get_model(name: str, *, num_classes: int, **kwargs):
  """Instantiates ``MODELS[name]``; ``kwargs`` are the binarization fields."""
  if name not in MODELS:
    raise ValueError(f"config.model.name must be one of {sorted(MODELS)}, got {name!r}.")
  return MODELS[name](num_classes=num_classes, **kwargs)


def from_config(config, weights: str, num_classes: int, mesh=None):
  """The model of ``config.model`` whose binary convs use ``weights``.

  ``weights``: a weight binarizer (``'float'`` | ``'sign'`` | ``'lns'``) or a stage name
  (its weights, and real-valued activations where its row says so,
  :data:`lns_jax.stages.STAGES`). Only ``config.model`` is required;
  ``config.mapping`` (the LNS layers' f_theta) takes its defaults where absent (an
  export's header). With a ``mesh`` of several devices and ``config.mapping.shard``,
  each device computes f_theta for its share of every layer's filters
  (``MappingNet.filter_sharding``). ``config.model.dtype`` is the network's compute
  dtype (:data:`DTYPES`).
  """
  from lns_jax import stages
  input_binarizer = config.model.input_binarizer
  if weights in stages.STAGES:
    if stages.STAGES[weights].activations == "real":
      input_binarizer = "none"
    weights = stages.STAGES[weights].weights
  m, mapping = config.model, config.get("mapping")
  kwargs = {}
  if mapping is not None:
    sharding = None
    if mesh is not None and mesh.size > 1 and mapping.get("shard", True):
      from lns_jax import parallel
      sharding = parallel.batch_sharding(mesh)
    kwargs = dict(mapping_output=mapping.output, mapping_clip=mapping.clip,
                  mapping_ste=mapping.ste, mapping_init=mapping.get("init", "random"),
                  mapping_conv=mapping.get("conv", "xla"), mapping_sharding=sharding)
  return get_model(m.name, num_classes=num_classes, weight_binarizer=weights,
                   input_binarizer=input_binarizer, weight_scale=m.weight_scale,
                   clip=m.clip, conv=m.get("conv", "xla"),
                   dtype=DTYPES[m.get("dtype", "float32")], **kwargs)


def check_input_shape(config, num_classes: int, image_shape) -> None:
  """Raises ``ConfigError`` (one line) if ``config.model`` cannot take ``image_shape``."""
  from lns_jax.binary import abstract_variables
  from lns_jax.errors import ConfigError
  model = from_config(config, "pretrain", num_classes)
  try:
    abstract_variables(model, image_shape)
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"config.data.image_size: model {config.model.name!r} cannot take inputs of shape "
        f"{tuple(image_shape)} ({type(e).__name__}); use a larger image_size.") from None
