"""What each stage is: one table, read by the config check, the optimizer and the step.

  name      weights  activations  objective            trains        network BatchNorm statistics
  pretrain  sign     binary       cross-entropy        everything    move
  warmup    lns      binary       Eq. 21 (CE + alpha)  f_theta only  frozen (DECISIONS.md 4)
  lns       lns      binary       Eq. 21 (Alg. 1)      everything    move
  finetune  sign     binary       cross-entropy        everything    move
  teacher   float    real         cross-entropy        everything    move  (standalone)
  step1     float    binary       cross-entropy        everything    move

``weights`` is the binarizer of every binary conv (``lns_jax.layers``). A stage that
trains only f_theta gives every other parameter a zero update
(:func:`lns_jax.optim.train_mapping_only`) and keeps the network's BatchNorm running
averages (:func:`lns_jax.binary.keep_network_stats`; it still normalises with batch
statistics, as in training); the mapping networks' own BatchNorm always moves.
``flips_from_latent``: the stage starts a fresh mapping on a trained network, so its
flip rates (Fig. 3c, DECISIONS.md 5) count from the baseline's ``sign(W)`` rather
than from the signs of the freshly initialised f_theta.

ReActNet's two-step training (Liu et al., ECCV 2020, Sec. 4.1) is ``step1`` (binary
activations, real-valued weights) then ``pretrain`` initialised from it (both binary:
the binary baseline), then ``warmup`` + ``lns`` or ``finetune``. ``teacher`` trains the
real-valued network of the same shape (real weights and activations) that
``config.distill`` distils from: it is ``standalone``, it starts from a fresh init and
its weights start no other stage (the next stage starts from what the stage before the
teacher left, or from ``config.init_from``). Every stage may distil (:mod:`lns_jax.distill`).
The two new rows are last, so the earlier stages keep their random seeds.
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Iterable


@dataclasses.dataclass(frozen=True)
class Stage:
  name: str
  weights: str               # 'sign' | 'lns': the binary convs' weight binarizer
  noisy_supervision: bool    # the objective is Eq. 21 (alpha * Eq. 15 terms), else CE
  trains_only_mapping: bool  # only f_theta (and its BatchNorm) trains
  network_bn_moves: bool     # the network's BatchNorm running statistics are updated
  flips_from_latent: bool    # flip rates start from sign(W) of the starting weights
  activations: str = "binary"  # 'binary' (config.model.input_binarizer) | 'real' (none)
  standalone: bool = False     # starts fresh; its weights start no other stage (a teacher)


TABLE = (
    Stage("pretrain", "sign", noisy_supervision=False, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False),
    Stage("warmup", "lns", noisy_supervision=True, trains_only_mapping=True,
          network_bn_moves=False, flips_from_latent=True),
    Stage("lns", "lns", noisy_supervision=True, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False),
    Stage("finetune", "sign", noisy_supervision=False, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False),
    Stage("teacher", "float", noisy_supervision=False, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False, activations="real",
          standalone=True),
    Stage("step1", "float", noisy_supervision=False, trains_only_mapping=False,
          network_bn_moves=True, flips_from_latent=False),
)
STAGES: Dict[str, Stage] = {s.name: s for s in TABLE}
NAMES = tuple(STAGES)


def chained(names: Iterable[str]) -> list:
  """The stages of ``names`` that start one from another (the standalone ones left out)."""
  return [n for n in names if not STAGES[n].standalone]


def get(name: str) -> Stage:
  if name not in STAGES:
    raise ValueError(f"unknown stage {name!r}; stages are {', '.join(NAMES)}.")
  return STAGES[name]
