"""Trains a binary network with LNS: pretrain -> warmup -> lns (Sec. 4).

  python train.py --config=configs/fashion_mnist_r20.py --workdir=workdirs/fmnist
  python train.py --config=configs/imagenet_r18.py --config.batch_size=512 --workdir=...

Multi-host: pass --coordinator_address/--num_processes/--process_id (or set
LNS_COORDINATOR_ADDRESS, LNS_NUM_PROCESSES, LNS_PROCESS_ID), or
--coordinator_address=auto on clusters JAX detects (SLURM, TPU pods, Open MPI).
"""

import errno
import os
import sys

# tf.data is the input pipeline only: keep TensorFlow off the accelerators and quiet.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")  # no "oneDNN custom operations" lines

from absl import flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

_CONFIG = config_flags.DEFINE_config_file("config", None, "Config file (configs/*.py[:arg]).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where checkpoints, logs and results go.")
_COORD = flags.DEFINE_string("coordinator_address", None,
                             "host:port of process 0 for multi-host runs, or 'auto'.")
_NPROC = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-host).")
_PID = flags.DEFINE_integer("process_id", None, "This process's index (multi-host).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  del argv
  from lns_jax import cli
  cli.quiet_logging()
  try:
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
  except ImportError:  # not installed: --config.data.loader=numpy runs without it
    pass
  import jax
  from lns_jax import config as config_lib
  from lns_jax import parallel, supervisor, trainer
  from lns_jax.checkpoint import CheckpointMismatchError
  from lns_jax.data import DatasetNotFoundError

  try:
    parallel.initialize_distributed(_COORD.value, _NPROC.value, _PID.value)
  except ValueError as e:
    cli.fail(f"--coordinator_address/--num_processes/--process_id: {e}")
  logging.info("JAX processes: %d, devices: %s", jax.process_count(), jax.devices())
  try:
    results = trainer.train(_CONFIG.value, _WORKDIR.value)
  except (config_lib.ConfigError, DatasetNotFoundError, CheckpointMismatchError,
          trainer.TrainingError) as e:
    cli.fail(e)
  except OSError as e:
    if e.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES):
      raise
    # A full (or read-only) disk outside a checkpoint save, e.g. at a log write.
    kept = supervisor.kept_checkpoints(_WORKDIR.value, config_lib.stage_names(_CONFIG.value))
    cli.fail(f"writing {e.filename or 'into ' + _WORKDIR.value} failed ({e.strerror}). "
             f"{kept} Free space and run the same command again to resume.")
  stopped = [r for r in results.values() if r.get("interrupted")]
  if stopped:
    # Preempted (SIGTERM) or interrupted (SIGINT) after a checkpoint: the shell's
    # 128 + signal code tells schedulers the job did not finish and may be requeued.
    sys.exit(128 + int(stopped[0].get("signal") or 15))


if __name__ == "__main__":
  from lns_jax import supervisor
  if supervisor.wanted(sys.argv):  # multi-host: train in a child; a lost peer is one line
    sys.exit(supervisor.run())
  from lns_jax import cli
  cli.run(main)  # app.run(main), with bad flags as one `error:` line, exit code 2
