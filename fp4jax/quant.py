"""Quantizers: absmax scaling, quantize / dequantize, DGE and OCC.

Owns: scale computation per scaling group (tensor, row, column, block of B
along an axis; float, power-of-two, E8M0 or E4M3 scales, NVFP4's two
levels), `quantize` -> `QTensor`, `fake_quant` (STE), the Differentiable
Gradient Estimator derivative (RECIPE §3) and Outlier Clamping (RECIPE §4).

Must not import: flax, ml_collections, fp4jax modules right of `qconfig`.
"""

from __future__ import annotations

import functools
import inspect
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import backend
from fp4jax import numerics
from fp4jax.qconfig import TensorQuant


class QTensor(NamedTuple):
  """A quantized operand.

  Attributes:
    values: grid values of the element format, same shape as the input,
      float32 (exact: every FP4/FP8 grid value is an f32).
    scale: the multiply-to-quantize factor sf (x * sf was rounded), float32,
      broadcastable to `values`: keepdims shape for row/column/tensor
      scaling ([M, 1], [1, N], [1, 1]); full shape for block scaling. 1 for
      a group whose decode scale rounded to zero (its values are all 0).
    tensor_scale: NVFP4's per-tensor f32 decode scale ts, float32 [] (part
      of `scale` already: sf = 1 / (block decode * ts)), carried so that a
      block-scaled GEMM can apply it on its own; None for other specs.
  """
  values: jax.Array
  scale: jax.Array
  tensor_scale: jax.Array | None = None

  def dequantize(self, dtype=jnp.float32) -> jax.Array:
    return (self.values / self.scale).astype(dtype)


def _safe_ratio(num: float, d: jax.Array) -> jax.Array:
  """num / d, or 1 where d is 0 or non-finite [released code: amax == 0 ->
  scale 1] or the quotient overflows (a decode scale that underflowed)."""
  ok = jnp.isfinite(d) & (d > 0) & jnp.isfinite(num / d)
  return jnp.where(ok, num / jnp.where(ok, d, 1.), 1.)


# QuEST / Quartet: the MSE-optimal clip of 4-bit FP for Gaussian data, in
# standard deviations (their released code's gaussian_scale * 6).
QUEST_CLIP = 2.92247856


def nvfp4_tensor_scale(tensor_amax: jax.Array, q: TensorQuant) -> jax.Array:
  """NVFP4's second level: the f32 decode scale of the whole tensor, ts =
  amax / (max * 448), which maps the largest block decode scale to the top
  of the block scales' range (E4M3: 448) so they neither overflow nor
  flush; 1 where the tensor's amax is 0 or not finite. f32 [] (or
  keepdims, as tensor_amax)."""
  f = numerics.get_format(q.fmt)
  top = numerics.get_format(numerics.scale_format(q.scale).storage).max
  ts = tensor_amax.astype(jnp.float32) / (f.max * top)
  return jnp.where(jnp.isfinite(ts) & (ts > 0), ts, 1.)


def scale_from_amax(amax: jax.Array, q: TensorQuant,
                    tensor_amax: jax.Array | None = None) -> jax.Array:
  """Multiply-to-quantize scale sf for groups whose statistic is `amax`
  (f32): their absmax, or their standard deviation for scale_rule="quest".

  1 where the statistic is 0 or not finite [released code]. 0 for an E4M3
  block whose decode scale rounds to zero (NVFP4: the block is far below
  the tensor's amax): the block quantizes to 0, as Transformer Engine
  stores it (`quantize` keeps scale 1 in the QTensor for such blocks).
  """
  f = numerics.get_format(q.fmt)
  sfmt = numerics.scale_format(q.scale)
  amax = amax.astype(jnp.float32)
  if q.scale_rule == "quest":
    amax = amax * QUEST_CLIP      # the value that maps to the format's max
  if sfmt.storage == "e8m0":
    # The decode scale is X = 2**E and sf = 2**-E: -floor(log2 r) =
    # ceil(log2(1 / r)), so sf comes from the exact helper on the inverse
    # ratio, rounded the other way. sf's exponents [-126, 127] are E in
    # [-127, 126]: all of E8M0's but 2**127, whose sf would be an f32
    # subnormal (only an E1M2 round-up scale of an amax above 3.5 * 2**126
    # would need it; it gets 2**126 and saturates).
    if sfmt.round_up:
      # Mishra et al.: the smallest power of two that keeps amax <= max,
      # E = ceil(log2(amax / max)).
      sf = numerics.pow2_scale(f.max, amax)
    elif q.scale_rule == "quest":
      # Quartet's kernel: E = floor(log2(clip / max)).
      sf = numerics.pow2_scale(f.max, amax, ceil=True)
    else:
      # OCP MX: the shared exponent puts amax in the element format's top
      # binade, E = floor(log2 amax) - emax; elements above max saturate.
      sf = numerics.pow2_scale(2.**f.emax, amax, ceil=True)
  elif sfmt.storage != "f32":
    # FP8 block scales (NVFP4's E4M3), under a tensor scale if any.
    ts = nvfp4_tensor_scale(tensor_amax, q) if sfmt.tensor_scale else 1.
    block = numerics.cast_scale(amax / f.max / ts, sfmt.storage)
    sf = jnp.where(block == 0, 0., _safe_ratio(1., block * ts))
  else:
    # The paper's sf = max / amax, as one division by the statistic. Written
    # 1 / (amax / max), XLA may turn the division by the constant into a
    # multiplication by its rounded reciprocal in one program and not in
    # another (jax 0.12: the Pallas interpret kernel did, plain jit did
    # not), giving the same group scales one ulp apart.
    sf = _safe_ratio(float(f.max), amax)
  if sfmt.pow2 and sfmt.storage != "e8m0":
    # Released code: sf = 2**floor(log2(max / amax)), of the exact ratio.
    sf = (numerics.pow2_scale(f.max, amax) if sfmt.storage == "f32"
          else jnp.where(sf == 0, 0., numerics.pow2_scale(sf)))
  if q.scale_mult != 1.0:
    sf = sf * jnp.float32(q.scale_mult)
  return sf


def _norm_axis(axis: int | None, ndim: int) -> int | None:
  return None if axis is None else axis % ndim


def _stat(x32: jax.Array, q: TensorQuant, axis) -> jax.Array:
  """The group statistic over `axis` (int or tuple), keepdims: absmax, or
  the standard deviation (mean removed, as Quartet's) for "quest"."""
  if q.scale_rule == "quest":
    return jnp.std(x32, axis=axis, keepdims=True)
  return jnp.max(jnp.abs(x32), axis=axis, keepdims=True)


def compute_scale(x: jax.Array, q: TensorQuant, axis="spec") -> jax.Array:
  """Scale sf broadcastable to x (see QTensor.scale).

  `axis` overrides q.axis (any axis of an N-D x); by default q.axis.
  """
  x32 = x.astype(jnp.float32)
  axis = _norm_axis(q.axis if axis == "spec" else axis, x.ndim)
  tensor_amax = (jnp.max(jnp.abs(x32))
                 if numerics.scale_format(q.scale).tensor_scale else None)
  if q.block_2d:
    return _tile_scale(x32, q, tensor_amax)
  if axis is None:
    return scale_from_amax(_stat(x32, q, None), q, tensor_amax)
  if not q.block:
    return scale_from_amax(_stat(x32, q, axis), q, tensor_amax)
  n = x.shape[axis]
  if n % q.block:
    raise ValueError(f"block={q.block} does not divide the length {n} of "
                     f"axis {axis} of an operand of shape {x.shape}")
  moved = jnp.moveaxis(x32, axis, -1)
  grouped = moved.reshape(*moved.shape[:-1], n // q.block, q.block)
  sf = scale_from_amax(_stat(grouped, q, -1), q, tensor_amax)
  sf = jnp.broadcast_to(sf, grouped.shape).reshape(moved.shape)
  return jnp.moveaxis(sf, -1, axis)


def _tile_scale(x32: jax.Array, q: TensorQuant, tensor_amax) -> jax.Array:
  """One scale per block x block tile of a 2-D operand, full shape."""
  b = q.block
  if x32.ndim != 2 or x32.shape[0] % b or x32.shape[1] % b:
    raise ValueError(f"block_2d tiles of {b}x{b} need a 2-D operand with "
                     f"both dims divisible by {b}, got shape {x32.shape}")
  r, c = x32.shape
  tiles = x32.reshape(r // b, b, c // b, b)
  sf = scale_from_amax(_stat(tiles, q, (1, 3)), q, tensor_amax)
  return jnp.broadcast_to(sf, tiles.shape).reshape(r, c)


def quantize(x: jax.Array, q: TensorQuant, key: jax.Array | None = None,
             axis="spec") -> QTensor:
  """Absmax-scales x per `q` and rounds onto the format's grid.

  Args:
    x: float array (2-D GEMM operand, or any shape with `axis` given).
    q: the operand spec.
    key: PRNG key for stochastic rounding.
    axis: overrides q.axis; by default q.axis.
  """
  x32 = x.astype(jnp.float32)
  sf = compute_scale(x32, q, axis)
  values = numerics.round_to_format(x32 * sf, q.fmt, q.rounding, key)
  ts = (nvfp4_tensor_scale(jnp.max(jnp.abs(x32)), q)
        if numerics.scale_format(q.scale).tensor_scale else None)
  # sf = 0 (a flushed decode scale) rounded every value of its group to 0;
  # scale 1 keeps values / scale finite.
  return QTensor(values, jnp.where(sf == 0, 1., sf), ts)


def _fake_quant_value(x, fmt, axis, pow2, mode, block, key):
  if isinstance(axis, tuple) and len(axis) == 1:
    axis = axis[0]
  if isinstance(axis, tuple):
    # Several reduced axes: move them last and flatten into one.
    nd = x.ndim
    ax = tuple(a % nd for a in axis)
    keep = [a for a in range(nd) if a not in ax]
    perm = keep + list(ax)
    xt = jnp.transpose(x, perm)
    flat = xt.reshape(*xt.shape[:len(keep)], -1)
    out = _fake_quant_value(flat, fmt, -1, pow2, mode, block, key)
    out = out.reshape(xt.shape)
    return jnp.transpose(out, np.argsort(perm))
  q = TensorQuant(fmt=fmt, axis=None if axis is None else -1,
                  scale="pow2" if pow2 else "f32", rounding=mode, block=block)
  return quantize(x, q, key, axis=axis).dequantize(x.dtype)


def fake_quant(x: jax.Array, fmt: str = "e2m1", axis=-1, pow2: bool = False,
               mode: str = "paper", block: int = 0,
               key: jax.Array | None = None) -> jax.Array:
  """Quantize-dequantize with a straight-through gradient.

  Args:
    x: float array of any shape.
    fmt: element format.
    axis: axis (int or tuple) reduced for absmax, None = tensor-wise.
    pow2: power-of-two scales (released code).
    mode: "paper" | "rne" | "stochastic".
    block: if > 0, groups of `block` elements along the (single) axis.
    key: PRNG key for mode="stochastic".

  Returns:
    Dequantized values, same shape and dtype as x; d/dx is the identity.
  """
  numerics.get_format(fmt)
  if mode not in numerics.ROUNDING_MODES:
    raise ValueError(f"unknown mode {mode!r}; expected one of "
                     f"{numerics.ROUNDING_MODES}")
  if block and not isinstance(axis, int):
    raise ValueError(f"block scaling needs a single int axis, got "
                     f"axis={axis!r}")
  xq = _fake_quant_value(
      x, fmt, axis if axis is None or isinstance(axis, int) else tuple(axis),
      pow2, mode, block, key)
  return _straight_through(x, xq)


@jax.custom_jvp
def _straight_through(x, xq):
  # Returns xq with d/dx = identity. Written as a custom rule rather than
  # x + stop_gradient(xq - x), which gives NaN for x = +-inf.
  del x
  return xq


@_straight_through.defjvp
def _straight_through_jvp(primals, tangents):
  return primals[1], tangents[0]


# ------------------------------------------------------------------- DGE
def dge_derivative(xs: jax.Array, k: float = 5.0, cap: float = 3.0,
                   fmt: str = "e2m1") -> jax.Array:
  """DGE derivative f'(xs) on scaled weights (RECIPE §3, paper Eq. 8).

  On each quantization interval [left, left + d], with u = xs - left:
  f'(u) = (1/k) |2u/d - 1|^(1/k - 1), capped at `cap` (it is infinite at
  the interval midpoint, the rounding threshold). 1/k at grid points.

  Args:
    xs: scaled weights in grid units ([-max, max]), any float dtype.
    k: sharpness, > 1 (paper: 5).
    cap: upper bound of the derivative (paper: 3).
    fmt: FP4 element format whose intervals are used.

  Returns:
    f'(xs), float32, same shape.
  """
  if not k > 1:
    raise ValueError(f"DGE k must be > 1, got k={k!r}")
  f = numerics.get_format(fmt)
  if not f.is_fp4:
    raise ValueError(f"DGE needs an FP4 fmt, got fmt={fmt!r}")
  g = numerics.grid(fmt).astype(np.float64)
  x = jnp.clip(xs.astype(jnp.float32), g[0], g[-1])
  left = jnp.full(x.shape, g[0], jnp.float32)
  delta = jnp.full(x.shape, g[1] - g[0], jnp.float32)
  # Intervals are [left, left + d); the top interval includes +max.
  for j in range(1, len(g) - 1):
    inside = x >= g[j]
    left = jnp.where(inside, jnp.float32(g[j]), left)
    delta = jnp.where(inside, jnp.float32(g[j + 1] - g[j]), delta)
  u = jnp.abs(2. * (x - left) / delta - 1.)
  # u == 0 gives inf, which the cap turns into `cap`. The paper's 1/k is a
  # multiplication: jitted XLA:CPU turns a division by a constant into one
  # by its rounded reciprocal, eager jax >= 0.11 divides exactly, and the
  # two differ in the last bit.
  return jnp.minimum(u ** (1. / k - 1.) * (1. / k), cap)


# ------------------------------------------------------------------- OCC
_TOPK_MAX = 64  # beyond this many tail elements, bisection beats top_k on CPU


def _sortable(x32: jax.Array) -> jax.Array:
  # Float bits -> int32 that orders like the floats (negative floats have
  # their magnitude bits flipped).
  b = jax.lax.bitcast_convert_type(x32, jnp.int32)
  return jnp.where(b < 0, b ^ jnp.int32(0x7FFFFFFF), b)


def _unsortable(k: jax.Array) -> jax.Array:
  b = jnp.where(k < 0, k ^ jnp.int32(0x7FFFFFFF), k)
  return jax.lax.bitcast_convert_type(b, jnp.float32)


def _kth_smallest(x32: jax.Array, k: int, axis: int | None) -> jax.Array:
  """Exact k-th smallest (0-based) by bisection over sortable float bits.

  32 counting passes instead of a sort: ~25x faster than jnp.sort on CPU.
  Returns keepdims shape along `axis` (all axes if None).
  """
  keys = _sortable(x32)
  shape = (1,) * x32.ndim if axis is None else (
      x32.shape[:axis] + (1,) + x32.shape[axis + 1:])
  lo = jnp.full(shape, -(2**31), jnp.int32)
  hi = jnp.full(shape, 2**31 - 1, jnp.int32)

  def body(_, lh):
    lo, hi = lh
    # Overflow-free midpoint of two int32s.
    mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
    c = jnp.sum(keys <= mid, axis=axis, keepdims=True)
    go_left = c > k
    return jnp.where(go_left, lo, mid + 1), jnp.where(go_left, mid, hi)

  lo, _ = jax.lax.fori_loop(0, 32, body, (lo, hi))
  return _unsortable(lo)


# XLA:GPU's RAFT select_k serves only unstable top_k with k <= 128; stable
# top_k with k > 16 becomes a full sort of every row (GPU-NOTES §3).
_GPU_TOPK_MAX = 128


def _top_k_unstable():
  """top_k with is_stable=False where the installed JAX has the argument
  (the order among equal values is irrelevant for an order statistic)."""
  try:
    params = inspect.signature(jax.lax.top_k).parameters
  except (TypeError, ValueError):
    return None
  if "is_stable" not in params:
    return None
  return functools.partial(jax.lax.top_k, is_stable=False)


def _top_k_for(k: int):
  """The top_k to take k tail elements with on this backend, or None
  (bisection is faster there)."""
  if backend.target() == "gpu":
    unstable = _top_k_unstable()
    return unstable if unstable is not None and k <= _GPU_TOPK_MAX else None
  return jax.lax.top_k if k <= _TOPK_MAX else None


def _order_stats(x32: jax.Array, i_lo: int, i_hi: int, axis: int | None):
  """(lo, hi, tails): the order statistics, keepdims along `axis`, and
  where top_k found them on the last axis, the int32 [..., k_top + k_bot]
  positions of the k_top largest and k_bot smallest entries of each row
  (every entry outside [lo, hi] is among them); else tails is None."""
  n = x32.size if axis is None else x32.shape[axis]
  k_top = n - i_hi            # hi is the k_top-th largest
  k_bot = i_lo + 1            # lo is the k_bot-th smallest
  top_k = _top_k_for(max(k_top, k_bot)) if axis is not None else None
  if top_k is not None:
    xm = jnp.moveaxis(x32, axis, -1)
    # min over the k values, not [..., -1:]: XLA:CPU lowers top_k followed
    # by a slice into a full sort (~30x slower).
    top, top_i = top_k(xm, k_top)
    bot, bot_i = top_k(-xm, k_bot)
    hi = jnp.min(top, axis=-1, keepdims=True)
    lo = -jnp.min(bot, axis=-1, keepdims=True)
    tails = None
    if axis in (-1, x32.ndim - 1):
      tails = jnp.concatenate([top_i, bot_i], axis=-1).astype(jnp.int32)
    return jnp.moveaxis(lo, -1, axis), jnp.moveaxis(hi, -1, axis), tails
  return (_kth_smallest(x32, i_lo, axis), _kth_smallest(x32, i_hi, axis),
          None)


def occ_clamp(x: jax.Array, alpha: float, axis: int | None = -1
              ) -> tuple[jax.Array, jax.Array]:
  """`occ_clamp_tails` without the tail positions."""
  return occ_clamp_tails(x, alpha, axis)[:2]


def occ_clamp_tails(x: jax.Array, alpha: float, axis: int | None = -1
                    ) -> tuple[jax.Array, jax.Array, jax.Array | None]:
  """Outlier clamping at exact order statistics (RECIPE §4, paper Eq. 9).

  With s = sort(x) along `axis` of length N: lo = s[int((1-alpha) N)],
  hi = s[int(alpha N)], clamped = clip(x, lo, hi). Computed without a full
  sort (top_k on the tails, or bisection).

  Args:
    x: float array, e.g. activations [M, K].
    alpha: quantile in (0.5, 1) (paper: 0.99).
    axis: -1 (or any int) for per-row statistics, None for tensor-wise.

  Returns:
    (clamped, residual, tails) with residual = x - clamped, both x.dtype,
    and tails, for per-row statistics along the last axis found by top_k,
    the int32 [..., k_top + k_bot] positions of each row's k_top largest
    and k_bot smallest entries (compensation.capacity + 2 of them): every
    nonzero of the row's residual is at one of them, once; the others'
    residual is 0. None where bisection or a tensor-wise quantile found
    them. The ELL form of the residual without another top_k.
  """
  if not (isinstance(alpha, (int, float)) and 0.5 < alpha < 1):
    raise ValueError(f"OCC alpha must be in (0.5, 1), got alpha={alpha!r}")
  ax = _norm_axis(axis, x.ndim)
  n = x.size if ax is None else x.shape[ax]
  i_lo, i_hi = int((1 - alpha) * n), int(alpha * n)
  i_hi = min(i_hi, n - 1)
  x32 = x.astype(jnp.float32)
  lo, hi, tails = _order_stats(x32, i_lo, i_hi, ax)
  xc = jnp.clip(x32, lo, hi).astype(x.dtype)
  return xc, x - xc, tails
