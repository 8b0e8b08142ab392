#!/bin/bash
# Issue 23's runs: Table 1 (3 seeds, the extra rows once), then the Fig. 4/5 sweeps (1 seed).
cd /work/main
while [ ! -f workdirs/paper/baseline/pretrain/result.json ]; do sleep 30; done
A=".venv/bin/python -m lns_jax.ablation --config=configs/fashion_mnist_r20.py:paper,val --workdir=workdirs/paper --seeds=3 --sweep_seeds=1 --extra_rows=alpha0_cewarm,other_reduction"
$A && $A --alphas=0,0.01,0.1,1,5 --rhos=0,0.001,0.005,0.05,0.2
