"""Split arithmetic: which examples each split, process and step reads.

The logical splits are ``train``, ``test`` and, with ``val_examples`` > 0, ``validation``
(the END of the training split held out). Each process reads its own contiguous shard;
the per-process batch is ``batch_size // process_count``. Training shards are equal
(the remainder is dropped) and the last partial batch is dropped, so every process runs
the same number of steps; evaluation reads every example once and pads the last batch.
Both loaders use these functions, so they read the same examples.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Optional, Tuple

import numpy as np

from lns_jax.data import specs


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


def process(process_index: Optional[int], process_count: Optional[int]) -> Tuple[int, int]:
  """(index, count) of this process; JAX's unless given (tests and tools give them)."""
  if process_index is None or process_count is None:
    import jax  # lazily: tools may use this module without JAX devices
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count}).")
  return process_index, process_count


def local_batch(batch_size: int, process_count: int) -> int:
  if batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} is not divisible by process_count {process_count}.")
  return batch_size // process_count


def split_sizes(data) -> tuple:
  """(train, test) sizes of the dataset as stored, or the nominal ones until it is."""
  spec = specs.spec(data.name)
  if specs.loader(data) == "numpy":
    from lns_jax.data import files
    return files.split_sizes(data)
  try:
    from lns_jax.data import build
    splits = build.builder(data).info.splits
    return splits["train"].num_examples, splits[spec.eval_split].num_examples
  except Exception:  # pylint: disable=broad-except  # not built, or mocked info
    return spec.num_train, spec.num_test


def ranges(data) -> dict:
  """Logical split -> (stored split, start, stop) in absolute example indices."""
  data = specs.merged(data)
  spec = specs.spec(data.name)
  n_train_total, n_test = split_sizes(data)
  val = int(data.val_examples or 0)
  if not 0 <= val < n_train_total:
    raise ValueError(f"val_examples={val} must be in [0, {n_train_total}).")
  n_train = n_train_total - val
  if data.train_examples is not None:
    n_train = min(n_train, int(data.train_examples))

  def cap(n):
    return n if data.eval_examples is None else min(n, int(data.eval_examples))

  out = {"train": ("train", 0, n_train), "test": (spec.eval_split, 0, cap(n_test))}
  if val:
    out["validation"] = ("train", n_train_total - val, n_train_total - val + cap(val))
  return out


def get_info(data) -> DatasetInfo:
  """Static facts about ``config.data``; split sizes are the stored dataset's if built."""
  data = specs.merged(data)
  spec = specs.spec(data.name)
  r = ranges(data)
  size = specs.image_size(data)
  count = lambda k: r[k][2] - r[k][1] if k in r else 0
  return DatasetInfo(
      name=data.name, num_classes=spec.num_classes,
      image_shape=(size, size, spec.native_shape[2]),
      num_train=count("train"), num_eval=count("test"), num_validation=count("validation"),
      mean=spec.mean, std=spec.std)


def train_shard(data, process_index: int, process_count: int) -> tuple:
  """(stored split, start, stop) of a process's training shard: equal, contiguous."""
  stored, start, stop = ranges(data)["train"]
  m = (stop - start) // process_count
  return stored, start + process_index * m, start + (process_index + 1) * m


def eval_range(data, split: str) -> tuple:
  """(stored split, start, stop) of an evaluation split, all processes together."""
  r = ranges(data)
  if split not in r:
    raise ValueError(f"Unknown eval split {split!r}; available: {sorted(r)} "
                     "('validation' needs config.data.val_examples > 0).")
  return r[split]


def eval_shard(data, split: str, process_index: int, process_count: int) -> tuple:
  """(stored split, start, stop) of a process's part of an evaluation split."""
  stored, start, stop = eval_range(data, split)
  n = stop - start
  return (stored, start + process_index * n // process_count,
          start + (process_index + 1) * n // process_count)


def steps_per_epoch(data, batch_size: int, *, process_count: Optional[int] = None) -> int:
  """Training steps per epoch at global ``batch_size`` (the last partial batch dropped)."""
  _, pc = process(0, process_count)
  _, a, b = train_shard(data, 0, pc)
  return (b - a) // local_batch(batch_size, pc)


def eval_steps(data, batch_size: int, split: str = "test", *,
               process_count: Optional[int] = None) -> int:
  """Number of (padded) eval batches, the same on every process."""
  _, pc = process(0, process_count)
  _, a, b = eval_range(data, split)
  return math.ceil(math.ceil((b - a) / pc) / local_batch(batch_size, pc))


def train_layout(data, batch_size: int, start_step: int, process_index: Optional[int],
                 process_count: Optional[int]):
  """((stored split, a, b), local batch, steps) of this process's training epoch."""
  pi, pc = process(process_index, process_count)
  steps = steps_per_epoch(data, batch_size, process_count=pc)
  if not 0 <= start_step <= steps:
    raise ValueError(f"start_step {start_step} not in [0, {steps}].")
  return train_shard(data, pi, pc), local_batch(batch_size, pc), steps


def eval_plan(data, split: str, batch_size: int, process_index: Optional[int],
              process_count: Optional[int]):
  """(stored split, a, b, index, mask, local batch): this process's examples, padded to
  whole batches."""
  pi, pc = process(process_index, process_count)
  stored, a, b = eval_shard(data, split, pi, pc)
  bs = local_batch(batch_size, pc)
  num_pad = eval_steps(data, batch_size, split, process_count=pc) * bs - (b - a)
  index = np.concatenate([np.arange(a, b), np.full(num_pad, a)])
  mask = np.concatenate([np.ones(b - a, np.int64), np.zeros(num_pad, np.int64)])
  return stored, a, b, index, mask, bs


def epoch_order(seed: int, epoch: int, a: int, b: int, n: int):
  """The first ``n`` example indices of an epoch over [a, b): a NumPy permutation of
  ``(seed, epoch)``, independent of TensorFlow's global seed or version."""
  rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(epoch)]))
  return (a + rng.permutation(b - a))[:n]
