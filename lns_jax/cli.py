"""What the command-line entry points (train.py, summary, export, inference) share."""

from absl import flags, logging

# TensorFlow's quiet start-up is owned by the data package, which imports TensorFlow.
from lns_jax.data.build import QUIET_ENV, quiet_environment  # noqa: F401


def quiet_logging() -> None:
  """Warnings only, unless --verbosity was given: orbax, TFDS and XLA log every file at INFO.

  Also turns off TFDS's progress bars (a one-time dataset build announces itself with
  one line of ours instead, see :func:`lns_jax.data.prepare`).
  """
  quiet_environment()
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)
  try:
    import tensorflow_datasets as tfds  # after quiet_environment(), if it is the first import
  except ImportError:  # not installed: config.data.loader='numpy' runs without it
    return
  tfds.disable_progress_bar()


# ------------------------------------------------------------------ bad command lines
# Every entry point runs through `run`: a bad flag, config file or override ends the
# process with one line `error: ...` on stderr and exit code 2, never a traceback.

import difflib  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402

EXIT_BAD_INPUT = 2
_OVERRIDE = re.compile(r"^--?(?:no)?config\.([^=\s]+)(?:=(.*))?$", re.DOTALL)
_ILLEGAL = re.compile(r"^flag --([\w.]+)=(.*?): (.*)$", re.DOTALL)
_KINDS = {float: "a number", int: "an integer", bool: "true or false", str: "a string",
          tuple: "a tuple like '(1,2)'"}


def fail(message: str) -> None:
  """Prints ``error: message`` (one line) to stderr and exits with code 2."""
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def run(main) -> None:
  """``absl.app.run(main)``, but bad flags end with one ``error:`` line and exit code 2."""
  from absl import app
  app.run(main, flags_parser=parse_flags)


def parse_flags(argv):
  """An ``app.run`` flags parser: ``FLAGS(argv)``, each failure turned into :func:`fail`.

  ml_collections raises ``AttributeError`` / ``KeyError`` for an override of an unknown
  field and absl ``flags.Error`` for a value it cannot parse; both become one line
  naming the flag or field and what it takes.
  """
  try:
    rest = flags.FLAGS(argv)
  except Exception as e:  # pylint: disable=broad-except
    try:
      message = flag_error_message(e, argv)
    except Exception:  # pylint: disable=broad-except
      message = _last_line(e) or type(e).__name__
    fail(message)
  from ml_collections.config_flags import config_flags
  path_arg = _config_file_arg(argv)
  if ("config" in flags.FLAGS and path_arg is not None and
      isinstance(flags.FLAGS["config"].value, config_flags._ErrorConfig)):  # pylint: disable=protected-access
    fail(_load_config(path_arg)[1] or f"--config={path_arg}: cannot load the config file.")
  if len(rest) > 1:
    fail(f"unexpected argument {rest[1]!r}: give every value as a flag, --name=value "
         f"(quote values with spaces or parentheses: --config.rho='(0.01,0.002)').")
  return rest


def _config_file_arg(argv):
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _last_line(text: str) -> str:
  lines = [l.strip() for l in str(text).splitlines() if l.strip()]
  return re.sub(r"^[\w.]*(Error|Exception): ", "", lines[-1]) if lines else ""


def _load_config(path_arg):
  """The config of ``--config=FILE[:ARG]`` before overrides, or an error line."""
  import os
  from ml_collections.config_flags import config_flags
  file = path_arg.split(":", 1)[0]
  if not os.path.isfile(file):
    return None, (f"--config={path_arg}: no such config file; give one of configs/*.py "
                  f"(e.g. --config=configs/fashion_mnist_r20.py).")
  try:
    return config_flags.ConfigFileFlagParser("config", lock_config=False).parse(path_arg), None
  except Exception as e:  # pylint: disable=broad-except
    return None, f"--config={path_arg}: {_last_line(e)}"


def flag_error_message(error: Exception, argv) -> str:
  """One line for a failed ``FLAGS(argv)``: the flag or config field, and what it takes."""
  from lns_jax import config as config_lib
  overrides = [m.group(1) for m in map(_OVERRIDE.match, argv[1:]) if m]
  path_arg = _config_file_arg(argv)
  if path_arg is not None:  # the config file itself, then each override's field
    config, load_error = _load_config(path_arg)
    if load_error:
      return load_error
    for path in overrides:  # an unknown field, at any depth
      try:
        config_lib.check_override_path(path, config)
      except config_lib.ConfigError as e:
        return str(e)
  if isinstance(error, flags.UnrecognizedFlagError):
    name = error.flagname
    close = difflib.get_close_matches(name, [n for n in flags.FLAGS if "." not in n], n=1)
    hint = f" (did you mean --{close[0]}?)" if close else ""
    return f"--{name}: unknown flag{hint}; see --helpshort for the flags."
  m = _ILLEGAL.match(str(error))
  if m:
    name, value, reason = m.groups()
    if name.startswith("config."):
      return _field_value_message(name[len("config."):], value, path_arg)
    flag = flags.FLAGS[name] if name in flags.FLAGS else None
    if flag is not None and value == "None" and "other than None" in reason:
      return f"--{name} is required: {flag.help}"
    kind = f" takes {flag.flag_type()} values ({flag.help.rstrip('.')})" if flag is not None else ""
    return f"--{name}={value}: {_last_line(reason)}; --{name}{kind}."
  return _last_line(error) or type(error).__name__


def _field_value_message(path, value, path_arg):
  from ml_collections import config_dict
  from ml_collections.config_flags import config_path
  config, _ = _load_config(path_arg) if path_arg else (None, None)
  if config is None:
    return f"config.{path}: cannot read {value!r}."
  kind = config_path.get_type(path, config)
  current = config_path.get_value(path, config)
  if isinstance(current, config_dict.ConfigDict):
    return (f"config.{path}: is a group of fields ({', '.join(sorted(current.keys()))}); "
            f"set one of them, e.g. --config.{path}.{sorted(current.keys())[0]}=...")
  if isinstance(current, tuple):
    current = f"'({','.join(map(str, current))})'" if current else None
  example = f"; e.g. --config.{path}={current}" if current is not None else ""
  return f"config.{path}: {value!r} is not {_KINDS.get(kind, kind.__name__)}{example}."
