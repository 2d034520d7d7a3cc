"""Power-of-two scales are exact powers of two, picked as exact arithmetic
would pick them, at every exponent and one f32 ulp on each side of every
power of two: the numerics helper and every place that builds such a scale
(E8M0 block scales, pow2 scales, FP8 gradient communication, scaled Adam
moments). The oracle is rational arithmetic on the f32 inputs (fractions),
so it shares no rounding with the code under test."""

from fractions import Fraction

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import comm
from fp4jax import numerics
from fp4jax import optim
from fp4jax import quant
from fp4jax.qconfig import TensorQuant

# Scales are compared bit for bit (no tolerance): a power of two is exact
# in f32, so any difference is a wrong exponent or an inexact 2**e.
#
# The exponents of normal f32 values; subnormals are flushed to zero by
# XLA:CPU (and by the helper, identically on every backend).
F32_MIN_EXP, F32_MAX_EXP = -126, 127
# E8M0's exponent range (OCP MX v1.0: 2**-127 .. 2**127, 0xFF is NaN).
E8M0_MIN_EXP, E8M0_MAX_EXP = -127, 127
_MX = dict(fmt="e2m1", block=32, scale="e8m0", rounding="rne")


def _sweep(c: float) -> np.ndarray:
  """Every normal f32 c * 2**e, and the f32 values one ulp below and above
  each, sorted (float32). c * 2**e keeps c's f32 mantissa, so it is exact
  wherever it is normal."""
  c64 = np.float64(np.float32(c))
  with np.errstate(over="ignore"):
    p = np.ldexp(c64, np.arange(-160, 160)).astype(np.float32)
  vals = np.concatenate([p, np.nextafter(p, np.float32(0)),
                         np.nextafter(p, np.float32(np.inf))])
  return np.unique(vals[(vals >= np.finfo(np.float32).tiny)
                        & np.isfinite(vals)])


def _floor_log2(q: Fraction) -> int:
  """floor(log2(q)) of a positive rational, exactly."""
  e = q.numerator.bit_length() - q.denominator.bit_length()
  # Now 2**(e - 1) < q < 2**(e + 1).
  return e if q >= Fraction(2) ** e else e - 1


def _ceil_log2(q: Fraction) -> int:
  e = _floor_log2(q)
  return e if q == Fraction(2) ** e else e + 1


def _exps(num, den, ceil=False) -> np.ndarray:
  """floor (or ceil) of log2(num / den) per element, exactly (int64)."""
  f = _ceil_log2 if ceil else _floor_log2
  num = np.broadcast_to(np.asarray(num, np.float32), np.shape(num))
  den = np.broadcast_to(np.asarray(den, np.float32), num.shape)
  return np.array([f(Fraction(float(a)) / Fraction(float(b)))
                   for a, b in zip(num.ravel(), den.ravel())],
                  np.int64).reshape(num.shape)


def _pow2(e) -> np.ndarray:
  return np.ldexp(np.float64(1), np.asarray(e).astype(np.int64)
                  ).astype(np.float32)


def _assert_exact(got, want, what, args):
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  bad = got != want
  assert not bad.any(), (
      f"{what}: {int(bad.sum())} of {bad.size} wrong, e.g. at "
      f"{np.asarray(args)[bad][:4]}: got {got[bad][:4]}, want {want[bad][:4]}")


# ----------------------------------------------------------- the helper
@pytest.mark.parametrize("den", [1.0, 6.0, 448.0, 3.5, 65504.0])
def test_helper_exponent_is_exact_at_every_power_of_two(den):
  num = _sweep(den)
  for fn in (numerics.pow2_exponent,
             jax.jit(numerics.pow2_exponent, static_argnames="ceil")):
    for ceil in (False, True):
      got = np.asarray(fn(jnp.asarray(num), jnp.float32(den), ceil=ceil))
      want = _exps(num, den, ceil)
      _assert_exact(got, want, f"pow2_exponent(ceil={ceil}) / {den}", num)


def test_helper_scale_is_an_exact_power_of_two_at_every_exponent():
  e = np.arange(F32_MIN_EXP, F32_MAX_EXP + 1)
  for fn in (numerics.exp2_int, jax.jit(numerics.exp2_int)):
    got = fn(jnp.asarray(e, jnp.int32))
    assert got.dtype == jnp.float32
    _assert_exact(got, _pow2(e), "exp2_int", e)
  # The combination, clipped: 2**clip(floor(log2 x), lo, hi).
  x = _sweep(1.0)
  got = jax.jit(lambda v: numerics.pow2_scale(v, min_exp=-100, max_exp=100)
                )(jnp.asarray(x))
  _assert_exact(got, _pow2(np.clip(_exps(x, 1.0), -100, 100)), "pow2_scale",
                x)


def test_helper_gives_one_where_there_is_no_positive_finite_ratio():
  bad = np.float32([0., -0., -1., np.inf, -np.inf, np.nan, 1e-40, -1e-40])
  got = np.asarray(numerics.pow2_scale(jnp.asarray(bad)))
  np.testing.assert_array_equal(got, np.ones_like(bad))
  got = np.asarray(numerics.pow2_scale(jnp.float32(1.), jnp.asarray(bad)))
  np.testing.assert_array_equal(got, np.ones_like(bad))


# ------------------------------------------------------- E8M0 (quant)
def _block_amax_rows(amax: np.ndarray, block: int) -> jax.Array:
  """[n, block] rows whose one block has exactly the given absmax (the
  other elements smaller: amax / 2 and zeros, signs mixed)."""
  x = np.zeros((amax.size, block), np.float32)
  x[:, 0] = -amax
  x[:, 1] = amax / 2
  return jnp.asarray(x)


@jax.jit
def _ocp_scale(x):
  return quant.compute_scale(x, TensorQuant(axis=-1, **_MX))


@jax.jit
def _round_up_scale(x):
  return quant.compute_scale(x, TensorQuant(axis=-1,
                                            **dict(_MX, scale="e8m0_up")))


@jax.jit
def _quest_scale(stat):
  return quant.scale_from_amax(stat, TensorQuant(axis=-1, scale_rule="quest",
                                                 **_MX))


def test_e8m0_block_scales_are_the_ocp_shared_exponent():
  # OCP MX: X = 2**(floor(log2 amax) - emax), emax = 2 for E2M1, clipped to
  # E8M0's range; the quantize scale is 1 / X.
  amax = _sweep(1.0)
  got = _ocp_scale(_block_amax_rows(amax, 32))[:, 0]
  x_exp = np.clip(_exps(amax, 1.0) - 2, E8M0_MIN_EXP, E8M0_MAX_EXP)
  _assert_exact(got, _pow2(-x_exp), "OCP E8M0 scale", amax)


def test_e8m0_round_up_is_the_smallest_power_of_two_keeping_amax():
  # Mishra et al.: X = 2**ceil(log2(amax / 6)); boundaries at 6 * 2**e.
  amax = np.concatenate([_sweep(6.0), _sweep(1.0)])
  got = _round_up_scale(_block_amax_rows(amax, 32))[:, 0]
  x_exp = np.clip(_exps(amax, 6.0, ceil=True), E8M0_MIN_EXP, E8M0_MAX_EXP)
  _assert_exact(got, _pow2(-x_exp), "round-up E8M0 scale", amax)


def test_quest_e8m0_scale_is_the_floor_of_clip_over_max():
  # Quartet: X = 2**floor(log2(c / 6)), c = std * 2.92247856 (one f32
  # product, taken as computed); statistics around c = 6 * 2**e.
  target = _sweep(6.0)
  stat = np.float32(target / np.float32(quant.QUEST_CLIP))
  stat = np.unique(np.concatenate([stat, np.nextafter(stat, np.float32(0)),
                                   np.nextafter(stat, np.float32(np.inf))]))
  with np.errstate(over="ignore"):
    c = stat * np.float32(quant.QUEST_CLIP)        # numpy f32: one rounding
  keep = (stat >= np.finfo(np.float32).tiny) & np.isfinite(c)
  stat, c = stat[keep], c[keep]
  got = _quest_scale(jnp.asarray(stat))
  x_exp = np.clip(_exps(c, 6.0), E8M0_MIN_EXP, E8M0_MAX_EXP)
  _assert_exact(got, _pow2(-x_exp), "QuEST E8M0 scale", stat)


def test_cast_scale_e8m0_is_the_floor_power_of_two():
  s = _sweep(1.0)
  got = jax.jit(lambda v: numerics.cast_scale(v, "e8m0"))(jnp.asarray(s))
  _assert_exact(got, _pow2(np.clip(_exps(s, 1.0), E8M0_MIN_EXP, E8M0_MAX_EXP)),
                "cast_scale e8m0", s)


# ------------------------------------------------------ pow2 (quant)
@jax.jit
def _pow2_row_scale(x):
  return quant.compute_scale(x, TensorQuant(axis=-1, scale="pow2"))


def test_pow2_scale_is_the_floor_of_max_over_amax():
  # Released code: sf = 2**floor(log2(6 / amax)); boundaries where 6 / amax
  # is a power of two, i.e. amax = 6 * 2**e. Clipped to normal f32 (an amax
  # of ~2**-126 would need 2**128).
  amax = np.concatenate([_sweep(6.0), _sweep(1.0)])
  got = _pow2_row_scale(_block_amax_rows(amax, 4))[:, 0]
  want = _pow2(np.clip(_exps(6.0 * np.ones_like(amax), amax), F32_MIN_EXP,
                       F32_MAX_EXP))
  _assert_exact(got, want, "pow2 scale", amax)


# ------------------------------------------------------- comm and optim
@pytest.mark.parametrize("dtype", ["float8_e4m3fn", "float8_e5m2"])
def test_comm_payload_scale_is_the_floor_of_fmax_over_amax(dtype):
  fmax = float(jnp.finfo(dtype).max)
  amax = np.concatenate([_sweep(fmax), _sweep(1.0)])
  got = jax.jit(lambda a: comm.pow2_scale(a, dtype))(jnp.asarray(amax))
  e = np.clip(_exps(np.full_like(amax, fmax), amax), F32_MIN_EXP,
              comm.MAX_SCALE_EXP)
  _assert_exact(got, _pow2(e), f"comm scale {dtype}", amax)


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.float16])
def test_adam_moment_scale_is_the_floor_of_fmax_over_amax(dtype):
  dtype = jnp.dtype(dtype)
  fmax = float(jnp.finfo(dtype).max)
  amax = np.concatenate([_sweep(fmax), _sweep(1.0)])
  rows = _block_amax_rows(amax, 4)
  encode = optim._encode                     # pylint: disable=protected-access
  bound = optim._MAX_SCALE_EXP               # pylint: disable=protected-access
  got = jax.jit(jax.vmap(lambda r: encode(r, dtype)[1]))(rows)
  e = np.clip(_exps(np.full_like(amax, fmax), amax), -bound, bound)
  _assert_exact(got, _pow2(e), f"Adam moment scale {dtype}", amax)
