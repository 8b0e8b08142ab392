"""The config schema: every field a run reads, its default, and the check of a config.

Config files in ``configs/`` start from :func:`base_config` and change values; they
never add keys, so a typo (``--config.lns.alpah=1``) is an error, not a silent no-op.
:func:`validate` runs before anything is built or compiled and raises
:class:`ConfigError` with one line naming the field and what is allowed.
"""

from __future__ import annotations

import difflib
import math
import numbers
from typing import Iterable

import ml_collections

from lns_jax.errors import ConfigError  # one floor down: models and data raise it too
from lns_jax.stages import NAMES as STAGES  # what each stage is: lns_jax.stages
from lns_jax.stages import STAGES as TABLE
from lns_jax import stages as stages_lib

# The allowed values of the method's fields are owned by the modules that implement them
# (quantizers, mapping, loss, optim, models) and read from there in :func:`validate`.
LABELS = ("current", "pretrained")


def stage_config(epochs=1.0, lr=0.1, schedule="piecewise", decay_epochs=(), decay_factor=0.1,
                 optimizer=""):
  c = ml_collections.ConfigDict()
  c.optimizer = optimizer           # '' = config.optimizer; 'sgd' | 'adam' for this stage only
  c.epochs = float(epochs)          # may be fractional (quick runs)
  c.lr = float(lr)
  c.schedule = schedule             # 'piecewise' | 'cosine' | 'constant' | 'linear' (to 0)
  c.decay_epochs = tuple(decay_epochs)  # piecewise: multiply by decay_factor at these epochs
  c.decay_factor = float(decay_factor)
  # Eq. 21's alpha for this stage's objective; None = config.alpha. Only the stages whose
  # objective is Eq. 21 (warmup, lns) read it: the warm start has its own, so that an
  # alpha = 0 LNS stage can follow a warm start fitted to sign(W) (DECISIONS 17).
  c.alpha = ml_collections.FieldReference(None, field_type=float)
  # This stage's weight decay; None = config.weight_decay (lns_jax.optim).
  c.weight_decay = ml_collections.FieldReference(None, field_type=float)
  return c


def distill_config() -> ml_collections.ConfigDict:
  """``config.distill``: the distribution loss of ReActNet (lns_jax.distill)."""
  c = ml_collections.ConfigDict()
  c.teacher = ""          # '' = off; a stage of config.stages, or a checkpoint path
  c.weight = 1.0          # multiplies l_kd
  c.temperature = 1.0     # softmax temperature of both (l_kd is scaled by T^2)
  c.cls_weight = 0.0      # multiplies l_cls where distilling (0: ReActNet, l_kd alone)
  c.stages = ""           # '' = every stage after the teacher (all, for a path) but standalone ones
  return c


def base_config() -> ml_collections.ConfigDict:
  """Every field with its default (the CIFAR-10 ResNet-20 paper recipe, shrunk)."""
  from lns_jax.data import defaults as data_config  # the data fields, without TensorFlow

  c = ml_collections.ConfigDict()
  c.seed = 0
  c.stages = "pretrain,warmup,lns"   # comma-separated, run in order
  c.init_from = ""                   # a checkpoint dir (a stage's final/) to start the first stage from

  c.model = ml_collections.ConfigDict()
  c.model.name = "resnet20"
  c.model.input_binarizer = "ste_sign"
  c.model.weight_scale = "layer"
  c.model.clip = 1.0                 # STE clip of activations and latent weights (Eq. 3)
  c.model.conv = "auto"              # binary convs: 'xla' | 'packed' (XNOR/popcount forward) | 'bits' (XLA's forward, 1-bit residuals) | 'auto' (lns_jax.xnor_conv)
  c.model.dtype = "float32"          # the network's compute dtype: 'float32' | 'bfloat16' (lns_jax.models.DTYPES)

  c.mapping = ml_collections.ConfigDict()
  c.mapping.output = "raw"           # DECISIONS.md 1b
  c.mapping.init = "random"          # 'random' (paper) | 'sign': q_hat starts at sign(W) (lns_jax.mapping)
  c.mapping.ste = "clip_grad"        # how sign(q_hat) passes gradients (DECISIONS.md 1)
  c.mapping.clip = 1.0               # 'clip_grad': bound on the gradient's value; 'window': |q_hat| <= clip
  c.mapping.shard = True             # several devices: each maps 1/N of every layer's filters
  c.mapping.conv = "auto"            # f_theta's convs: 'xla' | 'winograd' | 'auto' (DECISIONS 15)

  c.data = data_config.default_data_config()
  c.batch_size = 128                 # global, over all devices and hosts (eval uses it too)

  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 0.0

  c.pretrain = stage_config(400, 0.1, decay_epochs=(200, 300))
  c.warmup = stage_config(5, 0.01, schedule="constant")
  c.lns = stage_config(120, 0.01, decay_epochs=(30, 60, 90))
  c.finetune = stage_config(120, 0.01, decay_epochs=(30, 60, 90))
  c.teacher = stage_config(120, 0.1, decay_epochs=(60, 90))
  c.step1 = stage_config(120, 0.1, decay_epochs=(60, 90))
  c.distill = distill_config()

  c.alpha = 1.0                      # Eq. 21
  # A number, or a pair (rho_pos, rho_neg), Eq. 8-9. Typed `object` so that a command-line
  # override may give either: --config.rho=0.01 or --config.rho='(0.01,0.002)'.
  c.rho = ml_collections.FieldReference(0.005, field_type=object)
  c.reduction = "mean"               # 'mean' (Eq. 16) or 'sum' (Eq. 17)
  c.labels = "current"               # DECISIONS.md 3

  c.log_every_steps = 50
  c.eval_every_epochs = 1
  # > 1: flip rates and evaluation this many times an epoch (Fig. 3's curves of a short
  # stage); each point's flip rate is then since the previous point.
  c.evals_per_epoch = 1
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 3
  # Named pretraining recipes, ``{name: {config.pretrain field: value}}``, for
  # ``python -m lns_jax.ablation --baselines=a,b``: Table 1 from baselines of several
  # strengths (:func:`lns_jax.ablation.with_baseline`). Training never reads it.
  c.baselines = ml_collections.ConfigDict()
  c.on_nonfinite = "stop"            # 'stop' | 'skip' (skip the step, count it)
  return c


def imagenet_recipe(c: ml_collections.ConfigDict, args: set) -> ml_collections.ConfigDict:
  """The paper's ImageNet schedule (Sec. 4), shared by the ResNet-18 and AlexNet configs.

  pretrain 120 epochs, batch 256, SGD lr 0.1 x0.1 at epochs 70, 90, 110; fine-tune 45
  epochs from lr 0.01 x0.1 every 15; alpha 1, rho 0.005. ``args``: ``finetune`` fine-tunes
  without LNS (an ablation row; ``lns_jax.ablation`` runs all rows); ``smoke`` shrinks the run for tests (the caller picks the tiny model).
  """
  c.data.name = "imagenet2012"
  c.data.image_size = 224
  c.batch_size = 256
  c.optimizer = "sgd"
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.pretrain = stage_config(120, 0.1, decay_epochs=(70, 90, 110))
  c.warmup = stage_config(1, 0.01, schedule="constant")
  c.lns = stage_config(45, 0.01, decay_epochs=(15, 30))
  c.finetune = stage_config(45, 0.01, decay_epochs=(15, 30))
  c.alpha = 1.0
  c.rho = 0.005
  c.log_every_steps = 100
  c.checkpoint_every_steps = 2000
  c.stages = "pretrain,finetune" if "finetune" in args else "pretrain,warmup,lns"
  if "smoke" in args:
    c.batch_size = 8
    c.data.train_examples = 16
    c.data.eval_examples = 8
    for stage in STAGES:
      c[stage] = stage_config(1, c[stage].lr, c[stage].schedule)
    c.log_every_steps = 1
    c.checkpoint_every_steps = 2
  return c


def reactnet_recipe(c: ml_collections.ConfigDict, model: str,
                    teacher: str) -> ml_collections.ConfigDict:
  """ReActNet's binarization, optimizer and distillation (Liu et al., ECCV 2020, Sec. 4.1),
  shared by its Fashion-MNIST and ImageNet configs: ApproxSign activations, per-channel
  weight scale, Adam, and the distribution loss from ``teacher`` alone (weight 1, T = 1,
  no cross-entropy). The stages' epochs and learning rates are each config's."""
  c.model.name = model
  c.model.input_binarizer = "approx_sign"
  c.model.weight_scale = "channel"
  c.optimizer = "adam"
  c.weight_decay = 0.0
  c.distill.update(teacher=teacher, weight=1.0, temperature=1.0, cls_weight=0.0)
  return c


def parse_args(arg: str, allowed, config_file: str) -> set:
  """Comma-separated config arguments (``--config=FILE:a,b``), checked against ``allowed``."""
  args = set(filter(None, (arg or "").split(",")))
  unknown = args - set(allowed)
  if unknown:
    raise ValueError(f"{config_file}: unknown arguments {sorted(unknown)}; use "
                     f"{', '.join(sorted(allowed))}.")
  return args


# Fields whose default is not what a run saved before the field existed did: such a run
# reads with this value instead (config.mapping.conv: those runs mapped with XLA's conv).
_BEFORE_THE_FIELD = {"mapping.conv": "xla"}


def from_saved_json(text: str) -> ml_collections.ConfigDict:
  """A run's saved config (``config.json``, a checkpoint's or an export's), with the
  defaults of fields added since it was saved (or what those runs did, where that
  differs: ``_BEFORE_THE_FIELD``), so older runs still load."""
  import json

  def fill(saved: dict, defaults: ml_collections.ConfigDict, prefix: str = "") -> dict:
    for key in defaults.keys():
      if key not in saved:
        value = _BEFORE_THE_FIELD.get(prefix + key, defaults[key])
        saved[key] = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
      elif isinstance(defaults[key], ml_collections.ConfigDict) and isinstance(saved[key], dict):
        fill(saved[key], defaults[key], f"{prefix}{key}.")
    return saved

  return ml_collections.ConfigDict(fill(json.loads(text), base_config()))


def stage_alpha(config, stage: str) -> float:
  """Eq. 21's alpha of ``stage``: its own ``config.<stage>.alpha``, else ``config.alpha``;
  0 for a stage whose objective is cross-entropy alone (:mod:`lns_jax.stages`)."""
  if not TABLE[stage].noisy_supervision:
    return 0.0
  own = config[stage].get("alpha")
  return float(config.alpha if own is None else own)


def stage_names(config) -> list:
  return [s.strip() for s in str(config.stages).split(",") if s.strip()]


def _fail(field, msg):
  raise ConfigError(f"config.{field}: {msg}")


def _check_choice(config, field, allowed: Iterable[str]):
  value = _get(config, field)
  if value not in allowed:
    _fail(field, f"{value!r} is not one of {', '.join(map(repr, allowed))}.")


def _get(config, field):
  node = config
  for part in field.split("."):
    node = node[part]
  return node


def _check_number(config, field, *, low=None, high=None, low_open=False, integer=False,
                  allow_zero=True):
  value = _get(config, field)
  kind = "an integer" if integer else "a number"
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or (
      integer and not float(value).is_integer()):
    _fail(field, f"{value!r} must be {kind}.")
  if not math.isfinite(float(value)):
    _fail(field, f"{value!r} must be finite.")
  if low is not None and (value < low or (low_open and value == low)):
    _fail(field, f"{value!r} must be {'>' if low_open else '>='} {low}.")
  if high is not None and value > high:
    _fail(field, f"{value!r} must be <= {high}.")


def _leaf_paths(node, prefix=""):
  for key in node.keys():
    if isinstance(node[key], ml_collections.ConfigDict):
      yield from _leaf_paths(node[key], prefix + key + ".")
    else:
      yield prefix + key


def unknown_field_message(field: str, group, root) -> str:
  """The error for ``config.<field>``, a name not in ``group`` (a node of ``root``).

  Suggests the closest name in the same group, else a close field elsewhere in ``root``
  (``config.lns.rhoo`` -> ``config.rho``), and lists the group's fields.
  """
  key = field.rsplit(".", 1)[-1]
  close = difflib.get_close_matches(key, list(group.keys()), n=1, cutoff=0.6)
  if close:
    hint = f" (did you mean {close[0]!r}?)"
  else:
    by_name = {}
    for path in _leaf_paths(root):
      by_name.setdefault(path.rsplit(".", 1)[-1], path)
    names = difflib.get_close_matches(key, list(by_name), n=1, cutoff=0.6)
    hint = f" (did you mean config.{by_name[names[0]]}?)" if names else ""
  return f"config.{field}: unknown field{hint}; allowed: {', '.join(sorted(group.keys()))}."


def check_override_path(path: str, config) -> None:
  """Raises :class:`ConfigError` if ``path`` (``'lns.lr'``) names no field of ``config``."""
  node = config
  parts = path.split(".")
  for i, part in enumerate(parts):
    field = ".".join(parts[:i + 1])
    if not isinstance(node, ml_collections.ConfigDict):
      raise ConfigError(f"config.{'.'.join(parts[:i])}: is a value, not a group of fields; "
                        f"set it with --config.{'.'.join(parts[:i])}=VALUE.")
    if part not in node:
      raise ConfigError(unknown_field_message(field, node, config))
    node = node[part]


def _check_keys(config, reference, prefix="", root=None):
  root = reference if root is None else root
  for key in config.keys():
    if key not in reference:
      raise ConfigError(unknown_field_message(prefix + key, reference, root))
    sub, ref = config[key], reference[key]
    if prefix + key == "baselines":  # its names are the config's; each a pretrain recipe
      for name in sub.keys():
        if not isinstance(sub[name], ml_collections.ConfigDict):
          _fail(f"baselines.{name}", f"must be a group of config.pretrain fields, got "
                f"{sub[name]!r}.")
        _check_keys(sub[name], root.pretrain, f"baselines.{name}.", root)
      continue
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(sub, ml_collections.ConfigDict):
        _fail(prefix + key, f"must be a group of fields like {sorted(ref.keys())}, got {sub!r}.")
      _check_keys(sub, ref, prefix + key + ".", root)


def validate(config, num_devices: int = 1) -> None:
  """Checks every field; raises :class:`ConfigError` naming the first bad one."""
  _check_keys(config, base_config())
  stages = _validate_stages(config)
  _validate_model(config)
  _validate_data(config, num_devices)
  _validate_optimization(config, stages)
  _validate_objective(config, stages)


def _validate_stages(config) -> list:
  stages = stage_names(config)
  if not stages:
    _fail("stages", f"is empty; give a comma-separated list of {', '.join(STAGES)}.")
  for s in stages:
    if s not in STAGES:
      _fail("stages", f"unknown stage {s!r}; allowed: {', '.join(STAGES)}.")
  if len(set(stages)) != len(stages):
    _fail("stages", f"{config.stages!r} names a stage twice.")
  if not isinstance(config.init_from, str):
    _fail("init_from", f"{config.init_from!r} must be a path (a string).")
  return stages


def _validate_model(config) -> None:
  from lns_jax import mapping, quantizers, xnor_conv
  from lns_jax.models import DTYPES, MODELS
  _check_choice(config, "model.name", sorted(MODELS))
  _check_choice(config, "model.input_binarizer", tuple(quantizers.INPUT_BINARIZERS))
  _check_choice(config, "model.weight_scale", quantizers.WEIGHT_SCALES)
  _check_number(config, "model.clip", low=0, low_open=True)
  _check_choice(config, "model.conv", xnor_conv.CONV_IMPLS)
  _check_choice(config, "model.dtype", tuple(DTYPES))
  _check_choice(config, "mapping.output", mapping.MAPPING_OUTPUTS)
  _check_number(config, "mapping.clip", low=0, low_open=True)
  _check_choice(config, "mapping.ste", quantizers.MAPPING_STES)
  _check_choice(config, "mapping.init", mapping.MAPPING_INITS)
  _check_choice(config, "mapping.shard", (True, False))
  _check_choice(config, "mapping.conv", mapping.MAPPING_CONVS)


def _validate_data(config, num_devices: int) -> None:
  from lns_jax.data import defaults as data_config, specs as data_specs
  _check_choice(config, "data.name", data_specs.DATASETS)
  try:  # configs written before config.data.loader existed read with TFDS
    data_config.check_loader(config.data.name, config.data.get("loader", "tfds"))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  for name, low in (("train_examples", 1), ("eval_examples", 1), ("image_size", 1),
                    ("val_examples", 0), ("shuffle_buffer", 1), ("prefetch", 1)):
    if config.data.get(name) is not None:  # None: the dataset's own size
      _check_number(config, f"data.{name}", low=low, integer=True)
  for field in ("seed", "batch_size", "log_every_steps",
                "eval_every_epochs", "evals_per_epoch", "checkpoint_every_steps",
                "keep_checkpoints"):
    _check_number(config, field, low=0 if field == "seed" else 1, integer=True)
  if config.batch_size % num_devices:
    _fail("batch_size", f"{config.batch_size} must be a multiple of the number of devices "
                        f"({num_devices}); use e.g. "
                        f"{num_devices * max(1, config.batch_size // num_devices)}.")


def _validate_optimization(config, stages) -> None:
  from lns_jax import optim
  _check_choice(config, "optimizer", optim.OPTIMIZERS)
  _check_number(config, "momentum", low=0, high=1)
  _check_number(config, "weight_decay", low=0)
  for s in STAGES:
    _check_number(config, f"{s}.epochs", low=0)
    _check_number(config, f"{s}.lr", low=0)
    _check_choice(config, f"{s}.schedule", optim.SCHEDULES)
    _check_choice(config, f"{s}.optimizer", ("",) + optim.OPTIMIZERS)
    _check_number(config, f"{s}.decay_factor", low=0)
    if config[s].get("weight_decay") is not None:
      _check_number(config, f"{s}.weight_decay", low=0)
    decay = config[s].decay_epochs
    if not isinstance(decay, (tuple, list)) or not all(
        isinstance(e, numbers.Real) and not isinstance(e, bool) and e > 0 for e in decay):
      _fail(f"{s}.decay_epochs", f"{decay!r} must be a list of positive epochs.")
    if list(decay) != sorted(decay):
      _fail(f"{s}.decay_epochs", f"{decay!r} must be increasing.")
  for s in stages:
    if config[s].epochs <= 0:
      _fail(f"{s}.epochs", f"{config[s].epochs!r} must be > 0 for a stage that runs.")


def _validate_objective(config, stages) -> None:
  from lns_jax import loss
  _check_number(config, "alpha", low=0)
  for s in STAGES:
    if config[s].get("alpha") is None:
      continue
    if not TABLE[s].noisy_supervision:
      _fail(f"{s}.alpha", f"{config[s].alpha!r}: the {s} stage's objective is cross-entropy "
                          f"alone; alpha applies to {', '.join(n for n in STAGES if TABLE[n].noisy_supervision)}.")
    _check_number(config, f"{s}.alpha", low=0)
  rho = config.rho
  if not all(isinstance(r, numbers.Real) and not isinstance(r, bool)
             for r in (rho if isinstance(rho, (tuple, list)) else (rho,))):
    _fail("rho", f"{rho!r} must be a number (e.g. 0.005) or a pair (rho_pos, rho_neg), "
                 f"on the command line --config.rho='(0.01,0.002)'.")
  try:
    loss.check_rho(config.rho)
  except ValueError as e:
    _fail("rho", str(e).removeprefix("rho: "))
  # The objective needs a number: every reduction of Eq. 15 but the per-element 'none'.
  _check_choice(config, "reduction", tuple(r for r in loss.REDUCTIONS if r != "none"))
  _check_choice(config, "labels", LABELS)
  _check_choice(config, "on_nonfinite", ("stop", "skip"))
  _validate_distill(config, stages)
  first = (stages_lib.chained(stages) or stages)[0]
  if TABLE[first].trains_only_mapping and not config.init_from:
    _fail("init_from", f"the {first} stage needs a trained baseline: run 'pretrain' "
                       f"first or set config.init_from to a baseline checkpoint.")


def teacher_is_stage(teacher: str) -> bool:
  """Whether ``config.distill.teacher`` names a stage; a checkpoint path has a '/'."""
  return bool(teacher) and "/" not in teacher


def distilled_stages(config) -> list:
  """The stages of ``config.stages`` that add the distribution loss (config.distill)."""
  teacher = config.distill.teacher
  if not teacher:
    return []
  stages = stage_names(config)
  if config.distill.stages:
    return [s.strip() for s in str(config.distill.stages).split(",") if s.strip()]
  after = stages[stages.index(teacher) + 1:] if teacher in stages else stages
  return stages_lib.chained(after)


def _validate_distill(config, stages) -> None:
  """The teacher's name and the loss weights; a checkpoint path is read (and checked)
  by the trainer before any stage runs, as config.init_from is."""
  d = config.distill
  if not isinstance(d.teacher, str):
    _fail("distill.teacher", f"{d.teacher!r} must be a stage name or a checkpoint path.")
  _check_number(config, "distill.weight", low=0)
  _check_number(config, "distill.temperature", low=0, low_open=True)
  _check_number(config, "distill.cls_weight", low=0)
  if not d.teacher:
    return
  if teacher_is_stage(d.teacher):
    if d.teacher not in STAGES:
      _fail("distill.teacher", f"{d.teacher!r} is neither a stage ({', '.join(STAGES)}) nor "
                               f"a checkpoint path (a path has a '/': ./{d.teacher}).")
    if d.teacher not in stages:
      _fail("distill.teacher", f"stage {d.teacher!r} is not in config.stages "
                               f"({config.stages!r}); add it before the stages it teaches, "
                               f"or give its checkpoint path.")
  for s in distilled_stages(config):
    if s not in stages:
      _fail("distill.stages", f"{s!r} is not in config.stages ({config.stages!r}).")
    if teacher_is_stage(d.teacher) and stages.index(s) <= stages.index(d.teacher):
      _fail("distill.stages", f"{s!r} runs before (or is) its teacher stage "
                              f"{d.teacher!r}; the teacher must run first.")
