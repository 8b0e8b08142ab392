"""The mapping networks alone: forward + backward of every LNS layer's f_theta (Eq. 4).

  python benchmarks/mapping.py                               # ResNet-20 32x32x3
  python benchmarks/mapping.py --model=resnet18 --steps=5    # ResNet-18's 512-channel layers

The LNS step's work over the baseline step is f_theta's (plus Eq. 15-21, which is
elementwise), and it does not grow with the batch, so this is the part of the step
that decides LNS/baseline at a small batch. One jitted function maps every LNS layer's
kernel with that layer's own ``MappingNet`` (filter statistics, ``train=True`` as in
the step) and takes the gradient of the layers' auxiliary losses (Eq. 16) to theta and
to W, compiled with the trainer's options (``lns_jax.parallel.compiler_options``).

``--impl`` rows (``config.mapping.conv`` for every layer), timed one call of each in turn:
  ``xla``       XLA's conv (``flax.linen.Conv``);
  ``winograd``  each 3x3 conv over a 3x3 filter image as Winograd F(3x3, 3x3)
                (``lns_jax.mapping.winograd_conv3x3``): 25 multiplies per channel pair
                instead of the 49 taps that land in the image; the same parameters,
                ``q_hat`` to float rounding;
  ``auto``      the trainer's default: Winograd on a CPU for layers of 256 input channels
                or more, XLA's conv otherwise (DECISIONS 15).
``--channels`` rows (one c x c layer each) are what ``'auto'``'s threshold was chosen from.

Prints a Markdown table (ms, XLA's GFLOP, GFLOP/s, ``q_hat``'s largest difference from
the first row relative to its largest value, compile seconds), then the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lns_jax import config as config_lib  # noqa: E402
from lns_jax import binary, loss, mapping, models, parallel  # noqa: E402
from train_step import time_alternating  # noqa: E402  (this folder is sys.path[0])

IMPLS = mapping.MAPPING_CONVS
MODELS = {"resnet20": (32, 3, 10), "resnet18": (224, 3, 1000)}


def lns_kernels(model_name, key):
  """``{layer: random kernel}`` of every LNS layer of ``model_name`` (shapes as trained)."""
  c = config_lib.base_config()
  c.model.name = model_name
  size, ch, classes = MODELS[model_name]
  model = models.from_config(c, "lns", classes)
  layers = binary.weight_binarizers(model, (size, size, ch))
  params = binary.abstract_variables(model, (size, size, ch))["params"]
  out = {}
  for path, binarizer in layers.items():
    if binarizer == "lns":
      shape = binary.subtree(params, path)["kernel"].shape
      key, k = jax.random.split(key)
      out["/".join(path)] = jax.random.normal(k, shape) * np.sqrt(2 / np.prod(shape[:3]))
  return out


def make_fn(impl, names):
  """``(theta, batch_stats, kernels) -> (q_hats, grads to theta and W)`` with f_theta's
  convs as ``impl`` (``config.mapping.conv``)."""
  net = mapping.MappingNet(conv_impl=impl)

  def objective(theta, stats, kernels):
    total, q_hats = 0.0, {}
    for name in names:
      q, _ = net.apply({"params": theta[name], "batch_stats": stats[name]}, kernels[name],
                       train=True, mutable=["batch_stats"])
      q_hats[name] = q
      total = total + loss.lns_loss(q, jnp.sign(kernels[name]), 0.05)
    return total, q_hats

  def fn(theta, stats, kernels):
    grads, q_hats = jax.grad(objective, argnums=(0, 2), has_aux=True)(theta, stats, kernels)
    return q_hats, grads

  return fn


def time_rows(kernels, impls, steps, opts):
  """Compiles ``make_fn`` for every impl on ``kernels`` and times ``steps`` calls of each
  in turn (a change in the machine's load falls on all rows alike)."""
  names = sorted(kernels)
  variables = {n: mapping.init_mapping(jax.random.key(i), kernels[n].shape)
               for i, n in enumerate(names)}
  args = ({n: v["params"] for n, v in variables.items()},
          {n: v["batch_stats"] for n, v in variables.items()}, kernels)
  rows = []
  for impl in impls:
    t = time.perf_counter()
    compiled = jax.jit(make_fn(impl, names)).lower(*args).compile(compiler_options=opts)
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    q_hats, _ = jax.block_until_ready(compiled(*args))

    def run(compiled=compiled):
      t = time.perf_counter()
      jax.block_until_ready(compiled(*args))
      return time.perf_counter() - t

    rows.append({"impl": impl, "run": run, "compile_s": compile_s, "q": q_hats,
                 "gflop": (cost or {}).get("flops", float("nan")) / 1e9, "times": []})
  time_alternating(rows, steps)
  ref = rows[0]["q"]
  for r in rows:
    r["diff"] = max(float(jnp.max(jnp.abs(r["q"][n] - ref[n])) / jnp.max(jnp.abs(ref[n])))
                    for n in names)
  return rows


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="resnet20", help=f"one of {', '.join(MODELS)}")
  p.add_argument("--channels", default="",
                 help="comma-separated c: instead of a model, one layer with a 3x3 c x c "
                      "kernel each (where Winograd starts to pay)")
  p.add_argument("--impl", default="xla,winograd",
                 help=f"comma-separated, a row each: {', '.join(IMPLS)}")
  p.add_argument("--steps", type=int, default=20, help="timed calls per row")
  args = p.parse_args()
  if args.model not in MODELS:
    raise SystemExit(f"--model takes {', '.join(MODELS)}, got {args.model!r}.")
  impls = args.impl.split(",")
  if any(i not in IMPLS for i in impls):
    raise SystemExit(f"--impl takes {', '.join(IMPLS)}, got {args.impl!r}.")
  if args.steps < 1:
    raise SystemExit(f"--steps must be at least 1, got {args.steps}.")
  try:
    channels = [int(c) for c in args.channels.split(",")] if args.channels else []
  except ValueError:
    channels = [0]
  if any(c < 1 for c in channels):
    raise SystemExit(f"--channels takes positive integers, got {args.channels!r}.")

  key = jax.random.key(0)
  if channels:
    cases = [(f"one layer, 3x3x{c}x{c}", {"layer": jax.random.normal(key, (3, 3, c, c))
                                          * np.sqrt(2 / (9 * c))}) for c in channels]
  else:
    kernels = lns_kernels(args.model, key)
    cases = [(f"{args.model}, {len(kernels)} LNS layers", kernels)]
  opts = parallel.compiler_options()
  print(f"q_hat's difference: from the {impls[0]!r} row, relative to its largest value\n")
  print("| mapping of | impl | ms (range) | GFLOP | GFLOP/s | vs first row | q_hat max diff "
        "| compile s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|")
  for label, kernels in cases:
    rows = time_rows(kernels, impls, args.steps, opts)
    for r in rows:
      print(f"| {label} | {r['impl']} | {r['ms']:.1f} ({r['ms_range'][0]:.0f}-"
            f"{r['ms_range'][1]:.0f}) | {r['gflop']:.2f} | "
            f"{r['gflop'] / r['ms'] * 1000:.0f} | {rows[0]['ms'] / r['ms']:.2f}x | "
            f"{r['diff']:.1e} | {r['compile_s']:.1f} |")
  dev = jax.devices()[0]
  print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs; jax {jax.__version__}; "
        f"{jax.device_count()} x {dev.device_kind} ({dev.platform}); compiler options {opts}")


if __name__ == "__main__":
  main()
