"""The paper's CIFAR-10 recipe (Sec. 4): binary ResNet-20, DoReFa-style baseline.

pretrain 400 epochs (batch 128, SGD lr 0.1, momentum 0.9, no weight decay), warm-start
the mappings, then fine-tune 120 epochs from lr 0.01, x0.1 every 30 epochs, alpha 1.0,
rho 0.005. Args (comma-separated): ``val`` keeps 10,000 training images aside as the
validation split the paper tunes on; ``finetune`` runs the Table 1 ablation instead of
LNS; ``smoke`` shrinks everything for tests.

Data: place the original cifar-10-binary.tar.gz in <data_dir>/downloads/manual/.
"""

from lns_jax.config import base_config, parse_args


def get_config(arg: str = ""):
  args = parse_args(arg, {"val", "finetune", "smoke"}, "configs/cifar10_r20.py")
  c = base_config()
  c.data.name = "cifar10"
  c.model.name = "resnet20"
  c.model.input_binarizer = "ste_sign"
  c.model.weight_scale = "layer"
  c.batch_size = 128
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.pretrain.epochs = 400
  c.pretrain.lr = 0.1
  c.pretrain.schedule = "piecewise"
  c.pretrain.decay_epochs = (200, 300)
  c.warmup.epochs = 5
  c.warmup.lr = 0.01
  c.warmup.schedule = "constant"
  for stage in (c.lns, c.finetune):
    stage.epochs = 120
    stage.lr = 0.01
    stage.schedule = "piecewise"
    stage.decay_epochs = (30, 60, 90)
  c.alpha = 1.0
  c.rho = 0.005
  c.stages = "pretrain,finetune" if "finetune" in args else "pretrain,warmup,lns"
  if "val" in args:
    c.data.val_examples = 10_000
  if "smoke" in args:
    c.model.name = "resnet_tiny"
    c.batch_size = 16
    c.data.image_size = 16
    c.data.train_examples = 64
    c.data.eval_examples = 32
    for stage in (c.pretrain, c.warmup, c.lns, c.finetune):
      stage.epochs = 1
      stage.decay_epochs = ()
    c.log_every_steps = 2
    c.checkpoint_every_steps = 2
  return c
