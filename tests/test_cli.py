"""What a user types: every README (and docs/) command works as typed, every bad input is one line.

The command lines run through ``tests/cli_zygote.py`` (the ``cli`` fixture of
conftest.py): one process imports TensorFlow and JAX once and forks a child per command line, which runs the entry point
(``train.py``, ``python -m lns_jax.summary`` ...) as ``__main__`` with that argv. A few
command lines also run as real subprocesses, to show that nothing depends on the
zygote.
"""

import ast
import fcntl
import glob
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from lns_testutil import ROOT, SMOKE_FLAGS, assert_one_error_line, xla_flags

pytestmark = pytest.mark.slow

SMOKE = "configs/fashion_mnist_r20.py:smoke"
# What a user reads: README.md, then the docs/ pages it links (the depth moved there, issue 26).
# "README" below is all of them: every command and example error they show is typed here.
DOC_FILES = ["README.md"] + sorted(os.path.relpath(p, ROOT)
                                   for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
README = "\n".join(open(os.path.join(ROOT, f)).read() for f in DOC_FILES)


# ------------------------------------------------------------------------ bad inputs


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  """The files some bad inputs name: a checkpoint of another model, damaged exports..."""
  import orbax.checkpoint as ocp
  tmp = tmp_path_factory.mktemp("bad_inputs")
  other = tmp / "other_model" / "final" / "1" / "state"
  ocp.PyTreeCheckpointer().save(str(other), {"params": {"Dense_0": {
      "kernel": np.zeros((3, 7), np.float32)}}})
  damaged_ckpt = tmp / "damaged_ckpt" / "final" / "1" / "state"
  damaged_ckpt.mkdir(parents=True)
  (damaged_ckpt / "_METADATA").write_bytes(b"\x00garbage")
  (tmp / "garbage.npz").write_bytes(os.urandom(256))
  np.savez(tmp / "plain.npz", x=np.zeros(3))
  (tmp / "a_file").write_text("not a folder")
  (tmp / "empty").mkdir()
  (tmp / "locked").mkdir()
  return tmp


def _bad_inputs(t):
  """(entry, args, texts the error line must hold). ``t``: the `files` folder."""
  w = f"--workdir={t}/w"
  T = [f"--config={SMOKE}", w]
  lns = [*T, "--config.stages=lns"]

  def train(*args_then_expected):
    *args, expected = args_then_expected
    return ("train.py", [*T, *args], [expected])

  return [
      # unknown fields at any depth, unknown flags, missing ones, stray arguments
      train("--config.lns.rhoo=1", "config.lns.rhoo: unknown field (did you mean config.rho?)"),
      train("--config.finetune.alpha=1", "config.finetune.alpha: 1.0: the finetune stage's "
                                         "objective is cross-entropy alone"),
      train("--config.evals_per_epoch=0", "config.evals_per_epoch: 0 must be >= 1"),
      train("--config.alpah=1", "config.alpah: unknown field (did you mean 'alpha'?)"),
      train("--config.modle.name=resnet20", "config.modle: unknown field (did you mean 'model'?)"),
      train("--config.data.trian_examples=5", "config.data.trian_examples: unknown field (did "
                                              "you mean 'train_examples'?)"),
      train("--config.model.name.depth=2", "config.model.name: is a value"),
      train("--wrokdir=/tmp/x", "--wrokdir: unknown flag (did you mean --workdir?)"),
      ("train.py", [f"--config={SMOKE}"], ["--workdir is required"]),
      train("extra", "unexpected argument 'extra'"),
      # wrong types
      train("--config.alpha=abc", "config.alpha: 'abc' is not a number"),
      train("--config.batch_size=1.5", "config.batch_size: '1.5' is not an integer"),
      train("--config.data.augment=maybe", "config.data.augment: 'maybe' is not true or false"),
      train("--config.model=resnet20", "config.model: is a group of fields"),
      train("--num_processes=two", "--num_processes=two: invalid literal for int()"),
      train("--config.rho=high", "config.rho: 'high' must be a number"),
      # out of range, non-finite, empty, unknown names, malformed tuples
      train("--config.alpha=-1", "config.alpha: -1.0 must be >= 0"),
      train("--config.momentum=1.5", "config.momentum: 1.5 must be <= 1"),
      train("--config.rho=(0.6,0.5)", "config.rho: rho_pos + rho_neg = 1.1 must be < 1"),
      train("--config.batch_size=13", "config.batch_size: 13 must be a multiple of the number "
                                      "of devices (2); use e.g. 12."),
      train("--config.data.train_examples=0", "config.data.train_examples: 0 must be >= 1"),
      train("--config.alpha=nan", "config.alpha: nan must be finite"),
      train("--config.model.dtype=float16", "config.model.dtype: 'float16' is not one of"),
      train("--config.mapping.conv=fft", "config.mapping.conv: 'fft' is not one of"),
      train("--config.lns.lr=inf", "config.lns.lr: inf must be finite"),
      train("--config.stages=", "config.stages: is empty"),
      train("--config.stages=pretrain,lnss", "config.stages: unknown stage 'lnss'"),
      train("--config.model.name=resnet21", "config.model.name: 'resnet21' is not one of"),
      train("--config.optimizer=rmsprop", "config.optimizer: 'rmsprop' is not one of"),
      train("--config.data.name=imagenet", "config.data.name: 'imagenet' is not one of"),
      train("--config.rho=(0.1,0.2,0.3)", "config.rho: rho must be a number or a pair"),
      train("--config.rho=(0.01,", "config.rho: '(0.01,' must be a number"),
      train("--config.pretrain.decay_epochs=(2,1)", "config.pretrain.decay_epochs: (2, 1) must "
                                                    "be increasing"),
      train("--config.stages=warmup,lns", "config.init_from: the warmup stage needs"),
      # distillation (issue 32): an unknown teacher stage, one not run, a missing checkpoint
      train("--config.distill.teacher=teachr", "config.distill.teacher: 'teachr' is neither "
                                               "a stage"),
      train("--config.distill.teacher=teacher", "config.distill.teacher: stage 'teacher' is "
                                                "not in config.stages"),
      train(f"--config.distill.teacher={t}/nothing", "config.distill.teacher: no checkpoint "
                                                     "at"),
      train(f"--config.distill.teacher={t}/other_model", "holds no lns-jax checkpoint"),
      # config files
      ("train.py", ["--config=configs/nope.py", w],
       ["--config=configs/nope.py: no such config file"]),
      ("train.py", ["--config=configs/fashion_mnist_r20.py:bogus", w],
       ["unknown arguments ['bogus']"]),
      # checkpoints, workdirs, data, processes
      ("train.py", [*lns, f"--config.init_from={t}/nothing"], ["no checkpoint there"]),
      ("train.py", [*lns, f"--config.init_from={t}/other_model"],
       [f"config.init_from='{t}/other_model'", "Dense_0/kernel"]),
      ("train.py", [*lns, f"--config.init_from={t}/damaged_ckpt"], ["could not read"]),
      ("train.py", [f"--config={SMOKE}", f"--workdir={t}/a_file/w"], ["is not writable"]),
      ("train.py", [f"--config={SMOKE}", f"--workdir={t}/locked"],
       ["Another run is using workdir"]),
      train("--config.data.name=mnist", f"--config.data.data_dir={t}/empty",
            "train-images-idx3-ubyte"),
      train("--num_processes=2", "--process_id=5", "process_id 5 must be in [0, 2)"),
      # the other entry points
      ("lns_jax.summary", [f"--config={SMOKE}", "--config.lns.alpah=1"],
       ["config.lns.alpah: unknown field"]),
      ("lns_jax.summary", [f"--config={SMOKE}", "--config.model.name=resnet21"],
       ["config.model.name: 'resnet21' is not one of"]),
      ("lns_jax.summary", ["--config=configs/nope.py"], ["no such config file"]),
      ("lns_jax.export", [f"--workdir={t}/nothing", f"--out={t}/x.npz"], ["does not exist"]),
      ("lns_jax.export", [f"--workdir={t}/empty", f"--out={t}/x.npz"],
       ["holds no finished stage"]),
      ("lns_jax.export", [f"--workdir={t}/empty", f"--out={t}/x.npz", "--stage=bogus"],
       ["--stage='bogus' is not a stage"]),
      ("lns_jax.export", [f"--workdir={t}/empty"], ["--out is required"]),
      ("lns_jax.inference", [f"--export={t}/nothing.npz"], ["no such export file"]),
      ("lns_jax.inference", [f"--export={t}/garbage.npz"], ["is damaged or truncated"]),
      ("lns_jax.inference", [f"--export={t}/plain.npz"], ["not an lns-jax export"]),
      ("lns_jax.inference", [f"--export={t}/garbage.npz", "--packed=sure"], ["--packed=sure"]),
      ("lns_jax.ablation", [*T, "--config.lns.alpah=1"], ["config.lns.alpah: unknown field"]),
      ("lns_jax.ablation", [*T, "--seeds=0"], ["--seeds=0: give at least 1"]),
      ("lns_jax.ablation", [*T, "--alphas=0,x"], ["'x' is not a number"]),
      ("lns_jax.ablation", [*T, "--rhos=-1"], ["must be finite and >= 0"]),
  ]


BAD_CASES = _bad_inputs("T")
assert len(BAD_CASES) >= 25


@pytest.mark.parametrize("index", range(len(BAD_CASES)),
                         ids=[f"{c[0]} {c[1][-1]}" for c in BAD_CASES])
def test_bad_input_is_one_error_line_and_exit_code_2(cli, files, index):
  """A bad flag, field, value, file or workdir: exit code 2 and one ``error:`` line."""
  entry, args, expected = _bad_inputs(str(files))[index]
  lock = None
  if f"--workdir={files}/locked" in args:  # as a first run holding the workdir would
    lock = open(files / "locked" / ".lock", "a+")
    fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
  try:
    r = cli.run(entry, *args)
  finally:
    if lock:
      lock.close()
  assert_one_error_line(r, *expected)
  if "--config.init_from" in " ".join(args):  # a mismatched init_from writes no stage
    assert set(os.listdir(files / "w")) <= {".lock"}, os.listdir(files / "w")


def test_bad_input_through_a_real_subprocess(tmp_path):
  """The same, with nothing but ``python train.py``: the README's own typo."""
  r = subprocess.run([sys.executable, "train.py", f"--config={SMOKE}",
                      f"--workdir={tmp_path}/w", "--config.lns.alpah=1"],
                     cwd=ROOT, capture_output=True, text=True, timeout=120)
  assert r.returncode == 2, r.stderr
  assert "Traceback" not in r.stderr + r.stdout
  errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
  assert errors == [r.stderr.strip().splitlines()[-1]]
  assert errors[0].startswith("error: config.lns.alpah: unknown field (did you mean")
  assert not os.path.exists(tmp_path / "w")


def test_readme_error_examples_are_what_the_cli_prints(cli, tmp_path):
  """The README's example errors ("a bad config" row, multiple devices) are printed as
  written, each by the command line that makes it."""
  row = next(l for l in README.splitlines() if l.startswith("| a bad config |"))
  examples = re.findall(r"`(config\.[^`]+)`", row)
  examples += re.findall(r"`(config\.batch_size: 36 [^`]+)`", README)
  assert len(examples) == 4, examples
  made_by = {"config.lns.rhoo": "--config.lns.rhoo=1", "config.rho": "--config.rho=(0.6,0.5)",
             "config.batch_size: 12": "--config.batch_size=12",
             "config.batch_size: 36": "--config.batch_size=36"}
  for example in examples:
    flag = next(v for k, v in made_by.items() if example.startswith(k))
    # The README's examples are a machine with 8 devices (the suite runs on 2).
    r = cli.run("train.py", f"--config={SMOKE}", f"--workdir={tmp_path}/w", flag,
                env={"XLA_FLAGS": xla_flags(8)})
    line = assert_one_error_line(r)
    assert line.removeprefix("error: ").startswith(example), (example, line)


def test_rho_is_a_number_or_a_pair_in_python_too():
  """config.rho takes a pair in a config file or the Python API as well (typed object)."""
  from lns_jax import config as config_lib
  from lns_testutil import smoke_config
  c = smoke_config()
  c.rho = (0.01, 0.002)  # a locked config: no ignore_type needed
  config_lib.validate(c)
  c.rho = 0.02
  config_lib.validate(c)
  with pytest.raises(config_lib.ConfigError, match=r"^config.rho: True must be a number"):
    c.rho = True  # what a bare --config.rho gives
    config_lib.validate(c)


# ------------------------------------------------------------------ README commands


def _readme_commands():
  """Every command line of the README and docs/*.md: code blocks, indented ones, and the
  backticked ``--config.*`` overrides (applied to the default command). README.md comes
  first, so its commands are the ones found first."""
  cmds = []
  for line in README.splitlines():
    line = line.split("  #")[0].strip()
    if "coordinator_address" in line or line.endswith("\\"):
      continue  # the multi-host lines: tests/test_multihost.py runs them
    m = re.search(r"(?:^|&& )(?:\.venv/bin/)?python (train\.py .*|-m lns_jax\.\w+ .*)$", line)
    if m:
      cmds.append(m.group(1).replace("[--packed]", "").strip())
  default = "train.py --config=configs/fashion_mnist_r20.py --workdir=workdirs/fmnist"
  for override in re.findall(r"`(--config\.[^`]+)`", README):
    cmds.append(f"{default} {override}")
  return sorted(set(cmds), key=cmds.index)


README_COMMANDS = _readme_commands()


def _argv(cmd, tmp):
  return [a.replace("workdirs/", f"{tmp}/workdirs/").replace("fmnist.npz", f"{tmp}/fmnist.npz")
          for a in shlex.split(cmd)]


def _expected(args):
  out = {}
  for a in args:
    m = re.match(r"^--config\.([\w.]+)=(.*)$", a)
    if m:
      text = m.group(2)
      try:
        value = ast.literal_eval(text)
      except (ValueError, SyntaxError):
        # absl's boolean spellings, as ml_collections parses them for bool fields
        value = {"true": True, "false": False}.get(text.lower(), text)
      out[m.group(1)] = list(value) if isinstance(value, tuple) else value
  return out


def test_readme_lists_the_commands_this_suite_types():
  train = [c for c in README_COMMANDS if c.startswith("train.py")]
  assert len(train) >= 9 and any("rho='(0.01,0.002)'" in c for c in train), README_COMMANDS
  assert {c.split()[1] for c in README_COMMANDS if c.startswith("-m")} >= {
      "lns_jax.summary", "lns_jax.export", "lns_jax.inference", "lns_jax.plots"}


@pytest.mark.parametrize("cmd", [c for c in README_COMMANDS if c.startswith("train.py")])
def test_readme_train_command_parses_and_validates_as_typed(cli, tmp_path, cmd):
  """Each README ``train.py`` command, exactly as typed, stopped right after validation
  (the ImageNet and CIFAR-10 data are not on this machine; their configs train under
  mock data in test_configs_run.py): exit 0, every override in the config."""
  args = _argv(cmd, tmp_path)
  r = cli.run(*args, stop_after_validation=True)
  assert r["rc"] == 0 and "error" not in r["stderr"], r
  for dotted, value in _expected(args[1:]).items():
    node = r["config"]
    for part in dotted.split("."):
      node = node[part]
    assert node == value, (dotted, node, value)


@pytest.mark.parametrize("cmd", [c for c in README_COMMANDS if c.startswith("-m lns_jax.ablation")])
def test_readme_ablation_command_plans_as_typed(cli, tmp_path, cmd):
  """Each ablation command of the README and docs/, as typed plus ``--dry_run``: every
  run's config validates, the plan has a row per seed and per sweep point, nothing is
  written (the runs themselves: tests/test_ablation.py at smoke size)."""
  args = _argv(cmd, tmp_path)
  r = cli.run(args[1], *args[2:], "--dry_run", timeout=300)
  assert r["rc"] == 0 and "dry run:" in r["stdout"], r
  assert not (tmp_path / "workdirs").exists()
  out = r["stdout"]
  flag = lambda name, default: next((a.split("=", 1)[1] for a in args if a.startswith(
      f"--{name}=")), default)  # noqa: E731
  seeds = int(flag("seeds", "3"))
  assert f"finetune seed {seeds - 1}:" in out and f"finetune seed {seeds}:" not in out, out
  config_alpha, config_rho = 1.0, 0.005  # every fashion_mnist_r20.py reading
  for value in filter(None, flag("alphas", "").split(",")):
    if float(value) not in (0.0, config_alpha):
      assert f"lns_alpha{float(value):g} seed 0:" in out, (value, out)
  for value in filter(None, flag("rhos", "").split(",")):
    if float(value) != config_rho:
      assert f"lns_rho{float(value):g} seed 0:" in out, (value, out)
  if "--baseline=" in cmd:
    assert "baseline: reused; missing" in out, out
  for name in filter(None, flag("baselines", "").split(",")):  # each baseline's own plan
    assert f"[ablation] baseline {name}: " in out and f"{name}/finetune/seed0" in out, out
  for row in filter(None, flag("extra_rows", "").split(",")):
    if row.startswith("finetune_"):  # the controls' rows are named as the flag's
      assert f"{row} seed {seeds - 1}:" in out, (row, out)


# The smoke size of a README fashion_mnist command: a tiny ResNet, 64 images, 1-2 steps a
# stage (the README's flags come first, these after them).
SMOKE_SIZE = ["--config.model.name=resnet_tiny", "--config.batch_size=32",
              "--config.optimizer=sgd", "--config.data.train_examples=64",
              "--config.data.eval_examples=32", "--config.pretrain.epochs=1",
              "--config.warmup.epochs=0.5", "--config.lns.epochs=0.5",
              "--config.finetune.epochs=0.5", "--config.log_every_steps=1",
              "--config.checkpoint_every_steps=1"]


def test_readme_commands_run_at_smoke_size(cli, tmp_path):
  """The README's Fashion-MNIST commands really run, at smoke size (their flags plus
  SMOKE_SIZE): the default three stages with the asymmetric-noise and frozen-label
  overrides, then summary, export, inference and plots on that run. The other train.py
  commands and overrides (the fine-tuning ablation, `--config.alpha=0`, the CIFAR-10
  and ImageNet configs) are parsed and validated above, and trained by the Python API
  in test_train.py and test_configs_run.py; `--packed` inference in test_export.py."""
  find = lambda text: next(c for c in README_COMMANDS if text in c)  # noqa: E731
  run = tmp_path / "workdirs" / "fmnist"
  main = (_argv(find("train.py --config=configs/fashion_mnist_r20.py --workdir"), tmp_path)
          + [a for c in ("rho=", "labels=") for a in _argv(find(c), tmp_path)[3:]])
  assert "--config.rho=(0.01,0.002)" in main
  r = cli.run(*main, *SMOKE_SIZE, timeout=600)
  assert r["rc"] == 0, r["stderr"][-3000:]
  meta = json.load(open(run / "lns" / "result.json"))
  assert meta["steps"] == 1
  config = json.load(open(run / "config.json"))
  assert config["rho"] == [0.01, 0.002] and config["labels"] == "pretrained"

  for key in ("-m lns_jax.summary", "-m lns_jax.plots"):
    args = _argv(find(key), tmp_path)
    r = cli.run(args[1], *args[2:])
    assert r["rc"] == 0 and r["stdout"], r
  export = _argv(find("-m lns_jax.export"), tmp_path)
  r = cli.run(export[1], *export[2:])
  assert r["rc"] == 0 and os.path.exists(tmp_path / "fmnist.npz"), r
  from lns_jax import export as export_lib
  header = export_lib.read_file(str(tmp_path / "fmnist.npz"))[0]
  assert header["source"]["stage"] == "lns" and "(stage lns," in r["stdout"], r
  # The size it prints is the one lns_jax.summary computes, stored in the file's header.
  assert "summary memory:  " in r["stdout"], r
  assert f"{header['summary']['memory_mbit']:.4f} Mbit" in r["stdout"], r
  infer = _argv(find("-m lns_jax.inference"), tmp_path)
  r = cli.run(infer[1], *infer[2:])
  assert r["rc"] == 0 and "test: top-1" in r["stdout"], r
  r = cli.run(infer[1], *infer[2:], "--split=validation")  # the run kept no validation split
  assert_one_error_line(r, "--split=validation: not a split of this config; use one of train, "
                           "test")


# ------------------------------------------------------------------- a full disk


def _mount_tmpfs(path, size):
  path.mkdir()
  r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                     capture_output=True, text=True)
  return r.returncode == 0, r.stderr.strip()


def test_full_disk_for_real_fails_at_a_save_then_resumes(tmp_path):
  """The workdir on a small tmpfs: after the first checkpoint the disk is filled; the
  run stops with one line naming the step, the checkpoint before it restores, and the
  same command finishes once space is freed. Skipped where mounting is not allowed."""
  disk = tmp_path / "disk"
  ok, why = _mount_tmpfs(disk, "48m")
  if not ok:
    pytest.skip(f"cannot mount a tmpfs here ({why or 'not root'}); "
                "test_robustness.py simulates the full disk instead")
  try:
    workdir = disk / "run"
    cmd = [sys.executable, "train.py", *SMOKE_FLAGS, "--config.stages=pretrain",
           # full_run's pretrain (2 epochs): its train step is a compile-cache hit.
           "--config.pretrain.epochs=2", "--config.data.eval_examples=32",
           f"--workdir={workdir}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    ckdir = workdir / "pretrain" / "checkpoints"
    t0 = time.time()
    while not (ckdir.is_dir() and any(d.isdigit() for d in os.listdir(ckdir))):
      assert proc.poll() is None, proc.communicate()
      assert time.time() - t0 < 300, "no checkpoint within 300 s"
      time.sleep(0.02)
    proc.send_signal(signal.SIGSTOP)  # hold the run while the disk fills up
    first = max(int(d) for d in os.listdir(ckdir) if d.isdigit())
    ballast = disk / "ballast"
    fd = os.open(ballast, os.O_WRONLY | os.O_CREAT)
    for chunk in (1 << 20, 4096, 1):  # up to the last byte
      try:
        while True:
          os.write(fd, b"\0" * chunk)
      except OSError:
        pass
    os.close(fd)
    proc.send_signal(signal.SIGCONT)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2, out + err
    assert "Traceback" not in out + err
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: ") and "No space left on device" in line, err
    kept = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    assert kept and kept[-1] >= first
    # A failed save names its step and the kept one; a log write that fails first (a
    # tmpfs may still take a few bytes into a partly used page) names the kept one.
    assert (re.search(rf"saving the checkpoint of step \d+ .* previous checkpoint "
                      rf"\(step {kept[-1]}\) is kept", line) or
            f"Kept checkpoints: pretrain step {kept[-1]}." in line), (line, kept)
    # The newest kept checkpoint restores.
    from lns_jax import checkpoint as ckpt_lib
    assert ckpt_lib.load_variables(str(ckdir / str(kept[-1])))["params"]
    # Free space; the same command resumes from it and finishes.
    os.remove(ballast)
    r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"resuming from step {kept[-1]}" in r.stdout, r.stdout
    assert os.path.exists(workdir / "pretrain" / "result.json")
  finally:
    if "proc" in locals() and proc.poll() is None:
      proc.kill()
    subprocess.run(["umount", "-l", str(disk)], check=False)
    shutil.rmtree(disk, ignore_errors=True)
