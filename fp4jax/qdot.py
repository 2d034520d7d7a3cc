"""The quantized matmul: one custom_vjp over 2-D operands, three GEMMs.

Owns: `qmatmul(x, w, recipe, key, execution=)` = x [M, K] @ w [K, N] whose
forward, dgrad (dx = g @ w^T) and wgrad (dw = x^T @ g) GEMMs each quantize
their operands as the `Recipe` says (RECIPE §5), with DGE on the weight
gradient (§3) and OCC on the activations (§4), run as the `Execution` says;
the GEMM implementations (one dispatch point, `GEMM_IMPLS`); what the
backward reads of the forward (`Saved`); the packed form of what the
backward keeps of x (`pack_residuals`: FP4 codes two per byte, named
`SAVED_NAME` for a remat policy); and `make_dot_general`, the
`lax.dot_general`-shaped seam for Flax layers and einsums.

Must not import: flax, ml_collections, fp4jax modules right of `quant`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

from fp4jax import (backend, compensation, fallback, gemm, hadamard,
                    numerics, quant)
from fp4jax.kernels import row_quant
from fp4jax.qconfig import (RECIPES, Execution, Recipe, TensorQuant,
                            get_recipe)

__all__ = ["qmatmul", "get_recipe", "make_dot_general", "RECIPES",
           "Execution", "GEMM_IMPLS", "SAVED_NAME", "PackedX", "Saved"]

_NN = (((1,), (0,)), ((), ()))   # [M, K] @ [K, N]
_NT = (((1,), (1,)), ((), ()))   # [M, N] @ [K, N]^T -> [M, K]
_TN = (((0,), (0,)), ((), ()))   # [M, K]^T @ [M, N] -> [K, N]


# The one dispatch point for GEMM implementations (fp4jax.gemm.IMPLS),
# resolved before tracing by dict lookup.
GEMM_IMPLS = gemm.IMPLS


_DEFAULT_EXECUTION = Execution()


def _impl(run: Execution) -> gemm.GemmImpl:
  return GEMM_IMPLS[gemm.resolve(run.impl)]


_dot = gemm.dot


def _op(q, spec: TensorQuant) -> gemm.Operand:
  """A quant.QTensor as a GEMM operand on the grid of its spec."""
  return gemm.Operand(q.values, q.scale, spec.fmt, spec, q.tensor_scale)


def _raw(v) -> gemm.Operand:
  """An operand that is on no grid (dequantized, residual, raw)."""
  return gemm.Operand(v)


def _keys(key, n):
  return (None,) * n if key is None else tuple(jax.random.split(key, n))


def _row_kernel(x32, r: Recipe, run: Execution):
  """impl "pallas": OCC + per-token quantization of X in the fused Pallas
  row kernel where it applies (Triton on GPU, interpret mode elsewhere).
  Returns (xc, residual or None, QTensor) or None (use `quant`; logged once
  per reason)."""
  if gemm.resolve(run.impl) != "pallas":
    return None
  q = r.x
  why = None
  if q is None:
    why = "activations are not quantized"
  elif r.requantizes:
    why = "the backward re-quantizes X (the kernel keeps no clamped X)"
  elif q.axis not in (-1, 1) or q.block or q.scale != "f32":
    why = "X is not scaled per token in f32"
  elif r.occ is not None and r.occ.axis not in (-1, 1):
    why = "OCC is tensor-wise"
  interpret = backend.target() != "gpu"
  if why is None and not row_quant.can_use_occ_quantize(
      x32, fmt=q.fmt, rounding=q.rounding, interpret=interpret):
    why = (f"the kernel does not serve rows of {x32.shape[1]} {q.fmt} "
           f"({q.rounding}) on {backend.target()}")
  if why is not None:
    fallback.once("pallas row kernel", f"recipe {r.name!r}: {why}; X is "
                  "quantized by XLA instead")
    return None
  alpha = None if r.occ is None else r.occ.alpha
  out = row_quant.occ_quantize(x32, alpha, fmt=q.fmt,
                               rounding=q.rounding, interpret=interpret)
  qx = quant.QTensor(out.values.astype(jnp.float32), out.scale)
  if r.occ is None:
    return x32, None, qx
  # xc itself is read only by re-quantizing recipes, which never come here.
  return None, out.residual, qx


def _ell(r: Recipe, run: Execution, resid, tails=None):
  """The residual in ELL form (sparse_impl "ell"), else None. Exact: with
  per-token OCC no row holds more than `compensation.capacity` nonzeros,
  and `tails` (quant.occ_clamp_tails), where given, holds every one."""
  if gemm.resolve_sparse(r, run) != "ell":
    return None
  if tails is not None:
    return compensation.Ell(tails, jnp.take_along_axis(
        resid.astype(jnp.float32), tails, axis=1))
  # Capacity 0 (too few columns for any outlier) gives zero slots, which
  # every product handles as R == 0.
  return compensation.to_ell(
      resid, compensation.capacity(resid.shape[1], r.occ.alpha))


def _fwd_core(x, w, r: Recipe, run: Execution, key, pack: bool = False,
              out_dtype=None):
  """Forward GEMM. Returns y [M, N] (f32, or out_dtype where the GEMM
  wrote it) and what the backward needs (`Saved`; with `pack`, its
  activation part compact and named, see `_pack_residuals`)."""
  impl = _impl(run)
  kx, kw, kb = _keys(key, 3)
  x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
  rht = r.fwd.rht
  if rht:
    # Quartet: Q(X R) Q(R^T W) = X W before rounding; gradients are taken
    # in the rotated space and rotated back (_bwd_core).
    x32 = hadamard.rotate(x32, rht, 1)
    w32 = hadamard.rotate(w32, rht, 0)
  fused = _row_kernel(x32, r, run)
  tails = None
  if fused is not None:
    xc, resid, qx = fused
  else:
    if r.occ is not None:
      xc, resid, tails = quant.occ_clamp_tails(x32, r.occ.alpha, r.occ.axis)
    else:
      xc, resid = x32, None
    qx = quant.quantize(xc, r.x, kx) if r.x is not None else None
  qw = quant.quantize(w32, r.w, kw) if r.w is not None else None
  x_deq = qx.dequantize() if qx is not None else xc
  w_deq = qw.dequantize() if qw is not None else w32

  comp = r.effective_compensation
  if comp == "dense":
    # Research code: residual added back densely before the GEMM.
    x_eff = x_deq + resid
    y = _dot(x_eff, w_deq, _NN, impl.deq_dtype)
  else:
    if qx is not None and qw is not None:
      # Exact FP4 GEMM simulation where the scales factor out of the K-sum,
      # Y = diag(1/sx) (Q(X sx) @ Q(W sw)) diag(1/sw); dequantized else.
      y = gemm.scaled_dot(_op(qx, r.x), _op(qw, r.w), _NN, impl,
                          accumulation=run.accumulation,
                    out_dtype=out_dtype if comp == "none" else None)
    else:
      y = _dot(x_deq, w_deq, _NN, impl.deq_dtype)
    x_eff = x_deq
    if comp == "sparse":
      # Paper: the sparse residual goes through a separate high precision
      # product with the unquantized weight.
      ell = _ell(r, run, resid, tails)
      if ell is None:
        y = y + _dot(resid, w32, _NN, impl.deq_dtype)
      else:
        y = y + compensation.spmm(ell, w32)
        resid = ell   # what the backward reads: c / K of the dense residual
  # Save only what this recipe's backward reads, in the operands' dtypes
  # (bf16 in a bf16 model); w itself is a parameter, live anyway.
  reuse = not r.requantizes
  keep_resid = comp == "sparse" or (comp == "dense" and not reuse)
  # A re-quantizing backward quantizes the clamped X and W, or with
  # requant_from "quantized" the forward's quantized X and W (rotated, if
  # so).
  from_quantized = r.requant_from == "quantized"
  x_src = x_deq if from_quantized else xc
  x_keep = x_eff.astype(x.dtype)
  w_keep = w_deq.astype(w.dtype)
  if reuse and comp != "dense":
    # The forward's grid operands, where the backward GEMM can run on them.
    x_keep = _grid_residual(qx, r.x, impl, 0) or x_keep
    w_keep = _grid_residual(qw, r.w, impl, 1) or w_keep
  res = Saved(
      x=x_keep if reuse else None,
      w_deq=w_keep if reuse or from_quantized else None, w=w,
      dge_scale=_dge_scale(r, qw, w32),
      x_src=None if reuse else x_src.astype(x.dtype),
      resid=resid if keep_resid else None, key=kb,
      mask_x=_trust_mask(xc, qx, r.x) if r.clip_mask else None,
      mask_w=_trust_mask(w32, qw, r.w) if r.clip_mask else None)
  if pack:
    res = _pack_residuals(r, res, qx, resid if comp == "dense" else None)
  return y, res


class Saved(NamedTuple):
  """What the forward keeps for the backward (None where this recipe's
  backward does not read it).

  Attributes:
    x: the forward's X as the simulated backward multiplies it: [M, K]
      dequantized (plus the residual under compensation "dense"), a
      GridResidual, or a PackedX (remat "quantized"); None when the
      backward re-quantizes.
    w_deq: the forward's W likewise [K, N] (also read by a backward that
      re-quantizes from the quantized operands).
    w: the weight itself [K, N] (a parameter, live anyway).
    dge_scale: the weight's quantization scale DGE evaluates on.
    x_src: what a re-quantizing backward quantizes: the clamped X, or the
      forward's quantized X (requant_from "quantized").
    resid: the OCC residual [M, K] (dense, or a compensation.Ell).
    key: the backward's PRNG key (stochastic rounding).
    mask_x, mask_w: QuEST's trust masks (clip_mask).
  """
  x: object
  w_deq: object
  w: jax.Array
  dge_scale: object
  x_src: object
  resid: object
  key: object
  mask_x: object
  mask_w: object


# ------------------------------------------------ grid operands reused
class GridResidual(NamedTuple):
  """A forward operand the backward multiplies on its grid: `values /
  scale`, with values in the FP8 dtype that holds the grid exactly (1 byte
  an element, half a bf16 copy) and the scale constant along the backward
  GEMM's contraction, so it factors out of it (`gemm.scaled_dot`)."""
  values: jax.Array
  scale: jax.Array


def _grid_residual(q, spec: TensorQuant | None, impl: gemm.GemmImpl,
                   contract: int) -> GridResidual | None:
  """The quantized operand `q` as a GridResidual where its backward GEMM
  (contracting `contract`: 0 = the wgrad's tokens for X, 1 = the dgrad's
  output channels for W) can run on FP8 tensor cores: per-tensor scales
  (the fp8 recipe) or scales along the other axis. Else None: the
  backward takes the operand dequantized (the paper's simulation)."""
  if (q is None or impl.grid != "fp8" or not impl.grid_backward
      or spec.block or not gemm.factors_out(_op(q, spec), contract)):
    return None
  return GridResidual(q.values.astype(gemm.fp8_dtype(spec.fmt)), q.scale)


def _operand(saved, spec: TensorQuant | None) -> gemm.Operand:
  """A saved forward operand as a backward GEMM operand."""
  if isinstance(saved, GridResidual):
    return gemm.Operand(saved.values, saved.scale, spec.fmt, spec)
  return _raw(saved)


# ------------------------------------------------------ packed residuals
# The name the packed residuals carry (jax.ad_checkpoint.checkpoint_name):
# a remat policy that saves only this name (llama's remat "quantized") keeps
# of each quantized projection just what its backward reads of X, compact.
SAVED_NAME = "fp4jax.qdot.saved"


class PackedX(NamedTuple):
  """The activation operand the backward reads, kept compactly.

  Attributes:
    codes: uint8 [M, ceil(K / 2)], the forward's FP4 grid values of X as
      codes two per byte (`numerics.pack_nibbles`).
    scale: float32, the quantization scale with each scaling group once:
      [M, 1] per token, [1, 1] per tensor, [M, K / block] for blocks along
      K (`quant.QTensor.scale` repeats block scales over the block).
    resid: the OCC residual the backward adds back to Q(Xc) (compensation
      "dense"): a `compensation.Ell` (per-token OCC), dense float32 [M, K]
      (tensor-wise OCC), or None.
  """
  codes: jax.Array
  scale: jax.Array
  resid: compensation.Ell | jax.Array | None = None


def _block_axes(spec: TensorQuant) -> tuple[int, ...]:
  """The operand axes along which `spec`'s full-shape scale repeats."""
  if spec.block_2d:
    return (0, 1)
  return (spec.axis % 2,) if spec.block else ()


def _compact_scale(scale: jax.Array, spec: TensorQuant) -> jax.Array:
  for a in _block_axes(spec):
    scale = jax.lax.slice_in_dim(scale, 0, None, spec.block, axis=a)
  return scale


def _expand_scale(scale: jax.Array, spec: TensorQuant) -> jax.Array:
  for a in _block_axes(spec):
    scale = jnp.repeat(scale, spec.block, axis=a)
  return scale


def _compact_resid(r: Recipe, resid):
  """The OCC residual [M, K] as an Ell where per-token OCC bounds each row's
  nonzeros (exact, c / K of the dense bytes), else unchanged."""
  if resid is None or isinstance(resid, compensation.Ell):
    return resid
  if r.occ.axis is None:
    return resid        # a tensor-wise quantile bounds no row
  return compensation.to_ell(
      resid, compensation.capacity(resid.shape[1], r.occ.alpha))


def _dense_resid(resid, k: int, g: jax.Array):
  """The dense [M, k] f32 residual of an Ell (as compensation.to_dense)."""
  if not isinstance(resid, compensation.Ell):
    return resid
  m = resid.idx.shape[0]
  # The scatter writes into a copy of its zeros operand. A constant's copy
  # depends on nothing, and XLA:CPU made all of them in the forward: a
  # dense f32 [M, K] per projection live until the backward, more than the
  # packing saves (an optimization barrier does not help: XLA:CPU removes
  # it before scheduling). Zeros computed from the cotangent g [M, N] exist
  # only once g does; +0 exactly, g's values aside.
  col = jnp.isfinite(g[:, :1]).astype(jnp.float32) * 0.
  zeros = jnp.broadcast_to(col, (m, k))
  rows = jnp.arange(m)[:, None]
  return zeros.at[rows, resid.idx].add(resid.val)


def _pack_residuals(r: Recipe, res: Saved, qx, add) -> Saved:
  """`_fwd_core`'s residuals with X's part compact and named SAVED_NAME.

  Where the backward reads the forward's quantized X (every recipe but one
  re-quantizing the clamped X) on an FP4 grid, it gets
  the codes two per byte and the scales (`PackedX`, plus `add`, the dense
  residual that compensation "dense" adds back); any other X it reads
  (FP8 or unquantized) stays as is. The OCC residual goes in ELL form. The
  weight's parts (w_deq, the DGE scale) and QuEST's trust masks are left
  unnamed: a rematerialised block recomputes them.
  """
  reuse = not r.requantizes
  x_saved = res.x if reuse else res.x_src
  if ((reuse or r.requant_from == "quantized") and qx is not None
      and numerics.get_format(r.x.fmt).is_fp4):
    codes = numerics.fp4_to_codes(qx.values, r.x.fmt)
    x_saved = PackedX(numerics.pack_nibbles(codes),
                      _compact_scale(qx.scale, r.x),
                      _compact_resid(r, add if reuse else None))
  x_saved, resid = jax.tree.map(lambda a: checkpoint_name(a, SAVED_NAME),
                                (x_saved, _compact_resid(r, res.resid)))
  return res._replace(x=x_saved if reuse else None,
                      x_src=None if reuse else x_saved, resid=resid)


def _unpack_residuals(r: Recipe, run: Execution, res: Saved, k: int, dtype,
                      g) -> Saved:
  """The residuals `_bwd_core` reads, from `_pack_residuals`' form: the
  same arrays, bit for bit (the forward's f32 ops on the same values).
  k: K; dtype: x's; g: the cotangent [M, N] (see `_dense_resid`)."""

  def unpack(p):
    if not isinstance(p, PackedX):
      return p
    values = numerics.fp4_from_codes(numerics.unpack_nibbles(p.codes, k),
                                     r.x.fmt)
    x = values / _expand_scale(p.scale, r.x)     # QTensor.dequantize
    if p.resid is not None:
      x = x + _dense_resid(p.resid, k, g)
    return x.astype(dtype)

  resid = res.resid
  if resid is not None and not (r.effective_compensation == "sparse"
                                and gemm.resolve_sparse(r, run) == "ell"):
    resid = _dense_resid(resid, k, g)
  return res._replace(x=unpack(res.x), x_src=unpack(res.x_src), resid=resid)


def _trust_mask(v32, q, spec: TensorQuant | None):
  """QuEST: True where the quantizer did not saturate v (|v sf| <= max)."""
  if q is None:
    return None
  return jnp.abs(v32 * q.scale) <= numerics.get_format(spec.fmt).max


# DGE without weight quantization (recipe "dge_only", a control that
# separates DGE's effect on the optimiser from quantization): the factor is
# taken on the grid the weight would be quantized to, E2M1 per out-channel.
_DGE_GRID = TensorQuant(fmt="e2m1", axis=0)


def _dge_spec(r: Recipe) -> TensorQuant | None:
  """The weight grid DGE differentiates on (the Recipe refuses DGE on a
  weight that is not FP4), or None (no DGE)."""
  if r.dge is None:
    return None
  return _DGE_GRID if r.w is None else r.w


def _dge_scale(r: Recipe, qw, w32):
  if r.dge is None:
    return None
  return qw.scale if qw is not None else quant.compute_scale(w32, _DGE_GRID)


def _requant(v32, spec: TensorQuant | None, key) -> gemm.Operand:
  """A re-quantizing backward: a stored operand quantized as the backward
  GEMM's own spec says (its scales along that GEMM's free dim), or raw."""
  if spec is None:
    return _raw(v32)
  return _op(quant.quantize(v32, spec, key), spec)


def _quant_grad(g32, q: TensorQuant | None, key) -> gemm.Operand:
  return _raw(g32) if q is None else _op(quant.quantize(g32, q, key), q)


def _bwd_core(r: Recipe, run: Execution, res: Saved, g, dx_dtype=None):
  """dgrad and wgrad: the derivative of the forward with STE through every
  rounding and DGE on the quantized weight.

  For compensation "sparse", Y = Q(Xc) Q(W) + R W with R = X - Xc, so
    dW = (Q(Xc)^T Gq) * f'(W sw) + R^T Gq   (the residual GEMM's weight is
                                            unquantized: no DGE factor)
    dX = Gq Q(W)^T where X was kept, Gq W^T where it was clamped (there the
         clamp's derivative is 0 and the residual's is 1).
  "dense" (Y = (Q(Xc) + R) Q(W)) and "none" (Y = Q(Xc) Q(W)) take every
  gradient through Q(W), with STE through the clamp.
  """
  w, resid, mask_x = res.w, res.resid, res.mask_x
  impl = _impl(run)
  comp = r.effective_compensation
  k_gd, k_gw, k_x, k_w = _keys(res.key, 4)
  g32 = g.astype(jnp.float32)
  rot = hadamard.rotate
  rht_f, rht_d, rht_w = r.fwd.rht, r.dgrad.rht, r.wgrad.rht
  if r.requantizes:
    # dgrad contracts over N: w is re-scaled along N; wgrad contracts over
    # M: x along M. Their scales then lie on the free dims and factor out,
    # so these GEMMs can run on grid values (FP8 with impl "xla"). Random
    # Hadamard rotations along the contraction (dgrad.rht / wgrad.rht)
    # cancel in the product. The source is the clamped X and the weight as
    # the forward saw it (rotated), or with requant_from "quantized" the
    # forward's quantized X and W (Quartet's released code).
    if r.requant_from == "quantized":
      w32 = res.w_deq.astype(jnp.float32)
    else:
      w32 = rot(w.astype(jnp.float32), rht_f, 0)
    w_d = _requant(rot(w32, rht_d, 1), r.dgrad.rhs, k_w)
    x_w = _requant(rot(res.x_src.astype(jnp.float32), rht_w, 0),
                   r.wgrad.lhs, k_x)
    if comp == "dense":
      x_w = _raw(x_w.dequantize() + resid)
  else:
    # The forward's quantized operands: dequantized where their scales lie
    # along these GEMMs' contractions, on their grid where saved so
    # (GridResidual: per-tensor scales factor out of every GEMM).
    w_d, x_w = _operand(res.w_deq, r.w), _operand(res.x, r.x)
  gq_d = _quant_grad(rot(g32, rht_d, 1), r.g_dgrad, k_gd)
  if (r.g_wgrad == r.g_dgrad and rht_d == rht_w == 0
      and (r.g_wgrad is None or r.g_wgrad.rounding != "stochastic")):
    gq_w = gq_d
  else:
    gq_w = _quant_grad(rot(g32, rht_w, 0), r.g_wgrad, k_gw)
  bwd = functools.partial(gemm.scaled_dot, impl=impl, backward=True,
                          accumulation=run.accumulation)
  # dx leaves as dx_dtype where nothing below touches it first.
  dx = bwd(gq_d, w_d, _NT, out_dtype=dx_dtype if (
      comp != "sparse" and mask_x is None and not rht_f) else None)
  dw = bwd(x_w, gq_w, _TN)
  if r.dge is not None:
    # DGE: d(dequantized W)/dW evaluated on the scaled weight (RECIPE §3).
    dw = dw * quant.dge_derivative(w.astype(jnp.float32) * res.dge_scale,
                                   r.dge.k, r.dge.cap, _dge_spec(r).fmt)
  if comp == "sparse" and gemm.resolve_sparse(r, run) == "ell":   # an Ell
    dw = dw + compensation.spmm_t(resid, gq_w.dequantize(), dw.shape[0])
    dx = compensation.replace_at_nonzeros(dx, resid, gq_d.dequantize(),
                                          w.astype(jnp.float32))
  elif comp == "sparse":
    r32 = resid.astype(jnp.float32)
    gq_w32, gq_d32 = gq_w.dequantize(), gq_d.dequantize()
    dw = dw + _dot(r32, gq_w32, _TN, impl.deq_dtype)
    dx_raw = _dot(gq_d32, w.astype(jnp.float32), _NT, impl.deq_dtype)
    dx = jnp.where(r32 != 0, dx_raw, dx)
  if mask_x is not None:
    dx = jnp.where(mask_x, dx, 0.)
  if res.mask_w is not None:
    dw = jnp.where(res.mask_w, dw, 0.)
  if rht_f:
    dx = rot(dx, rht_f, 1, inverse=True)
    dw = rot(dw, rht_f, 0, inverse=True)
  return dx, dw


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _qmatmul(x, w, recipe, run, dtypes, pack, key):
  return _fwd_core(x, w, recipe, run, key, out_dtype=dtypes[1])[0].astype(
      dtypes[1])


def _qmatmul_fwd(x, w, recipe, run, dtypes, pack, key):
  y, res = _fwd_core(x, w, recipe, run, key, pack, dtypes[1])
  return y.astype(dtypes[1]), res


def _qmatmul_bwd(recipe, run, dtypes, pack, res, g):
  if pack:
    res = _unpack_residuals(recipe, run, res, res.w.shape[0], dtypes[0], g)
  dx, dw = _bwd_core(recipe, run, res, g, dtypes[0])
  # dtypes = (x's dtype, y's dtype).
  return dx.astype(dtypes[0]), dw.astype(res.w.dtype), None


_qmatmul.defvjp(_qmatmul_fwd, _qmatmul_bwd)


def _plain_dot(x, w, out_dtype):
  return jax.lax.dot_general(x, w, _NN, preferred_element_type=jnp.float32
                             ).astype(out_dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _plain(x, w, out_dtype):
  return _plain_dot(x, w, out_dtype)


def _plain_fwd(x, w, out_dtype):
  # The dot itself, not a call of `_plain`: a remat policy that saves dot
  # outputs ("dots") sees a dot_general here, not a custom_vjp call.
  return _plain_dot(x, w, out_dtype), (x, w)


def _plain_bwd(out_dtype, res, g):
  del out_dtype
  x, w = res
  # Backward GEMMs in the operands' dtype (bf16 x bf16 with f32
  # accumulation), not in the f32 of the cotangent: autodiff of an f32-output
  # dot would otherwise run both gradient GEMMs in f32.
  g = g.astype(x.dtype)
  dx = jax.lax.dot_general(g, w, _NT, preferred_element_type=jnp.float32)
  dw = jax.lax.dot_general(x, g, _TN, preferred_element_type=jnp.float32)
  return dx.astype(x.dtype), dw.astype(w.dtype)


_plain.defvjp(_plain_fwd, _plain_bwd)


def plain_matmul(x: jax.Array, w: jax.Array, out_dtype=None) -> jax.Array:
  """x [M, K] @ w [K, N], no quantization: f32 accumulation, one rounding.

  Args:
    x: [M, K]; its dtype is the compute dtype (w is cast to it).
    w: [K, N].
    out_dtype: result dtype (default x.dtype; f32 for logits).

  Returns:
    [M, N] in out_dtype. Gradients are computed in x.dtype GEMMs.
  """
  return _plain(x, w.astype(x.dtype), jnp.dtype(out_dtype or x.dtype))


def qmatmul(x: jax.Array, w: jax.Array, recipe: Recipe | str | None,
            key: jax.Array | None = None, out_dtype=None,
            pack_residuals: bool = False,
            execution: Execution | None = None) -> jax.Array:
  """Quantized x @ w with per-GEMM quantization from `recipe`.

  Args:
    x: activations [M, K], float (bf16 or f32).
    w: weights [K, N], float.
    recipe: a Recipe, a recipe name (see qconfig.RECIPES) or None (plain).
    key: PRNG key; required only by recipes with stochastic rounding.
    out_dtype: dtype of y (default x.dtype; f32 for logits). The GEMMs
      accumulate in f32 and round once to it.
    pack_residuals: keep what the backward reads of x compact (FP4 codes
      two per byte, the scales, the OCC residual in ELL form) and named
      `SAVED_NAME`, for a remat policy that saves only that name. The same
      values and gradients bit for bit; no effect on a plain matmul.
    execution: how the GEMMs run (default `Execution()`: impl and
      sparse_impl "auto", fp32 accumulation).

  Returns:
    y [M, N] in out_dtype. Gradients: dx in x.dtype, dw in w.dtype.

  Raises:
    ValueError: non-2-D operand, mismatched K, unknown recipe, missing key,
      an execution that cannot run the recipe.
  """
  if isinstance(recipe, str):
    recipe = get_recipe(recipe)
  if getattr(x, "ndim", None) != 2:
    raise ValueError(f"qmatmul: x must be 2-D [M, K], got shape "
                     f"{getattr(x, 'shape', None)}")
  if getattr(w, "ndim", None) != 2:
    raise ValueError(f"qmatmul: w must be 2-D [K, N], got shape "
                     f"{getattr(w, 'shape', None)}")
  if x.shape[1] != w.shape[0]:
    raise ValueError(f"qmatmul: contraction mismatch, x {x.shape} @ w "
                     f"{w.shape}")
  if recipe is not None and not isinstance(recipe, Recipe):
    raise ValueError(f"qmatmul: recipe must be a Recipe, a name or None, got "
                     f"{type(recipe).__name__}")
  if recipe is None or not recipe.quantizes:
    return plain_matmul(x, w, out_dtype)
  run = _DEFAULT_EXECUTION if execution is None else execution
  if not isinstance(run, Execution):
    raise ValueError(f"qmatmul: execution must be an Execution or None, got "
                     f"{type(run).__name__}")
  run.check(recipe)
  if recipe.needs_key:
    if key is None:
      raise ValueError(f"qmatmul: recipe {recipe.name!r} uses stochastic "
                       f"rounding; pass a PRNG key (argument key)")
  else:
    key = None
  dtypes = (jnp.dtype(x.dtype), jnp.dtype(out_dtype or x.dtype))
  return _qmatmul(x, w, recipe, run, dtypes, bool(pack_residuals), key)


def make_dot_general(recipe: Recipe | str | None,
                     execution: Execution | None = None):
  """A `lax.dot_general`-compatible function that runs `qmatmul`.

  For `nnx.Linear(..., dot_general=make_dot_general("fp4_paper"))` and
  einsums of the form "...k,kn->...n". Supports only x[..., K] @ w[K, ...]
  without batch dimensions; anything else raises NotImplementedError.
  """
  if isinstance(recipe, str):
    recipe = get_recipe(recipe)
  if recipe is not None and recipe.needs_key:
    # A key captured here would give every call the same rounding noise.
    raise ValueError(f"make_dot_general: recipe {recipe.name!r} uses "
                     "stochastic rounding; call qmatmul with a fresh key per "
                     "call instead")

  def dot_general(lhs, rhs, dimension_numbers, precision=None,
                  preferred_element_type=None, out_sharding=None, **kw):
    del precision, kw  # the recipe fixes the numerics
    (lc, rc), (lb, rb) = dimension_numbers
    if (tuple(lb) or tuple(rb) or tuple(lc) != (lhs.ndim - 1,)
        or tuple(rc) != (0,)):
      raise NotImplementedError(
          f"quantized dot_general supports only x[..., K] @ w[K, ...] with "
          f"no batch dims; got dimension_numbers={dimension_numbers}")
    x2 = lhs.reshape(-1, lhs.shape[-1])
    y = qmatmul(x2, rhs.reshape(rhs.shape[0], -1), recipe,
                execution=execution)
    y = y.reshape(*lhs.shape[:-1], *rhs.shape[1:])
    y = y.astype(preferred_element_type or lhs.dtype)
    if out_sharding is not None:
      y = jax.lax.with_sharding_constraint(y, out_sharding)
    return y

  return dot_general
