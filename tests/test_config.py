"""Bad configs give one line naming the field, before anything compiles."""

import pytest

from lns_jax import config as config_lib
from lns_testutil import load_config, smoke_config

CONFIGS = [("fashion_mnist_r20.py", ""), ("fashion_mnist_r20.py", "quick"),
           ("fashion_mnist_r20.py", "smoke"), ("cifar10_r20.py", ""), ("cifar10_r20.py", "val"),
           ("cifar10_r20.py", "finetune"), ("imagenet_r18.py", ""), ("imagenet_alexnet.py", ""),
           ("imagenet_r18.py", "dorefa"), ("imagenet_r18.py", "dorefa,finetune"),
           ("fashion_mnist_r20.py", "val"), ("fashion_mnist_r20.py", "val,sgd"),
           ("fashion_mnist_r20.py", "quick,val"), ("fashion_mnist_r20.py", "smoke,val,sgd"),
           ("fashion_mnist_r20.py", "paper"), ("fashion_mnist_r20.py", "paper,val"),
           ("fashion_mnist_r20.py", "paper,quick"), ("fashion_mnist_r20.py", "paper,smoke,val"),
           ("fashion_mnist_reactnet.py", ""), ("fashion_mnist_reactnet.py", "quick"),
           ("fashion_mnist_reactnet.py", "smoke,val"), ("fashion_mnist_reactnet.py", "val,finetune"),
           ("fashion_mnist_reactnet.py", "val,x2"),
           ("imagenet_reactnet.py", ""), ("imagenet_reactnet.py", "finetune"),
           ("imagenet_reactnet.py", "teacher"), ("imagenet_reactnet.py", "smoke")]


@pytest.mark.parametrize("name,arg", CONFIGS)
def test_shipped_configs_are_valid(name, arg):
  config_lib.validate(load_config(name, arg), num_devices=1)


BAD = [
    ("model.name", "resnet21", "model.name"),
    ("model.name", 3, "model.name"),
    ("data.name", "imagenet", "data.name"),
    ("stages", "pretrain,lnss", "stages"),
    ("stages", "", "stages"),
    ("stages", "pretrain,pretrain", "stages"),
    ("alpha", -0.1, "alpha"),
    ("alpha", "1", "alpha"),
    ("alpha", float("nan"), "alpha"),
    ("rho", -0.01, "rho"),
    ("rho", (0.6, 0.5), "rho"),
    ("rho", (0.1,), "rho"),
    ("rho", float("inf"), "rho"),
    ("rho", "high", "rho"),
    ("batch_size", 0, "batch_size"),
    ("batch_size", 12.5, "batch_size"),
    ("batch_size", True, "batch_size"),
    ("seed", -1, "seed"),
    ("optimizer", "rmsprop", "optimizer"),
    ("momentum", 1.5, "momentum"),
    ("weight_decay", -1e-4, "weight_decay"),
    ("lns.epochs", -1, "lns.epochs"),
    ("lns.epochs", 0, "lns.epochs"),
    ("lns.lr", float("inf"), "lns.lr"),
    ("lns.schedule", "exponential", "lns.schedule"),
    ("pretrain.decay_epochs", (30, 10), "pretrain.decay_epochs"),
    ("pretrain.decay_epochs", (-1,), "pretrain.decay_epochs"),
    ("reduction", "none", "reduction"),
    ("labels", "clean", "labels"),
    ("mapping.output", "sigmoid", "mapping.output"),
    ("mapping.clip", 0.0, "mapping.clip"),
    ("model.weight_scale", "tensor", "model.weight_scale"),
    ("model.input_binarizer", "relu", "model.input_binarizer"),
    ("model.clip", -1.0, "model.clip"),
    ("log_every_steps", 0, "log_every_steps"),
    ("keep_checkpoints", 0, "keep_checkpoints"),
    ("on_nonfinite", "ignore", "on_nonfinite"),
    ("init_from", 5, "init_from"),
]


@pytest.mark.parametrize("field,value,named", BAD)
def test_invalid_values_name_the_field(field, value, named):
  c = smoke_config()
  with c.unlocked():
    c.ignore_type()
    set_field_any(c, field, value)
  with pytest.raises(config_lib.ConfigError) as e:
    config_lib.validate(c, num_devices=1)
  msg = str(e.value)
  assert msg.startswith(f"config.{named}:"), msg
  assert "\n" not in msg


def set_field_any(config, dotted, value):
  node = config
  *parents, last = dotted.split(".")
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[last] = value


def test_unknown_keys_are_refused():
  c = smoke_config()
  c.unlock()
  c.lns.alpah = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"^config.lns.alpah: unknown field"):
    config_lib.validate(c)
  c = smoke_config()
  c.unlock()
  c.learning_rate = 0.1
  with pytest.raises(config_lib.ConfigError, match=r"^config.learning_rate: unknown field"):
    config_lib.validate(c)


def test_batch_size_must_divide_over_devices():
  c = smoke_config(batch_size=12)
  with pytest.raises(config_lib.ConfigError, match=r"config.batch_size: 12 must be a multiple .* \(8\)"):
    config_lib.validate(c, num_devices=8)
  config_lib.validate(smoke_config(batch_size=16), num_devices=8)


def test_warmup_first_needs_a_baseline():
  with pytest.raises(config_lib.ConfigError, match="config.init_from"):
    config_lib.validate(smoke_config(stages="warmup,lns"))


def test_input_too_small_for_the_model_is_a_config_error(tmp_path):
  from lns_jax import models
  c = load_config("imagenet_alexnet.py", "smoke")
  c.data.image_size = 8
  c.data.data_dir = str(tmp_path)
  from lns_jax import data
  with pytest.raises(config_lib.ConfigError, match="config.data.image_size"):
    info = data.get_info(c.data)
    models.check_input_shape(c, info.num_classes, info.image_shape)


def test_saved_config_from_an_older_version_gets_the_new_fields_defaults():
  import json
  saved = json.loads(smoke_config().to_json_best_effort())
  del saved["mapping"]["init"], saved["mapping"]["shard"], saved["pretrain"]["optimizer"]
  del saved["mapping"]["conv"]
  saved["alpha"] = 0.25
  c = config_lib.from_saved_json(json.dumps(saved))
  assert c.mapping.init == "random" and c.mapping.shard is True
  # mapping.conv: the conv such a run was trained with (XLA's), not today's default 'auto'
  assert c.mapping.conv == "xla" and config_lib.base_config().mapping.conv == "auto"
  assert c.pretrain.optimizer == "" and c.alpha == 0.25
  assert c.model.name == "resnet_tiny"  # saved values are kept
  config_lib.validate(c)


def test_paper_recipe_is_the_papers_proportions():
  """:paper = Sec. 4's CIFAR-10 recipe on 12 epochs: SGD everywhere, pretrain lr 0.1 x0.1
  at 50% / 75%, fine-tuning 30% of it from lr 0.01 x0.1 every quarter, alpha 1, rho 0.005."""
  c = load_config("fashion_mnist_r20.py", "paper,val")
  n = c.pretrain.epochs
  assert (c.optimizer, c.momentum, c.weight_decay, c.batch_size) == ("sgd", 0.9, 0.0, 128)
  assert all(c[s].optimizer in ("", "sgd") for s in ("pretrain", "warmup", "lns", "finetune"))
  assert (c.pretrain.lr, c.pretrain.schedule) == (0.1, "piecewise")
  assert c.pretrain.decay_epochs == (n / 2, 3 * n / 4) and c.pretrain.decay_factor == 0.1
  for s in ("lns", "finetune"):
    ft = c[s].epochs
    assert ft == pytest.approx(0.3 * n) and (c[s].lr, c[s].schedule) == (0.01, "piecewise")
    assert c[s].decay_epochs == pytest.approx((ft / 4, ft / 2, 3 * ft / 4))
  assert (c.alpha, c.rho, c.reduction, c.data.val_examples) == (1.0, 0.005, "mean", 10_000)
  assert c.warmup.alpha is None  # the warm start's alpha is config.alpha
  with pytest.raises(ValueError, match="one of 'sgd'"):
    load_config("fashion_mnist_r20.py", "paper,sgd")


def test_stage_alpha_falls_back_to_config_alpha_and_is_zero_for_ce_stages():
  c = smoke_config(alpha=0.0)
  c.warmup.alpha = 2.5
  assert config_lib.stage_alpha(c, "warmup") == 2.5
  assert config_lib.stage_alpha(c, "lns") == 0.0
  c.alpha = 0.3
  assert config_lib.stage_alpha(c, "lns") == 0.3
  assert config_lib.stage_alpha(c, "pretrain") == config_lib.stage_alpha(c, "finetune") == 0.0
  config_lib.validate(c)
  c.warmup.alpha = -1.0
  with pytest.raises(config_lib.ConfigError, match=r"^config.warmup.alpha: -1.0 must be >= 0"):
    config_lib.validate(c)
  c.warmup.alpha = None
  c.pretrain.alpha = 1.0
  with pytest.raises(config_lib.ConfigError, match=r"^config.pretrain.alpha: .*cross-entropy"):
    config_lib.validate(c)
