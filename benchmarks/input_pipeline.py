"""Input pipeline throughput: images/s delivered as NumPy batches, one process.

  PYTHONPATH=. python benchmarks/input_pipeline.py [--datasets fashion_mnist,cifar10]
      [--batch 128] [--epochs 2] [--image_size N]

Datasets that are not built and have no local files are skipped. The first epoch
includes decoding the split into memory (reported separately); the steady state is
the mean over the later epochs, which is what a training run sees.
"""

import argparse
import os
import platform
import time

import jax
import ml_collections
import tensorflow as tf
import tensorflow_datasets as tfds

from lns_jax import data


def measure(name, batch, epochs, image_size, cache):
  config = ml_collections.ConfigDict()
  config.batch_size, config.seed = batch, 0
  config.data = data.default_data_config()
  config.data.name, config.data.image_size = name, image_size
  if cache is not None:
    config.data.cache = cache
  try:
    data.prepare(config.data)
  except data.DatasetNotFoundError:
    return None
  data.clear_cache()
  rates, first = [], None
  for epoch in range(epochs):
    start = time.perf_counter()
    n = 0
    for b in data.train_iterator(config.data, batch_size=config.batch_size, seed=config.seed,
                                 epoch=epoch, process_index=0, process_count=1):
      n += b["image"].shape[0]
    dt = time.perf_counter() - start
    if epoch == 0:
      first = dt
    else:
      rates.append(n / dt)
  return first, sum(rates) / len(rates)


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--datasets", default="fashion_mnist,mnist,cifar10")
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--epochs", type=int, default=3)
  p.add_argument("--image_size", type=int, default=None)
  args = p.parse_args()
  print(f"machine: {platform.machine()}, {os.cpu_count()} CPU cores; "
        f"python {platform.python_version()}, tensorflow {tf.__version__}, "
        f"tensorflow-datasets {tfds.__version__}, jax {jax.__version__}\n")
  print("| dataset | cache | batch | first epoch (s, incl. decode) | images/s (steady) |")
  print("| --- | --- | --- | --- | --- |")
  for name in args.datasets.split(","):
    for cache in (True, False):
      r = measure(name, args.batch, args.epochs, args.image_size, cache)
      if r is None:
        print(f"| {name} | - | {args.batch} | not built, no local files | - |")
        break
      print(f"| {name} | {'memory' if cache else 'stream'} | {args.batch} "
            f"| {r[0]:.1f} | {r[1]:,.0f} |")


if __name__ == "__main__":
  main()
