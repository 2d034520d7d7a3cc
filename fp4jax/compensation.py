"""OCC's sparse compensation products without dense GEMMs (ELL format).

With per-token OCC (RECIPE §4) the residual R = X - Xc of an [M, K]
activation has at most `capacity(K, alpha)` nonzeros in every row: the
entries below the row's low order statistic plus those above its high one
(ties only lower the count). So R is stored exactly as a fixed count per
row (ELL): column indices `idx` [M, c] and values `val` [M, c], padded
with zero values. The three products of the paper's compensation then cost
M c N multiply-adds instead of M K N (c / K ~ 2(1 - alpha)):

  forward  Y  += R W        `spmm`:   Y[m]      += sum_j val[m,j] W[idx[m,j]]
  wgrad    dW += R^T G      `spmm_t`: dW[idx[m,j]] += val[m,j] G[m]
  dgrad    dX[m, k] = G[m] . W[k] where R[m, k] != 0       `sddmm`

(the last replaces a full G W^T GEMM whose other M (K - c) outputs were
thrown away). Each product is a `lax.scan` over the c slots, so no [M, c,
N] gather is materialised; every add is f32, in slot order.

Which is faster is a property of the device: on a CPU the gathers are far
cheaper than three extra f32 GEMMs (the default there: `Execution.sparse_impl`
"auto", `gemm.resolve_sparse`); on a GPU a dense GEMM runs on tensor cores
while these run memory-bound on the SMs, so "auto" is "gemm" there and
`bench/gpu.py` times both. A Pallas kernel (row-block x column-block tiles
gathering W rows) is the next step only if that measurement shows the
gather path close to the GEMM.

Must not import: fp4jax modules (jax only).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class Ell(NamedTuple):
  """A [M, K] matrix with at most c nonzeros per row.

  idx: [M, c] int32 column of each slot (distinct within a row).
  val: [M, c] float32 value of each slot (0 in unused slots).
  """
  idx: jax.Array
  val: jax.Array


def capacity(k: int, alpha: float) -> int:
  """Most nonzeros a row of OCC's residual can hold (quant.occ_clamp's
  order statistics at i_lo = int((1-alpha) K), i_hi = min(int(alpha K),
  K-1): i_lo entries can lie below s[i_lo], K-1-i_hi above s[i_hi])."""
  i_lo, i_hi = int((1 - alpha) * k), min(int(alpha * k), k - 1)
  return i_lo + (k - 1 - i_hi)


def to_ell(resid: jax.Array, cap: int) -> Ell:
  """The ELL form of `resid` [M, K], exact when no row holds more than
  `cap` nonzeros (true of per-token OCC at `capacity`)."""
  r32 = jnp.asarray(resid, jnp.float32)
  _, idx = jax.lax.top_k(jnp.abs(r32), cap)
  return Ell(idx.astype(jnp.int32), jnp.take_along_axis(r32, idx, axis=1))


def to_dense(ell: Ell, k: int) -> jax.Array:
  """[M, K] float32 (the reference form)."""
  m = ell.idx.shape[0]
  return jnp.zeros((m, k), jnp.float32).at[
      jnp.arange(m)[:, None], ell.idx].add(ell.val)


def _slots(ell: Ell):
  return ell.idx.T, ell.val.T          # [c, M]: scan over the slots


# Slots per loop iteration of spmm: XLA fuses their gathers and adds into
# one pass over the accumulator instead of one each (CPU: 3.4x faster at
# [1024, 256] x [256, 512] with c = 6; 2x at K = 2048, c = 42). Unrolled,
# spmm_t's scatter-adds and sddmm's reductions got slower.
_SPMM_UNROLL = 8


def spmm(ell: Ell, w: jax.Array) -> jax.Array:
  """R W: [M, c] ELL x w [K, N] -> [M, N] float32."""
  # jnp.asarray: a host (numpy) operand could not be indexed by the scan's
  # traced slot in an eagerly called model.
  w32 = jnp.asarray(w, jnp.float32)

  def step(acc, slot):
    i, v = slot
    return acc + v[:, None] * w32[i], None

  init = jnp.zeros((ell.idx.shape[0], w.shape[1]), jnp.float32)
  acc = jax.lax.scan(step, init, _slots(ell), unroll=_SPMM_UNROLL)[0]
  # Written out once: with c <= _SPMM_UNROLL no loop is left, and XLA
  # would copy the gathers into every fusion that reads the sum (the demo
  # step of fp4_paper in f32: 391 ms with this, 518 ms without).
  return jax.lax.optimization_barrier(acc)


def spmm_t(ell: Ell, g: jax.Array, k: int) -> jax.Array:
  """R^T G: ([M, K] as ELL)^T x g [M, N] -> [K, N] float32."""
  g32 = jnp.asarray(g, jnp.float32)

  def step(acc, slot):
    i, v = slot
    return acc.at[i].add(v[:, None] * g32), None

  init = jnp.zeros((k, g.shape[1]), jnp.float32)
  return jax.lax.scan(step, init, _slots(ell))[0]


def sddmm(ell: Ell, g: jax.Array, w: jax.Array) -> jax.Array:
  """(G W^T)[m, idx[m, j]] for every slot: g [M, N], w [K, N] -> [M, c]
  float32."""
  g32, w32 = jnp.asarray(g, jnp.float32), jnp.asarray(w, jnp.float32)

  def step(carry, i):
    return carry, jnp.sum(g32 * w32[i], axis=1)

  return jax.lax.scan(step, None, ell.idx.T)[1].T


def replace_at_nonzeros(dx: jax.Array, ell: Ell, g: jax.Array,
                        w: jax.Array) -> jax.Array:
  """dx [M, K] with (G W^T)[m, k] wherever R[m, k] != 0 (the compensation
  dgrad: there the clamp's derivative is 0 and the residual's is 1)."""
  rows = jnp.arange(dx.shape[0])[:, None]
  kept = jnp.take_along_axis(dx, ell.idx, axis=1)
  new = jnp.where(ell.val != 0, sddmm(ell, g, w).astype(dx.dtype), kept)
  return dx.at[rows, ell.idx].set(new)
