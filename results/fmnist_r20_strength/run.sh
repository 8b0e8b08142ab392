#!/bin/bash
# Issue 30: Table 1 from baselines of increasing strength (configs/fashion_mnist_r20.py:paper's
# config.baselines), from the checkout's root. Every command resumes where it stopped: a
# finished run is skipped, an interrupted one resumes from its newest checkpoint.
#   bash results/fmnist_r20_strength/run.sh          # trains what is left, then the report
#   bash results/fmnist_r20_strength/run.sh extra    # adam12's and sgd48's rows (strengths
#                                                    # between), then the report
#   bash results/fmnist_r20_strength/run.sh report   # the report of what is finished
#   bash results/fmnist_r20_strength/run.sh save     # packs the workdir into state/ (commit it)
# The workdir lives outside the checkout: LNS_STRENGTH_DIR (default ~/lns_runs/strength);
# state/ (results/store.sh) carries it to a new machine, and every command unpacks it first.
# The tests run it at smoke size: LNS_STRENGTH_CONFIG (the config argument),
# LNS_STRENGTH_FLAGS (more flags), LNS_STRENGTH_RESULTS (where the report is copied),
# PYTHON (default .venv/bin/python).
set -e
case "$1" in ""|extra|report|save) ;; *)
  echo "error: results/fmnist_r20_strength/run.sh takes nothing, extra, report or save; got '$1'." >&2
  exit 2;; esac
W=${LNS_STRENGTH_DIR:-$HOME/lns_runs/strength}
H=${LNS_STRENGTH_RESULTS:-results/fmnist_r20_strength}
source results/store.sh
if [ "$1" = save ]; then store_save "$W" $H/state; exit; fi
store_restore "$W" $H/state
A="${PYTHON:-.venv/bin/python} -m lns_jax.ablation --config=${LNS_STRENGTH_CONFIG:-configs/fashion_mnist_r20.py:paper,val} --workdir=$W --extra_rows=finetune_lr10x,finetune_matched ${LNS_STRENGTH_FLAGS:-}"
# The baselines, by priority (DECISIONS 20): adam24 (the converged candidate: 1.26 points
# above adam12, so adam12 is not), sgd12 (the weak one of the first answer), sgd24; then
# adam12 and sgd48 (strengths between, `extra`), if the compute is there: results/run_all.sh
# runs them after issue 32's runs.
ALL=adam24,sgd12,sgd24
if [ -z "$1" ]; then
  # 1. adam12's check of convergence: its recipe at twice the epochs, the baseline alone.
  $A --seeds=1 --baselines=adam12,adam24 --variants=baseline
  # 2. Seed 0 of every row: the first picture.
  $A --seeds=1 --baselines=$ALL
  # 3. adam24's check of convergence, the baseline alone.
  $A --seeds=1 --baselines=adam48 --variants=baseline
  # 4. Seeds 1 and 2 of every row.
  $A --seeds=3 --baselines=$ALL
elif [ "$1" = extra ]; then
  # 5. adam12 and sgd48, between sgd24 and adam24.
  $A --seeds=3 --baselines=adam12,sgd48
fi
# The report of what is finished so far (trains nothing).
$A --seeds=3 --baselines=$ALL,adam12,sgd48,adam48 --report_only
# (strength.png and fig3.png exist once a row has finished.)
mkdir -p "$H"
for f in strength.md strength.json strength.png; do
  if [ -f "$W/$f" ]; then cp "$W/$f" $H/; fi
done
for b in sgd12 sgd24 sgd48 adam12 adam24 adam48; do
  for f in ablation.md ablation.json baseline.png fig3.png; do
    if [ -f "$W/$b/$f" ]; then cp "$W/$b/$f" "$H/${b}_$f"; fi
  done
done
