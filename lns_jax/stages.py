"""What each stage is: one table, read by the config check, the optimizer and the step.

  name      weights  objective            trains        network BatchNorm statistics
  pretrain  sign     cross-entropy        everything    move
  warmup    lns      Eq. 21 (CE + alpha)  f_theta only  frozen (DECISIONS.md 4)
  lns       lns      Eq. 21 (Alg. 1)      everything    move
  finetune  sign     cross-entropy        everything    move

``weights`` is the binarizer of every binary conv (``lns_jax.layers``). A stage that
trains only f_theta gives every other parameter a zero update
(:func:`lns_jax.optim.train_mapping_only`) and keeps the network's BatchNorm running
averages (:func:`lns_jax.binary.keep_network_stats`; it still normalises with batch
statistics, as in training); the mapping networks' own BatchNorm always moves.
``flips_from_latent``: the stage starts a fresh mapping on a trained network, so its
flip rates (Fig. 3c, DECISIONS.md 5) count from the baseline's ``sign(W)`` rather
than from the signs of the freshly initialised f_theta.
"""

from __future__ import annotations

import dataclasses
from typing import Dict


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  weights: str               # 'sign' | 'lns': the binary convs' weight binarizer
  noisy_supervision: bool    # the objective is Eq. 21 (alpha * Eq. 15 terms), else CE
  trains_only_mapping: bool  # only f_theta (and its BatchNorm) trains
  network_bn_moves: bool     # the network's BatchNorm running statistics are updated
  flips_from_latent: bool    # flip rates start from sign(W) of the starting weights


TABLE = (
    Stage("pretrain", "sign", noisy_supervision=False, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False),
    Stage("warmup", "lns", noisy_supervision=True, trains_only_mapping=True,
          network_bn_moves=False, flips_from_latent=True),
    Stage("lns", "lns", noisy_supervision=True, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False),
    Stage("finetune", "sign", noisy_supervision=False, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False),
)
STAGES: Dict[str, Stage] = {s.name: s for s in TABLE}
NAMES = tuple(STAGES)


def get(name: str) -> Stage:
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}.")
  return STAGES[name]
