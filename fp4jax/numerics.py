"""Element formats and rounding. Pure jax.numpy.

Owns: the value grids of the FP4 formats E2M1 / E1M2 / E3M0 and of FP8 E4M3 /
E5M2, their maxima, and rounding onto them: "paper" (the released CUDA
look-up table: thresholds at midpoints, ties go up toward +inf, saturate),
"rne" (round half to even on magnitudes, what ml_dtypes casts do) and
"stochastic" (unbiased, explicit PRNG key). Also the saturating FP8 cast,
the one table of scale formats (`SCALE_FORMATS`: f32, power of two, E8M0
down / up, E4M3 with or without a tensor scale) and their casts, and exact
power-of-two scales
(`pow2_scale`: exponent by frexp, power by ldexp), which every module that
makes such a scale uses.

Must not import: flax, ml_collections, tensorflow, anything else in fp4jax.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

ROUNDING_MODES = ("paper", "rne", "stochastic")


@dataclasses.dataclass(frozen=True)
class Format:
  """An element format: its non-negative magnitudes and, if any, a jnp dtype.

  Attributes:
    name: "e2m1", "e1m2", "e3m0", "e4m3" or "e5m2".
    magnitudes: sorted non-negative representable values (FP4 only; FP8
      formats round by casting to `dtype`).
    max: largest finite magnitude.
    emax: exponent of the largest binade, floor(log2(max)); the MX scale
      puts a block's amax into this binade.
    dtype: the matching jnp dtype, or None where JAX has none (E1M2, E3M0).
  """
  name: str
  magnitudes: tuple[float, ...] | None
  max: float
  emax: int
  dtype: object | None

  @property
  def is_fp4(self) -> bool:
    return self.magnitudes is not None


FORMATS: dict[str, Format] = {
    "e2m1": Format("e2m1", (0., .5, 1., 1.5, 2., 3., 4., 6.), 6., 2,
                   jnp.float4_e2m1fn),
    "e1m2": Format("e1m2", (0., .5, 1., 1.5, 2., 2.5, 3., 3.5), 3.5, 1, None),
    "e3m0": Format("e3m0", (0., .25, .5, 1., 2., 4., 8., 16.), 16., 4, None),
    "e4m3": Format("e4m3", None, 448., 8, jnp.float8_e4m3fn),
    "e5m2": Format("e5m2", None, 57344., 15, jnp.float8_e5m2),
}


def get_format(fmt: str) -> Format:
  """Returns the Format named `fmt`; ValueError naming `fmt` if unknown."""
  try:
    return FORMATS[fmt]
  except (KeyError, TypeError):
    raise ValueError(
        f"unknown fmt {fmt!r}; expected one of {sorted(FORMATS)}") from None


def max_value(fmt: str) -> float:
  """Largest finite magnitude of `fmt` (6 for E2M1, 448 for E4M3, ...)."""
  return get_format(fmt).max


def grid(fmt: str) -> np.ndarray:
  """All distinct representable values of an FP4 format, sorted, float32."""
  f = get_format(fmt)
  if not f.is_fp4:
    raise ValueError(f"grid() is only defined for FP4 formats, got fmt={fmt!r}")
  pos = np.asarray(f.magnitudes, np.float32)
  return np.concatenate([-pos[:0:-1], pos])


def _signed_grid(f: Format) -> tuple[np.ndarray, np.ndarray]:
  g = grid(f.name).astype(np.float64)
  return g, (g[1:] + g[:-1]) / 2


def _round_paper(x: jax.Array, f: Format) -> jax.Array:
  # Threshold chain of the released LUT kernel: v >= t moves up one grid
  # step, so exact midpoints go to the upper neighbour (toward +inf).
  # Unrolled over the 14 thresholds so XLA fuses it into one elementwise
  # loop (a gather or searchsorted is ~10x slower on CPU).
  g, thr = _signed_grid(f)
  out = jnp.full(x.shape, g[0], jnp.float32)
  for t, step in zip(thr, np.diff(g)):
    out = out + jnp.where(x >= t, jnp.float32(step), 0.)
  return out


def _round_rne(x: jax.Array, f: Format) -> jax.Array:
  # Round half to even on the magnitude: a tie goes to the neighbour whose
  # code (index among the magnitudes) is even, as IEEE / ml_dtypes do.
  mags = np.asarray(f.magnitudes, np.float64)
  a = jnp.abs(x)
  out = jnp.zeros(x.shape, jnp.float32)
  for j in range(len(mags) - 1):
    t = (mags[j] + mags[j + 1]) / 2
    up_on_tie = (j + 1) % 2 == 0
    take = (a >= t) if up_on_tie else (a > t)
    out = out + jnp.where(take, jnp.float32(mags[j + 1] - mags[j]), 0.)
  return jnp.where(x < 0, -out, out)


def _round_stochastic(x: jax.Array, f: Format, key: jax.Array) -> jax.Array:
  # Unbiased: round up with probability (x - lo) / (hi - lo) where lo <= x <=
  # hi are the neighbouring grid values; values beyond +-max saturate.
  g = grid(f.name).astype(np.float64)
  xc = jnp.clip(x, -f.max, f.max)
  lo = jnp.full(x.shape, g[0], jnp.float32)
  hi = jnp.full(x.shape, g[0], jnp.float32)
  for j, step in enumerate(np.diff(g)):
    lo = lo + jnp.where(xc >= g[j + 1], jnp.float32(step), 0.)
    hi = hi + jnp.where(xc > g[j], jnp.float32(step), 0.)
  gap = hi - lo
  p = jnp.where(gap > 0, (xc - lo) / jnp.where(gap > 0, gap, 1.), 0.)
  u = jax.random.uniform(key, x.shape, jnp.float32)
  return jnp.where(u < p, hi, lo)


# Float formats rounded arithmetically by `round_to_float`: mantissa bits,
# exponent of the smallest normal, largest finite value.
FLOAT_BITS = {
    "e4m3": (3, -6, 448.),
    "e5m2": (2, -14, 57344.),
    "float16": (10, -14, 65504.),
    "bfloat16": (7, -126, 3.3895313892515355e38),
}


def _float_bits(fmt: str) -> tuple[int, int, float]:
  try:
    return FLOAT_BITS[fmt]
  except (KeyError, TypeError):
    raise ValueError(f"unknown fmt {fmt!r}; expected one of "
                     f"{sorted(FLOAT_BITS)}") from None


def round_to_float(x: jax.Array, fmt: str) -> jax.Array:
  """Rounds f32 values to the nearest value of a float format (RNE), as f32.

  Saturates at +-max; subnormals of the target format are kept (not
  flushed); NaN stays NaN. Equal to an ml_dtypes cast followed by a cast
  back to f32, but written as arithmetic (`lax.reduce_precision` plus a
  fixed-step rounding below the smallest normal): XLA:GPU, which may
  assume excess precision, removes f32 -> fp8 -> f32 convert pairs and so
  would silently skip the quantization.

  Args:
    x: float array.
    fmt: "e4m3" | "e5m2" | "float16" | "bfloat16".
  """
  mant, emin, fmax = _float_bits(fmt)
  xc = jnp.clip(x.astype(jnp.float32), -fmax, fmax)
  normal = jax.lax.reduce_precision(xc, exponent_bits=8, mantissa_bits=mant)
  if emin <= -126:
    # bf16 shares f32's exponent range (and XLA flushes f32 subnormals).
    return normal
  step = 2. ** (emin - mant)        # spacing of the subnormals
  sub = jnp.round(xc / step) * step  # jnp.round is half-to-even
  return jnp.where(jnp.abs(xc) < 2. ** emin, sub, normal)


def stochastic_round_to_float(x: jax.Array, fmt: str,
                              key: jax.Array) -> jax.Array:
  """Unbiased stochastic rounding of f32 values to a float format, as f32.

  Returns one of the two neighbouring values lo <= x <= hi of `fmt`, hi
  with probability (x - lo) / (hi - lo). Pure arithmetic (see
  `round_to_float` for why no convert pairs); saturates at +-max.
  """
  mant, emin, fmax = _float_bits(fmt)
  x32 = jnp.clip(x.astype(jnp.float32), -fmax, fmax)
  near = round_to_float(x32, fmt)
  _, ex = jnp.frexp(near)               # near = m * 2**ex, m in [0.5, 1)
  e = jnp.where(near == 0, emin, jnp.maximum(ex - 1, emin))
  ulp = jnp.ldexp(jnp.float32(1), e - mant)
  # Just below a power of two (toward zero) the spacing halves.
  pow2 = (jnp.abs(near) == jnp.ldexp(jnp.float32(1), e)) & (e > emin)
  down = jnp.where(pow2 & (near > 0), ulp / 2, ulp)
  up = jnp.where(pow2 & (near < 0), ulp / 2, ulp)
  lo = jnp.where(near <= x32, near, near - down)
  hi = jnp.minimum(jnp.where(near >= x32, near, near + up), fmax)
  gap = hi - lo
  p = jnp.where(gap > 0, (x32 - lo) / jnp.where(gap > 0, gap, 1.), 0.)
  u = jax.random.uniform(key, x32.shape, jnp.float32)
  out = jnp.where(u < p, hi, lo)
  return jnp.where(jnp.isnan(x32), x32, out)


def cast_fp8(x: jax.Array, fmt: str) -> jax.Array:
  """Saturating cast to FP8 E4M3 / E5M2, returned in the FP8 dtype.

  JAX's FP8 casts do not saturate (e4m3fn: 500 -> NaN, e5m2: 1e6 -> inf), so
  values are rounded (saturating) first; the final cast is then exact.
  """
  f = get_format(fmt)
  if f.is_fp4:
    raise ValueError(f"cast_fp8 needs an FP8 fmt, got fmt={fmt!r}")
  return round_to_float(x, fmt).astype(f.dtype)


def round_to_format(x: jax.Array, fmt: str, mode: str = "paper",
                    key: jax.Array | None = None) -> jax.Array:
  """Rounds already-scaled values onto the grid of `fmt`.

  Args:
    x: any float array, already multiplied by its scale.
    fmt: "e2m1" | "e1m2" | "e3m0" | "e4m3" | "e5m2".
    mode: "paper" (LUT, ties up), "rne" (ties to even) or "stochastic".
      For FP8 formats "paper" and "rne" are the same saturating cast.
    key: PRNG key, required for mode="stochastic".

  Returns:
    Values on the format's grid (saturated at +-max), same shape and dtype
    as `x`. NaN stays NaN.
  """
  f = get_format(fmt)
  if mode not in ROUNDING_MODES:
    raise ValueError(
        f"unknown mode {mode!r}; expected one of {ROUNDING_MODES}")
  x = jnp.asarray(x)
  if mode == "stochastic" and key is None:
    raise ValueError("mode='stochastic' needs a PRNG key (argument key)")
  if not f.is_fp4:
    if mode == "stochastic":
      raise ValueError(
          f"mode='stochastic' is implemented for FP4 formats, not fmt={fmt!r}")
    return jnp.where(jnp.isnan(x), x, round_to_float(x, fmt)).astype(x.dtype)
  xf = x.astype(jnp.float32)
  if mode == "paper":
    out = _round_paper(xf, f)
  elif mode == "rne":
    out = _round_rne(xf, f)
  else:
    out = _round_stochastic(xf, f, key)
  # Every FP4 grid value is exact in bf16/f16/f32, so this cast is exact.
  return jnp.where(jnp.isnan(xf), xf, out).astype(x.dtype)


# ----------------------------------------------------------- powers of two
# Every power-of-two scale (E8M0 block scales, pow2 scales, the FP8
# communication and Adam-moment scales) is built here, from the exponent
# bits: frexp reads an exponent exactly, ldexp writes 2**e exactly. Neither
# log2 nor exp2 is used: on XLA:CPU floor(log2(x)) of the f32 one ulp below
# a power of two rounds up to that power's exponent, and exp2 of an integer
# is not always an exact power of two (jax 0.10: 221 of the 254 normal
# exponents, all beyond +-12, off by up to 4e-6 relative; 2**-126 flushed).
F32_MIN_EXP = -126   # exponent of the smallest normal f32
F32_MAX_EXP = 127    # exponent of the largest finite f32's binade
_F32_TINY = float(np.finfo(np.float32).tiny)
_F32_MAX = float(np.finfo(np.float32).max)


def _positive_normal(v: jax.Array) -> jax.Array:
  # Subnormals count as zero, as XLA:CPU's arithmetic flushes them (jax
  # 0.10's frexp reads their exponent, 0.12's returns 0: this keeps both
  # and every backend alike). NaN fails both comparisons.
  return (v >= _F32_TINY) & (v <= _F32_MAX)


def pow2_exponent(num: jax.Array, den: jax.Array | float = 1.0, *,
                  ceil: bool = False) -> jax.Array:
  """floor(log2(num / den)) (or ceil) of the exact quotient, int32.

  With num = a 2**i and den = b 2**j (frexp: a, b in [0.5, 1)), num / den =
  (a / b) 2**(i - j) and a / b lies in (0.5, 2), so the floor is i - j - 1
  where a < b and i - j otherwise; the ceil adds 1 unless a == b (the
  quotient is a power of two). No division is rounded: the answer is that
  of real arithmetic on the two f32 inputs.

  Args:
    num, den: float arrays (broadcast together), taken as f32; meaningful
      where both are positive normal f32 (see `pow2_scale` for the rest).
    ceil: round the logarithm up instead of down.

  Returns:
    int32, the broadcast shape.
  """
  a, i = jnp.frexp(jnp.asarray(num, jnp.float32))
  b, j = jnp.frexp(jnp.asarray(den, jnp.float32))
  e = i - j - (a < b).astype(jnp.int32)
  if ceil:
    e = e + (a != b).astype(jnp.int32)
  return e


def exp2_int(e: jax.Array) -> jax.Array:
  """2**e exactly, f32, for integer e in [F32_MIN_EXP, F32_MAX_EXP] (ldexp
  writes the exponent bits; below that range the result flushes to 0)."""
  return jnp.ldexp(jnp.float32(1), jnp.asarray(e, jnp.int32))


def pow2_scale(num: jax.Array, den: jax.Array | float = 1.0, *,
               ceil: bool = False, min_exp: int = F32_MIN_EXP,
               max_exp: int = F32_MAX_EXP) -> jax.Array:
  """2**clip(floor(log2(num / den)), min_exp, max_exp), exact, f32.

  The one place power-of-two scales are made: the exponent from
  `pow2_exponent` (exact, no rounded quotient), the power from `exp2_int`.

  Args:
    num, den: float arrays (broadcast together).
    ceil: 2**ceil(log2(num / den)) instead.
    min_exp, max_exp: exponent bounds, within [F32_MIN_EXP, F32_MAX_EXP].

  Returns:
    f32, the broadcast shape; 1 where num or den is not a positive normal
    f32 (zero, subnormal, negative, inf or NaN).
  """
  if not F32_MIN_EXP <= min_exp <= max_exp <= F32_MAX_EXP:
    raise ValueError(f"pow2_scale needs {F32_MIN_EXP} <= min_exp <= max_exp "
                     f"<= {F32_MAX_EXP}, got {min_exp}, {max_exp}")
  num = jnp.asarray(num, jnp.float32)
  den = jnp.asarray(den, jnp.float32)
  ok = _positive_normal(num) & _positive_normal(den)
  e = jnp.clip(pow2_exponent(num, den, ceil=ceil), min_exp, max_exp)
  return jnp.where(ok, exp2_int(e), jnp.float32(1))


def cast_scale(s: jax.Array, storage: str) -> jax.Array:
  """Rounds a positive f32 decode scale to its storage format.

  "f32": unchanged. "e8m0": a power of two, 2**floor(log2(s)) (the OCP MX
  rule for the shared exponent; s below the smallest normal f32 gives 1,
  see `pow2_scale`). An FP8 format name ("e4m3", "e5m2"): the saturating
  cast (NVFP4's E4M3 block scales).
  """
  if storage == "f32":
    return s
  if storage == "e8m0":
    # E8M0 reaches down to 2**-127, an f32 subnormal: the f32 values of
    # its range are 2**-126 .. 2**127.
    return pow2_scale(s)
  if storage in FLOAT_BITS:
    return round_to_float(s, storage)
  raise ValueError(f"unknown scale storage {storage!r}; expected 'f32', "
                   f"'e8m0' or one of {sorted(FLOAT_BITS)}")


# ---------------------------------------------------------- scale formats
@dataclasses.dataclass(frozen=True)
class ScaleFormat:
  """How the scales of one scaling group are made and stored.

  Attributes:
    storage: the decode scale's storage: "f32", "e8m0" (a power of two,
      OCP MX) or an FP8 format name (`cast_scale`).
    pow2: the f32 scale floored to a power of two, sf = 2**floor(log2(max /
      amax)) (the paper's released code); implied by "e8m0" storage.
    round_up: E8M0 only: the exponent rounded up, so that no element
      saturates (Mishra et al. 2506.08027), instead of OCP's floor.
    tensor_scale: a second level, one f32 scale per tensor that keeps the
      FP8 block scales in range (NVFP4).
  """
  storage: str
  pow2: bool = False
  round_up: bool = False
  tensor_scale: bool = False

  def __post_init__(self):
    if self.storage not in ("f32", "e8m0") and self.storage not in FLOAT_BITS:
      raise ValueError(f"ScaleFormat.storage must be 'f32', 'e8m0' or an FP8 "
                       f"format, got {self.storage!r}")
    if self.round_up and self.storage != "e8m0":
      raise ValueError("ScaleFormat.round_up needs E8M0 storage")
    if self.tensor_scale and self.storage in ("f32", "e8m0"):
      raise ValueError("ScaleFormat.tensor_scale is the second level of FP8 "
                       "block scales")


# The one table of scale formats: an operand spec names one of these
# (`qconfig.TensorQuant.scale`); a new one is an entry here.
SCALE_FORMATS: dict[str, ScaleFormat] = {
    # The paper: sf = max / amax in f32.
    "f32": ScaleFormat("f32"),
    # The released code: sf floored to a power of two, kept in f32.
    "pow2": ScaleFormat("f32", pow2=True),
    # OCP MX: a shared power-of-two exponent, amax in the top binade.
    "e8m0": ScaleFormat("e8m0", pow2=True),
    # MX with the exponent rounded up: nothing saturates (Mishra et al.).
    "e8m0_up": ScaleFormat("e8m0", pow2=True, round_up=True),
    # FP8 E4M3 block scales alone.
    "e4m3": ScaleFormat("e4m3"),
    # NVFP4: E4M3 block scales under one f32 scale per tensor.
    "e4m3_tensor": ScaleFormat("e4m3", tensor_scale=True),
}


def scale_format(name: str) -> ScaleFormat:
  """The SCALE_FORMATS entry `name`; ValueError naming the known ones."""
  try:
    return SCALE_FORMATS[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown scale format {name!r}; expected one of "
                     f"{sorted(SCALE_FORMATS)}") from None


# ------------------------------------------------------------ FP4 codes
# An FP4 value as a 4-bit code: bit 3 the sign, bits 0-2 the index of its
# magnitude in `Format.magnitudes` (for E2M1 this is the OCP bit pattern,
# what ml_dtypes' float4_e2m1fn stores). Two codes share a byte, the even
# element in the low nibble. What a rematerialised step keeps of an FP4
# operand for its backward (fp4jax.qdot).


def fp4_to_codes(values: jax.Array, fmt: str) -> jax.Array:
  """Codes of values on an FP4 grid.

  Args:
    values: float array whose entries lie on the grid of `fmt` (-0.0 keeps
      its sign bit); values off the grid get the code of the largest
      magnitude not above theirs, NaN that of 0.
    fmt: an FP4 format name ("e2m1", "e1m2", "e3m0").

  Returns:
    uint8 codes in [0, 15], the shape of `values`.
  """
  f = get_format(fmt)
  if not f.is_fp4:
    raise ValueError(f"fp4_to_codes needs an FP4 fmt, got fmt={fmt!r}")
  v = values.astype(jnp.float32)
  a = jnp.abs(v)
  # Magnitude index: how many nonzero magnitudes lie at or below |v|.
  idx = sum((a >= jnp.float32(m)).astype(jnp.uint8) for m in f.magnitudes[1:])
  return jnp.where(jnp.signbit(v), idx + jnp.uint8(8), idx).astype(jnp.uint8)


def fp4_from_codes(codes: jax.Array, fmt: str) -> jax.Array:
  """Values of FP4 codes (the inverse of `fp4_to_codes` on the grid).

  Args:
    codes: integer array with entries in [0, 15] (higher bits ignored).
    fmt: an FP4 format name.

  Returns:
    float32 values, the shape of `codes`; code 8 is -0.0.
  """
  f = get_format(fmt)
  if not f.is_fp4:
    raise ValueError(f"fp4_from_codes needs an FP4 fmt, got fmt={fmt!r}")
  c = codes.astype(jnp.int32)
  mag = jnp.asarray(np.asarray(f.magnitudes, np.float32))[c & 7]
  return jnp.where((c & 8) != 0, -mag, mag)


def pack_nibbles(codes: jax.Array) -> jax.Array:
  """Two 4-bit codes per byte along the last axis.

  Args:
    codes: uint8 [..., n], entries in [0, 15].

  Returns:
    uint8 [..., ceil(n / 2)]: element 2i in the low nibble of byte i,
    element 2i + 1 in the high one (a zero nibble pads an odd n).
  """
  c = codes.astype(jnp.uint8)
  n = c.shape[-1]
  if n % 2:
    c = jnp.concatenate([c, jnp.zeros((*c.shape[:-1], 1), jnp.uint8)], -1)
  pairs = c.reshape(*c.shape[:-1], -1, 2)
  return (pairs[..., 0] & 15) | ((pairs[..., 1] & 15) << 4)


def unpack_nibbles(packed: jax.Array, n: int) -> jax.Array:
  """The inverse of `pack_nibbles`: uint8 [..., ceil(n / 2)] -> [..., n]."""
  if packed.shape[-1] != (n + 1) // 2:
    raise ValueError(f"unpack_nibbles: {packed.shape[-1]} bytes do not hold "
                     f"n={n} codes")
  p = packed.astype(jnp.uint8)
  pairs = jnp.stack([p & 15, p >> 4], axis=-1)
  return pairs.reshape(*p.shape[:-1], -1)[..., :n]
