"""The in-memory loader (config.data.loader='numpy') against the TFDS loader.

Both read the same original files; for a given seed they must yield the same examples
in the same order with the same augmentation (lns_jax.data.numpy_loader says where they may
differ: the resize, to float rounding).
"""

import os

import jax
import ml_collections
import numpy as np
import pytest

from lns_testutil import write_cifar10_archive

from lns_jax import config as config_lib
from lns_jax import data, parallel
from lns_jax.data import numpy_loader

FMNIST_DIR = data.FASHION_MNIST_DEBIAN_DIR


def train_it(config, **kw):
  """The training iterator, as the trainer calls it."""
  return data.train_iterator(config.data, batch_size=config.batch_size, seed=config.seed, **kw)


def eval_it(config, split="test", **kw):
  """The evaluation iterator, as the trainer calls it."""
  return data.eval_iterator(config.data, split, batch_size=config.batch_size, **kw)


def make_config(loader, **fields):
  c = ml_collections.ConfigDict()
  c.batch_size = fields.pop("batch_size", 8)
  c.seed = fields.pop("seed", 3)
  c.data = data.default_data_config()
  c.data.loader = loader
  for k, v in fields.items():
    c.data[k] = v
  return c


def assert_same_batches(a, b, exact=True):
  a, b = list(a), list(b)
  assert len(a) == len(b) > 0
  for x, y in zip(a, b):
    assert all(isinstance(v, jax.Array) for v in y.values())
    assert sorted(x) == sorted(y)
    for k in x:
      got = np.asarray(y[k])
      assert got.dtype == x[k].dtype and got.shape == x[k].shape, k
      if exact or k != "image":
        np.testing.assert_array_equal(got, x[k], err_msg=k)
      else:
        np.testing.assert_allclose(got, x[k], atol=2e-5, err_msg=k)


def both(fn, **fields):
  return fn(make_config("tfds", **fields)), fn(make_config("numpy", **fields))


@pytest.fixture(scope="module")
def fashion():
  if not os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
    pytest.skip("apt-get install dataset-fashion-mnist")
  data.prepare(make_config("tfds").data)  # the TFDS build, once per machine


def test_fashion_mnist_same_batches_as_tfds(fashion):
  """Real Fashion-MNIST: train batches (augmented, 2 processes, resumed mid-epoch),
  eval batches with padding, the validation split: all bit for bit."""
  f = dict(train_examples=600, eval_examples=50, val_examples=100, batch_size=64)
  for pi in (0, 1):
    kw = dict(epoch=2, start_step=1, process_index=pi, process_count=2)
    assert_same_batches(*both(lambda c: train_it(c, **kw), **f))
  for split in ("test", "validation"):
    kw = dict(process_index=1, process_count=2)
    assert_same_batches(*both(lambda c: eval_it(c, split, **kw), **f))
  tf_info, np_info = both(lambda c: data.get_info(c.data), **f)
  assert tf_info == np_info and np_info.num_train == 600
  assert both(lambda c: data.steps_per_epoch(c.data, c.batch_size, process_count=2), **f) == (9, 9)
  full = make_config("numpy")
  info = data.get_info(full.data)
  assert info.num_train == 60_000 and info.num_eval == 10_000


@pytest.fixture(scope="module")
def cifar_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("cifar_np")
  write_cifar10_archive(root / "downloads" / "manual", 6, 5, seed=4)
  data.prepare(make_config("tfds", name="cifar10", data_dir=str(root)).data)
  return str(root)


def test_cifar10_same_batches_as_tfds(cifar_dir):
  """The original archive: crops and flips of 3-channel images equal; a resize close."""
  f = dict(name="cifar10", data_dir=cifar_dir, batch_size=4)
  kw = dict(epoch=1, process_index=0, process_count=1)
  assert_same_batches(*both(lambda c: train_it(c, **kw), **f))
  assert_same_batches(*both(lambda c: eval_it(c, process_index=0, process_count=1),
                            **f))
  assert_same_batches(*both(lambda c: train_it(c, **kw), image_size=16, **f),
                      exact=False)


def test_numpy_hash_equals_tensorflow():
  index = np.array([0, 1, 2, 59_999, 2**40 + 7], np.int64)
  seed = data.augment.epoch_seed(5, 3)
  np.testing.assert_array_equal(data.augment.example_bits_np(seed, index),
                                data.augment.example_bits(seed, index).numpy())


def test_tfds_order_is_md5_of_split_and_index():
  order = numpy_loader.tfds_order(1000, "train")
  assert sorted(order) == list(range(1000)) and list(order) != list(range(1000))
  assert list(numpy_loader.tfds_order(1000, "test")) != list(order)


def test_batches_stay_on_the_devices(cifar_dir):
  """Sharded over the local devices as the trainer's mesh wants: shard_batch moves nothing."""
  c = make_config("numpy", name="cifar10", data_dir=cifar_dir, batch_size=16)
  batch = next(train_it(c, epoch=0))
  mesh = parallel.make_mesh()
  sharded = parallel.shard_batch(batch, mesh)
  assert sharded["image"].sharding.is_equivalent_to(parallel.batch_sharding(mesh), 4)
  assert {s.device for s in sharded["image"].addressable_shards} == set(jax.devices())
  np.testing.assert_array_equal(np.asarray(sharded["image"]), np.asarray(batch["image"]))


def test_bad_loader_and_missing_files(tmp_path):
  c = config_lib.base_config()
  c.data.name, c.data.loader = "imagenet2012", "numpy"
  with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.loader: 'numpy' .*"
                                                   r"'imagenet2012' needs 'tfds'"):
    config_lib.validate(c)
  c.data.name, c.data.loader = "cifar10", "pandas"
  with pytest.raises(config_lib.ConfigError, match=r"^config\.data\.loader: 'pandas' is not"):
    config_lib.validate(c)
  c = make_config("numpy", name="mnist", data_dir=str(tmp_path))
  with pytest.raises(data.DatasetNotFoundError, match="original files") as e:
    next(train_it(c, epoch=0, process_index=0, process_count=1))
  assert "train-images-idx3-ubyte.gz" in str(e.value) and "local_dir" in str(e.value)
  manual = tmp_path / "downloads" / "manual"
  manual.mkdir(parents=True)
  (manual / "cifar-10-binary.tar.gz").write_bytes(b"not a tar")
  with pytest.raises(data.DatasetNotFoundError, match="not the CIFAR-10 binary archive"):
    data.prepare(make_config("numpy", name="cifar10", data_dir=str(tmp_path)).data)
