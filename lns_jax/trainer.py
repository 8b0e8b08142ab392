"""Training: the train state, the jitted steps, a stage, and the loop over stages (Alg. 1).

``train(config, workdir)`` runs ``config.stages`` in order, each in ``workdir/<stage>``
(what a stage is: :mod:`lns_jax.stages`), each from the previous stage's final weights
(or ``config.init_from``); a finished stage (``result.json``) is not run again, an
interrupted one resumes from its newest good checkpoint with the same data order.

Parallelism: one ``jax.jit`` over a mesh of every device with a ``data`` axis; the
batch is sharded, the state replicated, so BatchNorm statistics and gradients are
those of the global batch (:mod:`lns_jax.parallel`).

Around it: the model from the config (:func:`lns_jax.models.from_config`), its binary
layers (:mod:`lns_jax.binary`), the optimizer (:mod:`lns_jax.optim`), the run
directory, lock and preemption (:mod:`lns_jax.workdir`), the records, progress and
results table (:mod:`lns_jax.reporting`), the checkpoints (:mod:`lns_jax.checkpoint`).
"""

from __future__ import annotations

import dataclasses
import functools
import os
import time
from typing import Any, Optional, Tuple

import chex
import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from lns_jax import binary
from lns_jax import checkpoint as ckpt_lib
from lns_jax import config as config_lib
from lns_jax import data as data_lib
from lns_jax import distill as distill_lib
from lns_jax import loss as loss_lib
from lns_jax import metrics as metrics_lib
from lns_jax import models, optim, parallel, reporting
from lns_jax import stages as stages_lib
from lns_jax import workdir as workdir_lib
from lns_jax.layers import LNS_COLLECTION
from lns_jax.workdir import NonFiniteError, TrainingError, WorkdirLockedError  # noqa: F401  (raised by train)

Array = jax.Array


@flax.struct.dataclass
class TrainState:
  step: Array
  params: Any
  batch_stats: Any
  opt_state: Any
  # Flip rates (DECISIONS.md 5): effective binary signs at the previous epoch end
  # and of the network the stage started from; int8, one entry per binary layer.
  signs_prev: Any
  signs_init: Any
  # labels='pretrained': sign(W0) of the LNS layers; empty otherwise.
  labels: Any
  skipped: Array           # steps skipped for non-finite values (on_nonfinite='skip')
  first_bad_step: Array    # first step with a non-finite loss or gradient, -1 if none


def create_train_state(config, stage: str, model, tx: optax.GradientTransformation, layers,
                       image_shape, rng, start: Optional[dict] = None) -> TrainState:
  """The state ``stage`` starts from: a fresh init of ``model``, with ``start``'s
  variables (the previous stage's, or ``config.init_from``) copied in when given.

  ``layers``: :func:`lns_jax.binary.weight_binarizers` of ``model``. Pure; the trainer
  jits it once (``parallel.compiler_options(fast=True)``).
  """
  variables = model.init(rng, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  if start is not None:
    variables = ckpt_lib.from_start(variables, start, "starting variables")
  params, bstats = variables["params"], variables.get("batch_stats", {})
  signs = binary.effective_signs(layers, params, bstats, config.mapping.output,
                                 config.mapping.init, config.mapping.conv)
  if start is not None and stages_lib.get(stage).flips_from_latent:
    # Fig. 3c counts flips of the network being fine-tuned: before warmup that is the
    # baseline, sign(W), not the signs of the freshly initialised mapping.
    signs = binary.latent_signs(layers, params)
  labels = {}
  if config.labels == "pretrained":
    labels = binary.latent_signs(layers, params, only=("lns",))
  signs_init = (binary.latent_signs(layers, params) if start is not None
                else jax.tree.map(jnp.copy, signs))
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params, batch_stats=bstats,
      opt_state=tx.init(params), signs_prev=signs, signs_init=signs_init, labels=labels,
      skipped=jnp.zeros((), jnp.int32), first_bad_step=-jnp.ones((), jnp.int32))


# ----------------------------------------------------------------------------- steps


def _check_batch(batch) -> None:
  """The steps' input (chex, at trace time): NHWC images, an int label and a mask each."""
  chex.assert_rank(batch["image"], 4)
  chex.assert_rank([batch["label"], batch["mask"]], 1)
  chex.assert_type(batch["label"], int)
  chex.assert_equal_shape_prefix([batch["image"], batch["label"], batch["mask"]], 1)


def make_train_step(model, tx, config, stage: str, layers, schedule, teacher=None):
  """Alg. 1 as one jitted step: forward, Eq. 21, gradients to W and theta, update.

  ``stage``'s row of :mod:`lns_jax.stages` says whether the objective is Eq. 21 and
  whether the network's BatchNorm statistics move. With a ``teacher``
  (:class:`lns_jax.distill.Teacher`) the step is ``step(state, batch, teacher_variables)``
  and the distribution loss joins the objective.
  """
  table = stages_lib.get(stage)
  alpha = config_lib.stage_alpha(config, stage)
  rho = config.rho
  if isinstance(rho, (list, tuple)):
    rho = tuple(float(r) for r in rho)
  skip_bad = config.on_nonfinite == "skip"

  def loss_fn(params, state, batch):
    variables = {"params": params, "batch_stats": state.batch_stats}
    logits, updates = model.apply(variables, batch["image"], train=True,
                                  mutable=["batch_stats", LNS_COLLECTION])
    logits = logits.astype(jnp.float32)  # config.model.dtype: the loss is float32
    pairs = binary.collect_pairs(updates, state.labels) if table.noisy_supervision else {}
    total, aux = loss_lib.lns_objective(logits, batch["label"], pairs, alpha, rho,
                                        config.reduction, batch["mask"])
    if teacher is not None:  # ReActNet's distribution loss (lns_jax.distill)
      total, aux = teacher.objective(aux, alpha, logits, batch)
    aux["dead"] = metrics_lib.dead_fractions(config, layers, params, pairs)
    return total, (aux, logits, updates["batch_stats"])

  def step_fn(state: TrainState, batch, teacher_variables=None):
    _check_batch(batch)
    if teacher is not None:  # eval mode, no gradient: an input of the objective
      batch = dict(batch, teacher_logits=teacher.logits(teacher_variables, batch["image"]))
    (total, (aux, logits, new_bs)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, state, batch)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if not table.network_bn_moves:  # keep the frozen network's running statistics
      new_bs = binary.keep_network_stats(state.batch_stats, new_bs)
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
    lr = schedule(state.step)
    return new_state, metrics_lib.train_metrics(aux, logits, batch, total, lr, ok)

  return step_fn


def make_eval_step(model):
  def eval_fn(variables, batch):
    _check_batch(batch)
    logits = model.apply(variables, batch["image"], train=False).astype(jnp.float32)
    mask = batch["mask"]
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"])
    top1, top5 = metrics_lib.topk_correct(logits, batch["label"], (1, 5), mask)
    return {"ce_sum": jnp.sum(ce * mask), "top1_sum": top1, "top5_sum": top5,
            "count": jnp.sum(mask)}
  return eval_fn


def evaluate(eval_step, variables, config, split, mesh) -> dict:
  sums = None
  for batch in data_lib.eval_iterator(config.data, split, batch_size=config.batch_size):
    out = eval_step(variables, parallel.shard_batch(batch, mesh))
    sums = out if sums is None else jax.tree.map(jnp.add, sums, out)
  sums = jax.device_get(sums)
  n = max(float(sums["count"]), 1.0)
  return {"ce": float(sums["ce_sum"]) / n, "top1": float(sums["top1_sum"]) / n,
          "top5": float(sums["top5_sum"]) / n, "count": int(sums["count"])}


def check_finite(state, stage):
  """Raises :class:`TrainingError` if a step went non-finite or the parameters are."""
  bad = int(state.first_bad_step)
  if bad >= 0:
    raise NonFiniteError(
        f"[{stage}] the loss or gradients became NaN/Inf at step {bad}; that step was not "
        f"applied and the last checkpoint is kept. Lower the learning rate, or set "
        f"config.on_nonfinite='skip' to skip such steps.")
  leaves = jax.tree.leaves(state.params)
  if not all(bool(jnp.all(jnp.isfinite(x))) for x in leaves):
    raise NonFiniteError(f"[{stage}] the parameters hold NaN/Inf at step {int(state.step)}; "
                        f"the last checkpoint is kept.")


# ----------------------------------------------------------------------------- stage


@dataclasses.dataclass
class StageContext:
  config: ml_collections.ConfigDict
  workdir: str
  stage: str
  mesh: Any
  info: Any
  writer: reporting.Writer
  preempt: workdir_lib.Preemption
  stop_at: Optional[Tuple[str, int]] = None


class _StageRun:
  """One stage: its model, optimizer, checkpoint managers and compiled functions."""

  def __init__(self, ctx: StageContext):
    config, stage, info = ctx.config, ctx.stage, ctx.info
    self.ctx, self.stage, self.table = ctx, stage, stages_lib.get(stage)
    self.spe = data_lib.steps_per_epoch(config.data, config.batch_size)
    self.total_steps = max(1, int(round(config[stage].epochs * self.spe)))
    self.model = models.from_config(config, stage, info.num_classes, ctx.mesh)
    self.layers = binary.weight_binarizers(self.model, info.image_shape)
    schedule = optim.learning_rate_schedule(config[stage], self.spe)
    self.tx = optim.make_optimizer(config, stage, schedule)
    folder = functools.partial(workdir_lib.path, ctx.workdir, stage)
    self.ckpts = ckpt_lib.manager(folder(workdir_lib.CHECKPOINTS), keep=config.keep_checkpoints)
    self.best = ckpt_lib.manager(folder(workdir_lib.BEST), keep=1, best=True)
    self.final = ckpt_lib.manager(folder(workdir_lib.FINAL), keep=None)
    # Steps into an epoch where config.evals_per_epoch > 1 adds a record point.
    k = int(config.evals_per_epoch)
    self.points = {round(j * self.spe / k) for j in range(1, k)} - {0, self.spe}
    self.best_top1 = -1.0
    if self.best.best_step() is not None and hasattr(self.best, "metrics"):
      self.best_top1 = float(self.best.metrics(self.best.best_step())["top1"])
    replicated, opts = parallel.replicated(ctx.mesh), parallel.compiler_options()
    fast = parallel.compiler_options(fast=True)
    teacher = distill_lib.teacher_for(config, ctx.workdir, stage, info.num_classes,
                                      info.image_shape)
    self.train_step = distill_lib.jit_train_step(
        make_train_step(self.model, self.tx, config, stage, self.layers, schedule, teacher),
        teacher, ctx.mesh, compiler_options=opts)
    self.eval_step = jax.jit(make_eval_step(self.model),
                             in_shardings=(replicated, parallel.batch_sharding(ctx.mesh)),
                             out_shardings=replicated, compiler_options=opts)
    self.signs_fn = jax.jit(functools.partial(binary.effective_signs, self.layers,
                                              mapping_output=config.mapping.output,
                                              mapping_init=config.mapping.init,
                                              mapping_conv=config.mapping.conv),
                            out_shardings=replicated, compiler_options=fast)

  # -- restore or init

  def restore_or_init(self, start: Optional[dict]) -> TrainState:
    """The newest good checkpoint of the stage, else a fresh state from ``start``."""
    ctx, config, stage = self.ctx, self.ctx.config, self.stage
    rng = jax.random.fold_in(jax.random.key(config.seed), stages_lib.NAMES.index(stage))
    init = functools.partial(create_train_state, config, stage, self.model, self.tx,
                             self.layers, ctx.info.image_shape, rng)
    # Initialisation runs once: compile it without XLA's optimisation passes, which
    # cost 5-8x more compile time than the unrolled threefry initialisers ever run.
    state = jax.jit(init, out_shardings=parallel.replicated(ctx.mesh),
                    compiler_options=parallel.compiler_options(fast=True))(start)
    restored = ckpt_lib.restore_latest(self.ckpts, state)
    main = parallel.is_main_process()
    if restored is not None:
      state, meta, step = restored
      main and print(f"[{stage}] resuming from step {step} "
                     f"(epoch {meta['epoch']}, batch {meta['batch']}).")
    elif main:
      epochs = config[stage].epochs
      print(f"[{stage}] {epochs:g} epoch{'' if epochs == 1 else 's'} = {self.total_steps} "
            f"steps of batch {config.batch_size} ({self.table.weights} weights); compiling, "
            f"then a line per epoch.", flush=True)
    return state

  def save(self, mngr, step: int, state: TrainState, metrics=None) -> None:
    check_finite(state, self.stage)
    meta = {"stage": self.stage, "step": int(step), "epoch": int(step // self.spe),
            "batch": int(step % self.spe), "steps_per_epoch": self.spe,
            "total_steps": self.total_steps, "config": self.ctx.config.to_json_best_effort()}
    try:
      ckpt_lib.save(mngr, step, state, meta, metrics)
    except Exception as e:  # pylint: disable=broad-except
      kept = self.ckpts.latest_step()
      raise TrainingError(
          f"[{self.stage}] saving the checkpoint of step {step} in {mngr.directory} failed "
          f"({type(e).__name__}: {str(e)[:200]}). Is the disk full or the folder read-only? "
          f"The previous checkpoint (step {kept}) is kept; free space and run the same "
          f"command again to resume from it.") from e

  # -- the loop

  def _should_stop(self, step: int) -> bool:
    ctx = self.ctx
    signalled = ctx.preempt.signal is not None
    if jax.process_count() > 1:
      # The checkpoint is collective, so all processes must stop after the same step,
      # and a signal may reach them steps apart: they agree at every log step.
      signalled = step % ctx.config.log_every_steps == 0 and parallel.any_process(signalled)
    return signalled or (
        ctx.stop_at is not None and ctx.stop_at[0] == self.stage and step >= ctx.stop_at[1])

  def train_loop(self, state: TrainState):
    """Trains to the stage's end or a stop; returns ``(state, step, interrupted)``."""
    config = self.ctx.config
    step = int(state.step)
    progress = reporting.Progress(self.stage, self.total_steps, step)
    meter, record = reporting.Meter(), None
    while step < self.total_steps:
      epoch, offset = divmod(step, self.spe)
      it = data_lib.train_iterator(config.data, batch_size=config.batch_size,
                                   seed=config.seed, epoch=epoch, start_step=offset)
      while step < self.total_steps:
        t = time.time()
        try:
          batch = next(it)
        except StopIteration:
          break
        meter.wait += time.time() - t
        state, m = self.train_step(state, parallel.shard_batch(batch, self.ctx.mesh))
        step += 1
        meter.add(m)
        stop_now = self._should_stop(step)
        end_of_epoch = (step % self.spe == 0 or step == self.total_steps
                        or step % self.spe in self.points)
        if step % config.log_every_steps == 0 or end_of_epoch or stop_now:
          record, meter = self.log_train(state, step, meter, progress), reporting.Meter()
        if end_of_epoch:
          state = self.end_of_epoch(state, step, record, progress)
        if end_of_epoch or step % config.checkpoint_every_steps == 0 or stop_now:
          self.save(self.ckpts, step, state)
        if stop_now:
          return state, step, self.ctx.preempt.signal or "stop_at_step"
    return state, step, None

  def log_train(self, state, step: int, meter: reporting.Meter, progress) -> dict:
    record = meter.record(self.stage, step, self.spe, self.ctx.config.batch_size)
    self.ctx.writer.write(record, step)
    check_finite(state, self.stage)
    progress.update(step, f"ce {record['ce']:.3f} top1 {record['top1']:.3f}")
    return record

  # -- end of epoch, finish

  def evaluate_all(self, state) -> dict:
    """``{'test': ..., 'val': ...}`` (``val`` only with a validation split)."""
    ctx = self.ctx
    variables = {"params": state.params, "batch_stats": state.batch_stats}
    out = {"test": evaluate(self.eval_step, variables, ctx.config, "test", ctx.mesh)}
    if ctx.info.num_validation:
      out["val"] = evaluate(self.eval_step, variables, ctx.config, "validation", ctx.mesh)
    return out

  def end_of_epoch(self, state, step: int, train_record: dict, progress) -> TrainState:
    """Flip rates, evaluation (every ``eval_every_epochs``, or at every point of
    ``evals_per_epoch``), the best checkpoint, a line."""
    config, ep = self.ctx.config, step / self.spe  # fractional when a stage ends mid-epoch
    signs = self.signs_fn(state.params, state.batch_stats)
    flips = metrics_lib.flip_rates(*jax.device_get((state.signs_prev, signs, state.signs_init)))
    state = state.replace(signs_prev=signs)
    evals = {}
    if (self.points or round(ep) % config.eval_every_epochs == 0
        or step == self.total_steps):
      evals = self.evaluate_all(state)
    rec = reporting.epoch_record(self.stage, step, ep, flips, evals)
    if evals:
      sel = rec.get("val_top1", rec["test_top1"])
      if sel > self.best_top1:
        self.best_top1 = sel
        self.save(self.best, step, state, metrics={"top1": sel})
    self.ctx.writer.write(rec, step)
    progress.line(reporting.epoch_line(self.stage, ep, step, self.total_steps, train_record, rec))
    return state

  def finish(self, state, step: int) -> dict:
    """Final evaluation, ``final/`` (once) and ``result.json``: the stage is done."""
    check_finite(state, self.stage)
    # Fig. 3c's "since the pretrained network": at the end of warmup, the share of signs
    # the mapping has not yet brought back to the baseline's.
    init, now = jax.device_get((state.signs_init, self.signs_fn(state.params,
                                                                state.batch_stats)))
    _, since_init = metrics_lib.flip_rates(init, now, init)
    evals = self.evaluate_all(state)
    result = {"stage": self.stage, "steps": step, "epochs": step / self.spe,
              "skipped_steps": int(state.skipped), "flip_rate_init": since_init,
              "test": evals["test"]}
    if self.table.flips_from_latent and parallel.is_main_process():
      print(f"[{self.stage}] {100 * since_init:.2f}% of the binary weights' signs still "
            f"differ from the baseline's sign(W).", flush=True)
    if "val" in evals:
      result["validation"] = evals["val"]
    if self.final.latest_step() is None:  # written once; a finished stage's is never replaced
      self.save(self.final, step, state)
    if parallel.is_main_process():
      workdir_lib.write_json_atomic(
          workdir_lib.path(self.ctx.workdir, self.stage, workdir_lib.RESULT), result)
    return result


def run_stage(ctx: StageContext, start_variables: Optional[dict]) -> dict:
  """Runs (or resumes) one stage; returns its result dict (also in result.json)."""
  stage_dir = workdir_lib.path(ctx.workdir, ctx.stage)
  result_path = os.path.join(stage_dir, workdir_lib.RESULT)
  if os.path.exists(result_path):
    result = workdir_lib.read_json(result_path)
    parallel.is_main_process() and print(f"[{ctx.stage}] already finished: test top-1 "
                                          f"{result['test']['top1']:.4f}; not run again.")
    return result
  os.makedirs(stage_dir, exist_ok=True)
  run = _StageRun(ctx)
  state = run.restore_or_init(start_variables)
  state, step, interrupted = run.train_loop(state)
  if interrupted:
    return {"interrupted": True, "stage": ctx.stage, "step": step,
            "signal": int(interrupted) if ctx.preempt.signal else None}
  return run.finish(state, step)


# ------------------------------------------------------------------------ top level


def _prepare(config, workdir: str, first_stage: str):
  """The data (built once), its info, the starting variables (checked), config.json."""
  parallel.main_process_first(data_lib.prepare, config.data)  # one build into a shared data_dir
  info = data_lib.get_info(config.data)
  models.check_input_shape(config, info.num_classes, info.image_shape)
  distill_lib.check_teacher(config, info.num_classes, info.image_shape)
  start = None
  if config.init_from:
    start = ckpt_lib.load_variables(config.init_from)
    # Fail on a mismatch now, before any stage writes anything.
    probe = models.from_config(config, first_stage, info.num_classes)
    shapes = binary.abstract_variables(probe, info.image_shape)
    ckpt_lib.from_start(shapes, start, f"config.init_from={config.init_from!r}")
  if parallel.is_main_process():
    with open(workdir_lib.path(workdir, workdir_lib.CONFIG), "w") as f:
      f.write(config.to_json_best_effort(indent=2))
  return info, start


def train(config: ml_collections.ConfigDict, workdir: str, *,
          stop_at: Optional[Tuple[str, int]] = None) -> dict:
  """Runs ``config.stages`` in ``workdir``; returns ``{stage: result}``.

  ``stop_at=(stage, step)`` stops that stage after that step as a preemption would
  (checkpoint, then return with ``interrupted``); used by tests.
  """
  mesh = parallel.make_mesh()
  config_lib.validate(config, num_devices=mesh.size)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  workdir_lib.check_writable(workdir)
  stages = config_lib.stage_names(config)
  with workdir_lib.lock(workdir), workdir_lib.Preemption() as preempt:
    info, start = _prepare(config, workdir, (stages_lib.chained(stages) or stages)[0])
    writer = reporting.Writer(workdir)
    results = {}
    try:
      for stage in stages:
        ctx = StageContext(config, workdir, stage, mesh, info, writer, preempt, stop_at=stop_at)
        standalone = stages_lib.get(stage).standalone  # a teacher: fresh, starts nothing
        result = run_stage(ctx, None if standalone else start)
        if result.get("interrupted"):
          if parallel.is_main_process():
            print(f"[{stage}] stopped at step {result['step']}; checkpoint saved. Resume with "
                  f"the same command:\n  {workdir_lib.resume_command(workdir)}", flush=True)
          return {**results, stage: result}
        results[stage] = result
        if not standalone:
          start = ckpt_lib.load_variables(workdir_lib.path(workdir, stage, workdir_lib.FINAL))
    finally:
      writer.close()
    reporting.write_summary(workdir, results)
    return results
