"""Shared helpers for the end-to-end tests."""

import importlib.util
import os

import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location("cfg_" + name, os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def set_field(config, dotted, value):
  node = config
  *parents, last = dotted.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


def smoke_config(**overrides):
  """Tiny ResNet, 128 real Fashion-MNIST images, batch 32: 4 steps an epoch."""
  c = load_config("fashion_mnist_r20.py", "smoke")
  c.data.train_examples = 128
  c.data.eval_examples = 64
  c.pretrain.epochs = 2
  c.warmup.epochs = 1
  c.lns.epochs = 1
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  for k, v in overrides.items():
    set_field(c, k.replace("__", "."), v)
  return c


# The same config as train.py overrides, for subprocess runs.
SMOKE_FLAGS = ["--config=" + os.path.join(ROOT, "configs", "fashion_mnist_r20.py") + ":smoke",
               "--config.data.train_examples=128", "--config.data.eval_examples=64",
               "--config.pretrain.epochs=2", "--config.warmup.epochs=1", "--config.lns.epochs=1",
               "--config.log_every_steps=2", "--config.checkpoint_every_steps=3"]


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same_variables(a, b, atol=1e-6):
  la, lb = leaves(a), leaves(b)
  assert len(la) == len(lb)
  for x, y in zip(la, lb):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=atol)
