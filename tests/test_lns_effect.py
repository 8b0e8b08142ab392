"""What makes LNS able to work at all ('prove LNS' issue, parts 1-3).

1. At the auxiliary loss's optimum the classification loss still reaches W and theta.
2. Evaluation, flip rates and the export binarize with the train step's signs, bit for bit.
3. Flip rates count flips of the network being fine-tuned, from the baseline on.
"""

import json
import os

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lns_jax import binary, bitpack, export, loss, metrics, models, quantizers, trainer
from lns_jax import checkpoint as ckpt_lib
from lns_jax import config as config_lib
from lns_jax import data as data_lib
from lns_jax.layers import LNS_COLLECTION, BinaryConv
from lns_testutil import smoke_config

RHO = 0.005


def _fit_mapping_to_aux_loss(ste, clip, steps=300):
  """A BinaryConv('lns') whose mapping (theta) is fitted to Eq. 15-16 alone."""
  layer = BinaryConv(8, weight_binarizer="lns", mapping_ste=ste, mapping_clip=clip)
  x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
  v = layer.init(jax.random.key(1), x)
  params, bstats = v["params"], v["batch_stats"]
  tx = optax.adam(1e-2)
  opt = tx.init(params["mapping"])

  def aux(theta):
    _, upd = layer.apply({"params": {**params, "mapping": theta}, "batch_stats": bstats}, x,
                         mutable=["batch_stats", LNS_COLLECTION])
    (q_hat, q_tilde), = upd[LNS_COLLECTION]["pairs"]
    return loss.lns_loss(q_hat, q_tilde, RHO)

  @jax.jit
  def step(theta, opt):
    g = jax.grad(aux)(theta)
    u, opt = tx.update(g, opt)
    return optax.apply_updates(theta, u), opt

  theta = params["mapping"]
  for _ in range(steps):
    theta, opt = step(theta, opt)
  params = {**params, "mapping": theta}

  def ce(p):
    y = layer.apply({"params": p, "batch_stats": bstats}, x, mutable=["batch_stats"])[0]
    return jnp.sum(y * jnp.linspace(-1, 1, y.size).reshape(y.shape))

  grads = jax.grad(ce)(params)
  _, upd = layer.apply({"params": params, "batch_stats": bstats}, x,
                       mutable=["batch_stats", LNS_COLLECTION])
  q_hat = np.asarray(upd[LNS_COLLECTION]["pairs"][0][0])
  return grads, q_hat


def test_default_rule_keeps_the_classification_gradient_at_the_aux_optimum():
  c = config_lib.base_config()
  grads, q_hat = _fit_mapping_to_aux_loss(c.mapping.ste, c.mapping.clip)
  target = 1 / (1 - 2 * RHO)
  # The mapping did converge to the auxiliary loss's optimum, +-1/(1 - 2 rho) ...
  assert np.median(np.abs(np.abs(q_hat) - target)) < 0.05
  # ... and the classification loss still reaches W and every part of theta.
  assert np.abs(np.asarray(grads["kernel"])).max() > 0
  for leaf in jax.tree.leaves(grads["mapping"]):
    assert np.abs(np.asarray(leaf)).max() > 0


def test_window_of_one_loses_most_of_the_gradient_at_the_aux_optimum():
  # The measured failure of the old default: the optimum sits just outside |q| <= 1.
  _, q_hat = _fit_mapping_to_aux_loss("window", 1.0)
  dead = float(np.mean(quantizers.dead_mask(q_hat, "window", 1.0)))
  assert dead > 0.3
  assert float(np.mean(quantizers.dead_mask(q_hat, "clip_grad", 1.0))) == 0.0


def test_sign_clip_grad_matches_numpy():
  x = np.array([-3.0, -1.0, -0.2, 0.0, 0.5, 2.5], np.float32)
  g = np.array([5.0, -0.3, 2.0, -4.0, 0.7, -1.5], np.float32)
  y, vjp = jax.vjp(lambda t: quantizers.sign_clip_grad(t, 1.0), jnp.asarray(x))
  np.testing.assert_array_equal(np.asarray(y), np.where(x >= 0, 1.0, -1.0))
  np.testing.assert_array_equal(np.asarray(vjp(jnp.asarray(g))[0]), np.clip(g, -1, 1))
  with pytest.raises(ValueError):
    quantizers.sign_clip_grad(x, 0.0)


def test_dead_fraction_logged_per_layer_and_in_total(full_run):
  workdir, _ = full_run
  recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  train = [r for r in recs if r.get("kind") == "train"]
  for stage in ("pretrain", "warmup", "lns"):
    r = next(r for r in train if r["stage"] == stage)
    layers = {k: v for k, v in r.items() if k.startswith("dead/")}
    assert layers and all(0.0 <= v <= 1.0 for v in layers.values())
    assert 0.0 <= r["dead_frac"] <= 1.0
    if stage != "pretrain":  # the default rule never kills the gradient of sign(q_hat)
      assert r["dead_frac"] == 0.0
  pre = next(r for r in train if r["stage"] == "pretrain")
  assert min(pre[k] for k in pre if k.startswith("dead/")) <= pre["dead_frac"] <= max(
      pre[k] for k in pre if k.startswith("dead/"))


def test_dead_fractions_match_numpy():
  c = smoke_config()
  c.mapping.ste, c.mapping.clip = "window", 0.5
  q = jnp.asarray(np.linspace(-1, 1, 36, dtype=np.float32).reshape(3, 3, 2, 2))
  w = jnp.asarray(np.linspace(-2, 2, 18, dtype=np.float32).reshape(3, 3, 1, 2))
  layers = {("a",): "lns", ("b",): "sign", ("c",): "float"}
  out = metrics.dead_fractions(c, layers, {"b": {"kernel": w}, "c": {"kernel": w}},
                               {"a": (q, jnp.sign(q))})
  assert set(out) == {"a", "b"}
  assert float(out["a"][0]) == pytest.approx(np.mean(np.abs(np.asarray(q)) > 0.5))
  assert float(out["b"][0]) == pytest.approx(np.mean(np.abs(np.asarray(w)) > 1.0))
  assert out["a"][1] == 36 and out["b"][1] == 18


@pytest.fixture(scope="module")
def mid_lns(full_run, tmp_path_factory):
  """A run stopped in the middle of an LNS stage with a constant learning rate."""
  workdir, _ = full_run
  cfg = smoke_config(stages="lns", init_from=os.path.join(workdir, "warmup"))
  cfg.lns.epochs = 3
  cfg.lns.schedule = "constant"
  cfg.lns.lr = 0.05
  wd = str(tmp_path_factory.mktemp("mid_lns"))
  out = trainer.train(cfg, wd, stop_at=("lns", 7))
  assert out["lns"]["interrupted"]
  variables = ckpt_lib.load_variables(os.path.join(wd, "lns", "checkpoints"))
  return cfg, variables


@pytest.mark.parametrize("mapping_conv", ["xla", "winograd"])
def test_train_eval_and_export_use_the_same_signs_bit_for_bit(mid_lns, mapping_conv,
                                                              monkeypatch):
  """config.mapping.conv reaches every place that maps weights (DECISIONS 15): with
  'winograd' each of them calls the Winograd conv, with 'xla' none does."""
  from lns_jax import mapping as mapping_lib
  calls = []
  winograd = mapping_lib.winograd_conv3x3
  monkeypatch.setattr(mapping_lib, "winograd_conv3x3", lambda *a: calls.append(1) or winograd(*a))
  counts = []
  cfg, variables = mid_lns
  cfg = cfg.copy_and_resolve_references()
  cfg.mapping.conv = mapping_conv
  info = data_lib.get_info(cfg.data)
  model = models.from_config(cfg, "lns", info.num_classes)
  layers = binary.weight_binarizers(model, info.image_shape)
  batch = next(data_lib.eval_iterator(cfg.data, "test", batch_size=cfg.batch_size))
  x = jnp.asarray(batch["image"])

  def sown(train):
    _, upd = model.apply(variables, x, train=train, mutable=["batch_stats", LNS_COLLECTION])
    flat = flax.traverse_util.flatten_dict(upd[LNS_COLLECTION])
    return {"/".join(k[:-1]): np.asarray(quantizers.sign(v[0][0])) for k, v in flat.items()}

  in_train_step, in_eval = sown(True), sown(False)
  counts.append(len(calls))
  flips = flax.traverse_util.flatten_dict(
      binary.effective_signs(layers, variables["params"], variables["batch_stats"],
                             mapping_conv=cfg.mapping.conv))
  counts.append(len(calls))
  _, members = export.export_arrays(cfg, variables, "lns")
  counts.append(len(calls))
  if mapping_conv == "winograd":
    assert 0 < counts[0] < counts[1] < counts[2]
  else:
    assert counts == [0, 0, 0]
  # The mapping moved during the stage: its running averages lag behind its filters.
  assert len(in_train_step) == sum(b == "lns" for b in layers.values()) > 0
  for name, signs in in_train_step.items():
    np.testing.assert_array_equal(in_eval[name], signs, err_msg=name)
    np.testing.assert_array_equal(np.asarray(flips[tuple(name.split("/"))]), signs, err_msg=name)
    exported = bitpack.unpack_signs_np(members[f"binary/{name}/signs"], signs.shape)
    np.testing.assert_array_equal(np.asarray(exported), signs, err_msg=name)


def test_warmup_flip_rates_start_from_the_baseline(full_run):
  workdir, results = full_run
  recs = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  warm = [r for r in recs if r.get("kind") == "epoch" and r["stage"] == "warmup"]
  # One warmup epoch: both rates compare with the baseline's sign(W), so they agree.
  assert warm and warm[0]["flip_rate_epoch"] == warm[0]["flip_rate_init"]
  assert results["warmup"]["flip_rate_init"] == pytest.approx(warm[-1]["flip_rate_init"])
  assert 0.0 <= results["warmup"]["flip_rate_init"] <= 1.0
