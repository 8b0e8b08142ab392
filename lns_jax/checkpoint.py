"""Orbax checkpoints of a stage: the last N, the best, and the final one.

Layout of a stage folder ``DIR/<stage>/``::

  checkpoints/<step>/{state,meta}   the last ``keep`` (resume from the newest good one)
  best/<step>/{state,meta}          the best eval top-1 so far
  final/<step>/{state,meta}         written once when the stage ends; never overwritten
  result.json                       written after final/: the stage is done

``state`` is the whole train state (params, BatchNorm statistics, optimizer state,
step, flip-rate references, counters); ``meta`` is JSON: epoch, position in the
epoch, the config. Orbax writes each step into a temporary folder and renames it
when complete, so a half-written checkpoint is never listed; one that is listed but
damaged fails to restore, and :func:`restore_latest` falls back to the one before.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Optional, Tuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from lns_jax import binary, parallel
from lns_jax import workdir as workdir_lib


class CheckpointMismatchError(ValueError):
  """A checkpoint does not fit the model or config it is loaded into."""


def manager(directory: str, keep: Optional[int] = None, best: bool = False,
            read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      best_fn=(lambda m: m["top1"]) if best else None,
      best_mode="max",
      create=not read_only,
      read_only=read_only,
      # Synchronous saves: a save that returns is on disk, so a kill -9 right after
      # it loses nothing, and a failed save raises where it happened.
      enable_async_checkpointing=False,
  )
  return ocp.CheckpointManager(os.path.abspath(directory), options=options,
                               item_names=(workdir_lib.STATE, workdir_lib.META))


def save(mngr: ocp.CheckpointManager, step: int, state: Any, meta: dict,
         metrics: Optional[dict] = None) -> None:
  mngr.save(int(step), args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                               meta=ocp.args.JsonSave(meta)),
            metrics=metrics, force=True)
  mngr.wait_until_finished()


def restore(mngr: ocp.CheckpointManager, step: int, target: Any) -> Tuple[Any, dict]:
  """Restores ``step`` into the structure (and shardings) of ``target``."""
  abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
  out = mngr.restore(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract), meta=ocp.args.JsonRestore()))
  return out["state"], dict(out["meta"])


def restore_latest(mngr: ocp.CheckpointManager, target: Any):
  """The newest checkpoint that restores; damaged ones are skipped with a warning.

  Returns ``(state, meta, step)`` or ``None`` when no checkpoint restores.
  """
  damaged = []
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, meta = restore(mngr, step, target)
      break
    except Exception as e:  # pylint: disable=broad-except
      reason = f"{type(e).__name__}: {str(e).splitlines()[0][:200] if str(e) else ''}"
      damaged.append(step)
      logging.warning("Checkpoint %s/%d is damaged and was skipped (%s); trying the "
                      "previous one.", mngr.directory, step, reason)
      if parallel.is_main_process():
        print(f"warning: checkpoint {mngr.directory}/{step} is damaged and was skipped "
              f"({reason}).", flush=True)
  else:
    state = None
  # Move damaged steps aside (never delete: they may matter to someone), so that
  # saving that step again later does not collide with them.
  if damaged and parallel.is_main_process():
    for bad in damaged:
      src = os.path.join(str(mngr.directory), str(bad))
      if os.path.isdir(src):
        os.rename(src, os.path.join(str(mngr.directory), f"damaged-{bad}-{os.getpid()}"))
  if damaged:
    parallel.sync("lns_jax.checkpoint.restore_latest")  # every process sees the renames
    mngr.reload()
  if state is None:
    return None
  return state, meta, step


def _restore_numpy(state_dir: str):
  """Every leaf as a host NumPy array, whatever the devices or processes that saved it.

  Without restore arguments orbax would rebuild the saved shardings, which name the
  saving run's devices: a checkpoint of a multi-process (or 8-device) run would not
  load on one device.
  """
  from etils import epath
  tree = ocp.PyTreeCheckpointHandler().metadata(epath.Path(state_dir)).tree
  args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), tree)
  return ocp.PyTreeCheckpointer().restore(state_dir, restore_args=args)


def load_variables(path: str) -> dict:
  """Reads ``{'params', 'batch_stats'}`` of a saved stage for ``init_from``.

  ``path`` is a stage folder (``DIR/pretrain``), its ``final`` folder, or a
  ``checkpoints/<step>`` folder. Arrays come back as host NumPy arrays.
  """
  path = os.path.abspath(os.path.expanduser(path))
  candidates = [path]
  for sub in (workdir_lib.FINAL, workdir_lib.CHECKPOINTS):
    if os.path.isdir(os.path.join(path, sub)):
      candidates.insert(0, os.path.join(path, sub))
  for cand in candidates:
    if os.path.isdir(os.path.join(cand, workdir_lib.STATE)):
      state_dir = os.path.join(cand, workdir_lib.STATE)
      break
    steps = [d for d in os.listdir(cand) if d.isdigit()] if os.path.isdir(cand) else []
    if steps:
      state_dir = os.path.join(cand, max(steps, key=int), workdir_lib.STATE)
      break
  else:
    raise CheckpointMismatchError(
        f"config.init_from={path!r}: no checkpoint there. Give a stage folder of a "
        f"finished run (e.g. WORKDIR/pretrain) or its final/ folder.")
  try:
    tree = _restore_numpy(state_dir)
  except Exception as e:  # pylint: disable=broad-except
    raise CheckpointMismatchError(
        f"config.init_from={path!r}: could not read {state_dir} ({type(e).__name__}: "
        f"{str(e).splitlines()[0][:200] if str(e) else ''}).") from e
  if not isinstance(tree, dict) or "params" not in tree:
    raise CheckpointMismatchError(f"config.init_from={path!r}: {state_dir} holds no params.")
  return {"params": tree["params"], "batch_stats": tree.get("batch_stats", {})}


def load_meta(step_dir: str) -> dict:
  """The JSON ``meta`` item of a checkpoint step folder (``{}`` if it has none)."""
  from etils import epath
  meta_dir = os.path.join(step_dir, workdir_lib.META)
  if not os.path.isdir(meta_dir):
    return {}
  try:
    return dict(ocp.JsonCheckpointHandler().restore(epath.Path(meta_dir)))
  except FileNotFoundError:  # a meta folder without its file: no meta
    return {}


def from_start(variables: dict, start: dict, what: str) -> dict:
  """:func:`lns_jax.binary.from_baseline` (``start``'s leaves copied into ``variables``, a
  fresh init of the stage's model; only f_theta may be new), a mismatch raised as
  :class:`CheckpointMismatchError`."""
  try:
    return binary.from_baseline(variables, start, what)
  except ValueError as e:
    raise CheckpointMismatchError(str(e)) from None
