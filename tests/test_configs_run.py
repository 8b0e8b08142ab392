"""Every config in configs/ builds its model and trains: CIFAR-10 end to end on a tiny
archive in the original binary format, the ImageNet configs under tfds mock data."""

import json

import pytest
import tensorflow_datasets as tfds

from lns_jax import trainer
from lns_testutil import load_config, write_cifar10_archive

pytestmark = pytest.mark.slow


def test_cifar10_config_end_to_end_from_the_original_archive(tmp_path):
  write_cifar10_archive(tmp_path / "tfds" / "downloads" / "manual", per_batch=8, n_test=10)
  c = load_config("cifar10_r20.py", "smoke,val")
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.train_examples = 32
  c.data.val_examples = 8
  # Pretrain only: the LNS stage is the same code on any ResNet, trained end to end on
  # Fashion-MNIST (conftest's full_run); what only this test covers is the data path.
  c.stages = "pretrain"
  results = trainer.train(c, str(tmp_path / "run"))
  assert list(results) == ["pretrain"]
  for r in results.values():
    assert r["test"]["count"] == 10 and r["validation"]["count"] == 8
  table = open(tmp_path / "run" / "results.md").read()
  assert "val top-1" in table


@pytest.mark.parametrize("name,arg", [("imagenet_r18.py", "smoke"),
                                      ("imagenet_alexnet.py", "smoke"),
                                      ("imagenet_r18.py", "smoke,dorefa")])
def test_imagenet_configs_train_under_mock_data(name, arg, tmp_path):
  c = load_config(name, arg)
  manual = tmp_path / "manual"
  manual.mkdir()
  for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / f).write_bytes(b"")  # prepare() checks they exist; mock_data serves the data
  c.data.data_dir = str(tmp_path / "tfds")
  c.data.local_dir = str(manual)
  # One step of 8 images, pretrain only: the LNS objective on AlexNet is
  # test_models.py's jitted Eq. 21 gradient, the LNS stage end to end is full_run's.
  c.stages = "pretrain"
  c.pretrain.epochs = 0.5
  with tfds.testing.mock_data(num_examples=16):
    results = trainer.train(c, str(tmp_path / "run"))
  assert all(r["steps"] == 1 for r in results.values())
  summary = json.load(open(tmp_path / "run" / "summary.json"))
  last = list(results)[-1]
  assert summary["stages"][last]["test"]["count"] == 8


def test_imagenet_reactnet_distils_from_a_resnet34_checkpoint_under_mock_data(tmp_path):
  """configs/imagenet_reactnet.py at smoke size: ':teacher' trains the real-valued
  ResNet-34 (tiny) one step; the ReActNet-18 (tiny) then trains step 2 one step,
  distilling from it by checkpoint path (another model than the student's; step 1 is
  the same step with real weights, trained in tests/test_reactnet_train.py)."""
  manual = tmp_path / "manual"
  manual.mkdir()
  for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / f).write_bytes(b"")

  def config(arg):
    c = load_config("imagenet_reactnet.py", arg)
    c.data.data_dir = str(tmp_path / "tfds")
    c.data.local_dir = str(manual)
    for stage in ("teacher", "step1", "pretrain"):
      c[stage].epochs = 0.5
    return c

  with tfds.testing.mock_data(num_examples=16):
    teacher = trainer.train(config("teacher,smoke"), str(tmp_path / "resnet34"))
    c = config("smoke")
    assert c.model.name == "reactnet18_tiny" and c.distill.teacher
    c.stages = "pretrain"
    c.distill.teacher = str(tmp_path / "resnet34" / "teacher")
    results = trainer.train(c, str(tmp_path / "run"))
  assert list(teacher) == ["teacher"] and list(results) == ["pretrain"]
  assert all(r["steps"] == 1 for r in results.values())
  records = [json.loads(l) for l in open(tmp_path / "run" / "metrics.jsonl")]
  assert all("kd" in r for r in records if r["kind"] == "train")
