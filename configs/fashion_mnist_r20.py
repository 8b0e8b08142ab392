"""The embedded default: binary ResNet-20 on real Fashion-MNIST, all three stages.

  python train.py --config=configs/fashion_mnist_r20.py --workdir=workdirs/fmnist
  python train.py --config=configs/fashion_mnist_r20.py:quick --workdir=workdirs/quick

The data comes from Debian's dataset-fashion-mnist package (built into TFDS offline).
``quick`` runs every stage in a few minutes on 2 CPU cores; ``smoke`` is for tests.
"""

from lns_jax.config import base_config


def get_config(arg: str = ""):
  c = base_config()
  c.data.name = "fashion_mnist"
  c.model.name = "resnet20"
  c.batch_size = 128
  c.optimizer = "sgd"
  c.weight_decay = 0.0
  # Fashion-MNIST is easy compared with CIFAR-10: a shorter schedule than the paper's
  # 400 + 120 epochs suffices; cosine decay gets there in fewer epochs.
  c.pretrain.epochs = 30
  c.pretrain.lr = 0.1
  c.pretrain.schedule = "cosine"
  c.warmup.epochs = 1
  c.warmup.lr = 0.01
  c.warmup.schedule = "constant"
  c.lns.epochs = 10
  c.lns.lr = 0.01
  c.lns.schedule = "cosine"
  c.finetune.epochs = 10
  c.finetune.lr = 0.01
  c.finetune.schedule = "cosine"
  c.alpha = 1.0
  c.rho = 0.005
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  if arg == "quick":
    # About 2.5 epochs of compute in all, to fit 15 minutes on 2 CPU cores. Adam (as in
    # Bi-Real Net) trains a binary network from scratch in far fewer steps than SGD.
    c.optimizer = "adam"
    c.pretrain.epochs = 1.5
    c.pretrain.lr = 2e-3
    c.warmup.epochs = 0.2
    c.warmup.lr = 1e-3
    c.lns.epochs = 0.5
    c.lns.lr = 1e-4
    c.finetune.epochs = 0.5
    c.finetune.lr = 1e-4
    c.eval_every_epochs = 1
  elif arg == "smoke":
    c.model.name = "resnet_tiny"
    c.batch_size = 32
    c.data.train_examples = 256
    c.data.eval_examples = 200
    c.pretrain.epochs = 2
    c.warmup.epochs = 1
    c.lns.epochs = 1
    c.finetune.epochs = 1
    c.log_every_steps = 4
    c.checkpoint_every_steps = 4
  elif arg:
    raise ValueError(f"configs/fashion_mnist_r20.py: unknown argument {arg!r}; "
                     f"use '', 'quick' or 'smoke'.")
  return c
