"""ReActNet on real Fashion-MNIST: a distilling teacher, two-step training, then LNS.

  python train.py --config=configs/fashion_mnist_reactnet.py --workdir=workdirs/reactnet
  python train.py --config=configs/fashion_mnist_reactnet.py:quick --workdir=workdirs/rq
  python -m lns_jax.ablation --config=configs/fashion_mnist_reactnet.py:val \\
      --workdir=workdirs/reactnet_ablation --seeds=3

The network is ``reactnet20`` (lns_jax.models.reactnet): ReActNet's units (RSign,
RPReLU, pooled shortcuts, the two-conv downsampling) at ResNet-20's size, ApproxSign
activations, per-channel weight scale. The stages (docs/reactnet.md):

  teacher   the real-valued network of the same shape (real weights and activations);
  step1     ReActNet's step 1: binary activations, real weights, weight decay 1e-5;
  pretrain  step 2: both binary, initialised from step 1, weight decay 0;
  warmup, lns (or finetune with ``:finetune``): as every config.

Every stage after the teacher distils from it (``config.distill``: ReActNet's
distribution loss alone, no cross-entropy, temperature 1). Adam with linear decay to 0
(ReActNet, Liu et al. 2020, Sec. 4.1) at batch 64, as ``fashion_mnist_r20.py``.
Arguments (comma-separated): ``quick`` (every stage in minutes), ``smoke`` (tiny, for
tests), ``val`` (the last 10,000 training images as a validation split), ``finetune``
(plain fine-tuning after step 2 instead of warmup + lns), ``x2`` (steps 1 and 2 at twice
their epochs: the baseline's check of convergence, as issue 30's: the same recipe at twice
the epochs gains at most 1 point), ``teacher_x2`` (the teacher at twice its epochs: the
teacher's own check, ``--config.stages=teacher``).
"""

from lns_jax.config import base_config, parse_args, reactnet_recipe


def get_config(arg: str = ""):
  args = parse_args(arg, {"quick", "smoke", "val", "finetune", "x2", "teacher_x2"},
                    "configs/fashion_mnist_reactnet.py")
  if {"quick", "smoke"} <= args:
    raise ValueError("configs/fashion_mnist_reactnet.py: use one of 'quick' and 'smoke'.")
  c = reactnet_recipe(base_config(), "reactnet20", teacher="teacher")
  c.data.name = "fashion_mnist"
  c.batch_size = 64
  # XLA's float forward with 1-bit residuals: on a CPU the packed forward is recomputed in
  # each of a ReActNet unit's many consumers of the conv's output; 'bits' is 0.85-0.88x
  # 'xla''s step time here, 'packed' 1.11-1.13x (DECISIONS 26).
  c.model.conv = "bits"
  c.stages = "teacher,step1,pretrain," + ("finetune" if "finetune" in args else "warmup,lns")
  # A real-valued network converges in a few epochs on Fashion-MNIST; the two binary
  # steps get ReActNet's equal halves (128 + 128 epochs on ImageNet).
  c.teacher.update(epochs=6, lr=2e-3, schedule="linear")
  c.step1.update(epochs=8, lr=1e-3, schedule="linear", weight_decay=1e-5)
  c.pretrain.update(epochs=8, lr=1e-3, schedule="linear", weight_decay=0.0)
  c.warmup.update(epochs=0.5, lr=1e-3, schedule="constant")
  # Fine-tuning at 1/5 of step 2's lr, as fashion_mnist_r20.py's later stages.
  c.lns.update(epochs=2, lr=2e-4, schedule="linear")
  c.finetune.update(epochs=2, lr=2e-4, schedule="linear")
  c.alpha = 1.0
  c.rho = 0.005
  c.log_every_steps = 100
  c.checkpoint_every_steps = 500
  if "val" in args:
    c.data.val_examples = 10_000
  if "quick" in args:
    for stage, epochs in (("teacher", 0.5), ("step1", 0.5), ("pretrain", 0.5),
                          ("warmup", 0.1), ("lns", 0.25), ("finetune", 0.25)):
      c[stage].epochs = epochs
  elif "smoke" in args:
    c.model.name = "reactnet_tiny"
    c.batch_size = 32
    c.data.train_examples = 256
    c.data.eval_examples = 200
    if "val" in args:
      c.data.val_examples = 64
    for stage in ("teacher", "step1", "pretrain", "warmup", "lns", "finetune"):
      c[stage].epochs = 1
    c.log_every_steps = 4
    c.checkpoint_every_steps = 4
  if "x2" in args:
    c.step1.epochs *= 2
    c.pretrain.epochs *= 2
  if "teacher_x2" in args:  # its own argument: x2's runs reuse the 6-epoch teacher
    c.teacher.epochs *= 2
  return c
