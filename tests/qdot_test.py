"""qmatmul forward and both gradients vs the float64 recipe composition."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from fp4jax import gemm
from fp4jax import qconfig
from fp4jax import qdot
import np_ref

M, K, N = 32, 128, 48
# Inputs are float32 so no bf16 cast enters: quantized operands are grid
# values times scales, identical in the implementation and the oracle once no
# element sits within float32 rounding of a threshold (ensured by nudging
# inputs NUDGE_REL away from every threshold: >> the 2 f32 roundings, 2.4e-7,
# of sf = MAX/amax and x*sf). What remains is float32 arithmetic: dividing by
# the scales and accumulating over K (or M) terms, bounded relative to
# sum_k |a_ik||b_kj| by ~K * 2^-24 = 7.6e-6 worst case for K = 128.
NUDGE_REL = 1e-5
GEMM_RTOL = 2e-5
# The weight gradient is also multiplied by f'(W*sw), evaluated in f32 at a
# scaled weight carrying the f32 rounding of sw. Where f' is below its cap,
# t = |2u/delta - 1| >= 0.034 and d(log f')/dt = 0.8/t, so a 1e-7 relative
# input error gives <= ~2e-5 relative; the cap region is flat.
DGE_RTOL = 3e-5
# bf16 rounds to nearest with 8 significant bits: unit roundoff 2^-8. bf16
# recipe on bf16 inputs: operands exact, f32 accumulation, one rounding of the
# output to bf16 (2^-8 relative). impl="fast" GEMMs take bf16 operands:
# operands that are not bf16-exact (the raw weight and the residual of the
# compensation GEMMs, dequantized operands and gradients whose scales do not
# factor out of the contraction) are rounded once each, so a product of two
# rounded operands is off by up to (1 + 2^-8)^2 - 1 < 2^-7 of its magnitude
# (reached when one term dominates a sum, e.g. a single clamped outlier in
# the residual's weight gradient).
BF16_RTOL = 2.0 ** -7
# jit vs eager: XLA fuses differently (reciprocal-multiply vs divide, FMA), a
# few f32 ulps on the results.
JIT_RTOL = 1e-6
# Loose sanity bounds on relative Frobenius error vs the exact f64 product,
# for recipes whose exact composition is not re-derived here (block-scaled
# MX/NV formats), and floors proving that each recipe does quantize.
FP4_REL_ERR_MAX = 0.25
FP4_REL_ERR_MIN = 1e-2
FP8_REL_ERR_MIN = 1e-3

_SPEC_OF = {
    "fp4_paper": np_ref.FP4_PAPER,
    "w4a4_direct": np_ref.W4A4_DIRECT,
    "fp4_code": np_ref.FP4_CODE,
    "fp8": np_ref.FP8,
    "w4a8": np_ref.W4A8,
    "w8a4": np_ref.W8A4,
}

# (recipe name, overrides, oracle spec) triples checked against the oracle;
# the run-level keys among the overrides (impl, sparse_impl) go to an
# Execution (qconfig.split_overrides).
_CASES = [(name, {}, spec) for name, spec in _SPEC_OF.items()] + [
    ("fp4_paper", {"occ_alpha": 0.97},
     np_ref.MatmulSpec(occ_alpha=0.97)),
    ("fp4_paper", {"dge_k": 3.0}, np_ref.MatmulSpec(dge_k=3.0)),
    ("fp4_paper", {"compensation": "dense"},
     np_ref.MatmulSpec(compensation="dense")),
    ("fp4_paper", {"compensation": "none"},
     np_ref.MatmulSpec(compensation="none")),
    ("fp4_paper", {"weight_axis": "in"}, np_ref.MatmulSpec(w_axis=1)),
    ("fp4_paper", {"pow2": True}, np_ref.MatmulSpec(pow2=True)),
    # rne and paper differ only on exact ties, which the nudged inputs avoid
    # (numerics_test covers ties); this checks the override is accepted.
    ("fp4_paper", {"rounding": "rne"}, np_ref.MatmulSpec(mode="rne")),
    ("fp4_paper", {"impl": "fast"}, np_ref.FP4_PAPER),
    ("fp4_paper", {"impl": "reference"}, np_ref.FP4_PAPER),
    # The compensation products as ELL gathers: the same oracle.
    ("fp4_paper", {"sparse_impl": "ell"}, np_ref.FP4_PAPER),
]


def _near_threshold(s, fmt):
  """Mask of scaled values within NUDGE_REL (relative) of a threshold."""
  t = np_ref.midpoints(fmt)
  i = np.clip(np.searchsorted(t, s), 1, len(t) - 1)
  d = np.minimum(np.abs(s - t[i - 1]), np.abs(s - t[i]))
  return d <= NUDGE_REL * np.abs(s)


def _nudge(a, scaled_of, fmt):
  """Scales elements of `a` until none scales to within NUDGE_REL of a tie."""
  if fmt is None:
    return a
  for _ in range(100):
    bad = _near_threshold(scaled_of(a), fmt)
    if not bad.any():
      return a
    a = np.where(bad, a * np.float32(1 + 4 * NUDGE_REL), a).astype(a.dtype)
  raise AssertionError("could not move the inputs off the thresholds")


def _assert_pow2_unambiguous(a, fmt, axis):
  """floor(log2(MAX/amax)) must not sit on a float32 rounding edge."""
  amax = np.max(np.abs(a.astype(np.float64)), axis=axis)
  lg = np.log2(np_ref.max_value(fmt) / amax)
  assert np.all(np.abs(lg - np.round(lg)) > 1e-5), "re-pick the seed"


def _inputs(spec, seed=0):
  rng = np.random.default_rng(seed)
  # Heavy tails make OCC clamp something in every row.
  x = rng.standard_t(df=3, size=(M, K)).astype(np.float32)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  g = rng.standard_normal((M, N)).astype(np.float32)
  x = _nudge(x, lambda a: np_ref.x_operand(a, spec)[2], spec.x_fmt)
  w = _nudge(w, lambda a: np_ref.w_operand(a, spec)[1], spec.w_fmt)
  g = _nudge(g, lambda a: a * np_ref.scales(a, spec.g_fmt, axis=None),
             spec.g_fmt)
  if spec.pow2:
    xc = x if spec.occ_alpha is None else np_ref.occ_clamp(x, spec.occ_alpha)[0]
    _assert_pow2_unambiguous(xc, spec.x_fmt, -1)
    _assert_pow2_unambiguous(w, spec.w_fmt, spec.w_axis)
  return x, w, g


def _recipe_and_run(name, overrides):
  """(Recipe, Execution) of a named recipe with overrides, run-level keys
  (impl, accumulation, sparse_impl) taken out for the Execution."""
  rec, run, _ = qconfig.split_overrides(overrides)
  return qdot.get_recipe(name, **rec), qdot.Execution(**run)


@functools.lru_cache(maxsize=None)
def _vjp_fn(recipe, execution=None):
  """Jitted (x, w, g) -> (y, dx, dw) for a (hashable) Recipe."""
  def f(x, w, g):
    y, vjp = jax.vjp(lambda a, b: qdot.qmatmul(a, b, recipe,
                                               execution=execution), x, w)
    dx, dw = vjp(g)
    return y, dx, dw
  return jax.jit(f)


def _run(recipe, x, w, g, execution=None):
  y, dx, dw = _vjp_fn(recipe, execution)(jnp.asarray(x), jnp.asarray(w),
                                         jnp.asarray(g))
  assert y.dtype == x.dtype and dx.dtype == x.dtype and dw.dtype == w.dtype
  return tuple(np.asarray(v.astype(jnp.float32), np.float64)
               for v in (y, dx, dw))


def _assert_within(got, want, mag, rtol, what):
  err = np.abs(got - want)
  bound = rtol * mag
  bad = err > bound
  assert not bad.any(), (
      f"{what}: {bad.sum()} of {bad.size} elements off; worst "
      f"err/mag = {np.max(err / np.maximum(mag, 1e-30)):.3g} > {rtol}")


# ------------------------------------------------------- vs the oracle
def _case_id(case):
  name, overrides, _ = case
  return "-".join([name] + [f"{k}={v}" for k, v in overrides.items()])


@pytest.mark.parametrize("name,overrides,spec", _CASES,
                         ids=[_case_id(c) for c in _CASES])
def test_matches_float64_composition(name, overrides, spec):
  recipe, run = _recipe_and_run(name, overrides)
  x, w, g = _inputs(spec)
  y, dx, dw = _run(recipe, x, w, g, run)
  want_y, want_dx, want_dw, mag = np_ref.qmatmul(x, w, g, spec)
  # "auto" means "reference" on CPU and "fast" elsewhere.
  fast = run.impl == "fast" or (run.impl == "auto"
                                and jax.default_backend() != "cpu")
  rtol = BF16_RTOL if fast else GEMM_RTOL
  _assert_within(y, want_y, mag["y"], rtol, "y")
  _assert_within(dx, want_dx, mag["dx"], rtol, "dx")
  _assert_within(dw, want_dw, mag["dw"], rtol + DGE_RTOL, "dw")


# The oracle comparisons above must be able to fail: every recipe choice they
# cover changes the result far beyond the tolerances on these inputs.
@pytest.mark.parametrize("alt", [
    dict(occ_alpha=None), dict(occ_alpha=0.97), dict(compensation="none"),
    dict(compensation="dense"), dict(dge_k=None), dict(dge_k=3.0),
    dict(pow2=True), dict(w_axis=1), dict(g_fmt=None),
])
def test_oracle_choices_are_distinguishable(alt):
  base = np_ref.FP4_PAPER
  other = dataclasses.replace(base, **alt)
  x, w, g = _inputs(base)
  a = np_ref.qmatmul(x, w, g, base)
  b = np_ref.qmatmul(x, w, g, other)
  margins = []
  for i, key in enumerate(("y", "dx", "dw")):
    margins.append(np.max(np.abs(a[i] - b[i]) / (a[3][key] + 1e-30)))
  assert max(margins) > 100 * (GEMM_RTOL + DGE_RTOL), (alt, margins)


def test_sparse_backward_differs_from_dge_on_the_residual():
  """The paper's forward Q(Xc) Q(W) + R W has its own derivative: the
  formula that ran before (DGE and Q(W) applied to the residual term too)
  is far outside the oracle comparison's tolerance on these inputs."""
  spec = np_ref.FP4_PAPER
  x, w, g = _inputs(spec)
  _, dx, dw, mag = np_ref.qmatmul(x, w, g, spec)
  xq, dres, _ = np_ref.x_operand(x, spec)
  wq, ws = np_ref.w_operand(w, spec)
  gq = np_ref.grad_operand(g, spec)
  dge = np_ref.dge_derivative(ws, spec.dge_k, spec.dge_cap, spec.w_fmt)
  old_dw = ((xq + dres).T @ gq) * dge
  old_dx = gq @ wq.T
  rel = np.linalg.norm(old_dw - dw) / np.linalg.norm(dw)
  assert rel > 0.05, rel
  assert np.max(np.abs(old_dx - dx) / mag["dx"]) > 100 * GEMM_RTOL
  # Kept entries of dX still see only Q(W).
  kept = dres == 0
  np.testing.assert_array_equal(dx[kept], old_dx[kept])


def test_dge_only_is_exact_but_for_the_weight_gradient_factor():
  spec = np_ref.MatmulSpec(x_fmt=None, occ_alpha=None, compensation="none")
  x, w, g = _inputs(spec)   # nudged off the E2M1 thresholds of W * sw
  y, dx, dw = _run(qdot.get_recipe("dge_only"), x, w, g)
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  ws = np_ref.w_operand(w64, spec)[1]          # W * sw, per out-channel
  dge = np_ref.dge_derivative(ws, 5.0, 3.0, "e2m1")
  _assert_within(y, x64 @ w64, np.abs(x64) @ np.abs(w64), GEMM_RTOL, "y")
  _assert_within(dx, g64 @ w64.T, np.abs(g64) @ np.abs(w64.T), GEMM_RTOL,
                 "dx")
  _assert_within(dw, (x64.T @ g64) * dge, (np.abs(x64.T) @ np.abs(g64)) * dge,
                 GEMM_RTOL + DGE_RTOL, "dw")
  assert np.ptp(dge) > 1.0   # the factor varies: the check can fail


# ---------------------------------------------------------- plain recipes
def _assert_plain(outs, x, w, g, rtol):
  """y, dx, dw of an unquantized matmul vs float64, bounded per element."""
  y, dx, dw = outs
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  _assert_within(y, x64 @ w64, np.abs(x64) @ np.abs(w64), rtol, "y")
  _assert_within(dx, g64 @ w64.T, np.abs(g64) @ np.abs(w64.T), rtol, "dx")
  _assert_within(dw, x64.T @ g64, np.abs(x64.T) @ np.abs(g64), rtol, "dw")


@pytest.mark.parametrize("recipe", ["bf16", None])
def test_plain_f32(recipe):
  x, w, g = _inputs(np_ref.MatmulSpec(x_fmt=None, w_fmt=None, g_fmt=None,
                                      occ_alpha=None))
  _assert_plain(_run(recipe, x, w, g), x, w, g, GEMM_RTOL)


def test_bf16_recipe_on_bf16_inputs():
  x, w, g = (a.astype(ml_dtypes.bfloat16) for a in _inputs(np_ref.FP4_PAPER))
  _assert_plain(_run("bf16", x, w, g), x, w, g, BF16_RTOL)


# ------------------------------------------ every named recipe quantizes
def _rel_err(a, b):
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("name", ["fp8", "w4a4_direct", "w4a8", "w8a4",
                                  "fp4_paper", "fp4_code", "mxfp4", "nvfp4"])
def test_named_recipes_quantize_within_bounds(name):
  rng = np.random.default_rng(11)
  x = rng.standard_normal((M, K)).astype(np.float32)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  g = rng.standard_normal((M, N)).astype(np.float32)
  recipe = qdot.get_recipe(name)
  assert recipe.quantizes
  key = jax.random.key(3) if recipe.needs_key else None

  @jax.jit
  def f(x, w, g, key):
    y, vjp = jax.vjp(lambda a, b: qdot.qmatmul(a, b, recipe, key=key), x, w)
    return (y,) + vjp(g)

  got = [np.asarray(v, np.float64) for v in f(x, w, g, key)]
  x64, w64, g64 = (a.astype(np.float64) for a in (x, w, g))
  exact = [x64 @ w64, g64 @ w64.T, x64.T @ g64]
  floor = FP8_REL_ERR_MIN if name == "fp8" else FP4_REL_ERR_MIN
  for what, a, b in zip(("y", "dx", "dw"), got, exact):
    assert np.all(np.isfinite(a)), what
    if what == "dw" and recipe.dge is not None:
      continue    # DGE reweights dw by f' in [1/k, cap]: not an approximation
    err = _rel_err(a, b)
    assert err <= FP4_REL_ERR_MAX, (name, what, err)
  # The forward of every named recipe quantizes something.
  assert _rel_err(got[0], exact[0]) >= floor, (name, _rel_err(got[0],
                                                              exact[0]))


def test_stochastic_recipe_needs_key_and_is_deterministic_given_it():
  x, w, g = _inputs(np_ref.FP4_PAPER)
  r = qdot.get_recipe("nvfp4")
  assert r.needs_key
  with pytest.raises(ValueError, match="key"):
    qdot.qmatmul(jnp.asarray(x), jnp.asarray(w), r)

  @jax.jit
  def f(key):
    y, vjp = jax.vjp(lambda a, b: qdot.qmatmul(a, b, r, key=key),
                     jnp.asarray(x), jnp.asarray(w))
    return (y,) + vjp(jnp.asarray(g))

  a, b, c = f(jax.random.key(0)), f(jax.random.key(0)), f(jax.random.key(1))
  for u, v in zip(a, b):
    np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
  # nvfp4 rounds only the gradients stochastically: same forward, different
  # gradients for a different key.
  np.testing.assert_array_equal(np.asarray(a[0]), np.asarray(c[0]))
  assert not np.array_equal(np.asarray(a[2]), np.asarray(c[2]))


def test_hw_faithful_changes_only_the_backward():
  x, w, g = _inputs(np_ref.FP4_PAPER)
  base = _run(qdot.get_recipe("fp4_paper"), x, w, g)
  hw = _run(qdot.get_recipe("fp4_paper", hw_faithful=True), x, w, g)
  np.testing.assert_array_equal(hw[0], base[0])
  assert not np.array_equal(hw[2], base[2])
  for i in (1, 2):   # still a sensible gradient: close to the simulated one
    assert _rel_err(hw[i], base[i]) < FP4_REL_ERR_MAX


# ------------------------------------------------------------- jit / seam
def test_eager_equals_jit():
  r = qdot.get_recipe("fp4_paper")
  x, w, _ = _inputs(np_ref.FP4_PAPER)
  eager = np.asarray(qdot.qmatmul(jnp.asarray(x), jnp.asarray(w), r))
  jitted = np.asarray(jax.jit(lambda a, b: qdot.qmatmul(a, b, r))(x, w))
  np.testing.assert_allclose(jitted, eager, rtol=JIT_RTOL,
                             atol=JIT_RTOL * np.max(np.abs(eager)))


@pytest.mark.parametrize("recipe,fq", [
    ("mxfp4", lambda a: np_ref.mx_fake_quant(a, 32)),
    ("nvfp4", lambda a: np_ref.nv_fake_quant(a, 16))])
def test_block_recipes_forward_vs_oracle(recipe, fq):
  # Both operands are block-quantized along the contraction axis K (x's
  # rows, w's columns), then multiplied in float64.
  rng = np.random.default_rng(3)
  x = rng.standard_t(df=3, size=(M, K)).astype(np.float32)
  w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
  want = fq(x) @ fq(w.T).T
  got = np.asarray(qdot.qmatmul(jnp.asarray(x), jnp.asarray(w), recipe,
                                key=jax.random.key(0)), np.float64)
  # f32 accumulation of exactly quantized operands (GEMM_RTOL).
  bound = GEMM_RTOL * (np.abs(fq(x)) @ np.abs(fq(w.T).T))
  assert np.all(np.abs(got - want) <= bound + 1e-30), np.max(
      np.abs(got - want) / (bound + 1e-30))


def test_make_dot_general_matches_qmatmul():
  x, w, _ = _inputs(np_ref.FP4_PAPER)
  dg = qdot.make_dot_general("fp4_paper")
  x3 = jnp.asarray(x).reshape(4, M // 4, K)
  y = dg(x3, jnp.asarray(w), (((2,), (0,)), ((), ())))
  want = qdot.qmatmul(jnp.asarray(x), jnp.asarray(w), "fp4_paper")
  np.testing.assert_array_equal(np.asarray(y).reshape(M, N),
                                np.asarray(want))


def test_make_dot_general_in_nnx_linear_and_einsum():
  from flax import nnx
  x, w, _ = _inputs(np_ref.FP4_PAPER)
  lin = nnx.Linear(K, N, use_bias=False, rngs=nnx.Rngs(0),
                   dot_general=qdot.make_dot_general("fp4_paper"))
  lin.kernel[...] = jnp.asarray(w)
  want = qdot.qmatmul(jnp.asarray(x), jnp.asarray(w), "fp4_paper")
  np.testing.assert_array_equal(np.asarray(lin(jnp.asarray(x))),
                                np.asarray(want))
  # Gradients flow through the layer (the custom_vjp, not a plain dot).
  g = nnx.grad(lambda m: jnp.sum(m(jnp.asarray(x)) ** 2))(lin)
  assert np.all(np.isfinite(np.asarray(g.kernel[...])))
  ein = jnp.einsum("mk,kn->mn", jnp.asarray(x), jnp.asarray(w),
                   _dot_general=qdot.make_dot_general("fp4_paper"))
  # jnp.einsum is jitted internally: a few ulps from fusion (JIT_RTOL).
  np.testing.assert_allclose(np.asarray(ein), np.asarray(want),
                             rtol=JIT_RTOL, atol=JIT_RTOL * np.max(np.abs(want)))


def test_make_dot_general_rejects_other_contractions():
  dg = qdot.make_dot_general("fp4_paper")
  with pytest.raises(NotImplementedError, match="dimension_numbers"):
    dg(jnp.ones((3, 4)), jnp.ones((5, 4)), (((1,), (1,)), ((), ())))
  with pytest.raises(NotImplementedError, match="batch"):
    dg(jnp.ones((2, 3, 4)), jnp.ones((2, 4, 5)), (((2,), (1,)), ((0,), (0,))))


def test_out_dtype_f32_is_not_rounded_to_the_input_dtype():
  # A quantized f32-output layer (e.g. an LM head) must not pass through
  # bf16: its values are f32 sums, not bf16-representable in general.
  x, w, _ = _inputs(np_ref.FP4_PAPER)
  xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)
  y = qdot.qmatmul(xb, wb, "fp4_paper", out_dtype=jnp.float32)
  assert y.dtype == jnp.float32
  y = np.asarray(y)
  assert np.mean(y != y.astype(ml_dtypes.bfloat16).astype(np.float32)) > 0.5
  dx, dw = jax.grad(lambda a, b: jnp.sum(qdot.qmatmul(
      a, b, "fp4_paper", out_dtype=jnp.float32)), (0, 1))(xb, wb)
  assert dx.dtype == jnp.bfloat16 and dw.dtype == jnp.bfloat16


def test_make_dot_general_refuses_stochastic_recipes():
  with pytest.raises(ValueError, match="stochastic"):
    qdot.make_dot_general("nvfp4")


# -------------------------------------------------------------- bad input
@pytest.mark.parametrize("xs,ws,word", [
    ((2, M, K), (K, N), r"\bx\b"), ((M, K), (K,), r"\bw\b"),
    ((K,), (K, N), r"\bx\b"), ((M, K), (K, N, 1), r"\bw\b")])
def test_non_2d_operand(xs, ws, word):
  with pytest.raises(ValueError, match=word):
    qdot.qmatmul(jnp.ones(xs), jnp.ones(ws), "fp4_paper")


def test_unknown_recipe_name():
  with pytest.raises(ValueError, match="fp5_paper"):
    qdot.qmatmul(jnp.ones((2, 4)), jnp.ones((4, 3)), "fp5_paper")
  with pytest.raises(ValueError, match="fp5_paper"):
    qdot.get_recipe("fp5_paper")


# -------------------------------------------------------------- jaxpr level
_ROUNDING_PRIMS = {"lt", "le", "gt", "ge", "floor", "ceil", "round",
                   "round_nearest_even", "nextafter"}
_ORDER_PRIMS = {"top_k", "sort", "while", "scan", "approx_top_k"}
_POW_PRIMS = {"pow", "exp", "log", "exp2", "log1p", "expm1"}
_LOWBIT = {jnp.dtype(d) for d in (jnp.float4_e2m1fn, jnp.float8_e4m3fn,
                                  jnp.float8_e5m2, jnp.float8_e8m0fnu)}


def _subjaxprs(v):
  if hasattr(v, "eqns"):
    yield v
  elif hasattr(v, "jaxpr") and hasattr(v.jaxpr, "eqns"):
    yield v.jaxpr
  elif isinstance(v, (tuple, list)):
    for u in v:
      yield from _subjaxprs(u)


def _count(jaxpr, counts):
  for eqn in jaxpr.eqns:
    name = eqn.primitive.name
    counts[name] = counts.get(name, 0) + 1
    if name == "convert_element_type":
      dt = jnp.dtype(eqn.params["new_dtype"])
      if dt in _LOWBIT:
        counts[f"cast:{dt.name}"] = counts.get(f"cast:{dt.name}", 0) + 1
    if name == "reduce_precision":
      # FP8 rounding is arithmetic (numerics.round_to_float): E5M2 is the
      # reduce_precision with 2 mantissa bits, E4M3 with 3.
      m = eqn.params["mantissa_bits"]
      counts[f"cast:rp_m{m}"] = counts.get(f"cast:rp_m{m}", 0) + 1
    for v in eqn.params.values():
      for sub in _subjaxprs(v):
        _count(sub, counts)
  return counts


def _mlp_counts(recipe, **overrides):
  recipe, run = _recipe_and_run(recipe, overrides)
  def loss(x, w1, w2):
    h = jax.nn.relu(qdot.qmatmul(x, w1, recipe, execution=run))
    return jnp.sum(qdot.qmatmul(h, w2, recipe, execution=run) ** 2)
  args = (jnp.ones((8, 16)), jnp.ones((16, 32)), jnp.ones((32, 4)))
  jaxpr = jax.make_jaxpr(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
  c = _count(jaxpr.jaxpr, {})
  total = lambda names: sum(c.get(n, 0) for n in names)
  return {
      "dot": c.get("dot_general", 0),
      "rounding": total(_ROUNDING_PRIMS) + total(
          k for k in c if k.startswith("cast:")),
      "e5m2": c.get("cast:float8_e5m2", 0) + c.get("cast:rp_m2", 0),
      "lowbit": total(k for k in c if k.startswith("cast:")),
      "order": total(_ORDER_PRIMS),
      "pow": total(_POW_PRIMS),
  }


@pytest.fixture(scope="module")
def plain_counts():
  return _mlp_counts("bf16")


def test_jaxpr_plain_recipe_has_no_quantizer(plain_counts):
  c = plain_counts
  assert c["dot"] == 6, c                 # fwd, dgrad, wgrad x 2 layers
  assert c["lowbit"] == 0 and c["order"] == 0 and c["pow"] == 0, c
  assert c["rounding"] <= 2, c            # relu's derivative only


def test_jaxpr_fp4_paper_quantizes_every_gemm(plain_counts):
  c = _mlp_counts("fp4_paper", sparse_impl="gemm")
  # Per layer: quantized fwd GEMM + the sparse compensation GEMM, dgrad and
  # wgrad.
  assert c["dot"] >= 4 * 2, c
  # Forward x and w quantizers in both layers plus the E5M2 gradient casts.
  assert c["rounding"] - plain_counts["rounding"] >= 2 * 2 + 2, c
  assert c["e5m2"] >= 2, c                # gradient quantizer, both layers
  assert c["order"] >= 2, c               # OCC order statistics per layer
  assert c["pow"] >= 2, c                 # the DGE power law per layer


def test_jaxpr_ell_compensation_runs_no_extra_gemm():
  # sparse_impl "ell": the three compensation products are gathers, so
  # only the forward, dgrad and wgrad GEMMs remain (3 per layer). alpha
  # 0.9 leaves 2 and 6 outlier slots per row at K = 16, 32 (0.99: none).
  c = _mlp_counts("fp4_paper", sparse_impl="ell", occ_alpha=0.9)
  assert c["dot"] == 3 * 2, c
  assert _mlp_counts("fp4_paper", sparse_impl="gemm",
                     occ_alpha=0.9)["dot"] == 6 * 2
  # "auto" (the default) is the ELL form on a CPU target.
  assert _mlp_counts("fp4_paper", occ_alpha=0.9)["dot"] == 3 * 2
  assert c["order"] >= 2 and c["pow"] >= 2, c


def test_jaxpr_direct_cast_has_no_occ_or_dge():
  c = _mlp_counts("w4a4_direct")
  assert c["dot"] >= 6 and c["e5m2"] >= 2, c
  assert c["order"] == 0 and c["pow"] == 0, c


def test_ell_with_no_outlier_slots_equals_gemm():
  # K = 16 at alpha 0.99 leaves capacity 0: zero ELL slots, R == 0.
  rng = np.random.default_rng(5)
  x, w, g = (rng.standard_normal(s).astype(np.float32)
             for s in ((8, 16), (16, 4), (8, 4)))
  r = qdot.get_recipe("fp4_paper")
  got = _run(r, x, w, g, qdot.Execution(sparse_impl="ell"))
  want = _run(r, x, w, g, qdot.Execution(sparse_impl="gemm"))
  for a, b in zip(got, want):
    np.testing.assert_array_equal(a, b)


def test_an_eager_call_with_host_weights_runs_the_ell_compensation():
  # A model called outside jit with numpy parameters (a notebook probing a
  # restored run): the ELL products' scans index the weight by a traced
  # slot, which a numpy array cannot take.
  rng = np.random.default_rng(8)
  x = rng.standard_normal((8, 256)).astype(np.float32)
  w = (rng.standard_normal((256, 16)) * 0.05).astype(np.float32)
  r = qdot.get_recipe("fp4_paper")
  assert gemm.resolve_sparse(r, qdot.Execution()) == "ell"   # CPU: ELL
  got = qdot.qmatmul(jnp.asarray(x), w, r)
  want = qdot.qmatmul(jnp.asarray(x), jnp.asarray(w), r)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
