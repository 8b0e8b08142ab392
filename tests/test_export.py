"""Export (binary weights packed 1 bit each) and inference from the export.

The run exported is the session's shared smoke run (conftest ``full_run``:
configs/fashion_mnist_r20.py:smoke, pretrain -> warmup -> lns, trained once for all
end-to-end tests); it is exported twice (lns, pretrain) once for this module.
"""

import hashlib
import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from lns_jax import bitpack, checkpoint, data, export, inference, models, summary

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _config(name, arg=""):
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO, "configs", name + ".py"))
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod.get_config(arg)


def _snapshot(root):
  """Every file under ``root`` with its size, mtime and content hash."""
  out = {}
  for d, _, files in os.walk(root):
    for f in files:
      p = os.path.join(d, f)
      st = os.stat(p)
      with open(p, "rb") as fh:
        out[os.path.relpath(p, root)] = (st.st_size, st.st_mtime_ns,
                                         hashlib.sha256(fh.read()).hexdigest())
  return out


@pytest.fixture(scope="module")
def run(full_run):
  from lns_testutil import smoke_config
  workdir, _ = full_run
  cfg = smoke_config()
  assert cfg.stages == "pretrain,warmup,lns"
  return cfg, workdir


@pytest.fixture(scope="module")
def exported(run, tmp_path_factory):
  cfg, workdir = run
  out = tmp_path_factory.mktemp("export")
  before = _snapshot(workdir)
  lns = export.export(workdir, str(out / "lns.npz"))  # default stage: the last run, lns
  base = export.export(workdir, str(out / "base.npz"), stage="pretrain")
  after = _snapshot(workdir)
  return {"lns": lns, "pretrain": base, "before": before, "after": after}


@pytest.fixture(scope="module")
def test_batches(run):
  cfg, _ = run
  return list(data.eval_iterator(cfg.data, "test", batch_size=cfg.batch_size))


def test_export_leaves_workdir_untouched(exported):
  assert exported["lns"]["stage"] == "lns"
  assert exported["before"] == exported["after"]


def test_file_holds_only_binary_weights_and_fp_layers(run, exported):
  cfg, workdir = run
  header, members = export.read_file(exported["lns"]["out"])
  assert header["format"] == export.FORMAT and header["version"] == export.FORMAT_VERSION
  assert header["model"]["name"] == "resnet_tiny"
  assert header["source"]["stage"] == "lns" and header["source"]["weights"] == "lns"
  assert not any("mapping" in k for k in members)  # no f_theta
  layers = {l["path"]: l for l in header["binary_layers"]}
  assert len(layers) == 6 and all(l["trained_with"] == "lns" for l in layers.values())
  for path, l in layers.items():
    assert f"params/{path}/kernel" not in members  # no latent weights
    signs = members[f"binary/{path}/signs"]
    assert signs.dtype == np.uint8 and signs.size == math.ceil(np.prod(l["shape"]) / 8)
    assert members[f"binary/{path}/scale"].shape == ()  # weight_scale='layer'
  # The exported signs are sign(q_hat) of the eval-mode mapping, not sign(W).
  variables = checkpoint.load_variables(os.path.join(workdir, "lns"))
  from lns_jax.layers import binary_weights
  p = variables["params"]["stage1_block1"]["conv1"]
  mapping = {"params": p["mapping"],
             "batch_stats": variables["batch_stats"]["stage1_block1"]["conv1"]["mapping"]}
  want = np.asarray(binary_weights(p["kernel"], "lns", mapping, weight_scale="none"))
  got = bitpack.unpack_signs_np(members["binary/stage1_block1/conv1/signs"], want.shape)
  np.testing.assert_array_equal(got, want)
  assert members["binary/stage1_block1/conv1/scale"] == pytest.approx(
      float(np.mean(np.abs(p["kernel"]))), rel=1e-6)


@pytest.mark.parametrize("stage", ["lns", "pretrain"])
def test_size_matches_summary(run, exported, stage):
  cfg, _ = run
  r = exported[stage]
  s = summary.summarize(cfg).total()
  # The arrays are exactly what the summary counts (binary layers padded to whole bytes).
  assert r["summary_memory_bits"] == s["memory_bits"]
  assert r["payload_bits"] == s["memory_bits"] + r["padding_bits"]
  assert r["padding_bits"] < 8 * r["num_binary_layers"]
  # The rest of the file is the header and the zip/.npy headers of each member.
  header, members = export.read_file(r["out"])
  header_bytes = len(json.dumps(header, sort_keys=True).encode())
  assert 0 < r["file_bytes"] - r["payload_bytes"] <= header_bytes + 300 * (len(members) + 1)


@pytest.mark.parametrize("stage", ["lns", "pretrain"])
def test_predictions_equal_training_model(run, exported, test_batches, stage):
  """Same argmax and logits as the training model in eval mode, float and packed paths."""
  cfg, workdir = run
  info = data.get_info(cfg.data)
  train_model = models.from_config(cfg, stage, info.num_classes)
  train_apply = jax.jit(lambda v, x: train_model.apply(v, x, train=False))
  variables = checkpoint.load_variables(os.path.join(workdir, stage))
  model = inference.load(exported[stage]["out"], config=cfg)
  correct = count = 0
  for batch in test_batches:
    want = np.asarray(train_apply(variables, batch["image"]))
    got = np.asarray(inference.predict(model, batch["image"]))
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    packed = np.asarray(inference.predict(model, batch["image"], use_packed=True))
    np.testing.assert_array_equal(packed.argmax(-1), want.argmax(-1))
    np.testing.assert_allclose(packed, got, rtol=1e-4, atol=1e-4)
    correct += np.sum((want.argmax(-1) == batch["label"]) * batch["mask"])
    count += np.sum(batch["mask"])
  # evaluate() gives the training model's accuracy, which is what the run reported.
  acc = inference.evaluate(model, cfg)
  with open(os.path.join(workdir, stage, "result.json")) as f:
    reported = json.load(f)["test"]
  assert acc["count"] == reported["count"] == int(count)
  assert acc["top1"] == pytest.approx(correct / count) == pytest.approx(reported["top1"])


def test_damaged_files(exported, tmp_path):
  src = exported["lns"]["out"]
  blob = open(src, "rb").read()
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(blob[: len(blob) // 2])
  with pytest.raises(export.ExportError, match="damaged or truncated"):
    inference.load(str(truncated))
  # One flipped byte inside the packed signs of a layer: the member's CRC (zip) or
  # SHA-256 (header) no longer matches.
  header, members = export.read_file(src)
  needle = members["binary/stage3_block1/conv2/signs"].tobytes()
  pos = blob.find(needle)
  assert pos > 0
  flipped = bytearray(blob)
  flipped[pos + 3] ^= 0xFF
  bad = tmp_path / "flipped.npz"
  bad.write_bytes(bytes(flipped))
  with pytest.raises(export.ExportError, match="damaged"):
    inference.load(str(bad))
  not_npz = tmp_path / "text.npz"
  not_npz.write_text("hello")
  with pytest.raises(export.ExportError, match="damaged or truncated"):
    inference.load(str(not_npz))
  other = tmp_path / "other.npz"
  np.savez(other, x=np.zeros(3))
  with pytest.raises(export.ExportError, match="not an lns-jax export"):
    inference.load(str(other))
  with pytest.raises(export.ExportError, match="no such export file"):
    inference.load(str(tmp_path / "missing.npz"))


def test_mismatched_config_or_model(run, exported, tmp_path):
  cfg, workdir = run
  other = _config("fashion_mnist_r20")  # resnet20, not resnet_tiny
  with pytest.raises(export.ExportMismatchError, match="model.name: export has 'resnet_tiny'"):
    inference.load(exported["lns"]["out"], config=other)
  cifar = _config("cifar10_r20", "smoke")  # resnet_tiny, but 16x16x3 images
  with pytest.raises(export.ExportMismatchError, match="image_shape"):
    inference.load(exported["lns"]["out"], config=cifar)
  model = inference.load(exported["lns"]["out"])
  with pytest.raises(export.ExportMismatchError, match="takes"):
    inference.predict(model, np.zeros((2, 16, 16, 1), np.float32))
  # A checkpoint read with the config of another model.
  variables = checkpoint.load_variables(os.path.join(workdir, "lns"))
  r18 = _config("imagenet_r18", "smoke")
  with pytest.raises(export.ExportMismatchError, match="another model or config"):
    export.export_arrays(r18, variables, "lns")
  with pytest.raises(export.ExportError, match="inside the run's workdir"):
    export.export(workdir, os.path.join(workdir, "x.npz"))
  with pytest.raises(export.ExportError, match="has not finished"):
    export.export(workdir, str(tmp_path / "x.npz"), stage="finetune")


def test_header_records_lns_jax_version_and_config(run, exported):
  """The export says where it came from: the lns-jax that wrote it and the run's config."""
  import tomllib
  import lns_jax
  cfg, workdir = run
  with open(os.path.join(REPO, "pyproject.toml"), "rb") as f:
    assert lns_jax.__version__ == tomllib.load(f)["project"]["version"]
  header, _ = export.read_file(exported["lns"]["out"])
  assert header["lns_jax_version"] == lns_jax.__version__
  assert header["version"] == export.EXPORT_FORMAT_VERSION == export.FORMAT_VERSION
  with open(os.path.join(workdir, "config.json")) as f:
    assert json.loads(header["config"]) == json.load(f)
  model = inference.load(exported["lns"]["out"])
  assert model.config().to_dict() == json.loads(header["config"])
  assert model.config().model.name == cfg.model.name


def test_incompatible_format_version_is_one_clear_error(exported, tmp_path):
  """Another major format version, or a newer minor one, is one line; the CLI exits 2."""
  header, members = export.read_file(exported["pretrain"]["out"])
  major, minor = export.parse_format_version(export.EXPORT_FORMAT_VERSION)

  def rewrite(name, **fields):
    path = tmp_path / name
    export.write_file(str(path), {**header, **fields}, members)
    return str(path)

  # Format 1.0 files (an integer version, no writer version) still load.
  old = rewrite("old.npz", version=1, lns_jax_version=None)
  assert export.read_file(old)[0]["version"] == 1
  for version in (f"{major + 1}.0", f"{major}.{minor + 1}", f"{major - 1}.{minor}", "1.x", None):
    path = rewrite(f"v{version}.npz", version=version, lns_jax_version="9.9.9")
    with pytest.raises(export.ExportVersionError) as e:
      inference.load(path)
    msg = str(e.value)
    assert "\n" not in msg and path in msg and "9.9.9" in msg, msg
    assert "python -m lns_jax.export" in msg, msg
  path = rewrite("v2.npz", version=f"{major + 1}.0", lns_jax_version="9.9.9")
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  env.pop("XLA_FLAGS", None)
  r = subprocess.run([sys.executable, "-m", "lns_jax.inference", f"--export={path}"],
                     cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert r.returncode == 2, r.stderr[-2000:]
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
  assert f"export format {major + 1}.0" in lines[0] and "9.9.9" in lines[0]
