"""Shared helpers for the end-to-end tests."""

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys

import chex
import jax
import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_config(name, arg=""):
  spec = importlib.util.spec_from_file_location("cfg_" + name, os.path.join(ROOT, "configs", name))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def set_field(config, dotted, value):
  node = config
  *parents, last = dotted.split(".")
  for p in parents:
    node = node[p]
  node[last] = value


def smoke_config(**overrides):
  """Tiny ResNet, 128 real Fashion-MNIST images, batch 32: 4 steps an epoch."""
  c = load_config("fashion_mnist_r20.py", "smoke")
  c.data.train_examples = 128
  c.data.eval_examples = 64
  c.pretrain.epochs = 2
  c.warmup.epochs = 1
  c.lns.epochs = 1
  c.log_every_steps = 2
  c.checkpoint_every_steps = 3
  for k, v in overrides.items():
    set_field(c, k.replace("__", "."), v)
  return c


# The same config as train.py overrides, for subprocess runs.
SMOKE_FLAGS = ["--config=" + os.path.join(ROOT, "configs", "fashion_mnist_r20.py") + ":smoke",
               "--config.data.train_examples=128", "--config.data.eval_examples=64",
               "--config.pretrain.epochs=2", "--config.warmup.epochs=1", "--config.lns.epochs=1",
               "--config.log_every_steps=2", "--config.checkpoint_every_steps=3"]


def xla_flags(devices=None):
  """conftest's XLA_FLAGS with ``devices`` fake CPU devices (None: no count, one device)."""
  flags = re.sub(r"\s*--xla_force_host_platform_device_count=\d+", "",
                 os.environ.get("XLA_FLAGS", "")).strip()
  return flags if devices is None else f"{flags} --xla_force_host_platform_device_count={devices}"


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_same_variables(a, b, atol=1e-6):
  """Same tree structure, leaves equal within ``atol`` (chex names the differing leaf)."""
  chex.assert_trees_all_close(a, b, rtol=1e-6, atol=atol)


def write_cifar10_archive(manual_dir, per_batch, n_test, seed=0):
  """Writes cifar-10-binary.tar.gz in the original layout (label byte + 3072 CHW bytes).

  Returns (train images HWC, train labels, test images HWC, test labels).
  """
  import io
  import pathlib
  import tarfile
  rng = np.random.RandomState(seed)

  def records(n):
    labels = rng.randint(0, 10, n).astype(np.uint8)
    chw = rng.randint(0, 256, (n, 3, 32, 32)).astype(np.uint8)
    blob = b"".join(bytes([l]) + im.tobytes() for l, im in zip(labels, chw))
    return blob, chw.transpose(0, 2, 3, 1), labels

  files, train_im, train_lb = {}, [], []
  for i in range(1, 6):
    files[f"data_batch_{i}.bin"], im, lb = records(per_batch)
    train_im.append(im)
    train_lb.append(lb)
  files["test_batch.bin"], test_im, test_lb = records(n_test)
  files["batches.meta.txt"] = "\n".join(
      ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
       "truck"]).encode() + b"\n"
  manual = pathlib.Path(manual_dir)
  manual.mkdir(parents=True, exist_ok=True)
  with tarfile.open(manual / "cifar-10-binary.tar.gz", "w:gz") as tar:
    for name, blob in files.items():
      info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
      info.size = len(blob)
      tar.addfile(info, io.BytesIO(blob))
  return np.concatenate(train_im), np.concatenate(train_lb), test_im, test_lb


def assert_one_error_line(r, *expected):
  """Exit code 2, stderr exactly one line ``error: ...`` holding ``expected``
  (a reply of :class:`Zygote`)."""
  text = r["stdout"] + r["stderr"]
  assert "Traceback" not in text, text
  lines = r["stderr"].strip().splitlines()
  assert r["rc"] == 2 and len(lines) == 1 and lines[0].startswith("error: "), r
  for e in expected:
    assert e in lines[0], (e, lines[0])
  return lines[0]


class Zygote:
  """A warm process that runs entry points with argv (see tests/cli_zygote.py)."""

  def __init__(self):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    self.proc = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests", "cli_zygote.py")],
                                 cwd=ROOT, env=env, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert json.loads(self.proc.stdout.readline()) == {"ready": True}

  def run(self, entry, *args, stop_after_validation=False, timeout=120, env=None):
    request = {"entry": entry, "args": list(args), "timeout": timeout,
               "stop_after_validation": stop_after_validation, "env": env or {}}
    self.proc.stdin.write(json.dumps(request) + "\n")
    self.proc.stdin.flush()
    return json.loads(self.proc.stdout.readline())

  def run_argv(self, argv, timeout=900, env=None):
    """``subprocess.run(argv, capture_output=True, text=True, cwd=ROOT)`` of a command
    line ``[sys.executable, "-m", module, ...]`` or ``[sys.executable, "file.py", ...]``,
    run through this warm process: a :class:`subprocess.CompletedProcess`. For the
    successful runs whose test is not about the process; each entry point keeps a real
    subprocess somewhere (train.py: test_first_run, test_robustness; lns_jax.ablation: the
    run.sh tests; benchmarks: test_cpu_options, test_objective_scale)."""
    assert argv[0] == sys.executable, argv
    entry, args = (argv[2], argv[3:]) if argv[1] == "-m" else (argv[1], argv[2:])
    r = self.run(entry, *args, timeout=timeout, env=env)
    return subprocess.CompletedProcess(argv, r["rc"], r["stdout"], r["stderr"])

  def close(self):
    self.proc.stdin.close()
    self.proc.wait(timeout=60)


def trainer_signalled_at(calls, at):
  """A stand-in for ``trainer.train`` that finishes every stage at once (an empty
  ``result.json`` each) inside its own preemption handler, as the trainer does, and on
  call number ``at`` gets SIGTERM there, as in a run's final evaluation. Appends each
  call's workdir to ``calls``."""
  from lns_jax import workdir as workdir_lib

  def train(config, workdir, stop_at=None):
    with workdir_lib.Preemption():
      calls.append(workdir)
      if len(calls) == at:
        os.kill(os.getpid(), signal.SIGTERM)
      for stage in config.stages.split(","):
        os.makedirs(os.path.join(workdir, stage))
        open(os.path.join(workdir, stage, "result.json"), "w").close()
      return {}
  return train
