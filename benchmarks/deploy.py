"""The LCE flatbuffer of an export: size, speed and predictions against lns-jax.

  python benchmarks/deploy.py --export=fmnist.npz [--images=1000]

Converts the export with ``python -m lns_jax.deploy`` (LCE's flatbuffer and TFLite's
float model of the same network), then on the real test set of the export's dataset:

* size: the flatbuffer's bytes against ``lns_jax.summary``'s memory figure (the
  export's header holds it);
* predictions: top-1 of LCE's interpreter against ``lns_jax.inference`` (float and
  ``--packed``) on every test image: how many differ, the largest logit difference;
* speed: images/s, one image at a time on one thread, of LCE's interpreter (its
  default kernels and its reference bconv kernels), TFLite's own interpreter on the
  float model, and ``lns_jax.inference --packed`` (jit, batch 1 and batch 256).

LCE's interpreter documents that on x86-64 it falls back on its reference kernels
(its optimised kernels are for 64-bit ARM), so these rows say nothing of a phone or a
Raspberry Pi. Prints the machine and the versions.
"""

import os
import platform
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import numpy as np  # noqa: E402
from absl import app, flags  # noqa: E402

flags.DEFINE_string("export", None, "An export (python -m lns_jax.export).")
flags.DEFINE_integer("images", 1000, "Test images timed per runtime (one at a time).")
flags.mark_flags_as_required(["export"])
F = flags.FLAGS


def _cpu():
  try:
    out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    info = dict(l.split(":", 1) for l in out.splitlines() if ":" in l)
    return f"{info['Model name'].strip()}, {os.cpu_count()} cores"
  except Exception:  # pylint: disable=broad-except
    return platform.processor() or platform.machine()


def main(argv):
  del argv
  import jax
  from lns_jax import data, deploy, inference
  model = inference.load(F.export)
  cfg = model.config()
  images, labels = [], []
  for b in data.eval_iterator(cfg.data, "test", batch_size=cfg.batch_size):
    m = np.asarray(b["mask"]) > 0
    images.append(np.asarray(b["image"])[m])
    labels.append(np.asarray(b["label"])[m])
  images, labels = np.concatenate(images), np.concatenate(labels)

  d = tempfile.mkdtemp(prefix="lns-deploy-bench-")
  lce_fb, float_fb = os.path.join(d, "lce.tflite"), os.path.join(d, "float.tflite")
  rep = deploy.convert(F.export, lce_fb)
  frep = deploy.convert(F.export, float_fb, float_model=True)

  want = np.concatenate([np.asarray(inference.predict(model, images[i:i + 500]))
                         for i in range(0, len(images), 500)])
  packed = np.concatenate([np.asarray(inference.predict(model, images[i:i + 500], True))
                           for i in range(0, len(images), 500)])
  n = min(F.images, len(images))
  got, lce_r = deploy.run(lce_fb, images, "lce", repeat=n)
  _, ref_r = deploy.run(lce_fb, images[:n], "lce_ref", repeat=n)
  fl, fl_r = deploy.run(float_fb, images, "tflite", repeat=n)

  def jax_ips(batch):
    x = images[:batch]
    inference.predict(model, x, True).block_until_ready()
    reps = max(1, n // batch)
    t0 = time.perf_counter()
    for _ in range(reps):
      inference.predict(model, x, True).block_until_ready()
    return reps * batch / (time.perf_counter() - t0)

  v = rep["versions"]
  print(f"machine: {_cpu()} ({platform.machine()}); LCE on x86-64 runs its reference "
        f"kernels (its optimised kernels are for 64-bit ARM)")
  print(f"versions: lns-jax env jax {jax.__version__}, numpy {np.__version__}; deployment "
        f"env larq-compute-engine {v['larq_compute_engine']}, larq {v['larq']}, tensorflow "
        f"{v['tensorflow']}, numpy {v['numpy']}, python {v['python']}")
  print(f"model: {model.spec['name']} from {F.export}, {len(images)} test images\n")
  bits = model.header["summary"]["memory_bits"]
  print("| file | bytes | Mbit |\n|---|---:|---:|")
  print(f"| lns_jax.summary memory figure | {bits / 8:,.0f} | {bits / 1e6:.4f} |")
  print(f"| export (.npz) | {os.path.getsize(F.export):,} | "
        f"{os.path.getsize(F.export) * 8 / 1e6:.4f} |")
  print(f"| LCE flatbuffer ({rep['ops'].get('LceBconv2d')} LceBconv2d) | {rep['bytes']:,} | "
        f"{rep['bytes'] * 8 / 1e6:.4f} |")
  print(f"| TFLite float flatbuffer | {frep['bytes']:,} | {frep['bytes'] * 8 / 1e6:.4f} |\n")

  def cmp(name, a, b):
    diff = int(np.sum(a.argmax(-1) != b.argmax(-1)))
    return (f"| {name} | {diff} of {len(a)} | {np.abs(a - b).max():.2e} | "
            f"{np.mean(a.argmax(-1) == labels):.4f} |")
  print("| against lns_jax.inference (float) | top-1 differ | max logit diff | top-1 acc |")
  print("|---|---:|---:|---:|")
  print(cmp("LCE interpreter", got, want))
  print(cmp("lns_jax.inference --packed", packed, want))
  print(cmp("TFLite float model", fl, want) + "\n")

  print("| runtime (1 thread) | images/s |\n|---|---:|")
  print(f"| LCE interpreter, batch 1 | {lce_r['images_per_s']:.0f} |")
  print(f"| LCE interpreter, reference bconv, batch 1 | {ref_r['images_per_s']:.0f} |")
  print(f"| TFLite interpreter, float model, batch 1 | {fl_r['images_per_s']:.0f} |")
  print(f"| lns_jax.inference --packed (jit, {os.cpu_count()} cores), batch 1 | "
        f"{jax_ips(1):.0f} |")
  print(f"| lns_jax.inference --packed (jit, {os.cpu_count()} cores), batch 256 | "
        f"{jax_ips(256):.0f} |")


if __name__ == "__main__":
  app.run(main)
