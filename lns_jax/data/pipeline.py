"""The input pipelines: a training epoch and an evaluation pass as iterators of batches.

Two loaders, chosen by ``config.data.loader``: ``'tfds'`` (the default, here, and the
only one for ImageNet) reads the TFDS dataset built offline (:mod:`lns_jax.data.build`)
with tf.data; ``'numpy'`` (:mod:`lns_jax.data.numpy_loader`) reads the original files
with NumPy and makes the batches on the device. :func:`train_iterator` and
:func:`eval_iterator` serve both; they take ``config.data``, the global batch size and
the seed explicitly.

Training is deterministic: for a given ``(seed, epoch)`` the order and the augmentation
of every example are fixed, so a run resumed mid-epoch with ``start_step`` sees exactly
the batches it would have seen. Small datasets (``cache=True``, the default except for
ImageNet) are decoded once into host memory; an epoch is then a NumPy permutation of
example indices gathered and augmented by tf.data. Large datasets stream from the
TFRecords with seeded file and buffer shuffles. Augmentation uses the per-example hash
of :mod:`lns_jax.data.augment`. Evaluation reads every example once, in order, and pads
the last batch (``mask`` = 0 on padding) so that all processes run the same steps.
"""

from __future__ import annotations

import functools
import sys
from typing import Iterator, Optional

import numpy as np

from lns_jax.data import augment, build, files, specs, splits
from lns_jax.data.build import tf, tfds


def _options():
  opts = tf.data.Options()
  opts.deterministic = True
  opts.autotune.enabled = True
  opts.experimental_optimization.map_parallelization = True
  return opts


@functools.lru_cache(maxsize=8)
def _load_in_memory(ddir: str, name: str, split: str):
  """Decodes a TFDS (sub)split into host memory once; returns (images, labels) tensors."""
  b = tfds.builder(name, data_dir=ddir)
  spec = specs.spec(name)
  if b.info.file_format == tfds.core.FileFormat.TFRECORD:
    # Read the records directly and parse them in batches: several times faster
    # than TFDS's per-example parsing for these tiny images.
    parts = [tf.data.TFRecordDataset(fi.filename).skip(fi.skip).take(fi.take)
             for fi in b.info.splits[split].file_instructions]
    ds = functools.reduce(lambda x, y: x.concatenate(y), parts)
    features = {"image": tf.io.FixedLenFeature([], tf.string),
                "label": tf.io.FixedLenFeature([], tf.int64)}
    ds = ds.batch(1024).map(lambda r: tf.io.parse_example(r, features)).unbatch()
    ds = ds.map(lambda ex: (tf.io.decode_png(ex["image"], channels=spec.native_shape[2]),
                            ex["label"]), num_parallel_calls=tf.data.AUTOTUNE)
  else:
    ds = b.as_dataset(split=split, shuffle_files=False,
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
  files.clear_cache()  # the NumPy loader's files (read by splits.get_info too)
  if "lns_jax.data.numpy_loader" in sys.modules:
    sys.modules["lns_jax.data.numpy_loader"].clear_cache()


def _in_memory_batches(data, stored, a, b, index, mask, bs, batch_fn):
  """Batches of examples `index` (absolute, within [a, b)) of the in-memory split."""
  images, labels = _load_in_memory(specs.data_dir(data), data.name, f"{stored}[{a}:{b}]")

  def gather(i, m):
    return batch_fn(tf.gather(images, i - a), tf.gather(labels, i - a), i, m)

  ds = tf.data.Dataset.from_tensor_slices((index.astype(np.int64), mask.astype(np.float32)))
  return ds.batch(bs, drop_remainder=True).map(gather, num_parallel_calls=tf.data.AUTOTUNE)


def _streaming_source(data, stored, a, b, *, shuffle_seed=None):
  """Dataset of (image or JPEG bytes, label) read from the TFRecords of [a, b)."""
  decoders = {"image": tfds.decode.SkipDecoding()} if data.name == "imagenet2012" else None
  read_config = tfds.ReadConfig(
      try_autocache=False, shuffle_seed=shuffle_seed,
      shuffle_reshuffle_each_iteration=False if shuffle_seed is not None else None)
  ds = build.builder(data).as_dataset(
      split=f"{stored}[{a}:{b}]", decoders=decoders,
      shuffle_files=shuffle_seed is not None, read_config=read_config)
  ds = ds.take(b - a)  # mocked builders (tests) may yield more than asked for
  return ds.map(lambda ex: (ex["image"], ex["label"]))


def _streaming_batches(data, ds, bs, train, epoch_seed):
  """(index, (image, label, mask)) elements -> batch dicts."""
  if data.name == "imagenet2012":
    fn = augment.imagenet_example_fn(data, train, epoch_seed)
    ds = ds.map(lambda i, ex: fn(ex[0], ex[1], i, ex[2]), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(bs, drop_remainder=True)
  fn = augment.small_batch_fn(data, train, epoch_seed)
  ds = ds.batch(bs, drop_remainder=True)
  return ds.map(lambda i, ex: fn(ex[0], ex[1], i, ex[2]), num_parallel_calls=tf.data.AUTOTUNE)


def _as_numpy(ds, num_batches: int) -> Iterator[dict]:
  for i, batch in enumerate(ds.as_numpy_iterator()):
    if i >= num_batches:
      break
    yield batch


def _tfds_train(data, bs, seed, epoch, start_step, steps, shard):
  """tf.data batches ``start_step..steps`` of a training epoch over ``shard``."""
  stored, a, b = shard
  eseed = augment.epoch_seed(seed, epoch)
  skip, n = start_step * bs, steps * bs
  if specs.use_cache(data):
    index = splits.epoch_order(seed, epoch, a, b, n)[skip:]
    return _in_memory_batches(data, stored, a, b, index, np.ones(len(index)), bs,
                              augment.small_batch_fn(data, True, eseed))
  ds = _streaming_source(data, stored, a, b, shuffle_seed=eseed % 2**31)
  ds = ds.shuffle(max(1, min(int(data.shuffle_buffer), b - a)), seed=eseed % 2**31,
                  reshuffle_each_iteration=False)
  # Streaming has no stable example ids after shuffling; the position in the
  # (deterministic) epoch order stands in for the example index. Enumerate before
  # skipping so that a resumed epoch keeps it.
  ds = ds.enumerate().skip(skip).take(n - skip)
  ds = ds.map(lambda i, ex: (i, (ex[0], ex[1], tf.constant(1.0))))
  return _streaming_batches(data, ds, bs, True, eseed)


def train_iterator(data, *, batch_size: int, seed: int, epoch: int, start_step: int = 0,
                   process_index: Optional[int] = None,
                   process_count: Optional[int] = None) -> Iterator[dict]:
  """Batches of one training epoch of this process's shard, from ``start_step`` on.

  Yields exactly ``steps_per_epoch(data, batch_size) - start_step`` dicts: ``image``
  float32 (B, H, W, C), ``label`` int32 (B,), ``mask`` float32 (B,) of ones, with
  B = batch_size // process_count. Order and augmentation are functions of
  ``(seed, epoch)`` only. NumPy arrays with the TFDS loader; with ``loader='numpy'``
  the same batches as jax.Arrays on this process's devices.
  """
  data = specs.merged(data)
  if specs.loader(data) == "numpy":
    from lns_jax.data import numpy_loader
    return numpy_loader.train_iterator(
        data, batch_size=batch_size, seed=seed, epoch=epoch, start_step=start_step,
        process_index=process_index, process_count=process_count)
  build.prepare(data)
  shard, bs, steps = splits.train_layout(data, batch_size, start_step, process_index,
                                         process_count)
  ds = _tfds_train(data, bs, seed, epoch, start_step, steps, shard)
  ds = ds.prefetch(data.prefetch).with_options(_options())
  return _as_numpy(ds, steps - start_step)


def eval_iterator(data, split: str = "test", *, batch_size: int,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Every example of ``split`` ('test', 'validation' or 'train') once, in order.

  This process's contiguous shard, un-augmented, in ``eval_steps(data, batch_size,
  split)`` batches of batch_size // process_count; padding examples have ``mask`` 0
  (and zero images, label 0). ``loader='numpy'``: the same, as jax.Arrays.
  """
  data = specs.merged(data)
  if specs.loader(data) == "numpy":
    from lns_jax.data import numpy_loader
    return numpy_loader.eval_iterator(data, split, batch_size=batch_size,
                                      process_index=process_index, process_count=process_count)
  build.prepare(data)
  stored, a, b, index, mask, bs = splits.eval_plan(data, split, batch_size, process_index,
                                                   process_count)
  if specs.use_cache(data):
    ds = _in_memory_batches(data, stored, a, b, index, mask, bs,
                            augment.small_batch_fn(data, False, 0))
  else:
    ds = _streaming_source(data, stored, a, b)
    ds = ds.map(lambda im, lb: (im, lb, tf.constant(1.0)))
    pad = ds.take(1).map(lambda im, lb, m: (im, lb, tf.constant(0.0))).repeat(len(index) - (b - a))
    ds = _streaming_batches(data, ds.concatenate(pad).enumerate(start=a), bs, False, 0)
  ds = ds.prefetch(data.prefetch).with_options(_options())
  return _as_numpy(ds, len(index) // bs)
