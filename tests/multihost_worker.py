"""One process of the two-process CPU runs in ``tests/test_multihost.py``.

  python tests/multihost_worker.py OUT_DIR -- <train.py flags>

Runs ``train.py``'s ``main`` (the same flags, distributed start-up and error handling)
with observers that change nothing in the run:

* every train state saved into a stage's ``final/`` folder is recorded, after checking
  that all local devices hold the same bytes: ``OUT_DIR/final_<stage>_p<i>.npz`` (the
  first local copy of every leaf) and a SHA-256 over all local copies;
* after training, each final checkpoint is restored collectively (all processes,
  ``lns_jax.checkpoint.restore`` into the in-memory state's shardings) and compared
  with the state that was saved;
* the examples of every training batch this process reads (a hash per image) go to
  ``OUT_DIR/batches_p<i>.json``, so the test can check that each process reads only
  its own shard;
* every file this process opens for writing from Python (the ``open`` audit event)
  is listed, so the test can tell which process wrote the logs and summaries even
  though both share one workdir.

It all ends up in ``OUT_DIR/report_p<i>.json``. ``LNS_TEST_SIGTERM_AT=stage:step:process``
makes that process send itself SIGTERM while reading the batch of that step (a
preemption notice that reaches one host only).

The model ``resnet_micro`` (one basic block per stage, 4 channels: the smallest
ResNet with a downsampling block) is registered here, for the test only, to keep its
compile times small. The environment (``JAX_PLATFORMS``, ``XLA_FLAGS``, the
collectives) is set by the test.
"""

import functools
import hashlib
import json
import os
import signal
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def main():
  if len(sys.argv) < 3 or sys.argv[2] != "--":
    raise SystemExit(f"usage: {sys.argv[0]} OUT_DIR -- <train.py flags>")
  out_dir, train_flags = sys.argv[1], sys.argv[3:]
  os.makedirs(out_dir, exist_ok=True)
  writes = set()

  def audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
      path, mode, flags = (list(args) + [None, None])[:3]
      if (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT)):
        writes.add(os.path.abspath(os.fsdecode(path)))

  sys.addaudithook(audit)

  import jax
  import numpy as np
  from lns_jax import checkpoint as ckpt_lib
  from lns_jax import data as data_lib
  from lns_jax import models
  from lns_jax.models.resnet_cifar import ResNetCifar

  models.MODELS.setdefault("resnet_micro",
                           functools.partial(ResNetCifar, stage_sizes=(1, 1), width=4))
  report = {"hashes": {}, "restored_equal": {}, "batches": {}, "pid": os.getpid()}
  finals = {}

  def flatten(state):
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}

  def local_copy(key, leaf):
    shards = [np.asarray(s.data) for s in leaf.addressable_shards]
    if len(shards) != len(jax.local_devices()):
      raise AssertionError(f"{key} is not on every local device")
    for s in shards[1:]:
      if s.shape != shards[0].shape or not np.array_equal(s, shards[0]):
        raise AssertionError(f"{key} differs between the local devices")
    return shards

  original_save = ckpt_lib.save

  def recording_save(mngr, step, state, meta, metrics=None):
    original_save(mngr, step, state, meta, metrics)
    if os.path.basename(str(mngr.directory)) != "final":
      return
    stage, pi = meta["stage"], jax.process_index()
    digest, arrays = hashlib.sha256(), {}
    for key, leaf in sorted(flatten(state).items()):
      shards = local_copy(key, leaf)
      for s in shards:
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(s).tobytes())
      arrays[key] = shards[0]
    np.savez(os.path.join(out_dir, f"final_{stage}_p{pi}.npz"), **arrays)
    report["hashes"][stage] = digest.hexdigest()
    finals[stage] = (str(mngr.directory), step, state)

  ckpt_lib.save = recording_save

  sigterm_at = os.environ.get("LNS_TEST_SIGTERM_AT")
  original_train_iterator = data_lib.train_iterator

  def recording_train_iterator(data, *, batch_size, epoch, start_step=0, **kwargs):
    stage = getattr(recording_train_iterator, "stage", "?")
    spe = data_lib.steps_per_epoch(data, batch_size)
    for i, batch in enumerate(original_train_iterator(data, batch_size=batch_size, epoch=epoch,
                                                      start_step=start_step, **kwargs)):
      step = epoch * spe + start_step + i + 1  # the step this batch makes
      report["batches"].setdefault(f"{stage}/{epoch}", []).append(
          [hashlib.sha1(np.ascontiguousarray(im).tobytes()).hexdigest() for im in batch["image"]])
      if sigterm_at:
        s_stage, s_step, s_proc = sigterm_at.split(":")
        if (s_stage, int(s_step), int(s_proc)) == (stage, step, jax.process_index()):
          os.kill(os.getpid(), signal.SIGTERM)
      yield batch

  data_lib.train_iterator = recording_train_iterator
  from lns_jax import trainer
  original_run_stage = trainer.run_stage

  def run_stage(ctx, start):
    recording_train_iterator.stage = ctx.stage
    return original_run_stage(ctx, start)

  trainer.run_stage = run_stage

  def check_restore():
    for stage, (directory, step, state) in finals.items():
      mngr = ckpt_lib.manager(directory, read_only=True)
      restored, _ = ckpt_lib.restore(mngr, step, state)
      saved, back = flatten(state), flatten(restored)
      report["restored_equal"][stage] = set(saved) == set(back) and all(
          all(np.array_equal(a, b) for a, b in zip(local_copy(k, saved[k]),
                                                   local_copy(k, back[k])))
          for k in saved)

  import train  # the CLI under test (ROOT/train.py)
  from absl import app

  def main_then_check(argv):
    train.main(argv)  # exits on errors and on preemption
    check_restore()

  try:
    sys.argv = ["train.py"] + train_flags
    app.run(main_then_check)
  finally:
    report.update(process_index=jax.process_index(), process_count=jax.process_count(),
                  devices=len(jax.devices()), local_devices=len(jax.local_devices()),
                  writes=sorted(writes))
    with open(os.path.join(out_dir, f"report_p{jax.process_index()}.json"), "w") as f:
      json.dump(report, f)


if __name__ == "__main__":
  main()
