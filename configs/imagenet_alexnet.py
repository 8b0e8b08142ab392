"""The paper's ImageNet AlexNet recipe (Table 5): DoReFa-style binary AlexNet.

Layer-wise weight scale, sign activations with the clipped STE, full-precision first
conv and last dense layer; the same schedule as ResNet-18 (Sec. 4). Args: ``finetune``,
``smoke`` (tests: tiny AlexNet at 64x64).
"""

from lns_jax.config import base_config


def get_config(arg: str = ""):
  args = set(filter(None, arg.split(",")))
  unknown = args - {"finetune", "smoke"}
  if unknown:
    raise ValueError(f"configs/imagenet_alexnet.py: unknown arguments {sorted(unknown)}; "
                     f"use finetune, smoke.")
  c = base_config()
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.model.name = "alexnet"
  c.model.input_binarizer = "ste_sign"
  c.model.weight_scale = "layer"
  c.batch_size = 256
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.pretrain.epochs = 120
  c.pretrain.lr = 0.1
  c.pretrain.schedule = "piecewise"
  c.pretrain.decay_epochs = (70, 90, 110)
  c.warmup.epochs = 1
  c.warmup.lr = 0.01
  c.warmup.schedule = "constant"
  for stage in (c.lns, c.finetune):
    stage.epochs = 45
    stage.lr = 0.01
    stage.schedule = "piecewise"
    stage.decay_epochs = (15, 30)
  c.alpha = 1.0
  c.rho = 0.005
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.stages = "pretrain,finetune" if "finetune" in args else "pretrain,warmup,lns"
  if "smoke" in args:
    c.model.name = "alexnet_tiny"
    c.data.image_size = 64
    c.batch_size = 8
    c.data.train_examples = 16
    c.data.eval_examples = 8
    for stage in (c.pretrain, c.warmup, c.lns, c.finetune):
      stage.epochs = 1
      stage.decay_epochs = ()
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
  return c
