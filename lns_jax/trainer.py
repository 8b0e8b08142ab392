"""Training: the train state, the jitted steps, the stages and the loop (Alg. 1).

``train(config, workdir)`` runs ``config.stages`` in order, each in ``workdir/<stage>``:

  pretrain  the binary baseline (``sign`` weights), cross-entropy.
  warmup    ``lns`` weights; only the mapping networks (and their BatchNorm) train,
            objective Eq. 21 (DESIGN decision 4). The network's BatchNorm normalises
            with batch statistics as in training, but its running averages are kept.
  lns       ``lns`` weights; everything trains with Eq. 21 (Alg. 1).
  finetune  the Table 1 ablation: continue the baseline, cross-entropy.

Each stage starts from the previous stage's final weights (or ``config.init_from``);
a finished stage (``result.json`` present) is not run again, an interrupted one
resumes from its newest good checkpoint with the same data order.

Parallelism: one ``jax.jit`` over a mesh of every device with a ``data`` axis; the
batch is sharded, the state replicated, so BatchNorm statistics and gradients are
those of the global batch. The mapping networks act on the replicated latent kernels,
so each device computes them once per step, whatever its share of the batch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import functools
import json
import logging
import math
import os
import signal
import sys
import time
from typing import Any, Callable, Dict, Optional, Tuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import traverse_util

from lns_jax import checkpoint as ckpt_lib
from lns_jax import config as config_lib
from lns_jax import data as data_lib
from lns_jax import loss as loss_lib
from lns_jax import metrics as metrics_lib
from lns_jax import parallel
from lns_jax import quantizers
from lns_jax.layers import LNS_COLLECTION, BinaryConv
from lns_jax.models import get_model

Array = jax.Array


class TrainingError(RuntimeError):
  """Training cannot go on (non-finite values, a bad workdir, ...)."""


class WorkdirLockedError(TrainingError):
  """Another run holds the workdir."""


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # Flip rates (DESIGN decision 5): effective binary signs at the previous epoch end
  # and of the network the stage started from; int8, one entry per binary layer.
  signs_prev: Any
  signs_init: Any
  # labels='pretrained': sign(W0) of the LNS layers; empty otherwise.
  labels: Any
  skipped: Array           # steps skipped for non-finite values (on_nonfinite='skip')
  first_bad_step: Array    # first step with a non-finite loss or gradient, -1 if none


# ----------------------------------------------------------------------------- model


def build_model(config, stage: str, num_classes: int, mesh=None):
  """The model a stage trains (``STAGE_WEIGHTS``), or ``'float'`` etc. by name.

  With a ``mesh`` of several devices and ``config.mapping.shard``, each device computes
  f_theta for its share of every layer's filters (``MappingNet.filter_sharding``).
  """
  weights = config_lib.STAGE_WEIGHTS.get(stage, stage)
  sharding = None
  if mesh is not None and mesh.size > 1 and config.mapping.shard:
    sharding = parallel.batch_sharding(mesh)
  return get_model(config.model.name, num_classes=num_classes, weight_binarizer=weights,
                   input_binarizer=config.model.input_binarizer,
                   weight_scale=config.model.weight_scale, clip=config.model.clip,
                   mapping_output=config.mapping.output, mapping_clip=config.mapping.clip,
                   mapping_ste=config.mapping.ste, mapping_init=config.mapping.init,
                   mapping_sharding=sharding, conv=config.model.get("conv", "xla"))


def binary_layers(model: nn.Module, image_shape) -> Dict[Tuple[str, ...], str]:
  """``{module path: weight_binarizer}`` of every BinaryConv of ``model`` (no compute)."""
  found = {}

  def record(mdl, method_name):
    if isinstance(mdl, BinaryConv) and method_name == "__call__":
      found[tuple(mdl.path)] = mdl.weight_binarizer
    return False

  x = jnp.zeros((1, *image_shape), jnp.float32)
  jax.eval_shape(lambda: model.init(jax.random.key(0), x, train=False,
                                    capture_intermediates=record))
  return found


def _subtree(tree, path):
  for p in path:
    tree = tree[p]
  return tree


def effective_signs(layers, params, batch_stats, mapping_output: str = "raw",
                    mapping_init: str = "random") -> dict:
  """Signs of the weights the binary convs use: ``sign(q_hat)`` (lns) or ``sign(W)``."""
  from lns_jax.layers import binary_weights
  out = {}
  for path, binarizer in layers.items():
    if binarizer == "float":
      continue
    p = _subtree(params, path)
    mapping = None
    if binarizer == "lns":
      mapping = {"params": p["mapping"], "batch_stats": _subtree(batch_stats, path)["mapping"]}
    w = binary_weights(p["kernel"], binarizer, mapping, weight_scale="none",
                       mapping_output=mapping_output, mapping_init=mapping_init)
    out[path] = (w > 0).astype(jnp.int8) * 2 - 1
  return traverse_util.unflatten_dict(out)


def latent_signs(layers, params, only=("sign", "lns")) -> dict:
  return traverse_util.unflatten_dict({
      path: quantizers.sign(_subtree(params, path)["kernel"]).astype(jnp.int8)
      for path, b in layers.items() if b in only})


def merge_variables(target: dict, source: dict, what: str) -> dict:
  """Copies ``source`` leaves into ``target`` (a fresh init of the stage's model).

  Leaves only in ``target`` must be mapping networks (new in 'warmup'/'lns'); anything
  else missing, extra or of another shape is a :class:`CheckpointMismatchError`.
  """
  flat_t = traverse_util.flatten_dict(flax.core.unfreeze(target))
  flat_s = traverse_util.flatten_dict(flax.core.unfreeze(source))
  extra = [k for k in flat_s if k not in flat_t]
  if extra:
    raise ckpt_lib.CheckpointMismatchError(
        f"{what}: the checkpoint has {'/'.join(extra[0])} (and {len(extra) - 1} more) which the "
        f"configured model does not; it was saved from another model or config.model.")
  out = {}
  for k, v in flat_t.items():
    if k in flat_s:
      if tuple(np.shape(flat_s[k])) != tuple(v.shape):
        raise ckpt_lib.CheckpointMismatchError(
            f"{what}: {'/'.join(k)} has shape {np.shape(flat_s[k])} in the checkpoint but "
            f"{tuple(v.shape)} in the configured model (another width, dataset or model?).")
      out[k] = jnp.asarray(flat_s[k], v.dtype)
    elif "mapping" in k:
      out[k] = v
    else:
      raise ckpt_lib.CheckpointMismatchError(
          f"{what}: the checkpoint lacks {'/'.join(k)}; it was saved from another model.")
  return traverse_util.unflatten_dict(out)


# ------------------------------------------------------------------------- optimizer


def learning_rate_schedule(stage_cfg, steps_per_epoch: int) -> optax.Schedule:
  """The stage's schedule in steps: piecewise constant (paper), cosine or constant."""
  total = max(1, int(round(stage_cfg.epochs * steps_per_epoch)))
  if stage_cfg.schedule == "cosine":
    return optax.cosine_decay_schedule(stage_cfg.lr, total)
  if stage_cfg.schedule == "constant":
    return optax.constant_schedule(stage_cfg.lr)
  boundaries = {int(round(e * steps_per_epoch)): stage_cfg.decay_factor
                for e in stage_cfg.decay_epochs}
  return optax.piecewise_constant_schedule(stage_cfg.lr, boundaries)


def make_optimizer(config, stage: str, schedule) -> optax.GradientTransformation:
  """The stage's optimizer: ``config.<stage>.optimizer``, or ``config.optimizer`` if empty."""
  name = config[stage].optimizer or config.optimizer
  if name == "adam":
    opt = optax.adamw(schedule, weight_decay=config.weight_decay)
  else:
    opt = optax.chain(optax.add_decayed_weights(config.weight_decay),
                      optax.sgd(schedule, momentum=config.momentum or None))
  if stage == "warmup":
    # Only theta trains (DESIGN decision 4); everything else gets a zero update.
    def label(params):
      flat = traverse_util.flatten_dict(params)
      return traverse_util.unflatten_dict(
          {k: "train" if "mapping" in k else "frozen" for k in flat})
    opt = optax.multi_transform({"train": opt, "frozen": optax.set_to_zero()}, label)
  return opt


# ----------------------------------------------------------------------------- steps


def _lns_pairs(updates, labels):
  """``{layer: (q_hat, q_tilde)}`` from the sown collection; q_tilde from W0 if given."""
  flat = traverse_util.flatten_dict(flax.core.unfreeze(updates.get(LNS_COLLECTION, {})))
  flat_labels = traverse_util.flatten_dict(labels) if labels else {}
  pairs = {}
  for key, sown in flat.items():
    path = key[:-1]  # drop the 'pairs' name
    (q_hat, q_tilde), = sown
    if path in flat_labels:
      q_tilde = flat_labels[path].astype(q_hat.dtype)
    pairs["/".join(path)] = (q_hat, q_tilde)
  return pairs


def dead_fractions(config, layers, params, pairs) -> Dict[str, Tuple[Array, int]]:
  """``{layer: (share of its binary weights with a zero STE gradient, count)}``.

  LNS layers: ``sign(q_hat)`` under ``config.mapping.ste`` (zero outside the window
  for ``'window'``, never for ``'clip_grad'``); sign layers: ``|W| > config.model.clip``.
  This is the quantity the 'prove LNS' issue found at 21-34% with a window of 1.
  """
  out = {}
  for path, binarizer in layers.items():
    name = "/".join(path)
    if binarizer == "lns" and name in pairs:
      dead = quantizers.dead_mask(pairs[name][0], config.mapping.ste, config.mapping.clip)
    elif binarizer == "sign":
      dead = quantizers.dead_mask(_subtree(params, path)["kernel"], "window", config.model.clip)
    else:
      continue
    out[name] = (jnp.mean(dead.astype(jnp.float32)), int(dead.size))
  return out


def make_train_step(model, tx, config, stage: str, layers, schedule):
  """Alg. 1 as one jitted step: forward, Eq. 21, gradients to W and theta, update."""
  use_lns = config_lib.STAGE_WEIGHTS[stage] == "lns"
  alpha = float(config.alpha) if use_lns else 0.0
  rho = config.rho
  if isinstance(rho, (list, tuple)):
    rho = tuple(float(r) for r in rho)
  skip_bad = config.on_nonfinite == "skip"

  def loss_fn(params, state, batch):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, updates = model.apply(variables, batch["image"], train=True,
                                  mutable=["batch_stats", LNS_COLLECTION])
    pairs = _lns_pairs(updates, state.labels) if use_lns else {}
    total, aux = loss_lib.lns_objective(logits, batch["label"], pairs, alpha, rho,
                                        config.reduction, batch["mask"])
    aux["dead"] = dead_fractions(config, layers, params, pairs)
    return total, (aux, logits, updates["batch_stats"])

  def step_fn(state: TrainState, batch):
    (total, (aux, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if stage == "warmup":
      # Keep the frozen network's running statistics; only the mappings' move.
      flat_new = traverse_util.flatten_dict(new_bs)
      flat_old = traverse_util.flatten_dict(state.batch_stats)
      new_bs = traverse_util.unflatten_dict(
          {k: flat_new[k] if "mapping" in k else flat_old[k] for k in flat_old})
    # A step is good when its loss, gradients and the parameters it produces are finite;
    # a bad step is not applied, so the state (and every checkpoint) stays good.
    ok = (jnp.isfinite(total) & jnp.isfinite(optax.global_norm(grads))
          & jnp.isfinite(optax.global_norm(params)))
    keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
    first_bad = jnp.where((state.first_bad_step < 0) & ~ok, state.step, state.first_bad_step)
    new_state = state.replace(
        step=state.step + 1,
        params=keep(params, state.params),
        batch_stats=keep(new_bs, state.batch_stats),
        opt_state=keep(opt_state, state.opt_state),
        skipped=state.skipped + (~ok).astype(jnp.int32),
        first_bad_step=first_bad if not skip_bad else state.first_bad_step)
    top1, top5 = metrics_lib.topk_correct(logits, batch["label"], (1, 5), batch["mask"])
    n = jnp.sum(batch["mask"])
    m = {"ce": aux["ce"], "aux_total": aux["aux_total"], "loss": total,
         "top1": top1 / n, "top5": top5 / n, "lr": schedule(state.step),
         "nonfinite": (~ok).astype(jnp.float32)}
    for name, value in aux["aux_layers"].items():
      m[f"aux/{name}"] = value
    counts = {name: n for name, (_, n) in aux["dead"].items()}
    for name, (frac, _) in aux["dead"].items():
      m[f"dead/{name}"] = frac
    if counts:
      m["dead_frac"] = sum(f * counts[k] for k, (f, _) in aux["dead"].items()) / sum(
          counts.values())
    return new_state, m

  return step_fn


def make_eval_step(model):
  def eval_fn(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    top1, top5 = metrics_lib.topk_correct(logits, batch["label"], (1, 5), mask)
    return {"ce_sum": jnp.sum(ce * mask), "top1_sum": top1, "top5_sum": top5,
            "count": jnp.sum(mask)}
  return eval_fn


# ---------------------------------------------------------------------- the workdir


@contextlib.contextmanager
def workdir_lock(workdir: str):
  """An exclusive lock on ``workdir`` (released by the OS even after kill -9).

  One lock file per process of a multi-process run (``.lock`` for process 0, the one
  a single-process run takes, ``.lock.<i>`` for process i): the processes of one run
  share the workdir, another run's process i finds its lock taken.
  """
  pi = jax.process_index()
  path = os.path.join(workdir, ".lock" if pi == 0 else f".lock.{pi}")
  f = open(path, "a+")
  try:
    fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
  except OSError:
    f.close()
    raise WorkdirLockedError(
        f"Another run is using workdir {workdir} (it holds {path}). Wait for it to end, "
        f"or give this run another --workdir.") from None
  try:
    f.seek(0); f.truncate(); f.write(f"{os.getpid()}\n"); f.flush()
    yield
  finally:
    fcntl.flock(f, fcntl.LOCK_UN)
    f.close()


def check_workdir_writable(workdir: str) -> None:
  try:
    os.makedirs(workdir, exist_ok=True)
    probe = os.path.join(workdir, f".write_probe_{jax.process_index()}_{os.getpid()}")
    with open(probe, "w") as f:
      f.write("x" * 4096)
      f.flush()
      os.fsync(f.fileno())
    os.remove(probe)
  except OSError as e:
    raise TrainingError(f"workdir {workdir} is not writable ({e.strerror}); give a "
                        f"--workdir this user can write to, on a disk with free space.") from e


class _Preemption:
  """SIGTERM / SIGINT set a flag; the loop saves a checkpoint and stops cleanly."""

  def __init__(self):
    self.signal = None
    self._old = {}

  def __enter__(self):
    for sig in (signal.SIGTERM, signal.SIGINT):
      try:
        self._old[sig] = signal.signal(sig, self._handle)
      except ValueError:  # not the main thread (e.g. a notebook worker): no handler
        pass
    return self

  def _handle(self, signum, frame):
    if self.signal is not None and signum == signal.SIGINT:
      raise KeyboardInterrupt  # a second Ctrl-C: stop now
    self.signal = signum

  def __exit__(self, *exc):
    for sig, old in self._old.items():
      signal.signal(sig, old)


class Writer:
  """JSONL + TensorBoard, process 0 only."""

  def __init__(self, workdir: str):
    self.enabled = jax.process_index() == 0
    self._tb = None
    if self.enabled:
      self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a")
      try:
        from flax.metrics import tensorboard
        self._tb = tensorboard.SummaryWriter(os.path.join(workdir, "tensorboard"))
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("TensorBoard logging is off (%s).", e)

  def write(self, record: dict, step: Optional[int] = None):
    if not self.enabled:
      return
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._tb is not None and step is not None:
      prefix = f"{record.get('stage', '')}/{record.get('kind', '')}"
      for k, v in record.items():
        if isinstance(v, (int, float)) and k not in ("step", "epoch"):
          self._tb.scalar(f"{prefix}/{k}", v, step)

  def close(self):
    if self.enabled:
      self._jsonl.close()
      if self._tb is not None:
        self._tb.flush()


class Progress:
  """A progress bar with ETA on a terminal; a line per epoch otherwise."""

  def __init__(self, stage, total_steps, start_step):
    self.stage, self.total, self.start = stage, total_steps, start_step
    self.t0 = time.time()
    self.tty = sys.stderr.isatty() and jax.process_index() == 0

  def update(self, step, info=""):
    if not self.tty:
      return
    done = step - self.start
    rate = done / max(time.time() - self.t0, 1e-9)
    eta = (self.total - step) / rate if rate > 0 else float("nan")
    frac = step / max(self.total, 1)
    bar = "#" * int(30 * frac) + "-" * (30 - int(30 * frac))
    sys.stderr.write(f"\r{self.stage:>8} [{bar}] {step}/{self.total} "
                     f"ETA {_fmt_time(eta)} {info}   ")
    sys.stderr.flush()

  def line(self, text):
    if jax.process_index() != 0:
      return
    if self.tty:
      sys.stderr.write("\r" + " " * 100 + "\r")
    print(text, flush=True)


def _fmt_time(s):
  if not math.isfinite(s):
    return "?"
  s = int(s)
  return f"{s // 3600:d}:{s % 3600 // 60:02d}:{s % 60:02d}"


# ----------------------------------------------------------------------------- stage


@dataclasses.dataclass
class StageContext:
  config: ml_collections.ConfigDict
  workdir: str
  stage: str
  mesh: Any
  info: Any
  writer: Writer
  preempt: _Preemption
  stop_at: Optional[Tuple[str, int]] = None


def _host(tree):
  return jax.device_get(tree)


def _flip_rates(prev, now, init):
  """Share of binary weights whose sign changed since ``prev`` and since ``init``."""
  leaves_now = jax.tree.leaves(now)
  total = sum(x.size for x in leaves_now)
  if total == 0:
    return 0.0, 0.0
  since_prev = sum(int(np.sum(a != b)) for a, b in zip(jax.tree.leaves(prev), leaves_now))
  since_init = sum(int(np.sum(a != b)) for a, b in zip(jax.tree.leaves(init), leaves_now))
  return since_prev / total, since_init / total


def evaluate(eval_step, variables, config, split, mesh) -> dict:
  sums = None
  for batch in data_lib.eval_iterator(config, split):
    out = eval_step(variables, parallel.shard_batch(batch, mesh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = _host(sums)
  n = max(float(sums["count"]), 1.0)
  return {"ce": float(sums["ce_sum"]) / n, "top1": float(sums["top1_sum"]) / n,
          "top5": float(sums["top5_sum"]) / n, "count": int(sums["count"])}


def run_stage(ctx: StageContext, start_variables: Optional[dict]) -> dict:
  """Runs (or resumes) one stage; returns its result dict (also in result.json)."""
  config, stage, mesh = ctx.config, ctx.stage, ctx.mesh
  stage_dir = os.path.join(ctx.workdir, stage)
  result_path = os.path.join(stage_dir, "result.json")
  if os.path.exists(result_path):
    with open(result_path) as f:
      result = json.load(f)
    ctx.writer.enabled and print(f"[{stage}] already finished: test top-1 "
                                 f"{result['test']['top1']:.4f}; not run again.")
    return result
  os.makedirs(stage_dir, exist_ok=True)
  stage_cfg = config[stage]
  info = ctx.info
  spe = data_lib.steps_per_epoch(config)
  total_steps = max(1, int(round(stage_cfg.epochs * spe)))
  model = build_model(config, stage, info.num_classes, mesh)
  layers = binary_layers(model, info.image_shape)
  schedule = learning_rate_schedule(stage_cfg, spe)
  tx = make_optimizer(config, stage, schedule)

  rng = jax.random.fold_in(jax.random.key(config.seed), config_lib.STAGES.index(stage))
  x0 = jnp.zeros((1, *info.image_shape), jnp.float32)

  def init_state(start):
    variables = model.init(rng, x0, train=False)
    params, bstats = variables["params"], variables.get("batch_stats", {})
    if start is not None:
      params = merge_variables(params, start["params"], "starting weights")
      bstats = merge_variables(bstats, start["batch_stats"], "starting BatchNorm statistics")
    signs = effective_signs(layers, params, bstats, config.mapping.output, config.mapping.init)
    if start is not None and stage == "warmup":
      # Fig. 3c counts flips of the network being fine-tuned: before warmup that is
      # the baseline, sign(W), not the signs of the freshly initialised mapping.
      signs = latent_signs(layers, params)
    labels = {}
    if config.labels == "pretrained":
      labels = latent_signs(layers, params, only=("lns",))
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params, batch_stats=bstats,
        opt_state=tx.init(params), signs_prev=signs,
        signs_init=latent_signs(layers, params) if start is not None else signs,
        labels=labels, skipped=jnp.zeros((), jnp.int32),
        first_bad_step=-jnp.ones((), jnp.int32))

  replicated = parallel.replicated(mesh)
  # Initialisation runs once: compile it without XLA's optimisation passes, which
  # cost 5-8x more compile time than the unrolled threefry initialisers ever run.
  state = jax.jit(init_state, out_shardings=replicated,
                  compiler_options=compiler_options(fast=True))(start_variables)

  ckpts = ckpt_lib.manager(os.path.join(stage_dir, "checkpoints"), keep=config.keep_checkpoints)
  best = ckpt_lib.manager(os.path.join(stage_dir, "best"), keep=1, best=True)
  final = ckpt_lib.manager(os.path.join(stage_dir, "final"), keep=None)
  restored = ckpt_lib.restore_latest(ckpts, state)
  if restored is not None:
    state, meta, step = restored
    ctx.writer.enabled and print(f"[{stage}] resuming from step {step} "
                                 f"(epoch {meta['epoch']}, batch {meta['batch']}).")
  elif ctx.writer.enabled:
    print(f"[{stage}] {stage_cfg.epochs:g} epoch{'' if stage_cfg.epochs == 1 else 's'} = "
          f"{total_steps} steps of batch "
          f"{config.batch_size} ({config_lib.STAGE_WEIGHTS[stage]} weights); compiling, then a "
          f"line per epoch.", flush=True)
  step = int(state.step)
  best_top1 = -1.0
  if best.best_step() is not None:
    best_top1 = float(best.metrics(best.best_step())["top1"]) if hasattr(best, "metrics") else -1.0

  opts = compiler_options()
  train_step = parallel.jit_data_parallel(
      make_train_step(model, tx, config, stage, layers, schedule), mesh, compiler_options=opts)
  eval_step = jax.jit(make_eval_step(model), in_shardings=(replicated, parallel.batch_sharding(mesh)),
                      out_shardings=replicated, compiler_options=opts)
  signs_fn = jax.jit(functools.partial(effective_signs, layers,
                                       mapping_output=config.mapping.output,
                                       mapping_init=config.mapping.init),
                     out_shardings=replicated,
                     compiler_options=compiler_options(fast=True))

  def meta_for(step):
    return {"stage": stage, "step": int(step), "epoch": int(step // spe),
            "batch": int(step % spe), "steps_per_epoch": spe, "total_steps": total_steps,
            "config": config.to_json_best_effort()}

  def save(mngr, step, state, metrics=None):
    _check_finite(state, stage)
    try:
      ckpt_lib.save(mngr, step, state, meta_for(step), metrics)
    except Exception as e:  # pylint: disable=broad-except
      kept = ckpts.latest_step()
      raise TrainingError(
          f"[{stage}] saving the checkpoint of step {step} in {mngr.directory} failed "
          f"({type(e).__name__}: {str(e)[:200]}). Is the disk full or the folder read-only? "
          f"The previous checkpoint (step {kept}) is kept; free space and run the same "
          f"command again to resume from it.") from e

  progress = Progress(stage, total_steps, step)
  pending, t_log, n_log, wait = [], time.time(), 0, 0.0
  interrupted = None
  images_per_step = config.batch_size
  while step < total_steps:
    epoch, offset = divmod(step, spe)
    it = data_lib.train_iterator(config, epoch=epoch, start_step=offset)
    while step < total_steps:
      t = time.time()
      try:
        batch = next(it)
      except StopIteration:
        break
      wait += time.time() - t
      state, m = train_step(state, parallel.shard_batch(batch, mesh))
      step += 1
      pending.append(m)
      n_log += 1
      signalled = ctx.preempt.signal is not None
      if jax.process_count() > 1:
        # The checkpoint is collective, so all processes must stop after the same step,
        # and a signal may reach them steps apart: they agree at every log step.
        signalled = step % config.log_every_steps == 0 and parallel.any_process(signalled)
      stop_now = signalled or (
          ctx.stop_at is not None and ctx.stop_at[0] == stage and step >= ctx.stop_at[1])
      end_of_epoch = step % spe == 0 or step == total_steps
      if step % config.log_every_steps == 0 or end_of_epoch or stop_now:
        ms = _host(pending)
        pending = []
        mean = {k: float(np.mean([x[k] for x in ms])) for k in ms[0]}
        dt = time.time() - t_log
        record = {"stage": stage, "kind": "train", "step": step, "epoch": step / spe, **mean,
                  "images_per_sec": n_log * images_per_step / max(dt, 1e-9),
                  "input_wait_frac": wait / max(dt, 1e-9)}
        ctx.writer.write(record, step)
        _check_finite(state, stage)
        progress.update(step, f"ce {mean['ce']:.3f} top1 {mean['top1']:.3f}")
        t_log, n_log, wait = time.time(), 0, 0.0
      if end_of_epoch:
        ep = step / spe  # fractional when a stage ends mid-epoch
        signs = signs_fn(state.params, state.batch_stats)
        flips = _flip_rates(_host(state.signs_prev), _host(signs), _host(state.signs_init))
        state = state.replace(signs_prev=signs)
        rec = {"stage": stage, "kind": "epoch", "step": step, "epoch": ep,
               "flip_rate_epoch": flips[0], "flip_rate_init": flips[1]}
        if round(ep) % config.eval_every_epochs == 0 or step == total_steps:
          variables = {"params": state.params, "batch_stats": state.batch_stats}
          ev = evaluate(eval_step, variables, config, "test", mesh)
          rec.update({f"test_{k}": v for k, v in ev.items()})
          if info.num_validation:
            ev_val = evaluate(eval_step, variables, config, "validation", mesh)
            rec.update({f"val_{k}": v for k, v in ev_val.items()})
          sel = rec.get("val_top1", rec["test_top1"])
          if sel > best_top1:
            best_top1 = sel
            _check_finite(state, stage)
            save(best, step, state, metrics={"top1": sel})
        ctx.writer.write(rec, step)
        progress.line(f"[{stage}] epoch {ep:g} step {step}/{total_steps}: train ce "
                      f"{record['ce']:.4f} top1 {record['top1']:.4f}"
                      + (f" | test top1 {rec['test_top1']:.4f} top5 {rec['test_top5']:.4f}"
                         if "test_top1" in rec else "")
                      + f" | flips {flips[0]:.4f}/{flips[1]:.4f}"
                      + f" | {record['images_per_sec']:.0f} img/s")
      if end_of_epoch or step % config.checkpoint_every_steps == 0 or stop_now:
        save(ckpts, step, state)
      if stop_now:
        interrupted = ctx.preempt.signal or "stop_at_step"
        break
    if interrupted:
      break

  if interrupted:
    return {"interrupted": True, "stage": stage, "step": step,
            "signal": int(interrupted) if ctx.preempt.signal else None}

  _check_finite(state, stage)
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  # Fig. 3c's "since the pretrained network": at the end of warmup, the share of signs
  # the mapping has not yet brought back to the baseline's.
  _, since_init = _flip_rates(_host(state.signs_init), _host(signs_fn(
      state.params, state.batch_stats)), _host(state.signs_init))
  result = {"stage": stage, "steps": step, "epochs": step / spe,
            "skipped_steps": int(state.skipped), "flip_rate_init": since_init,
            "test": evaluate(eval_step, variables, config, "test", mesh)}
  if stage == "warmup" and ctx.writer.enabled:
    print(f"[warmup] {100 * since_init:.2f}% of the binary weights' signs still differ "
          f"from the baseline's sign(W).", flush=True)
  if info.num_validation:
    result["validation"] = evaluate(eval_step, variables, config, "validation", mesh)
  if final.latest_step() is None:  # written once; a finished stage's final is never replaced
    save(final, step, state)
  if jax.process_index() == 0:
    tmp = result_path + ".tmp"
    with open(tmp, "w") as f:
      json.dump(result, f, indent=2)
    os.replace(tmp, result_path)
  return result


_FAST_COMPILE = {"xla_backend_optimization_level": 0,
                 "xla_llvm_disable_expensive_passes": True}


def compiler_options(fast=False):
  """XLA options: ``fast`` (or LNS_FAST_COMPILE=1, which the tests set) trades run-time
  speed for a several times quicker compile."""
  fast = fast or os.environ.get("LNS_FAST_COMPILE") == "1"
  return dict(_FAST_COMPILE) if fast else None


def _check_finite(state, stage):
  bad = int(state.first_bad_step)
  if bad >= 0:
    raise TrainingError(
        f"[{stage}] the loss or gradients became NaN/Inf at step {bad}; that step was not "
        f"applied and the last checkpoint is kept. Lower the learning rate, or set "
        f"config.on_nonfinite='skip' to skip such steps.")
  leaves = jax.tree.leaves(state.params)
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
    raise TrainingError(f"[{stage}] the parameters hold NaN/Inf at step {int(state.step)}; "
                        f"the last checkpoint is kept.")


# ------------------------------------------------------------------------ top level


def results_table(results: Dict[str, dict]) -> str:
  """Table 1 style Markdown: each stage's final test (and validation) top-1/top-5."""
  has_val = any("validation" in r for r in results.values())
  head = "| stage | epochs | test top-1 | test top-5 |" + (" val top-1 | val top-5 |" if has_val else "")
  sep = "|---|---:|---:|---:|" + ("---:|---:|" if has_val else "")
  rows = [head, sep]
  for stage, r in results.items():
    row = (f"| {stage} | {r['epochs']:.2f} | {100 * r['test']['top1']:.2f}% | "
           f"{100 * r['test']['top5']:.2f}% |")
    if has_val:
      v = r.get("validation")
      row += (f" {100 * v['top1']:.2f}% | {100 * v['top5']:.2f}% |" if v else " - | - |")
    rows.append(row)
  return "\n".join(rows)


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_at: Optional[Tuple[str, int]] = None) -> dict:
  """Runs ``config.stages`` in ``workdir``; returns ``{stage: result}``.

  ``stop_at=(stage, step)`` stops that stage after that step as a preemption would
  (checkpoint, then return with ``interrupted``); used by tests.
  """
  mesh = parallel.make_mesh()
  config_lib.validate(config, num_devices=mesh.size)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  check_workdir_writable(workdir)
  stages = config_lib.stage_names(config)
  with workdir_lock(workdir), _Preemption() as preempt:
    parallel.main_process_first(data_lib.prepare, config)  # one build into a shared data_dir
    info = data_lib.get_info(config)
    _check_input_shape(config, info)
    start = None
    if config.init_from:
      start = ckpt_lib.load_variables(config.init_from)
      # Fail on a mismatch now, before any stage writes anything.
      probe = build_model(config, stages[0], info.num_classes)
      shapes = jax.eval_shape(lambda: probe.init(jax.random.key(0),
                                                 jnp.zeros((1, *info.image_shape)), train=False))
      merge_variables(shapes["params"], start["params"], f"config.init_from={config.init_from!r}")
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    writer = Writer(workdir)
    results = {}
    try:
      for stage in stages:
        ctx = StageContext(config, workdir, stage, mesh, info, writer, preempt,
                           stop_at=stop_at)
        result = run_stage(ctx, start)
        if result.get("interrupted"):
          if jax.process_index() == 0:
            print(f"[{stage}] stopped at step {result['step']}; checkpoint saved. Resume with "
                  f"the same command:\n  {resume_command(workdir)}", flush=True)
          return {**results, stage: result}
        results[stage] = result
        final = os.path.join(workdir, stage, "final")
        start = ckpt_lib.load_variables(final)
    finally:
      writer.close()
    summary = {"stages": results, "workdir": workdir}
    table = results_table(results)
    if jax.process_index() == 0:
      with open(os.path.join(workdir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=2)
      with open(os.path.join(workdir, "results.md"), "w") as f:
        f.write(table + "\n")
      print("\n" + table, flush=True)
    return results


def resume_command(workdir: str) -> str:
  argv = [a for a in sys.argv if not a.startswith("--workdir")]
  if argv and argv[0].endswith("train.py"):
    return "python " + " ".join(argv + [f"--workdir={workdir}"])
  return f"python train.py --config=... --workdir={workdir}"


def _check_input_shape(config, info):
  model = build_model(config, "pretrain", info.num_classes)
  try:
    jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, *info.image_shape)),
                                      train=False))
  except Exception as e:  # pylint: disable=broad-except
    raise config_lib.ConfigError(
        f"config.data.image_size: model {config.model.name!r} cannot take inputs of shape "
        f"{tuple(info.image_shape)} ({type(e).__name__}); use a larger image_size.") from None
