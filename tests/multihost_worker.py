"""One process of the two-process CPU run in ``tests/test_multihost.py``.

  python tests/multihost_worker.py OUT_DIR -- <train.py flags>

Runs ``train.py`` (its ``main``, the same flags and the same error handling) with two
observers that change nothing:

* every checkpoint saved into a stage's ``final/`` folder has its train state recorded
  in ``OUT_DIR/final_<stage>_p<process>.npz``: one entry per leaf, the copy of the
  first local device, after checking that every local device holds the same bytes;
  plus a SHA-256 over all local copies (``OUT_DIR/hashes_p<process>.json``);
* every file this process opens for writing (Python's ``open`` audit event) is listed
  in ``OUT_DIR/writes_p<process>.json``, so the test can tell which process wrote
  the logs and summaries even though both share one workdir.

The environment (``JAX_PLATFORMS``, ``XLA_FLAGS``, the collectives) is set by the test.
"""

import hashlib
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def _parse_argv(argv):
  if "--" not in argv or argv.index("--") != 2:
    raise SystemExit(f"usage: {argv[0]} OUT_DIR -- <train.py flags>")
  return argv[1], argv[3:]


def main():
  out_dir, train_flags = _parse_argv(sys.argv)
  os.makedirs(out_dir, exist_ok=True)
  writes = []

  def audit(event, args):
    if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
      path, mode, flags = (list(args) + [None, None])[:3]
      writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
          isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT))
      if writing:
        writes.append(os.path.abspath(os.fsdecode(path)))

  sys.addaudithook(audit)

  import jax
  import numpy as np
  from lns_jax import checkpoint as ckpt_lib

  hashes = {}
  original_save = ckpt_lib.save

  def recording_save(mngr, step, state, meta, metrics=None):
    original_save(mngr, step, state, meta, metrics)
    if os.path.basename(str(mngr.directory)) != "final":
      return
    stage = meta["stage"]
    pi = jax.process_index()
    flat = _flatten(state)
    digest = hashlib.sha256()
    arrays = {}
    for key in sorted(flat):
      leaf = flat[key]
      shards = [np.asarray(s.data) for s in leaf.addressable_shards]
      for s in shards[1:]:
        if s.shape != shards[0].shape or not np.array_equal(s, shards[0]):
          raise AssertionError(f"process {pi}: {key} differs between local devices")
      if len(shards) != len(jax.local_devices()):
        raise AssertionError(f"process {pi}: {key} is not on every local device")
      for s in shards:
        digest.update(key.encode())
        digest.update(np.ascontiguousarray(s).tobytes())
      arrays[key] = shards[0]
    np.savez(os.path.join(out_dir, f"final_{stage}_p{pi}.npz"), **arrays)
    hashes[stage] = digest.hexdigest()

  def _flatten(state):
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    return {jax.tree_util.keystr(path): leaf for path, leaf in leaves}

  ckpt_lib.save = recording_save

  import train  # the CLI under test (ROOT/train.py)
  from absl import app

  try:
    sys.argv = ["train.py"] + train_flags
    app.run(train.main)
  finally:
    pi = jax.process_index()
    with open(os.path.join(out_dir, f"hashes_p{pi}.json"), "w") as f:
      json.dump({"hashes": hashes, "pid": os.getpid(),
                 "process_count": jax.process_count(),
                 "devices": len(jax.devices()), "local_devices": len(jax.local_devices())}, f)
    with open(os.path.join(out_dir, f"writes_p{pi}.json"), "w") as f:
      json.dump(sorted(set(writes)), f)


if __name__ == "__main__":
  main()
