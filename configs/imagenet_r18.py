"""The paper's ImageNet ResNet-18 recipe (Table 3): Bi-Real ResNet-18 + PReLU baseline.

Bi-Real blocks, ApproxSign activations, per-channel weight scale, full-precision stem,
downsample shortcuts and classifier; the schedule is ``lns_jax.config.imagenet_recipe``.
Args: ``finetune`` (Table 4 ablation), ``smoke`` (tests: tiny model, 32x32 inputs).

Data: TFDS imagenet2012 built from ILSVRC2012_img_{train,val}.tar in its manual dir.
"""

from lns_jax.config import base_config, imagenet_recipe, parse_args


def get_config(arg: str = ""):
  args = parse_args(arg, {"finetune", "smoke"}, "configs/imagenet_r18.py")
  c = imagenet_recipe(base_config(), args)
  c.model.name = "resnet18_tiny" if "smoke" in args else "resnet18"
  c.model.input_binarizer = "approx_sign"
  c.model.weight_scale = "channel"
  if "smoke" in args:
    c.data.image_size = 32
  return c
