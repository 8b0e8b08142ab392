"""The XLA:CPU options the trainer compiles with (parallel.compiler_options): what they
change in the compiled program, the fallback when a jaxlib refuses them, and
benchmarks/train_step.py --cpu_options as typed."""

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lns_testutil import ROOT

from lns_jax import parallel

pytestmark = pytest.mark.skipif(jax.default_backend() != "cpu", reason="XLA:CPU options")

YNN = "__ynn_fusion"


def _hlo(fn, *args, options=None):
  return jax.jit(fn, compiler_options=options).lower(*args).compile().as_text()


def _weight_grad(x, g):
  """The weight gradient of a 3x3 SAME conv (a conv whose window is the feature map)."""
  w = jnp.zeros((3, 3, x.shape[-1], g.shape[-1]), x.dtype)
  conv = lambda w_: lax.conv_general_dilated(x, w_, (1, 1), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return jax.vjp(conv, w)[1](g)[0]


def _ynn_fusions_holding(hlo, op):
  """How many YNNPACK fusion computations contain an instruction ``op``."""
  n = 0
  for block in hlo.split("\n\n"):
    if f" {op}(" in block and block.lstrip().startswith("%fused_computation"):
      name = block.split()[0]
      n += f"calls={name}," in hlo and YNN in hlo.split(f"calls={name},")[1].split("\n")[0]
  return n


def test_compiler_options_carry_the_cpu_options(monkeypatch):
  monkeypatch.delenv("LNS_FAST_COMPILE", raising=False)
  monkeypatch.delenv("LNS_XLA_CPU_DEFAULTS", raising=False)
  assert parallel.compiler_options() == parallel.CPU_OPTIONS
  fast = parallel.compiler_options(fast=True)
  assert fast["xla_backend_optimization_level"] == 0
  assert fast["xla_cpu_experimental_ynn_fusion_type"] == (
      parallel.CPU_OPTIONS["xla_cpu_experimental_ynn_fusion_type"])
  assert parallel.compiler_options(cpu=False) is None
  monkeypatch.setenv("LNS_XLA_CPU_DEFAULTS", "1")
  assert parallel.compiler_options() is None
  assert "xla_cpu_experimental_ynn_fusion_type" not in parallel.compiler_options(fast=True)


def test_the_options_move_convs_off_ynnpack_and_keep_reductions_whole(monkeypatch):
  """What the speed-up rests on (benchmarks/train_step.py --cpu_options): with XLA's
  defaults the weight-gradient conv is a YNNPACK fusion; with the project's options it
  is XLA's own conv, while dots and a BatchNorm-sized reduction stay in YNNPACK (without
  REDUCE listed XLA splits the reduction into reduce-windows)."""
  monkeypatch.delenv("LNS_XLA_CPU_DEFAULTS", raising=False)
  opts = parallel.cpu_options()
  assert opts == parallel.CPU_OPTIONS
  x = jnp.ones((8, 16, 16, 16), jnp.float32)
  g = jnp.ones((8, 16, 16, 32), jnp.float32)
  default, ours = _hlo(_weight_grad, x, g), _hlo(_weight_grad, x, g, options=opts)
  assert _ynn_fusions_holding(default, "convolution") == 1
  assert _ynn_fusions_holding(ours, "convolution") == 0 and " convolution(" in ours
  a = jnp.ones((64, 64), jnp.float32)
  assert _ynn_fusions_holding(_hlo(jnp.dot, a, a, options=opts), "dot") == 1
  big = jnp.ones((128, 32, 32, 16), jnp.float32)
  mean = lambda v: jnp.mean(v, axis=(0, 1, 2))
  reduced = _hlo(mean, big, options=opts)
  assert "reduce-window(" not in reduced and _ynn_fusions_holding(reduced, "reduce") == 1
  only_dot = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}
  assert "reduce-window(" in _hlo(mean, big, options=only_dot)
  # Same numbers either way (to float rounding).
  rng = np.random.default_rng(0)
  xr = rng.standard_normal(x.shape).astype(np.float32)
  gr = rng.standard_normal(g.shape).astype(np.float32)
  np.testing.assert_allclose(jax.jit(_weight_grad, compiler_options=opts)(xr, gr),
                             jax.jit(_weight_grad)(xr, gr), rtol=1e-4, atol=1e-4)


def test_a_refused_option_falls_back_to_the_defaults_with_one_line(monkeypatch, capsys):
  monkeypatch.delenv("LNS_XLA_CPU_DEFAULTS", raising=False)
  monkeypatch.setattr(parallel, "CPU_OPTIONS",
                      {"xla_cpu_experimental_ynn_fusion_type": "NOT_A_FUSION_TYPE"})
  monkeypatch.setattr(parallel, "_cpu_options_ok", None)
  assert parallel.cpu_options() == {}
  out = capsys.readouterr().out
  assert out.count("\n") == 1 and "compiling with XLA's defaults" in out
  monkeypatch.setattr(parallel, "_cpu_options_ok", None)  # the next test probes afresh


BENCH = [sys.executable, "benchmarks/train_step.py", "--r20_batch=8", "--fmnist_batch=0",
         "--skip_r18", "--skip_input", "--conv=packed"]


def test_train_step_benchmark_prints_a_row_per_option_set_and_dtype():
  """docs/performance.md's benchmark command with --cpu_options, --dtype and --peak_tflops, at smoke
  size (one timed step of each row)."""
  r = subprocess.run(BENCH + ["--steps=1", "--stages=pretrain", "--cpu_options=project,default",
                              "--dtype=float32,bfloat16", "--peak_tflops=float32=0.002"],
                     cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [l.split("|") for l in r.stdout.splitlines() if l.startswith("| resnet20")]
  cells = [[c.strip() for c in row] for row in rows]
  assert [(c[4], c[6], c[7]) for c in cells] == [
      ("baseline (sign)", "float32", "project"), ("baseline (sign)", "bfloat16", "project"),
      ("baseline (sign)", "float32", "default"), ("baseline (sign)", "bfloat16", "default")]
  for c in cells:
    gflop, ms = float(c[10]), float(c[8].split()[0])
    assert gflop > 0 and ms > 0
    if c[6] == "float32":  # MFU: XLA's FLOPs over the step time and the given peak
      np.testing.assert_allclose(float(c[11].rstrip("%")), 100 * gflop / ms / 0.002, rtol=0.05)
    else:
      assert c[11] == "-"  # no peak given for bfloat16
  # vs float32: each bf16 row against its float32 row; vs default options likewise.
  assert cells[0][16] == "1.00x" and cells[1][16].endswith("x")
  assert cells[2][-2] == "1.00x" and cells[0][-2].endswith("x")
  assert "project compiler options: {'xla_cpu_experimental_ynn_fusion_type'" in r.stdout


def test_train_step_benchmark_reactnet_rows_show_why_its_config_trains_with_bits(cli):
  """docs/performance.md's ReActNet-20 command, compile only: its rows, and the measurement
  behind DECISIONS 26. XLA recomputes the packed forward's fused popcounts in each consumer
  of a ReActNet conv, so the packed step counts more FLOPs than the 'bits' one (XLA's
  forward); if a later XLA stops doing that, this fails and the config's 'bits' is worth
  measuring again."""
  r = cli.run_argv([sys.executable, "benchmarks/train_step.py", "--r20_batch=0",
                    "--fmnist_batch=0", "--reactnet_batch=2", "--skip_r18", "--skip_input",
                    "--steps=0", "--stages=pretrain", "--conv=bits,packed"], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  cells = [[c.strip() for c in l.split("|")] for l in r.stdout.splitlines()
           if l.startswith("| reactnet20")]
  assert [(c[2], c[3], c[5]) for c in cells] == [("28x28x1", "2", "bits"),
                                                 ("28x28x1", "2", "packed")]
  gflop = {c[5]: float(c[10]) for c in cells}
  assert gflop["packed"] > 1.1 * gflop["bits"] > 0, gflop


@pytest.mark.parametrize("flag,message", [
    ("--cpu_options=fastest", "--cpu_options takes project, default, got 'fastest'."),
    ("--stages=warmup", "--stages takes pretrain, lns, got 'warmup'."),
    ("--dtype=float16", "--dtype takes float32, bfloat16, got 'float16'."),
    ("--peak_tflops=fast", "--peak_tflops takes a number or dtype=number pairs, got 'fast'."),
    ("--peak_tflops=fp8=1", "--peak_tflops takes a number or dtype=number pairs, got 'fp8=1'."),
    ("--mapping_conv=xla,winograd", "--mapping_conv takes xla, winograd, auto, got "
                                    "'xla,winograd'.")])
def test_train_step_benchmark_refuses_bad_flags_with_one_line(cli, flag, message):
  r = cli.run(*BENCH[1:], "--steps=0", flag)
  assert r["rc"] != 0
  assert r["stderr"].strip() == message
  assert "| resnet20" not in r["stdout"]


# benchmarks/mapping.py: f_theta alone, XLA's conv against Winograd (config.mapping.conv).
def test_mapping_benchmark_prints_a_row_per_impl(cli):
  r = cli.run_argv([sys.executable, "benchmarks/mapping.py", "--steps=1"], timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  cells = [[c.strip() for c in l.split("|")[1:-1]] for l in r.stdout.splitlines()
           if l.startswith("| resnet20")]
  assert [c[:2] for c in cells] == [["resnet20, 18 LNS layers", "xla"],
                                    ["resnet20, 18 LNS layers", "winograd"]]
  xla, wino = (float(c[3]) for c in cells)
  assert 0 < wino < 0.7 * xla  # F(3x3, 3x3): about half the multiplies
  assert cells[0][5] == "1.00x" and cells[1][5].endswith("x")
  assert cells[0][6] == "0.0e+00" and float(cells[1][6]) < 1e-4


def test_mapping_benchmark_one_layer_per_channel_count():
  r = subprocess.run([sys.executable, "benchmarks/mapping.py", "--steps=1", "--channels=4,8",
                      "--impl=winograd"], cwd=ROOT, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, r.stderr[-3000:]
  labels = [l.split("|")[1].strip() for l in r.stdout.splitlines() if l.startswith("| one")]
  assert labels == ["one layer, 3x3x4x4", "one layer, 3x3x8x8"]


@pytest.mark.parametrize("flag,message", [
    ("--impl=fft", "--impl takes xla, winograd, auto, got 'fft'."),
    ("--model=vgg", "--model takes resnet20, resnet18, got 'vgg'."),
    ("--steps=0", "--steps must be at least 1, got 0."),
    ("--channels=64,x", "--channels takes positive integers, got '64,x'.")])
def test_mapping_benchmark_refuses_bad_flags_with_one_line(cli, flag, message):
  r = cli.run("benchmarks/mapping.py", flag)
  assert r["rc"] != 0 and r["stderr"].strip() == message
