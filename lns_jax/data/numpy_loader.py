"""The in-memory loader (``config.data.loader='numpy'``): original files, NumPy, the device.

For the datasets that fit in memory (Fashion-MNIST, MNIST, CIFAR-10) this loader needs
neither TensorFlow nor TFDS, and no build step:

* It reads the ORIGINAL files with NumPy (:mod:`lns_jax.data.files`), from the same
  places as the TFDS loader (:func:`lns_jax.data.specs.local_dir`): the four idx ``.gz`` files of (Fashion-)MNIST
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
from typing import Iterator, Optional

import numpy as np

from lns_jax.data import augment, files, specs, splits
# The files themselves (read, checked, cached) are lns_jax.data.files; also here.
from lns_jax.data.files import (load, prepare, read_cifar10, read_idx,  # noqa: F401
                                split_sizes, tfds_order)


def clear_cache() -> None:
  """Frees the files read and the splits placed on devices."""
  files.clear_cache()
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
  images, labels = files.load(name, ldir)[split]
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
  files.prepare(data)
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
  files.prepare(data)
  stored, a, b, index, mask, bs = splits.eval_plan(specs.merged(data), split, batch_size,
                                                   process_index, process_count)
  zeros = np.zeros_like(index)
  plan = np.stack([index, zeros, zeros, zeros, mask])
  return _batches(data, stored, a, b, plan, bs, False, 0)
