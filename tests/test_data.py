"""Tests of lns_jax.data: offline builds, exact contents, determinism, sharding."""

import gzip
import os
import socket
import time

import ml_collections
import numpy as np
import pytest

from lns_testutil import write_cifar10_archive

from lns_jax import data

FMNIST_DIR = data.FASHION_MNIST_DEBIAN_DIR


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
  """Any Python-level connection attempt fails the test."""
  def refuse(*args, **kwargs):
    raise AssertionError(f"network access attempted: {args}")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)


def train_it(config, **kw):
  """The training iterator, as the trainer calls it."""
  return data.train_iterator(config.data, batch_size=config.batch_size, seed=config.seed, **kw)


def eval_it(config, split="test", **kw):
  """The evaluation iterator, as the trainer calls it."""
  return data.eval_iterator(config.data, split, batch_size=config.batch_size, **kw)


def make_config(**data_fields):
  c = ml_collections.ConfigDict()
  c.batch_size = data_fields.pop("batch_size", 4)
  c.seed = data_fields.pop("seed", 0)
  c.data = data.default_data_config()
  for k, v in data_fields.items():
    c.data[k] = v
  return c


def collect(it):
  batches = list(it)
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}, batches


def denormalize(images, name):
  info = data.specs.SPECS[name]
  return np.rint(images * np.array(info.std) + np.array(info.mean)).astype(np.int64)


def lookup(raw_images):
  """bytes of an image -> its index in raw_images."""
  return {im.astype(np.uint8).tobytes(): i for i, im in enumerate(raw_images)}


# ----------------------------------------------------------------------------
# CIFAR-10 from a tiny archive in the original binary layout.

CIFAR_PER_BATCH, CIFAR_TEST = 4, 7  # 20 train, 7 test examples


@pytest.fixture(scope="session")
def cifar(tmp_path_factory):
  """(config, train images HWC, train labels, test images, test labels)."""
  root = tmp_path_factory.mktemp("cifar")
  train_im, train_lb, test_im, test_lb = write_cifar10_archive(
      root / "data" / "downloads" / "manual", CIFAR_PER_BATCH, CIFAR_TEST)
  config = make_config(name="cifar10", data_dir=str(root / "data"), augment=False)
  data.prepare(config.data)
  return config, train_im, train_lb, test_im, test_lb


def test_cifar_eval_matches_raw_bytes(cifar):
  config, _, _, test_im, test_lb = cifar
  info = data.get_info(config.data)
  assert (info.num_train, info.num_eval, info.num_validation) == (20, CIFAR_TEST, 0)
  assert info.image_shape == (32, 32, 3) and info.num_classes == 10
  out, batches = collect(eval_it(config, process_index=0, process_count=1))
  assert len(batches) == data.eval_steps(config.data, config.batch_size, process_count=1) == 2
  for b in batches:
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["mask"].dtype == np.float32
  np.testing.assert_array_equal(out["mask"], [1] * CIFAR_TEST + [0])
  assert not out["image"][-1].any() and out["label"][-1] == 0
  index = lookup(test_im)
  found = [index[im.astype(np.uint8).tobytes()]
           for im in denormalize(out["image"][:CIFAR_TEST], "cifar10")]
  assert sorted(found) == list(range(CIFAR_TEST))  # every test image exactly once
  np.testing.assert_array_equal(out["label"][:CIFAR_TEST], test_lb[found])


def test_cifar_validation_split(cifar):
  config, train_im, train_lb, _, _ = cifar
  config = make_config(name="cifar10", data_dir=config.data.data_dir, augment=False,
                       val_examples=5)
  info = data.get_info(config.data)
  assert (info.num_train, info.num_validation) == (15, 5)
  assert data.steps_per_epoch(config.data, config.batch_size, process_count=1) == 3
  index = lookup(train_im)
  seen = []
  for split, n in (("train", 15), ("validation", 5)):
    out, _ = collect(eval_it(config, split, process_index=0, process_count=1))
    assert out["mask"].sum() == n
    ids = [index[im.astype(np.uint8).tobytes()]
           for im in denormalize(out["image"][out["mask"] == 1], "cifar10")]
    np.testing.assert_array_equal(out["label"][out["mask"] == 1], train_lb[ids])
    seen += ids
  assert sorted(seen) == list(range(20))  # disjoint and complete


def test_cifar_training_batches_and_resize(cifar):
  config, _, _, _, _ = cifar
  config = make_config(name="cifar10", data_dir=config.data.data_dir, image_size=16,
                       batch_size=8)
  assert data.get_info(config.data).image_shape == (16, 16, 3)
  batches = list(train_it(config, epoch=0, process_index=0, process_count=1))
  assert len(batches) == data.steps_per_epoch(config.data, config.batch_size, process_count=1) == 2
  for b in batches:
    assert b["image"].shape == (8, 16, 16, 3) and b["image"].dtype == np.float32
    assert b["label"].shape == (8,) and b["label"].dtype == np.int32
    np.testing.assert_array_equal(b["mask"], np.ones(8, np.float32))


def test_cifar_augmentation_is_crop_and_flip(cifar):
  """Every augmented image is a flipped or unflipped window of the padded original."""
  config, train_im, _, _, _ = cifar
  config = make_config(name="cifar10", data_dir=config.data.data_dir, augment=True)
  out, _ = collect(train_it(config, epoch=3, process_index=0, process_count=1))
  images = denormalize(out["image"], "cifar10")
  padded = np.pad(train_im, [(0, 0), (4, 4), (4, 4), (0, 0)]).astype(np.int64)
  # The label identifies nothing; find each image's source by exhaustive search.
  flips = 0
  for im in images:
    hits = [(dy, dx, f) for dy in range(9) for dx in range(9) for f in (0, 1)
            if any(np.array_equal(im, (p[dy:dy + 32, dx:dx + 32, :][:, ::-1] if f
                                       else p[dy:dy + 32, dx:dx + 32, :]))
                   for p in padded)]
    assert hits, "augmented image is not a crop of any training image"
    flips += hits[0][2]
  assert 0 < flips < len(images)  # both branches happen


# ----------------------------------------------------------------------------
# Determinism and sharding (CIFAR fixture, augmentation on).


def test_same_seed_and_epoch_give_identical_batches(cifar):
  config = make_config(name="cifar10", data_dir=cifar[0].data.data_dir)
  kw = dict(process_index=0, process_count=1)
  a, _ = collect(train_it(config, epoch=1, **kw))
  b, _ = collect(train_it(config, epoch=1, **kw))
  c, _ = collect(train_it(config, epoch=2, **kw))
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
  assert not np.array_equal(a["image"], c["image"])
  config.seed = 1
  d, _ = collect(train_it(config, epoch=1, **kw))
  assert not np.array_equal(a["image"], d["image"])


def test_epochs_reorder(cifar):
  config = make_config(name="cifar10", data_dir=cifar[0].data.data_dir, augment=False)
  train_im = cifar[1]
  index = lookup(train_im)
  orders = []
  for epoch in (0, 1):
    out, _ = collect(train_it(config, epoch=epoch, process_index=0,
                                         process_count=1))
    orders.append([index[im.astype(np.uint8).tobytes()]
                   for im in denormalize(out["image"], "cifar10")])
  assert sorted(orders[0]) == sorted(orders[1]) == list(range(20))
  assert orders[0] != orders[1]


def test_start_step_is_the_tail_of_the_epoch(cifar):
  config = make_config(name="cifar10", data_dir=cifar[0].data.data_dir)
  kw = dict(epoch=5, process_index=0, process_count=1)
  full = list(train_it(config, **kw))
  assert len(full) == 5
  for k in (0, 2, 5):
    tail = list(train_it(config, start_step=k, **kw))
    assert len(tail) == 5 - k
    for x, y in zip(full[k:], tail):
      for key in x:
        np.testing.assert_array_equal(x[key], y[key])


@pytest.mark.parametrize("cache", [True, False])
def test_process_shards_are_disjoint_and_cover(cifar, cache):
  config = make_config(name="cifar10", data_dir=cifar[0].data.data_dir, augment=False,
                       cache=cache)
  index = lookup(cifar[1])
  ids = {}
  for pi in (0, 1):
    out, batches = collect(train_it(config, epoch=0, process_index=pi,
                                               process_count=2))
    assert len(batches) == 5
    assert data.steps_per_epoch(config.data, config.batch_size, process_count=2) == 5
    assert batches[0]["image"].shape[0] == 2  # per-process batch = 4 // 2
    ids[pi] = [index[im.astype(np.uint8).tobytes()]
               for im in denormalize(out["image"], "cifar10")]
  assert not set(ids[0]) & set(ids[1])
  assert sorted(ids[0] + ids[1]) == list(range(20))
  # Eval: 7 test examples over 2 processes, same number of steps on both.
  masks = [collect(eval_it(config, process_index=pi, process_count=2))[0]["mask"]
           for pi in (0, 1)]
  assert len(masks[0]) == len(masks[1]) and masks[0].sum() + masks[1].sum() == CIFAR_TEST


def test_streaming_matches_in_memory_for_eval(cifar):
  config = make_config(name="cifar10", data_dir=cifar[0].data.data_dir, cache=False)
  a, _ = collect(eval_it(config, process_index=0, process_count=1))
  config.data.cache = True
  b, _ = collect(eval_it(config, process_index=0, process_count=1))
  for k in a:
    np.testing.assert_allclose(a[k], b[k])


def test_streaming_training_is_deterministic(cifar):
  config = make_config(name="cifar10", data_dir=cifar[0].data.data_dir, cache=False)
  kw = dict(epoch=1, process_index=0, process_count=1)
  a = list(train_it(config, **kw))
  b = list(train_it(config, start_step=2, **kw))
  assert len(a) == 5 and len(b) == 3
  for x, y in zip(a[2:], b):
    np.testing.assert_array_equal(x["image"], y["image"])


def test_batch_must_divide_over_processes(cifar):
  config = make_config(name="cifar10", data_dir=cifar[0].data.data_dir, batch_size=5)
  with pytest.raises(ValueError, match="divisible"):
    train_it(config, epoch=0, process_index=0, process_count=2)


# ----------------------------------------------------------------------------
# MNIST from idx files the test writes.


def write_idx(path, array):
  """The original idx format: magic (0, 0, dtype 0x08, ndim), big-endian dims, bytes."""
  header = bytes([0, 0, 8, array.ndim]) + b"".join(
      int(d).to_bytes(4, "big") for d in array.shape)
  with gzip.open(path, "wb") as f:
    f.write(header + array.astype(np.uint8).tobytes())


def test_mnist_from_local_idx_files(tmp_path):
  rng = np.random.RandomState(1)
  raw = {}
  for split, n in (("train", 12), ("t10k", 6)):
    raw[split] = (rng.randint(0, 256, (n, 28, 28)), rng.randint(0, 10, n))
    write_idx(tmp_path / f"{split}-images-idx3-ubyte.gz", raw[split][0])
    write_idx(tmp_path / f"{split}-labels-idx1-ubyte.gz", raw[split][1])
  config = make_config(name="mnist", data_dir=str(tmp_path / "tfds"),
                       local_dir=str(tmp_path), batch_size=4)
  data.prepare(config.data)
  info = data.get_info(config.data)
  assert (info.num_train, info.num_eval, info.image_shape) == (12, 6, (28, 28, 1))
  out, _ = collect(eval_it(config, process_index=0, process_count=1))
  np.testing.assert_array_equal(out["mask"], [1] * 6 + [0] * 2)
  index = lookup(raw["t10k"][0][..., None])
  ids = [index[im.astype(np.uint8).tobytes()]
         for im in denormalize(out["image"][:6], "mnist")]
  assert sorted(ids) == list(range(6))
  np.testing.assert_array_equal(out["label"][:6], raw["t10k"][1][ids])
  # No extracted copies are left behind.
  assert not [p for p in (tmp_path / "tfds").iterdir() if "extract" in p.name]


# ----------------------------------------------------------------------------
# Fashion-MNIST from the Debian package's files.


@pytest.fixture(scope="session")
def fashion_config():
  if not os.path.isfile(os.path.join(FMNIST_DIR, "train-images-idx3-ubyte.gz")):
    pytest.skip("apt-get install dataset-fashion-mnist")
  # The real build (70k images) is done once per machine, into the usual TFDS
  # data_dir (or LNS_TEST_DATA_DIR), and reused by later runs and by training.
  config = make_config(name="fashion_mnist", batch_size=64, train_examples=256,
                       eval_examples=100, data_dir=os.environ.get("LNS_TEST_DATA_DIR"))
  built = data.build.builder(config.data).is_prepared()
  start = time.time()
  data.prepare(config.data)
  if not built:
    assert time.time() - start < 90, "building Fashion-MNIST took too long"
  return config


def test_fashion_mnist_real_files(fashion_config):
  config = fashion_config
  info = data.get_info(config.data)
  assert (info.num_train, info.num_eval, info.image_shape) == (256, 100, (28, 28, 1))
  batches = list(train_it(config, epoch=0, process_index=0, process_count=1))
  assert len(batches) == 4
  assert batches[0]["image"].shape == (64, 28, 28, 1)
  # Normalization brings the data near zero mean and unit variance.
  images = np.concatenate([b["image"] for b in batches])
  assert abs(images.mean()) < 0.3 and 0.7 < images.std() < 1.3
  out, ev = collect(eval_it(config, process_index=0, process_count=1))
  assert len(ev) == 2 and out["mask"].sum() == 100
  with gzip.open(os.path.join(FMNIST_DIR, "t10k-images-idx3-ubyte.gz")) as f:
    raw = np.frombuffer(f.read()[16:], np.uint8).reshape(-1, 28, 28, 1)
  with gzip.open(os.path.join(FMNIST_DIR, "t10k-labels-idx1-ubyte.gz")) as f:
    raw_labels = np.frombuffer(f.read()[8:], np.uint8)
  index = lookup(raw)
  ids = [index[im.astype(np.uint8).tobytes()]
         for im in denormalize(out["image"][:100], "fashion_mnist")]
  np.testing.assert_array_equal(out["label"][:100], raw_labels[ids])


def test_fashion_mnist_resized(fashion_config):
  config = make_config(name="fashion_mnist", batch_size=32, train_examples=64,
                       image_size=16, data_dir=fashion_config.data.data_dir)
  b = next(train_it(config, epoch=0, process_index=0, process_count=1))
  assert b["image"].shape == (32, 16, 16, 1)


# ----------------------------------------------------------------------------
# Missing files.


@pytest.mark.parametrize("name,expected", [
    ("fashion_mnist", ["apt-get install dataset-fashion-mnist",
                       "train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]),
    ("mnist", ["train-images-idx3-ubyte.gz", "local_dir"]),
    ("cifar10", ["cifar-10-binary.tar.gz", "downloads/manual"]),
    ("imagenet2012", ["ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"]),
])
def test_missing_files_raise_one_clear_error(tmp_path, name, expected):
  kw = {"local_dir": str(tmp_path / "empty")} if name == "fashion_mnist" else {}
  config = make_config(name=name, data_dir=str(tmp_path / "tfds"), **kw)
  with pytest.raises(data.DatasetNotFoundError) as e:
    data.prepare(config.data)
  assert isinstance(e.value, FileNotFoundError)
  for s in expected:
    assert s in str(e.value)
  with pytest.raises(data.DatasetNotFoundError):
    next(train_it(config, epoch=0, process_index=0, process_count=1))


def test_the_whole_config_is_refused_with_what_to_pass(cifar):
  config = cifar[0]
  with pytest.raises(TypeError, match="pass config.data"):
    data.get_info(config)
  with pytest.raises(TypeError, match="pass config.data"):
    data.train_iterator(config, batch_size=4, seed=0, epoch=0)
  assert data.get_info(config.data).num_train == 20


def test_unknown_url_is_refused_not_fetched():
  dl = data.build.OfflineDownloadManager(None, {"https://x/a.gz": "/tmp/a.gz"})
  assert dl.download({"a": "https://x/a.gz"}) == {"a": "/tmp/a.gz"}
  with pytest.raises(RuntimeError, match="offline"):
    dl.download("https://x/b.gz")


# ----------------------------------------------------------------------------
# ImageNet, with TFDS's mocked data.


def test_imagenet_pipeline_under_mock_data(tmp_path):
  import tensorflow_datasets as tfds
  manual = tmp_path / "manual"
  manual.mkdir()
  for f in ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"):
    (manual / f).write_bytes(b"")  # prepare() only checks they exist
  config = make_config(name="imagenet2012", data_dir=str(tmp_path / "tfds"),
                       local_dir=str(manual), image_size=32, batch_size=4,
                       train_examples=8, eval_examples=6)
  info = data.get_info(config.data)
  assert info.image_shape == (32, 32, 3) and info.num_classes == 1000
  with tfds.testing.mock_data(num_examples=8):
    batches = list(train_it(config, epoch=0, process_index=0, process_count=1))
    again = list(train_it(config, epoch=0, process_index=0, process_count=1))
    ev = list(eval_it(config, process_index=0, process_count=1))
  assert len(batches) == 2
  for b in batches:
    assert b["image"].shape == (4, 32, 32, 3) and b["image"].dtype == np.float32
    assert b["label"].dtype == np.int32 and b["label"].max() < 1000
  np.testing.assert_array_equal(batches[0]["image"], again[0]["image"])
  assert len(ev) == 2
  np.testing.assert_array_equal(np.concatenate([b["mask"] for b in ev]), [1] * 6 + [0] * 2)
  assert ev[0]["image"].shape == (4, 32, 32, 3)
