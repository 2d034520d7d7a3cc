"""Float64 numpy reference implementations (test oracles) of the FP4 recipe.

Owns: independent re-derivations, from the written recipe, of the element
grids, the three rounding modes, absmax fake-quantization, the DGE derivative,
the OCC clamp and the composed quantized matmul (forward and both gradients).
Everything is computed in float64 with numpy so it shares no code path with
the JAX implementation.

Must not import: fp4jax (independence is the point) or jax.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

# Non-negative magnitudes of each FP4 format, in code order (code 0..7), as
# tabulated in the recipe (section 1). Code order matters for ties-to-even.
_FP4_MAGNITUDES = {
    "e2m1": (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0),
    "e1m2": (0.0, 0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5),
    "e3m0": (0.0, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0),
}
_FP8_DTYPES = {
    "e4m3": ml_dtypes.float8_e4m3fn,
    "e5m2": ml_dtypes.float8_e5m2,
}
FP4_FORMATS = tuple(_FP4_MAGNITUDES)
FP8_FORMATS = tuple(_FP8_DTYPES)
FORMATS = FP4_FORMATS + FP8_FORMATS

# The threshold chain of the recipe (section 1), written out literally for
# E2M1: value v maps to GRID[number of thresholds t with v >= t].
E2M1_PAPER_THRESHOLDS = (-5.0, -3.5, -2.5, -1.75, -1.25, -0.75, -0.25,
                         0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5.0)


def magnitudes(fmt: str) -> np.ndarray:
  """Non-negative representable values of `fmt` in code order, float64."""
  if fmt in _FP4_MAGNITUDES:
    return np.asarray(_FP4_MAGNITUDES[fmt], np.float64)
  if fmt in _FP8_DTYPES:
    # Positive codes 0x00..0x7f decode in increasing order; drop inf / NaN.
    v = np.arange(128, dtype=np.uint8).view(_FP8_DTYPES[fmt])
    v = v.astype(np.float64)
    return v[np.isfinite(v)]
  raise ValueError(f"unknown fmt {fmt!r}")


def grid(fmt: str) -> np.ndarray:
  """Sorted distinct finite values of `fmt` (one zero), float64."""
  m = magnitudes(fmt)
  return np.concatenate([-m[:0:-1], m])


def max_value(fmt: str) -> float:
  return float(magnitudes(fmt)[-1])


def midpoints(fmt: str) -> np.ndarray:
  """Rounding thresholds of `fmt`: midpoints of neighbouring grid values."""
  g = grid(fmt)
  return (g[:-1] + g[1:]) / 2


def round_paper(x, fmt: str) -> np.ndarray:
  """Look-up-table rounding: nearest grid value, ties toward +inf, saturate.

  For the FP8 formats the recipe defines paper == rne (a saturating cast).
  """
  if fmt in FP8_FORMATS:
    return round_rne(x, fmt)
  x = np.asarray(x, np.float64)
  g = grid(fmt)
  # side="right": a value equal to a threshold counts it, i.e. goes up.
  idx = np.searchsorted(midpoints(fmt), x, side="right")
  return g[idx]


def round_rne(x, fmt: str) -> np.ndarray:
  """Nearest grid value, ties to the even code, saturating at +-max.

  Rounds the magnitude and restores the sign (sign-magnitude formats), so it
  is symmetric: rne(-v) == -rne(v).
  """
  x = np.asarray(x, np.float64)
  m = magnitudes(fmt)
  a = np.minimum(np.abs(x), m[-1])
  hi = np.clip(np.searchsorted(m, a, side="left"), 1, len(m) - 1)
  lo = hi - 1
  d_lo, d_hi = a - m[lo], m[hi] - a
  take_hi = (d_hi < d_lo) | ((d_hi == d_lo) & (hi % 2 == 0))
  mag = np.where(take_hi, m[hi], m[lo])
  return np.where(np.signbit(x), -mag, mag)


def neighbours(x, fmt: str) -> tuple[np.ndarray, np.ndarray]:
  """The grid values (lo, hi) with lo <= clip(x) <= hi (lo == hi on grid)."""
  g = grid(fmt)
  x = np.clip(np.asarray(x, np.float64), g[0], g[-1])
  hi_idx = np.searchsorted(g, x, side="left")
  lo_idx = np.where(g[hi_idx] == x, hi_idx, hi_idx - 1)
  return g[lo_idx], g[hi_idx]


def round_to_format(x, fmt: str, mode: str = "paper") -> np.ndarray:
  if mode == "paper":
    return round_paper(x, fmt)
  if mode == "rne":
    return round_rne(x, fmt)
  raise ValueError(f"unknown mode {mode!r}")


def scale_from_amax(amax, fmt: str, pow2: bool = False) -> np.ndarray:
  """sf = MAX/amax (or its power-of-two floor); 1 where amax is 0/inf/nan."""
  amax = np.asarray(amax, np.float64)
  ok = np.isfinite(amax) & (amax > 0)
  safe = np.where(ok, amax, 1.0)
  sf = max_value(fmt) / safe
  if pow2:
    # frexp is exact: sf = mant * 2**e with mant in [0.5, 1), so
    # floor(log2(sf)) == e - 1 without any log rounding.
    _, e = np.frexp(sf)
    sf = np.ldexp(1.0, e - 1)
  return np.where(ok, sf, 1.0)


def _group_amax(x: np.ndarray, axis, block: int) -> np.ndarray:
  """amax broadcastable to x (block == 0) or per block along `axis`."""
  if block:
    if not isinstance(axis, int):
      raise ValueError("block scaling needs a single int axis")
    xm = np.moveaxis(x, axis, -1)
    n = xm.shape[-1]
    if n % block:
      raise ValueError(f"axis length {n} not divisible by block {block}")
    xb = xm.reshape(*xm.shape[:-1], n // block, block)
    amax = np.max(np.abs(xb), axis=-1, keepdims=True)
    amax = np.broadcast_to(amax, xb.shape).reshape(xm.shape)
    return np.moveaxis(amax, -1, axis)
  return np.max(np.abs(x), axis=axis, keepdims=True)


def scales(x, fmt: str = "e2m1", axis=-1, pow2: bool = False,
           block: int = 0) -> np.ndarray:
  """Per-element scale factor sf (broadcast to x.shape), float64."""
  x = np.asarray(x, np.float64)
  amax = _group_amax(x, axis, block)
  return np.broadcast_to(scale_from_amax(amax, fmt, pow2), x.shape)


def quantize(x, fmt: str = "e2m1", axis=-1, pow2: bool = False,
             mode: str = "paper", block: int = 0,
             sf_mult: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
  """(q, sf): grid values q = round(x * sf) and the scales, float64.

  Args:
    x: any-shape array (converted to float64).
    fmt, axis, pow2, mode, block: as in the recipe (section 2).
    sf_mult: multiplies every scale (testing aid: perturbing float scales by
      ~1e-6 brackets the rounding decisions a float32 implementation may take
      for elements lying within float32 rounding of a threshold).
  """
  x = np.asarray(x, np.float64)
  sf = scales(x, fmt, axis, pow2, block) * sf_mult
  return round_to_format(x * sf, fmt, mode), sf


def fake_quant(x, fmt: str = "e2m1", axis=-1, pow2: bool = False,
               mode: str = "paper", block: int = 0) -> np.ndarray:
  """round(x * sf) / sf with absmax scaling over groups, float64."""
  q, sf = quantize(x, fmt, axis, pow2, mode, block)
  return q / sf


def _blocks_last(x: np.ndarray, block: int) -> np.ndarray:
  """[..., n] -> [..., n // block, block]."""
  return x.reshape(*x.shape[:-1], x.shape[-1] // block, block)


def mx_fake_quant(x, block: int = 32, fmt: str = "e2m1") -> np.ndarray:
  """OCP MX along the last axis: a shared power-of-two scale per block.

  Shared exponent E = floor(log2(amax_block)) - emax_elem (emax_elem = 2 for
  E2M1); elements are round-half-even(x / 2**E), saturated at +-max. An
  all-zero block keeps scale 1.
  """
  x = np.asarray(x, np.float64)
  xb = _blocks_last(x, block)
  amax = np.max(np.abs(xb), axis=-1, keepdims=True)
  emax = int(np.floor(np.log2(max_value(fmt))))
  _, e = np.frexp(np.where(amax > 0, amax, 1.0))   # amax = m 2**e, m in [.5,1)
  scale = np.where(amax > 0, np.ldexp(1.0, e - 1 - emax), 1.0)
  q = round_rne(xb / scale, fmt) * scale
  return q.reshape(x.shape)


def nv_fake_quant(x, block: int = 16) -> np.ndarray:
  """NVFP4 along the last axis: E4M3 block scales under one f32 tensor scale.

  ts = amax_tensor / (6 * 448); block decode scale d = e4m3(amax_b / 6 / ts)
  * ts (ml_dtypes RNE cast); elements round-half-even(x / d), saturated. A
  block whose E4M3 scale is 0 (flushed, or an all-zero block) is all 0, as
  Transformer Engine dequantizes it.
  """
  x = np.asarray(x, np.float64)
  ts = np.max(np.abs(x)) / (6.0 * 448.0)
  ts = ts if ts > 0 else 1.0
  xb = _blocks_last(x, block)
  amax = np.max(np.abs(xb), axis=-1, keepdims=True)
  d = (amax / 6.0 / ts).astype(np.float32).astype(
      ml_dtypes.float8_e4m3fn).astype(np.float64) * ts
  safe = np.where(d > 0, d, 1.0)
  return np.where(d > 0, round_rne(xb / safe, "e2m1") * d, 0.0
                  ).reshape(x.shape)


def dge_derivative(xs, k: float = 5.0, cap: float = 3.0,
                   fmt: str = "e2m1") -> np.ndarray:
  """f'(xs) of the recipe's DGE (section 3) on scaled values, float64.

  On each interval [left, left + delta] of the grid, with u = xs - left:
  f'(u) = (1/k) |2u/delta - 1|^(1/k - 1), capped at `cap`. Defined on
  [-max, max]; continuous at grid points (value 1/k), `cap` at midpoints.
  """
  xs = np.asarray(xs, np.float64)
  g = grid(fmt)
  i = np.clip(np.searchsorted(g, xs, side="right") - 1, 0, len(g) - 2)
  left, delta = g[i], g[i + 1] - g[i]
  t = np.abs(2.0 * (xs - left) / delta - 1.0)
  with np.errstate(divide="ignore"):
    d = np.where(t > 0, (1.0 / k) * t ** (1.0 / k - 1.0), np.inf)
  return np.minimum(d, cap)


def occ_bounds(x, alpha: float, axis=-1) -> tuple[np.ndarray, np.ndarray]:
  """Exact order statistics lo = s[int((1-a)N)], hi = s[int(aN)], keepdims."""
  x = np.asarray(x, np.float64)
  if axis is None:
    s = np.sort(x.reshape(-1))
    n = s.size
    lo = s[int((1 - alpha) * n)]
    hi = s[int(alpha * n)]
    return np.full([1] * x.ndim, lo), np.full([1] * x.ndim, hi)
  s = np.sort(x, axis=axis)
  n = x.shape[axis]
  lo = np.take(s, [int((1 - alpha) * n)], axis=axis)
  hi = np.take(s, [int(alpha * n)], axis=axis)
  return lo, hi


def occ_clamp(x, alpha: float, axis=-1) -> tuple[np.ndarray, np.ndarray]:
  """Two-sided clamp at the order statistics; returns (clamped, residual)."""
  x = np.asarray(x, np.float64)
  lo, hi = occ_bounds(x, alpha, axis)
  xc = np.minimum(np.maximum(x, lo), hi)
  return xc, x - xc


# ---------------------------------------------------------------------------
# Quantized matmul: the recipe's three GEMMs composed from the pieces above.


@dataclasses.dataclass(frozen=True)
class MatmulSpec:
  """The numeric choices of one quantized-matmul recipe (oracle side).

  Attributes:
    x_fmt / w_fmt: element format of activations / weights; None = not
      quantized (kept in float64).
    x_axis: axis of X [M, K] reduced for the activation amax: -1 = one scale
      per token (row), None = one per tensor.
    occ_alpha: OCC clamp level on the activation rows; None = no clamp.
    compensation: "none" | "dense" | "sparse" (recipe section 4).
    pow2: power-of-two scales for the FP4 operands.
    w_axis: axis of W [K, N] reduced for the weight amax: 0 = one scale per
      output channel (paper), 1 = one scale per input channel (code), None =
      one per tensor.
    g_fmt: gradient format (per-tensor float scale, saturating RNE); None =
      gradients unquantized.
    dge_k, dge_cap: DGE parameters; dge_k None = straight-through.
    mode: FP4 rounding mode.
  """
  x_fmt: str | None = "e2m1"
  w_fmt: str | None = "e2m1"
  x_axis: int | None = -1
  occ_alpha: float | None = 0.99
  compensation: str = "sparse"
  pow2: bool = False
  w_axis: int | None = 0
  g_fmt: str | None = "e5m2"
  dge_k: float | None = 5.0
  dge_cap: float = 3.0
  mode: str = "paper"


FP4_PAPER = MatmulSpec()
W4A4_DIRECT = MatmulSpec(occ_alpha=None, compensation="none", dge_k=None)
FP4_CODE = MatmulSpec(compensation="none", pow2=True, w_axis=1)
# FP8 operands: float per-tensor (fp8) or per-row / per-column scales; the
# FP8 rounding is the saturating RNE cast (paper == rne for FP8).
FP8 = MatmulSpec(x_fmt="e4m3", w_fmt="e4m3", x_axis=None, w_axis=None,
                 occ_alpha=None, compensation="none", dge_k=None)
W4A8 = MatmulSpec(x_fmt="e4m3", occ_alpha=None, compensation="none")
W8A4 = MatmulSpec(w_fmt="e4m3", dge_k=None)


def x_operand(x, spec: MatmulSpec):
  """Activation side: (quantized dequantized Xq, residual dX, scaled Xc*sx)."""
  x = np.asarray(x, np.float64)
  if spec.occ_alpha is not None:
    xc, dx = occ_clamp(x, spec.occ_alpha, axis=-1)
  else:
    xc, dx = x, np.zeros_like(x)
  if spec.x_fmt is None:
    return xc, dx, None
  sx = scales(xc, spec.x_fmt, axis=spec.x_axis, pow2=spec.pow2)
  xq = round_to_format(xc * sx, spec.x_fmt, spec.mode) / sx
  return xq, dx, xc * sx


def w_operand(w, spec: MatmulSpec):
  """Weight side: (dequantized Wq, scaled W*sw or None)."""
  w = np.asarray(w, np.float64)
  if spec.w_fmt is None:
    return w, None
  sw = scales(w, spec.w_fmt, axis=spec.w_axis, pow2=spec.pow2)
  return round_to_format(w * sw, spec.w_fmt, spec.mode) / sw, w * sw


def grad_operand(g, spec: MatmulSpec):
  """Upstream gradient, per-tensor scaled and rounded to spec.g_fmt."""
  g = np.asarray(g, np.float64)
  if spec.g_fmt is None:
    return g
  sg = scales(g, spec.g_fmt, axis=None)
  return round_rne(g * sg, spec.g_fmt) / sg


def qmatmul(x, w, g, spec: MatmulSpec):
  """Forward Y and the gradients (dX, dW) for upstream G, float64.

  Args:
    x: [M, K] activations. w: [K, N] weights. g: [M, N] upstream gradient.
    spec: the recipe's numeric choices.

  Returns:
    (y, dx, dw, mags): y [M, N], dx [M, K], dw [K, N], and `mags`, a dict
    with the same keys holding sum_k |a_ik| |b_kj| of each GEMM (the scale
    of float32 accumulation error, for tolerances).
  """
  x = np.asarray(x, np.float64)
  w = np.asarray(w, np.float64)
  xq, dres, _ = x_operand(x, spec)
  wq, ws = w_operand(w, spec)
  if spec.compensation == "none":
    xeff = xq
    y = xq @ wq
    ymag = np.abs(xq) @ np.abs(wq)
  elif spec.compensation == "dense":
    # The residual is added back to the dequantized activation: one GEMM
    # against the quantized weight.
    xeff = xq + dres
    y = xeff @ wq
    ymag = np.abs(xeff) @ np.abs(wq)
  elif spec.compensation == "sparse":
    # The residual product runs in high precision against the raw weight.
    xeff = xq
    y = xq @ wq + dres @ w
    ymag = np.abs(xq) @ np.abs(wq) + np.abs(dres) @ np.abs(w)
  else:
    raise ValueError(f"unknown compensation {spec.compensation!r}")
  gq = grad_operand(g, spec)
  dx = gq @ wq.T
  dxmag = np.abs(gq) @ np.abs(wq.T)
  dw = xeff.T @ gq
  dwmag = np.abs(xeff.T) @ np.abs(gq)
  if spec.dge_k is not None and ws is not None:
    dge = dge_derivative(ws, spec.dge_k, spec.dge_cap, spec.w_fmt)
    dw = dw * dge
    dwmag = dwmag * dge
  if spec.compensation == "sparse":
    # d/dX of Q(Xc) Q(W) + (X - Xc) W with STE through Q: where X was
    # clamped, Xc does not move with X and the residual moves one-for-one,
    # so the gradient reaches X through the raw W; the residual GEMM's
    # weight gradient carries no DGE factor (its W is not quantized).
    clamped = dres != 0
    dx = np.where(clamped, gq @ w.T, dx)
    dxmag = np.where(clamped, np.abs(gq) @ np.abs(w.T), dxmag)
    dw = dw + dres.T @ gq
    dwmag = dwmag + np.abs(dres.T) @ np.abs(gq)
  mags = {"y": ymag, "dx": dxmag, "dw": dwmag}
  return y, dx, dw, mags
