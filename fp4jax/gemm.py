"""GEMMs on quantized operands: which dtype each operand travels in, and
when a scaled GEMM can run on the raw grid values.

Owns: `GemmImpl` and the table `IMPLS` (the one dispatch point for GEMM
implementations, chosen by `Execution.impl` outside jit), `resolve`
("auto"), and `scaled_dot(a, b, dims, impl)`, which multiplies two
`Operand`s.

An operand quantized as values / scale, with the scale constant along the
GEMM's contraction (per row of the lhs, per column of the rhs, or per
tensor), factors out of the K-sum:

  (Va / sa) @ (Vb / sb) = diag(1/sa) (Va @ Vb) diag(1/sb),

so the GEMM runs on the grid values, which are exact in FP8 (every FP4 grid
and E4M3 in float8_e4m3fn, E5M2 in float8_e5m2), and the scales are applied
after the dot, where XLA:GPU can fuse them into the epilogue. A per-row or
per-column scale multiplied into an operand *before* the dot stops XLA's
GemmRewriter from emitting a cuBLASLt FP8 GEMM (GPU-NOTES §1), so this is
the only form that runs on FP8 tensor cores. Operands whose scales lie along
the contraction (the forward's per-token X in the wgrad, its per-channel W
in the dgrad) or vary within it (block scales) are multiplied dequantized,
in `deq_dtype`.

Must not import: flax, ml_collections, fp4jax modules right of `quant`.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from fp4jax import backend
from fp4jax import fallback
from fp4jax import numerics
from fp4jax.qconfig import Execution, Recipe, TensorQuant

__all__ = ["GemmImpl", "IMPLS", "Operand", "resolve", "resolve_sparse",
           "scaled_dot", "factors_out", "fp8_dtype"]


class GemmImpl(NamedTuple):
  """How the GEMMs of a quantized matmul run.

  Attributes:
    grid: dtype family for raw grid values: "f32", "bf16" (both exact for
      every FP4 / FP8 grid) or "fp8" (E4M3 / E5M2 operands: FP8 tensor cores).
    deq_dtype: operands that are not on a grid (dequantized with scales
      along the contraction, raw weights, residuals, unquantized gradients).
    grid_backward: also run the dgrad and wgrad GEMMs on grid values where
      the scales factor out (False: only the forward, the paper's
      simulation; its backward GEMMs are BF16).
  """
  grid: str
  deq_dtype: object
  grid_backward: bool


IMPLS: dict[str, GemmImpl] = {
    # f32 operands everywhere: the oracle; fast on CPU, where bf16 dots are
    # emulated anyway.
    "reference": GemmImpl("f32", jnp.float32, True),
    # bf16 operands: exact for grid values (FP4/FP8 grid values have <= 4
    # significant bits); NOT exact for dequantized operands (float scales),
    # which are rounded to bf16 as in the paper's BF16 simulation (~2^-8).
    "fast": GemmImpl("bf16", jnp.bfloat16, True),
    # The paper's simulation: the forward's FP4 grid values carried exactly
    # in FP8 E4M3 so the forward GEMM runs on FP8 tensor cores; the backward
    # in bf16.
    "fp8": GemmImpl("fp8", jnp.bfloat16, False),
    # Every GEMM whose scales factor out on FP8 tensor cores through XLA
    # (cuBLASLt): forward E4M3 x E4M3; with recipes that re-quantize the
    # backward's operands along its GEMMs' own axes (as hardware must), or
    # per-tensor scales, dgrad E5M2 x E4M3 and wgrad E4M3 x E5M2 too.
    "xla": GemmImpl("fp8", jnp.bfloat16, True),
}
# "pallas" = "xla" GEMMs, with the Pallas fused row quantizer for OCC'd
# activations (qdot chooses it; the GEMMs are the same).
IMPLS["pallas"] = IMPLS["xla"]


def resolve(name: str) -> str:
  """"auto" -> "reference" on CPU (f32 dots are the fast ones there),
  "fast" on accelerators (measured on an H200: bench/RESULTS.md; "xla"
  becomes the default there once its device figures are in)."""
  if name != "auto":
    return name
  return "reference" if backend.target() == "cpu" else "fast"


def resolve_sparse(recipe: Recipe, run: Execution) -> str:
  """The run's sparse_impl for a recipe, "auto" resolved for the target:
  "ell" (gathers over each token's fixed count of outliers) on a CPU, where
  three more f32 GEMMs cost more (bench/RESULTS.md: -16% of the demo step),
  if OCC is per-token (ELL needs a bounded count per row); else "gemm"
  (dense GEMMs on the mostly zero residual: on a GPU they run on tensor
  cores)."""
  if run.sparse_impl != "auto":
    return run.sparse_impl
  cpu = backend.target() == "cpu"
  per_token = recipe.occ is not None and recipe.occ.axis is not None
  return "ell" if cpu and per_token else "gemm"


class Operand(NamedTuple):
  """A GEMM operand: `values / scale`, on the grid of `fmt` if fmt is set.

  values: [R, C] float32 (grid values if fmt, else the operand itself);
  scale: broadcastable to values (keepdims [R, 1], [1, C], [1, 1]; full
  shape for block scales), or None for 1; fmt: a numerics.FORMATS name, or
  None (not on a grid); spec: the TensorQuant it was quantized with, if any
  (block-scaled GEMMs read its block layout); tensor_scale: NVFP4's f32 []
  per-tensor decode scale, already part of `scale` (quant.QTensor), for
  block-scaled GEMMs that apply it separately.
  """
  values: jax.Array
  scale: jax.Array | None = None
  fmt: str | None = None
  spec: TensorQuant | None = None
  tensor_scale: jax.Array | None = None

  def dequantize(self) -> jax.Array:
    v = self.values.astype(jnp.float32)
    return v if self.scale is None else v / self.scale


def fp8_dtype(fmt: str):
  """The FP8 dtype that holds every value of fmt's grid exactly."""
  if fmt == "e5m2":
    return jnp.float8_e5m2
  f = numerics.get_format(fmt)
  if f.is_fp4 or fmt == "e4m3":
    # E2M1 / E1M2 / E3M0 grids: <= 3 mantissa bits within E4M3's range.
    return jnp.float8_e4m3fn
  raise ValueError(f"no FP8 dtype holds the {fmt} grid exactly")


def _grid_dtypes(fa: str, fb: str, grid: str):
  if grid == "f32":
    return jnp.float32, jnp.float32
  if grid == "bf16":
    return jnp.bfloat16, jnp.bfloat16
  da, db = fp8_dtype(fa), fp8_dtype(fb)
  if da == db == jnp.float8_e5m2:
    # cuBLASLt rejects E5M2 x E5M2 (XLA falls back to f16); bf16 is exact.
    if backend.target() == "gpu":
      fallback.once("FP8 GEMM", "E5M2 x E5M2 has no FP8 tensor-core GEMM "
                    "(cuBLASLt); it runs in bf16 (exact)")
    return jnp.bfloat16, jnp.bfloat16
  return da, db


def factors_out(op: Operand, contract: int) -> bool:
  """True if op is on a grid whose scale is constant along `contract`."""
  return (op.fmt is not None
          and (op.scale is None or op.scale.shape[contract] == 1))


def _free_scale(op: Operand, as_row: bool):
  """The scale along the operand's free dim, shaped for the [rows, cols]
  output: [rows, 1] for the lhs (as_row), [1, cols] for the rhs."""
  if op.scale is None:
    return None
  s = op.scale.reshape(-1) if op.scale.size > 1 else op.scale.reshape(())
  if s.ndim == 0:
    return s
  return s.reshape(-1, 1) if as_row else s.reshape(1, -1)


def _precision(dtypes, accumulation: str):
  """FP8 dots: fp32 accumulation (exact simulation) or cuBLASLt's fast
  accumulation, which is XLA's default for FP8 at DEFAULT precision. The
  algorithm presets exist only on GPU; CPU FP8 dots accumulate in f32."""
  if dtypes[0] == jnp.float32:
    return jax.lax.Precision.HIGHEST
  fp8 = all(jnp.dtype(d).itemsize == 1 for d in dtypes)
  if not fp8 or backend.target() != "gpu":
    return None
  if accumulation == "fp32":
    return jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32
  return jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM


def dot(a, b, dims, dtype):
  """Plain dot of two arrays cast to `dtype`, f32 result."""
  precision = jax.lax.Precision.HIGHEST if dtype == jnp.float32 else None
  return jax.lax.dot_general(a.astype(dtype), b.astype(dtype), dims,
                             precision=precision,
                             preferred_element_type=jnp.float32)


def scaled_dot(a: Operand, b: Operand, dims, impl: GemmImpl, *,
               backward: bool = False, accumulation: str = "fp32",
               out_dtype=None) -> jax.Array:
  """a @ b for 2-D operands with one contracting dim each, f32 result.

  Args:
    a, b: the operands ([M, K] / [K, M] and [K, N] / [N, K] per dims).
    dims: lax.dot_general dimension numbers, no batch dims.
    impl: how to run it.
    backward: this is a dgrad or wgrad GEMM (grid only if
      impl.grid_backward).
    accumulation: "fp32" | "fast" (FP8 dots on GPU only).
    out_dtype: the dtype the caller rounds the product to next, if it does
      nothing else with it first; a 16-bit one lets an FP8 GEMM with
      accumulation "fast" write it directly (see `_scaled_fp8_out`).

  Returns:
    [rows of a's free dim, cols of b's free dim] float32, or out_dtype
    where the FP8 GEMM wrote it.
  """
  (lc,), (rc,) = dims[0]
  grid = (factors_out(a, lc) and factors_out(b, rc)
          and (impl.grid_backward or not backward))
  if not grid:
    if impl.grid != "f32" and can_use_scaled_matmul(a, b, dims):
      return scaled_matmul(a, b, dims)
    return dot(a.dequantize(), b.dequantize(), dims, impl.deq_dtype)
  da, db = _grid_dtypes(a.fmt, b.fmt, impl.grid)
  scales = [s for s in (_free_scale(a, True), _free_scale(b, False))
            if s is not None]
  precision = _precision((da, db), accumulation)
  narrow = _scaled_fp8_out(precision, out_dtype)
  y = jax.lax.dot_general(a.values.astype(da), b.values.astype(db), dims,
                          precision=precision,
                          preferred_element_type=out_dtype if narrow
                          else jnp.float32).astype(jnp.float32)
  for s in scales:
    y = y / s
  return y.astype(out_dtype) if narrow else y


def _scaled_fp8_out(precision, out_dtype) -> bool:
  """Whether an FP8 GEMM on the GPU target writes `out_dtype` itself.

  The f32 form writes an f32 [M, N] from cuBLASLt and converts it in a
  second kernel (XLA never makes that convert the GEMM's output type:
  checked on the deviceless-compiled program), 6 more bytes per output
  element than a GEMM that writes bf16. Here the GEMM writes bf16(acc)
  and the f32 scale division (per tensor, row or column) is an
  elementwise op XLA fuses into the consumer: two roundings (<= 2^-8
  relative, the scales themselves exact) instead of one. Only with
  accumulation "fast", the run-for-speed setting.
  """
  fast = jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM
  return (out_dtype is not None and precision == fast
          and jnp.dtype(out_dtype).itemsize == 2)


# ------------------------------------------------ block-scaled (Blackwell)
# (element format, block, scale format) -> the dtypes cuDNN's block-scaled
# GEMM takes (jax.nn.scaled_matmul's docstring): NVFP4 natively; MXFP4's
# E2M1 values are exact in E4M3, so it runs as MXFP8 (FP8 rate, exact).
_SCALED = {("e2m1", 16, "e4m3"): (jnp.float4_e2m1fn, jnp.float8_e4m3fn),
           ("e2m1", 32, "e8m0"): (jnp.float8_e4m3fn, jnp.float8_e8m0fnu)}
MIN_CUDNN = 90700   # cuDNN 9.7: the first with block-scaled GEMMs
MIN_CC = 10.0       # Blackwell


def _device_ok() -> bool:
  if backend.target() != "gpu" or not hasattr(jax.nn, "scaled_matmul"):
    return False
  try:
    cc = float(getattr(jax.devices()[0], "compute_capability", "0"))
    from jax._src.lib import cuda_versions   # pylint: disable=g-import-not-at-top
    cudnn = cuda_versions.cudnn_get_version() if cuda_versions else 0
  except Exception:   # pylint: disable=broad-except
    return False      # no way to tell: the dequantized fallback is safe
  return cc >= MIN_CC and cudnn >= MIN_CUDNN


def _blocked_along(op: Operand, contract: int) -> bool:
  q = op.spec
  if q is None or op.fmt is None or op.scale is None:
    return False
  sfmt = numerics.scale_format(q.scale)
  if sfmt.tensor_scale and op.tensor_scale is None:
    return False   # cannot split the block scales from the tensor scale
  if (q.fmt, q.block, sfmt.storage) not in _SCALED or q.scale_mult != 1.0:
    return False   # a 3/4 pre-scale leaves the format's scale grid
  # 2-D tiles are 1 x block runs along either axis; 1-D blocks must run
  # along the contraction.
  return q.block_2d or (q.axis is not None and q.axis % 2 == contract)


def can_use_scaled_matmul(a: Operand, b: Operand, dims) -> bool:
  """True if a @ b can run as jax.nn.scaled_matmul's cuDNN block-scaled
  GEMM: a Blackwell GPU (compute capability >= 10) with cuDNN >= 9.7, both
  operands NVFP4 (or both MXFP4) with blocks along the contraction."""
  (lc,), (rc,) = dims[0]
  if not (_blocked_along(a, lc) and _blocked_along(b, rc)):
    return False
  ka, kb = a.spec, b.spec
  if (ka.block, ka.scale) != (kb.block, kb.scale):
    return False
  if a.values.shape[lc] % ka.block:
    return False
  if not _device_ok():
    if backend.target() == "gpu":
      fallback.once("block-scaled GEMM", f"{ka.fmt} x {kb.fmt} with "
                    f"{ka.scale} scales needs a Blackwell GPU (compute "
                    f"capability >= {MIN_CC}) and cuDNN >= 9.7; the operands "
                    "are multiplied dequantized instead")
    return False
  return True


def scaled_matmul(a: Operand, b: Operand, dims) -> jax.Array:
  """a @ b through jax.nn.scaled_matmul (see can_use_scaled_matmul).

  Operands go K-minor as [1, M, K] / [1, N, K] with [1, M, K / block]
  decode scales in the format's scale dtype. NVFP4's per-tensor f32 scale
  comes with the operand (Operand.tensor_scale): its E4M3 block scales are
  the decode scales divided by it, and it is applied to the output. An
  E4M3-scaled block whose values are all zero (an all-zero block, padding,
  masked tokens, or one whose E4M3 scale flushed) adds nothing to the
  product whatever its scale: it gets decode scale 0, as Transformer Engine
  stores it, which also keeps its unit scale from overflowing E4M3.
  """
  (lc,), (rc,) = dims[0]
  vdt, sdt = _SCALED[(a.spec.fmt, a.spec.block,
                      numerics.scale_format(a.spec.scale).storage)]
  parts, outer = [], jnp.float32(1)
  for op, contract in ((a, lc), (b, rc)):
    v = op.values if contract == 1 else op.values.T          # [rows, K]
    decode = 1. / (op.scale if contract == 1 else op.scale.T)
    blk = op.spec.block
    decode = decode[:, ::blk]
    if numerics.scale_format(op.spec.scale).tensor_scale:
      ts = jnp.asarray(op.tensor_scale, jnp.float32).reshape(())
      decode, outer = decode / ts, outer * ts
    if sdt == jnp.float8_e4m3fn:   # E8M0 has no zero (nor any overflow)
      empty = jnp.all(v.reshape(v.shape[0], -1, blk) == 0, axis=-1)
      decode = jnp.where(empty, 0., decode)
    parts += [v.astype(vdt)[None], decode.astype(sdt)[None]]
  y = jax.nn.scaled_matmul(parts[0], parts[2], parts[1], parts[3],
                           preferred_element_type=jnp.float32)[0]
  return y * outer
