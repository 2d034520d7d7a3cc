"""Each Pallas kernel against its jnp reference in interpret mode, and the
can_use predicates."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax.kernels import row_quant


def _acts(shape, seed, outliers=True):
  rng = np.random.default_rng(seed)
  x = rng.standard_normal(shape).astype(np.float32)
  if outliers:   # a few outlier channels, as LLM activations have
    x[:, rng.choice(shape[1], 3, replace=False)] *= 40.
  return x


def _assert_same(got, want):
  for name in ("values", "scale", "residual"):
    a = np.asarray(getattr(got, name), np.float32)
    b = np.asarray(getattr(want, name), np.float32)
    assert a.shape == b.shape, name
    np.testing.assert_array_equal(a, b, err_msg=name)


@pytest.mark.parametrize("shape,axis,alpha,rounding", [
    ((8, 128), 1, 0.99, "paper"),      # activations per token, OCC
    ((6, 100), 1, 0.97, "rne"),        # K and M not powers of two: padding
    ((96, 16), 0, None, "paper"),      # weights per column, no OCC
    ((400, 12), 0, 0.99, "paper"),     # columns with OCC
])
def test_occ_quantize_equals_reference_bit_for_bit(shape, axis, alpha,
                                                   rounding):
  x = jnp.asarray(_acts(shape, 0, outliers=axis == 1))
  got = row_quant.occ_quantize(x, alpha, axis=axis, rounding=rounding,
                               block=2, interpret=True)
  want = row_quant.occ_quantize_reference(x, alpha, axis=axis,
                                          rounding=rounding)
  _assert_same(got, want)
  if alpha is not None:   # the test means something: OCC clamped values
    assert np.count_nonzero(np.asarray(got.residual)) > 0


def test_dge_factor_equals_reference():
  w = jnp.asarray(_acts((64, 8), 1, outliers=False) * 0.02)
  got = row_quant.occ_quantize(w, None, axis=0, dge_k=5.0, block=4,
                               interpret=True)
  want = row_quant.occ_quantize_reference(w, None, axis=0, dge_k=5.0)
  _assert_same(got, want)
  np.testing.assert_array_equal(np.asarray(got.dge), np.asarray(want.dge))
  # f' spans [1/k, cap]: the factor really varies per element.
  assert float(np.max(got.dge)) > 1.0 and float(np.min(got.dge)) < 0.5


def test_order_statistics_match_a_float64_sort():
  # The reference's clamp bounds are exact order statistics: check them
  # against numpy's sort, and the kernel against the reference above.
  x = _acts((4, 200), 2)
  got = row_quant.occ_quantize(jnp.asarray(x), 0.99, block=1, interpret=True)
  # The bounds are elements of the row, so the unclamped elements (residual
  # exactly 0) reach them: their max / min are the order statistics.
  kept = np.where(np.asarray(got.residual) == 0, x, np.nan)
  s = np.sort(x.astype(np.float64), axis=1)
  np.testing.assert_array_equal(np.nanmax(kept, axis=1),
                                s[:, int(0.99 * 200)])
  np.testing.assert_array_equal(np.nanmin(kept, axis=1),
                                s[:, int((1 - 0.99) * 200)])


def test_bf16_input_keeps_residual_dtype():
  x = jnp.asarray(_acts((4, 64), 3)).astype(jnp.bfloat16)
  got = row_quant.occ_quantize(x, 0.97, interpret=True)
  assert got.residual.dtype == jnp.bfloat16
  assert got.values.dtype == jnp.float8_e4m3fn
  _assert_same(got, row_quant.occ_quantize_reference(x, 0.97))


def test_can_use_occ_quantize():
  x = jnp.zeros((8, 128), jnp.float32)
  assert row_quant.can_use_occ_quantize(x, interpret=True)
  assert not row_quant.can_use_occ_quantize(x)          # CPU, no interpret
  assert not row_quant.can_use_occ_quantize(x, fmt="e4m3", interpret=True)
  assert not row_quant.can_use_occ_quantize(x, rounding="stochastic",
                                            interpret=True)
  assert not row_quant.can_use_occ_quantize(
      jnp.zeros((2, row_quant.MAX_GROUP + 1)), interpret=True)
  assert not row_quant.can_use_occ_quantize(jnp.zeros((8, 128), jnp.int32),
                                            interpret=True)
  with pytest.raises(ValueError, match="can_use_occ_quantize"):
    row_quant.occ_quantize(x, 0.99)     # not on GPU, not interpreting


def test_on_gpu_the_predicate_accepts(monkeypatch):
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert row_quant.can_use_occ_quantize(jnp.zeros((8, 5632), jnp.bfloat16))


@pytest.mark.parametrize("name", ["fp4_paper", "w4a4_direct"])
def test_qmatmul_with_impl_pallas_equals_impl_xla(name):
  from fp4jax import qdot   # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(4)
  x = jnp.asarray(_acts((16, 128), 4))
  w = jnp.asarray(rng.standard_normal((128, 24)) * 0.05, jnp.float32)
  g = jnp.asarray(rng.standard_normal((16, 24)), jnp.float32)

  def run(impl):
    # Dense compensation products: the ELL form's slot order (so its f32
    # summation order) follows the top_k that found the outliers, which
    # the kernel path does not share.
    r = qdot.get_recipe(name)
    run = qdot.Execution(impl=impl, sparse_impl="gemm")
    f = lambda x, w: jnp.sum(qdot.qmatmul(x, w, r, execution=run) * g)
    return (qdot.qmatmul(x, w, r, execution=run),) + jax.grad(
        f, argnums=(0, 1))(x, w)

  jaxpr = str(jax.make_jaxpr(lambda x: qdot.qmatmul(
      x, w, qdot.get_recipe(name),
      execution=qdot.Execution(impl="pallas")))(x))
  assert "pallas_call" in jaxpr           # the kernel ran, no fallback
  for a, b in zip(run("pallas"), run("xla")):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
