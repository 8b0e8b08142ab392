"""Issue 23's paper-recipe ablation from two sessions' runs, one baseline.

Session 9 ran Table 1 (3 seeds), the extra rows and alpha = 0.01 in ``workdirs/paper``;
that folder did not survive the session, only its ``ablation.json`` (here as
``session9_ablation.json``, with its ``fig3.png``). Session 10 retrained the baseline
with the same command and ran the remaining Fig. 4/5 points (``--variants``) and
finetune seed 0 again. This script merges the two only if the retrained baseline and
finetune seed 0 reproduce session 9's numbers exactly (XLA CPU is deterministic for a
fixed machine, seed and data order), then writes ``ablation.json``, ``ablation.md``,
``fig4.png`` and ``fig5.png`` here:

  .venv/bin/python results/fmnist_r20_paper/combine.py [workdirs/paper]
"""

import json
import os
import sys

from lns_jax import ablation, plots

HERE = os.path.dirname(os.path.abspath(__file__))
KEYS = ("test_top1", "val_top1", "best_test_top1", "flip_rate_init")


def main(argv):
  new_root = argv[1] if len(argv) > 1 else "workdirs/paper"
  with open(os.path.join(HERE, "session9_ablation.json")) as f:
    old = json.load(f)
  with open(os.path.join(new_root, "ablation.json")) as f:
    new = json.load(f)
  if new["baseline"] != old["baseline"]:
    sys.exit(f"error: the baselines differ ({new['baseline']} vs {old['baseline']}); "
             f"the two sessions' runs cannot share one table.")
  checked = []
  for name, recs in new["variants"].items():
    for r in recs:
      twin = [o for o in old["variants"].get(name, []) if o["seed"] == r["seed"]]
      if twin:
        diff = {k: (r.get(k), twin[0].get(k)) for k in KEYS if r.get(k) != twin[0].get(k)}
        if diff:
          sys.exit(f"error: {name} seed {r['seed']} does not reproduce: {diff}")
        checked.append(f"{name} seed {r['seed']}")
  merged = dict(old)
  merged["variants"] = {}
  for name in list(old["variants"]) + [n for n in new["variants"] if n not in old["variants"]]:
    recs = {r["seed"]: r for r in old["variants"].get(name, [])}
    recs.update({r["seed"]: r for r in new["variants"].get(name, [])})
    merged["variants"][name] = [recs[s] for s in sorted(recs)]
  merged["reproduced"] = checked
  merged["sessions"] = "Table 1 and the extra rows: session 9; Fig. 4/5 points: session 10"
  with open(os.path.join(HERE, "ablation.json"), "w") as f:
    json.dump(merged, f, indent=2)
  tab = ablation.table(merged)
  figs = plots.sweep_figures(HERE, merged)
  lines = ["# Ablation (Table 1, Fig. 4, Fig. 5), the paper's recipe", "",
           f"Config: `{old['config_arg']}`; top-1 in %, mean ± sample std over seeds; "
           f"one baseline. {merged['sessions']} (reproduced exactly in session 10: "
           f"the baseline, {', '.join(checked) or 'no run'}).", "", tab, ""]
  for name, recs in merged["variants"].items():
    lines += [f"- {name} seed {r['seed']} failed: {r['failed']}" for r in recs if "failed" in r]
  lines += ["", "![fig3.png](fig3.png)", "", "![baseline.png](baseline.png)", ""]
  lines += [f"![{os.path.basename(p)}]({os.path.basename(p)})\n" for p in figs]
  with open(os.path.join(HERE, "ablation.md"), "w") as f:
    f.write("\n".join(lines))
  print(tab)


if __name__ == "__main__":
  main(sys.argv)
