"""Low-precision gradient communication (RECIPE §6: FP8 all-reduce).

Owns: `comm.grad_dtype`, the dtype the data-parallel gradient reduction
moves, and the reduction itself. With float32 the reduction is whatever
XLA inserts (a psum in f32). With bfloat16 / float8_e4m3fn / float8_e5m2
(on n devices of the data axes):

  1. every device agrees on one scale per tensor, s = 2^floor(log2(fmax /
     (n amax))), amax the pmax of |g| over the data axes: a power of two
     (scaling is exact), with room for the sum of all n shards (FP8 only;
     bf16 has f32's range and is sent unscaled);
  2. ring reduce-scatter: the flat gradient is cut into n chunks; in n - 1
     `ppermute` steps each device passes a partial sum, cast to the dtype
     (round to nearest even: the 1-byte payload), to its neighbour, which
     adds its own chunk in float32; device r ends with the sum of chunk r;
  3. all-gather of the summed chunks, cast to the dtype once more.

Nothing is accumulated in the low-precision dtype (XLA's psum of FP8
operands accumulates in FP8); every add is f32. A device sends and
receives 2 (n-1)/n payloads, as a ring all-reduce does in f32: 1/4 of
the bytes for FP8, 1/2 for bf16. Error per element: the rounding of each
of the n - 1 transmitted partial sums and of the final sum, each at most
max(|partial| 2^-(m+1), smallest subnormal / 2) / s (m mantissa bits).
At n = 2 the ring is a plain all-gather of the two payloads (the same
bytes, one rounding fewer).

The step using it computes each data shard's gradient in a `shard_map`
over the mesh, fully manual: the model inside it runs on local arrays
(activation constraints are skipped there). With FSDP (mesh.fsdp > 1)
each device first gathers the full parameters, and the reduction is a
reduce-scatter onto the parameter shards (`scatter_over`): a ring over
fsdp, then a sum over data, 1-byte payloads throughout. The gathered
parameters and the full local gradient are live at once (XLA's own FSDP
may gather layer by layer); tensor parallelism (mesh.tensor > 1) would
need collectives inside the model and is refused.

Must not import: flax, optax, or fp4jax modules other than sharding and
numerics (its exact power-of-two scales).
"""

from collections.abc import Callable
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from fp4jax import numerics

GRAD_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2")
# Largest power-of-two exponent of a payload scale (see pow2_scale).
MAX_SCALE_EXP = 64.0


def check(grad_dtype: str, mesh: jax.sharding.Mesh) -> None:
  """One-line ValueError for an unknown dtype or an unsupported mesh."""
  if grad_dtype not in GRAD_DTYPES:
    raise ValueError(f"comm.grad_dtype must be one of {GRAD_DTYPES}, got "
                     f"{grad_dtype!r}")
  if grad_dtype != "float32" and mesh.shape["tensor"] > 1:
    raise ValueError(f"comm.grad_dtype={grad_dtype} needs mesh.tensor = 1 "
                     f"(data and fsdp axes only), got {dict(mesh.shape)}")


def pow2_scale(amax: jax.Array, dtype: Any) -> jax.Array:
  """2^floor(log2(fmax / amax)): the largest exact scale keeping |x s| <= fmax.

  f32 [] in, f32 [] out; 1 where amax is 0 or not finite, and for dtypes
  with f32's exponent range (bf16: scaling gains nothing). The exponent is
  at most MAX_SCALE_EXP: a tiny amax (a gradient of ~1e-30) would
  otherwise give s = 2^126, whose products XLA may evaluate as 0 once it
  fuses the cast and the division back (measured: bf16 gradients summed
  to exactly 0); values that small lose nothing that matters by staying
  below the dtype's normal range. The exponent is that of the exact ratio
  (numerics.pow2_scale), so s is exactly a power of two and the largest
  one that fits.
  """
  if jnp.finfo(dtype).maxexp >= jnp.finfo(jnp.float32).maxexp:
    return jnp.ones(jnp.shape(amax), jnp.float32)
  fmax = float(jnp.finfo(dtype).max)
  return numerics.pow2_scale(fmax, amax, max_exp=int(MAX_SCALE_EXP))


def _cast(x: jax.Array, scale: jax.Array, low: Any) -> jax.Array:
  return (x * scale).astype(low)


def _scale(x: jax.Array, axes: tuple[str, ...], n: int, low: Any
           ) -> jax.Array:
  """The payload scale all devices of `axes` agree on (room for n addends)."""
  amax = jax.lax.pmax(jnp.max(jnp.abs(x)), axes)
  return pow2_scale(n * amax, low)


def _ring_reduce_scatter(chunks: jax.Array, axes: tuple[str, ...],
                         scale: jax.Array, low: Any) -> jax.Array:
  """f32 [n, ...] addends -> f32 [...]: device r's sum of chunk r over axes.

  n - 1 `ppermute` steps; each sends a partial sum cast to `low` (times
  `scale`) and adds the own chunk in f32. Chunk j starts at device j + 1.
  """
  n = chunks.shape[0]
  r = jax.lax.axis_index(axes)
  ring = [(i, (i + 1) % n) for i in range(n)]
  partial = chunks[(r - 1) % n]
  for k in range(n - 1):
    got = jax.lax.ppermute(_cast(partial, scale, low), axes, ring)
    partial = got.astype(jnp.float32) / scale + chunks[(r - 2 - k) % n]
  return partial


def sum_over(x: jax.Array, axes: tuple[str, ...], dtype: str, n: int,
             scale: jax.Array | None = None) -> jax.Array:
  """Sum of `x` over mesh `axes` (inside shard_map), moving `dtype`.

  Args:
    x: this device's addend, any float dtype and shape.
    axes: the manual mesh axes to sum over.
    dtype: a GRAD_DTYPES name; "float32" is a plain psum.
    n: the number of devices along `axes`.
    scale: the payload scale, when a wider reduction already agreed on
      one (`scatter_over`); default: from the pmax of |x| over `axes`.

  Returns:
    float32, x's shape: the sum over the axes, the same on every device.
  """
  x = x.astype(jnp.float32)
  if dtype == "float32" or n == 1:
    return jax.lax.psum(x, axes)
  low = jnp.dtype(dtype)
  scale = _scale(x, axes, n, low) if scale is None else scale
  if n == 2:
    both = jax.lax.all_gather(_cast(x, scale, low), axes, tiled=False)
    return jnp.sum(both.astype(jnp.float32), axis=0) / scale
  shape, size = x.shape, x.size
  chunk = -(-size // n)
  chunks = jnp.pad(x.reshape(-1), (0, n * chunk - size)).reshape(n, chunk)
  partial = _ring_reduce_scatter(chunks, axes, scale, low)
  summed = jax.lax.all_gather(_cast(partial, scale, low), axes, tiled=True)
  return (summed.astype(jnp.float32) / scale)[:size].reshape(shape)


def scatter_over(x: jax.Array, dim: int, shard_axes: tuple[str, ...],
                 axes: tuple[str, ...], dtype: str, sizes: dict[str, int]
                 ) -> jax.Array:
  """Sum of `x` over `axes`, left scattered along `dim` over `shard_axes`.

  The FSDP gradient reduction: each device keeps the block of the sum its
  parameter shard needs. A ring reduce-scatter over `shard_axes` (each
  device ends with the f32 sum of its block), then `sum_over` the other
  `axes`; one scale for both, agreed over all of `axes`.

  Args:
    x: this device's addend (the full gradient), any float dtype.
    dim: the dimension the parameter is sharded along.
    shard_axes: the mesh axes of that dimension (a subset of `axes`).
    axes: all axes the batch rows are split over.
    dtype: a GRAD_DTYPES name.
    sizes: mesh axis sizes.

  Returns:
    float32, x's shape with x.shape[dim] / prod(shard sizes) at `dim`:
    device i's block (block index = its index along shard_axes).
  """
  x = x.astype(jnp.float32)
  n_shard = math.prod(sizes[a] for a in shard_axes)
  rest = tuple(a for a in axes if a not in shard_axes)
  n_rest = math.prod(sizes[a] for a in rest)
  if dtype == "float32":
    part = jax.lax.psum_scatter(x, shard_axes, scatter_dimension=dim,
                                tiled=True)
    return jax.lax.psum(part, rest) if rest else part
  low = jnp.dtype(dtype)
  scale = _scale(x, axes, n_shard * n_rest, low)
  moved = jnp.moveaxis(x, dim, 0)
  chunks = moved.reshape(n_shard, moved.shape[0] // n_shard,
                         *moved.shape[1:])
  part = _ring_reduce_scatter(chunks, shard_axes, scale, low)
  if rest:
    part = sum_over(part, rest, dtype, n_rest, scale)
  return jnp.moveaxis(part, 0, dim)


def _shard_dim(spec: P, sizes: dict[str, int]
               ) -> tuple[int, tuple[str, ...]] | None:
  """(dim, its mesh axes of size > 1) of a parameter spec; None = whole."""
  sharded = []
  for d, entry in enumerate(spec):
    axes = tuple(a for a in ((entry,) if isinstance(entry, str)
                             else tuple(entry or ())) if sizes[a] > 1)
    if axes:
      sharded.append((d, axes))
  if len(sharded) > 1:
    raise ValueError(f"comm: a parameter sharded along more than one dim "
                     f"({spec}) is not supported")
  return sharded[0] if sharded else None


def data_parallel_grads(loss_sum: Callable[..., tuple[jax.Array, jax.Array]],
                        params: Any, batch: dict[str, jax.Array], *,
                        mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...],
                        grad_dtype: str, args: tuple = (),
                        param_specs: Any = None, microbatches: int = 1
                        ) -> tuple[jax.Array, Any]:
  """(mean loss, its gradient) with the gradient reduced in `grad_dtype`.

  With FSDP (parameters sharded over batch axes, `param_specs`), each
  device gathers the full parameters (in their own dtype: only the
  gradient's reduction is low-precision), computes its rows' gradient, and
  the reduction scatters it back onto the parameter shards
  (`scatter_over`), so the gradient comes out sharded as the parameters.

  Args:
    loss_sum: (params, batch, *args) -> (summed nll, token count) on one
      shard's rows.
    params: the parameters, laid out as `param_specs`.
    batch: the global batch, rows sharded over `batch_axes`.
    mesh: the device mesh (every axis goes manual).
    batch_axes: the mesh axes the batch rows are split over.
    grad_dtype: a GRAD_DTYPES name.
    args: further replicated arguments of `loss_sum` (keys).
    param_specs: PartitionSpecs of `params` (its structure); their sharded
      axes must be among `batch_axes`. None = replicated.
    microbatches: n > 1: each shard's rows are split into n contiguous
      microbatches (n divides them), run one at a time in a `lax.scan`
      with their gradients summed in f32, and reduced once; `args` then
      carry a leading [n] axis, microbatch i getting args[j][i].

  Returns:
    The global mean loss (f32 []) and gradient (params' structure and
    specs, f32): sum of the shards' nll gradients / global token count.
  """
  sizes = dict(mesh.shape)
  if param_specs is None:
    param_specs = jax.tree.map(lambda _: P(), params)
  spec_leaves = jax.tree.leaves(param_specs,
                                is_leaf=lambda s: isinstance(s, P))
  flat_layout = [_shard_dim(s, sizes) for s in spec_leaves]
  for where in flat_layout:
    if where is not None and not set(where[1]) <= set(batch_axes):
      raise ValueError(f"comm: parameters sharded over {where[1]} (not a "
                       f"batch axis {batch_axes}) are not supported")

  def gather(p, where):
    return p if where is None else jax.lax.all_gather(
        p, where[1], axis=where[0], tiled=True)

  def reduce(g, where):
    if where is None:
      return sum_over(g, batch_axes, grad_dtype, ways)
    return scatter_over(g, where[0], where[1], batch_axes, grad_dtype, sizes)

  def grads(full, batch, *args):
    if microbatches == 1:
      return jax.value_and_grad(loss_sum, has_aux=True)(full, batch, *args)
    micro = jax.tree.map(lambda x: x.reshape(
        microbatches, x.shape[0] // microbatches, *x.shape[1:]), batch)

    def body(acc, xs):
      (nll, tokens), g = jax.value_and_grad(loss_sum, has_aux=True)(
          full, *xs)
      return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc,
                          (nll, tokens, g)), None

    zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                         (jnp.zeros([]), jnp.zeros([]), full))
    (nll, tokens, g), _ = jax.lax.scan(body, zeros, (micro, *args))
    return (nll, tokens), g

  def local(params, batch, *args):
    leaves, treedef = jax.tree.flatten(params)
    full = treedef.unflatten([gather(p, w) for p, w in
                              zip(leaves, flat_layout)])
    (nll, tokens), g = grads(full, batch, *args)
    count = jax.lax.psum(tokens, batch_axes)
    nll = jax.lax.psum(nll, batch_axes)
    g = treedef.unflatten([reduce(t, w) for t, w in
                           zip(jax.tree.leaves(g), flat_layout)])
    denom = jnp.maximum(count, 1.0)
    return nll / denom, jax.tree.map(lambda t: t / denom, g)

  ways = math.prod(sizes[a] for a in batch_axes)
  rows = P(batch_axes)
  fn = jax.shard_map(
      local, mesh=mesh,
      in_specs=(param_specs, jax.tree.map(lambda _: rows, batch),
                *(P() for _ in args)),
      out_specs=(P(), param_specs), check_vma=False)
  return fn(params, batch, *args)
