"""Datasets, built offline and read deterministically: ``lns_jax.data``.

Fashion-MNIST, MNIST, CIFAR-10 (the paper's recipe) and ImageNet. Every function takes
``config.data`` (and the batch size and seed where it needs them), never the whole
config. The package's parts:

* :mod:`~lns_jax.data.defaults`  ``config.data``'s fields and the loader choices (no TensorFlow);
* :mod:`~lns_jax.data.specs`     each dataset's facts, its original files and where they live;
* :mod:`~lns_jax.data.files`     the original files of the small datasets, read with NumPy;
* :mod:`~lns_jax.data.build`     the offline TFDS build (:func:`prepare`), never the network;
* :mod:`~lns_jax.data.splits`    which examples each split, process and step reads;
* :mod:`~lns_jax.data.augment`   per-example randomness as a hash of (seed, epoch, index);
* :mod:`~lns_jax.data.pipeline`  the iterators: tf.data for ``loader='tfds'``, dispatching
  to :mod:`~lns_jax.data.numpy_loader` (original files, batches made on the device)
  for ``loader='numpy'``.

TensorFlow and TFDS are imported only when the TFDS loader builds or reads a dataset.
"""

from lns_jax.data.build import LoaderUnavailableError, prepare
from lns_jax.data.defaults import LOADERS, NUMPY_DATASETS, check_loader, default_data_config
from lns_jax.data.pipeline import clear_cache, eval_iterator, train_iterator
from lns_jax.data.specs import DATASETS, FASHION_MNIST_DEBIAN_DIR, DatasetNotFoundError, data_dir, local_dir
from lns_jax.data.splits import DatasetInfo, eval_steps, get_info, steps_per_epoch

__all__ = [
    "DATASETS", "FASHION_MNIST_DEBIAN_DIR", "LOADERS", "NUMPY_DATASETS", "DatasetInfo",
    "DatasetNotFoundError", "LoaderUnavailableError", "check_loader", "clear_cache",
    "data_dir", "default_data_config", "eval_iterator", "eval_steps", "get_info",
    "local_dir", "prepare", "steps_per_epoch", "train_iterator",
]
