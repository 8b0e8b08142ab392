"""PyTorch peer of lns-jax's binary ResNet-20 train steps (baseline and LNS), for speed
comparisons only.

Not part of lns-jax and never one of its dependencies: run it from its own virtual
environment, e.g.

  python3 -m venv /tmp/torchvenv && /tmp/torchvenv/bin/pip install torch numpy
  /tmp/torchvenv/bin/python benchmarks/peers/torch_resnet20.py --steps=20

The same network and step as ``benchmarks/train_step.py``'s ResNet-20 ``pretrain`` row:
full-precision 3x3 stem, 1x1 downsample shortcuts and dense head; every other conv
binary (inputs: sign with the clipped straight-through estimator; weights: sign(W) times
mean|W| of the layer under no gradient, STE clipped at 1); BatchNorm after every conv;
cross-entropy; SGD with momentum 0.9; batch 128 of 32x32x3; eager mode (oneDNN).
``--lns``: the ``lns`` row instead (Eq. 21): every binary conv's weights are
``sign(q_hat) * mean|W|`` with ``q_hat = f_theta(W)``, f_theta the mapping network of
``lns_jax/mapping.py`` (3x3 convs c -> 2c -> 2c -> c over the layer's filters as a batch,
BatchNorm with the filters' statistics + ReLU after the first two), the gradient of
``sign(q_hat)`` clipped to [-1, 1] (``mapping.ste='clip_grad'``), and the loss
``CE + alpha * sum_i l~(q_hat_i, sign(W_i))`` (Eq. 15-16, rho 0.005, alpha 1).
Prints one JSON line: ms per step (median, min, max) and images/s.
"""

import argparse
import json
import statistics
import time

import torch
from torch import nn
import torch.nn.functional as F


class SteSign(torch.autograd.Function):
  """sign(x) (sign(0) = +1); gradient passed where |x| <= 1 (Eq. 3's clipped STE)."""

  @staticmethod
  def forward(ctx, x):
    ctx.save_for_backward(x)
    return torch.where(x >= 0, 1.0, -1.0).to(x.dtype)

  @staticmethod
  def backward(ctx, g):
    (x,) = ctx.saved_tensors
    return g * (x.abs() <= 1).to(g.dtype)


class SignClipGrad(torch.autograd.Function):
  """sign(q) (sign(0) = +1); the gradient's value clipped to [-1, 1], no window."""

  @staticmethod
  def forward(ctx, q):
    return torch.where(q >= 0, 1.0, -1.0).to(q.dtype)

  @staticmethod
  def backward(ctx, g):
    return g.clamp(-1.0, 1.0)


class FilterNorm(nn.Module):
  """BatchNorm over the layer's filters (always the batch statistics, as lns_jax)."""

  def __init__(self, c):
    super().__init__()
    self.scale = nn.Parameter(torch.ones(c))
    self.bias = nn.Parameter(torch.zeros(c))

  def forward(self, x):
    mean = x.mean(dim=(0, 2, 3), keepdim=True)
    var = (x * x).mean(dim=(0, 2, 3), keepdim=True) - mean * mean
    return ((x - mean) * torch.rsqrt(var.clamp_min(0) + 1e-5) * self.scale.view(1, -1, 1, 1)
            + self.bias.view(1, -1, 1, 1))


class MappingNet(nn.Module):
  """f_theta: an (out, in, k, k) kernel is a batch of `out` filter images of `in` channels."""

  def __init__(self, c):
    super().__init__()
    self.conv1 = nn.Conv2d(c, 2 * c, 3, 1, 1, bias=False)
    self.bn1 = FilterNorm(2 * c)
    self.conv2 = nn.Conv2d(2 * c, 2 * c, 3, 1, 1, bias=False)
    self.bn2 = FilterNorm(2 * c)
    self.conv3 = nn.Conv2d(2 * c, c, 3, 1, 1, bias=True)

  def forward(self, w):
    x = F.relu(self.bn1(self.conv1(w)))
    x = F.relu(self.bn2(self.conv2(x)))
    return self.conv3(x)


def lns_loss(q_hat, q_tilde, rho=0.005):
  """Eq. 15-16 with a symmetric rho: the mean of the unbiased squared error."""
  same, flip = (q_hat - q_tilde) ** 2, (q_hat + q_tilde) ** 2
  return (((1 - rho) * same - rho * flip) / (1 - 2 * rho)).mean()


PAIRS = []  # (q_hat, q_tilde) of this step's binary convs, for Eq. 21


class BinaryConv(nn.Conv2d):
  lns = False

  def forward(self, x):
    scale = self.weight.detach().abs().mean()
    if self.lns:
      q_hat = self.mapping(self.weight)
      PAIRS.append((q_hat, torch.where(self.weight.detach() >= 0, 1.0, -1.0)))
      w = SignClipGrad.apply(q_hat) * scale
    else:
      w = SteSign.apply(self.weight) * scale
    return F.conv2d(SteSign.apply(x), w, None, self.stride, self.padding)

  def enable_lns(self):
    self.lns = True
    self.mapping = MappingNet(self.in_channels)


class Block(nn.Module):
  def __init__(self, cin, cout, stride):
    super().__init__()
    self.conv1 = BinaryConv(cin, cout, 3, stride, 1, bias=False)
    self.bn1 = nn.BatchNorm2d(cout)
    self.conv2 = BinaryConv(cout, cout, 3, 1, 1, bias=False)
    self.bn2 = nn.BatchNorm2d(cout)
    self.down = None
    if stride != 1 or cin != cout:
      self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

  def forward(self, x):
    y = self.bn2(self.conv2(self.bn1(self.conv1(x))))
    return y + (x if self.down is None else self.down(x))


class ResNet20(nn.Module):
  def __init__(self, num_classes=10, width=16):
    super().__init__()
    self.stem = nn.Sequential(nn.Conv2d(3, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width))
    blocks, cin = [], width
    for i in range(3):
      for j in range(3):
        cout = width * 2**i
        blocks.append(Block(cin, cout, 2 if i > 0 and j == 0 else 1))
        cin = cout
    self.blocks = nn.Sequential(*blocks)
    self.head = nn.Linear(cin, num_classes)

  def forward(self, x):
    x = self.blocks(self.stem(x))
    return self.head(F.relu(x).mean(dim=(2, 3)))


def main():
  p = argparse.ArgumentParser()
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--batch", type=int, default=128)
  p.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0: default)")
  p.add_argument("--lns", action="store_true", help="the LNS step (Eq. 21) instead of the "
                                                     "baseline step")
  args = p.parse_args()
  if args.threads:
    torch.set_num_threads(args.threads)
  torch.manual_seed(0)
  model = ResNet20()
  if args.lns:
    for m in model.modules():
      if isinstance(m, BinaryConv):
        m.enable_lns()
  opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
  x = torch.randn(args.batch, 3, 32, 32)
  y = torch.randint(0, 10, (args.batch,))
  times = []
  for i in range(args.warmup + args.steps):
    t = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    PAIRS.clear()
    loss = F.cross_entropy(model(x), y)
    if args.lns:  # Eq. 21, alpha = 1
      loss = loss + sum(lns_loss(q_hat, q_tilde) for q_hat, q_tilde in PAIRS)
    loss.backward()
    opt.step()
    loss.item()  # wait for the step, as the JAX benchmark blocks on its result
    if i >= args.warmup:
      times.append(time.perf_counter() - t)
  ms = [1e3 * s for s in times]
  print(json.dumps({"peer": "pytorch-eager", "step": "lns" if args.lns else "baseline",
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(), "batch": args.batch,
                    "ms_median": round(statistics.median(ms), 1), "ms_min": round(min(ms), 1),
                    "ms_max": round(max(ms), 1),
                    "images_per_s": round(args.batch / statistics.median(times), 1)}))


if __name__ == "__main__":
  main()
