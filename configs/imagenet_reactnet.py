"""ReActNet on the Bi-Real ResNet-18 backbone at its published ImageNet recipe, then LNS.

  python train.py --config=configs/imagenet_reactnet.py:teacher --workdir=workdirs/imagenet_resnet34
  python train.py --config=configs/imagenet_reactnet.py --workdir=workdirs/imagenet_reactnet \\
      --config.distill.teacher=workdirs/imagenet_resnet34/teacher

ReActNet (Liu et al., ECCV 2020, Sec. 4.1 and Table 4: 65.9% top-1 on this backbone):
Adam, lr 2.5e-3, batch 512, linear decay to 0, 128 epochs of step 1 (binary activations,
real weights, weight decay 1e-5) then 128 of step 2 (both binary, initialised from step
1, weight decay 0), each distilling from a real-valued ResNet-34 (the distribution loss
alone). ``config.distill.teacher`` is the teacher's checkpoint path: a stage folder of an
lns-jax run (``:teacher`` trains one, torchvision's recipe: SGD lr 0.1, momentum 0.9,
weight decay 1e-4, batch 256, 90 epochs, x0.1 every 30); the default path is where
that command writes it. Then warmup + lns (or ``finetune``): 48 epochs (the paper's
proportion, 45 of 120) from 1/10 of the lr, linear decay, distilling too.
Args: ``teacher``, ``finetune``, ``smoke`` (tests: tiny models, 32x32 inputs).
Data: TFDS imagenet2012 built from ILSVRC2012_img_{train,val}.tar in its manual dir.
"""

from lns_jax.config import (base_config, imagenet_recipe, parse_args, reactnet_recipe,
                            stage_config)

TEACHER_DIR = "workdirs/imagenet_resnet34/teacher"


def get_config(arg: str = ""):
  args = parse_args(arg, {"teacher", "finetune", "smoke"}, "configs/imagenet_reactnet.py")
  c = imagenet_recipe(base_config(), args - {"smoke"})
  smoke = "smoke" in args
  if "teacher" in args:
    c.model.name = "resnet34_tiny" if smoke else "resnet34"
    c.stages = "teacher"
    c.weight_decay = 1e-4
    c.teacher = stage_config(90, 0.1, decay_epochs=(30, 60))
  else:
    reactnet_recipe(c, "reactnet18_tiny" if smoke else "reactnet18", teacher=TEACHER_DIR)
    c.batch_size = 512
    c.stages = "step1,pretrain," + ("finetune" if "finetune" in args else "warmup,lns")
    c.step1 = stage_config(128, 2.5e-3, schedule="linear")
    c.step1.weight_decay = 1e-5
    c.pretrain = stage_config(128, 2.5e-3, schedule="linear")
    c.pretrain.weight_decay = 0.0
    c.warmup = stage_config(1, 2.5e-4, schedule="constant")
    c.lns = stage_config(48, 2.5e-4, schedule="linear")
    c.finetune = stage_config(48, 2.5e-4, schedule="linear")
  if smoke:
    c.batch_size = 8
    c.data.image_size = 32
    c.data.train_examples = 16
    c.data.eval_examples = 8
    for stage in ("teacher", "step1", "pretrain", "warmup", "lns", "finetune"):
      c[stage].update(epochs=1, decay_epochs=())
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
  return c
