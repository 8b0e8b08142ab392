"""Model registry: ``get_model(config)`` builds a model from ``config.model``."""

from __future__ import annotations

from lns_jax.models.alexnet import AlexNet, AlexNetTiny
from lns_jax.models.resnet_cifar import ResNet20, ResNetCifar, ResNetTiny
from lns_jax.models.resnet_imagenet import (BiRealResNet, DoReFaResNet, ResNet18,
                                            ResNet18DoReFa, ResNet18DoReFaTiny, ResNet18Tiny)

MODELS = {
    "resnet20": ResNet20,
    "resnet_tiny": ResNetTiny,
    "resnet18": ResNet18,
    "resnet18_tiny": ResNet18Tiny,
    "resnet18_dorefa": ResNet18DoReFa,
    "resnet18_dorefa_tiny": ResNet18DoReFaTiny,
    "alexnet": AlexNet,
    "alexnet_tiny": AlexNetTiny,
}


def get_model(name: str, *, num_classes: int, **kwargs):
  """Instantiates ``MODELS[name]``; ``kwargs`` are the binarization fields."""
  if name not in MODELS:
    raise ValueError(f"config.model.name must be one of {sorted(MODELS)}, got {name!r}.")
  return MODELS[name](num_classes=num_classes, **kwargs)
