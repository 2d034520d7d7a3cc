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
manual over the batch axes (data, fsdp): the model inside it runs on its
rows (activation constraints are skipped there). With FSDP (mesh.fsdp > 1)
the loss is differentiated with respect to the parameter shards: each
sharded leaf is all-gathered in the dtype the model reads it in (a
kernel the model casts to its compute dtype at use is gathered in that
dtype: bf16 in real runs, never its f32 master), and the backward of
that gather is the reduction: the full-size cotangent (compute dtype)
goes straight into a reduce-scatter onto the parameter shards
(`scatter_over`: a ring over fsdp, then a sum over data, 1-byte
payloads, f32 adds on shard-sized partials). No device holds a
full-size f32 copy of a parameter or gradient the model reads in a
narrower dtype. The gathered parameters stay live for the whole backward
(the model's matmuls keep them). With microbatches (optim.grad_accum)
the gather runs once per step and the reduce-scatter once per
microbatch, into a shard-sized f32 accumulator; replicated leaves
accumulate locally and are reduced once.

Tensor parallelism (mesh.tensor > 1): the tensor axis stays automatic
inside the step, so XLA partitions the model there as it does without
this module (its tensor-parallel collectives, in the model's dtypes).
The gathers and the reductions above run on each device's tensor shard,
in a nested shard_map manual over tensor as well (`_on_tensor_shards`;
XLA would otherwise all-gather a tensor-sharded operand of a batch-axis
collective first): a leaf P("fsdp", "tensor") is gathered over fsdp and
reduce-scattered back in blocks of its tensor shard, and a leaf
replicated over the batch axes but sharded over tensor is summed by a
ring over its tensor shard's flattened block. The payload scale is still
one per tensor: its pmax runs over the tensor axis too. Bytes moved per
device, and the largest full-size array a device holds, shrink by the
tensor size. Not supported (one-line ValueError, `check` with the
specs): a dim sharded over both a batch axis and tensor, a leaf sharded
over batch axes along two dims.

Must not import: flax, optax, or fp4jax modules other than sharding and
numerics (its exact power-of-two scales).
"""

from collections.abc import Callable
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax.extend import core as jax_core
from jax.sharding import PartitionSpec as P

from fp4jax import numerics

GRAD_DTYPES = ("float32", "bfloat16", "float8_e4m3fn", "float8_e5m2")
# Largest power-of-two exponent of a payload scale (see pow2_scale).
MAX_SCALE_EXP = 64.0


def check(grad_dtype: str, mesh: jax.sharding.Mesh | None = None,
          param_specs: Any = None,
          batch_axes: tuple[str, ...] = ("data", "fsdp")) -> None:
  """One-line ValueError for an unknown dtype or an unsupported layout.

  Any mesh works (data, fsdp, tensor); with `param_specs` (the params'
  PartitionSpecs) each is checked as `data_parallel_grads` will split it
  (low-precision dtypes only: float32 is XLA's own reduction).
  """
  if grad_dtype not in GRAD_DTYPES:
    raise ValueError(f"comm.grad_dtype must be one of {GRAD_DTYPES}, got "
                     f"{grad_dtype!r}")
  if grad_dtype != "float32" and mesh is not None and param_specs is not None:
    sizes = dict(mesh.shape)
    for spec in jax.tree.leaves(param_specs,
                                is_leaf=lambda s: isinstance(s, P)):
      _layout(spec, sizes, batch_axes)


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
  """The payload scale all devices of `axes` agree on (room for n addends;
  `axes` may include axes x is a shard of, not an addend along)."""
  # The max of |x| is one of x's values: exact in x's own dtype.
  amax = jax.lax.pmax(jnp.max(jnp.abs(x)).astype(jnp.float32), axes)
  return pow2_scale(n * amax, low)


def _ring_reduce_scatter(x: jax.Array, n: int, dim: int,
                         axes: tuple[str, ...], scale: jax.Array, low: Any
                         ) -> jax.Array:
  """x (any float dtype), cut into n blocks along `dim` -> f32 block:
  device r's sum of block r over axes.

  n - 1 `ppermute` steps; each sends a partial sum cast to `low` (times
  `scale`) and adds the own block in f32. Block j starts at device j + 1.
  Blocks are sliced in place (no transposed copy of x) and widened to f32
  one at a time.
  """
  size = x.shape[dim] // n
  r = jax.lax.axis_index(axes)
  ring = [(i, (i + 1) % n) for i in range(n)]

  def block(j):
    return jax.lax.dynamic_slice_in_dim(x, (j % n) * size, size,
                                        axis=dim).astype(jnp.float32)

  partial = block(r - 1)
  for k in range(n - 1):
    got = jax.lax.ppermute(_cast(partial, scale, low), axes, ring)
    partial = got.astype(jnp.float32) / scale + block(r - 2 - k)
  return partial


def sum_over(x: jax.Array, axes: tuple[str, ...], dtype: str, n: int,
             scale: jax.Array | None = None, agree: tuple[str, ...] = ()
             ) -> jax.Array:
  """Sum of `x` over mesh `axes` (inside shard_map), moving `dtype`.

  Args:
    x: this device's addend, any float dtype and shape.
    axes: the manual mesh axes to sum over.
    dtype: a GRAD_DTYPES name; "float32" is a plain psum.
    n: the number of devices along `axes`.
    scale: the payload scale, when a wider reduction already agreed on
      one (`scatter_over`); default: from the pmax of |x| over `axes`
      and `agree`.
    agree: further manual axes x is a shard of (tensor parallelism: each
      device holds its tensor shard's block), not summed over: the scale
      is agreed over them too, one scale for the whole tensor.

  Returns:
    float32, x's shape: the sum over the axes, the same on every device.
  """
  x = x.astype(jnp.float32)
  if dtype == "float32" or n == 1:
    return jax.lax.psum(x, axes)
  low = jnp.dtype(dtype)
  scale = _scale(x, axes + agree, n, low) if scale is None else scale
  if n == 2:
    both = jax.lax.all_gather(_cast(x, scale, low), axes, tiled=False)
    return jnp.sum(both.astype(jnp.float32), axis=0) / scale
  shape, size = x.shape, x.size
  chunk = -(-size // n)
  flat = jnp.pad(x.reshape(-1), (0, n * chunk - size))
  partial = _ring_reduce_scatter(flat, n, 0, axes, scale, low)
  summed = jax.lax.all_gather(_cast(partial, scale, low), axes, tiled=True)
  return (summed.astype(jnp.float32) / scale)[:size].reshape(shape)


def scatter_over(x: jax.Array, dim: int, shard_axes: tuple[str, ...],
                 axes: tuple[str, ...], dtype: str, sizes: dict[str, int],
                 agree: tuple[str, ...] = ()) -> jax.Array:
  """Sum of `x` over `axes`, left scattered along `dim` over `shard_axes`.

  The FSDP gradient reduction: each device keeps the block of the sum its
  parameter shard needs. A ring reduce-scatter over `shard_axes` (each
  device ends with the f32 sum of its block), then `sum_over` the other
  `axes`; one scale for both, agreed over all of `axes`. `x` stays in its
  own dtype: only the shard-sized blocks are widened to f32 as the ring
  adds them (the values are those of an f32 `x`: widening is exact), so
  a bf16 cotangent never has a full-size f32 copy.

  Args:
    x: this device's addend (the full gradient), any float dtype.
    dim: the dimension the parameter is sharded along.
    shard_axes: the mesh axes of that dimension (a subset of `axes`).
    axes: all axes the batch rows are split over.
    dtype: a GRAD_DTYPES name.
    sizes: mesh axis sizes.
    agree: further manual axes x is a shard of (tensor), as in
      `sum_over`: the scale is agreed over them too.

  Returns:
    float32, x's shape with x.shape[dim] / prod(shard sizes) at `dim`:
    device i's block (block index = its index along shard_axes).
  """
  n_shard = math.prod(sizes[a] for a in shard_axes)
  rest = tuple(a for a in axes if a not in shard_axes)
  n_rest = math.prod(sizes[a] for a in rest)
  if dtype == "float32":
    part = jax.lax.psum_scatter(x.astype(jnp.float32), shard_axes,
                                scatter_dimension=dim, tiled=True)
    return jax.lax.psum(part, rest) if rest else part
  low = jnp.dtype(dtype)
  scale = _scale(x, axes + agree, n_shard * n_rest, low)
  part = _ring_reduce_scatter(x, n_shard, dim, shard_axes, scale, low)
  return sum_over(part, rest, dtype, n_rest, scale) if rest else part


def _axes(entry: Any) -> tuple[str, ...]:
  return (entry,) if isinstance(entry, str) else tuple(entry or ())


def _layout(spec: P, sizes: dict[str, int], batch_axes: tuple[str, ...]
            ) -> tuple[P, tuple[int, tuple[str, ...]] | None, P]:
  """A parameter spec split between the manual batch axes and the rest.

  Returns:
    (the spec over the batch axes only: the shard_map's; (dim, its batch
    axes of size > 1) or None = whole over them: what the step gathers and
    reduce-scatters; the spec over the other (automatic: tensor) axes
    only, which XLA keeps inside the step).

  Raises:
    ValueError: one line, for a layout the step does not support: sharded
      over batch axes along two dims, or one dim over both batch axes and
      others (tensor).
  """
  manual, auto, sharded = [], [], []
  for d, entry in enumerate(spec):
    axes = _axes(entry)
    mine = tuple(a for a in axes if a in batch_axes)
    other = tuple(a for a in axes if a not in batch_axes)
    manual.append(mine if len(mine) > 1 else (mine or (None,))[0])
    auto.append(other if len(other) > 1 else (other or (None,))[0])
    big = tuple(a for a in mine if sizes[a] > 1)
    if big and any(sizes[a] > 1 for a in other):
      raise ValueError(f"comm: a parameter dim sharded over both batch axes "
                       f"{big} and {other} ({spec}) is not supported")
    if big:
      sharded.append((d, big))
  if len(sharded) > 1:
    raise ValueError(f"comm: a parameter sharded along more than one dim "
                     f"({spec}) is not supported")
  return P(*manual), (sharded[0] if sharded else None), P(*auto)


def _auto_axes(auto: P, sizes: dict[str, int]) -> tuple[str, ...]:
  """The mesh axes of size > 1 an automatic-axes spec shards over."""
  return tuple(a for e in auto for a in _axes(e) if sizes[a] > 1)


def _on_tensor_shards(fn: Callable[..., jax.Array], auto: P,
                      sizes: dict[str, int]) -> Callable[..., jax.Array]:
  """fn run on each device's tensor shard: manual over `auto`'s axes too.

  Inside the step (manual over the batch axes only) XLA partitions a
  batch-axis collective as if its operand were replicated over the
  automatic axes: it all-gathers a tensor-sharded operand first
  (measured on XLA:CPU, jax 0.12: all_gather does; ppermute does not).
  A nested shard_map over the automatic axes hands `fn` the local block
  instead (spec `auto` in and out), so the gather and the reduction move
  1/tensor of the leaf per device and no device holds it whole.

  Args:
    fn: (array, the manual tensor axes its scale must be agreed over:
      `agree` of `sum_over`) -> array laid out as `auto`.
    auto: the leaf's spec over the automatic axes (`_layout`).
    sizes: mesh axis sizes.

  Returns:
    array -> fn's result; fn itself (agree = ()) when `auto` shards
    nothing.
  """
  agree = _auto_axes(auto, sizes)
  if not agree:
    return lambda x: fn(x, ())
  return jax.shard_map(lambda x: fn(x, agree), in_specs=auto,
                       out_specs=auto, axis_names=frozenset(agree),
                       check_vma=False)


# Primitives that run their one sub-jaxpr once on their own operands, and
# whose transpose is that of the sub-jaxpr: a cast inside one of them is a
# cast of the operand. (Loops are not: a scan's transpose sums a constant's
# cotangent over iterations in the constant's dtype; custom_vjp rules
# choose their own cotangents.)
_CALLS = frozenset({"jit", "pjit", "closed_call", "core_call", "remat",
                    "remat2", "checkpoint"})


def _reads(jaxpr: jax_core.Jaxpr, var: jax_core.Var
           ) -> tuple[list[Any], set[int]]:
  """How `jaxpr` reads `var`: (one entry per use: the dtype of a
  convert_element_type, else None; the positions of jaxpr's outputs that
  are `var` itself).

  A call that returns an operand unchanged (nnx.remat returns the
  module's state) passes it through: that is no use in itself; the uses
  of the call's result are.
  """
  uses = []
  returned = {j for j, v in enumerate(jaxpr.outvars) if v is var}
  for eqn in jaxpr.eqns:
    for i, x in enumerate(eqn.invars):
      if x is not var:
        continue
      subs = list(jax_core.jaxprs_in_params(eqn.params))
      if eqn.primitive.name == "convert_element_type":
        uses.append(jnp.dtype(eqn.params["new_dtype"]))
      elif (eqn.primitive.name in _CALLS and len(subs) == 1
            and len(subs[0].invars) == len(eqn.invars)
            and len(subs[0].outvars) == len(eqn.outvars)):
        inner_uses, passed = _reads(subs[0], subs[0].invars[i])
        uses += inner_uses
        for j in passed:
          outer_uses, outer_returned = _reads(jaxpr, eqn.outvars[j])
          uses += outer_uses
          returned |= outer_returned
      else:
        uses.append(None)
  return uses, returned


def read_dtypes(loss: Callable[..., Any], params: list[Any], *args: Any
                ) -> list[Any]:
  """The dtype `loss` reads each parameter in, from its jaxpr (no FLOPs).

  A parameter whose only use is one cast to a narrower float dtype (a
  kernel the model casts to its compute dtype) is read in that dtype: an
  all-gather of it can move and keep that dtype with the same values and
  the same cotangent (the cast's transpose only widens it). Anything else
  keeps the parameter's own dtype: the embedding's row lookup (its
  backward sums the cotangent rows of repeated tokens in the table's
  dtype), a parameter read twice (its cotangents add in its dtype).

  Args:
    loss: (params list, *args) -> anything.
    params: arrays or ShapeDtypeStructs (full shapes).
    *args: the further arguments (arrays or ShapeDtypeStructs).

  Returns:
    One numpy dtype per parameter.
  """
  closed = jax.make_jaxpr(loss)(params, *args)
  out = []
  for p, var in zip(params, closed.jaxpr.invars[:len(params)]):
    own = jnp.dtype(p.dtype)
    uses, returned = _reads(closed.jaxpr, var)
    uses += [None] * len(returned)      # an output of the loss: read as is
    narrower = (len(uses) == 1 and uses[0] is not None and
                jnp.issubdtype(uses[0], jnp.floating) and
                uses[0].itemsize < own.itemsize)
    out.append(uses[0] if narrower else own)
  return out


def _reduced_view(reduce: Callable[[jax.Array], jax.Array]
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """view(shard, full) = full, the shard's gathered value; its backward
  sends the cotangent through `reduce` to the shard.

  The gather itself runs outside, once per step (before any microbatch
  loop); differentiating through view is differentiating through that
  gather, whose transpose is the reduce-scatter (summed over the batch
  shards as well: the reduction of the data-parallel gradient).
  """
  @jax.custom_vjp
  def view(shard, full):
    del shard
    return full

  def fwd(shard, full):
    del shard
    return full, None

  def bwd(_, ct):
    return reduce(ct), None   # `full` is a constant of the loss: no ct

  view.defvjp(fwd, bwd)
  return view


def data_parallel_grads(loss_sum: Callable[..., tuple[jax.Array, jax.Array]],
                        params: Any, batch: dict[str, jax.Array], *,
                        mesh: jax.sharding.Mesh, batch_axes: tuple[str, ...],
                        grad_dtype: str, args: tuple = (),
                        param_specs: Any = None, microbatches: int = 1
                        ) -> tuple[jax.Array, Any]:
  """(mean loss, its gradient) with the gradient reduced in `grad_dtype`.

  Replicated parameters: each device differentiates with respect to its
  own copy and the local gradient is reduced with `sum_over`. Parameters
  sharded over batch axes (FSDP, `param_specs`): each device gathers the
  full value in the dtype the loss reads it in (`read_dtypes`: a kernel
  the model casts to bf16 is gathered in bf16; the values the model sees
  are unchanged), and the loss is differentiated with respect to the f32
  shard through a view whose backward is the reduce-scatter
  (`scatter_over`) of the full-size cotangent: a sharded leaf's gradient
  comes out reduced, shard-sized and f32, and a narrow-read leaf never
  has a full-size f32 gradient.

  Args:
    loss_sum: (params, batch, *args) -> (summed nll, token count) on one
      shard's rows.
    params: the parameters, laid out as `param_specs`.
    batch: the global batch, rows sharded over `batch_axes`.
    mesh: the device mesh (the batch axes go manual; the others, tensor,
      stay XLA's inside the model).
    batch_axes: the mesh axes the batch rows are split over.
    grad_dtype: a GRAD_DTYPES name.
    args: further replicated arguments of `loss_sum` (keys).
    param_specs: PartitionSpecs of `params` (its structure). A leaf may
      be sharded over batch axes along one dim (FSDP) and over the other
      axes (tensor) along others; see `_layout`. None = replicated.
    microbatches: n > 1: each shard's rows are split into n contiguous
      microbatches (n divides them), run one at a time in a `lax.scan`
      with their gradients summed in f32; `args` then carry a leading [n]
      axis, microbatch i getting args[j][i]. Replicated leaves are reduced
      once, after the loop (their accumulator is no larger than the
      parameter). Sharded leaves are reduce-scattered per microbatch,
      inside the loop, and accumulated shard-sized: an unreduced
      full-size accumulator per device is what FSDP exists to avoid.
      Each microbatch's reduction agrees on its own scale (its FP8
      rounding is relative to that microbatch's gradient). The gather
      runs once, before the loop.

  Returns:
    The global mean loss (f32 []) and gradient (params' structure and
    specs, f32): sum of the shards' nll gradients / global token count.
  """
  sizes = dict(mesh.shape)
  if param_specs is None:
    param_specs = jax.tree.map(lambda _: P(), params)
  spec_leaves, spec_def = jax.tree.flatten(
      param_specs, is_leaf=lambda s: isinstance(s, P))
  layouts = [_layout(s, sizes, batch_axes) for s in spec_leaves]
  manual_specs = spec_def.unflatten([m for m, _, _ in layouts])
  flat_layout = [w for _, w, _ in layouts]
  flat_auto = [a for _, _, a in layouts]
  ways = math.prod(sizes[a] for a in batch_axes)

  def full_struct(p, where):
    shape = list(p.shape)
    if where is not None:
      shape[where[0]] *= math.prod(sizes[a] for a in where[1])
    return jax.ShapeDtypeStruct(tuple(shape), p.dtype)

  def local(params, batch, *args):
    leaves, treedef = jax.tree.flatten(params)
    if microbatches == 1:
      xs = (batch, *args)
      first = xs
    else:
      micro = jax.tree.map(lambda x: x.reshape(
          microbatches, x.shape[0] // microbatches, *x.shape[1:]), batch)
      xs = (micro, *args)
      first = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:],
                                                          x.dtype), xs)

    def loss_of(full, *a):
      return loss_sum(treedef.unflatten(full), *a)

    # The dtype the model reads each full leaf in (one more trace of the
    # loss, no FLOPs): what its gather moves.
    reads = read_dtypes(loss_of, [full_struct(p, w) for p, w in
                                  zip(leaves, flat_layout)], *first)
    views, diff = [], []
    for p, where, read, auto in zip(leaves, flat_layout, reads, flat_auto):
      if where is None:
        views.append(None)
        diff.append(p)
        continue
      dim, axes = where
      full = _on_tensor_shards(
          lambda x, _, dim=dim, axes=axes, read=read: jax.lax.all_gather(
              x.astype(read), axes, axis=dim, tiled=True), auto, sizes)(p)
      reduce = _on_tensor_shards(
          lambda x, agree, dim=dim, axes=axes: scatter_over(
              x, dim, axes, batch_axes, grad_dtype, sizes, agree),
          auto, sizes)
      views.append(functools.partial(_reduced_view(reduce), full=full))
      # Differentiate w.r.t. the f32 shard: its gradient is the
      # reduction's f32 result (a bf16 master's own dtype would round it).
      diff.append(p.astype(jnp.float32))

    def shard_loss(diff, *a):
      return loss_of([d if v is None else v(d) for d, v in zip(diff, views)],
                     *a)

    grad_fn = jax.value_and_grad(shard_loss, has_aux=True)
    if microbatches == 1:
      (nll, tokens), g = grad_fn(diff, *xs)
    else:
      def body(acc, x):
        (nll, tokens), g = grad_fn(diff, *x)
        return jax.tree.map(lambda a, b: a + b.astype(jnp.float32), acc,
                            (nll, tokens, g)), None

      zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                           (jnp.zeros([]), jnp.zeros([]), diff))
      (nll, tokens, g), _ = jax.lax.scan(body, zeros, xs)
    count = jax.lax.psum(tokens, batch_axes)
    nll = jax.lax.psum(nll, batch_axes)
    g = [_on_tensor_shards(
        lambda x, agree: sum_over(x, batch_axes, grad_dtype, ways,
                                  agree=agree), a, sizes)(t)
         if v is None else t for t, v, a in zip(g, views, flat_auto)]
    denom = jnp.maximum(count, 1.0)
    return nll / denom, treedef.unflatten([t / denom for t in g])

  rows = P(batch_axes)
  # Manual over the batch axes only: the others (tensor) stay XLA's, which
  # partitions the model inside as it does outside (its collectives, in
  # the model's dtypes; the arrays keep their tensor sharding).
  fn = jax.shard_map(
      local, mesh=mesh,
      in_specs=(manual_specs, jax.tree.map(lambda _: rows, batch),
                *(P() for _ in args)),
      out_specs=(P(), manual_specs), axis_names=frozenset(batch_axes),
      check_vma=False)
  return fn(params, batch, *args)
