"""The paper's Table 1 ablation as one command, across seeds (Sec. 4.2, Fig. 3-5), and
across baselines of several strengths.

  python -m lns_jax.ablation --config=configs/fashion_mnist_r20.py:val --workdir=DIR --seeds=3
  python -m lns_jax.ablation ... --alphas=0,0.1,1,10 --rhos=0,0.005,0.05     # Fig. 4 / Fig. 5
  python -m lns_jax.ablation ... --extra_rows=alpha0_cewarm,other_reduction
  python -m lns_jax.ablation ... --extra_rows=finetune_lr10x,finetune_matched  # the controls
  python -m lns_jax.ablation ... --alphas=0,0.1,1 --variants=lns_alpha0.1  # just those rows
  python -m lns_jax.ablation ... --baselines=sgd12,sgd48,adam12   # Table 1 from each baseline
  python -m lns_jax.ablation ... --dry_run      # the plan and each run's state; writes nothing

The baseline is pretrained once (``DIR/baseline``, or reused with ``--baseline=PATH``);
then, from that same baseline and for each seed, three variants with the same epochs,
schedule and batch (``finetune`` runs with ``config.lns``'s epochs and schedule):

  finetune     continue the baseline with sign(W), cross-entropy;
  lns_alpha0   warmup + lns with alpha = 0 in the LNS stage ("w/o noisy supervision"),
               after the same warm start as ``lns`` (f_theta fitted to sign(W) with
               the warm start's alpha: the paper's reading, DECISIONS 17);
  lns          warmup + lns with the config's alpha and rho;

plus ``lns_alpha<a>`` / ``lns_rho<r>`` for the sweeps (the LNS stage's alpha or rho;
every LNS row has the same warm start's alpha), and with ``--extra_rows``:

  lns_alpha0_cewarm   alpha = 0 in the warm start too (the earlier reading: f_theta
                      warmed up with cross-entropy alone from its random init);
  lns_<reduction>     lns with the other reduction of Eq. 15 (``sum``, Eq. 17, or
                      ``mean``, Eq. 16) than the config's;
  finetune_lr10x      fine-tuning from 10x the LNS stage's lr (it moves more signs);
  finetune_matched    fine-tuning for the warm start's and the LNS stage's epochs
                      together, on the LNS runs' lr trajectory (compute-matched).

``--baselines=a,b`` runs the whole ablation from each of ``config.baselines``' named
pretraining recipes, in ``DIR/<name>`` (:mod:`lns_jax.ablation.strength`), and writes
``DIR/strength.md``/``.json``/``.png``: each variant's gain against the baseline's
strength (DECISIONS 20).

A run that stops on a non-finite loss (``config.on_nonfinite='stop'``) is recorded as
failed (``failed.json`` in its folder, a row of the table) and the ablation goes on. The
seed changes the data order and the mapping's initialisation. Every run is a
``train.py`` workdir (``DIR/<variant>/seed<k>``): a finished run is not repeated, an
interrupted one resumes from its newest checkpoint. Results: ``DIR/ablation.json``
(top-1 as fractions), ``DIR/ablation.md`` (Table 1 and the figures), ``fig3*.png``,
``fig4.png``, ``fig5.png``, ``baseline.png``.

The parts: :mod:`~lns_jax.ablation.plan` (the rows and their configs),
:mod:`~lns_jax.ablation.runner` (training them), :mod:`~lns_jax.ablation.report`
(Table 1 and the figures), :mod:`~lns_jax.ablation.strength` (several baselines).
"""

from lns_jax.ablation.plan import (BASELINE, BASELINE_FIELDS, EXTRA_ROWS, FAILED,
                                   AblationError, Run, baseline_config, baseline_epochs,
                                   baseline_names,
                                   check_baseline_dir, check_run_dir, names, parse_floats,
                                   plan, run_config, select, with_baseline)
from lns_jax.ablation.report import (collect, run_record, table, train_ce_tail,
                                     train_seconds, write_report)
from lns_jax.ablation.runner import Ablation, run_ablation
from lns_jax.ablation.strength import run_strength

__all__ = [
    "BASELINE", "BASELINE_FIELDS", "EXTRA_ROWS", "FAILED", "Ablation", "AblationError", "Run",
    "baseline_config", "baseline_epochs", "baseline_names", "check_baseline_dir",
    "check_run_dir", "collect",
    "names", "parse_floats", "plan", "run_ablation", "run_config", "run_record",
    "run_strength", "select", "table", "train_ce_tail", "train_seconds", "with_baseline",
    "write_report",
]
