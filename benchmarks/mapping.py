"""The mapping networks alone: forward + backward of every LNS layer's f_theta (Eq. 4).

  python benchmarks/mapping.py                               # ResNet-20 32x32x3
  python benchmarks/mapping.py --model=resnet18 --steps=5    # ResNet-18's 512-channel layers

The LNS step's work over the baseline step is f_theta's (plus Eq. 15-21, which is
elementwise), and it does not grow with the batch, so this is the part of the step
that decides LNS/baseline at a small batch. One jitted function maps every LNS layer's
kernel with that layer's own ``MappingNet`` (filter statistics, ``train=True`` as in
the step) and takes the gradient of the layers' auxiliary losses (Eq. 16) to theta and
to W, compiled with the trainer's options (``lns_jax.parallel.compiler_options``).

``--impl`` rows, timed one call of each in turn:
  ``conv``      the mapping as the trainer runs it (``flax.linen.Conv``: XLA's conv);
  ``winograd``  each 3x3 conv over a 3x3 filter image as Winograd F(3x3, 3x3): 25
                multiplies per channel pair instead of the 49 of the taps that land in the
                image, i.e. half the FLOPs; a benchmark-only variant, swapped in with a
                Flax method interceptor (the same parameters; ``q_hat`` to float rounding).

Prints a Markdown table (ms, XLA's GFLOP, GFLOP/s, ``q_hat``'s largest difference from
the ``conv`` row relative to its largest value, compile seconds), then the machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import flax.linen as nn  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import traverse_util  # noqa: E402

from lns_jax import config as config_lib  # noqa: E402
from lns_jax import binary, loss, mapping, models, parallel  # noqa: E402

IMPLS = ("conv", "winograd")
MODELS = {"resnet20": (32, 3, 10), "resnet18": (224, 3, 1000)}

# Winograd F(3, 3) on a length-3 signal with one zero of padding each side: the three
# outputs are the middle coefficients of the product of two degree-2 polynomials, so five
# products (points 0, 1, -1, 2 and infinity) give them. B evaluates the input, G the
# (reversed) taps, A interpolates the middle coefficients: y = A[(B x) * (G w)].
_PTS = (0.0, 1.0, -1.0, 2.0)
_B = np.array([[p**k for k in range(3)] for p in _PTS] + [[0, 0, 1]], np.float64)
_G = _B[:, ::-1]
_A = np.linalg.inv(np.array([[p**k for k in range(5)] for p in _PTS] + [[0, 0, 0, 0, 1]],
                            np.float64))[1:4]


def _along(m, x, axis):
  """``m @ x`` along ``axis`` as sums of slices (elementwise ops XLA fuses; m is tiny)."""
  parts = [jax.lax.index_in_dim(x, i, axis, keepdims=False) for i in range(x.shape[axis])]
  rows = []
  for row in m:
    terms = [p * np.float32(c) for c, p in zip(row, parts) if abs(c) > 1e-12]
    rows.append(sum(terms[1:], terms[0]))
  return jnp.stack(rows, axis)


def winograd_conv3x3(x, kernel):
  """SAME, stride-1 3x3 conv of ``(n, 3, 3, c)`` images with an HWIO kernel, F(3x3, 3x3)."""
  n, c, co = x.shape[0], x.shape[-1], kernel.shape[-1]
  xe = _along(_B, _along(_B, x, 1), 2)                              # (n, 5, 5, c)
  ke = _along(_G, _along(_G, kernel, 0), 1).reshape(25, c, co)       # (25, c, co)
  xe = jnp.transpose(xe, (1, 2, 0, 3)).reshape(25, n, c)
  m = jax.lax.dot_general(xe, ke, (((2,), (1,)), ((0,), (0,))))     # 25 (n, co) products
  m = jnp.transpose(m.reshape(5, 5, n, co), (2, 0, 1, 3))
  return _along(_A, _along(_A, m, 1), 2)


def _winograd_interceptor(next_fun, args, kwargs, context):
  mod = context.module
  if not (isinstance(mod, nn.Conv) and context.method_name == "__call__"):
    return next_fun(*args, **kwargs)
  x = args[0]
  if x.ndim != 4 or x.shape[1:3] != (3, 3) or tuple(mod.kernel_size) != (3, 3):
    return next_fun(*args, **kwargs)
  y = winograd_conv3x3(x, mod.get_variable("params", "kernel"))
  if mod.use_bias:
    y = y + mod.get_variable("params", "bias")
  return y


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
  """``(theta, batch_stats, kernels) -> (q_hats, grads to theta and W)`` for ``impl``."""
  net = mapping.MappingNet()

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

  if impl == "winograd":
    def intercepted(*a):
      with nn.intercept_methods(_winograd_interceptor):
        return fn(*a)
    return intercepted
  return fn


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--model", default="resnet20", help=f"one of {', '.join(MODELS)}")
  p.add_argument("--impl", default="conv,winograd",
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

  kernels = lns_kernels(args.model, jax.random.key(0))
  names = sorted(kernels)
  variables = {n: mapping.init_mapping(jax.random.key(i), kernels[n].shape)
               for i, n in enumerate(names)}
  theta = {n: v["params"] for n, v in variables.items()}
  stats = {n: v["batch_stats"] for n, v in variables.items()}
  opts = parallel.compiler_options()
  rows = []
  for impl in impls:
    t = time.perf_counter()
    compiled = jax.jit(make_fn(impl, names)).lower(theta, stats, kernels).compile(compiler_options=opts)
    compile_s = time.perf_counter() - t
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    q_hats, _ = jax.block_until_ready(compiled(theta, stats, kernels))
    rows.append({"impl": impl, "run": compiled, "compile_s": compile_s, "q": q_hats,
                 "gflop": (cost or {}).get("flops", float("nan")) / 1e9, "times": []})
  for _ in range(args.steps):  # one call of each row in turn: load falls on all alike
    for r in rows:
      t = time.perf_counter()
      jax.block_until_ready(r["run"](theta, stats, kernels))
      r["times"].append(time.perf_counter() - t)

  ref = rows[0]["q"]
  params = sum(x.size for x in jax.tree.leaves(theta))
  print(f"{args.model}: {len(names)} LNS layers, {params / 1e6:.2f}M mapping parameters; "
        f"q_hat compared with the {rows[0]['impl']!r} row\n")
  print("| impl | ms (range) | GFLOP | GFLOP/s | q_hat max diff / max | compile s |")
  print("|---|---:|---:|---:|---:|---:|")
  for r in rows:
    ms = 1000 * statistics.median(r["times"])
    diff = max(float(jnp.max(jnp.abs(r["q"][n] - ref[n])) / jnp.max(jnp.abs(ref[n])))
               for n in names)
    print(f"| {r['impl']} | {ms:.1f} ({1000 * min(r['times']):.0f}-"
          f"{1000 * max(r['times']):.0f}) | {r['gflop']:.2f} | {r['gflop'] / ms * 1000:.0f} "
          f"| {diff:.1e} | {r['compile_s']:.1f} |")
  dev = jax.devices()[0]
  print(f"\nmachine: {platform.platform()}, {os.cpu_count()} CPUs; jax {jax.__version__}; "
        f"{jax.device_count()} x {dev.device_kind} ({dev.platform}); compiler options {opts}")


if __name__ == "__main__":
  main()
