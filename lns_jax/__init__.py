"""lns-jax: Training Binary Neural Networks through Learning with Noisy Supervision.

A JAX/Flax reimplementation of Han et al., ICML 2020. The pieces of the method are
pure functions and linen modules:

  ste_sign, approx_sign, sign      Eq. 1-3 (quantizers)
  mapping_sign, sign_clip_grad     sign(q_hat) and its straight-through rule (DECISIONS.md 1)
  weight_scale, binarize_weights   DESIGN decision 2
  lns_loss                         Eq. 15-17 (loss)
  lns_objective                    Eq. 21
  MappingNet, map_weights          Eq. 4, Sec. 4.1 (mapping)
  BinaryConv                       Eq. 2-4 with 'float' | 'sign' | 'lns' weights
"""

from lns_jax.layers import BinaryConv, LNS_COLLECTION, binary_weights, conv2d
from lns_jax.loss import (auxiliary_losses, check_rho, cross_entropy, lns_loss,
                          lns_objective)
from lns_jax.mapping import MappingNet, init_mapping, map_weights
from lns_jax.quantizers import (approx_sign, binarize_weights, mapping_sign, sign,
                                sign_clip_grad, ste_sign, weight_scale)

__version__ = "0.1.0"

__all__ = [
    "BinaryConv", "LNS_COLLECTION", "MappingNet", "approx_sign", "auxiliary_losses",
    "binarize_weights", "binary_weights", "check_rho", "conv2d", "cross_entropy",
    "init_mapping", "lns_loss", "lns_objective", "map_weights", "mapping_sign", "sign",
    "sign_clip_grad", "ste_sign", "weight_scale",
]
