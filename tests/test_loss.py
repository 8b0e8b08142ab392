"""Tests for lns_jax.loss against NumPy implementations of the paper's equations.

Eq. 15:  l~(q^, q~) = ((1 - rho_{-q~}) l(q^, q~) - rho_{q~} l(q^, -q~)) / (1 - rho_{+1} - rho_{-1})
         with l(a, b) = (a - b)^2, rho_{+1} = rho_pos, rho_{-1} = rho_neg.
Eq. 10-12: (1 - rho_q) l~(q^, q) + rho_q l~(q^, -q) = l(q^, q), q in {+1, -1}.
Eq. 18:  d l~ / d q^ = 2 (q^ - q~) - 4 rho_{q~} q~ / (1 - rho_{+1} - rho_{-1}).
Eq. 16 / 17: mean / sum over a layer's elements. Eq. 21: L = CE + alpha * sum_i l~_i.
"""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from lns_jax.loss import auxiliary_losses, check_rho, cross_entropy, lns_loss
from lns_jax.loss import lns_objective as _lns_objective_eager

# One compile per call signature (alpha, rho, reduction static: rho is validated at trace).
lns_objective = jax.jit(_lns_objective_eager, static_argnames=("alpha", "rho", "reduction"))

@functools.partial(jax.jit, static_argnames=("reduction",))
def _loss_traced(q_hat, q_tilde, rho_pos, rho_neg, reduction):
  return lns_loss(q_hat, q_tilde, (rho_pos, rho_neg), reduction)


def loss(q_hat, q_tilde, rho, reduction="mean"):
  """``lns_loss`` compiled once per (shape, dtype, reduction), rho passed traced.

  Op-by-op dispatch compiles each primitive per shape (most of this file's time on 2
  cores). rho is validated first, as lns_loss does for concrete values; the eager path
  is exercised by the validation, empty-input and symmetric-rho tests.
  """
  rho_pos, rho_neg = check_rho(rho)
  return _loss_traced(q_hat, q_tilde, np.float32(rho_pos), np.float32(rho_neg),
                      reduction=reduction)


RHOS = [0.005, 0.2, (0.1, 0.3), (0.3, 0.05), (0.0, 0.45)]


def _pair(rho):
  return tuple(rho) if isinstance(rho, (tuple, list)) else (rho, rho)


def np_sq(a, b):
  return (np.asarray(a, np.float64) - np.asarray(b, np.float64)) ** 2


def np_lns(q_hat, q_tilde, rho):
  """Eq. 15, element by element, written from the paper (float64)."""
  rho_pos, rho_neg = _pair(rho)
  rate = {+1: rho_pos, -1: rho_neg}  # rho_{+1}, rho_{-1}
  q_hat = np.asarray(q_hat, np.float64)
  q_tilde = np.asarray(q_tilde, np.float64)
  out = np.empty(q_hat.shape, np.float64)
  for idx in np.ndindex(q_hat.shape):
    qh, qt = q_hat[idx], int(q_tilde[idx])
    out[idx] = (((1 - rate[-qt]) * (qh - qt) ** 2 - rate[qt] * (qh + qt) ** 2)
                / (1 - rate[+1] - rate[-1]))
  return out


def np_eq18(q_hat, q_tilde, rho):
  rho_pos, rho_neg = _pair(rho)
  q_tilde = np.asarray(q_tilde, np.float64)
  rate_same = np.where(q_tilde > 0, rho_pos, rho_neg)
  return 2 * (np.asarray(q_hat, np.float64) - q_tilde) - 4 * rate_same * q_tilde / (
      1 - rho_pos - rho_neg)


def _data(shape, seed=0):
  rng = np.random.default_rng(seed)
  q_hat = rng.normal(scale=1.5, size=shape).astype(np.float32)
  q_tilde = np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)
  return q_hat, q_tilde


# ---------------------------------------------------------------------------- Eq. 15

def test_reference_matches_eq13_eq14_by_hand():
  # Guard on the NumPy reference: Eq. 13 at q^=0.3, q~=+1 and Eq. 14 at q^=0.3, q~=-1.
  rp, rn = 0.1, 0.3
  e13 = ((1 - rn) * (0.3 - 1) ** 2 - rp * (0.3 + 1) ** 2) / (1 - rp - rn)
  e14 = ((1 - rp) * (0.3 + 1) ** 2 - rn * (0.3 - 1) ** 2) / (1 - rp - rn)
  np.testing.assert_allclose(np_lns([0.3, 0.3], [1, -1], (rp, rn)), [e13, e14])


@pytest.mark.parametrize("rho", RHOS)
def test_elementwise_matches_eq15(rho):
  q_hat, q_tilde = _data((3, 3, 2, 5))
  q_hat.flat[:4] = [1.0, -1.0, 0.0, -0.0]  # exact labels and zeros
  got = loss(jnp.asarray(q_hat), jnp.asarray(q_tilde), rho, reduction="none")
  assert got.shape == q_hat.shape and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), np_lns(q_hat, q_tilde, rho), rtol=1e-5,
                             atol=1e-5)


def test_asymmetric_rho_order_matters():
  # rho = (rho_pos, rho_neg) with rho_pos = P(q~=-1 | q=+1): swapping must change the loss.
  q_hat, q_tilde = _data((50,), seed=1)
  a = loss(q_hat, q_tilde, (0.05, 0.3), reduction="none")
  b = loss(q_hat, q_tilde, (0.3, 0.05), reduction="none")
  assert not np.allclose(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(b), np_lns(q_hat, q_tilde, (0.3, 0.05)), rtol=1e-5,
                             atol=1e-5)


def test_symmetric_scalar_equals_pair():
  q_hat, q_tilde = _data((7,), seed=2)
  np.testing.assert_array_equal(np.asarray(lns_loss(q_hat, q_tilde, 0.1, "none")),
                                np.asarray(lns_loss(q_hat, q_tilde, (0.1, 0.1), "none")))
  np.testing.assert_array_equal(np.asarray(lns_loss(q_hat, q_tilde, [0.1, 0.2], "none")),
                                np.asarray(lns_loss(q_hat, q_tilde, (0.1, 0.2), "none")))
  # Default reduction is the mean (Eq. 16), on the eager path.
  np.testing.assert_allclose(float(lns_loss(q_hat, q_tilde, (0.1, 0.2))),
                             np_lns(q_hat, q_tilde, (0.1, 0.2)).mean(), rtol=1e-5)


@pytest.mark.parametrize("rho", [0.0, (0.0, 0.0)])
def test_rho_zero_is_eq7_squared_error(rho):
  q_hat, q_tilde = _data((4, 6), seed=3)
  np.testing.assert_allclose(np.asarray(loss(q_hat, q_tilde, rho, "none")),
                             np_sq(q_hat, q_tilde), rtol=1e-6)
  np.testing.assert_allclose(float(loss(q_hat, q_tilde, rho, "sum")),
                             np_sq(q_hat, q_tilde).sum(), rtol=1e-5)


def test_int_labels_and_bf16_dtype():
  q_hat, q_tilde = _data((9,), seed=4)
  got = loss(q_hat, q_tilde.astype(np.int32), 0.1, "none")
  np.testing.assert_allclose(np.asarray(got), np_lns(q_hat, q_tilde, 0.1), rtol=1e-5,
                             atol=1e-5)
  got16 = loss(jnp.asarray(q_hat, jnp.bfloat16), q_tilde, 0.1, "none")
  assert got16.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(got16, np.float64),
                             np_lns(np.asarray(jnp.asarray(q_hat, jnp.bfloat16), np.float64),
                                    q_tilde, 0.1), rtol=3e-2, atol=3e-2)


# -------------------------------------------------------------------- Eq. 10 (property)

_rates = st.floats(0.0, 0.95, allow_nan=False, allow_infinity=False)


@settings(max_examples=40, deadline=None)
@given(q_hat=st.lists(st.floats(-4.0, 4.0, allow_nan=False, width=32), min_size=8,
                      max_size=8),
       rho_pos=_rates, rho_neg=_rates)
def test_eq10_unbiasedness(q_hat, rho_pos, rho_neg):
  if rho_pos + rho_neg > 0.95:  # keep 1/(1 - rho_pos - rho_neg) well inside float32
    rho_pos, rho_neg = rho_pos / 2, rho_neg / 2
  q_hat = np.asarray(q_hat, np.float32)
  rate = {+1: rho_pos, -1: rho_neg}
  scale = 1.0 / (1.0 - rho_pos - rho_neg)
  for q in (+1.0, -1.0):
    same = np.asarray(loss(q_hat, np.full(8, q, np.float32), (rho_pos, rho_neg), "none"),
                      np.float64)
    flip = np.asarray(loss(q_hat, np.full(8, -q, np.float32), (rho_pos, rho_neg), "none"),
                      np.float64)
    expected = (1 - rate[int(q)]) * same + rate[int(q)] * flip  # E over q~ given q
    np.testing.assert_allclose(expected, np_sq(q_hat, q), rtol=1e-4, atol=2e-5 * scale * 25)


# ---------------------------------------------------------------------- Eq. 18 gradient

@pytest.mark.parametrize("rho", RHOS)
def test_gradient_matches_eq18(rho):
  q_hat, q_tilde = _data((2, 3, 4), seed=5)
  eq18 = np_eq18(q_hat, q_tilde, rho)
  g_sum = jax.grad(lambda q: loss(q, q_tilde, rho, "sum"))(jnp.asarray(q_hat))
  np.testing.assert_allclose(np.asarray(g_sum), eq18, rtol=1e-5, atol=1e-5)
  # reduction='none' with a non-uniform cotangent c: c * Eq. 18.
  c = np.random.default_rng(6).normal(size=q_hat.shape).astype(np.float32)
  g_none = jax.grad(lambda q: jnp.sum(loss(q, q_tilde, rho, "none") * c))(jnp.asarray(q_hat))
  np.testing.assert_allclose(np.asarray(g_none), c * eq18, rtol=1e-5, atol=1e-5)
  g_mean = jax.grad(lambda q: loss(q, q_tilde, rho, "mean"))(jnp.asarray(q_hat))
  np.testing.assert_allclose(np.asarray(g_mean), eq18 / q_hat.size, rtol=1e-5, atol=1e-6)


def test_eq18_stationary_point():
  # With q_tilde fixed, the minimiser of the
  # per-element loss is where Eq. 18 vanishes: q^ = q~ (1 + 2 rho_{q~} / (1 - rho+ - rho-)).
  rp, rn = 0.1, 0.2
  q_tilde = np.array([1.0, -1.0], np.float32)
  q_star = q_tilde * (1 + 2 * np.array([rp, rn]) / (1 - rp - rn))
  g = jax.grad(lambda q: loss(q, q_tilde, (rp, rn), "sum"))(jnp.asarray(q_star, jnp.float32))
  np.testing.assert_allclose(np.asarray(g), [0.0, 0.0], atol=1e-5)


# -------------------------------------------------------------- reductions and shapes

@pytest.mark.parametrize("shape,rho", [((), 0.01), ((1,), (0.2, 0.1)), ((5,), (0.2, 0.1)),
                                       ((3, 3, 2, 4), 0.01), ((1, 1, 1, 1), (0.05, 0.3))])
def test_reductions_any_shape(shape, rho):
  q_hat, q_tilde = _data(shape, seed=7)
  ref = np_lns(q_hat, q_tilde, rho)
  none = loss(q_hat, q_tilde, rho, "none")
  assert none.shape == shape
  np.testing.assert_allclose(np.asarray(none), ref, rtol=1e-5, atol=1e-5)
  s = loss(q_hat, q_tilde, rho, "sum")
  m = loss(q_hat, q_tilde, rho, "mean")
  assert s.shape == () and m.shape == ()
  np.testing.assert_allclose(float(s), ref.sum(), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(m), ref.sum() / max(ref.size, 1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(0,), (2, 0, 3)])
def test_empty_input(shape):
  q = np.zeros(shape, np.float32)
  assert lns_loss(q, q, 0.1, "none").shape == shape
  m = lns_loss(q, q, 0.1, "mean")
  s = lns_loss(q, q, 0.1, "sum")
  assert float(m) == 0.0 and float(s) == 0.0
  assert not math.isnan(float(m))


# ----------------------------------------------------------------------------------- jit

@pytest.mark.parametrize("reduction", ["none", "sum", "mean"])
def test_jit_with_traced_rho(reduction):
  q_hat, q_tilde = _data((3, 4), seed=8)
  ref = np_lns(q_hat, q_tilde, (0.15, 0.05))
  ref = {"none": ref, "sum": ref.sum(), "mean": ref.mean()}[reduction]
  f_pair = jax.jit(lambda qh, qt, rp, rn: lns_loss(qh, qt, (rp, rn), reduction))
  np.testing.assert_allclose(np.asarray(f_pair(q_hat, q_tilde, 0.15, 0.05)), ref, rtol=1e-5,
                             atol=1e-5)
  f_sym = jax.jit(lambda qh, qt, r: lns_loss(qh, qt, r, reduction))
  ref_sym = np_lns(q_hat, q_tilde, 0.07)
  ref_sym = {"none": ref_sym, "sum": ref_sym.sum(), "mean": ref_sym.mean()}[reduction]
  np.testing.assert_allclose(np.asarray(f_sym(q_hat, q_tilde, 0.07)), ref_sym, rtol=1e-5,
                             atol=1e-5)
  # Static (closed-over) rho under jit, too.
  f_static = jax.jit(lambda qh, qt: lns_loss(qh, qt, 0.07, reduction))
  np.testing.assert_allclose(np.asarray(f_static(q_hat, q_tilde)), ref_sym, rtol=1e-5,
                             atol=1e-5)


def test_grad_wrt_traced_rho_is_finite():
  q_hat, q_tilde = _data((6,), seed=9)
  g = jax.jit(jax.grad(lambda r: lns_loss(q_hat, q_tilde, r, "sum")))(0.1)
  # d/drho of Eq. 15 with symmetric rho, by central differences in float64.
  eps = 1e-6
  fd = (np_lns(q_hat, q_tilde, 0.1 + eps).sum() - np_lns(q_hat, q_tilde, 0.1 - eps).sum()) / (
      2 * eps)
  np.testing.assert_allclose(float(g), fd, rtol=1e-3)


# ------------------------------------------------------------------------------ errors

INVALID_RHOS = [-0.1, -1e-12, float("nan"), float("inf"), float("-inf"), 0.5, 1.0, 0.7,
                (0.5, 0.5), (0.6, 0.5), (0.99, 0.01), (-0.1, 0.2), (0.1, float("nan")),
                (0.1,), (0.1, 0.2, 0.3), (), "abc", None, (0.1, "x"), [0.2, None],
                {"rho": 0.1}]


@pytest.mark.parametrize("bad", INVALID_RHOS, ids=repr)
def test_invalid_rho_raises_naming_value(bad):
  with pytest.raises(ValueError) as exc:
    check_rho(bad)
  assert repr(bad) in str(exc.value) or str(bad) in str(exc.value)
  q = np.ones(3, np.float32)
  with pytest.raises(ValueError):
    lns_loss(q, q, bad)


@pytest.mark.parametrize("good,expected", [(0.0, (0.0, 0.0)), (0.005, (0.005, 0.005)),
                                           ((0.2, 0.1), (0.2, 0.1)), ([0.3, 0.0], (0.3, 0.0)),
                                           ((0.5, 0.4999), (0.5, 0.4999)),
                                           (np.float32(0.25), (0.25, 0.25)), (-0.0, (0.0, 0.0))])
def test_valid_rho(good, expected):
  got = check_rho(good)
  assert isinstance(got, tuple) and len(got) == 2
  np.testing.assert_allclose(got, expected)


def test_mismatched_shapes_raise():
  with pytest.raises(ValueError):
    lns_loss(np.zeros((3, 2)), np.ones((2, 3)), 0.1)
  with pytest.raises(ValueError):
    lns_loss(np.zeros((3,)), np.ones(()), 0.1)


@pytest.mark.parametrize("reduction", ["avg", "", None, "MEAN"])
def test_bad_reduction_raises(reduction):
  with pytest.raises(ValueError):
    lns_loss(np.zeros(3), np.ones(3), 0.1, reduction)


# -------------------------------------------------------------------- objective (Eq. 21)

def np_ce(logits, labels, mask=None):
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=-1, keepdims=True)
  logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
  per = -logp[np.arange(len(labels)), labels]
  if mask is None:
    return per.mean()
  mask = np.asarray(mask, np.float64)
  return (per * mask).sum() / max(mask.sum(), 1.0)


def _logits(seed=10, n=6, k=10):
  rng = np.random.default_rng(seed)
  return (rng.normal(scale=3, size=(n, k)).astype(np.float32),
          rng.integers(0, k, n).astype(np.int32))


@pytest.mark.parametrize("mask,reduction", [(None, "mean"), ([1, 0, 1, 1, 0, 1], "sum")])
def test_objective_is_ce_plus_alpha_sum_of_layers(mask, reduction):
  logits, labels = _logits()
  pairs = {"block1/conv1": _data((3, 3, 2, 4), seed=11), "block1/conv2": _data((3, 3, 4, 4), 12),
           "fc": _data((1, 1, 5, 3), 13)}
  rho, alpha = (0.02, 0.01), 0.7
  m = None if mask is None else np.asarray(mask, np.float32)
  total, aux = lns_objective(logits, labels, pairs, alpha, rho, reduction=reduction, mask=m)
  red = np.sum if reduction == "sum" else np.mean
  layer_ref = {k: red(np_lns(qh, qt, rho)) for k, (qh, qt) in pairs.items()}
  ce_ref = np_ce(logits, labels, mask)
  np.testing.assert_allclose(float(aux["ce"]), ce_ref, rtol=1e-5)
  assert set(aux["aux_layers"]) == set(pairs)
  for k, v in layer_ref.items():
    np.testing.assert_allclose(float(aux["aux_layers"][k]), v, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(float(aux["aux_total"]), sum(layer_ref.values()), rtol=1e-5)
  np.testing.assert_allclose(float(total), ce_ref + alpha * sum(layer_ref.values()), rtol=1e-5)


def test_objective_without_layers_is_ce_at_alpha_zero_and_refused_above():
  logits, labels = _logits(seed=14)
  total, aux = lns_objective(logits, labels, {}, 0.0, 0.005)
  np.testing.assert_allclose(float(total), np_ce(logits, labels), rtol=1e-5)
  assert float(aux["aux_total"]) == 0.0 and aux["aux_layers"] == {}
  # alpha > 0 without pairs: 'lns' was forgotten in mutable; a silent 0 would hide it.
  with pytest.raises(ValueError, match=r"alpha=1.0 but no \(q_hat, q_tilde\) pairs: apply the "
                                       r"model with 'lns' in mutable"):
    _lns_objective_eager(logits, labels, {}, 1.0, 0.005)


def test_objective_alpha_zero_is_ce_and_gradient_reaches_q_hat():
  logits, labels = _logits(seed=15)
  q_hat, q_tilde = _data((3, 3, 1, 2), seed=16)
  total, _ = lns_objective(logits, labels, {"a": (q_hat, q_tilde)}, 0.0, 0.1)
  np.testing.assert_allclose(float(total), np_ce(logits, labels), rtol=1e-5)
  g = jax.jit(jax.grad(lambda q: lns_objective(logits, labels, {"a": (q, q_tilde)}, 0.5,
                                               0.1)[0]))(jnp.asarray(q_hat))
  np.testing.assert_allclose(np.asarray(g), 0.5 * np_eq18(q_hat, q_tilde, 0.1) / q_hat.size,
                             rtol=1e-5, atol=1e-6)


def test_objective_rejects_invalid_rho():
  logits, labels = _logits()
  with pytest.raises(ValueError):
    _lns_objective_eager(logits, labels, {"a": _data((2,))}, 1.0, (0.6, 0.6))


def test_cross_entropy_mask_all_zero_is_zero():
  logits, labels = _logits()
  assert float(cross_entropy(logits, labels, np.zeros(6, np.float32))) == 0.0


def test_auxiliary_losses_per_layer():
  pairs = {"x": _data((4,), 17), "y": _data((2, 2), 18)}
  got = auxiliary_losses(pairs, 0.1, reduction="sum")
  for k, (qh, qt) in pairs.items():
    np.testing.assert_allclose(float(got[k]), np_lns(qh, qt, 0.1).sum(), rtol=1e-5)
