"""Pallas kernel: fused Outlier Clamping + absmax FP4 quantization per row
(activations, per token) or per column (weights, per output channel), with
the compensation residual and the DGE factor, in one pass over the operand.

Owns: `occ_quantize` (the kernel), `occ_quantize_reference` (the same in
plain jnp through `quant`: the oracle and the fallback),
`can_use_occ_quantize` (the predicate) and the `interpret` flag (the kernel
on CPU).

Per group (a row of X [M, K] along K, or a column of W [K, N] along K):
  lo, hi = exact order statistics s[int((1-alpha) n)], s[min(int(alpha n),
           n-1)] of the group (RECIPE §4), found by a 32-step bisection over
           the float bits (order-preserving int32 keys) inside the kernel,
           so no sort and no extra pass over HBM;
  xc     = clip(x, lo, hi), residual = x - xc;
  sf     = max / amax(xc) (float scale, RECIPE §2), values = round(xc sf)
           onto the E2M1 / E1M2 / E3M0 grid ("paper" LUT or "rne"), written
           as float8_e4m3fn (every FP4 grid value is exact in it: the FP8
           GEMM's operand, no cast pass);
  dge    = f'(xc sf) (RECIPE §3), optional, for weights.
XLA computes the same in ~32 counting passes for the order statistics plus
the quantize fusions (GPU-NOTES §3-4); this kernel reads each row once.

Backend: Triton (`jax.experimental.pallas.triton`), not Mosaic GPU. The
kernel is a generic row reduction + elementwise `pallas_call`: Triton
lowers that from plain jnp (reductions, where, bitcast, fori_loop) on
Ampere and Hopper alike, and the identical kernel body runs with
`interpret=True` on CPU. Mosaic GPU kernels (`plgpu.kernel`) need explicit
warpgroup layouts for reductions and do not run in interpret mode
(GPU-NOTES §4). Triton blocks must have power-of-two shapes: groups are
padded to the next power of two and the padding is masked out of every
count and max, so any K works.

Must not import: flax, ml_collections, fp4jax modules right of `quant`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fp4jax import backend
from fp4jax import numerics
from fp4jax import quant
from fp4jax.qconfig import TensorQuant

__all__ = ["RowQuant", "occ_quantize", "occ_quantize_reference",
           "can_use_occ_quantize"]

# Largest padded group the kernel takes in one block: 16384 f32 keys plus
# their working copies per row stay within a Hopper SM's registers + shared
# memory at one row per program; longer groups fall back to the reference.
MAX_GROUP = 16384
FORMATS = ("e2m1", "e1m2", "e3m0")
ROUNDINGS = ("paper", "rne")


class RowQuant(NamedTuple):
  """Outputs, in the operand's layout ([M, K] rows or [K, N] columns).

  values: FP4 grid values as float8_e4m3fn, same shape as x.
  scale: multiply-to-quantize sf, float32, [M, 1] (rows) or [1, N] (cols).
  residual: x - clip(x, lo, hi), x's dtype (zeros without OCC).
  dge: f'(values' pre-rounding xc * sf) float32, or None (not asked for).
  """
  values: jax.Array
  scale: jax.Array
  residual: jax.Array
  dge: jax.Array | None


def _indices(n: int, alpha: float | None) -> tuple[int, int]:
  # The same order statistics as quant.occ_clamp.
  if alpha is None:
    return 0, n - 1
  return int((1 - alpha) * n), min(int(alpha * n), n - 1)


def occ_quantize_reference(x: jax.Array, alpha: float | None, *,
                           axis: int = 1, fmt: str = "e2m1",
                           rounding: str = "paper",
                           dge_k: float | None = None,
                           dge_cap: float = 3.0) -> RowQuant:
  """The kernel's result through `quant` (jnp): the oracle and fallback.

  Args:
    x: [M, K] activations (axis=1: per row) or [K, N] weights (axis=0: per
      column), f32 or bf16.
    alpha: OCC quantile in (0.5, 1), or None (no clamping).
    axis: the reduced axis (1 or 0).
    fmt: FP4 element format.
    rounding: "paper" | "rne".
    dge_k, dge_cap: also return the DGE factor with these parameters.
  """
  if alpha is not None:
    xc, resid = quant.occ_clamp(x, alpha, axis)
  else:
    xc, resid = x, jnp.zeros_like(x)
  q = quant.quantize(xc.astype(jnp.float32),
                     TensorQuant(fmt=fmt, axis=axis, rounding=rounding))
  dge = None
  if dge_k is not None:
    dge = quant.dge_derivative(xc.astype(jnp.float32) * q.scale, dge_k,
                               dge_cap, fmt)
  return RowQuant(q.values.astype(jnp.float8_e4m3fn), q.scale, resid, dge)


def can_use_occ_quantize(x: jax.Array, *, axis: int = 1, fmt: str = "e2m1",
                         rounding: str = "paper",
                         interpret: bool = False) -> bool:
  """True if `occ_quantize` takes this operand on this platform."""
  if getattr(x, "ndim", None) != 2 or axis not in (0, 1):
    return False
  if fmt not in FORMATS or rounding not in ROUNDINGS:
    return False
  if jnp.dtype(x.dtype) not in (jnp.dtype(jnp.float32),
                                jnp.dtype(jnp.bfloat16)):
    return False
  if _pow2(x.shape[axis]) > MAX_GROUP:
    return False
  if interpret:
    return True
  # Triton's Pallas backend: NVIDIA GPUs (Ampere and newer).
  return backend.target() == "gpu"


def _pow2(n: int) -> int:
  return 1 << max(0, (n - 1).bit_length())


def _kernel(x_ref, v_ref, s_ref, r_ref, *dge_ref, n, i_lo, i_hi, red, clamp,
            fmt, rounding, dge_k, dge_cap):
  x = x_ref[...].astype(jnp.float32)
  pos = jax.lax.broadcasted_iota(jnp.int32, x.shape, red)
  valid = pos < n
  keys = quant._sortable(x)   # pylint: disable=protected-access
  if clamp:
    kshape = tuple(1 if d == red else s for d, s in enumerate(x.shape))

    def body(_, st):
      # Two bisections at once (the i_lo-th and i_hi-th smallest keys),
      # each a count over the valid part of the group.
      lo0, hi0, lo1, hi1 = st
      out = []
      for lo, hi, k in ((lo0, hi0, i_lo), (lo1, hi1, i_hi)):
        mid = (lo >> 1) + (hi >> 1) + (lo & hi & 1)
        c = jnp.sum(jnp.where(valid & (keys <= mid), 1, 0), axis=red,
                    keepdims=True)
        left = c > k
        out += [jnp.where(left, lo, mid + 1), jnp.where(left, mid, hi)]
      return tuple(out)

    lo_i = jnp.full(kshape, -(2**31), jnp.int32)
    hi_i = jnp.full(kshape, 2**31 - 1, jnp.int32)
    lo0, _, lo1, _ = jax.lax.fori_loop(0, 32, body, (lo_i, hi_i, lo_i, hi_i))
    lo = quant._unsortable(lo0)   # pylint: disable=protected-access
    hi = quant._unsortable(lo1)   # pylint: disable=protected-access
    xc = jnp.clip(x, lo, hi)
  else:
    xc = x
  amax = jnp.max(jnp.where(valid, jnp.abs(xc), 0.), axis=red, keepdims=True)
  sf = quant.scale_from_amax(amax, TensorQuant(fmt=fmt, axis=red))
  scaled = xc * sf
  v_ref[...] = numerics.round_to_format(scaled, fmt, rounding).astype(
      v_ref.dtype)
  s_ref[...] = sf
  r_ref[...] = (x - xc).astype(r_ref.dtype)
  if dge_ref:
    dge_ref[0][...] = quant.dge_derivative(scaled, dge_k, dge_cap, fmt)


@functools.partial(jax.jit, static_argnames=(
    "alpha", "axis", "fmt", "rounding", "dge_k", "dge_cap", "block",
    "interpret"))
def occ_quantize(x: jax.Array, alpha: float | None, *, axis: int = 1,
                 fmt: str = "e2m1", rounding: str = "paper",
                 dge_k: float | None = None, dge_cap: float = 3.0,
                 block: int = 1, interpret: bool = False) -> RowQuant:
  """Fused OCC + per-group FP4 quantization (see the module docstring).

  Args:
    x: [M, K] (axis=1: groups are rows) or [K, N] (axis=0: columns), f32 or
      bf16.
    alpha: OCC quantile in (0.5, 1), or None for plain absmax quantization.
    axis: the reduced axis.
    fmt, rounding: FP4 format and rounding ("paper" | "rne").
    dge_k, dge_cap: also emit the DGE factor f' on the scaled values.
    block: groups per program (rows of [block, K], or columns of [K, block]);
      a power of two.
    interpret: run the kernel body on CPU (Pallas interpret mode).

  Returns:
    RowQuant, bit-identical to `occ_quantize_reference` (same order
    statistics, scale and rounding arithmetic).
  """
  if not can_use_occ_quantize(x, axis=axis, fmt=fmt, rounding=rounding,
                              interpret=interpret):
    raise ValueError(f"occ_quantize cannot take x {x.shape} {x.dtype} "
                     f"(axis={axis}, fmt={fmt}, rounding={rounding}) here; "
                     "check can_use_occ_quantize first")
  if block < 1 or block & (block - 1):
    raise ValueError(f"block must be a power of two, got {block}")
  from jax.experimental import pallas as pl   # pylint: disable=g-import-not-at-top
  n = x.shape[axis]
  groups = x.shape[1 - axis]
  npad, gpad = _pow2(n), -(-groups // block) * block
  pad = [(0, 0), (0, 0)]
  pad[axis], pad[1 - axis] = (0, npad - n), (0, gpad - groups)
  xp = jnp.pad(x, pad)
  i_lo, i_hi = _indices(n, alpha)
  if axis == 1:
    blk, idx, sblk = (block, npad), (lambda i: (i, 0)), (block, 1)
    sshape = (gpad, 1)
  else:
    blk, idx, sblk = (npad, block), (lambda i: (0, i)), (1, block)
    sshape = (1, gpad)
  shapes = [jax.ShapeDtypeStruct(xp.shape, jnp.float8_e4m3fn),
            jax.ShapeDtypeStruct(sshape, jnp.float32),
            jax.ShapeDtypeStruct(xp.shape, x.dtype)]
  specs = [pl.BlockSpec(blk, idx), pl.BlockSpec(sblk, idx),
           pl.BlockSpec(blk, idx)]
  if dge_k is not None:
    shapes.append(jax.ShapeDtypeStruct(xp.shape, jnp.float32))
    specs.append(pl.BlockSpec(blk, idx))
  kernel = functools.partial(
      _kernel, n=n, i_lo=i_lo, i_hi=i_hi, red=axis,
      clamp=alpha is not None, fmt=fmt, rounding=rounding, dge_k=dge_k,
      dge_cap=dge_cap)
  params = None
  if not interpret:
    from jax.experimental.pallas import triton as pltriton  # pylint: disable=g-import-not-at-top
    params = pltriton.CompilerParams(num_warps=8 if npad >= 4096 else 4)
  outs = pl.pallas_call(
      kernel, out_shape=tuple(shapes), grid=(gpad // block,),
      in_specs=[pl.BlockSpec(blk, idx)], out_specs=tuple(specs),
      interpret=interpret, compiler_params=params,
      name="occ_quantize")(xp)
  sl = (slice(0, x.shape[0]), slice(0, x.shape[1]))
  ssl = (slice(0, groups), slice(None)) if axis == 1 else (
      slice(None), slice(0, groups))
  return RowQuant(outs[0][sl], outs[1][ssl], outs[2][sl],
                  outs[3][sl] if dge_k is not None else None)

