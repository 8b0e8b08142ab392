"""The paper's ImageNet ResNet-18 recipes: Table 3 (Bi-Real + PReLU) and Table 4 (DoReFa).

Default (Table 3, baseline 59.0%): Bi-Real blocks, ApproxSign activations, per-channel
weight scale, full-precision stem, downsample shortcuts and classifier; the schedule is
``lns_jax.config.imagenet_recipe``. Args (comma-separated):
  ``dorefa``    Table 4's network instead: the DoReFa binary ResNet-18 (standard basic
                blocks, clipped-STE sign activations, layer-wise scale; baseline 52.5%),
                fine-tuned 60 epochs with or without LNS;
  ``finetune``  plain fine-tuning instead of warmup + LNS (the fine-tuning row of
                Table 4 with ``dorefa``; for the whole ablation across seeds use
                ``python -m lns_jax.ablation``);
  ``smoke``     tests: tiny model, 32x32 inputs.

Data: TFDS imagenet2012 built from ILSVRC2012_img_{train,val}.tar in its manual dir.
"""

from lns_jax.config import base_config, imagenet_recipe, parse_args


def get_config(arg: str = ""):
  args = parse_args(arg, {"dorefa", "finetune", "smoke"}, "configs/imagenet_r18.py")
  c = imagenet_recipe(base_config(), args)
  if "dorefa" in args:
    c.model.name = "resnet18_dorefa_tiny" if "smoke" in args else "resnet18_dorefa"
    c.model.input_binarizer = "ste_sign"
    c.model.weight_scale = "layer"
    if "smoke" not in args:
      # Table 4: "fine-tune ... for 60 epochs"; the decay every 15 epochs as in Sec. 4.
      for stage in (c.lns, c.finetune):
        stage.epochs = 60
        stage.decay_epochs = (15, 30, 45)
    return c
  c.model.name = "resnet18_tiny" if "smoke" in args else "resnet18"
  c.model.input_binarizer = "approx_sign"
  c.model.weight_scale = "channel"
  if "smoke" in args:
    c.data.image_size = 32
  return c
