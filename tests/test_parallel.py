"""Data parallelism on fake CPU devices (tests/conftest.py: 2 in the suite; the main test
below runs itself in a process with 8).

One jitted LNS train step (``lns`` weights, the Eq. 21 objective; built by
``trainer.make_train_step`` and jitted by ``parallel.jit_data_parallel``, exactly as
the trainer does) runs a few steps on the same global batches of real Fashion-MNIST
images, once on 1 device and once on 8. The results must agree: gradients and
BatchNorm statistics are those of the global batch. On 8 devices the mapping networks
are split over the devices by filters (``MappingNet.filter_sharding``): the layer with
8 filters maps one filter per device, the layers with 4 (not a multiple of 8) stay
replicated. The model is a two-block ResNet (4 channels, one downsampling block) so
that the two compiles fit the time budget.
"""

import os
import re
import subprocess
import sys
from collections import Counter

import chex
import jax
import numpy as np
import pytest

from lns_jax import config as config_lib
from lns_jax import data as data_lib
from lns_jax import binary, optim, parallel, trainer
from lns_jax.models.resnet_cifar import ResNetCifar
from lns_testutil import smoke_config

STAGE = "lns"
STEPS = 3
NUM_DEVICES = 8


def _model(config, mesh=None):
  sharding = parallel.batch_sharding(mesh) if mesh is not None and mesh.size > 1 else None
  return ResNetCifar(num_classes=10, stage_sizes=(1, 1), width=4, weight_binarizer="lns",
                     input_binarizer=config.model.input_binarizer,
                     weight_scale=config.model.weight_scale, clip=config.model.clip,
                     mapping_output=config.mapping.output, mapping_clip=config.mapping.clip,
                     mapping_ste=config.mapping.ste, mapping_sharding=sharding)


def _initial_state(config, model, tx, layers, image_shape):
  """The trainer's initial state of a stage started from scratch (host arrays)."""
  def init():
    return trainer.create_train_state(config, STAGE, model, tx, layers, image_shape,
                                      jax.random.key(0))
  # One compile instead of one per operation; XLA's CPU backend takes ~10x longer on
  # the random initializers at its default optimization level than at 0.
  compiled = jax.jit(init).lower().compile({"xla_backend_optimization_level": 0})
  return jax.device_get(compiled())


def _run(devices, make_step, state0, batches):
  mesh = parallel.make_mesh(devices)
  step_fn = make_step(mesh)
  state = jax.device_put(state0, parallel.replicated(mesh))  # a fresh copy (it is donated)
  global_batches = [parallel.shard_batch(b, mesh) for b in batches]
  step = parallel.jit_data_parallel(step_fn, mesh, compiler_options=parallel.compiler_options())
  compiled = step.lower(state, global_batches[0]).compile()
  metrics, donated = [], []
  with jax.transfer_guard("disallow"):  # no implicit host<->device transfer in a step
    for batch in global_batches:
      old = state
      state, m = compiled(state, batch)
      donated.append(all(x.is_deleted() for x in jax.tree.leaves(old.params)))
      metrics.append(m)
  return {"state": state, "metrics": jax.device_get(metrics), "donated": donated,
          "batch": global_batches[0], "hlo": compiled.as_text(),
          "flops": (compiled.cost_analysis() or {}).get("flops")}


def _runs():
  config = smoke_config()  # batch 32 of 128 real Fashion-MNIST images
  info = data_lib.get_info(config.data)
  model = _model(config)
  layers = binary.weight_binarizers(model, info.image_shape)
  spe = data_lib.steps_per_epoch(config.data, config.batch_size)
  schedule = optim.learning_rate_schedule(config[STAGE], spe)
  tx = optim.make_optimizer(config, STAGE, schedule)
  make_step = lambda mesh: trainer.make_train_step(  # noqa: E731
      _model(config, mesh), tx, config, STAGE, layers, schedule)
  batches = list(data_lib.train_iterator(config.data, batch_size=config.batch_size,
                                         seed=config.seed, epoch=0))[:STEPS]
  state0 = _initial_state(config, model, tx, layers, info.image_shape)
  kernels = {path: binary.subtree(state0.params, path)["kernel"].shape for path in layers}
  return {"config": config, "layers": layers, "kernels": kernels, "params0": state0.params,
          "one": _run(jax.devices()[:1], make_step, state0, batches),
          "all": _run(jax.devices(), make_step, state0, batches)}


def test_eight_devices_compute_what_one_device_computes():
  # One test on purpose: its compiled runs live in this process.
  if len(jax.devices()) != NUM_DEVICES:
    # The suite runs on 2 devices (a trainer run costs 15% less CPU than on 8): this
    # test runs in a pytest process of its own with 8 (conftest's LNS_TEST_DEVICES).
    assert os.environ.get("LNS_TEST_DEVICES") != str(NUM_DEVICES), "8 devices not given"
    env = {k: v for k, v in os.environ.items() if k not in ("XLA_FLAGS", "PYTEST_XDIST_WORKER")}
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider",
                        f"{__file__}::test_eight_devices_compute_what_one_device_computes"],
                       env=dict(env, LNS_TEST_DEVICES=str(NUM_DEVICES)), capture_output=True,
                       text=True, cwd=os.path.dirname(os.path.dirname(__file__)), timeout=900)
    assert p.returncode == 0 and "1 passed" in p.stdout, p.stdout[-3000:] + p.stderr[-2000:]
    return
  runs = _runs()
  _check_same_params_and_metrics(runs)
  _check_batch_split_state_replicated_and_donated(runs)
  _check_mapping_split_over_devices_by_filters(runs)


def _check_same_params_and_metrics(runs):
  one, many = runs["one"], runs["all"]
  for name in ("params", "batch_stats", "opt_state"):
    a, b = jax.device_get(getattr(one["state"], name)), jax.device_get(getattr(many["state"], name))
    chex.assert_trees_all_close(a, b, rtol=2e-4, atol=2e-6, custom_message=name)
  assert int(one["state"].step) == int(many["state"].step) == STEPS
  for m1, m8 in zip(one["metrics"], many["metrics"]):
    assert set(m1) == set(m8)
    assert any(k.startswith("aux/") for k in m1)  # the Eq. 21 terms of every LNS layer
    for k in m1:
      np.testing.assert_allclose(m1[k], m8[k], rtol=1e-4, atol=1e-6, err_msg=k)
  # The parameters moved: the comparison is not of two untouched initial states.
  moved = jax.tree.map(lambda a, b: not np.allclose(a, b), runs["params0"],
                       jax.device_get(many["state"].params))
  assert all(jax.tree.leaves(moved))


def _check_batch_split_state_replicated_and_donated(runs):
  many = runs["all"]
  image = many["batch"]["image"]
  assert image.shape[0] == runs["config"].batch_size
  assert len(image.addressable_shards) == NUM_DEVICES
  assert {s.data.shape[0] for s in image.addressable_shards} == {
      runs["config"].batch_size // NUM_DEVICES}
  for leaf in jax.tree.leaves(many["state"]):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == NUM_DEVICES
  assert all(many["donated"]) and all(runs["one"]["donated"])


_CONV = re.compile(r"= f32\[([\d,]*)\]\{[^}]*\} convolution\(.*?window=\{size=(\d+)x(\d+)")


def _mapping_convs(hlo: str) -> Counter:
  """Output shapes of the convolutions of the mapping networks in a compiled program.

  Their inputs are filters seen as k x k images (here 3x3) and they use 3x3 windows;
  the network's own convolutions act on 28/14/7-pixel activations (outputs of that
  size, or windows of that size for their weight gradients).
  """
  shapes = Counter()
  for dims, wh, ww in _CONV.findall(hlo):
    dims = tuple(int(d) for d in dims.split(",") if d)
    if (wh, ww) == ("3", "3") and any(dims[i:i + 2] == (3, 3) for i in range(len(dims) - 1)):
      shapes[dims] += 1
  return shapes


def _check_mapping_split_over_devices_by_filters(runs):
  one, many = _mapping_convs(runs["one"]["hlo"]), _mapping_convs(runs["all"]["hlo"])
  assert one, "no mapping-network convolution found in the compiled step"
  for path, (kh, kw, c, n) in runs["kernels"].items():
    # f_theta's first conv maps the n filters (k x k x c images) to 2c channels: all n
    # on one device; n / 8 per device when n divides, all n (replicated) otherwise.
    assert one[(n, kh, kw, 2 * c)] >= 1, (path, sorted(one))
    per_device = n // NUM_DEVICES if n % NUM_DEVICES == 0 else n
    assert many[(per_device, kh, kw, 2 * c)] >= 1, (path, (per_device, kh, kw, 2 * c),
                                                     sorted(many))
  assert {k[3] for k in runs["kernels"].values()} == {4, 8}  # both cases are exercised
  assert many != one
  # BatchNorm of the split layer reduces its filter statistics across devices.
  assert "all-reduce" in runs["all"]["hlo"]
  # And the network itself is split: its first conv sees 32 / 8 images per device.
  per_device = runs["config"].batch_size // NUM_DEVICES
  assert re.search(rf"f32\[{per_device},28,28,4\]\{{[^}}]*\}} convolution\(", runs["all"]["hlo"])


def test_batch_size_not_divisible_by_devices_is_one_clear_error(tmp_path):
  config = smoke_config(batch_size=36)
  with pytest.raises(config_lib.ConfigError, match=r"^config\.batch_size: 36 must be a multiple "
                                                   r"of the number of devices \(8\); use e\.g\. 32"):
    config_lib.validate(config, num_devices=8)
  config_lib.validate(config, num_devices=4)  # fine on 4 devices
  # train() checks this process's devices before it builds, compiles or writes anything.
  config = smoke_config(batch_size=4 * len(jax.devices()) + 1)
  workdir = tmp_path / "never"
  with pytest.raises(config_lib.ConfigError, match=r"config\.batch_size"):
    trainer.train(config, str(workdir))
  assert not workdir.exists()


def test_shard_batch_assembles_the_global_batch():
  mesh = parallel.make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  out = parallel.shard_batch({"x": x}, mesh)["x"]
  np.testing.assert_array_equal(np.asarray(out), x)
  for shard in out.addressable_shards:
    np.testing.assert_array_equal(np.asarray(shard.data), x[shard.index])
  with pytest.raises(ValueError, match=f"multiple of this process's {mesh.size} devices"):
    parallel.shard_batch({"x": x[:13]}, mesh)


def test_initialize_distributed_from_flags_or_environment(monkeypatch):
  calls = []
  monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(k))
  for var in ("LNS_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS", "LNS_NUM_PROCESSES",
              "LNS_PROCESS_ID", "LNS_COORDINATOR_BIND_ADDRESS"):
    monkeypatch.delenv(var, raising=False)
  assert parallel.initialize_distributed() is False and not calls
  assert parallel.initialize_distributed("10.0.0.1:1234", 4, 3)
  assert calls[-1] == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                       "process_id": 3, "local_device_ids": None}
  monkeypatch.setenv("LNS_COORDINATOR_ADDRESS", "127.0.0.1:999")
  monkeypatch.setenv("LNS_NUM_PROCESSES", "2")
  monkeypatch.setenv("LNS_PROCESS_ID", "1")
  monkeypatch.setenv("LNS_COORDINATOR_BIND_ADDRESS", "127.0.0.1:999")
  assert parallel.initialize_distributed()
  assert calls[-1] == {"coordinator_address": "127.0.0.1:999", "num_processes": 2,
                       "process_id": 1, "local_device_ids": None,
                       "coordinator_bind_address": "127.0.0.1:999"}
  with pytest.raises(ValueError, match="process_id 2 must be in"):
    parallel.initialize_distributed("127.0.0.1:999", 2, 2)
  monkeypatch.setenv("LNS_COORDINATOR_ADDRESS", "auto")
  assert parallel.initialize_distributed()
  assert calls[-1] == {}
  assert parallel.any_process(True) and not parallel.any_process(False)  # one process
