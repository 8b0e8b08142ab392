#!/bin/bash
# Issue 30: Table 1 from baselines of increasing strength (configs/fashion_mnist_r20.py:paper's
# config.baselines), from the checkout's root. Every command resumes where it stopped: a
# finished run is skipped, an interrupted one resumes from its newest checkpoint.
# The workdir lives outside the checkout (a new checkout must not lose it):
#   LNS_STRENGTH_DIR (default ~/lns_runs/strength).
set -e
W=${LNS_STRENGTH_DIR:-$HOME/lns_runs/strength}
A=".venv/bin/python -m lns_jax.ablation --config=configs/fashion_mnist_r20.py:paper,val --workdir=$W --extra_rows=finetune_lr10x,finetune_matched"
ALL=sgd48,adam12,sgd24,sgd12
if [ "$1" != "report" ]; then
  # 1. Every baseline (the longest first) and seed 0 of every row: the first picture.
  $A --seeds=1 --baselines=$ALL
  # 2. adam12's check of convergence: its recipe at twice the epochs, the baseline alone.
  $A --seeds=1 --baselines=adam24 --variants=baseline
  # 3. Seeds 1 and 2 of every row.
  $A --seeds=3 --baselines=$ALL
fi
# The report of what is finished so far (trains nothing); `bash run.sh report` runs only this.
$A --seeds=3 --baselines=$ALL,adam24 --report_only
H=results/fmnist_r20_strength
cp "$W"/strength.md "$W"/strength.json "$W"/strength.png $H/
for b in sgd12 sgd24 sgd48 adam12 adam24; do
  [ -d "$W/$b" ] || continue
  for f in ablation.md ablation.json baseline.png fig3.png; do
    [ -f "$W/$b/$f" ] && cp "$W/$b/$f" "$H/${b}_$f"
  done
done
