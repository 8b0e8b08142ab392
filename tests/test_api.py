"""LNS in one's own model (issue 31): the public API as a user calls it, from ``lns_jax``.

* ``collect_pairs``: a layer applied twice is one entry (one W, one auxiliary term), the
  pairs of this apply even when an old ``'lns'`` collection is passed back in;
* ``lns_objective`` / ``auxiliary_losses`` refuse the raw collection (naming
  ``collect_pairs``) and ``alpha > 0`` without pairs (naming ``mutable``);
* integer inputs: every pure function computes in float (the float path's values);
* rho: a number, a tuple, a list, a 0-d or shape-(2,) array, eager and under ``jit``;
  strings, three values, negative rates refused;
* the warm start (``train_mapping_only``, ``keep_network_stats``) and ``from_baseline``;
* the trainer's step is the step a user writes by hand with flax and optax, bit for bit.

References are NumPy (Eq. 15, the cross-entropy) or plain flax/optax code.
"""

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import lns_jax

X = jax.random.normal(jax.random.key(0), (4, 6, 6, 4))
Y = jnp.asarray([0, 1, 2, 1])


class Shared(nn.Module):
  """One BinaryConv applied twice (a shared module), then a classifier."""

  @nn.compact
  def __call__(self, x, train=True):
    conv = lns_jax.BinaryConv(4, weight_binarizer="lns")
    x = conv(conv(x, train), train)
    return nn.Dense(3)(x.mean((1, 2)))


def np_lns(q_hat, q_tilde, rho_pos, rho_neg):
  """Eq. 15, element by element, float64."""
  qh, qt = np.asarray(q_hat, np.float64), np.asarray(q_tilde, np.float64)
  same = np.where(qt > 0, rho_pos, rho_neg)
  other = np.where(qt > 0, rho_neg, rho_pos)
  return ((1 - other) * (qh - qt) ** 2 - same * (qh + qt) ** 2) / (1 - rho_pos - rho_neg)


def np_ce(logits, labels):
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  return -logp[np.arange(len(labels)), np.asarray(labels)].mean()


@pytest.fixture(scope="module")
def shared():
  model = Shared()
  variables = model.init(jax.random.key(1), X)
  logits, updates = model.apply(variables, X, mutable=["batch_stats", "lns"])
  return model, variables, logits, updates


# ------------------------------------------------------------------- collect_pairs


def test_a_layer_applied_twice_is_one_term(shared):
  model, variables, logits, updates = shared
  assert len(updates["lns"]["BinaryConv_0"]["pairs"]) == 2  # what flax sows: one per call
  pairs = lns_jax.collect_pairs(updates)
  assert list(pairs) == ["BinaryConv_0"]
  q_hat, q_tilde = pairs["BinaryConv_0"]
  p, bs = variables["params"]["BinaryConv_0"], variables["batch_stats"]["BinaryConv_0"]
  expected = lns_jax.map_weights({"params": p["mapping"], "batch_stats": bs["mapping"]},
                                 p["kernel"])
  np.testing.assert_array_equal(q_hat, expected)
  np.testing.assert_array_equal(q_tilde, np.where(np.asarray(p["kernel"]) >= 0, 1.0, -1.0))
  total, aux = lns_jax.lns_objective(logits, Y, pairs, 0.5, 0.01)
  ref = np.mean(np_lns(q_hat, q_tilde, 0.01, 0.01))  # one term, not two
  np.testing.assert_allclose(aux["aux_total"], ref, rtol=1e-5)
  np.testing.assert_allclose(total, np_ce(logits, Y) + 0.5 * ref, rtol=1e-5)
  # The collection alone works as well as the whole updates.
  assert lns_jax.collect_pairs(updates["lns"]).keys() == pairs.keys()


def test_an_lns_collection_passed_back_keeps_this_applys_pairs(shared):
  model, variables, _, updates = shared
  changed = flax.core.unfreeze(variables)
  changed["params"]["BinaryConv_0"]["kernel"] = -changed["params"]["BinaryConv_0"]["kernel"]
  _, again = model.apply({**changed, "lns": updates["lns"]}, X, mutable=["batch_stats", "lns"])
  assert len(again["lns"]["BinaryConv_0"]["pairs"]) == 4  # two old pairs in front
  (_, q_tilde), = lns_jax.collect_pairs(again).values()
  old = lns_jax.collect_pairs(updates)["BinaryConv_0"][1]
  np.testing.assert_array_equal(q_tilde, -old)  # sign(-W): this apply's labels


def test_labels_replace_q_tilde(shared):
  _, _, _, updates = shared
  labels = {"BinaryConv_0": jnp.ones((3, 3, 4, 4), jnp.int8)}
  (q_hat, q_tilde), = lns_jax.collect_pairs(updates, labels).values()
  assert q_tilde.dtype == q_hat.dtype and np.all(np.asarray(q_tilde) == 1)


def test_collect_pairs_refuses_what_is_not_sown():
  with pytest.raises(TypeError, match="not what BinaryConv sows"):
    lns_jax.collect_pairs({"lns": {"conv": {"pairs": (jnp.ones(3), jnp.ones(3))}}})
  with pytest.raises(TypeError, match="takes model.apply's updates"):
    lns_jax.collect_pairs([1, 2])


# ----------------------------------------------------------- refusals of the objective


def test_the_raw_collection_is_refused_naming_collect_pairs(shared):
  _, _, logits, updates = shared
  for raw in (updates["lns"], updates):
    for call in (lambda p: lns_jax.lns_objective(logits, Y, p, 1.0, 0.005),
                 lambda p: lns_jax.auxiliary_losses(p, 0.005)):
      with pytest.raises(TypeError, match=r"is a collection of model.apply's updates, not a "
                                          r"\(q_hat, q_tilde\) pair: pass "
                                          r"lns_jax.collect_pairs\(updates\)"):
        call(raw)
  sown = {"BinaryConv_0": updates["lns"]["BinaryConv_0"]["pairs"]}  # ((q_hat, q_tilde), ...)
  with pytest.raises(TypeError, match="collect_pairs"):
    lns_jax.auxiliary_losses(sown, 0.005)


def test_a_forgotten_mutable_is_refused_not_zero(shared):
  model, variables, _, _ = shared
  logits, updates = model.apply(variables, X, mutable=["batch_stats"])  # 'lns' forgotten
  pairs = lns_jax.collect_pairs(updates)
  assert pairs == {}
  with pytest.raises(ValueError, match=r"alpha=1.0 but no \(q_hat, q_tilde\) pairs: apply the "
                                       r"model with 'lns' in mutable"):
    lns_jax.lns_objective(logits, Y, pairs, 1.0, 0.005)
  total, _ = lns_jax.lns_objective(logits, Y, pairs, 0.0, 0.005)  # cross-entropy alone
  np.testing.assert_allclose(total, np_ce(logits, Y), rtol=1e-5)
  with pytest.raises(ValueError, match="alpha must be finite and >= 0"):
    lns_jax.lns_objective(logits, Y, pairs, -1.0, 0.005)


# -------------------------------------------------------------------- integer inputs

INTS = np.asarray([[-2, 0, 3], [1, -1, 4]], np.int32)


def test_weight_scale_of_integers_is_the_float_mean():
  np.testing.assert_allclose(lns_jax.weight_scale([-2, 0, 3]), 5 / 3, rtol=1e-6)
  assert lns_jax.weight_scale(INTS).dtype == jnp.float32
  np.testing.assert_allclose(lns_jax.weight_scale(INTS, "channel"),
                             np.abs(INTS).mean(0, keepdims=True), rtol=1e-6)
  assert float(lns_jax.weight_scale(INTS, "none")) == 1.0


@pytest.mark.parametrize("fn", [
    lns_jax.sign, lns_jax.ste_sign, lns_jax.approx_sign, lns_jax.sign_clip_grad,
    lns_jax.mapping_sign, lambda x: lns_jax.mapping_sign(x, "window"),
    lns_jax.binarize_weights, lambda x: lns_jax.binarize_weights(x, "channel")],
    ids=["sign", "ste_sign", "approx_sign", "sign_clip_grad", "mapping_sign",
         "mapping_sign_window", "binarize_weights", "binarize_weights_channel"])
def test_integer_inputs_give_the_float_answer(fn):
  got = fn(INTS)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(got, fn(INTS.astype(np.float32)))
  np.testing.assert_array_equal(lns_jax.sign(INTS), np.where(INTS >= 0, 1.0, -1.0))


def test_lns_loss_and_cross_entropy_of_integers_compute_in_float():
  q_hat, q_tilde = INTS, np.where(INTS >= 0, 1, -1)
  got = lns_jax.lns_loss(q_hat, q_tilde, (0.1, 0.2), reduction="none")
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_lns(q_hat, q_tilde, 0.1, 0.2), rtol=1e-6)
  logits = np.asarray([[3, -1, 0], [0, 2, 5]], np.int32)
  np.testing.assert_allclose(lns_jax.cross_entropy(logits, [0, 2]), np_ce(logits, [0, 2]),
                             rtol=1e-5)
  with pytest.raises(TypeError, match="labels must be integer class indices, got dtype float32"):
    lns_jax.cross_entropy(logits, np.asarray([0.0, 2.0], np.float32))


def test_mapping_conv_and_binary_conv_of_integers_are_the_float_path():
  kernel = np.random.default_rng(0).integers(-3, 4, (3, 3, 2, 4)).astype(np.int32)
  variables = lns_jax.init_mapping(jax.random.key(0), kernel.shape)
  q_hat = lns_jax.map_weights(variables, kernel)
  assert q_hat.dtype == jnp.float32
  np.testing.assert_array_equal(q_hat, lns_jax.map_weights(variables, kernel.astype(np.float32)))
  for binarizer in ("float", "sign", "lns"):
    got = lns_jax.binary_weights(kernel, binarizer, variables)
    np.testing.assert_array_equal(
        got, lns_jax.binary_weights(kernel.astype(np.float32), binarizer, variables))
  x = np.random.default_rng(1).integers(-2, 3, (2, 5, 5, 2)).astype(np.int32)
  np.testing.assert_array_equal(lns_jax.conv2d(x, kernel),
                                lns_jax.conv2d(x.astype(np.float32), kernel.astype(np.float32)))
  conv = lns_jax.BinaryConv(4, weight_binarizer="lns")
  v = conv.init(jax.random.key(2), x.astype(np.float32))
  np.testing.assert_array_equal(conv.apply(v, x, train=False),
                                conv.apply(v, x.astype(np.float32), train=False))


def test_complex_inputs_are_refused_naming_the_dtype():
  z = np.ones(3, np.complex64)
  for fn in (lns_jax.sign, lns_jax.weight_scale, lns_jax.ste_sign,
             lambda a: lns_jax.lns_loss(a, np.ones(3), 0.1)):
    with pytest.raises(TypeError, match="complex64"):
      fn(z)


def test_clip_is_static_and_the_straight_through_rules_reverse_mode_only():
  x = jnp.asarray([0.5, -2.0])
  with pytest.raises(TypeError, match="ste_sign: clip must be a static Python number"):
    jax.jit(lns_jax.ste_sign)(x, 1.0)
  np.testing.assert_array_equal(jax.jit(lns_jax.ste_sign, static_argnums=1)(x, 1.0), [1, -1])
  with pytest.raises(TypeError, match="sign_clip_grad: limit must be a static"):
    jax.jit(lns_jax.sign_clip_grad)(x, 1.0)
  np.testing.assert_array_equal(jax.grad(lambda a: lns_jax.ste_sign(a).sum())(x), [1, 0])
  with pytest.raises(TypeError, match="custom_vjp"):  # JAX's own refusal: documented limit
    jax.jvp(lns_jax.ste_sign, (x,), (jnp.ones(2),))


# ----------------------------------------------------------------------------- rho

Q = np.asarray([0.3, -1.2, 0.9, -0.1], np.float32)
QT = np.asarray([1.0, -1.0, -1.0, 1.0], np.float32)
GOOD_RHOS = [(0.01, (0.01, 0.01)), ((0.02, 0.1), (0.02, 0.1)), ([0.02, 0.1], (0.02, 0.1)),
             (np.asarray([0.02, 0.1]), (0.02, 0.1)), (jnp.asarray([0.02, 0.1]), (0.02, 0.1)),
             (np.float32(0.05), (0.05, 0.05)), (jnp.asarray(0.05), (0.05, 0.05)), (0, (0, 0))]


@pytest.mark.parametrize("rho,pair", GOOD_RHOS, ids=lambda v: type(v).__name__)
@pytest.mark.parametrize("jit", [False, True])
def test_every_rho_form_eager_and_jitted(rho, pair, jit):
  fn = jax.jit(lns_jax.lns_loss, static_argnames="reduction") if jit else lns_jax.lns_loss
  got = fn(Q, QT, rho, reduction="none")
  np.testing.assert_allclose(got, np_lns(Q, QT, *pair), rtol=1e-5, atol=1e-7)
  if not jit:
    np.testing.assert_allclose(lns_jax.check_rho(rho), pair, rtol=1e-6)


BAD_RHOS = [("0.1", "the string '0.1'"), ("(0.01,0.002)", "the string"),
            ((0.1, 0.2, 0.3), "3 values"), ([0.1], "1 values"),
            (np.asarray([0.1, 0.2, 0.3]), r"shape \(\) or \(2,\), got shape \(3,\)"),
            (np.zeros((2, 2)), r"got shape \(2, 2\)"), (-0.1, "must be finite and >= 0"),
            ((0.6, 0.5), "must be < 1"), (None, "real numbers"), (True, "real numbers"),
            ({"rho": 0.1}, "real numbers"), ((0.1, "x"), "real numbers")]


@pytest.mark.parametrize("rho,message", BAD_RHOS, ids=repr)
def test_bad_rho_is_one_clear_error(rho, message):
  with pytest.raises(ValueError, match=message):
    lns_jax.lns_loss(Q, QT, rho)
  with pytest.raises(ValueError, match=message):
    lns_jax.check_rho(rho)


@pytest.mark.parametrize("rho", [np.asarray([0.1, 0.2, 0.3]), np.asarray([[0.1, 0.2]]),
                                 np.asarray(["a", "b"])], ids=["len3", "2d", "strings"])
def test_bad_rho_shape_is_refused_under_jit_too(rho):
  with pytest.raises((ValueError, TypeError), match="rho"):
    jax.jit(lns_jax.lns_loss)(Q, QT, rho)


def test_a_traced_rho_is_used_unchecked_and_check_rho_says_so():
  bad = jax.jit(lns_jax.lns_loss)(Q, QT, jnp.asarray([0.6, 0.5]))  # no error: not concrete
  np.testing.assert_allclose(bad, np.mean(np_lns(Q, QT, 0.6, 0.5)), rtol=1e-5)
  with pytest.raises(TypeError, match="check_rho needs concrete values"):
    jax.jit(lns_jax.check_rho)(jnp.asarray(0.1))


# ------------------------------------------------- warm start and starting from a baseline


def _flat(tree):
  return traverse_util.flatten_dict(flax.core.unfreeze(jax.device_get(tree)))


def test_train_mapping_only_moves_f_theta_as_tx_alone_would(shared):
  model, variables, _, _ = shared
  params = variables["params"]
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  tx = lns_jax.train_mapping_only(optax.adam(1e-2))
  updates, _ = tx.update(grads, tx.init(params), params)
  mapping = params["BinaryConv_0"]["mapping"]
  alone, _ = optax.adam(1e-2).update(grads["BinaryConv_0"]["mapping"],
                                      optax.adam(1e-2).init(mapping), mapping)
  flat, alone = _flat(updates), _flat(alone)
  assert any("mapping" in k for k in flat) and any("mapping" not in k for k in flat)
  for k, u in flat.items():
    if "mapping" in k:
      np.testing.assert_array_equal(u, alone[k[k.index("mapping") + 1:]])
      assert np.all(u != 0)
    else:
      np.testing.assert_array_equal(u, np.zeros_like(u))


class Small(nn.Module):
  weights: str = "lns"
  width: int = 4

  @nn.compact
  def __call__(self, x, train=True):
    x = nn.BatchNorm(use_running_average=not train)(nn.Conv(self.width, (3, 3))(x))
    return lns_jax.BinaryConv(4, weight_binarizer=self.weights, name="conv")(x, train)


def test_keep_network_stats_takes_only_the_mappings_new_statistics():
  variables = Small("lns").init(jax.random.key(4), X)
  _, updates = Small("lns").apply(variables, X, mutable=["batch_stats", "lns"])
  old, new = _flat(variables["batch_stats"]), _flat(updates["batch_stats"])
  kept = _flat(lns_jax.keep_network_stats(variables["batch_stats"], updates["batch_stats"]))
  assert kept.keys() == old.keys()
  assert any("mapping" in k for k in kept) and any("mapping" not in k for k in kept)
  for k, v in kept.items():
    np.testing.assert_array_equal(v, new[k] if "mapping" in k else old[k])
    assert not np.array_equal(new[k], old[k]), k  # the comparison can tell the two apart
  with pytest.raises(ValueError, match="keep_network_stats: new_batch_stats lacks"):
    lns_jax.keep_network_stats(variables["batch_stats"], {})


def test_from_baseline_copies_the_baseline_and_keeps_a_fresh_mapping():
  baseline = Small("sign").init(jax.random.key(3), X)
  fresh = Small("lns").init(jax.random.key(4), X)
  got = lns_jax.from_baseline(fresh, baseline)
  flat, base, new = _flat(got), _flat(baseline), _flat(fresh)
  assert flat.keys() == new.keys()
  for k, v in flat.items():
    np.testing.assert_array_equal(v, base[k] if k in base else new[k])
    assert k in base or "mapping" in k
  assert any(not np.array_equal(base[k], new[k]) for k in base)  # init differs: a real copy


def test_from_baseline_refuses_another_model_naming_the_leaf():
  fresh = Small("lns").init(jax.random.key(4), X)
  wider = Small("sign", width=8).init(jax.random.key(3), X)
  with pytest.raises(ValueError, match=r"baseline: params/Conv_0/kernel has shape \(3, 3, 4, 8\) "
                                       r"there but \(3, 3, 4, 4\) in the model"):
    lns_jax.from_baseline(fresh, wider)
  extra = flax.core.unfreeze(Small("sign").init(jax.random.key(3), X))
  extra["params"]["head"] = {"kernel": jnp.ones(2)}
  with pytest.raises(ValueError, match="params/head/kernel .and 0 more. is not in the model"):
    lns_jax.from_baseline(fresh, extra)
  del extra["params"]["head"], extra["params"]["conv"]
  with pytest.raises(ValueError, match="params/conv/kernel is missing"):
    lns_jax.from_baseline(fresh, extra)
  with pytest.raises(ValueError, match="has the collection 'cache'"):
    lns_jax.from_baseline(fresh, {**Small("sign").init(jax.random.key(3), X),
                                  "cache": {"x": jnp.ones(1)}})


# ------------------------------------- the trainer's step is the step written by hand


def _hand_step(model, config, stage, schedule):
  """One step of ``stage`` in plain flax and optax, as the trainer did before issue 31:
  the sown pairs read by hand, the warm start's optimizer and BatchNorm rule by hand."""
  from lns_jax import config as config_lib
  alpha, rho = config_lib.stage_alpha(config, stage), config.rho
  assert (config[stage].optimizer or config.optimizer) == "sgd"  # the smoke config's
  tx = optax.chain(optax.add_decayed_weights(config.weight_decay),
                   optax.sgd(schedule, momentum=config.momentum or None))
  if stage == "warmup":
    label = lambda p: traverse_util.unflatten_dict(  # noqa: E731
        {k: "train" if "mapping" in k else "frozen" for k in traverse_util.flatten_dict(p)})
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, label)

  def loss_fn(params, batch_stats, batch):
    logits, upd = model.apply({"params": params, "batch_stats": batch_stats}, batch["image"],
                              train=True, mutable=["batch_stats", "lns"])
    ce = lns_jax.cross_entropy(logits.astype(jnp.float32), batch["label"], batch["mask"])
    aux = jnp.zeros((), ce.dtype)
    for (q_hat, q_tilde), in traverse_util.flatten_dict(upd.get("lns", {})).values():
      aux = aux + lns_jax.lns_loss(q_hat, q_tilde, rho, config.reduction)
    return ce + alpha * aux, upd["batch_stats"]

  def step(params, batch_stats, opt_state, batch):
    (_, new_bs), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch_stats, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    if stage == "warmup":
      old, new = traverse_util.flatten_dict(batch_stats), traverse_util.flatten_dict(new_bs)
      new_bs = traverse_util.unflatten_dict(
          {k: new[k] if "mapping" in k else old[k] for k in old})
    return optax.apply_updates(params, updates), new_bs, opt_state
  return tx, jax.jit(step)


def _trainer_steps(stage, start, batches):
  """``(state after the batches, the initial state)``: the trainer's own step, jitted."""
  from lns_jax import binary, models, optim, trainer
  from lns_testutil import smoke_config
  config, shape = smoke_config(), batches[0]["image"].shape[1:]
  model = models.from_config(config, stage, 10)
  layers = binary.weight_binarizers(model, shape)
  schedule = optim.learning_rate_schedule(config[stage], 10)
  tx = optim.make_optimizer(config, stage, schedule)
  state0 = trainer.create_train_state(config, stage, model, tx, layers, shape,
                                      jax.random.key(0), start)
  state, step = state0, jax.jit(trainer.make_train_step(model, tx, config, stage, layers,
                                                         schedule))
  for batch in batches:
    state, metrics = step(state, batch)
    assert float(metrics["aux_total"]) > 0
  return state, state0, (model, config, schedule)


def test_the_warm_start_step_is_the_hand_written_one():
  """The smoke config's model from a sign baseline, two warm-start steps of the trainer
  equal a step written by hand with flax and optax and the public helpers (to float
  rounding: the trainer's program also computes its metrics, which XLA fuses differently).
  (Until session 14 it also replayed the trainer's pre-issue-31 code bit for bit: a
  refactor guard that had served its purpose, dropped for suite time.)"""
  from lns_jax import models
  from lns_testutil import smoke_config
  shape, rng = (28, 28, 1), np.random.default_rng(0)
  batches = [{"image": jnp.asarray(rng.normal(size=(8, *shape)), jnp.float32),
              "label": jnp.asarray(rng.integers(0, 10, 8), jnp.int32),
              "mask": jnp.ones(8, jnp.float32)} for _ in range(2)]
  baseline = models.from_config(smoke_config(), "pretrain", 10).init(
      jax.random.key(5), jnp.zeros((1, *shape)), train=False)
  state, state0, (model, config, schedule) = _trainer_steps("warmup", baseline, batches)
  start = lns_jax.from_baseline(model.init(jax.random.key(0), jnp.zeros((1, *shape)),
                                           train=False), baseline)
  jax.tree.map(np.testing.assert_array_equal, (state0.params, state0.batch_stats),
               (start["params"], start["batch_stats"]))
  hand_tx, hand_step = _hand_step(model, config, "warmup", schedule)
  params, bs, opt_state = start["params"], start["batch_stats"], hand_tx.init(start["params"])
  for batch in batches:
    params, bs, opt_state = hand_step(params, bs, opt_state, batch)
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)  # noqa: E731
  jax.tree.map(close, (state.params, state.batch_stats, state.opt_state), (params, bs, opt_state))
  moved = {k: not np.array_equal(v, _flat(start["params"])[k]) for k, v in _flat(params).items()}
  assert all(moved[k] == ("mapping" in k) for k in moved)  # only f_theta trained
