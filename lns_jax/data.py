"""Input pipelines: TFDS datasets built offline from local files, read with tf.data.

Datasets: ``fashion_mnist``, ``mnist``, ``cifar10`` (the paper's CIFAR-10 recipe) and
``imagenet2012``.

Two loaders, chosen by ``config.data.loader``: ``'tfds'`` (the default, described
below, and the only one for ImageNet) and ``'numpy'`` (:mod:`lns_jax.data_numpy`: the
original files read with NumPy, the split kept on the device, batches made there with
jax.numpy; the same examples in the same order with the same augmentation, see that
module for where they differ). The public functions here serve both. TensorFlow and
TFDS are imported only when the TFDS loader is used, so this module, the trainer and
the ``'numpy'`` loader run where TensorFlow is not installed.

Offline design
--------------
Every dataset is the *stock* TFDS builder (its ``_info`` and ``_generate_examples``
unchanged, so the prepared files are exactly what ``tfds.load`` would produce), but
its download step is served from local files:

* ``prepare(config)`` instantiates the stock builder and replaces, on that instance
  only, ``_split_generators`` with a wrapper that hands the stock method a download
  manager proxy. The proxy maps each URL the builder asks for to a local file
  (Fashion-MNIST: the Debian package ``dataset-fashion-mnist``; MNIST: a directory of
  the original idx ``.gz`` files; CIFAR-10: the original ``cifar-10-binary.tar.gz``)
  and extracts it with TFDS's own extractor into a temporary directory that is
  deleted after the build (the TFRecords are all that is kept). An unknown URL is an
  error, never a fetch.
* ImageNet has no URLs: the stock builder reads ``manual_dir``, which we set.
* While building, TFDS's HTTP downloader and GCS lookups are patched to raise, and
  ``try_download_gcs=False``, so no code path can reach the network.
* A missing input raises ``DatasetNotFoundError`` (a ``FileNotFoundError``) naming the
  exact files to place and where, before TFDS is asked to build anything.

Reading
-------
Training is deterministic: for a given ``(config.seed, epoch)`` the order and the
augmentation of every example are fixed, so a run resumed mid-epoch with
``start_step`` sees exactly the batches it would have seen. Small datasets
(``cache=True``, the default except for ImageNet) are decoded once into host memory;
an epoch is then a NumPy permutation of example indices (independent of TF's global
seed) gathered and augmented by tf.data. Large datasets stream from the TFRecords
with seeded file and buffer shuffles. Augmentation always uses stateless random ops
seeded by ``(seed, epoch, example index)``.

Each process reads only its own contiguous shard of a split; the per-process batch
is ``config.batch_size // process_count``. Evaluation reads every example once, in
order, and pads the last batch (``mask`` = 0 on padding) so that all processes run
the same number of eval steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import importlib
import logging as pylogging
import math
import os
import shutil
import sys
import tempfile
import time
import types
from typing import Iterator, Optional
from unittest import mock

import numpy as np

from lns_jax.cli import quiet_environment
from lns_jax.config import ConfigError
from lns_jax.data_config import LOADERS, NUMPY_DATASETS, check_loader  # noqa: F401
from lns_jax.data_config import default_data_config  # noqa: F401  (re-exported)


class LoaderUnavailableError(ConfigError, ImportError):
  """``config.data.loader='tfds'`` where TensorFlow or TFDS is not installed."""


class _LazyModule(types.ModuleType):
  """``tensorflow`` / ``tensorflow_datasets``, imported at the first attribute access.

  Importing this module never imports TensorFlow: only the TFDS loader does, when a
  pipeline is actually built, so the model, the train step, the config and the
  ``'numpy'`` loader (``lns_jax.data_numpy``) run where TensorFlow is not installed.
  """

  def __init__(self, name: str):
    super().__init__(name)
    self._module = None

  def _load(self):
    if self._module is None:
      quiet_environment()  # before TensorFlow's first import: no oneDNN / absl start-up lines
      try:
        import tensorflow  # noqa: F401  pylint: disable=unused-import
        module = importlib.import_module(self.__name__)
      except ImportError as e:
        raise LoaderUnavailableError(
            f"config.data.loader: 'tfds' needs tensorflow and tensorflow-datasets ({e}); "
            f"without them use --config.data.loader=numpy ({', '.join(NUMPY_DATASETS)}).") from e
      _hide_gpus_from_tensorflow()
      self._module = module
    return self._module

  def __getattr__(self, attr):
    if attr.startswith("__"):
      raise AttributeError(attr)
    return getattr(self._load(), attr)


def _hide_gpus_from_tensorflow():
  """tf.data must never grab the accelerator; JAX owns it."""
  import tensorflow
  try:
    tensorflow.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF already initialized its devices elsewhere
    pass


tf = _LazyModule("tensorflow")
tfds = _LazyModule("tensorflow_datasets")

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
_MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
_CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
_IMAGENET_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


class DatasetNotFoundError(FileNotFoundError):
  """The local files a dataset is built from are missing."""


@dataclasses.dataclass(frozen=True)
class _Spec:
  """Static facts about one supported dataset."""
  num_classes: int
  native_shape: tuple  # (H, W, C) as stored
  eval_split: str  # the TFDS split used as "test"
  num_train: int  # nominal split sizes, used until the dataset is built
  num_test: int
  mean: tuple  # per channel, on the 0..255 scale
  std: tuple
  in_memory: bool  # default for `cache`
  # Training augmentation of the small datasets: zero-pad then random crop back
  # to the native size, optionally a horizontal flip.
  pad: int = 0
  flip: bool = False


_SPECS = {
    # Pad 2 + crop: small translations, the 28x28 analogue of CIFAR's pad 4 on
    # 32x32. Clothing keeps its class under a mirror image, so flip too.
    "fashion_mnist": _Spec(
        10, (28, 28, 1), "test", 60_000, 10_000,
        (72.94,), (90.02,), True, pad=2, flip=True),
    # Digits are not mirror-invariant (flipping changes their shape class, e.g.
    # 2/5, 3/E), so MNIST gets translations only.
    "mnist": _Spec(
        10, (28, 28, 1), "test", 60_000, 10_000,
        (33.32,), (78.57,), True, pad=2, flip=False),
    # The paper's CIFAR recipe: pad 4, random 32x32 crop, horizontal flip.
    "cifar10": _Spec(
        10, (32, 32, 3), "test", 50_000, 10_000,
        (125.31, 122.95, 113.87), (62.99, 62.09, 66.70), True, pad=4, flip=True),
    # Random resized crop + flip (train), resize + center crop (eval).
    "imagenet2012": _Spec(
        1000, (224, 224, 3), "validation", 1_281_167, 50_000,
        (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), False),
}

_IMAGENET_DEFAULT_SIZE = 224
_IMAGENET_CROP_FRACTION = 0.875


# ----------------------------------------------------------------------------
# Config helpers.


def _data_cfg(config):
  """`config.data` over the defaults, so configs may leave fields out."""
  merged = default_data_config()
  if "data" in config:
    for k, v in config.data.items():
      merged[k] = v
  return merged


def _spec(name: str) -> _Spec:
  if name not in _SPECS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(_SPECS)}.")
  return _SPECS[name]


def data_dir(config) -> str:
  """TFDS data_dir: ``config.data.data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  d = _data_cfg(config).data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(d))


def local_dir(config) -> str:
  """Directory holding the original files a dataset is built from."""
  cfg = _data_cfg(config)
  if cfg.local_dir:
    return os.path.abspath(os.path.expanduser(cfg.local_dir))
  manual = os.path.join(data_dir(config), "downloads", "manual")
  return {
      "fashion_mnist": FASHION_MNIST_DEBIAN_DIR,
      "mnist": os.path.join(manual, "mnist"),
      "cifar10": manual,
      "imagenet2012": manual,
  }[cfg.name]


def _loader(cfg) -> str:
  """'tfds' or 'numpy' (configs from before ``config.data.loader`` read with TFDS)."""
  loader = cfg.get("loader", "tfds")
  try:
    check_loader(cfg.name, loader)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return loader


def _use_cache(cfg) -> bool:
  return _spec(cfg.name).in_memory if cfg.cache is None else bool(cfg.cache)


def _image_size(cfg) -> int:
  if cfg.image_size:
    return int(cfg.image_size)
  return _spec(cfg.name).native_shape[0]


def _process(process_index, process_count):
  import jax  # Imported lazily: tests and tools may use this module without JAX devices.
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  if not 0 <= pi < pc:
    raise ValueError(f"process_index {pi} not in [0, {pc}).")
  return pi, pc


def _process_count(process_count):
  if process_count is not None:
    return process_count
  import jax
  return jax.process_count()


def _local_batch(config, process_count: int) -> int:
  if config.batch_size % process_count:
    raise ValueError(
        f"batch_size {config.batch_size} is not divisible by process_count {process_count}.")
  return config.batch_size // process_count


# ----------------------------------------------------------------------------
# Building offline.


def _builder(config):
  cfg = _data_cfg(config)
  _spec(cfg.name)
  return tfds.builder(cfg.name, data_dir=data_dir(config))


def _required_files(cfg, ldir: str) -> list:
  if cfg.name in ("fashion_mnist", "mnist"):
    return [os.path.join(ldir, f) for f in _MNIST_FILES]
  if cfg.name == "cifar10":
    return [os.path.join(ldir, _CIFAR10_ARCHIVE)]
  return [os.path.join(ldir, f) for f in _IMAGENET_FILES]


def _not_found_message(cfg, ldir: str, missing: list) -> str:
  files = "\n".join(f"  {p}" for p in missing)
  state = "is not built and" if _loader(cfg) == "tfds" else "is read from its original files;"
  msg = f"Dataset {cfg.name!r} {state} these files are missing:\n{files}\n"
  if cfg.name == "fashion_mnist":
    msg += ("Install them with `apt-get install dataset-fashion-mnist` (they go to "
            f"{FASHION_MNIST_DEBIAN_DIR}), or put the four original idx .gz files "
            "in a directory and set config.data.local_dir to it.")
  elif cfg.name == "mnist":
    msg += (f"Place the original MNIST files ({', '.join(_MNIST_FILES)}) in {ldir}, "
            "or set config.data.local_dir to the directory that holds them.")
  elif cfg.name == "cifar10":
    msg += (f"Place the original CIFAR-10 binary archive {_CIFAR10_ARCHIVE} "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) in {ldir}, or set "
            "config.data.local_dir to the directory that holds it.")
  else:
    msg += (f"Place {' and '.join(_IMAGENET_FILES)} (from https://image-net.org, "
            f"registration required) in {ldir}, or set config.data.local_dir.")
  return msg + " Nothing is downloaded: this pipeline works offline only."


def _url_map(builder, cfg, ldir: str) -> dict:
  """The URLs the stock builder asks for, mapped to the local files."""
  if cfg.name in ("fashion_mnist", "mnist"):
    return {builder.URL + f: os.path.join(ldir, f) for f in _MNIST_FILES}
  if cfg.name == "cifar10":
    return {builder._cifar_info.url: os.path.join(ldir, _CIFAR10_ARCHIVE)}  # pylint: disable=protected-access
  return {}


class _OfflineDownloadManager:
  """Stands in for TFDS's DownloadManager: URLs resolve to local files, never to HTTP."""

  def __init__(self, dl_manager, urls: dict):
    self._dl = dl_manager
    self._urls = urls

  def __getattr__(self, name):  # manual_dir, extract, iter_archive, ...
    return getattr(self._dl, name)

  def _local(self, url):
    url = str(url)
    if url not in self._urls:
      raise RuntimeError(f"lns_jax.data is offline; the builder asked for {url!r}, "
                         f"which has no local file (known: {sorted(self._urls)}).")
    return self._urls[url]

  def download(self, url_or_urls):
    return tf.nest.map_structure(self._local, url_or_urls)

  def download_and_extract(self, url_or_urls):
    return self._dl.extract(self.download(url_or_urls))

  def download_checksums(self, url):
    self._local(url)

  def download_kaggle_data(self, name):
    raise RuntimeError(f"lns_jax.data is offline; refusing to download {name!r} from Kaggle.")


def _idx_count(path: str) -> int:
  """Number of items in an (extracted) idx file, from its header."""
  with tf.io.gfile.GFile(os.fspath(path), "rb") as f:
    header = f.read(8)
  return int.from_bytes(header[4:8], "big")


_TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10",
           "imagenet2012": "ImageNet"}
# TFDS warns "Variant folder ... has no dataset_info.json" when asked whether a
# dataset that is not built yet is built.
_NOT_BUILT_YET = "has no dataset_info.json"


class _DropMessages(pylogging.Filter):
  def __init__(self, needle: str):
    super().__init__()
    self.needle = needle

  def filter(self, record) -> bool:
    return self.needle not in record.getMessage()


@contextlib.contextmanager
def _absl_filter(needle: str):
  """Drops absl log records containing ``needle`` inside the block."""
  from absl import logging as absl_logging
  f = _DropMessages(needle)
  logger = absl_logging.get_absl_logger()
  logger.addFilter(f)
  try:
    yield
  finally:
    logger.removeFilter(f)


def _refuse_network(*args, **kwargs):
  raise RuntimeError(f"lns_jax.data is offline; TFDS tried to reach the network: {args} {kwargs}")


@contextlib.contextmanager
def _no_network():
  """Any HTTP or GCS access by TFDS while building raises instead of hanging."""
  core = "tensorflow_datasets.core"
  with mock.patch(f"{core}.download.downloader._Downloader.download", _refuse_network), \
       mock.patch(f"{core}.utils.gcs_utils.exists", lambda *_: False):
    yield


def prepare(config) -> None:
  """Builds the TFDS dataset from local files if it is not built yet.

  Safe to call repeatedly (a built dataset is detected and left alone). With several
  processes sharing one ``data_dir``, call it on one process first. With
  ``config.data.loader='numpy'`` nothing is built: the original files are checked and
  read into memory (:func:`lns_jax.data_numpy.prepare`).

  Raises:
    DatasetNotFoundError: the dataset is not built and its local files are missing.
  """
  cfg = _data_cfg(config)
  if _loader(cfg) == "numpy":
    from lns_jax import data_numpy
    data_numpy.prepare(config)
    return
  builder = _builder(config)
  with _absl_filter(_NOT_BUILT_YET):  # expected here: that is what is_prepared() asks
    if builder.is_prepared():
      return
  ldir = local_dir(config)
  missing = [p for p in _required_files(cfg, ldir) if not os.path.isfile(p)]
  if cfg.name == "imagenet2012" and len(missing) < len(_IMAGENET_FILES):
    missing = []  # the stock builder accepts any subset of the splits
  if missing:
    raise DatasetNotFoundError(_not_found_message(cfg, ldir, missing))

  urls = _url_map(builder, cfg, ldir)
  stock_split_generators = builder._split_generators  # pylint: disable=protected-access

  def offline_split_generators(dl_manager):
    generators = stock_split_generators(_OfflineDownloadManager(dl_manager, urls))
    if cfg.name in ("fashion_mnist", "mnist"):
      # The stock builder hard-codes 60000/10000 examples; take the count from
      # the idx header instead, so any well-formed idx file (e.g. a small test
      # fixture) builds, and a truncated one fails loudly.
      for g in generators:
        g.gen_kwargs["num_examples"] = _idx_count(g.gen_kwargs["label_path"])
    return generators

  # An instance attribute shadows the class method for this build only.
  builder._split_generators = offline_split_generators  # pylint: disable=protected-access
  extract_dir = None
  if urls:
    # Extracted archives are only needed during the build; a fresh directory per
    # build also avoids TFDS reusing an extraction keyed by file name alone (MNIST
    # and Fashion-MNIST share file names).
    os.makedirs(builder.data_dir_root, exist_ok=True)
    extract_dir = tempfile.mkdtemp(prefix=f"{cfg.name}-extract-", dir=builder.data_dir_root)
  # TFDS would print "Downloading and preparing dataset Unknown size ..." although
  # nothing is downloaded: say what happens instead.
  builder._log_download_bytes = lambda: None  # pylint: disable=protected-access
  builder._log_download_done = lambda: None  # pylint: disable=protected-access
  title = _TITLES.get(cfg.name, cfg.name)
  print(f"building {title} from the local files in {ldir} into {builder.data_dir_root} "
        f"(once) ...", flush=True)
  start = time.time()
  try:
    with _no_network():
      builder.download_and_prepare(download_config=tfds.download.DownloadConfig(
          extract_dir=extract_dir,
          manual_dir=ldir,
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
          try_download_gcs=False,
      ))
  finally:
    if extract_dir:
      shutil.rmtree(extract_dir, ignore_errors=True)
  splits = ", ".join(f"{s.num_examples:,} {name}" for name, s in builder.info.splits.items())
  print(f"built {title} ({splits}) in {time.time() - start:.0f} s", flush=True)


# ----------------------------------------------------------------------------
# Split arithmetic.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the trainer needs to know about the data of a config."""
  name: str
  num_classes: int
  image_shape: tuple  # (H, W, C) of the model input after preprocessing
  num_train: int  # training examples used (after val_examples and train_examples)
  num_eval: int  # examples of the "test" split used (after eval_examples)
  num_validation: int  # examples of the "validation" split (0 unless val_examples)
  mean: tuple  # normalization, 0..255 scale
  std: tuple


def _split_sizes(config) -> tuple:
  """(train, test) sizes of the built dataset, or nominal sizes if not built."""
  cfg = _data_cfg(config)
  spec = _spec(cfg.name)
  if _loader(cfg) == "numpy":
    from lns_jax import data_numpy
    return data_numpy.split_sizes(config)
  try:
    builder = _builder(config)
    splits = builder.info.splits
    return splits["train"].num_examples, splits[spec.eval_split].num_examples
  except Exception:  # pylint: disable=broad-except  # not built, or mocked info
    return spec.num_train, spec.num_test


def _ranges(config) -> dict:
  """Logical split -> (TFDS split, start, stop) in absolute example indices."""
  cfg = _data_cfg(config)
  spec = _spec(cfg.name)
  n_train_total, n_test = _split_sizes(config)
  val = int(cfg.val_examples or 0)
  if not 0 <= val < n_train_total:
    raise ValueError(f"val_examples={val} must be in [0, {n_train_total}).")
  n_train = n_train_total - val
  if cfg.train_examples is not None:
    n_train = min(n_train, int(cfg.train_examples))
  def cap(n):
    return n if cfg.eval_examples is None else min(n, int(cfg.eval_examples))
  out = {
      "train": ("train", 0, n_train),
      "test": (spec.eval_split, 0, cap(n_test)),
  }
  if val:
    out["validation"] = ("train", n_train_total - val, n_train_total - val + cap(val))
  return out


def get_info(config) -> DatasetInfo:
  """Static facts about ``config.data``; split sizes are the built dataset's if built."""
  cfg = _data_cfg(config)
  spec = _spec(cfg.name)
  r = _ranges(config)
  size = _image_size(cfg) if cfg.name != "imagenet2012" else (cfg.image_size or _IMAGENET_DEFAULT_SIZE)
  count = lambda k: r[k][2] - r[k][1] if k in r else 0
  return DatasetInfo(
      name=cfg.name, num_classes=spec.num_classes,
      image_shape=(size, size, spec.native_shape[2]),
      num_train=count("train"), num_eval=count("test"), num_validation=count("validation"),
      mean=spec.mean, std=spec.std)


def _train_shard(config, pi, pc):
  """Equal contiguous shards (remainder dropped) so every process runs the same steps."""
  tfds_split, start, stop = _ranges(config)["train"]
  m = (stop - start) // pc
  return tfds_split, start + pi * m, start + (pi + 1) * m


def steps_per_epoch(config, *, process_count=None) -> int:
  """Training steps per epoch (the last partial batch is dropped)."""
  pc = _process_count(process_count)
  _, a, b = _train_shard(config, 0, pc)
  return (b - a) // _local_batch(config, pc)


def _eval_split(config, split):
  r = _ranges(config)
  if split not in r:
    raise ValueError(f"Unknown eval split {split!r}; available: {sorted(r)} "
                     "('validation' needs config.data.val_examples > 0).")
  return r[split]


def eval_steps(config, split: str = "test", *, process_count=None) -> int:
  """Number of (padded) eval batches, the same on every process."""
  pc = _process_count(process_count)
  _, a, b = _eval_split(config, split)
  return math.ceil(math.ceil((b - a) / pc) / _local_batch(config, pc))


# ----------------------------------------------------------------------------
# Preprocessing.


def _epoch_seed(seed: int, epoch: int) -> int:
  """A 63-bit seed that is a pure function of (seed, epoch)."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1, np.uint64)[0] >> 1)


def _mix(z):
  """splitmix64's finalizer on uint64 tensors: a cheap, well-spread integer hash."""
  u = lambda v: tf.constant(v, tf.uint64)
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, u(30))) * u(0xBF58476D1CE4E5B9)
  z = tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, u(27))) * u(0x94D049BB133111EB)
  return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, u(31)))


def _mix_np(z: np.ndarray) -> np.ndarray:
  """:func:`_mix` in NumPy (uint64 arithmetic wraps as in TF): the same bits, no TF."""
  z = np.asarray(z, np.uint64)
  z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return z ^ (z >> np.uint64(31))


def example_bits_np(epoch_seed: int, index) -> np.ndarray:
  """:func:`_example_bits` in NumPy: equal bits for equal (epoch_seed, index)."""
  index = np.asarray(index, np.int64).astype(np.uint64)
  return _mix_np(np.uint64(epoch_seed) ^ _mix_np(index))


def crop_flip_np(name: str, epoch_seed: int, index) -> tuple:
  """(row offset, column offset, flip) of each example's augmentation, int32 arrays.

  The draws of :func:`_small_batch_fn` (pad + random crop + optional flip), computed
  with NumPy, so both loaders augment example ``index`` of an epoch the same way.
  """
  spec = _spec(name)
  bits = example_bits_np(epoch_seed, index)
  k = np.uint64(2 * spec.pad + 1)
  oy = (bits % k).astype(np.int32)
  ox = ((bits >> np.uint64(16)) % k).astype(np.int32)
  flip = (((bits >> np.uint64(32)) % np.uint64(2)).astype(np.int32) if spec.flip
          else np.zeros(len(oy), np.int32))
  return oy, ox, flip


def _example_bits(epoch_seed: int, index):
  """64 random bits per example, a pure function of (seed, epoch, example index).

  A counter-based hash rather than stateful RNG ops, so the randomness of an
  example does not depend on which batch or thread processes it, and it is
  vectorized over the batch.
  """
  key = tf.constant(epoch_seed, tf.uint64)
  return _mix(tf.bitwise.bitwise_xor(key, _mix(tf.cast(index, tf.uint64))))


def _normalize(image, spec):
  image = tf.cast(image, tf.float32)
  return (image - tf.constant(spec.mean, tf.float32)) / tf.constant(spec.std, tf.float32)


def _small_batch_fn(cfg, train: bool, epoch_seed: int):
  """fn(images uint8 BHWC, labels, indices, mask) -> batch dict (28/32-pixel datasets).

  Augmentation (zero-pad, random crop, flip) is done for the whole batch with
  gathers: per-example crops in one op are far cheaper than a tf.data map per
  example, which matters on a 2-core host shared with the trainer.
  """
  spec = _spec(cfg.name)
  size = _image_size(cfg)
  h, w, _ = spec.native_shape
  augment = train and cfg.augment

  def fn(images, labels, index, mask):
    if augment:
      p = spec.pad
      bits = _example_bits(epoch_seed, index)
      k = tf.constant(2 * p + 1, tf.uint64)
      oy = tf.cast(bits % k, tf.int32)
      ox = tf.cast(tf.bitwise.right_shift(bits, tf.constant(16, tf.uint64)) % k, tf.int32)
      rows = oy[:, None] + tf.range(h)[None]
      cols = ox[:, None] + tf.range(w)[None]
      if spec.flip:
        flip = tf.bitwise.right_shift(bits, tf.constant(32, tf.uint64)) % 2 == 1
        cols = tf.where(flip[:, None], cols[:, ::-1], cols)
      images = tf.pad(images, [[0, 0], [p, p], [p, p], [0, 0]])
      images = tf.gather(images, rows, axis=1, batch_dims=1)
      images = tf.gather(images, cols, axis=2, batch_dims=1)
    images = _normalize(images, spec)
    if size != h:
      images = tf.image.resize(images, (size, size), method="bilinear", antialias=True)
    mask = tf.cast(mask, tf.float32)
    images = images * mask[:, None, None, None]  # padding examples are all zeros
    labels = tf.cast(labels, tf.int32) * tf.cast(mask, tf.int32)
    return {"image": images, "label": labels, "mask": mask}
  return fn


def _imagenet_example_fn(cfg, train: bool, epoch_seed: int):
  """fn(jpeg bytes, label, index, mask) -> example dict."""
  spec = _spec(cfg.name)
  size = int(cfg.image_size or _IMAGENET_DEFAULT_SIZE)
  augment = train and cfg.augment

  def fn(encoded, label, index, mask):
    if augment:
      bits = tf.bitcast(_example_bits(epoch_seed, index), tf.int32)  # 2 x int32
      seeds = tf.random.experimental.stateless_split(bits, 2)
      # Inception-style random resized crop, decoding only the crop window.
      begin, crop, _ = tf.image.stateless_sample_distorted_bounding_box(
          tf.image.extract_jpeg_shape(encoded),
          tf.constant([0.0, 0.0, 1.0, 1.0], tf.float32, [1, 1, 4]),
          seed=seeds[0], min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
          area_range=(0.08, 1.0), max_attempts=10, use_image_if_no_bounding_boxes=True)
      window = tf.stack([begin[0], begin[1], crop[0], crop[1]])
      image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
      image = tf.image.resize(image, (size, size), method="bilinear", antialias=True)
      image = tf.image.stateless_random_flip_left_right(image, seed=seeds[1])
    else:
      # Shorter side to size / 0.875, then the central size x size crop.
      image = tf.io.decode_jpeg(encoded, channels=3)
      shape = tf.cast(tf.shape(image)[:2], tf.float32)
      scale = (size / _IMAGENET_CROP_FRACTION) / tf.reduce_min(shape)
      new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
      image = tf.image.resize(image, new, method="bilinear", antialias=True)
      top, left = (new[0] - size) // 2, (new[1] - size) // 2
      image = image[top:top + size, left:left + size]
    mask = tf.cast(mask, tf.float32)
    image = tf.ensure_shape(_normalize(image, spec), (size, size, 3)) * mask
    return {"image": image, "label": tf.cast(label, tf.int32) * tf.cast(mask, tf.int32),
            "mask": mask}
  return fn


# ----------------------------------------------------------------------------
# Sources.


@functools.lru_cache(maxsize=8)
def _load_in_memory(ddir: str, name: str, split: str):
  """Decodes a TFDS (sub)split into host memory once; returns (images, labels) tensors."""
  builder = tfds.builder(name, data_dir=ddir)
  spec = _spec(name)
  if builder.info.file_format == tfds.core.FileFormat.TFRECORD:
    # Read the records directly and parse them in batches: several times faster
    # than TFDS's per-example parsing for these tiny images.
    parts = [tf.data.TFRecordDataset(fi.filename).skip(fi.skip).take(fi.take)
             for fi in builder.info.splits[split].file_instructions]
    ds = functools.reduce(lambda x, y: x.concatenate(y), parts)
    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64)}
    ds = ds.batch(1024).map(lambda r: tf.io.parse_example(r, features)).unbatch()
    ds = ds.map(lambda ex: (tf.io.decode_png(ex["image"], channels=spec.native_shape[2]),
                            ex["label"]), num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = builder.as_dataset(split=split, shuffle_files=False,
                            read_config=tfds.ReadConfig(try_autocache=False))
    ds = ds.map(lambda ex: (ex["image"], ex["label"]), num_parallel_calls=tf.data.AUTOTUNE)
  images, labels = [], []
  for im, lb in ds.batch(8192).with_options(_options()).as_numpy_iterator():
    images.append(im)
    labels.append(lb)
  images = np.concatenate(images) if images else np.zeros((0, *spec.native_shape), np.uint8)
  labels = np.concatenate(labels) if labels else np.zeros((0,), np.int64)
  # Eager tensors: captured by reference in tf.data functions, never copied into a graph.
  with tf.device("/cpu:0"):
    return tf.constant(images), tf.constant(labels)


def clear_cache() -> None:
  """Frees the datasets held in memory (by either loader)."""
  _load_in_memory.cache_clear()
  if "lns_jax.data_numpy" in sys.modules:
    sys.modules["lns_jax.data_numpy"].clear_cache()


def _in_memory_batches(config, tfds_split, a, b, index, mask, bs, batch_fn):
  """Batches of examples `index` (absolute, within [a, b)) of the in-memory split."""
  cfg = _data_cfg(config)
  images, labels = _load_in_memory(data_dir(config), cfg.name, f"{tfds_split}[{a}:{b}]")
  def gather(i, m):
    return batch_fn(tf.gather(images, i - a), tf.gather(labels, i - a), i, m)
  ds = tf.data.Dataset.from_tensor_slices((index.astype(np.int64), mask.astype(np.float32)))
  return ds.batch(bs, drop_remainder=True).map(gather, num_parallel_calls=tf.data.AUTOTUNE)


def _streaming_source(config, tfds_split, a, b, *, shuffle_seed=None):
  """Dataset of (image or JPEG bytes, label) read from the TFRecords of [a, b)."""
  cfg = _data_cfg(config)
  builder = _builder(config)
  decoders = {"image": tfds.decode.SkipDecoding()} if cfg.name == "imagenet2012" else None
  read_config = tfds.ReadConfig(
      try_autocache=False, shuffle_seed=shuffle_seed,
      shuffle_reshuffle_each_iteration=False if shuffle_seed is not None else None)
  ds = builder.as_dataset(split=f"{tfds_split}[{a}:{b}]", decoders=decoders,
                          shuffle_files=shuffle_seed is not None, read_config=read_config)
  ds = ds.take(b - a)  # mocked builders (tests) may yield more than asked for
  return ds.map(lambda ex: (ex["image"], ex["label"]))


def _streaming_batches(cfg, ds, bs, train, epoch_seed):
  """(index, (image, label, mask)) elements -> batch dicts."""
  if cfg.name == "imagenet2012":
    fn = _imagenet_example_fn(cfg, train, epoch_seed)
    ds = ds.map(lambda i, ex: fn(ex[0], ex[1], i, ex[2]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(bs, drop_remainder=True)
  fn = _small_batch_fn(cfg, train, epoch_seed)
  ds = ds.batch(bs, drop_remainder=True)
  return ds.map(lambda i, ex: fn(ex[0], ex[1], i, ex[2]), num_parallel_calls=tf.data.AUTOTUNE)


def _options():
  opts = tf.data.Options()
  opts.deterministic = True
  opts.autotune.enabled = True
  opts.experimental_optimization.map_parallelization = True
  return opts


def _as_numpy(ds, num_batches: int) -> Iterator[dict]:
  for i, batch in enumerate(ds.as_numpy_iterator()):
    if i >= num_batches:
      break
    yield batch


def train_iterator(config, *, epoch: int, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[dict]:
  """Batches of one training epoch of this process's shard, from ``start_step`` on.

  Yields exactly ``steps_per_epoch(config) - start_step`` dicts of NumPy arrays:
  ``image`` float32 (B, H, W, C), ``label`` int32 (B,), ``mask`` float32 (B,) of ones,
  with B = batch_size // process_count. Order and augmentation are functions of
  ``(config.seed, epoch)`` only. With ``config.data.loader='numpy'``: the same batches
  (see lns_jax.data_numpy for where they differ) as jax.Arrays on this process's devices.
  """
  cfg = _data_cfg(config)
  if _loader(cfg) == "numpy":
    from lns_jax import data_numpy
    return data_numpy.train_iterator(config, epoch=epoch, start_step=start_step,
                                     process_index=process_index, process_count=process_count)
  prepare(config)
  pi, pc = _process(process_index, process_count)
  bs = _local_batch(config, pc)
  steps = steps_per_epoch(config, process_count=pc)
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step {start_step} not in [0, {steps}].")
  tfds_split, a, b = _train_shard(config, pi, pc)
  eseed = _epoch_seed(config.seed, epoch)
  skip, n = start_step * bs, steps * bs
  if _use_cache(cfg):
    # NumPy permutation: the order does not depend on TF's global seed or version.
    rng = np.random.default_rng(np.random.SeedSequence([int(config.seed), int(epoch)]))
    index = (a + rng.permutation(b - a))[skip:n]
    ds = _in_memory_batches(config, tfds_split, a, b, index, np.ones(len(index)), bs,
                            _small_batch_fn(cfg, True, eseed))
  else:
    ds = _streaming_source(config, tfds_split, a, b, shuffle_seed=eseed % 2**31)
    ds = ds.shuffle(max(1, min(int(cfg.shuffle_buffer), b - a)), seed=eseed % 2**31,
                    reshuffle_each_iteration=False)
    # Streaming has no stable example ids after shuffling; the position in the
    # (deterministic) epoch order stands in for the example index. Enumerate
    # before skipping so that a resumed epoch keeps it.
    ds = ds.enumerate().skip(skip).take(n - skip)
    ds = ds.map(lambda i, ex: (i, (ex[0], ex[1], tf.constant(1.0))))
    ds = _streaming_batches(cfg, ds, bs, True, eseed)
  ds = ds.prefetch(cfg.prefetch).with_options(_options())
  return _as_numpy(ds, steps - start_step)


def eval_iterator(config, split: str = "test", *,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Every example of ``split`` ('test', 'validation' or 'train') once, in order.

  This process's contiguous shard, un-augmented, in ``eval_steps(config, split)``
  batches of batch_size // process_count; padding examples have ``mask`` 0 (and
  zero images, label 0). ``config.data.loader='numpy'``: the same, as jax.Arrays.
  """
  cfg = _data_cfg(config)
  if _loader(cfg) == "numpy":
    from lns_jax import data_numpy
    return data_numpy.eval_iterator(config, split, process_index=process_index,
                                    process_count=process_count)
  prepare(config)
  pi, pc = _process(process_index, process_count)
  bs = _local_batch(config, pc)
  tfds_split, start, stop = _eval_split(config, split)
  n = stop - start
  a, b = start + pi * n // pc, start + (pi + 1) * n // pc
  steps = eval_steps(config, split, process_count=pc)
  num_pad = steps * bs - (b - a)
  if _use_cache(cfg):
    index = np.concatenate([np.arange(a, b), np.full(num_pad, a)])
    mask = np.concatenate([np.ones(b - a), np.zeros(num_pad)])
    ds = _in_memory_batches(config, tfds_split, a, b, index, mask, bs,
                            _small_batch_fn(cfg, False, 0))
  else:
    ds = _streaming_source(config, tfds_split, a, b)
    ds = ds.map(lambda im, lb: (im, lb, tf.constant(1.0)))
    pad = ds.take(1).map(lambda im, lb, m: (im, lb, tf.constant(0.0))).repeat(num_pad)
    ds = ds.concatenate(pad).enumerate(start=a)
    ds = _streaming_batches(cfg, ds, bs, False, 0)
  ds = ds.prefetch(cfg.prefetch).with_options(_options())
  return _as_numpy(ds, steps)
