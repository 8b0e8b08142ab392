"""Data-parallel scaling of the train step: 1 vs N devices at a fixed global batch.

  python benchmarks/scaling.py                       # ResNet-20, batch 128, 1 and 2 CPU devices
  python benchmarks/scaling.py --devices=1,2,4,8 --platform=gpu --steps=50   # on a GPU box
  python benchmarks/scaling.py --devices=1,2,4,8 --steps=0 --json            # compile only: FLOPs

Each device count runs in its own subprocess: on CPU the devices are XLA's host
devices (``--xla_force_host_platform_device_count=N``, all sharing this machine's
cores), on an accelerator the first N devices. The step is the trainer's own
(``trainer.make_train_step`` jitted by ``parallel.jit_data_parallel``: batch sharded on
``data``, state replicated and donated), for the baseline (``sign`` weights) and the
LNS stage (mapping networks, Eq. 21). Prints a Markdown table: ms/step, images/s,
the speed-up over 1 device, XLA's FLOP count per device and step, and the compile time;
then the machine, the versions and the load average before and after. The mapping
networks are split over the devices by filters (``config.mapping.shard``, the default;
``--no_mapping_shard`` keeps every device computing every layer's whole mapping, as
before). ``--json`` prints one JSON object a line instead, for ResNet-20 and (with
``--r18_batch``, default 256; 0 skips it) for ResNet-18 at 224x224; ``--steps=0``
compiles only (``ms_per_step`` null): on a CPU a ResNet-18 step takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = {"pretrain": "baseline (sign)", "lns": "LNS (Eq. 21)"}


def worker(args):
  """One device count: prints one JSON line per stage."""
  sys.path.insert(0, ROOT)
  import jax
  import numpy as np
  from lns_jax import config as config_lib
  from lns_jax import binary, models, optim, parallel, trainer

  devices = jax.devices()[:args.num_devices]
  if len(devices) < args.num_devices:
    raise SystemExit(f"asked for {args.num_devices} devices, have {len(jax.devices())}")
  mesh = parallel.make_mesh(devices)
  config = config_lib.base_config()
  config.model.name = args.model
  config.batch_size = args.batch
  config.mapping.shard = not args.no_mapping_shard
  # XLA's float conv, the one a GPU or TPU runs ('auto' packs on a CPU, whose popcount
  # ops XLA's cost analysis counts differently), and XLA's conv in the mapping networks
  # likewise ('auto' is Winograd on a CPU for 256+ channels): the per-device FLOPs compare
  # across platforms and with the README's figures.
  config.model.conv = "xla"
  config.mapping.conv = "xla"
  config_lib.validate(config, num_devices=len(devices))
  shape = (args.image_size, args.image_size, 3)
  rng = np.random.default_rng(0)
  batch = {"image": rng.standard_normal((args.batch, *shape), np.float32),
           "label": rng.integers(0, 10, args.batch).astype(np.int32),
           "mask": np.ones(args.batch, np.float32)}
  for stage in args.stages.split(","):
    model = models.from_config(config, stage, 10, mesh)
    layers = binary.weight_binarizers(model, shape)
    schedule = optim.learning_rate_schedule(config[stage], 100)
    tx = optim.make_optimizer(config, stage, schedule)

    def init():
      return trainer.create_train_state(config, stage, model, tx, layers, shape,
                                        jax.random.key(0))

    # The initializers compile ~10x faster at XLA's level 0; the step itself is compiled
    # as the trainer compiles it.
    state = jax.device_get(jax.jit(init).lower().compile({"xla_backend_optimization_level": 0})())
    state = jax.device_put(state, parallel.replicated(mesh))
    gbatch = parallel.shard_batch(batch, mesh)
    step = parallel.jit_data_parallel(
        trainer.make_train_step(model, tx, config, stage, layers, schedule), mesh,
        compiler_options=parallel.compiler_options())
    t = time.perf_counter()
    compiled = step.lower(state, gbatch).compile()
    compile_s = time.perf_counter() - t
    for _ in range(args.warmup if args.steps else 0):
      state, m = compiled(state, gbatch)
    times = []
    for _ in range(args.steps):
      t = time.perf_counter()
      state, m = compiled(state, gbatch)
      jax.block_until_ready((state, m))
      times.append(time.perf_counter() - t)
    cost = compiled.cost_analysis() or {}
    print(json.dumps({"model": args.model, "stage": stage, "devices": len(devices),
                      "batch": args.batch,
                      "ms": 1000 * statistics.median(times) if times else None,
                      "ms_min": 1000 * min(times) if times else None, "compile_s": compile_s,
                      "flops": cost.get("flops"), "device_kind": devices[0].device_kind,
                      "platform": devices[0].platform}), flush=True)


def _cpu_name():
  try:
    with open("/proc/cpuinfo") as f:
      m = re.search(r"model name\s*:\s*(.*)", f.read())
      return m.group(1).strip() if m else platform.processor()
  except OSError:
    return platform.processor() or platform.machine()


def _versions():
  out = {}
  for name in ("jax", "jaxlib", "flax", "optax"):
    try:
      from importlib.metadata import version
      out[name] = version(name)
    except Exception:  # pylint: disable=broad-except
      out[name] = "?"
  return out


def _run_worker(args, n, model, batch, size):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  if args.platform == "cpu":
    flags = re.sub(r"--xla_force_host_platform_device_count=\d+", "", env.get("XLA_FLAGS", ""))
    env["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()
    env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, os.path.abspath(__file__), "--worker", f"--num_devices={n}",
         f"--model={model}", f"--image_size={size}", f"--batch={batch}",
         f"--stages={args.stages}", f"--steps={args.steps}", f"--warmup={args.warmup}"]
  if args.no_mapping_shard:
    cmd.append("--no_mapping_shard")
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
  if proc.returncode:
    sys.exit(f"{n} devices failed (rc {proc.returncode}):\n{proc.stderr[-3000:]}")
  return [json.loads(l) for l in proc.stdout.splitlines() if l.startswith("{")]


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--devices", default="1,2", help="comma-separated device counts")
  p.add_argument("--platform", default="cpu", help="'cpu' (fake host devices) or 'gpu'/'tpu'")
  p.add_argument("--model", default="resnet20")
  p.add_argument("--image_size", type=int, default=32)
  p.add_argument("--batch", type=int, default=128, help="global batch, the same for every count")
  p.add_argument("--stages", default="pretrain,lns")
  p.add_argument("--steps", type=int, default=10,
                 help="timed steps (median and best reported); 0 compiles only")
  p.add_argument("--json", action="store_true", help="one JSON object a line, no table")
  p.add_argument("--r18_batch", type=int, default=256,
                 help="--json: also ResNet-18 at 224x224 with this global batch (0: skip)")
  p.add_argument("--no_mapping_shard", action="store_true",
                 help="every device maps every layer's whole kernel (the old behaviour)")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--timeout", type=int, default=600, help="seconds per device count")
  p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
  p.add_argument("--num_devices", type=int, default=1, help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)

  load_before = os.getloadavg()
  t0 = time.time()
  counts = [int(x) for x in args.devices.split(",")]
  runs = [(args.model, args.batch, args.image_size)]
  if args.json and args.r18_batch:
    runs.append(("resnet18", args.r18_batch, 224))
  rows = []
  for model, batch, size in runs:
    for n in counts:
      rows += _run_worker(args, n, model, batch, size)
      if args.json:
        r = rows[-len(args.stages.split(",")):]
        for x in r:
          print(json.dumps({"model": x["model"], "stage": x["stage"], "devices": x["devices"],
                            "batch": x["batch"],
                            "gflop_per_device": x["flops"] / 1e9 if x.get("flops") else None,
                            "ms_per_step": x["ms"], "mapping_shard": not args.no_mapping_shard}),
                flush=True)
  if args.json:
    return
  load_after = os.getloadavg()

  first = min(x["devices"] for x in rows)
  base = {r["stage"]: r for r in rows if r["devices"] == first}
  print(f"| model | step | devices | global batch | per device | ms/step median (best) | "
        f"images/s | speed-up median (best) | GFLOP/step/device | compile s |")
  print("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
  for r in sorted(rows, key=lambda r: (list(STAGES).index(r["stage"]) if r["stage"] in STAGES
                                       else 9, r["devices"])):
    flops = f"{r['flops'] / 1e9:.2f}" if r.get("flops") else "n/a"
    if r["ms"] is None:
      timing = "- | - | -"
    else:
      timing = (f"{r['ms']:.0f} ({r['ms_min']:.0f}) | {args.batch / r['ms'] * 1000:.1f} | "
                f"{base[r['stage']]['ms'] / r['ms']:.2f}x "
                f"({base[r['stage']]['ms_min'] / r['ms_min']:.2f}x)")
    print(f"| {args.model} | {STAGES.get(r['stage'], r['stage'])} | {r['devices']} | {args.batch} "
          f"| {args.batch // r['devices']} | {timing} | {flops} | {r['compile_s']:.1f} |")
  # Work not split over devices: F_N = (F_1 - M) / N + M, so M = (N F_N - F_1) / (N - 1).
  notes = []
  for stage in STAGES:
    f = {r["devices"]: r.get("flops") for r in rows if r["stage"] == stage}
    if 1 in f and len(f) > 1 and all(f.values()):
      n = max(f)
      unsplit = (n * f[n] - f[1]) / (n - 1)
      notes.append(f"{STAGES[stage]}: {unsplit / 1e9:.2f} GFLOP/step are not split over devices "
                   f"({100 * unsplit / f[1]:.0f}% of the 1-device step)")
  v = _versions()
  dev = rows[0]
  print(f"\n{'; '.join(notes)}." if notes else "")
  print(f"machine: {_cpu_name()}, {os.cpu_count()} cores, {platform.platform()}; devices: "
        f"{dev['platform']} ({dev['device_kind']}){' (XLA host devices sharing those cores)' if args.platform == 'cpu' else ''}")
  print(f"versions: python {platform.python_version()}, jax {v['jax']}, jaxlib {v['jaxlib']}, "
        f"flax {v['flax']}, optax {v['optax']}")
  print(f"median and best of {args.steps} steps after {args.warmup} warm-up; load average (1 min) "
        f"{load_before[0]:.2f} before, {load_after[0]:.2f} after; total {time.time() - t0:.0f} s")


if __name__ == "__main__":
  main()
