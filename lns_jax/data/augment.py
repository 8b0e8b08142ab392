"""Per-example randomness and preprocessing, shared by both loaders.

An example's augmentation is a pure function of ``(seed, epoch, example index)``: a
counter-based hash (splitmix64's finalizer) gives each example 64 random bits, so it
does not depend on which batch, thread or process handles the example, and a resumed
epoch sees exactly the crops and flips it would have seen. The hash exists twice, in
TensorFlow (the TFDS pipeline) and in NumPy (:func:`crop_flip_np`, used by the NumPy
loader), with the same bits (``tests/test_data_numpy.py``).
"""

from __future__ import annotations

import numpy as np

from lns_jax.data import specs
from lns_jax.data.build import tf


def epoch_seed(seed: int, epoch: int) -> int:
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
  """:func:`example_bits` in NumPy: equal bits for equal (epoch_seed, index)."""
  index = np.asarray(index, np.int64).astype(np.uint64)
  return _mix_np(np.uint64(epoch_seed) ^ _mix_np(index))


def crop_flip_np(name: str, epoch_seed: int, index) -> tuple:
  """(row offset, column offset, flip) of each example's augmentation, int32 arrays.

  The draws of :func:`small_batch_fn` (pad + random crop + optional flip), computed
  with NumPy, so both loaders augment example ``index`` of an epoch the same way.
  """
  spec = specs.spec(name)
  bits = example_bits_np(epoch_seed, index)
  k = np.uint64(2 * spec.pad + 1)
  oy = (bits % k).astype(np.int32)
  ox = ((bits >> np.uint64(16)) % k).astype(np.int32)
  flip = (((bits >> np.uint64(32)) % np.uint64(2)).astype(np.int32) if spec.flip
          else np.zeros(len(oy), np.int32))
  return oy, ox, flip


def example_bits(epoch_seed: int, index):
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


def small_batch_fn(cfg, train: bool, epoch_seed: int):
  """fn(images uint8 BHWC, labels, indices, mask) -> batch dict (28/32-pixel datasets).

  Augmentation (zero-pad, random crop, flip) is done for the whole batch with
  gathers: per-example crops in one op are far cheaper than a tf.data map per
  example, which matters on a 2-core host shared with the trainer.
  """
  spec = specs.spec(cfg.name)
  size = specs.image_size(cfg)
  h, w, _ = spec.native_shape
  augment = train and cfg.augment

  def fn(images, labels, index, mask):
    if augment:
      p = spec.pad
      bits = example_bits(epoch_seed, index)
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


def imagenet_example_fn(cfg, train: bool, epoch_seed: int):
  """fn(jpeg bytes, label, index, mask) -> example dict."""
  spec = specs.spec(cfg.name)
  size = specs.image_size(cfg)
  augment = train and cfg.augment

  def fn(encoded, label, index, mask):
    if augment:
      bits = tf.bitcast(example_bits(epoch_seed, index), tf.int32)  # 2 x int32
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
      scale = (size / specs.IMAGENET_CROP_FRACTION) / tf.reduce_min(shape)
      new = tf.maximum(tf.cast(tf.round(shape * scale), tf.int32), size)
      image = tf.image.resize(image, new, method="bilinear", antialias=True)
      top, left = (new[0] - size) // 2, (new[1] - size) // 2
      image = image[top:top + size, left:left + size]
    mask = tf.cast(mask, tf.float32)
    image = tf.ensure_shape(_normalize(image, spec), (size, size, 3)) * mask
    return {"image": image, "label": tf.cast(label, tf.int32) * tf.cast(mask, tf.int32),
            "mask": mask}
  return fn
