"""Deployment with Larq Compute Engine (python -m lns_jax.deploy, issue 24).

Every model at smoke size with random weights: exported, converted in the deployment
environment (.venv-lce), its LceBconv2d ops counted from the flatbuffer, its logits in
LCE's interpreter compared with lns_jax.inference's; the session's Fashion-MNIST smoke
run end to end through the CLI; bad input through the CLI. Skipped when the deployment
environment is absent (.ci/run builds it).

Tolerance: LCE computes a binary conv as an exact integer popcount times the fused
scale/BatchNorm multiplier, lns-jax as a float32 conv of ±s values then BatchNorm, so
logits agree to float32 rounding: ``atol = 1e-4 + 1e-5 * max|logit|`` (measured up to
1e-5 here), and the same top-1.
"""

import ast
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from lns_jax import data, deploy, export, inference, models
from lns_testutil import assert_one_error_line, load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONVERTER = os.path.join(REPO, "lns_jax", "deploy_lce.py")


def _have_env():
  try:
    deploy.lce_python()
    return True
  except deploy.DeployError:
    return False


needs_lce = pytest.mark.skipif(
    not _have_env(), reason=f"no deployment environment ({deploy.DEFAULT_PYTHON} or "
    f"${deploy.ENV_VAR}); create it with: {deploy.CREATE}")

# (config, argument, overrides). The ResNet-18s at 128x128: at 32x32 their last stage is
# 1x1 (2x2 before it), where LCE's optimised x86 bconv kernel and its reference kernel
# disagree for a 3x3 SAME conv on a 2x2 map (the reference kernel matches lns-jax); the
# paper's 224x224 never goes below 7x7.
MODELS = {
    "resnet_tiny": ("fashion_mnist_r20.py", "smoke", {}),
    "resnet18_tiny": ("imagenet_r18.py", "smoke", {"image_size": 128}),
    "resnet18_dorefa_tiny": ("imagenet_r18.py", "smoke,dorefa", {"image_size": 128}),
    "alexnet_tiny": ("imagenet_alexnet.py", "smoke", {}),
    # ReActNet (issue 32): RSign's threshold before LceQuantize, RPReLU, concatenated convs;
    # reactnet_tiny (the 3x3 stem) is converted trained, in tests/test_reactnet_train.py.
    "reactnet18_tiny": ("imagenet_reactnet.py", "smoke", {"image_size": 128}),
}


def random_export(name, path, seed=0):
  """Writes an export of ``name`` (a key of MODELS) with random weights and statistics."""
  cfg_name, arg, overrides = MODELS[name]
  cfg = load_config(cfg_name, arg)
  for k, v in overrides.items():
    cfg.data[k] = v
  assert cfg.model.name == name
  info = data.get_info(cfg.data)
  model = models.from_config(cfg, "pretrain", info.num_classes)
  # Only the shapes: every value is drawn below (no XLA compile of the init).
  variables = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(seed),
                                                jnp.zeros((1, *info.image_shape)), train=False))
  rng = np.random.RandomState(seed)
  draw = {"var": lambda s: rng.uniform(0.5, 2.0, s), "mean": lambda s: rng.normal(0, 0.3, s),
          "scale": lambda s: rng.uniform(0.5, 1.5, s), "bias": lambda s: rng.normal(0, 0.3, s),
          "slope": lambda s: rng.uniform(0, 0.5, s), "beta": lambda s: rng.normal(0, 0.3, s),
          "gamma": lambda s: rng.normal(0, 0.3, s), "zeta": lambda s: rng.normal(0, 0.3, s)}
  out = {}
  for col, tree in variables.items():
    flat = traverse_util.flatten_dict(tree)
    out[col] = traverse_util.unflatten_dict({
        k: np.asarray(draw.get(k[-1], lambda s: rng.normal(0, 0.1, s))(a.shape), np.float32)
        for k, a in flat.items()})
  header, members = export.export_arrays(cfg, out, "pretrain")
  export.write_file(str(path), header, members)
  return info


def _cli(args, **env_overrides):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu", **env_overrides)
  env.pop("XLA_FLAGS", None)
  return subprocess.run([sys.executable, "-m", "lns_jax.deploy", *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)


def _one_error_line(r):
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == 2, r.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-2000:]
  return lines[0]


def test_converter_matches_lns_jax():
  """The converter (run by path in the other environment) agrees with lns-jax's tables."""
  src = open(CONVERTER).read()
  tree = ast.parse(src)
  consts = {t.id: ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
            for t in n.targets if isinstance(t, ast.Name) and t.id in ("READS_FORMAT",
                                                                       "FAMILIES", "FORMAT")}
  assert consts["READS_FORMAT"] == export.parse_format_version(export.EXPORT_FORMAT_VERSION)
  assert consts["FORMAT"] == export.FORMAT
  # Every model but the real-valued teachers (config.distill), which have no binary conv.
  assert set(consts["FAMILIES"]) == set(models.MODELS) - set(models.TEACHERS)
  # No JAX and nothing of the lns_jax package: it runs where neither is installed.
  imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import)
             for a in n.names}
  imports |= {n.module.split(".")[0] for n in ast.walk(tree)
              if isinstance(n, ast.ImportFrom) and n.module}
  assert not imports & {"jax", "flax", "lns_jax"}, imports


def _assert_ops(ops, header):
  """Every binary conv an LceBconv2d; LCE's ops only the binary ones."""
  n_binary = len(header["binary_layers"])
  assert ops["LceBconv2d"] == n_binary > 0, ops
  assert ops["LceQuantize"] <= n_binary
  # Full-precision layers are TFLite builtins; LCE's ops are only the binary ones.
  assert {k for k in ops if not k.isupper()} <= {"LceBconv2d", "LceQuantize"}, ops
  assert ops.get("CONV_2D", 0) == sum(1 for k in header["arrays"]
                                      if k.startswith("params/") and k.endswith("/kernel")
                                      and "/head/" not in k and "/fc8/" not in k)


# resnet_tiny is converted trained, in test_fashion_mnist_end_to_end.
@needs_lce
@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(set(MODELS) - {"resnet_tiny"}))
def test_every_binary_conv_is_an_lce_bconv_and_logits_match(name, tmp_path):
  info = random_export(name, tmp_path / "m.npz")
  header, _ = export.read_file(str(tmp_path / "m.npz"))
  report = deploy.convert(str(tmp_path / "m.npz"), str(tmp_path / "m.tflite"))
  # The converter counts the ops from the flatbuffer's operator codes; reading them again
  # from the written file (deploy.op_counts) is test_fashion_mnist_end_to_end's.
  _assert_ops(report["ops"], header)
  images = np.random.RandomState(1).normal(0, 1, (6, *info.image_shape)).astype(np.float32)
  want = np.asarray(inference.predict(inference.load(str(tmp_path / "m.npz")), images))
  for runtime in ("lce", "lce_ref"):
    got, _ = deploy.run(str(tmp_path / "m.tflite"), images, runtime=runtime)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 + 1e-5 * np.abs(want).max(),
                               err_msg=runtime)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


@needs_lce
@pytest.mark.slow
def test_fashion_mnist_end_to_end(full_run, tmp_path):
  """The session's smoke run (resnet_tiny, trained): export, CLI conversion, every binary
  conv an LceBconv2d, the same logits on its test images through both LCE kernels."""
  from lns_testutil import smoke_config
  workdir, _ = full_run
  cfg = smoke_config()
  npz, fb = tmp_path / "fmnist.npz", tmp_path / "fmnist.tflite"
  export.export(workdir, str(npz))
  r = _cli([f"--export={npz}", f"--out={fb}"])
  assert r.returncode == 0, r.stderr[-2000:]
  header, _ = export.read_file(str(npz))
  n = len(header["binary_layers"])
  assert f"{n} LceBconv2d ops for the export's {n} binary convs" in r.stdout, r.stdout
  assert "summary memory" in r.stdout and fb.stat().st_size > 0
  _assert_ops(deploy.op_counts(str(fb)), header)
  model = inference.load(str(npz))
  images = np.concatenate([b["image"] for b in data.eval_iterator(cfg.data, "test",
                                                                  batch_size=cfg.batch_size)])
  want = np.asarray(inference.predict(model, images, use_packed=True))
  for runtime in ("lce", "lce_ref"):
    got, _ = deploy.run(str(fb), images, runtime=runtime)
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1), err_msg=runtime)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 + 1e-5 * np.abs(want).max(),
                               err_msg=runtime)


@needs_lce
@pytest.mark.slow
def test_bad_input_is_one_error_line_and_nothing_written(cli, tmp_path):
  src = tmp_path / "m.npz"
  random_export("resnet_tiny", src)
  header, members = export.read_file(str(src))
  truncated = tmp_path / "truncated.npz"
  truncated.write_bytes(src.read_bytes()[:2000])
  newer = tmp_path / "newer.npz"
  export.write_file(str(newer), {**header, "version": "2.0", "lns_jax_version": "9.9.9"},
                    members)
  other = tmp_path / "vgg.npz"
  export.write_file(str(other), {**header, "model": {**header["model"], "name": "vgg16"}},
                    members)
  # The first as typed, in a fresh interpreter; the others through conftest's zygote.
  for i, (path, message) in enumerate(((truncated, "damaged or truncated"),
                                       (newer, "export format 2.0"),
                                       (other, "'vgg16' is not supported"),
                                       (tmp_path / "missing.npz", "no such export file"))):
    out = tmp_path / f"{path.stem}.tflite"
    args = [f"--export={path}", f"--out={out}"]
    if i == 0:
      line = _one_error_line(_cli(args))
    else:
      line = assert_one_error_line(cli.run("lns_jax.deploy", *args))
    assert message in line and "Traceback" not in line, line
    assert not out.exists() and not list(tmp_path.glob("*.tflite*")), line


def test_missing_environment_is_one_error_line(tmp_path):
  out = tmp_path / "m.tflite"
  line = _one_error_line(_cli([f"--export={tmp_path / 'x.npz'}", f"--out={out}"],
                              LNS_LCE_PYTHON=str(tmp_path / "no-venv" / "bin" / "python")))
  assert "deployment environment is missing" in line and deploy.CREATE in line, line
  assert not out.exists()
