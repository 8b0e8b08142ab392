"""What each supported dataset is, and where its original files live.

Shared by the offline build (:mod:`lns_jax.data.build`), the TFDS pipeline
(:mod:`lns_jax.data.pipeline`) and the NumPy loader (:mod:`lns_jax.data.numpy_loader`).
Every function takes ``config.data`` (a ConfigDict; missing fields take the defaults
of :func:`lns_jax.data.defaults.default_data_config`), never the whole config.
"""

from __future__ import annotations

import dataclasses
import os

from lns_jax.errors import ConfigError
from lns_jax.data.defaults import check_loader, default_data_config

FASHION_MNIST_DEBIAN_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)
CIFAR10_ARCHIVE = "cifar-10-binary.tar.gz"
IMAGENET_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")
IMAGENET_DEFAULT_SIZE = 224
IMAGENET_CROP_FRACTION = 0.875
TITLES = {"fashion_mnist": "Fashion-MNIST", "mnist": "MNIST", "cifar10": "CIFAR-10",
          "imagenet2012": "ImageNet"}


class DatasetNotFoundError(FileNotFoundError):
  """The local files a dataset is built from are missing."""


@dataclasses.dataclass(frozen=True)
class Spec:
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


SPECS = {
    # Pad 2 + crop: small translations, the 28x28 analogue of CIFAR's pad 4 on
    # 32x32. Clothing keeps its class under a mirror image, so flip too.
    "fashion_mnist": Spec(
        10, (28, 28, 1), "test", 60_000, 10_000,
        (72.94,), (90.02,), True, pad=2, flip=True),
    # Digits are not mirror-invariant (flipping changes their shape class, e.g.
    # 2/5, 3/E), so MNIST gets translations only.
    "mnist": Spec(
        10, (28, 28, 1), "test", 60_000, 10_000,
        (33.32,), (78.57,), True, pad=2, flip=False),
    # The paper's CIFAR recipe: pad 4, random 32x32 crop, horizontal flip.
    "cifar10": Spec(
        10, (32, 32, 3), "test", 50_000, 10_000,
        (125.31, 122.95, 113.87), (62.99, 62.09, 66.70), True, pad=4, flip=True),
    # Random resized crop + flip (train), resize + center crop (eval).
    "imagenet2012": Spec(
        1000, (224, 224, 3), "validation", 1_281_167, 50_000,
        (123.675, 116.28, 103.53), (58.395, 57.12, 57.375), False),
}
DATASETS = tuple(SPECS)


def merged(data) -> "ml_collections.ConfigDict":  # noqa: F821
  """``config.data`` over the defaults, so configs may leave fields out."""
  out = default_data_config()
  if data is not None and "data" in data:
    # The functions took the whole config before lns_jax.data became a package.
    raise TypeError("lns_jax.data takes config.data (and batch_size, seed where it needs "
                    "them), not the whole config: pass config.data.")
  if data is not None:
    for k, v in data.items():
      out[k] = v
  return out


def spec(name: str) -> Spec:
  if name not in SPECS:
    raise ValueError(f"Unknown dataset {name!r}; expected one of {sorted(SPECS)}.")
  return SPECS[name]


def loader(data) -> str:
  """'tfds' or 'numpy' (configs from before ``config.data.loader`` read with TFDS)."""
  name = data.get("loader", "tfds")
  try:
    check_loader(data.name, name)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  return name


def data_dir(data) -> str:
  """TFDS data_dir: ``data.data_dir``, else $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  d = merged(data).data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets"
  return os.path.abspath(os.path.expanduser(d))


def local_dir(data) -> str:
  """Directory holding the original files a dataset is built (or read) from."""
  cfg = merged(data)
  if cfg.local_dir:
    return os.path.abspath(os.path.expanduser(cfg.local_dir))
  manual = os.path.join(data_dir(cfg), "downloads", "manual")
  return {
      "fashion_mnist": FASHION_MNIST_DEBIAN_DIR,
      "mnist": os.path.join(manual, "mnist"),
      "cifar10": manual,
      "imagenet2012": manual,
  }[cfg.name]


def image_size(data) -> int:
  """The model's input size: ``data.image_size``, else the native one (224 for ImageNet)."""
  if data.image_size:
    return int(data.image_size)
  if data.name == "imagenet2012":
    return IMAGENET_DEFAULT_SIZE
  return spec(data.name).native_shape[0]


def use_cache(data) -> bool:
  return spec(data.name).in_memory if data.cache is None else bool(data.cache)


def required_files(name: str, ldir: str) -> list:
  """The original files a dataset needs in ``ldir``."""
  if name in ("fashion_mnist", "mnist"):
    return [os.path.join(ldir, f) for f in MNIST_FILES]
  if name == "cifar10":
    return [os.path.join(ldir, CIFAR10_ARCHIVE)]
  return [os.path.join(ldir, f) for f in IMAGENET_FILES]


def not_found_message(data, ldir: str, missing: list) -> str:
  """Which files to place where, for :class:`DatasetNotFoundError`."""
  files = "\n".join(f"  {p}" for p in missing)
  state = "is not built and" if loader(data) == "tfds" else "is read from its original files;"
  msg = f"Dataset {data.name!r} {state} these files are missing:\n{files}\n"
  if data.name == "fashion_mnist":
    msg += ("Install them with `apt-get install dataset-fashion-mnist` (they go to "
            f"{FASHION_MNIST_DEBIAN_DIR}), or put the four original idx .gz files "
            "in a directory and set config.data.local_dir to it.")
  elif data.name == "mnist":
    msg += (f"Place the original MNIST files ({', '.join(MNIST_FILES)}) in {ldir}, "
            "or set config.data.local_dir to the directory that holds them.")
  elif data.name == "cifar10":
    msg += (f"Place the original CIFAR-10 binary archive {CIFAR10_ARCHIVE} "
            f"(https://www.cs.toronto.edu/~kriz/cifar.html) in {ldir}, or set "
            "config.data.local_dir to the directory that holds it.")
  else:
    msg += (f"Place {' and '.join(IMAGENET_FILES)} (from https://image-net.org, "
            f"registration required) in {ldir}, or set config.data.local_dir.")
  return msg + " Nothing is downloaded: this pipeline works offline only."
