"""``python -m lns_jax.ablation``: flags as in :mod:`lns_jax.ablation`'s docstring."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import flags  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                lock_config=True)
flags.DEFINE_string("workdir", None, "The ablation's folder (resumable).")
flags.DEFINE_integer("seeds", 3, "Seeds per variant.")
flags.DEFINE_string("alphas", "", "Fig. 4 sweep, e.g. 0,0.1,1,10.")
flags.DEFINE_string("rhos", "", "Fig. 5 sweep, e.g. 0,0.005,0.05.")
flags.DEFINE_integer("sweep_seeds", -1, "Seeds of the sweeps' points and the extra rows "
                     "(default: --seeds).")
flags.DEFINE_string("extra_rows", "", "Extra rows: alpha0_cewarm (alpha 0 in the warm "
                    "start too), other_reduction (lns with the other reduction of Eq. 15), "
                    "finetune_lr10x (fine-tuning at 10x the lr), finetune_matched "
                    "(fine-tuning as long as warmup + lns).")
flags.DEFINE_string("variants", "", "Run only these rows of the plan, e.g. "
                    "lns_alpha0.1,lns_rho0 (the report covers every finished run).")
flags.DEFINE_bool("dry_run", False, "Check every run's config and print the plan (each "
                  "run and its state, the epochs left); train and write nothing.")
flags.DEFINE_bool("report_only", False, "Write the report (tables, figures) of the runs "
                  "finished so far; train nothing.")
flags.DEFINE_string("baseline", "", "Reuse this pretrained baseline (a stage or final/ "
                    "folder) instead of pretraining one in WORKDIR/baseline.")
flags.DEFINE_string("baselines", "", "Run the ablation from each of these of "
                    "config.baselines' pretraining recipes, in WORKDIR/<name>, and report "
                    "the gains against the baselines' strength (WORKDIR/strength.md).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  from lns_jax import ablation
  from lns_jax import config as config_lib
  from lns_jax import trainer
  from lns_jax.checkpoint import CheckpointMismatchError
  from lns_jax.cli import quiet_logging
  from lns_jax.data import DatasetNotFoundError
  del argv
  quiet_logging()
  fl = flags.FLAGS
  config_arg = next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--config=")), "")
  try:
    kwargs = dict(alphas=ablation.parse_floats(fl.alphas, "alphas"),
                  rhos=ablation.parse_floats(fl.rhos, "rhos"), config_arg=config_arg,
                  extra_rows=ablation.names(fl.extra_rows),
                  sweep_seeds=None if fl.sweep_seeds < 0 else fl.sweep_seeds,
                  variants=ablation.names(fl.variants), dry_run=fl.dry_run,
                  report_only=fl.report_only)
    if fl.baselines:
      if fl.baseline:
        raise ablation.AblationError("--baseline and --baselines: give one (--baselines "
                                     "pretrains each of config.baselines' recipes).")
      out = ablation.run_strength(fl.config, fl.workdir, ablation.names(fl.baselines),
                                  fl.seeds, **kwargs)
    else:
      out = ablation.run_ablation(fl.config, fl.workdir, fl.seeds, baseline=fl.baseline,
                                  **kwargs)
  except (ablation.AblationError, config_lib.ConfigError, DatasetNotFoundError,
          CheckpointMismatchError, trainer.TrainingError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  except KeyboardInterrupt:
    print("[ablation] interrupted; run the same command again to resume.", file=sys.stderr)
    sys.exit(130)
  if out.get("interrupted"):
    where = "stopped before" if out.get("before") else "stopped after a checkpoint of"
    print(f"[ablation] {where} {out['run']}; run the same command again to resume.",
          flush=True)
    sys.exit(128 + int(out.get("signal") or 15))


if __name__ == "__main__":
  from lns_jax import cli
  cli.run(main)  # app.run(main), with bad flags as one `error:` line, exit code 2
