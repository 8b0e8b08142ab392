"""Train-step cost: baseline (``sign``) vs LNS step, ResNet-20 and ResNet-18.

  python benchmarks/train_step.py                 # both models, CPU-sized defaults
  python benchmarks/train_step.py --r18_batch=256 --steps=20   # on a GPU
  python benchmarks/train_step.py --r18_batch=256 --steps=0 --skip_input  # compile only

Prints a Markdown table: ms/step (median, min-max), images/s, compile time and peak
memory of the jitted train step of each ``--stages`` kind, each ``--conv`` variant and
each ``--cpu_options`` variant (the project's XLA:CPU options or XLA's defaults), the
LNS/baseline ratio, the ratios to ``conv=xla`` and to XLA's default options, then the
input pipeline's wait on real Fashion-MNIST, and the machine and versions. All rows of one model are timed in
one loop that runs a step of each in turn, so the ratios hold on a loaded machine.

  python benchmarks/train_step.py --fmnist_batch=0 --skip_r18 --skip_input --steps=20
                                                  # the ResNet-20 CIFAR rows only
  python benchmarks/train_step.py --fmnist_batch=0 --skip_r18 --skip_input --steps=20 \
      --conv=packed --cpu_options=project,default # the XLA:CPU options on and off
  python benchmarks/train_step.py --r20_batch=0 --reactnet_batch=64 --skip_r18 \
      --skip_input --steps=12 --conv=xla,packed,bits  # ReActNet-20 beside ResNet-20
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import resource
import statistics
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import numpy as np  # noqa: E402

from lns_jax import config as config_lib  # noqa: E402
from lns_jax import binary, mapping, models, optim, parallel, trainer  # noqa: E402


def make_config(model, image_size, channels, batch):
  c = config_lib.base_config()
  c.model.name = model
  if model.startswith("resnet18"):
    c.model.input_binarizer = "approx_sign"
    c.model.weight_scale = "channel"
  elif model.startswith("reactnet"):  # its configs' binarization (config.reactnet_recipe)
    c = config_lib.reactnet_recipe(c, model, teacher="")
  c.batch_size = batch
  c.data.image_size = image_size
  return c


OPTION_SETS = ("project", "default")
STAGES = (("pretrain", "baseline (sign)"), ("lns", "LNS (Eq. 21)"))


def options(name):
  """``'project'``: what the trainer compiles with (``parallel.compiler_options()``);
  ``'default'``: the same without the XLA:CPU options (XLA's defaults)."""
  if name not in OPTION_SETS:
    raise SystemExit(f"--cpu_options takes {', '.join(OPTION_SETS)}, got {name!r}.")
  return parallel.compiler_options(cpu=name == "project")


def build(config, stage, image_shape, num_classes):
  """The model, its binary layers, schedule, optimizer and initial train state."""
  model = models.from_config(config, stage, num_classes)
  layers = binary.weight_binarizers(model, image_shape)
  schedule = optim.learning_rate_schedule(config[stage], 100)
  tx = optim.make_optimizer(config, stage, schedule)
  # Jitted once at XLA's quick compile, as the trainer does (op by op it takes longer).
  state = jax.jit(lambda: trainer.create_train_state(config, stage, model, tx, layers,
                                                     image_shape, jax.random.key(0)),
                  compiler_options=parallel.compiler_options(fast=True))()
  return model, layers, schedule, tx, state


def prepare_step(config, stage, image_shape, num_classes, cpu_options="project"):
  """Compiles the jitted train step of ``stage``; returns a dict with ``run()``."""
  mesh = parallel.make_mesh()
  model, layers, schedule, tx, state = build(config, stage, image_shape, num_classes)
  rep, bsh = parallel.replicated(mesh), parallel.batch_sharding(mesh)
  state = jax.device_put(state, rep)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((config.batch_size, *image_shape), np.float32),
           "label": rng.integers(0, num_classes, config.batch_size).astype(np.int32),
           "mask": np.ones(config.batch_size, np.float32)}
  batch = parallel.shard_batch(batch, mesh)
  step = jax.jit(trainer.make_train_step(model, tx, config, stage, layers, schedule),
                 in_shardings=(rep, bsh), out_shardings=(rep, rep), donate_argnums=(0,),
                 compiler_options=options(cpu_options))
  t = time.perf_counter()
  compiled = step.lower(state, batch).compile()
  compile_s = time.perf_counter() - t
  mem = compiled.memory_analysis()
  peak = None
  if mem is not None:
    peak = (mem.temp_size_in_bytes + mem.argument_size_in_bytes + mem.output_size_in_bytes
            - mem.alias_size_in_bytes) / 2**20
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  gflop = cost.get("flops", float("nan")) / 1e9 if cost else float("nan")
  box = {"state": state}

  def run():
    t = time.perf_counter()
    box["state"], m = compiled(box["state"], batch)
    jax.block_until_ready((box["state"], m))
    return time.perf_counter() - t

  return {"run": run, "compile_s": compile_s, "peak_mib": peak, "gflop": gflop,
          "batch": config.batch_size, "times": []}


def time_alternating(cases, steps, warmup=2):
  """Times ``steps`` steps of every prepared case, one step of each in turn, so that a
  change in the machine's load falls on all of them alike; fills ms, ms_range and, for
  cases with a ``batch``, ips."""
  for c in cases:
    for _ in range(warmup if steps else 0):
      c["run"]()
  for _ in range(steps):
    for c in cases:
      c["times"].append(c["run"]())
  for c in cases:
    ts = c["times"]
    c["ms"] = 1000 * statistics.median(ts) if ts else float("nan")
    if "batch" in c:
      c["ips"] = c["batch"] / c["ms"] * 1000
    c["ms_range"] = (1000 * min(ts), 1000 * max(ts)) if ts else None


def bench_step(config, stage, image_shape, num_classes, steps, warmup=2):
  """One step kind on its own: ``{'ms', 'ips', 'compile_s', 'peak_mib', 'gflop'}``."""
  r = prepare_step(config, stage, image_shape, num_classes)
  time_alternating([r], steps, warmup)
  return {k: r[k] for k in ("ms", "ips", "compile_s", "peak_mib", "gflop")}


def input_wait(batch, steps, loader="tfds", local_dir=None):
  """Runs the real Fashion-MNIST pipeline (``loader`` 'tfds' or 'numpy') next to the
  ResNet-20 LNS step."""
  from lns_jax import data
  c = make_config("resnet20", None, 1, batch)
  c.data.name = "fashion_mnist"
  c.data.loader = loader
  c.data.local_dir = local_dir
  data.prepare(c.data)
  info = data.get_info(c.data)
  mesh = parallel.make_mesh()
  model, layers, schedule, tx, state = build(c, "lns", info.image_shape, info.num_classes)
  step = jax.jit(trainer.make_train_step(model, tx, c, "lns", layers, schedule),
                 donate_argnums=(0,), compiler_options=parallel.compiler_options())
  it = data.train_iterator(c.data, batch_size=c.batch_size, seed=c.seed, epoch=0)
  state, _ = step(state, parallel.shard_batch(next(it), mesh))  # compile
  jax.block_until_ready(state)
  wait, t0 = 0.0, time.perf_counter()
  for _ in range(steps):
    t = time.perf_counter()
    b = next(it)
    wait += time.perf_counter() - t
    state, m = step(state, parallel.shard_batch(b, mesh))
  jax.block_until_ready(state)
  total = time.perf_counter() - t0
  return wait, total


def split_choices(flag, text, allowed):
  """A comma-separated flag's values, each one of ``allowed``, else one line and exit."""
  values = text.split(",")
  if any(v not in allowed for v in values):
    raise SystemExit(f"--{flag} takes {', '.join(allowed)}, got {text!r}.")
  return values


def parse_peaks(text, dtypes):
  """``--peak_tflops``: ``''`` -> {}, ``'495'`` -> every dtype, ``'float32=495,...'``."""
  if not text:
    return {}
  try:
    if "=" not in text:
      peaks = {d: float(text) for d in dtypes}
    else:
      peaks = {k.strip(): float(v) for k, v in (item.split("=") for item in text.split(","))}
  except ValueError:
    peaks = {}
  if not peaks or any(k not in models.DTYPES for k in peaks) or min(peaks.values()) <= 0:
    raise SystemExit(f"--peak_tflops takes a number or dtype=number pairs, got {text!r}.")
  return peaks


def parse_args(argv=None):
  """The command line; see the module docstring."""
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps; 0 compiles only (GFLOP, compile time and memory of "
                      "steps too slow to run here, e.g. --r18_batch=256 on a CPU)")
  p.add_argument("--r20_batch", type=int, default=128,
                 help="batch of the ResNet-20 32x32x3 rows; 0 skips them (the input-wait "
                      "row then uses 128)")
  p.add_argument("--fmnist_batch", type=int, default=64,
                 help="batch of the ResNet-20 rows on 28x28x1 (the embedded default's "
                      "configs/fashion_mnist_r20.py); 0 skips them")
  p.add_argument("--reactnet_batch", type=int, default=0,
                 help="batch of the ReActNet-20 rows on 28x28x1 (configs/"
                      "fashion_mnist_reactnet.py's network, without its teacher); 0 (the "
                      "default) skips them")
  p.add_argument("--r18_batch", type=int, default=0,
                 help="0: 256 on GPU/TPU, 16 on CPU (a 224x224 ResNet-18 step at 256 takes "
                      "minutes on 2 cores)")
  p.add_argument("--r18_size", type=int, default=224)
  p.add_argument("--skip_r18", action="store_true")
  p.add_argument("--skip_input", action="store_true")
  p.add_argument("--conv", default="xla,packed",
                 help="comma-separated config.model.conv values, a row pair each: 'xla' "
                      "(XLA's float conv of the ±1 values), 'packed' (XNOR/popcount forward, "
                      "lns_jax.xnor_conv), 'bits' (XLA's forward, 1-bit residuals), 'auto'")
  p.add_argument("--stages", default="pretrain,lns",
                 help="comma-separated step kinds: 'pretrain' (the baseline step, sign "
                      "weights), 'lns' (Eq. 21)")
  p.add_argument("--cpu_options", default="project",
                 help="comma-separated XLA option sets, a row pair each: 'project' (what the "
                      "trainer compiles with: lns_jax.parallel.compiler_options, YNNPACK for "
                      "dots and reductions only on a CPU), 'default' (XLA's defaults)")
  p.add_argument("--dtype", default="float32",
                 help="comma-separated config.model.dtype values, a row pair each: 'float32', "
                      "'bfloat16' (the network computes in bf16; parameters, the mapping "
                      "networks and the losses stay float32)")
  p.add_argument("--mapping_conv", default="auto",
                 help="config.mapping.conv of every row: 'xla', 'winograd', 'auto' (the "
                      "default: Winograd on a CPU for f_theta's layers of 256+ channels)")
  p.add_argument("--peak_tflops", default="",
                 help="the chip's dense peak in TFLOP/s, one number or per dtype "
                      "('float32=494.7,bfloat16=989.4': an H200 SXM's dense TF32 and BF16): "
                      "adds the model FLOPs utilization column")
  p.add_argument("--loader", choices=("tfds", "numpy"), default=None,
                 help="input pipeline of the input-wait row (config.data.loader); default "
                      "'tfds', or 'numpy' where TensorFlow is not installed")
  p.add_argument("--local_dir", default=None,
                 help="folder of the four Fashion-MNIST idx .gz files (config.data.local_dir)")
  return p.parse_args(argv)


def print_machine(args):
  """The machine, versions and compiler options every table is read against."""
  dev = jax.devices()[0]
  print(f"machine: {platform.platform()}, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs; python {platform.python_version()}; jax {jax.__version__}, "
        f"jaxlib {jax.lib.__version__ if hasattr(jax.lib, '__version__') else ''}; "
        f"devices: {jax.device_count()} x {dev.device_kind} ({dev.platform})")
  print(f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; project compiler options: "
        f"{parallel.compiler_options()}; config.mapping.conv={args.mapping_conv!r}\n")


def plan(args):
  """(cases, option sets, convs, dtypes, stages, peaks); bad names stop here, in one
  line, before anything compiles."""
  r18_batch = args.r18_batch or (16 if jax.devices()[0].platform == "cpu" else 256)
  cases = [("resnet20", 32, 3, args.r20_batch, 10)] if args.r20_batch else []
  if args.fmnist_batch:
    cases.append(("resnet20", 28, 1, args.fmnist_batch, 10))
  if args.reactnet_batch:
    cases.append(("reactnet20", 28, 1, args.reactnet_batch, 10))
  if not args.skip_r18:
    cases.append(("resnet18", args.r18_size, 3, r18_batch, 1000))
  option_sets = split_choices("cpu_options", args.cpu_options, OPTION_SETS)
  dtypes = split_choices("dtype", args.dtype, tuple(models.DTYPES))
  if args.mapping_conv not in mapping.MAPPING_CONVS:
    raise SystemExit(f"--mapping_conv takes {', '.join(mapping.MAPPING_CONVS)}, "
                     f"got {args.mapping_conv!r}.")
  peaks = parse_peaks(args.peak_tflops, dtypes)
  stages = split_choices("stages", args.stages, tuple(name for name, _ in STAGES))
  return cases, option_sets, args.conv.split(","), dtypes, stages, peaks


def model_rows(case, option_sets, convs, dtypes, stages, mapping_conv):
  """One compiled step per (XLA options, conv, dtype, stage) of one model."""
  model, size, ch, batch, classes = case
  rows = []
  for opt in option_sets:
    for conv in convs:
      for dt in dtypes:
        c = make_config(model, size, ch, batch)
        c.model.conv = conv
        c.model.dtype = dt
        c.mapping.conv = mapping_conv
        for stage, label in STAGES:
          if stage in stages:
            rows.append(((opt, conv, dt, stage), label,
                         prepare_step(c, stage, (size, size, ch), classes, opt)))
  return rows


def print_rows(case, rows, steps, peaks):
  """The table's rows of one model, each with its ratios to the other variants."""
  model, size, ch, batch, _ = case
  by = {key: r for key, _, r in rows}
  for (opt, conv, dt, stage), label, r in rows:
    def ratio(other):
      if steps:
        return f"{r['ms'] / other['ms']:.2f}x"
      return f"{r['gflop'] / other['gflop']:.2f}x (FLOPs)"  # compile-only: no time
    peak = f"{r['peak_mib']:.0f}" if r["peak_mib"] is not None else "n/a"
    timed = (f"{r['ms']:.1f} ({r['ms_range'][0]:.0f}-{r['ms_range'][1]:.0f}) | {r['ips']:.0f}"
             if steps else "not run | -")
    def vs(key):
      return ratio(by[key]) if key in by else "-"
    # Model FLOPs utilization: XLA's FLOP count of the step over the chip's peak.
    mfu = (f"{100 * r['gflop'] / r['ms'] / peaks[dt]:.1f}%"
           if dt in peaks and steps else "-")
    print(f"| {model} | {size}x{size}x{ch} | {batch} | {label} | {conv} | {dt} | {opt} | "
          f"{timed} | {r['gflop']:.1f} | {mfu} | {r['compile_s']:.1f} | {peak} "
          f"| {vs((opt, conv, dt, 'pretrain'))} | {vs((opt, 'xla', dt, stage))} "
          f"| {vs((opt, conv, 'float32', stage))} | {vs(('default', conv, dt, stage))} |",
          flush=True)


def main(argv=None):
  args = parse_args(argv)
  print_machine(args)
  cases, option_sets, convs, dtypes, stages, peaks = plan(args)
  print("| model | input | batch | step | conv | dtype | XLA options | ms/step (range) | images/s "
        "| GFLOP/step | MFU | compile s | peak MiB | LNS/baseline | vs conv=xla | vs float32 "
        "| vs default options |")
  print("|---|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
  for case in cases:
    rows = model_rows(case, option_sets, convs, dtypes, stages, args.mapping_conv)
    # Every variant of a model in one alternating loop: under a changing load the
    # ratios stay comparable even when the absolute times are not.
    time_alternating([r for *_, r in rows], args.steps)
    print_rows(case, rows, args.steps, peaks)
  print(f"\nprocess peak RSS: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
  if not args.skip_input:
    loader = args.loader or ("tfds" if importlib.util.find_spec("tensorflow") else "numpy")
    input_batch = args.r20_batch or 128
    wait, total = input_wait(input_batch, 3 * args.steps, loader, args.local_dir)
    print(f"\ninput pipeline ({loader} loader, real Fashion-MNIST, ResNet-20 LNS step, "
          f"batch {input_batch}, "
          f"{3 * args.steps} steps): waited {1000 * wait:.1f} ms of {total:.1f} s "
          f"({100 * wait / total:.2f}% of the step time)")


if __name__ == "__main__":
  main()
