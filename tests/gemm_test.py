"""GEMMs on grid values: scales factored out of the contraction, the FP8
dtypes each format travels in, and FP8 GEMMs in the lowered train-step
graph (impl "xla"), against float64 numpy."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import backend
from fp4jax import gemm
from fp4jax import qdot
from fp4jax import quant
from fp4jax.qconfig import TensorQuant

_NN = (((1,), (0,)), ((), ()))
_NT = (((1,), (1,)), ((), ()))
_TN = (((0,), (0,)), ((), ()))
# Grid values are exact in every dtype used; what remains is f32 division by
# the scales and f32 accumulation of K = 64 terms: <= ~64 * 2^-24 relative to
# sum |a||b| (bounded here by the Frobenius norms' product / sqrt(size)).
F32_RTOL = 1e-5


def _quantized(shape, axis, fmt, seed):
  x = np.random.default_rng(seed).standard_normal(shape).astype(np.float32)
  q = quant.quantize(jnp.asarray(x), TensorQuant(fmt=fmt, axis=axis,
                                                 rounding="rne"))
  return gemm.Operand(q.values, q.scale, fmt)


def _f64(op):
  return np.asarray(op.values, np.float64) / np.asarray(op.scale, np.float64)


def _rel(got, want):
  return float(np.linalg.norm(np.asarray(got, np.float64) - want)
               / np.linalg.norm(want))


@pytest.mark.parametrize("dims,sa,sb", [
    # forward: X per token, W per output channel
    (_NN, ((8, 64), 1, "e2m1"), ((64, 16), 0, "e2m1")),
    # dgrad: G per tensor (E5M2), W re-scaled per row (along N)
    (_NT, ((8, 16), None, "e5m2"), ((64, 16), 1, "e2m1")),
    # wgrad: X re-scaled per column (along M), G per tensor
    (_TN, ((8, 64), 0, "e2m1"), ((8, 16), None, "e5m2")),
])
@pytest.mark.parametrize("impl", ["reference", "xla"])
def test_grid_gemm_with_scales_after_the_dot_is_exact(dims, sa, sb, impl):
  a, b = _quantized(*sa, 0), _quantized(*sb, 1)
  y = gemm.scaled_dot(a, b, dims, gemm.IMPLS[impl], backward=True)
  (lc,), (rc,) = dims[0]
  want = np.tensordot(_f64(a), _f64(b), axes=(lc, rc))
  assert _rel(y, want) < F32_RTOL


def test_fp8_dtypes_per_format():
  assert gemm._grid_dtypes("e2m1", "e2m1", "fp8") == (   # pylint: disable=W0212
      jnp.float8_e4m3fn, jnp.float8_e4m3fn)
  assert gemm._grid_dtypes("e5m2", "e3m0", "fp8") == (   # pylint: disable=W0212
      jnp.float8_e5m2, jnp.float8_e4m3fn)
  # cuBLASLt rejects E5M2 x E5M2; bf16 holds both exactly.
  assert gemm._grid_dtypes("e5m2", "e5m2", "fp8") == (   # pylint: disable=W0212
      jnp.bfloat16, jnp.bfloat16)
  # Every FP4 grid value and every E5M2 value survives its FP8 dtype.
  for fmt in ("e2m1", "e1m2", "e3m0"):
    op = _quantized((4, 64), 1, fmt, 2)
    v = np.asarray(op.values)
    assert np.array_equal(v.astype(jnp.float8_e4m3fn).astype(np.float32), v)


def test_scales_along_the_contraction_take_the_dequantized_path():
  # Per-token X in the wgrad: its scale varies along M, the contraction.
  a = _quantized((8, 64), 1, "e2m1", 3)
  b = _quantized((8, 16), None, "e5m2", 4)
  y = gemm.scaled_dot(a, b, _TN, gemm.IMPLS["reference"], backward=True)
  want = _f64(a).T @ _f64(b)
  assert _rel(y, want) < F32_RTOL
  fn = jax.jit(lambda av, asc, bv, bsc: gemm.scaled_dot(
      gemm.Operand(av, asc, "e2m1"), gemm.Operand(bv, bsc, "e5m2"), _TN,
      gemm.IMPLS["xla"], backward=True))
  text = fn.lower(a.values, a.scale, b.values, b.scale).as_text()
  assert "f8E" not in text


def test_fast_accumulation_is_a_gpu_precision_choice(monkeypatch):
  f8 = (jnp.float8_e4m3fn, jnp.float8_e4m3fn)
  assert gemm._precision(f8, "fp32") is None        # pylint: disable=W0212
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert (gemm._precision(f8, "fp32")               # pylint: disable=W0212
          == jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32)
  assert (gemm._precision(f8, "fast")               # pylint: disable=W0212
          == jax.lax.DotAlgorithmPreset.ANY_F8_ANY_F8_F32_FAST_ACCUM)
  with pytest.raises(ValueError, match="unknown accumulation"):
    qdot.Execution(accumulation="tf32")


def _grads_fn(recipe, execution=None):
  def loss(x, w, g):
    return jnp.sum(qdot.qmatmul(x, w, recipe, execution=execution) * g)
  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def _fp8_dots(text):
  return [l for l in text.splitlines() if "dot_general" in l
          and re.search(r"f8E(4M3FN|5M2)", l)]


@pytest.mark.parametrize("name,hw,n_fp8", [
    ("w4a4_direct", True, 3), ("w4a4_direct", False, 1),
    ("fp4_paper", True, 3), ("fp4_paper", False, 1),
    # Per-tensor scales factor out of every GEMM: the backward reuses the
    # forward's grid values, no hw_faithful needed.
    ("fp8", False, 3)])
def test_xla_impl_runs_fp8_gemms_and_matches_the_reference(name, hw, n_fp8):
  rng = np.random.default_rng(5)
  x = jnp.asarray(rng.standard_normal((32, 128)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((128, 48)) * 0.05, jnp.float32)
  g = jnp.asarray(rng.standard_normal((32, 48)), jnp.float32)
  r = qdot.get_recipe(name, hw_faithful=hw)
  xla, ref = qdot.Execution(impl="xla"), qdot.Execution(impl="reference")
  fn = _grads_fn(r, xla)
  assert len(_fp8_dots(fn.lower(x, w, g).as_text())) == n_fp8
  assert not _fp8_dots(_grads_fn(qdot.get_recipe(name), qdot.Execution(
      impl="fast")).lower(x, w, g).as_text())
  (_, got), (_, want) = fn(x, w, g), _grads_fn(r, ref)(x, w, g)
  y_got = qdot.qmatmul(x, w, r, execution=xla)
  y_want = qdot.qmatmul(x, w, r, execution=ref)
  # Grid GEMMs are exact in FP8; the GEMMs left dequantized (the backward
  # without hw_faithful, fp4_paper's residual products) round each operand
  # to bf16 once: < 2^-7 of the product's magnitude (see qdot_test).
  exact = (hw and name == "w4a4_direct") or name == "fp8"
  tol = 1e-5 if exact else 2.0 ** -7
  for a, b in ((y_got, y_want), (got[0], want[0]), (got[1], want[1])):
    assert _rel(a, np.asarray(b, np.float64)) < tol


# --------------------------------------------- Blackwell block-scaled path
def test_scaled_matmul_predicate_on_this_machine():
  a = _quantized((8, 64), 1, "e2m1", 0)
  spec = TensorQuant(axis=1, block=16, scale="e4m3_tensor", rounding="rne")
  q = quant.quantize(jnp.asarray(_quantized((8, 64), 1, "e2m1", 1).values),
                     spec)
  op = gemm.Operand(q.values, q.scale, "e2m1", spec)
  assert not gemm.can_use_scaled_matmul(op, op, _NT)    # CPU: fallback
  assert not gemm.can_use_scaled_matmul(a, a, _NT)      # not block-scaled


def _host_scaled_matmul(lhs, rhs, lhs_scales, rhs_scales,
                        preferred_element_type=jnp.float32):
  """jax.nn.scaled_matmul's documented semantics, on the host: [B, M, K] x
  [B, N, K] -> [B, M, N], each operand times its [B, rows, K / block]
  decode scales repeated over their blocks, both as stored (E4M3 / E8M0)."""
  blk = lhs.shape[-1] // lhs_scales.shape[-1]
  a = lhs.astype(jnp.float32) * jnp.repeat(
      lhs_scales.astype(jnp.float32), blk, axis=-1)
  b = rhs.astype(jnp.float32) * jnp.repeat(
      rhs_scales.astype(jnp.float32), blk, axis=-1)
  return jnp.einsum("BMK,BNK->BMN", a, b,
                    precision=jax.lax.Precision.HIGHEST,
                    preferred_element_type=preferred_element_type)


@pytest.mark.parametrize("name,vdt,sdt", [
    ("nvfp4_nvidia", jnp.float4_e2m1fn, jnp.float8_e4m3fn),
    ("mxfp4", jnp.float8_e4m3fn, jnp.float8_e8m0fnu)])
def test_block_recipes_dispatch_to_scaled_matmul_on_blackwell(
    monkeypatch, name, vdt, sdt):
  calls = []

  def fake(lhs, rhs, lhs_scales, rhs_scales, preferred_element_type):
    assert (lhs.dtype, rhs.dtype) == (vdt, vdt)
    assert (lhs_scales.dtype, rhs_scales.dtype) == (sdt, sdt)
    calls.append(lhs.shape)
    return _host_scaled_matmul(lhs, rhs, lhs_scales, rhs_scales,
                               preferred_element_type)

  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal((32, 64)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((64, 32)) * 0.05, jnp.float32)
  want = qdot.qmatmul(x, w, qdot.get_recipe(name), jax.random.key(0),
                      execution=qdot.Execution(impl="reference"))
  monkeypatch.setattr(gemm, "_device_ok", lambda: True)
  monkeypatch.setattr(jax.nn, "scaled_matmul", fake)
  got = qdot.qmatmul(x, w, qdot.get_recipe(name), jax.random.key(0),
                     execution=qdot.Execution(impl="xla"))
  assert calls and calls[0] == (1, 32, 64)               # K-minor operands
  assert _rel(got, np.asarray(want, np.float64)) < F32_RTOL


# The hw_faithful NVFP4 recipes: all three GEMMs are block-scaled along
# their contraction, so all three run through scaled_matmul.
@pytest.mark.parametrize("name", ["nvfp4_nvidia", "nvfp4"])
def test_scaled_matmul_gradients_with_zero_blocks_and_rows(monkeypatch,
                                                           name):
  # Masked tokens and padding: the second half of the tokens is all zero
  # (x rows and their gradient rows), and so is one K-block of the first
  # half. At these magnitudes (x ~0.1, gradients ~1e-6 as in LLM training)
  # every NVFP4 tensor's largest block decode, 448 ts, is below an all-zero
  # block's unit scale: a tensor scale recovered as max(block decode) / 448
  # is then too large, the other blocks' E4M3 scales flush to zero and
  # dgrad and wgrad come out exactly 0 (the forward ~3% off).
  rng = np.random.default_rng(7)
  x = rng.standard_normal((32, 64)).astype(np.float32) * 0.1
  x[16:] = 0.
  x[:16, 16:32] = 0.
  w = rng.standard_normal((64, 32)).astype(np.float32) * 0.05
  g = rng.standard_normal((32, 32)).astype(np.float32) * 1e-6
  g[16:] = 0.
  args = [jnp.asarray(a) for a in (x, w, g)]

  def run(impl):
    r, run = qdot.get_recipe(name), qdot.Execution(impl=impl)
    y, vjp = jax.vjp(lambda x, w: qdot.qmatmul(x, w, r, jax.random.key(1),
                                               execution=run), *args[:2])
    return (y, *vjp(args[2]))

  want = run("reference")
  monkeypatch.setattr(gemm, "_device_ok", lambda: True)
  calls = []
  def counted(*a, **kw):
    calls.append(a[0].shape)
    return _host_scaled_matmul(*a, **kw)
  monkeypatch.setattr(jax.nn, "scaled_matmul", counted)
  got = run("xla")
  assert len(calls) >= 3                       # forward, dgrad and wgrad
  for a, b, what in zip(got, want, ("y", "dx", "dw")):
    b = np.asarray(b, np.float64)
    assert np.linalg.norm(b) > 0, what          # the oracle is not trivial
    assert _rel(a, b) < F32_RTOL, (name, what, _rel(a, b))


def test_sparse_impl_auto_is_ell_on_cpu_with_per_token_occ_else_gemm():
  paper = qdot.get_recipe("fp4_paper")
  run = qdot.Execution()
  assert run.sparse_impl == "auto"
  assert gemm.resolve_sparse(paper, run) == "ell"          # this CPU
  with backend.targeting("gpu"):
    assert gemm.resolve_sparse(paper, run) == "gemm"       # tensor cores
  # A tensor-wise quantile bounds no row's outliers: ELL cannot hold it.
  assert gemm.resolve_sparse(qdot.get_recipe(
      "fp4_paper", occ_axis=None), run) == "gemm"
  for explicit in ("gemm", "ell"):
    with backend.targeting("gpu"):
      assert gemm.resolve_sparse(paper, qdot.Execution(
          sparse_impl=explicit)) == explicit
