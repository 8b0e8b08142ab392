"""lns-jax: Training Binary Neural Networks through Learning with Noisy Supervision.

A JAX/Flax reimplementation of Han et al., ICML 2020. The pieces of the method are
pure functions and linen modules (decisions where the paper is silent: DECISIONS.md N):

  ste_sign, approx_sign, sign      Eq. 1-3 (quantizers)
  mapping_sign, sign_clip_grad     sign(q_hat) and its straight-through rule (DECISIONS.md 1)
  weight_scale, binarize_weights   the scale s of sign(W) * s (DECISIONS.md 2)
  lns_loss, check_rho              Eq. 15-17, Eq. 8-9 (loss)
  lns_objective, auxiliary_losses, cross_entropy    Eq. 21
  MappingNet, init_mapping, map_weights             Eq. 4, Sec. 4.1 (mapping)
  BinaryConv, conv2d, binary_weights                Eq. 2-4 with 'float' | 'sign' | 'lns' weights

and what the trainer does, for LNS in one's own model (README, "LNS in your own model"):

  collect_pairs        {layer: (q_hat, q_tilde)} from model.apply's 'lns' updates (Eq. 21's input)
  train_mapping_only   the warm start's optimizer: only f_theta trains (DECISIONS.md 4)
  keep_network_stats   the warm start's BatchNorm rule: the network's running averages kept
  from_baseline        an LNS model's variables started from a 'sign' baseline's

Every function computes in float (integer inputs are cast to float32); the
straight-through functions are reverse-mode only (``custom_vjp``) and take ``clip`` static.
"""

from lns_jax.binary import collect_pairs, from_baseline, keep_network_stats
from lns_jax.layers import BinaryConv, LNS_COLLECTION, binary_weights, conv2d
from lns_jax.loss import (auxiliary_losses, check_rho, cross_entropy, lns_loss,
                          lns_objective)
from lns_jax.mapping import MappingNet, init_mapping, map_weights
from lns_jax.optim import train_mapping_only
from lns_jax.quantizers import (approx_sign, binarize_weights, mapping_sign, sign,
                                sign_clip_grad, ste_sign, weight_scale)

__version__ = "0.1.0"

__all__ = [
    "BinaryConv", "LNS_COLLECTION", "MappingNet", "approx_sign", "auxiliary_losses",
    "binarize_weights", "binary_weights", "check_rho", "collect_pairs", "conv2d",
    "cross_entropy", "from_baseline", "init_mapping", "keep_network_stats", "lns_loss",
    "lns_objective", "map_weights", "mapping_sign", "sign", "sign_clip_grad", "ste_sign",
    "train_mapping_only", "weight_scale",
]
