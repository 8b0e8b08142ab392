"""Tests for lns_jax.bitpack: packing round trips and the XNOR/popcount conv."""

import itertools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from lns_jax import bitpack

DN = ("NHWC", "HWIO", "NHWC")

# Jitted entry points: op-by-op dispatch compiles every small op per shape, which on
# 2 CPU cores costs more than one jit compile per test.
_pack = jax.jit(bitpack.pack_bits, static_argnames=("axis", "word_bits"))
_unpack = jax.jit(bitpack.unpack_bits, static_argnames=("n", "axis", "dtype"))


def _pm1(rng, shape):
  return np.where(rng.random(shape) < 0.5, -1.0, 1.0).astype(np.float32)


def _np_pack(x, axis, word_bits):
  """Independent reference: LSB-first words along ``axis`` via np.packbits(little)."""
  bits = np.moveaxis(np.asarray(x) >= 0, axis, -1)
  n = bits.shape[-1]
  nw = -(-n // word_bits)
  bits = np.concatenate(
      [bits, np.zeros(bits.shape[:-1] + (nw * word_bits - n,), bool)], axis=-1)
  by = np.packbits(bits, axis=-1, bitorder="little")  # (..., nw * word_bits / 8)
  words = by.reshape(by.shape[:-1] + (nw, word_bits // 8))
  words = np.ascontiguousarray(words).view(f"<u{word_bits // 8}")[..., 0]
  return np.moveaxis(words, -1, axis)


# ------------------------------------------------------------------------------ packing


@pytest.mark.parametrize("shape,axis", [
    ((1,), -1), ((33,), 0), ((64,), -1), ((3, 5), 0), ((2, 4, 65), 1),
    ((2, 3, 3, 100), 2), ((2, 70), -1), ((4, 0), -1),
])
@pytest.mark.parametrize("word_bits", [8, 16, 32])
def test_pack_unpack_round_trip(shape, axis, word_bits):
  x = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
  packed = _pack(x, axis=axis, word_bits=word_bits)
  ref = _np_pack(x, axis, word_bits)
  assert packed.dtype == np.dtype(f"uint{word_bits}")
  assert packed.shape == ref.shape
  np.testing.assert_array_equal(np.asarray(packed), ref)
  n = shape[axis]
  back = _unpack(packed, n=n, axis=axis)
  np.testing.assert_array_equal(np.asarray(back), np.where(x >= 0, 1.0, -1.0))


def test_zero_and_negative_zero_pack_as_plus_one():
  x = np.array([0.0, -0.0, 1.0, -1.0, -1e-30, 1e-30], np.float32)
  back = _unpack(_pack(x), n=x.size)
  np.testing.assert_array_equal(np.asarray(back), [1, 1, 1, -1, -1, 1])
  w, shape = bitpack.pack_signs_np(x)
  np.testing.assert_array_equal(bitpack.unpack_signs_np(w, shape), [1, 1, 1, -1, -1, 1])


def test_pad_bits_are_zero():
  # All +1: the last word holds exactly n % 32 set bits, nothing beyond.
  words = np.asarray(_pack(np.ones((37,), np.float32)))
  assert words.tolist() == [0xFFFFFFFF, (1 << 5) - 1]


def test_bool_input_and_dtypes():
  bits = np.array([[True, False, True]])
  np.testing.assert_array_equal(np.asarray(_pack(bits)), [[0b101]])
  back = _unpack(_pack(bits), n=3, dtype=jnp.int8)
  assert back.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(back), [[1, -1, 1]])


def test_pack_errors():
  with pytest.raises(ValueError):
    bitpack.pack_bits(np.ones(3), word_bits=12)
  if not jax.config.jax_enable_x64:
    with pytest.raises(ValueError):
      bitpack.pack_bits(np.ones(3), word_bits=64)
  with pytest.raises(ValueError):
    bitpack.unpack_bits(np.zeros((1,), np.uint32), 33)


def test_packed_dot():
  rng = np.random.default_rng(1)
  a, b = _pm1(rng, (4, 70)), _pm1(rng, (4, 70))
  got = jax.jit(bitpack.packed_dot, static_argnums=2)(_pack(a), _pack(b), 70)
  np.testing.assert_array_equal(np.asarray(got), (a * b).sum(-1).astype(np.int32))


@pytest.mark.parametrize("shape", [(1,), (7,), (8,), (3, 3, 5, 4), (0,), (2, 0, 3)])
def test_signs_np_round_trip(shape):
  w = np.random.default_rng(2).standard_normal(shape)
  packed, got_shape = bitpack.pack_signs_np(w)
  assert packed.dtype == np.uint8 and got_shape == shape
  assert packed.size == -(-w.size // 8)
  np.testing.assert_array_equal(packed, np.packbits((w >= 0).reshape(-1)))
  back = bitpack.unpack_signs_np(packed, got_shape)
  assert back.dtype == np.float32 and back.shape == shape
  np.testing.assert_array_equal(back, np.where(w >= 0, 1.0, -1.0))
  with pytest.raises(ValueError):
    bitpack.unpack_signs_np(np.zeros(packed.size + 1, np.uint8), shape)


# ------------------------------------------------------------------------- convolution


def _float_conv(x, w, strides, padding, dilation=(1, 1)):
  return np.asarray(lax.conv_general_dilated(
      x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=DN))


_KS = [1, 3]
_STRIDES = [1, 2]
_PADS = ["SAME", "VALID", ((1, 2), (2, 0))]
_C_IN = [1, 5, 32, 33, 70]
_BATCH_COUT = [(1, 1), (2, 4), (1, 4), (2, 1)]


def _grid():
  """Cases for the lax comparison; H x W = 7 x 9 (odd, unequal) throughout.

  Each case costs a compile (~0.3-1 s on 2 cores), so by default every
  (kernel, stride, padding) geometry runs with two C_in values, rotating so that every
  C_in meets every kernel, stride and padding, with all four (batch, C_out) pairs
  rotating too. LNS_FULL_GRID=1 runs the full product instead.
  """
  geoms = list(itertools.product(_KS, _STRIDES, _PADS))
  if os.environ.get("LNS_FULL_GRID"):
    return [g + (c, b) for g, c, b in itertools.product(geoms, _C_IN, _BATCH_COUT)]
  cases = []
  for g, geom in enumerate(geoms):
    for r in range(2):
      i = 2 * g + r
      cases.append(geom + (_C_IN[i % len(_C_IN)], _BATCH_COUT[i % len(_BATCH_COUT)]))
  return cases


def test_grid_covers_every_pair():
  cases = _grid()
  for c_in in _C_IN:
    for pos, values in ((0, _KS), (1, _STRIDES), (2, _PADS)):
      for v in values:
        assert any(case[pos] == v and case[3] == c_in for case in cases), (c_in, v)
  assert {case[4] for case in cases} == set(_BATCH_COUT)


@pytest.mark.parametrize("k,s,padding,c_in,batch_cout", _grid())
def test_binary_conv_matches_lax(k, s, padding, c_in, batch_cout):
  batch, c_out = batch_cout
  rng = np.random.default_rng(zlib.crc32(repr((k, s, padding, c_in)).encode()))
  x = _pm1(rng, (batch, 7, 9, c_in))
  w = _pm1(rng, (k, k, c_in, c_out))
  ref = _float_conv(x, w, (s, s), padding)
  got = bitpack.binary_conv2d_packed_jit(x, w, strides=(s, s), padding=padding)
  assert got.dtype == jnp.int32 and got.shape == ref.shape
  np.testing.assert_array_equal(np.asarray(got), ref.astype(np.int32))


def _numpy_conv(x, w, stride, pads):
  """Independent NumPy reference: zero-pad, then loop over taps (NHWC, HWIO)."""
  (plo_h, phi_h), (plo_w, phi_w) = pads
  xp = np.pad(x, ((0, 0), (plo_h, phi_h), (plo_w, phi_w), (0, 0)))
  kh, kw, _, c_out = w.shape
  ho = (xp.shape[1] - kh) // stride + 1
  wo = (xp.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, c_out), np.int64)
  for i in range(kh):
    for j in range(kw):
      patch = xp[:, i:i + (ho - 1) * stride + 1:stride, j:j + (wo - 1) * stride + 1:stride]
      out += np.einsum("nhwc,co->nhwo", patch.astype(np.int64), w[i, j].astype(np.int64))
  return out


def test_binary_conv_matches_numpy_reference():
  rng = np.random.default_rng(3)
  x = rng.standard_normal((2, 9, 7, 37)).astype(np.float32)  # real input: sign inside
  x[0, 0, 0, :5] = 0.0
  x[1, 2, 3, :5] = -0.0
  w = rng.standard_normal((3, 3, 37, 3)).astype(np.float32)
  sx, sw = np.where(x >= 0, 1, -1), np.where(w >= 0, 1, -1)
  # SAME with stride 2 on 9 x 7 pads (1, 1) on both axes, as lax does.
  ref = _numpy_conv(sx, sw, 2, ((1, 1), (1, 1)))
  got = bitpack.binary_conv2d_packed_jit(x, w, strides=2, padding="SAME")
  np.testing.assert_array_equal(np.asarray(got), ref)


@pytest.mark.parametrize("padding", [((-1, 2), (0, 3)), ((0, 0), (4, 4))])
def test_negative_and_wide_explicit_padding(padding):
  rng = np.random.default_rng(4)
  x, w = _pm1(rng, (1, 7, 9, 33)), _pm1(rng, (3, 3, 33, 2))
  got = bitpack.binary_conv2d_packed_jit(x, w, padding=padding)
  np.testing.assert_array_equal(np.asarray(got), _float_conv(x, w, (1, 1), padding))


def test_dilation_and_float_output():
  rng = np.random.default_rng(5)
  x, w = _pm1(rng, (1, 9, 7, 5)), _pm1(rng, (3, 3, 5, 2))
  got = bitpack.binary_conv2d_packed_jit(x, w, padding="SAME", dilation=(2, 1),
                                         out_dtype=jnp.float32)
  assert got.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(got), _float_conv(x, w, (1, 1), "SAME", (2, 1)))


def test_uint8_words_and_rolled_word_loop(monkeypatch):
  rng = np.random.default_rng(6)
  x, w = _pm1(rng, (2, 7, 9, 70)), _pm1(rng, (3, 3, 70, 4))
  ref = _float_conv(x, w, (2, 2), "SAME")
  got8 = bitpack.binary_conv2d_packed_jit(x, w, strides=(2, 2), word_bits=8)
  np.testing.assert_array_equal(np.asarray(got8), ref)
  # Force the fori_loop path used for very wide layers (C_in > 512) on a small case.
  monkeypatch.setattr(bitpack, "_MAX_UNROLLED_WORDS", 1)
  got = jax.jit(lambda a, b: bitpack.binary_conv2d_packed(a, b, strides=(2, 2)))(x, w)
  np.testing.assert_array_equal(np.asarray(got), ref)


def test_prepacked_weights_under_jit():
  rng = np.random.default_rng(7)
  x, w = _pm1(rng, (2, 7, 9, 33)), _pm1(rng, (3, 3, 33, 4))
  wp = _pack(w, axis=2)
  assert wp.shape == (3, 3, 2, 4)

  @jax.jit
  def f(x, wp):
    return bitpack.xnor_conv2d_packed(bitpack.pack_bits(x), wp, 33, (1, 1), "SAME")

  np.testing.assert_array_equal(np.asarray(f(x, wp)), _float_conv(x, w, (1, 1), "SAME"))
  got = bitpack.xnor_conv2d_packed_jit(_pack(x), wp, 33, padding="VALID")
  np.testing.assert_array_equal(np.asarray(got), _float_conv(x, w, (1, 1), "VALID"))


def test_conv_shape_errors():
  x, w = jnp.ones((1, 5, 5, 8)), jnp.ones((3, 3, 9, 2))
  with pytest.raises(ValueError):
    bitpack.binary_conv2d_packed(x, w)
  with pytest.raises(TypeError):
    bitpack.xnor_conv2d_packed(np.zeros((1, 5, 5, 1), np.uint32),
                               np.zeros((3, 3, 1, 2), np.uint8), 8)
  with pytest.raises(ValueError):
    bitpack.xnor_conv2d_packed(np.zeros((1, 5, 5, 2), np.uint32),
                               np.zeros((3, 3, 1, 2), np.uint32), 33)
