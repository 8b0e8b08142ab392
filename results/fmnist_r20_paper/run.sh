#!/bin/bash
# Issue 23's runs, from the checkout's root; every command resumes where it stopped.
# Session 9: Table 1 (3 seeds, the extra rows once), then the Fig. 4/5 sweeps (1 seed); its
# workdir was lost after lns_alpha0.01, only its ablation.json kept (session9_ablation.json).
# Session 10: the same baseline retrained (bit for bit), finetune seed 0 again as a check,
# the remaining sweep points, a fine-tuning control at lr 0.1; combine.py merges the two.
set -e
A=".venv/bin/python -m lns_jax.ablation --config=configs/fashion_mnist_r20.py:paper,val --workdir=workdirs/paper --extra_rows=alpha0_cewarm,other_reduction"
SWEEPS="--alphas=0,0.01,0.1,1,5 --rhos=0,0.001,0.005,0.05,0.2"
if [ "$1" = "session9" ]; then
  $A --seeds=3 --sweep_seeds=1 && $A --seeds=3 --sweep_seeds=1 $SWEEPS
  exit
fi
$A --seeds=1 $SWEEPS --variants=finetune,lns_alpha0.1,lns_alpha5,lns_rho0,lns_rho0.001,lns_rho0.05,lns_rho0.2
.venv/bin/python train.py --config=configs/fashion_mnist_r20.py:paper,val --config.stages=finetune \
  --config.init_from=workdirs/paper/baseline/pretrain/final --config.finetune.lr=0.1 \
  --workdir=workdirs/paper_controls/finetune_lr0.1
.venv/bin/python results/fmnist_r20_paper/combine.py workdirs/paper
