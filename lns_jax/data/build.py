"""Building the TFDS datasets offline, from the original files on this machine.

Every dataset is the *stock* TFDS builder (its ``_info`` and ``_generate_examples``
unchanged, so the prepared files are exactly what ``tfds.load`` would produce), but
its download step is served from local files:

* :func:`prepare` instantiates the stock builder and replaces, on that instance only,
  ``_split_generators`` with a wrapper that hands the stock method a download manager
  proxy. The proxy maps each URL the builder asks for to a local file (Fashion-MNIST:
  the Debian package ``dataset-fashion-mnist``; MNIST: a directory of the original idx
  ``.gz`` files; CIFAR-10: the original ``cifar-10-binary.tar.gz``) and extracts it with
  TFDS's own extractor into a temporary directory that is deleted after the build (the
  TFRecords are all that is kept). An unknown URL is an error, never a fetch.
* ImageNet has no URLs: the stock builder reads ``manual_dir``, which we set.
* While building, TFDS's HTTP downloader and GCS lookups are patched to raise, and
  ``try_download_gcs=False``, so no code path can reach the network.
* A missing input raises ``DatasetNotFoundError`` (a ``FileNotFoundError``) naming the
  exact files to place and where, before TFDS is asked to build anything.

TensorFlow and TFDS are imported at their first use (:data:`tf`, :data:`tfds`), so
importing this package never imports them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging as pylogging
import os
import shutil
import tempfile
import time
import types
from unittest import mock

from lns_jax.data import specs
from lns_jax.data.defaults import NUMPY_DATASETS
from lns_jax.errors import ConfigError

# TensorFlow is only the input pipeline (tf.data). Without these its C++ start-up
# prints "oneDNN custom operations are on" and absl's "All log messages before
# absl::InitializeLog() is called are written to STDERR" (twice each) on every run.
# oneDNN's custom ops speed up matmuls and convs, which tf.data never runs: the
# pipeline's batches are bit for bit the same without them.
QUIET_ENV = {"TF_CPP_MIN_LOG_LEVEL": "2", "TF_ENABLE_ONEDNN_OPTS": "0"}


def quiet_environment() -> None:
  """Sets :data:`QUIET_ENV` where unset; works only before tensorflow's first import."""
  for key, value in QUIET_ENV.items():
    os.environ.setdefault(key, value)


class LoaderUnavailableError(ConfigError, ImportError):
  """``config.data.loader='tfds'`` where TensorFlow or TFDS is not installed."""


class _LazyModule(types.ModuleType):
  """``tensorflow`` / ``tensorflow_datasets``, imported at the first attribute access.

  Only the TFDS loader imports TensorFlow, when a pipeline is actually built, so the
  model, the train step, the config and the ``'numpy'`` loader run where TensorFlow is
  not installed.
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

# TFDS warns "Variant folder ... has no dataset_info.json" when asked whether a
# dataset that is not built yet is built.
_NOT_BUILT_YET = "has no dataset_info.json"


def builder(data):
  """The stock TFDS builder of ``data.name`` in ``data_dir``."""
  specs.spec(data.name)
  return tfds.builder(data.name, data_dir=specs.data_dir(data))


def _url_map(b, name: str, ldir: str) -> dict:
  """The URLs the stock builder asks for, mapped to the local files."""
  if name in ("fashion_mnist", "mnist"):
    return {b.URL + f: os.path.join(ldir, f) for f in specs.MNIST_FILES}
  if name == "cifar10":
    return {b._cifar_info.url: os.path.join(ldir, specs.CIFAR10_ARCHIVE)}  # pylint: disable=protected-access
  return {}


class OfflineDownloadManager:
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


def _missing_files(data, ldir: str) -> list:
  missing = [p for p in specs.required_files(data.name, ldir) if not os.path.isfile(p)]
  if data.name == "imagenet2012" and len(missing) < len(specs.IMAGENET_FILES):
    return []  # the stock builder accepts any subset of the splits
  return missing


def _offline(b, data, urls: dict) -> None:
  """Makes builder ``b`` read ``urls`` from local files (this instance only)."""
  stock_split_generators = b._split_generators  # pylint: disable=protected-access

  def offline_split_generators(dl_manager):
    generators = stock_split_generators(OfflineDownloadManager(dl_manager, urls))
    if data.name in ("fashion_mnist", "mnist"):
      # The stock builder hard-codes 60000/10000 examples; take the count from the
      # idx header instead, so any well-formed idx file (e.g. a small test fixture)
      # builds, and a truncated one fails loudly.
      for g in generators:
        g.gen_kwargs["num_examples"] = _idx_count(g.gen_kwargs["label_path"])
    return generators

  # An instance attribute shadows the class method for this build only.
  b._split_generators = offline_split_generators  # pylint: disable=protected-access
  # TFDS would print "Downloading and preparing dataset Unknown size ..." although
  # nothing is downloaded: the caller says what happens instead.
  b._log_download_bytes = lambda: None  # pylint: disable=protected-access
  b._log_download_done = lambda: None  # pylint: disable=protected-access


def prepare(data) -> None:
  """Builds ``config.data``'s dataset from local files if it is not built yet.

  Safe to call repeatedly (a built dataset is detected and left alone). With several
  processes sharing one ``data_dir``, call it on one process first. With
  ``loader='numpy'`` nothing is built: the original files are checked and read into
  memory (:func:`lns_jax.data.files.prepare`).

  Raises:
    DatasetNotFoundError: the dataset is not built and its local files are missing.
  """
  data = specs.merged(data)
  if specs.loader(data) == "numpy":
    from lns_jax.data import files
    files.prepare(data)
    return
  b = builder(data)
  with _absl_filter(_NOT_BUILT_YET):  # expected here: that is what is_prepared() asks
    if b.is_prepared():
      return
  ldir = specs.local_dir(data)
  missing = _missing_files(data, ldir)
  if missing:
    raise specs.DatasetNotFoundError(specs.not_found_message(data, ldir, missing))
  urls = _url_map(b, data.name, ldir)
  _offline(b, data, urls)
  extract_dir = None
  if urls:
    # Extracted archives are only needed during the build; a fresh directory per
    # build also avoids TFDS reusing an extraction keyed by file name alone (MNIST
    # and Fashion-MNIST share file names).
    os.makedirs(b.data_dir_root, exist_ok=True)
    extract_dir = tempfile.mkdtemp(prefix=f"{data.name}-extract-", dir=b.data_dir_root)
  title = specs.TITLES.get(data.name, data.name)
  print(f"building {title} from the local files in {ldir} into {b.data_dir_root} "
        f"(once) ...", flush=True)
  start = time.time()
  try:
    with _no_network():
      b.download_and_prepare(download_config=tfds.download.DownloadConfig(
          extract_dir=extract_dir,
          manual_dir=ldir,
          download_mode=tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS,
          try_download_gcs=False,
      ))
  finally:
    if extract_dir:
      shutil.rmtree(extract_dir, ignore_errors=True)
  splits = ", ".join(f"{s.num_examples:,} {name}" for name, s in b.info.splits.items())
  print(f"built {title} ({splits}) in {time.time() - start:.0f} s", flush=True)
