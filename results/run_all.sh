#!/bin/bash
# Every long run still open, in the order the issues set, from the checkout's root; each
# resumes where it stopped (a session's end kills it: rerun this line first next session):
#   mkdir -p ~/lns_runs && nohup bash results/run_all.sh > ~/lns_runs/run_all.log 2>&1 &
set -e
bash results/fmnist_r20_strength/run.sh     # issue 30: ~15 h idle on 2 cores in all
bash results/fmnist_reactnet/run.sh         # issue 32, item 6: ~7 h idle
