"""Packed XNOR/popcount binary conv vs XLA's float32 conv of the same ±1 values.

Prints a Markdown table: ms per call (jitted, after warm-up, ``block_until_ready``,
median of ``--repeats`` runs) for 3x3, stride 1, SAME binary convs of ResNet-18's
shapes. Columns:

* float32: ``lax.conv_general_dilated`` of the ±1 float tensors (NHWC, HWIO);
* packed: :func:`lns_jax.bitpack.xnor_conv2d_packed` with pre-packed weights (the
  inference path: weights are packed once at export), the input packed inside the call;
* packed conv only: the same with the input already packed (the conv alone).

Every packed result is checked against the float one before timing.

  PYTHONPATH=. python benchmarks/packed_conv.py [--repeats 7] [--batches 1,32]
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np
from jax import lax

from lns_jax import bitpack

LAYERS = [(56, 64, 64), (28, 128, 128), (14, 256, 256), (7, 512, 512)]  # (H=W, C_in, C_out)


def _time_ms(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm-up
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--batches", default="1,32")
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]

  float_conv = jax.jit(lambda x, w: lax.conv_general_dilated(
      x, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")))

  @jax.jit
  def packed_conv(x, w_packed):
    return bitpack.xnor_conv2d_packed(bitpack.pack_bits(x), w_packed, x.shape[-1])

  @jax.jit
  def packed_conv_only(x_packed, w_packed):
    c_in = w_packed.shape[2] * 32  # all layers here have C_in % 32 == 0
    return bitpack.xnor_conv2d_packed(x_packed, w_packed, c_in)

  cpu = platform.processor() or platform.machine()
  print("# Packed XNOR/popcount conv vs float32 conv (3x3, stride 1, SAME)\n")
  print(f"- machine: {platform.platform()}, {cpu}, os.cpu_count()={os.cpu_count()}")
  print(f"- jax {jax.__version__}, jaxlib {jaxlib.__version__}, device: {jax.devices()[0]}")
  print(f"- ms per call, median of {args.repeats} after warm-up; "
        f"ratio = float32 ms / packed ms (> 1: packed is faster)\n")
  print("| batch | layer | float32 ms | packed ms | packed conv only ms | ratio |")
  print("| ---: | --- | ---: | ---: | ---: | ---: |")
  rng = np.random.default_rng(0)
  start = time.perf_counter()
  for n in batches:
    for hw, c_in, c_out in LAYERS:
      x = jnp.asarray(np.where(rng.random((n, hw, hw, c_in)) < 0.5, -1.0, 1.0), jnp.float32)
      w = jnp.asarray(np.where(rng.random((3, 3, c_in, c_out)) < 0.5, -1.0, 1.0),
                      jnp.float32)
      w_packed = bitpack.pack_bits(w, axis=2)
      x_packed = bitpack.pack_bits(x)
      ref = np.asarray(float_conv(x, w))
      if not np.array_equal(np.asarray(packed_conv(x, w_packed)), ref):
        raise AssertionError(f"packed conv differs from float conv at {n, hw, c_in}")
      t_float = _time_ms(float_conv, x, w, repeats=args.repeats)
      t_packed = _time_ms(packed_conv, x, w_packed, repeats=args.repeats)
      t_only = _time_ms(packed_conv_only, x_packed, w_packed, repeats=args.repeats)
      print(f"| {n} | {hw}x{hw}x{c_in}->{c_out} | {t_float:.2f} | {t_packed:.2f} | "
            f"{t_only:.2f} | {t_float / t_packed:.1f}x |", flush=True)
  print(f"\ntotal benchmark time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
  main()
