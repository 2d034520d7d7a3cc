"""Low-precision gradient reduction (fp4jax.comm) against a float64 oracle."""

import functools
import json
import math
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from jax.extend import core as jax_core
from jax.sharding import PartitionSpec as P

from configs import demo
from fp4jax import comm
from fp4jax import llama
from fp4jax import runconfig
from fp4jax import sharding
from fp4jax import train
import faults
import harness

# Mantissa bits (RNE: half an ulp <= |y| 2^-(m+1)) and smallest subnormal.
FORMATS = {"bfloat16": (7, float(jnp.finfo(jnp.bfloat16).smallest_subnormal)),
           "float8_e4m3fn": (3, 2.0**-9), "float8_e5m2": (2, 2.0**-16)}
# The f32 accumulation of n terms adds at most n 2^-24 of sum |x|.
F32_EPS = 2.0**-24
# The bound must be reached within 4x somewhere (else it is not the bound
# of this rounding, and a broken rounding could hide under it).
TIGHTNESS = 4.0
# fp8 vs f32 gradient communication, 50 steps of the tiny model: the
# issue's 1% budget on the final training loss.
FP8_COMM_LOSS_RTOL = 0.01
# 1 process of 8 devices vs 2 of 4 (gloo): the FP8 payloads move exactly
# (collective permutes and all-gathers) and every f32 add of the ring
# happens on the same device in the same order; only the f32 psums of the
# loss and token count may associate differently (a few ulps, 2^-24
# relative each, compounded over 6 steps). A row or shard sent to the
# wrong device moves the loss by >= 1e-3.
PROCESS_LOSS_RTOL = 1e-6


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(8, 1, 1)


def _sum_fn(mesh, dtype):
  n = mesh.shape["data"]
  return jax.jit(jax.shard_map(
      lambda x: comm.sum_over(x[0], ("data",), dtype, n)[None], mesh=mesh,
      in_specs=P("data"), out_specs=P("data"), check_vma=False))


def _fmax(dtype):
  return float(ml_dtypes.finfo(getattr(ml_dtypes, dtype)).max)


def _pow2_scale(dtype, n, amax):
  """The payload scale for n addends of largest magnitude amax."""
  # bf16 has f32's range: sent unscaled. FP8: the shared power of two.
  return (1.0 if dtype == "bfloat16" else
          2.0**min(np.floor(np.log2(_fmax(dtype) / (n * amax))),
                   comm.MAX_SCALE_EXP))


def _bound(x, dtype, amax=None):
  """Per-element error bound of the ring (n > 2) or all-gather (n = 2) sum.

  x: float64 [n, L], device i's addend in row i. Chunk j of the flat
  vector starts at device j + 1 and goes round the ring; every partial
  sum that is sent, and the final sum, is rounded once. amax: the
  largest |addend| the scale was agreed on (default: x's; a tensor
  shard's ring shares its whole tensor's).
  """
  n, length = x.shape
  m, sub = FORMATS[dtype]
  scale = _pow2_scale(dtype, n, np.abs(x).max() if amax is None else amax)
  def rounding(v):
    return np.maximum(np.abs(v) * scale * 2.0**-(m + 1), sub / 2) / scale
  if n == 2:   # each addend rounded once, summed in f32
    return rounding(x[0]) + rounding(x[1]) + 2 * F32_EPS * np.abs(x).sum(0)
  return _ring_bound(x, rounding, gathered=True) + (
      n * F32_EPS * np.abs(x).sum(0))


def _ring_bound(x, rounding, gathered):
  """Error bound of the ring over x's rows (float64 [n, L]); chunk j of the
  flat vector starts at device j + 1. Every partial sum sent is rounded
  once; with `gathered` the final sum too (all-gather), else it stays f32
  (reduce-scatter)."""
  n, length = x.shape
  chunk = -(-length // n)
  start = (np.arange(length) // chunk + 1) % n     # device sending first
  order = (start[None, :] + np.arange(n)[:, None]) % n   # [n, L]
  partial = np.zeros(length)
  bound = np.zeros(length)
  for k in range(n if gathered else n - 1):
    partial = partial + x[order[k], np.arange(length)]
    # Partials after 1..n-1 contributions are sent; the n-th is gathered.
    bound = bound + rounding(np.abs(partial) + bound)
  return bound


@pytest.mark.parametrize("devices", [8, 2])
@pytest.mark.parametrize("dtype", sorted(FORMATS))
def test_sum_is_within_the_rounding_bound_and_the_bound_is_tight(dtype,
                                                                  devices):
  mesh = sharding.make_mesh(devices, 1, 1, devices=jax.devices()[:devices])
  rng = np.random.default_rng(0)
  # Shards of different magnitude (gradients differ per data shard), with
  # values reaching the subnormal range after scaling; 4099 elements: the
  # last ring chunk is padded.
  x = (rng.standard_normal((devices, 4099)) *
       np.exp(rng.uniform(-12, 2, (devices, 4099)))).astype(np.float32)
  out = np.asarray(_sum_fn(mesh, dtype)(x), np.float64)
  assert np.all(out == out[:1])             # the same on every device
  exact = x.astype(np.float64).sum(0)
  bound = _bound(x.astype(np.float64), dtype)
  err = np.abs(out[0] - exact)
  assert np.all(err <= bound), np.max(err / bound)
  assert np.max(err / bound) >= 1 / TIGHTNESS, np.max(err / bound)


@pytest.mark.parametrize("dtype", sorted(FORMATS))
@pytest.mark.parametrize("magnitude", [1e-30, 1e30])
def test_extreme_gradients_stay_finite(mesh, dtype, magnitude):
  # fmax / amax leaves f32's range here (bf16's fmax is ~3e38): the scale
  # must not become inf (0 * inf = NaN) or 0.
  x = np.zeros((8, 256), np.float32)
  x[:, :128] = magnitude * np.random.default_rng(2).standard_normal((8, 128))
  out = np.asarray(_sum_fn(mesh, dtype)(x), np.float64)[0]
  assert np.all(np.isfinite(out))
  assert np.all(out[128:] == 0)
  exact = x.astype(np.float64).sum(0)
  m, _ = FORMATS[dtype]
  clipped = dtype != "bfloat16" and magnitude < 1
  if clipped:
    # The scale stops at 2^MAX_SCALE_EXP: values of 1e-30 stay below FP8's
    # normal range and flush towards 0, never grow.
    assert np.all(np.abs(out) <= (1 + 2.0**-m) * np.abs(x).sum(0))
  else:   # normal-range payloads: every rounding is relative
    assert np.all(np.abs(out - exact) <= 8 * 2.0**-m * np.abs(x).sum(0))


def _fsdp_bound(x, dtype, fsdp, amax=None):
  """Bound of `scatter_over` on a (data 2, fsdp) mesh: x float64 [2 fsdp, L]
  (device g fsdp + r in row g fsdp + r), L the flat gradient; each data
  group's ring over fsdp leaves f32 partial sums, and the two groups'
  partials are each rounded once and summed (sum_over at n = 2). amax
  as in `_bound`."""
  m, sub = FORMATS[dtype]
  n = x.shape[0]
  scale = _pow2_scale(dtype, n, np.abs(x).max() if amax is None else amax)
  def rounding(v):
    return np.maximum(np.abs(v) * scale * 2.0**-(m + 1), sub / 2) / scale
  bound = np.zeros(x.shape[1])
  for g in range(2):
    rows = x[g * fsdp:(g + 1) * fsdp]
    ring = _ring_bound(rows, rounding, gathered=False)
    bound = bound + ring + rounding(np.abs(rows.sum(0)) + ring)
  return bound + n * F32_EPS * np.abs(x).sum(0)


@pytest.mark.parametrize("dtype", sorted(FORMATS) + ["float32"])
def test_fsdp_reduce_scatter_leaves_each_shard_its_block_of_the_sum(dtype):
  # (data 2, fsdp 4): a [16, 12] gradient sharded over fsdp along dim 1
  # of a [3, 16] -> moved: dim 0 here, 16 rows / 4 shards.
  fsdp = 4
  mesh = sharding.make_mesh(2, fsdp, 1)
  sizes = dict(mesh.shape)
  fn = jax.jit(jax.shard_map(
      lambda x: comm.scatter_over(x[0], 1, ("fsdp",), ("data", "fsdp"),
                                  dtype, sizes)[None],
      mesh=mesh, in_specs=P(("data", "fsdp")), out_specs=P("data", None,
                                                           "fsdp"),
      check_vma=False))
  rng = np.random.default_rng(3)
  x = (rng.standard_normal((8, 12, 16)) *
       np.exp(rng.uniform(-12, 2, (8, 12, 16)))).astype(np.float32)
  out = np.asarray(fn(x), np.float64)          # [2, 12, 16]
  assert np.all(out[0] == out[1])              # both data groups agree
  exact = x.astype(np.float64).sum(0)
  err = np.abs(out[0] - exact)
  if dtype == "float32":
    np.testing.assert_allclose(out[0], exact, rtol=8 * 8 * F32_EPS,
                               atol=1e-6)
    return
  # The ring runs over each device's block [12, 4] of the moved axis; in
  # the bound's flat order that block is one chunk: move the sharded dim
  # first, as scatter_over does.
  flat = np.moveaxis(x.astype(np.float64), 2, 1).reshape(8, -1)
  bound = np.moveaxis(_fsdp_bound(flat, dtype, fsdp).reshape(16, 12), 0, 1)
  assert np.all(err <= bound), np.max(err / bound)
  assert np.max(err / bound) >= 1 / TIGHTNESS, np.max(err / bound)


# (data, fsdp, tensor) of the tensor-parallel tests: 8 devices.
TP_MESH = (2, 2, 2)
# (microbatches, mesh) of the FSDP tests. Tensor parallelism with 2
# microbatches is under -m slow: its parts run by default (tp2 with one
# microbatch, fsdp4 with two).
LAYOUTS = [pytest.param(1, (2, 4, 1), id="1-fsdp4"),
           pytest.param(2, (2, 4, 1), id="2-fsdp4"),
           pytest.param(1, TP_MESH, id="1-tp2"),
           pytest.param(2, TP_MESH, id="2-tp2", marks=pytest.mark.slow)]


@pytest.mark.parametrize("microbatches,layout", LAYOUTS)
@pytest.mark.parametrize("dtype", ["float32", "float8_e4m3fn"])
def test_fsdp_gradient_comes_out_sharded_as_the_params(dtype, microbatches,
                                                       layout):
  # A linear least-squares loss whose gradient numpy gives in float64:
  # w [16, 8] sharded over fsdp along dim 0 (and over tensor along dim 1),
  # b [8] replicated over the batch axes (sharded over tensor); 16 rows
  # over data x fsdp. With 2 microbatches, w is reduce-scattered per
  # microbatch (each shard's rows cut in 2 contiguous halves) and b
  # reduced once.
  mesh = sharding.make_mesh(*layout)
  ways = layout[0] * layout[1]
  rng = np.random.default_rng(4)
  w = rng.standard_normal((16, 8)).astype(np.float32)
  b = rng.standard_normal(8).astype(np.float32)
  x = rng.standard_normal((16, 16)).astype(np.float32)
  specs = {"w": P("fsdp", "tensor"), "b": P("tensor")}
  named = {k: jax.sharding.NamedSharding(mesh, v) for k, v in specs.items()}

  def loss_sum(params, rows):
    r = rows["x"] @ params["w"] + params["b"]
    return jnp.sum(r * r), jnp.asarray(rows["x"].shape[0], jnp.float32)

  fn = jax.jit(lambda p, batch: comm.data_parallel_grads(
      loss_sum, p, batch, mesh=mesh, batch_axes=("data", "fsdp"),
      grad_dtype=dtype, param_specs=specs, microbatches=microbatches))
  params = {k: jax.device_put(v, named[k]) for k, v in
            {"w": w, "b": b}.items()}
  batch = {"x": jax.device_put(x, jax.sharding.NamedSharding(
      mesh, P(("data", "fsdp"))))}
  loss, grads = fn(params, batch)
  for k in grads:
    assert grads[k].sharding.is_equivalent_to(named[k], grads[k].ndim), k
  x64, w64, b64 = (v.astype(np.float64) for v in (x, w, b))
  r = x64 @ w64 + b64
  exact = {"w": 2 * x64.T @ r / 16, "b": 2 * r.sum(0) / 16}
  np.testing.assert_allclose(float(loss), (r * r).sum() / 16, rtol=1e-5)
  # f32: XLA's reductions (f32 rounding of 16-term sums). FP8: each of at
  # most 4 roundings of a partial (fsdp 4: 3 in the fsdp ring, 1 across
  # data; fsdp 2: 1 and 1; b: a ring over all batch shards, 3 and the
  # gather at 4 of them) is <= 2^-(m+1) of the sum of |addends| or half a
  # subnormal over the scale; the scale is > fmax / (2 ways amax) (room
  # for `ways` addends, rounded down to a power of two), and a device's
  # amax is at most 16 / ways rows' terms. A reduction per microbatch (w)
  # rounds relative to that microbatch's rows: the bounds of the
  # microbatches add. The scale is one per tensor: over its tensor shards
  # too.
  m, sub = FORMATS["float8_e4m3fn"]
  for k in exact:
    got = np.asarray(grads[k], np.float64)
    assert grads[k].dtype == jnp.float32
    if dtype == "float32":
      np.testing.assert_allclose(got, exact[k], rtol=1e-5, atol=1e-5)
      continue
    terms = (2 * np.abs(x64[:, :, None] * r[:, None, :]) if k == "w" else
             2 * np.abs(r))                 # per row's gradient [16, ...]
    floor = sub / 2 * 16 * 2 * terms.max() / _fmax("float8_e4m3fn")
    micro = np.arange(16) % (16 // ways) // (16 // ways // microbatches)
    groups = ([terms[micro == i] for i in range(microbatches)]
              if k == "w" else [terms])
    bound = sum(4 * np.maximum(t.sum(0) * 2.0**-(m + 1), floor) / 16
                for t in groups)
    assert np.all(np.abs(got - exact[k]) <= bound), k


def _linear_grads(mesh, specs, addends, dtype):
  """data_parallel_grads of a loss linear in the params, one batch row per
  batch shard (data x fsdp = 4): device i's gradient of leaf k is
  addends[k][i] exactly, so the result is their reduced sum / 4 (the
  token count: an exact power of two)."""
  def loss_sum(p, rows):
    return (sum(jnp.sum(p[k] * rows[k][0]) for k in sorted(p)),
            jnp.ones([], jnp.float32))

  named = lambda spec: jax.sharding.NamedSharding(mesh, spec)
  params = {k: jax.device_put(np.zeros(a.shape[1:], np.float32),
                              named(specs[k])) for k, a in addends.items()}
  batch = {k: jax.device_put(a, named(P(("data", "fsdp"))))
           for k, a in addends.items()}
  _, grads = jax.jit(lambda p, rows: comm.data_parallel_grads(
      loss_sum, p, rows, mesh=mesh, batch_axes=("data", "fsdp"),
      grad_dtype=dtype, param_specs=specs))(params, batch)
  for k in grads:
    assert grads[k].sharding.is_equivalent_to(named(specs[k]),
                                              grads[k].ndim), k
  return grads


@pytest.mark.parametrize("dtype", sorted(FORMATS))
def test_tensor_parallel_reduction_is_within_the_rounding_bound(dtype):
  # (data 2, fsdp 2, tensor 2). w [16, 12] P(fsdp, tensor): reduce-
  # scattered over fsdp (then summed over data), each tensor shard's
  # [16, 6] block on a ring of its own; v [10, 12] P(None, tensor) and b
  # [12] P(tensor): replicated over the batch axes, each tensor shard's
  # block flattened and summed on a ring over the 4 batch shards. The
  # scale is one per tensor, agreed over its tensor shards too; the
  # second tensor half is 2^-8 of the first, so a per-shard scale would
  # round it differently.
  mesh = sharding.make_mesh(*TP_MESH)
  specs = {"w": P("fsdp", "tensor"), "v": P(None, "tensor"),
           "b": P("tensor")}
  rng = np.random.default_rng(6)
  addends = {}
  for k, shape in {"w": (4, 16, 12), "v": (4, 10, 12), "b": (4, 12)}.items():
    a = rng.standard_normal(shape) * np.exp(rng.uniform(-12, 2, shape))
    a[..., 6:] *= 2.0**-8
    addends[k] = a.astype(np.float32)
  grads = _linear_grads(mesh, specs, addends, dtype)
  ratio = {}
  for k, a in addends.items():
    got = np.asarray(grads[k], np.float64) * 4
    a = a.astype(np.float64)
    amax = np.abs(a).max()
    if k == "w":      # its fsdp blocks are the flat vector's ring chunks
      bound = _fsdp_bound(a.reshape(4, -1), dtype, 2).reshape(a.shape[1:])
    else:             # each tensor shard flattens its own block
      bound = np.concatenate(
          [_bound(h.reshape(4, -1), dtype, amax).reshape(h.shape[1:])
           for h in (a[..., :6], a[..., 6:])], axis=-1)
    err = np.abs(got - a.sum(0))
    assert np.all(err <= bound), (k, np.max(err / bound))
    ratio[k] = np.max(err / bound)
  assert min(ratio.values()) >= 1 / TIGHTNESS, ratio
  # w's blocks meet the same roundings without tensor parallelism (its
  # ring slices the fsdp dim only), with the same scale: bit for bit.
  flat = _linear_grads(sharding.make_mesh(2, 2, 1, jax.devices()[:4]),
                       specs, addends, dtype)
  np.testing.assert_array_equal(np.asarray(grads["w"]),
                                np.asarray(flat["w"]))


def _toy_fsdp_step(mesh, microbatches, via_f32=False):
  """A toy model's comm gradient step on (data 2, fsdp 4) or TP_MESH: an
  embedding table e [32, 24] (looked up: read in f32), a kernel w0 [24, 8]
  the model casts to bf16 (or, `via_f32`, reads through an f32 add first,
  so it is gathered in f32: the values of gathering the master), a bf16
  kernel w1 [8, 20] and a replicated f32 gain g [20]; sharded as the
  model's (embed over fsdp; vocab and the hidden dim over tensor)."""
  specs = {"e": P("tensor", "fsdp"), "w0": P("fsdp", "tensor"),
           "w1": P("tensor", "fsdp"), "g": P()}

  def loss_sum(p, rows):
    w0 = (p["w0"] + 0.0) if via_f32 else p["w0"]
    h = jnp.take(p["e"], rows["t"], axis=0).astype(jnp.bfloat16)
    h = jnp.tanh(h @ w0.astype(jnp.bfloat16)) @ p["w1"]
    y = h.astype(jnp.float32) * p["g"]
    return jnp.sum(y * y), jnp.asarray(y.shape[0] * y.shape[1], jnp.float32)

  def step(params, batch):
    return comm.data_parallel_grads(
        loss_sum, params, batch, mesh=mesh, batch_axes=("data", "fsdp"),
        grad_dtype="float8_e4m3fn", param_specs=specs,
        microbatches=microbatches)

  rng = np.random.default_rng(5)
  params = {"e": rng.standard_normal((32, 24)).astype(np.float32),
            "w0": (rng.standard_normal((24, 8)) / 5).astype(np.float32),
            "w1": (rng.standard_normal((8, 20)) / 3).astype(jnp.bfloat16),
            "g": rng.standard_normal(20).astype(np.float32)}
  params = {k: jax.device_put(v, jax.sharding.NamedSharding(mesh, specs[k]))
            for k, v in params.items()}
  batch = {"t": jax.device_put(
      rng.integers(0, 32, (16, 4)).astype(np.int32),
      jax.sharding.NamedSharding(mesh, P(("data", "fsdp"))))}
  return step, params, batch


def _body_arrays(jaxpr):
  """(shape, dtype) of every value inside the shard_map of `jaxpr`,
  nested jaxprs (scan bodies, the custom_vjp's backward) included."""
  def walk(j):
    for v in j.invars:
      yield tuple(v.aval.shape), jnp.dtype(v.aval.dtype)
    for eqn in j.eqns:
      for v in eqn.outvars:
        if hasattr(v.aval, "shape"):
          yield tuple(v.aval.shape), jnp.dtype(v.aval.dtype)
      for sub in jax_core.jaxprs_in_params(eqn.params):
        yield from walk(sub)
  (body,) = [sub for eqn in jaxpr.eqns if eqn.primitive.name == "shard_map"
             for sub in jax_core.jaxprs_in_params(eqn.params)]
  return set(walk(body))


@pytest.mark.parametrize("microbatches,layout", LAYOUTS)
def test_fsdp_holds_no_full_size_f32_of_a_leaf_read_in_bf16(microbatches,
                                                            layout):
  mesh = sharding.make_mesh(*layout)
  _, fsdp, tp = layout
  step, params, batch = _toy_fsdp_step(mesh, microbatches)
  arrays = _body_arrays(jax.make_jaxpr(step)(params, batch).jaxpr)
  f32 = {s for s, d in arrays if d == jnp.float32}
  bf16 = {s for s, d in arrays if d == jnp.bfloat16}
  # The kernels read in bf16: gathered (and their cotangents) in bf16, no
  # f32 copy of the full shape: not the parameter, not the gradient, not a
  # microbatch accumulator; f32 only shard-sized (the reduced gradient).
  # With tensor parallelism the gather and the reduction run on each
  # device's tensor shard (a nested shard_map: local shapes): there, the
  # whole (over fsdp) tensor shard is bf16 only, and so is the kernel's
  # full shape in the step's body (global over tensor).
  w0, w1 = (24, 8 // tp), (8 // tp, 20)
  assert w0 in bf16 and w1 in bf16
  for full in {w0, w1, (24, 8), (8, 20)}:
    assert full not in f32, (full, sorted(f32))
  assert (24 // fsdp, 8 // tp) in f32 and (8 // tp, 20 // fsdp) in f32
  # The embedding's lookup reads it in f32 (its backward sums the rows of
  # repeated tokens in f32): full-size f32 there, which shows the scan
  # sees such arrays where they exist.
  assert (32 // tp, 24) in f32
  # ... as it sees the f32 gather of a kernel read through an f32 op.
  step32, _, _ = _toy_fsdp_step(mesh, microbatches, via_f32=True)
  assert w0 in {s for s, d in _body_arrays(
      jax.make_jaxpr(step32)(params, batch).jaxpr) if d == jnp.float32}


def _collectives(text, dtype=None):
  """The result types of the StableHLO collectives in `text` that move
  data (all_gather, collective_permute), of `dtype` ("f8E4M3FN", "bf16",
  ...) if given."""
  out = []
  for line in text.splitlines():
    if ("stablehlo.all_gather" in line or
        "stablehlo.collective_permute" in line):
      result = line.split("->")[-1]
      if dtype is None or f"x{dtype}>" in result:
        out.append(result.strip())
  return out


def test_the_lowered_tensor_parallel_step_moves_fp8_tensor_shards():
  # The toy step on TP_MESH: each sharded leaf's reduction is 1 ring step
  # over fsdp 2 and the data all-gather of the two partials, its gather
  # one all-gather over fsdp; the replicated gain's, 3 ring steps over the
  # 4 batch shards and an all-gather. Every payload is a tensor shard's:
  # XLA adds no collective of its own to move one (its only ones are the
  # model's tensor-parallel all-reduces).
  mesh = sharding.make_mesh(*TP_MESH)
  step, params, batch = _toy_fsdp_step(mesh, 1)
  lowered = jax.jit(step).lower(params, batch)
  text = lowered.as_text()
  fp8 = _collectives(text, "f8E4M3FN")
  assert len(fp8) == 3 * (1 + 1) + (3 + 1), fp8
  assert len(_collectives(text)) == len(fp8) + 3
  # The gathers: e in f32 (vocab over tensor: [16, 12] -> [16, 24]), the
  # kernels in bf16; each a tensor shard, gathered over fsdp.
  assert sorted(set(_collectives(text)) - set(fp8)) == sorted([
      "tensor<16x24xf32>", "tensor<24x4xbf16>", "tensor<4x20xbf16>"])
  # The FP8 payloads: blocks of the tensor shards [16, 12], [12, 4],
  # [4, 10] (ring step; then both data groups' gathered) and of the gain.
  assert sorted(set(fp8)) == sorted([
      "tensor<16x12xf8E4M3FN>", "tensor<2x16x12xf8E4M3FN>",
      "tensor<12x4xf8E4M3FN>", "tensor<2x12x4xf8E4M3FN>",
      "tensor<4x10xf8E4M3FN>", "tensor<2x4x10xf8E4M3FN>",
      "tensor<5xf8E4M3FN>", "tensor<20xf8E4M3FN>"]), fp8
  assert not any("all_reduce" in l and "f8E4M3FN" in l
                 for l in text.splitlines())
  assert "reduce_scatter" not in text
  # What XLA's partitioner inserted (tensor parallelism inside the step):
  # all-reduces only, none that gathers or moves a parameter or gradient.
  added = [l for l in lowered.compile().as_text().splitlines()
           if "is_spmd_generated" in l and " = " in l and any(
               f" {op}(" in l or f" {op}-start(" in l for op in (
                   "all-gather", "collective-permute", "all-to-all",
                   "reduce-scatter", "all-reduce"))]
  assert added and all(" all-reduce" in l for l in added), added


@pytest.mark.parametrize("microbatches,layout", LAYOUTS)
def test_gathering_in_the_read_dtype_changes_no_value(microbatches, layout):
  # The bf16 gather of w0 against its f32 gather (the master, cast by
  # the model): the model sees the same bf16 values, and the cotangent is
  # the same bf16 values, widened chunk by chunk or at once.
  mesh = sharding.make_mesh(*layout)
  step, params, batch = _toy_fsdp_step(mesh, microbatches)
  step32, _, _ = _toy_fsdp_step(mesh, microbatches, via_f32=True)
  loss, grads = jax.jit(step)(params, batch)
  loss32, grads32 = jax.jit(step32)(params, batch)
  assert float(loss) == float(loss32)
  for k in grads:
    assert grads[k].dtype == jnp.float32, k      # the bf16 master's too
    assert grads[k].sharding.is_equivalent_to(params[k].sharding, 2), k
    np.testing.assert_array_equal(np.asarray(grads[k]),
                                  np.asarray(grads32[k]), err_msg=k)


def test_a_leaf_is_read_narrow_only_through_one_cast():
  # The dtype a gather may move without changing a value or a cotangent:
  # one cast to a narrower float (through calls and pass-throughs) and
  # nothing else; repeated, looped, returned or widening reads keep the
  # leaf's own.
  bf16, f32 = jnp.bfloat16, jnp.float32

  def loss(p, x):
    a, b, c, d, e, f, g = p
    inner = jax.jit(lambda w, v: (w, v.astype(bf16)))     # passes w through
    a_out, b16 = inner(a, b)
    y = jnp.sum(jax.checkpoint(lambda w: w.astype(bf16))(a_out) * x)
    y = y + jnp.sum(b16) + jnp.sum(c.astype(bf16)) + jnp.sum(c.astype(bf16))
    y = y + jax.lax.scan(lambda s, _: (s + d.astype(bf16).sum(), None),
                         jnp.zeros([], bf16), None, length=2)[0]
    y = y + jnp.sum(f.astype(jnp.float32)) + jnp.sum(g.astype(f32))
    return y, e

  leaf = jax.ShapeDtypeStruct((4,), f32)
  params = [leaf] * 5 + [jax.ShapeDtypeStruct((4,), bf16), leaf]
  got = comm.read_dtypes(loss, params, jax.ShapeDtypeStruct((4,), bf16))
  assert got == [bf16, bf16, f32, f32, f32, bf16, f32], got


@pytest.mark.parametrize("remat,tie", [("none", False), ("full", False),
                                       ("quantized", False), ("none", True)])
def test_the_model_reads_kernels_in_bf16_and_the_embedding_in_f32(remat, tie):
  """What the FSDP gathers move, on the real model (its jaxpr, no FLOPs):
  kernels in the compute dtype through any remat policy; the embedding
  (a lookup, and with tied embeddings also the LM head) and the norm
  gains in f32."""
  c = demo.get_config("smoke,recipe=fp4_paper")
  c = harness.set_keys(c, {"model.n_layers": 1, "model.remat": remat,
                           "model.tie_embeddings": tie,
                           "model.compute_dtype": "bfloat16"})
  model_cfg = runconfig.model_config(c.model.to_dict(), c.data.vocab_size)
  rules, _ = runconfig.quant_rules(c.quant)
  model = nnx.eval_shape(lambda: llama.Llama(
      model_cfg, rules=rules, rngs=nnx.Rngs(params=jax.random.key(0))))
  graphdef, params = nnx.split(model, nnx.Param)
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  rows = jax.ShapeDtypeStruct((2, 8), jnp.int32)

  def loss(leaves, tokens, key):
    logits = nnx.merge(graphdef, treedef.unflatten(leaves))(tokens, key=key)
    return jnp.sum(logits)

  reads = comm.read_dtypes(loss, [v for _, v in flat], rows,
                           jax.eval_shape(lambda: jax.random.key(0)))
  got = {sharding.path_str(p): r for (p, _), r in zip(flat, reads)}
  kernels = {p for p in got if ".kernel" in p}
  assert len(kernels) == 7 + (not tie), sorted(got)
  for p, dtype in got.items():
    assert dtype == (jnp.bfloat16 if p in kernels else jnp.float32), p


def test_f32_is_a_plain_psum(mesh):
  x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
  out = np.asarray(_sum_fn(mesh, "float32")(x))
  np.testing.assert_allclose(out[0], x.astype(np.float64).sum(0),
                             rtol=8 * F32_EPS * 10, atol=1e-6)


def test_bad_dtype_and_layouts_are_one_line(mesh):
  with pytest.raises(ValueError, match="comm.grad_dtype must be one of"):
    comm.check("float16", mesh)
  # Every mesh is fine: tensor parallelism included.
  tp = sharding.make_mesh(*TP_MESH)
  for m in (tp, sharding.make_mesh(4, 2, 1), sharding.make_mesh(4, 1, 2)):
    comm.check("float8_e4m3fn", m)
  # The model's layouts too (a kernel over fsdp and tensor, the embedding
  # over tensor and fsdp, a norm replicated).
  good = {"k": P("fsdp", "tensor"), "e": P("tensor", "fsdp"), "n": P(None)}
  comm.check("float8_e4m3fn", tp, good)
  # What the step cannot split stays a one-line refusal: one dim over a
  # batch axis and tensor (the gather would interleave them), a leaf over
  # batch axes along two dims; from check and from the step itself.
  x = jax.device_put(np.zeros((8, 16), np.float32))
  for spec, why in ((P(("fsdp", "tensor")), "both batch axes"),
                    (P("fsdp", "data"), "more than one dim")):
    with pytest.raises(ValueError, match=rf"^comm: [^\n]*{why}[^\n]*$"):
      comm.check("float8_e4m3fn", tp, {**good, "k": spec})
    with pytest.raises(ValueError) as err:   # (jax notes its traceback)
      jax.eval_shape(lambda p, rows: comm.data_parallel_grads(
          lambda p, r: (jnp.sum(p["k"]) * jnp.sum(r["x"]), jnp.ones([])),
          p, rows, mesh=tp, batch_axes=("data", "fsdp"),
          grad_dtype="float8_e4m3fn", param_specs={"k": spec}),
          {"k": x}, {"x": x})
    assert re.fullmatch(rf"comm: [^\n]*{why}[^\n]*", str(err.value))
    comm.check("float32", tp, {"k": spec})    # XLA's own reduction


def _config(grad_dtype, steps, fsdp=1, compute="float32", tensor=1):
  c = demo.get_config("smoke,recipe=bf16")
  return harness.set_keys(c, {
      "mesh.data": 8 // fsdp // tensor, "mesh.fsdp": fsdp,
      "mesh.tensor": tensor,
      "model.n_layers": 1, "model.compute_dtype": compute,
      "num_steps": steps, "log_every": steps, "eval_steps": 0,
      "checkpoint_every": 1000, "comm.grad_dtype": grad_dtype,
      "optim.warmup_frac": 0.0})


@functools.lru_cache(maxsize=None)
def _trainer(grad_dtype, steps, fsdp=1, compute="float32", tensor=1):
  cfg = _config(grad_dtype, steps, fsdp, compute, tensor)
  model_cfg = runconfig.model_config(cfg.model.to_dict(), cfg.data.vocab_size)
  rules, _ = runconfig.quant_rules(cfg.quant)
  return train._make_trainer(  # pylint: disable=protected-access
      model_cfg, rules, train.optim.OptimConfig(**cfg.optim.to_dict()),
      num_steps=steps,
      mesh=sharding.make_mesh(8 // fsdp // tensor, fsdp, tensor),
      global_batch=cfg.data.global_batch, seq_len=cfg.data.seq_len,
      seed=cfg.seed, comm_dtype=grad_dtype)


def test_the_lowered_step_moves_fp8_on_its_collectives():
  hlo = _trainer("float8_e4m3fn", 50).train_step_hlo.splitlines()
  moves = [l for l in hlo if "stablehlo.all_gather" in l or
           "stablehlo.collective_permute" in l]
  fp8 = [l for l in moves if "f8E4M3FN>" in l.split("->")[-1]]
  # Per gradient leaf (the tiny 1-layer model has 12) on 8 devices: 7 ring
  # steps and one all-gather, each moving the 1-byte payload.
  leaves = len(jax.tree.leaves(_trainer("float8_e4m3fn", 50)
                               .abstract_state.params))
  assert leaves == 12
  assert len(fp8) == len(moves) == 8 * leaves, "\n".join(moves[:3])
  # No reduction ever accumulates in FP8.
  assert not any("all_reduce" in l and "f8E4M3FN" in l for l in hlo)


def test_the_lowered_fsdp_step_scatters_fp8_onto_the_param_shards():
  trainer = _trainer("float8_e4m3fn", 50, 4)
  hlo = trainer.train_step_hlo.splitlines()
  specs = jax.tree.leaves(jax.tree.map(lambda sh: sh.spec,
                                       trainer.state_shardings.params),
                          is_leaf=lambda s: isinstance(s, P))
  sharded = sum("fsdp" in str(s) for s in specs)
  # The tiny model: 9 kernels and embeddings sharded over fsdp, 3 norms not.
  assert (sharded, len(specs)) == (9, 12), specs
  fp8 = [l for l in hlo if ("stablehlo.all_gather" in l or
                            "stablehlo.collective_permute" in l) and
         "f8E4M3FN>" in l.split("->")[-1]]
  # Sharded leaf: 3 ring steps over fsdp 4, then data 2's all-gather of
  # the two partials; replicated leaf: 7 ring steps over all 8 devices
  # and the all-gather of the sums.
  assert len(fp8) == sharded * (3 + 1) + (12 - sharded) * 8, len(fp8)
  gathers = [l for l in hlo if "stablehlo.all_gather" in l and
             "f32>" in l.split("->")[-1]]
  assert len(gathers) == sharded     # each sharded param gathered once
  assert not any("all_reduce" in l and "f8E4M3FN" in l for l in hlo)
  assert not any("reduce_scatter" in l for l in hlo)


def test_the_lowered_bf16_fsdp_step_gathers_the_kernels_in_bf16():
  # bf16 compute: the 8 kernels are gathered as the model reads them; the
  # embedding (a row lookup) in f32. The reduction is unchanged.
  hlo = _trainer("float8_e4m3fn", 50, 4, "bfloat16").train_step_hlo
  gathers = [l.split("->")[-1] for l in hlo.splitlines()
             if "stablehlo.all_gather" in l and "f8E4M3FN>" not in l]
  assert sum("bf16>" in l for l in gathers) == 8, gathers
  assert sum("f32>" in l for l in gathers) == 1, gathers
  fp8 = [l for l in hlo.splitlines() if ("stablehlo.all_gather" in l or
                                         "stablehlo.collective_permute" in l)
         and "f8E4M3FN>" in l.split("->")[-1]]
  assert len(fp8) == 9 * (3 + 1) + 3 * 8, len(fp8)


def _numel(result_type):
  """Elements of a StableHLO result type "tensor<2x32x64xf8E4M3FN>"."""
  return math.prod(int(d) for d in result_type.split("<")[1].split("x")[:-1])


def test_the_lowered_tensor_parallel_step_scatters_fp8_onto_the_param_shards():
  # data 2 x fsdp 2 x tensor 2, bf16 compute. The model runs tensor-
  # parallel inside the step (XLA's partitioning); the gathers and the FP8
  # reduction run on each device's tensor shard.
  trainer = _trainer("float8_e4m3fn", 50, 2, "bfloat16", 2)
  hlo = trainer.train_step_hlo
  specs = jax.tree.leaves(jax.tree.map(lambda sh: sh.spec,
                                       trainer.state_shardings.params),
                          is_leaf=lambda s: isinstance(s, P))
  sizes = [math.prod(p.shape) for p in
           jax.tree.leaves(trainer.abstract_state.params)]
  # The tiny model: 9 kernels and embeddings over fsdp and tensor, 3 norms
  # replicated.
  assert [("fsdp" in str(s), "tensor" in str(s)) for s in specs].count(
      (True, True)) == 9 and len(specs) == 12, specs
  fp8 = _collectives(hlo, "f8E4M3FN")
  gathers = [r for r in _collectives(hlo) if r not in fp8]
  # Sharded leaf: 1 ring step over fsdp 2 moving a quarter of it (its
  # fsdp block of its tensor shard), then data 2's all-gather of the two
  # partials; replicated leaf: 3 ring steps over the 4 batch shards and
  # the all-gather of the sums. Each sharded leaf gathered once, its
  # tensor shard only (half of it): kernels in bf16, the embedding in f32.
  want = sorted([n // 4 for n, s in zip(sizes, specs) if "fsdp" in str(s)]
                + [2 * n // 4 for n, s in zip(sizes, specs)
                   if "fsdp" in str(s)]
                + [n // 4 for n, s in zip(sizes, specs)
                   if "fsdp" not in str(s) for _ in range(3)]
                + [n for n, s in zip(sizes, specs) if "fsdp" not in str(s)])
  assert sorted(_numel(r) for r in fp8) == want, fp8
  assert sorted(_numel(r) for r in gathers) == sorted(
      n // 2 for n, s in zip(sizes, specs) if "fsdp" in str(s)), gathers
  assert sum("bf16>" in r for r in gathers) == 8, gathers
  assert not any("all_reduce" in l and "f8E4M3FN" in l
                 for l in hlo.splitlines())
  assert "reduce_scatter" not in hlo
  # XLA's partitioner adds only the model's tensor-parallel all-reduces
  # (and the optimizer's norms): nothing that gathers a parameter or a
  # gradient over tensor.
  added = [l for l in trainer.train_step.as_text().splitlines()
           if "is_spmd_generated" in l and any(
               f" {op}(" in l or f" {op}-start(" in l for op in (
                   "all-gather", "collective-permute", "all-to-all",
                   "reduce-scatter"))]
  assert not added, added


# Replicated parameters (1, 1) under -m slow: their FP8 collectives and
# the reduction's bound are checked by default on the lowered step and the
# toy model; (4, 1) trains through the FSDP path, which holds more.
@pytest.mark.parametrize("fsdp,tensor", [
    pytest.param(1, 1, marks=pytest.mark.slow), (4, 1),
    pytest.param(2, 2, marks=pytest.mark.slow)])
def test_fp8_communication_trains_like_f32(tmp_path, fsdp, tensor):
  losses = {}
  for dtype in ("float32", "bfloat16", "float8_e4m3fn"):
    state = train.train_and_evaluate(_config(dtype, 50, fsdp, tensor=tensor),
                                     str(tmp_path / dtype))
    del state
    rec = (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()[-1]
    losses[dtype] = float(__import__("json").loads(rec)["loss"])
  f32 = losses["float32"]
  for dtype in ("bfloat16", "float8_e4m3fn"):
    assert abs(losses[dtype] - f32) <= FP8_COMM_LOSS_RTOL * f32, losses


@pytest.mark.slow   # ~50-80 s; distributed_test runs 2 processes by default
@pytest.mark.parametrize("fsdp,tensor", [(4, 1), (2, 2)])
def test_two_processes_reduce_fp8_like_one(tmp_path, fsdp, tensor):
  """data 2 x fsdp 4 (or x fsdp 2 x tensor 2) over 2 processes of 4 CPU
  devices each (the FSDP ring, or the data all-gather, crosses the process
  boundary) with 2 microbatches (a reduce-scatter per microbatch), against
  the same run on 8 devices of one process."""
  args = ("--config=configs/demo.py:smoke,recipe=bf16", "--config.log_every=1",
          "--config.model.compute_dtype=float32", "--config.eval_steps=0",
          "--config.comm.grad_dtype=float8_e4m3fn", "--config.mesh.data=2",
          f"--config.mesh.fsdp={fsdp}", f"--config.mesh.tensor={tensor}",
          "--config.data.global_batch=16", "--config.optim.grad_accum=2")
  env = faults._env()   # pylint: disable=protected-access
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
  r = subprocess.run([sys.executable, "-m", "fp4jax.main", *args,
                      f"--workdir={tmp_path / 'one'}"], cwd=faults.ROOT,
                     env=env, capture_output=True, text=True, timeout=600,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  env = faults._env()   # pylint: disable=protected-access
  env.update(PYTHON=sys.executable, DEVICES_PER_PROCESS="4")
  r = subprocess.run([str(faults.ROOT / "experiments" / "launch_local.sh"),
                      "2", *args, f"--workdir={tmp_path / 'two'}"],
                     cwd=faults.ROOT, env=env, capture_output=True, text=True,
                     timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "process 1 of 2" in r.stderr and "process 0 of 2" in r.stderr

  def losses(name):
    recs = [json.loads(l) for l in
            (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in recs if "loss" in r}

  one, two = losses("one"), losses("two")
  assert sorted(one) == sorted(two) == list(range(1, 7))
  for step, loss in one.items():
    assert abs(two[step] - loss) <= PROCESS_LOSS_RTOL * loss, (step, one, two)
