#!/bin/bash
# Every long run still open, in the order the issues set, from the checkout's root; each
# resumes where it stopped (a session's end kills it: rerun this line first next session):
#   mkdir -p ~/lns_runs && nohup bash results/run_all.sh > ~/lns_runs/run_all.log 2>&1 &
# A new machine has no ~/lns_runs: each run.sh unpacks its committed state/ first. Before a
# session ends, pack and commit what ran (results/store.sh):
#   bash results/run_all.sh save && git add results/*/state && git commit -m "runs: state"
[ "$1" = save ] && { bash results/fmnist_r20_strength/run.sh save
                     bash results/fmnist_reactnet/run.sh save; exit; }
set -e
bash results/fmnist_r20_strength/run.sh       # issue 30: done (2026-12-07); skips its runs in ~1 min
bash results/fmnist_reactnet/run.sh           # issue 32, item 6: ~7 h idle, its check, the rows from x2 (~1.6 h)
bash results/fmnist_r20_strength/run.sh extra # issue 30's strengths between: ~7 h, if there is time
