"""The defaults of ``config.data``, free of TensorFlow and of any input pipeline.

:func:`lns_jax.config.base_config` takes the data fields from here, so a config can be
built (and the model, the train step and the benchmarks run) where TensorFlow and
TFDS are not installed.
"""

from __future__ import annotations

import ml_collections

# 'tfds': the TFDS builders fed from local files, read with tf.data (every dataset).
# 'numpy': the original files read with NumPy, the split kept on the device and
# batched and augmented there with jax.numpy (fashion_mnist, mnist, cifar10); see
# lns_jax.data.numpy_loader.
LOADERS = ("tfds", "numpy")
NUMPY_DATASETS = ("fashion_mnist", "mnist", "cifar10")


def default_data_config() -> ml_collections.ConfigDict:
  """Defaults for ``config.data``; config files include and override this."""
  c = ml_collections.ConfigDict()
  c.name = "fashion_mnist"  # fashion_mnist | mnist | cifar10 | imagenet2012
  c.loader = "tfds"  # 'tfds' | 'numpy' (no TensorFlow needed; not for imagenet2012)
  c.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $TFDS_DATA_DIR or ~/tensorflow_datasets
  c.local_dir = ml_collections.FieldReference(None, field_type=str)  # None: per-dataset default, see `local_dir`
  c.image_size = ml_collections.FieldReference(None, field_type=int)  # None: native (224 for ImageNet)
  c.val_examples = 0  # hold out the END of train as split "validation" (paper CIFAR-10: 10000)
  c.train_examples = ml_collections.FieldReference(None, field_type=int)  # None: all; N: the first N
  c.eval_examples = ml_collections.FieldReference(None, field_type=int)  # None: all; N: the first N
  c.augment = True
  c.cache = ml_collections.FieldReference(None, field_type=bool)  # None: in memory unless ImageNet
  c.shuffle_buffer = 16_384  # streaming path only; the in-memory path permutes the whole shard
  c.prefetch = 4  # batches
  return c


def check_loader(name: str, loader: str) -> None:
  """Raises ValueError (one line naming ``config.data.loader``) for a bad loader choice."""
  if loader not in LOADERS:
    raise ValueError(f"config.data.loader: {loader!r} is not one of "
                     f"{', '.join(map(repr, LOADERS))}.")
  if loader == "numpy" and name not in NUMPY_DATASETS:
    raise ValueError(f"config.data.loader: 'numpy' reads {', '.join(NUMPY_DATASETS)} from "
                     f"their original files; {name!r} needs 'tfds'.")
