"""The paper's ImageNet AlexNet recipe (Table 5): DoReFa-style binary AlexNet.

Layer-wise weight scale, sign activations with the clipped STE, full-precision first
conv and last dense layer; the schedule is ``lns_jax.config.imagenet_recipe``. Args:
``finetune``, ``smoke`` (tests: tiny AlexNet at 64x64).
"""

from lns_jax.config import base_config, imagenet_recipe, parse_args


def get_config(arg: str = ""):
  args = parse_args(arg, {"finetune", "smoke"}, "configs/imagenet_alexnet.py")
  c = imagenet_recipe(base_config(), args)
  c.model.name = "alexnet_tiny" if "smoke" in args else "alexnet"
  c.model.input_binarizer = "ste_sign"
  c.model.weight_scale = "layer"
  if "smoke" in args:
    c.data.image_size = 64
  return c
