"""Block random Hadamard transforms applied along one axis of a GEMM operand.

Owns: `rotation(b, seed)`, the orthonormal [b, b] matrix R = diag(s) H_b /
sqrt(b) (H_b Sylvester's Hadamard matrix, s a fixed random sign vector), and
`rotate(x, b, axis)`, which multiplies every run of b consecutive elements
along `axis` by R (or R^T with inverse=True).

Rotating both operands of a GEMM along its contracted axis leaves the
product unchanged, sum_j (a R)_j (b R)_j = a R R^T b = a . b, but spreads a
block's outliers over all its b elements before quantization (NVIDIA's NVFP4
recipe: 16 along the wgrad's token axis; Tseng et al. and Quartet: 32).
One sign vector serves every layer and step (NVIDIA's "one fixed random
sign vector"), so no state or key is needed.

Must not import: flax, ml_collections, fp4jax modules right of `numerics`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

SIGN_SEED = 20250925   # fixed: the same signs on every process and run


@functools.lru_cache(maxsize=None)
def rotation(b: int, seed: int = SIGN_SEED) -> np.ndarray:
  """R = diag(s) H_b / sqrt(b), float64 [b, b], orthonormal (R R^T = I).

  Args:
    b: block size, a power of two >= 2.
    seed: seed of the random signs s.
  """
  if b < 2 or b & (b - 1):
    raise ValueError(f"Hadamard block size must be a power of two >= 2, got "
                     f"{b}")
  h = np.ones((1, 1))
  while h.shape[0] < b:
    h = np.block([[h, h], [h, -h]])
  s = np.random.default_rng(seed).choice([-1.0, 1.0], size=b)
  return s[:, None] * h / np.sqrt(b)


def rotate(x: jax.Array, b: int, axis: int, inverse: bool = False
           ) -> jax.Array:
  """x with every b-run along `axis` multiplied by R (R^T if inverse).

  Args:
    x: float array; x.shape[axis] divisible by b.
    b: block size (0 = identity, x returned as is).
    axis: the axis rotated.
    inverse: apply R^T, undoing `rotate(x, b, axis)`.

  Returns:
    float32, x's shape.
  """
  if not b:
    return x
  axis = axis % x.ndim
  n = x.shape[axis]
  if n % b:
    raise ValueError(f"Hadamard block {b} does not divide the length {n} of "
                     f"axis {axis} of an operand of shape {x.shape}")
  r = rotation(b)
  r = jnp.asarray(r.T if inverse else r, jnp.float32)
  moved = jnp.moveaxis(x.astype(jnp.float32), axis, -1)
  blocks = moved.reshape(*moved.shape[:-1], n // b, b)
  # HIGHEST: on GPU an f32 matmul at default precision would round to TF32.
  out = jnp.matmul(blocks, r, precision=jax.lax.Precision.HIGHEST)
  return jnp.moveaxis(out.reshape(moved.shape), -1, axis)
