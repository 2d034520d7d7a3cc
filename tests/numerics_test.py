"""Element formats and rounding vs ml_dtypes and the float64 oracle (np_ref)."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fp4jax import numerics
import np_ref

# Deterministic rounding of an exactly representable input has no tolerance:
# the result is a grid value, so any difference is a wrong rounding decision.
EXACT = 0
# Stochastic rounding: the mean of N draws of an unbiased rounder deviates
# from x by at most 4 sigma / sqrt(N) (CLT); per value the false-alarm rate is
# 6e-5, so ~1e-3 over the values tested, and the key is fixed anyway.
SR_SIGMAS = 4.0
SR_DRAWS = 20000
# Stochastic values are chosen with rounding-up probability p in
# [SR_P_MIN, 1 - SR_P_MIN] so the normal approximation of the CLT holds.
SR_P_MIN = 0.05

FP4 = np_ref.FP4_FORMATS
FP8 = np_ref.FP8_FORMATS
_ML = {"e2m1": ml_dtypes.float4_e2m1fn, "e4m3": ml_dtypes.float8_e4m3fn,
       "e5m2": ml_dtypes.float8_e5m2}


def _round(x, fmt, mode="paper", key=None, dtype=jnp.float32):
  got = numerics.round_to_format(jnp.asarray(x, dtype), fmt, mode=mode,
                                 key=key)
  assert got.dtype == dtype, (fmt, mode, got.dtype)
  return np.asarray(got.astype(jnp.float32), np.float64)


def _sweep(fmt):
  """Dense f32 sweep over [-1.33 max, 1.33 max] plus every edge case."""
  mx = np_ref.max_value(fmt)
  mids = np_ref.midpoints(fmt).astype(np.float32)
  grid = np_ref.grid(fmt).astype(np.float32)
  pts = [
      np.linspace(-1.33 * mx, 1.33 * mx, 20001, dtype=np.float32),
      mids, np.nextafter(mids, np.float32(np.inf)),
      np.nextafter(mids, np.float32(-np.inf)),
      grid, np.nextafter(grid, np.float32(np.inf)),
      np.nextafter(grid, np.float32(-np.inf)),
      np.float32([0.0, -0.0, np.inf, -np.inf, 1e30, -1e30, 3e38, -3e38,
                  1e-30, -1e-30, 1e-45, -1e-45]),
  ]
  return np.concatenate(pts)


def _all_bf16():
  """Every non-NaN bfloat16 value (exhaustive over the 65536 bit patterns)."""
  v = np.arange(1 << 16, dtype=np.uint16).view(ml_dtypes.bfloat16)
  return v[~np.isnan(v.astype(np.float32))]


# ------------------------------------------------------------------- grids
def test_e2m1_all_16_codes_match_grid():
  codes = np.arange(16, dtype=np.uint8).view(ml_dtypes.float4_e2m1fn)
  vals = codes.astype(np.float64)
  assert np.all(np.isfinite(vals))          # E2M1 has no inf / NaN
  want = np.unique(vals)                    # +0 and -0 merge: 15 values
  assert want.size == 15
  np.testing.assert_array_equal(numerics.grid("e2m1"), want)
  np.testing.assert_array_equal(np_ref.grid("e2m1"), want)


@pytest.mark.parametrize("fmt", FP4)
def test_fp4_grid(fmt):
  got = np.asarray(numerics.grid(fmt), np.float64)
  assert got.size == 15 and 0.0 in got
  np.testing.assert_array_equal(got, np_ref.grid(fmt))
  assert np.all(np.diff(got) > 0)


@pytest.mark.parametrize("fmt", FP8)
def test_fp8_grid_finite_values_match_ml_dtypes(fmt):
  try:
    got = np.asarray(numerics.grid(fmt), np.float64)
  except ValueError as e:   # grid() may be documented as FP4-only
    assert "fmt" in str(e)
    pytest.skip(f"grid({fmt!r}) is FP4-only: {e}")
  assert np.all(np.diff(got[np.isfinite(got)]) > 0)
  codes = np.arange(256, dtype=np.uint8).view(_ML[fmt]).astype(np.float64)
  want = np.unique(codes[np.isfinite(codes)])
  np.testing.assert_array_equal(got[np.isfinite(got)], want)


@pytest.mark.parametrize("fmt,mx", [("e2m1", 6.0), ("e1m2", 3.5),
                                    ("e3m0", 16.0), ("e4m3", 448.0),
                                    ("e5m2", 57344.0)])
def test_max_value(fmt, mx):
  assert numerics.max_value(fmt) == mx == np_ref.max_value(fmt)


# ------------------------------------------------ oracle self-consistency
def test_oracle_paper_thresholds_are_the_recipe_chain():
  np.testing.assert_array_equal(np_ref.midpoints("e2m1"),
                                np_ref.E2M1_PAPER_THRESHOLDS)


@pytest.mark.parametrize("fmt", ["e2m1", "e4m3", "e5m2"])
def test_oracle_rne_matches_ml_dtypes(fmt):
  x = _sweep(fmt)
  mx = np_ref.max_value(fmt)
  want = np.clip(x, -mx, mx).astype(_ML[fmt]).astype(np.float64)
  np.testing.assert_array_equal(np_ref.round_rne(x, fmt), want)


# ------------------------------------------------------------ paper mode
@pytest.mark.parametrize("fmt", FP4)
def test_paper_matches_lut_oracle_dense_sweep(fmt):
  x = _sweep(fmt)
  np.testing.assert_array_equal(_round(x, fmt, "paper"),
                                np_ref.round_paper(x, fmt))


@pytest.mark.parametrize("fmt", FP4)
def test_paper_ties_go_up(fmt):
  mids = np_ref.midpoints(fmt)
  g = np_ref.grid(fmt)
  got = _round(mids, fmt, "paper")
  np.testing.assert_array_equal(got, g[1:])   # the upper neighbour, always


def test_e2m1_paper_literal_examples():
  x = [0.25, -0.25, 0.75, 2.5, 3.5, 5.0, -5.0, 7.0, -7.0, np.inf, -np.inf,
       0.0, -0.0]
  want = [0.5, 0.0, 1.0, 3.0, 4.0, 6.0, -4.0, 6.0, -6.0, 6.0, -6.0, 0, 0]
  np.testing.assert_array_equal(_round(x, "e2m1", "paper"), want)


@pytest.mark.parametrize("fmt", FP4)
@pytest.mark.parametrize("mode", ["paper", "rne"])
def test_exhaustive_bf16(fmt, mode):
  x = _all_bf16()
  got = _round(x.astype(np.float32), fmt, mode, dtype=jnp.bfloat16)
  want = np_ref.round_to_format(x.astype(np.float64), fmt, mode)
  np.testing.assert_array_equal(got, want)


# -------------------------------------------------------------- rne mode
def test_e2m1_rne_matches_ml_dtypes_dense_sweep():
  x = _sweep("e2m1")
  want = x.astype(ml_dtypes.float4_e2m1fn).astype(np.float64)
  np.testing.assert_array_equal(_round(x, "e2m1", "rne"), want)


def test_e2m1_rne_ties():
  x = np.asarray([0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0])
  want = [0.0, 1.0, 1.0, 2.0, 2.0, 4.0, 4.0]   # RECIPE / JAX-NOTES row 1d
  np.testing.assert_array_equal(_round(x, "e2m1", "rne"), want)
  np.testing.assert_array_equal(_round(-x, "e2m1", "rne"), -np.asarray(want))


@pytest.mark.parametrize("fmt", ["e1m2", "e3m0"])
def test_rne_other_fp4_vs_oracle(fmt):
  # Ties go to the even code (the IEEE rule applied to the 3-bit magnitude
  # code); everything else is plain nearest.
  x = _sweep(fmt)
  np.testing.assert_array_equal(_round(x, fmt, "rne"),
                                np_ref.round_rne(x, fmt))


@pytest.mark.parametrize("fmt", FP8)
@pytest.mark.parametrize("mode", ["paper", "rne"])
def test_fp8_is_saturating_cast(fmt, mode):
  mx = np_ref.max_value(fmt)
  rng = np.random.default_rng(0)
  x = np.concatenate([
      _sweep(fmt),
      (rng.standard_normal(20000) * mx / 8).astype(np.float32),
      np.float32([mx * 1.05, -mx * 1.05, mx * 1.2, -mx * 1.2, 2 * mx])])
  want = np.clip(x, -mx, mx).astype(_ML[fmt]).astype(np.float64)
  got = _round(x, fmt, mode)
  assert np.all(np.isfinite(got))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FP4)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dtype_preserved(fmt, dtype):
  x = np.float32([-7.3, -0.3, 0.0, 0.26, 1.1, 2.6, 30.0])
  got = _round(x, fmt, "paper", dtype=dtype)
  xin = np.asarray(jnp.asarray(x, dtype).astype(jnp.float32), np.float64)
  np.testing.assert_array_equal(got, np_ref.round_paper(xin, fmt))


def test_jit_matches_eager():
  x = _sweep("e2m1")
  f = jax.jit(numerics.round_to_format, static_argnames=("fmt", "mode"))
  for mode in ("paper", "rne"):
    np.testing.assert_array_equal(
        np.asarray(f(jnp.asarray(x), fmt="e2m1", mode=mode)),
        _round(x, "e2m1", mode))


# -------------------------------------------------------- stochastic mode
def _sr_values(fmt):
  """Off-grid values, p(round up) in [SR_P_MIN, 1 - SR_P_MIN], per interval."""
  g = np_ref.grid(fmt)
  idx = np.arange(g.size - 1)
  lo, hi = g[idx], g[idx + 1]
  ps = np.linspace(SR_P_MIN, 1 - SR_P_MIN, len(idx))
  x = (lo + ps * (hi - lo)).astype(np.float32)
  return x.astype(np.float64)


# Stochastic rounding is specified for the FP4 element formats (the recipes
# use it on E2M1 gradients); the FP8 formats may reject it.
@pytest.mark.parametrize("fmt", FP4)
def test_stochastic_unbiased_and_neighbours(fmt):
  x = _sr_values(fmt)
  xs = np.broadcast_to(x, (SR_DRAWS, x.size))
  got = _round(xs, fmt, "stochastic", key=jax.random.key(1))
  lo, hi = np_ref.neighbours(x, fmt)
  assert np.all((got == lo) | (got == hi)), "not a neighbouring grid value"
  p = (x - lo) / (hi - lo)
  sigma = (hi - lo) * np.sqrt(p * (1 - p))
  err = np.abs(got.mean(axis=0) - x)
  bound = SR_SIGMAS * sigma / np.sqrt(SR_DRAWS)
  bad = err > bound
  assert not bad.any(), (x[bad], got.mean(axis=0)[bad], bound[bad])


@pytest.mark.parametrize("fmt", FP4)
def test_stochastic_exact_on_grid_and_saturates(fmt):
  mx = np_ref.max_value(fmt)
  g = np_ref.grid(fmt)
  x = np.concatenate([g, [1.5 * mx, -1.5 * mx, 4 * mx, -4 * mx]])
  xs = np.broadcast_to(x, (500, x.size))
  got = _round(xs, fmt, "stochastic", key=jax.random.key(2))
  want = np.broadcast_to(np.clip(x, -mx, mx), got.shape)
  np.testing.assert_array_equal(got, want)


def test_stochastic_deterministic_given_key():
  x = np.random.default_rng(3).uniform(-6, 6, size=(64, 64))
  a = _round(x, "e2m1", "stochastic", key=jax.random.key(7))
  b = _round(x, "e2m1", "stochastic", key=jax.random.key(7))
  c = _round(x, "e2m1", "stochastic", key=jax.random.key(8))
  np.testing.assert_array_equal(a, b)
  assert np.mean(a != c) > 0.1     # a different key gives different draws


def test_stochastic_bf16_dtype():
  x = np.random.default_rng(4).uniform(-6, 6, size=(256,))
  got = _round(x, "e2m1", "stochastic", key=jax.random.key(0),
               dtype=jnp.bfloat16)
  xin = x.astype(ml_dtypes.bfloat16).astype(np.float64)
  lo, hi = np_ref.neighbours(xin, "e2m1")
  assert np.all((got == lo) | (got == hi))


# ------------------------------------------------------------- bad input
@pytest.mark.parametrize("call,word", [
    (lambda: numerics.round_to_format(jnp.ones(3), "e2m2"), "fmt"),
    (lambda: numerics.round_to_format(jnp.ones(3), "e2m1", mode="up"),
     "mode"),
    (lambda: numerics.round_to_format(jnp.ones(3), "e2m1",
                                      mode="stochastic"), "key"),
    (lambda: numerics.grid("fp4"), "fmt"),
    (lambda: numerics.max_value("int4"), "fmt"),
])
def test_bad_input_raises(call, word):
  with pytest.raises(ValueError, match=word):
    call()


# ------------------------------------------- arithmetic float rounding
_FLOAT_DTYPES = {"e4m3": ml_dtypes.float8_e4m3fn, "e5m2": ml_dtypes.float8_e5m2,
                 "float16": np.float16, "bfloat16": ml_dtypes.bfloat16}


def _float_sweep(fmt):
  """Log sweep over the whole range incl. subnormals, codes and midpoints."""
  mx = numerics.FLOAT_BITS[fmt][2]
  mag = np.geomspace(1e-12, min(mx, 1e30), 100001).astype(np.float32)
  pts = [mag, -mag, np.float32([0.0, -0.0, mx, -mx])]
  if fmt in ("e4m3", "e5m2"):
    codes = np.arange(256, dtype=np.uint8).view(_FLOAT_DTYPES[fmt])
    codes = np.sort(codes.astype(np.float32)[np.isfinite(
        codes.astype(np.float32))])
    mids = ((codes[1:].astype(np.float64) + codes[:-1]) / 2).astype(
        np.float32)
    pts += [codes, mids, np.nextafter(mids, np.float32(np.inf)),
            np.nextafter(mids, np.float32(-np.inf))]
  return np.clip(np.concatenate(pts), -mx, mx)


@pytest.mark.parametrize("fmt", sorted(numerics.FLOAT_BITS))
def test_round_to_float_matches_ml_dtypes(fmt):
  # Independent oracle: the ml_dtypes / numpy cast (RNE, subnormals kept).
  x = _float_sweep(fmt)
  want = x.astype(_FLOAT_DTYPES[fmt]).astype(np.float32)
  got = np.asarray(jax.jit(numerics.round_to_float, static_argnums=1)(
      jnp.asarray(x), fmt))
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", ["float16", "bfloat16"])
def test_stochastic_round_to_float_unbiased_on_grid(fmt):
  x = np.float32([1e-9, -1e-9, 3e-7, 0.7, -0.7, 1.001, 6.0975e-05, 1000.3])
  keys = jax.random.split(jax.random.key(0), SR_DRAWS)
  d = np.asarray(jax.jit(jax.vmap(
      lambda k: numerics.stochastic_round_to_float(jnp.asarray(x), fmt, k)))(
          keys), np.float64)
  dt = _FLOAT_DTYPES[fmt]
  # Every draw is a value of the format and one of x's two neighbours.
  np.testing.assert_array_equal(d, d.astype(dt).astype(np.float64))
  for i in range(x.size):
    vals = np.unique(d[:, i])
    assert vals.size <= 2, (fmt, x[i], vals)
    span = vals.max() - vals.min() if vals.size == 2 else 0.
    # CLT bound on the mean of Bernoulli(p) * span draws.
    bound = SR_SIGMAS * span * 0.5 / np.sqrt(SR_DRAWS) + 1e-45
    assert abs(d[:, i].mean() - np.float64(x[i])) <= bound, (fmt, x[i])

