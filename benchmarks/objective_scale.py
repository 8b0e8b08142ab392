"""Why Eq. 17's sum does not train with the paper's SGD: the curvature of each layer's
auxiliary loss with respect to theta, and the learning rates it allows.

  python benchmarks/objective_scale.py                                     # random W
  python benchmarks/objective_scale.py --checkpoint=DIR/baseline/pretrain/final

For every LNS layer of the model (``--config``, default ``configs/fashion_mnist_r20.py:paper``)
it takes the latent kernel ``W`` (a trained checkpoint's, or He-normal random ones),
a fresh f_theta (``config.seed``), and the layer's auxiliary loss ``l~_i`` of Eq. 15
reduced as the mean (Eq. 16) and as the sum (Eq. 17); then it finds, by power
iteration on Hessian-vector products, the largest eigenvalue ``lambda`` of
``d^2 l~_i / d theta^2`` at that point. Heavy-ball SGD (momentum ``beta``) on a quadratic
with curvature ``lambda`` diverges when ``lr * alpha * lambda > 2 (1 + beta)``, so the
table's "largest stable lr" is ``2 (1 + beta) / (alpha * lambda)``: a local bound (the
loss is not quadratic: BatchNorm and ReLU), which the training runs then test. The sum
is ``N`` times the mean (``N``: the layer's weights), so its curvature and its gradient
are ``N`` times larger, and its largest stable lr ``N`` times smaller.

Prints a Markdown table, then the machine and versions.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from lns_jax import binary, loss, mapping, models  # noqa: E402
from lns_jax import checkpoint as ckpt_lib  # noqa: E402

IMAGE = {"fashion_mnist": (28, 28, 1), "mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def load_config(spec: str):
  """``FILE[:args]`` -> the config (as ``--config`` reads it)."""
  import importlib.util
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("lns_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg)


def lns_kernels(config, checkpoint: str, key) -> dict:
  """``{layer: W}`` of every LNS layer: the checkpoint's, else He-normal random."""
  shape = IMAGE[config.data.name]
  model = models.from_config(config, "lns", 10)
  layers = binary.weight_binarizers(model, shape)
  params = (ckpt_lib.load_variables(checkpoint)["params"] if checkpoint
            else binary.abstract_variables(model, shape)["params"])
  out = {}
  for path, binarizer in layers.items():
    if binarizer != "lns":
      continue
    kernel = binary.subtree(params, path)["kernel"]
    if not checkpoint:
      key, k = jax.random.split(key)
      kernel = jax.random.normal(k, kernel.shape) * np.sqrt(2 / np.prod(kernel.shape[:3]))
    out["/".join(path)] = jnp.asarray(kernel, jnp.float32)
  return out


def top_eigenvalue(f, theta, iters: int, key) -> float:
  """The largest eigenvalue of f's Hessian at theta (power iteration on HVPs)."""
  grad = jax.grad(f)
  hvp = jax.jit(lambda v: jax.jvp(grad, (theta,), (v,))[1])
  leaves, tree = jax.tree.flatten(theta)
  keys = jax.random.split(key, len(leaves))
  v = jax.tree.unflatten(tree, [jax.random.normal(k, x.shape) for k, x in zip(keys, leaves)])
  lam = 0.0
  for _ in range(iters):
    norm = jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(v)))
    v = jax.tree.map(lambda x: x / norm, v)
    hv = hvp(v)
    lam = float(sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(v), jax.tree.leaves(hv))))
    v = hv
  return lam


def rows(config, kernels: dict, iters: int) -> list:
  out = []
  for i, (name, w) in enumerate(sorted(kernels.items())):
    variables = mapping.init_mapping(jax.random.fold_in(jax.random.key(config.seed), i),
                                     w.shape, config.mapping.output, config.mapping.init)
    stats, labels = variables["batch_stats"], jnp.sign(w)

    def aux(theta, stats=stats, w=w, labels=labels):  # Eq. 16: the mean over the layer
      q, _ = mapping.map_weights({"params": theta, "batch_stats": stats}, w, train=True,
                                 output=config.mapping.output, init=config.mapping.init)
      return loss.lns_loss(q, labels, config.rho, "mean")

    theta = variables["params"]
    n = int(np.prod(w.shape))
    lam = top_eigenvalue(aux, theta, iters, jax.random.key(i))
    g = jax.grad(aux)(theta)
    gnorm = float(jnp.sqrt(sum(jnp.vdot(x, x) for x in jax.tree.leaves(g))))
    out.append({"layer": name, "n": n, "lam_mean": lam, "lam_sum": n * lam,
                "g_mean": gnorm, "g_sum": n * gnorm, "loss_mean": float(aux(theta))})
  return out


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--config", default="configs/fashion_mnist_r20.py:paper",
                 help="FILE[:args] (the model, rho, alpha, momentum and lr come from it)")
  p.add_argument("--checkpoint", default="", help="a stage's final/ folder (its W); "
                 "default: He-normal random kernels")
  p.add_argument("--iters", type=int, default=30, help="power iterations per layer")
  args = p.parse_args()
  if args.iters < 1:
    raise SystemExit(f"error: --iters must be at least 1, got {args.iters}.")
  try:
    config = load_config(args.config)
  except (FileNotFoundError, ValueError) as e:
    raise SystemExit(f"error: --config={args.config}: {e}") from None
  try:
    kernels = lns_kernels(config, args.checkpoint, jax.random.key(config.seed))
  except ckpt_lib.CheckpointMismatchError as e:
    raise SystemExit(f"error: --checkpoint={args.checkpoint}: {e}") from None
  alpha, beta = float(config.alpha), float(config.momentum)
  lr = float(config.lns.lr)
  bound = lambda lam: 2 * (1 + beta) / (alpha * lam)
  print(f"config {args.config}; W: {args.checkpoint or 'He-normal random'}; alpha {alpha:g}, "
        f"momentum {beta:g}; the paper's fine-tuning lr {lr:g}\n")
  print("| layer | N | l~ (mean) | lambda_max (mean) | largest stable lr (mean) | "
        "lambda_max (sum) | largest stable lr (sum) | ||grad_theta|| mean / sum |")
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  table = rows(config, kernels, args.iters)
  for r in table:
    print(f"| {r['layer']} | {r['n']:,} | {r['loss_mean']:.3f} | {r['lam_mean']:.3g} | "
          f"{bound(r['lam_mean']):.3g} | {r['lam_sum']:.3g} | {bound(r['lam_sum']):.2e} | "
          f"{r['g_mean']:.3g} / {r['g_sum']:.3g} |")
  worst_mean = min(bound(r["lam_mean"]) for r in table)
  worst_sum = min(bound(r["lam_sum"]) for r in table)
  print(f"\nlargest stable lr over the layers: mean {worst_mean:.3g}, sum {worst_sum:.2e} "
        f"(the paper's {lr:g} is {lr / worst_sum:,.0f}x over the sum's bound and "
        f"{lr / worst_mean:.3g}x the mean's)")
  print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
        f"python {platform.python_version()}, jax {jax.__version__}, "
        f"backend {jax.default_backend()}")


if __name__ == "__main__":
  main()
