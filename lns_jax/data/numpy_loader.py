"""The in-memory loader (``config.data.loader='numpy'``): original files, NumPy, the device.

For the datasets that fit in memory (Fashion-MNIST, MNIST, CIFAR-10) this loader needs
neither TensorFlow nor TFDS, and no build step:

* It reads the ORIGINAL files with NumPy, from the same places as the TFDS loader
  (:func:`lns_jax.data.specs.local_dir`): the four idx ``.gz`` files of (Fashion-)MNIST
  (Debian's ``/usr/share/datasets/fashion-mnist``, ``<data_dir>/downloads/manual/mnist/``
  or ``config.data.local_dir``) and ``cifar-10-binary.tar.gz``.
* It puts the examples in the order in which TFDS stores them (TFDS sorts a split by
  the MD5 of the split name and the example's index in the original files), so example
  ``i`` of a split is the same image in both loaders. The epoch permutation
  (``np.random.default_rng((seed, epoch))``), the contiguous per-process shards, the
  per-example crop/flip draws (:func:`lns_jax.data.augment.crop_flip_np`, the same hash
  as the TFDS pipeline), the eval padding and masks are those of :mod:`lns_jax.data.splits`.
* This process's part of a split is kept on its devices (replicated over them, uint8);
  a batch is gathered, cropped, flipped and normalized there by one jitted function,
  and the iterators yield ``jax.Array`` s already laid out over the local devices (split
  on the batch axis when it divides, which is what the trainer's mesh wants): no host
  pipeline between steps.

Where the two loaders differ: the batches are equal (labels, masks and, without a
resize, images bit for bit; ``tests/test_data_numpy.py`` checks it on Fashion-MNIST
and CIFAR-10), except that

* with ``config.data.image_size`` other than the native size the resize is
  ``jax.image.resize`` instead of ``tf.image.resize`` (both bilinear with antialiasing,
  equal to about 1e-5 on the normalized images);
* ``cache``, ``shuffle_buffer``, ``prefetch`` and ``data_dir`` are not used (there is
  no streaming path, nothing is built; JAX's asynchronous dispatch is the prefetch);
* the batches are ``jax.Array`` s, not NumPy arrays;
* ImageNet is TFDS only (``'numpy'`` with ``imagenet2012`` is a config error).
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import tarfile
from typing import Iterator, Optional

import numpy as np

from lns_jax.data import augment, specs, splits

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
  """Frees the files read and the splits placed on devices."""
  load.cache_clear()
  _on_devices.cache_clear()
  _batch_fn.cache_clear()


# ----------------------------------------------------------------------------
# On the device.


def _local_devices() -> tuple:
  import jax
  return tuple(jax.local_devices())


def _shardings(devices: tuple, batch: int):
  """(replicated, batch) shardings over ``devices``; one device if they don't split ``batch``."""
  import jax
  from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
  if batch % len(devices):
    devices = devices[:1]
  mesh = Mesh(np.asarray(devices), ("data",))
  return NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))


@functools.lru_cache(maxsize=8)
def _on_devices(name: str, ldir: str, split: str, a: int, b: int, replicated):
  """Examples [a, b) of ``split`` (TFDS order) as device arrays, replicated."""
  import jax
  images, labels = load(name, ldir)[split]
  images, labels = images[a:b], labels[a:b].astype(np.int32)
  if b == a:  # an empty shard still yields padding batches
    images, labels = np.zeros((1, *images.shape[1:]), np.uint8), np.zeros(1, np.int32)
  return jax.device_put((images, labels), replicated)


@functools.lru_cache(maxsize=16)
def _batch_fn(name: str, augment: bool, size: int, out_sharding):
  """jit(images, labels, plan, step, mean, std) -> batch; plan rows: index, dy, dx, flip, mask."""
  import jax
  import jax.numpy as jnp
  spec = specs.spec(name)
  h, w, c = spec.native_shape
  p = spec.pad

  def fn(images, labels, plan, step, mean, std):
    index, oy, ox, flip, mask = plan[step]
    x = images[index]  # (B, H, W, C) uint8
    if augment:
      # Zero-pad, then per-example windows as gathers: augment.small_batch_fn's crop/flip.
      x = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
      rows = oy[:, None] + jnp.arange(h)[None]
      cols = ox[:, None] + jnp.arange(w)[None]
      cols = jnp.where(flip[:, None] == 1, cols[:, ::-1], cols)
      x = jnp.take_along_axis(x, rows[:, :, None, None], axis=1)
      x = jnp.take_along_axis(x, cols[:, None, :, None], axis=2)
    # XLA rewrites a division by a broadcast into a multiplication by its reciprocal,
    # 1 ulp away from tf.data's division; behind a barrier the division stays one.
    std = jax.lax.optimization_barrier(jnp.broadcast_to(std, x.shape))
    x = (x.astype(jnp.float32) - mean) / std
    if size != h:
      x = jax.image.resize(x, (x.shape[0], size, size, c), method="bilinear", antialias=True)
    m = mask.astype(jnp.float32)
    return {"image": x * m[:, None, None, None], "label": labels[index] * mask, "mask": m}

  return jax.jit(fn, out_shardings={"image": out_sharding, "label": out_sharding,
                                     "mask": out_sharding})


def _batches(data, split: str, a: int, b: int, plan: np.ndarray, bs: int,
             train: bool, first: int) -> Iterator[dict]:
  """Yields the batches ``first..`` of ``plan`` (absolute indices in [a, b), ...)."""
  import jax
  replicated, batched = _shardings(_local_devices(), bs)
  images, labels = _on_devices(data.name, specs.local_dir(data), split, a, b, replicated)
  steps = plan.shape[1] // bs
  plan = plan.copy()
  plan[0] -= a  # indices into the device-resident shard
  plan = plan.reshape(5, steps, bs).transpose(1, 0, 2).astype(np.int32)
  plan = jax.device_put(plan[first:], replicated)
  fn = _batch_fn(data.name, bool(train and data.augment), specs.image_size(data), batched)
  spec = specs.spec(data.name)
  mean, std = jax.device_put((np.float32(spec.mean), np.float32(spec.std)), replicated)
  for s in range(steps - first):
    yield fn(images, labels, plan, s, mean, std)


def train_iterator(data, *, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[dict]:
  """:func:`lns_jax.data.train_iterator`'s batches, made on the device (see the module doc)."""
  prepare(data)
  data = specs.merged(data)
  (stored, a, b), bs, steps = splits.train_layout(data, batch_size, start_step,
                                                  process_index, process_count)
  index = splits.epoch_order(seed, epoch, a, b, steps * bs)  # the TFDS loader's order
  oy, ox, flip = augment.crop_flip_np(data.name, augment.epoch_seed(seed, epoch), index)
  plan = np.stack([index, oy, ox, flip, np.ones_like(index)])
  return _batches(data, stored, a, b, plan, bs, True, start_step)


def eval_iterator(data, split: str = "test", *, batch_size: int,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """:func:`lns_jax.data.eval_iterator`'s batches (padding ``mask`` 0), made on the device."""
  prepare(data)
  stored, a, b, index, mask, bs = splits.eval_plan(specs.merged(data), split, batch_size,
                                                   process_index, process_count)
  zeros = np.zeros_like(index)
  plan = np.stack([index, zeros, zeros, zeros, mask])
  return _batches(data, stored, a, b, plan, bs, False, 0)
