"""lns_jax.summary: per-layer counts by hand, the paper's Table 3 / Table 5 totals, the CLI."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from lns_jax import summary
from lns_jax.models import get_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_expected(weight_scale):
  """resnet_tiny (one block a stage, width 4) on 16x16x1, 10 classes, counted by hand.

  Rows: (name, type, kernel shape or channels, output positions, binary?).
  SAME 3x3 convs keep 16x16; the first conv of stages 2 and 3 has stride 2 (8x8, 4x4),
  as do the 1x1 downsample shortcuts (full precision). The head is Dense(16 -> 10).
  """
  conv = lambda name, k, hw, binary: (name, "BinaryConv" if binary else "Conv", k, hw, binary)
  bn = lambda name, c: (name, "BatchNorm", c, 0, False)
  return [
      conv("conv_init", (3, 3, 1, 4), 16 * 16, False), bn("bn_init", 4),
      conv("stage1_block1/conv1", (3, 3, 4, 4), 16 * 16, True), bn("stage1_block1/bn1", 4),
      conv("stage1_block1/conv2", (3, 3, 4, 4), 16 * 16, True), bn("stage1_block1/bn2", 4),
      conv("stage2_block1/conv1", (3, 3, 4, 8), 8 * 8, True), bn("stage2_block1/bn1", 8),
      conv("stage2_block1/conv2", (3, 3, 8, 8), 8 * 8, True), bn("stage2_block1/bn2", 8),
      conv("stage2_block1/downsample_conv", (1, 1, 4, 8), 8 * 8, False),
      bn("stage2_block1/downsample_bn", 8),
      conv("stage3_block1/conv1", (3, 3, 8, 16), 4 * 4, True), bn("stage3_block1/bn1", 16),
      conv("stage3_block1/conv2", (3, 3, 16, 16), 4 * 4, True), bn("stage3_block1/bn2", 16),
      conv("stage3_block1/downsample_conv", (1, 1, 8, 16), 4 * 4, False),
      bn("stage3_block1/downsample_bn", 16),
      ("head", "Dense", (16, 10), 1, False),
  ]


@pytest.mark.parametrize("weight_scale", ["layer", "channel"])
def test_tiny_model_per_layer_by_hand(weight_scale):
  model = get_model("resnet_tiny", num_classes=10, weight_binarizer="sign",
                    input_binarizer="ste_sign", weight_scale=weight_scale)
  s = summary.summarize_model(model, (16, 16, 1))
  rows = {l.name: l for l in s.layers}
  expected = _tiny_expected(weight_scale)
  assert list(rows) == [e[0] for e in expected]
  tot_bits = tot_flops = tot_fp_bits = tot_fp_flops = 0
  for name, typ, shape, hw, binary in expected:
    l = rows[name]
    assert l.type == typ, name
    if typ == "BatchNorm":  # scale, bias, running mean, running variance
      params, bits, macs = 4 * shape, 32 * 4 * shape, 0
      fp_params = params
      assert (l.weight_bits, l.act_bits) == (32, 32)
    elif typ == "Dense":
      fp_params = params = int(np.prod(shape)) + shape[1]  # kernel + bias
      bits, macs = 32 * params, int(np.prod(shape))
    else:
      n = int(np.prod(shape))
      macs = hw * n
      fp_params = n
      if binary:
        scales = 1 if weight_scale == "layer" else shape[-1]
        params, bits = n + scales, n * 1 + 32 * scales
        assert (l.weight_bits, l.act_bits) == (1, 1), name
      else:
        params, bits = n, 32 * n
    flops = macs / 64 if binary else macs
    assert l.params == params, name
    assert l.memory_bits == bits, name
    assert l.flops == pytest.approx(flops), name
    assert l.binary_macs == (macs if binary else 0), name
    assert l.fp_memory_bits == 32 * fp_params and l.fp_macs == macs, name
    tot_bits += bits; tot_flops += flops; tot_fp_bits += 32 * fp_params; tot_fp_flops += macs
  t = s.total()
  assert t["memory_bits"] == tot_bits
  assert t["memory_mbit"] == pytest.approx(tot_bits / 1e6)
  assert t["flops"] == pytest.approx(tot_flops)
  assert t["fp_memory_bits"] == tot_fp_bits and t["fp_flops"] == tot_fp_flops
  # Spot check of the arithmetic: stage 1's binary conv, 16*16 positions x 144 weights / 64.
  assert rows["stage1_block1/conv1"].flops == 16 * 16 * 144 / 64


def test_mapping_networks_not_counted():
  """The LNS model's mapping networks are training machinery: same count as 'sign'."""
  kw = dict(num_classes=10, input_binarizer="ste_sign", weight_scale="layer")
  sign = summary.summarize_model(get_model("resnet_tiny", weight_binarizer="sign", **kw),
                                 (16, 16, 1)).total()
  # summarize() always counts the sign model; summarizing an 'lns' model directly would
  # add the mappings' parameters, which is what we must not report.
  lns = summary.summarize_model(get_model("resnet_tiny", weight_binarizer="lns", **kw),
                                (16, 16, 1)).total()
  assert lns["params"] > sign["params"]
  cfg = _config("fashion_mnist_r20", "smoke")
  cfg.data.image_size = 16
  assert summary.summarize(cfg).total()["memory_bits"] == sign["memory_bits"]


def _config(name, arg=""):
  import importlib.util
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def test_dorefa_resnet18_of_table4():
  t = summary.summarize(_config("imagenet_r18", "dorefa")).total()
  # The same binary 3x3 convs as Bi-Real's; 32-bit numbers: stem 9408 + shortcuts
  # 8192+32768+131072 (1x1 stride 2, no pooling) + fc 513000 + BN (stem 128 + 16 convs'
  # 2*(64*4 + 128*4 + 256*4 + 512*4) + shortcuts 2*(128+256+512)) * 2 (mean, var too)
  # = 4*(64 + 3840 + 896) = 19,200, + 16 layer-wise scales = 713,656; no PReLU.
  assert t["binary_params"] == 10_985_472
  assert t["real_params"] == 9408 + 8192 + 32768 + 131072 + 513_000 + 19_200 + 16
  assert t["binary_macs"] == 1_676_279_808
  # The shortcuts are 1x1 stride-2 convs on the block input: 56->28, 28->14, 14->7.
  assert t["real_macs"] == 118_013_952 + 28 * 28 * 64 * 128 + 14 * 14 * 128 * 256 + (
      7 * 7 * 256 * 512) + 512_000
  assert t["memory_mbit"] == pytest.approx(34, rel=0.01)  # paper Table 3's DoReFa row: 34
  assert t["flops"] == pytest.approx(163e6, rel=0.01)


def test_resnet18_matches_table3():
  t = summary.summarize(_config("imagenet_r18")).total()
  # By hand (Bi-Real ResNet-18, 224x224): binary 3x3 convs 64..512 wide:
  #   4*36864 + (73728 + 3*147456) + (294912 + 3*589824) + (1179648 + 3*2359296) = 10,985,472
  # 32-bit numbers: stem 9408 + shortcuts 8192+32768+131072 + fc 513000 + BN 4*4800
  #   + PReLU 3840 + per-channel scales 3840 = 721,320
  assert t["binary_params"] == 10_985_472
  assert t["real_params"] == 721_320
  assert t["memory_bits"] == 10_985_472 + 32 * 721_320  # 34.07 Mbit
  # MACs: binary convs 1,676,279,808; real: stem 118,013,952 + shortcuts 3 x 6,422,528
  #   + fc 512,000 = 137,793,536.
  assert t["binary_macs"] == 1_676_279_808
  assert t["real_macs"] == 137_793_536
  # Paper Table 3: 34 Mbit, 163M FLOPs (LNS row); 374 Mbit, 1810M FLOPs (ResNet-18).
  assert round(t["memory_mbit"]) == 34
  assert t["memory_mbit"] == pytest.approx(34, rel=0.01)
  assert t["flops"] == pytest.approx(163e6, rel=0.01)  # 163.99M; 163.47M without the fc
  assert (t["flops"] - 512_000) / 1e6 == pytest.approx(163.47, abs=0.01)
  assert round(t["fp_memory_mbit"]) == 374
  assert t["fp_flops"] == pytest.approx(1810e6, rel=0.005)  # 1814M


def test_alexnet_matches_table5():
  t = summary.summarize(_config("imagenet_alexnet")).total()
  binary = [(5, 5, 96, 256), (3, 3, 256, 384), (3, 3, 384, 384), (3, 3, 384, 256),
            (9216, 4096), (4096, 4096)]
  n_binary = sum(int(np.prod(s)) for s in binary)
  fp_weights = 11 * 11 * 3 * 96 + 4096 * 1000  # conv1 (no bias), fc8 kernel
  bn = 4 * (96 + 256 + 384 + 384 + 256 + 4096 + 4096)
  assert t["binary_params"] == n_binary == 58_236_928
  assert t["memory_bits"] == n_binary + 32 * (fp_weights + 1000 + bn + 6)  # + fc8 bias, 6 scales
  # The paper's figures are the original two-tower AlexNet (conv2, conv4, conv5 in two
  # groups: half their weights), weights only, in units of 2^20 bits:
  grouped = n_binary - (5 * 5 * 48 * 256 + 3 * 3 * 192 * 384 + 3 * 3 * 192 * 256)
  assert round((grouped + 32 * fp_weights) / 2**20) == 180            # binary: 180 Mbit
  assert round(32 * (grouped + fp_weights) / 2**20) == 1860           # FP32: 1860 Mbit
  # Ours (single tower, with BN): within 2% / 3% of the paper in the same unit.
  assert t["memory_mibit"] == pytest.approx(180, rel=0.02)             # 182.8
  assert t["fp_memory_mibit"] == pytest.approx(1860, rel=0.03)         # 1904.5


def test_cli_json():
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, "-m", "lns_jax.summary", "--config=configs/fashion_mnist_r20.py:smoke",
       "--config.data.image_size=16", "--json"],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-2000:]
  d = json.loads(out.stdout)
  assert d["model"] == "resnet_tiny" and d["image_shape"] == [16, 16, 1]
  model = get_model("resnet_tiny", num_classes=10, weight_binarizer="sign",
                    input_binarizer="ste_sign", weight_scale="layer")
  t = summary.summarize_model(model, (16, 16, 1)).total()
  assert d["total"]["memory_mbit"] == pytest.approx(t["memory_mbit"])
  assert d["total"]["flops"] == pytest.approx(t["flops"])
  assert len(d["layers"]) == len(_tiny_expected("layer"))


def test_reactnet18_costs_by_hand():
  """ReActNet on Bi-Real ResNet-18 (configs/imagenet_reactnet.py): the same binary convs
  as Bi-Real's, its C -> 2C downsampling convs as two C -> C; no real-valued shortcut."""
  t = summary.summarize(_config("imagenet_reactnet")).total()
  assert t["binary_params"] == 10_985_472 and t["binary_macs"] == 1_676_279_808
  # 32-bit numbers: stem 9408 + fc 513000 + BN 4 x 3904 channels + per-channel scales
  #   3840 + RSign thresholds 3392 (the units' input channels) + RPReLU 3 x 3840.
  assert t["real_params"] == 9408 + 513_000 + 4 * 3904 + 3840 + 3392 + 3 * 3840 == 556_776
  assert t["memory_bits"] == 10_985_472 + 32 * 556_776  # 28.80 Mbit
  assert t["real_macs"] == 118_013_952 + 512_000  # stem and classifier only
