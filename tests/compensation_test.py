"""The ELL compensation products against float64 numpy references."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import compensation, quant

# f32 products of O(1) values summed over <= 13 slots or 24 columns,
# against float64: a few f32 ulps of the largest partial sum.
F32_RTOL = 1e-5
M, K, N = 24, 40, 12


def _sparse(rng, cap):
  """[M, K] float64 with 0..cap nonzeros per row (row 0: exactly cap)."""
  r = np.zeros((M, K))
  for m in range(M):
    n = cap if m == 0 else rng.integers(0, cap + 1)
    cols = rng.choice(K, size=n, replace=False)
    r[m, cols] = rng.normal(size=n) * 10
  return r.astype(np.float32).astype(np.float64)


# Slot counts below, and above but not a multiple of, the eight slots spmm
# runs a loop iteration (compensation._SPMM_UNROLL).
@pytest.fixture(scope="module", params=[5, 13])
def data(request):
  rng = np.random.default_rng(0)
  cap = request.param
  r = _sparse(rng, cap)
  w = rng.normal(size=(K, N)).astype(np.float32).astype(np.float64)
  g = rng.normal(size=(M, N)).astype(np.float32).astype(np.float64)
  ell = compensation.to_ell(jnp.asarray(r, jnp.float32), cap)
  return r, w, g, ell


def _close(got, want, what):
  got = np.asarray(got, np.float64)
  scale = np.max(np.abs(want))
  np.testing.assert_allclose(got, want, rtol=0, atol=F32_RTOL * scale,
                             err_msg=what)


def test_to_ell_holds_the_matrix_exactly(data):
  r, _, _, ell = data
  assert ell.idx.shape == (M, (r != 0).sum(1).max())
  assert ell.idx.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(compensation.to_dense(ell, K)), r)


def test_the_three_products_equal_their_dense_float64_forms(data):
  r, w, g, ell = data
  _close(compensation.spmm(ell, jnp.asarray(w, jnp.float32)), r @ w, "R W")
  _close(compensation.spmm_t(ell, jnp.asarray(g, jnp.float32), K), r.T @ g,
         "R^T G")
  dx = np.full((M, K), 7.0)
  got = compensation.replace_at_nonzeros(
      jnp.asarray(dx, jnp.float32), ell, jnp.asarray(g, jnp.float32),
      jnp.asarray(w, jnp.float32))
  want = np.where(r != 0, g @ w.T, dx)
  _close(got, want, "dX at the nonzeros")
  # Untouched elsewhere, bit for bit (padding slots must not write).
  np.testing.assert_array_equal(np.asarray(got)[r == 0], 7.0)


@pytest.mark.parametrize("k,alpha", [(40, 0.9), (256, 0.99), (688, 0.99),
                                     (100, 0.97)])
def test_capacity_is_the_most_outliers_per_token_occ_leaves(k, alpha):
  # Continuous data (no ties): every row has exactly `capacity` nonzeros.
  x = jax.random.normal(jax.random.key(k), (16, k)) * jnp.exp(
      jax.random.normal(jax.random.key(1), (16, k)))
  _, resid = quant.occ_clamp(x, alpha, axis=-1)
  counts = np.count_nonzero(np.asarray(resid), axis=1)
  cap = compensation.capacity(k, alpha)
  assert cap > 0 and (counts == cap).all(), (cap, counts)


def test_ties_only_lower_the_count():
  x = jnp.tile(jnp.arange(40.0) % 4, (3, 1))     # heavy ties
  _, resid = quant.occ_clamp(x, 0.9, axis=-1)
  assert (np.count_nonzero(np.asarray(resid), axis=1)
          <= compensation.capacity(40, 0.9)).all()
