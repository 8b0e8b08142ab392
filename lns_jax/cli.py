"""What the command-line entry points (train.py, summary, export, inference) share."""

from absl import flags, logging


def quiet_logging() -> None:
  """Warnings only, unless --verbosity was given: orbax, TFDS and XLA log every file at INFO."""
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
