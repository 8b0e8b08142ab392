"""The original files of the in-memory datasets, read with NumPy in TFDS's order.

Fashion-MNIST and MNIST (the four idx ``.gz`` files) and CIFAR-10
(``cifar-10-binary.tar.gz``), from :func:`lns_jax.data.specs.local_dir`, read once and
cached. Below :mod:`lns_jax.data.splits` (which asks :func:`split_sizes`) and
:mod:`lns_jax.data.numpy_loader` (which puts them on the device); see the latter's
module doc for how the two loaders agree.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tarfile

import numpy as np

from lns_jax.data import specs

_CIFAR_TRAIN = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
_CIFAR_TEST = "test_batch.bin"
_CIFAR_RECORD = 1 + 32 * 32 * 3  # label byte + CHW bytes
_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
          "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}


def tfds_order(num_examples: int, split: str) -> np.ndarray:
  """Original-file indices in the order TFDS stores the split (its MD5 key shuffle).

  TFDS writes examples sorted by ``md5(split_name + str(key))`` with the example's
  index in the original files as key (``tensorflow_datasets.core.hashing``).
  """
  salted = hashlib.md5(split.encode())
  keys = []
  for i in range(num_examples):
    h = salted.copy()
    h.update(str(i).encode())
    keys.append(int(h.hexdigest(), 16))
  return np.array(sorted(range(num_examples), key=keys.__getitem__), np.int64)


def _bad_file(path: str, why: str):
  return specs.DatasetNotFoundError(f"{path}: {why}; replace it with the original file.")


def read_idx(path: str) -> np.ndarray:
  """A gzipped idx file of unsigned bytes (the (Fashion-)MNIST format) as a uint8 array."""
  try:
    with gzip.open(path, "rb") as f:
      raw = f.read()
  except (OSError, EOFError) as e:
    raise _bad_file(path, f"not a readable .gz file ({e})") from e
  if len(raw) < 4 or raw[:3] != b"\x00\x00\x08":
    raise _bad_file(path, "not an idx file of unsigned bytes")
  ndim = raw[3]
  dims = [int.from_bytes(raw[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
  body = raw[4 + 4 * ndim:]
  if len(body) != int(np.prod(dims)):
    raise _bad_file(path, f"{len(body)} data bytes where the header says {dims}")
  return np.frombuffer(body, np.uint8).reshape(dims)


def read_cifar10(path: str) -> dict:
  """``cifar-10-binary.tar.gz`` -> {'train': (images NHWC, labels), 'test': (...)}."""
  try:
    with tarfile.open(path, "r:gz") as tar:
      blobs = {}
      for name in _CIFAR_TRAIN + (_CIFAR_TEST,):
        member = tar.extractfile(f"cifar-10-batches-bin/{name}")
        blobs[name] = member.read()
  except (OSError, EOFError, KeyError, tarfile.TarError) as e:
    raise _bad_file(path, f"not the CIFAR-10 binary archive ({e})") from e
  out = {}
  for split, names in (("train", _CIFAR_TRAIN), ("test", (_CIFAR_TEST,))):
    raw = b"".join(blobs[n] for n in names)
    if len(raw) % _CIFAR_RECORD:
      raise _bad_file(path, f"{split} records are not {_CIFAR_RECORD} bytes each")
    rec = np.frombuffer(raw, np.uint8).reshape(-1, _CIFAR_RECORD)
    out[split] = (rec[:, 1:].reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), rec[:, 0])
  return out


@functools.lru_cache(maxsize=4)
def load(name: str, ldir: str) -> dict:
  """{'train': (images uint8 NHWC, labels int64), 'test': ...} in TFDS's order, cached."""
  if name == "cifar10":
    stored = read_cifar10(specs.required_files(name, ldir)[0])
  else:
    stored = {}
    for split, (images, labels) in _FILES.items():
      im = read_idx(os.path.join(ldir, images))
      lb = read_idx(os.path.join(ldir, labels))
      if im.ndim != 3 or lb.ndim != 1 or len(im) != len(lb):
        raise _bad_file(os.path.join(ldir, images),
                        f"{im.shape} images do not match {lb.shape} labels")
      stored[split] = (im[..., None], lb)
  out = {}
  for split, (im, lb) in stored.items():
    order = tfds_order(len(lb), split)
    out[split] = (np.ascontiguousarray(im[order]), lb[order].astype(np.int64))
  return out


def _check(data):
  data = specs.merged(data)
  specs.loader(data)  # 'numpy' with imagenet2012: a config error
  return data, specs.local_dir(data)


def prepare(data) -> None:
  """Checks that the original files are there and reads them (once, cached).

  Raises:
    DatasetNotFoundError: a file is missing (the same message as the TFDS loader's,
      naming the files and where to put them) or is not in the original format.
  """
  data, ldir = _check(data)
  missing = [p for p in specs.required_files(data.name, ldir) if not os.path.isfile(p)]
  if missing:
    raise specs.DatasetNotFoundError(specs.not_found_message(data, ldir, missing))
  load(data.name, ldir)


def split_sizes(data) -> tuple:
  """(train, test) sizes from the files, or the nominal sizes while they are missing."""
  data, ldir = _check(data)
  if not all(os.path.isfile(p) for p in specs.required_files(data.name, ldir)):
    spec = specs.spec(data.name)
    return spec.num_train, spec.num_test
  stored = load(data.name, ldir)
  return len(stored["train"][1]), len(stored["test"][1])


def clear_cache() -> None:
  """Frees the files read."""
  load.cache_clear()
