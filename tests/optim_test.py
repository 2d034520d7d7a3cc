"""Tests for fp4jax.optim: AdamW parity, low-precision moments, masters."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

from fp4jax import optim

# f32 AdamW vs optax.adamw: the same f32 operations in the same order; XLA
# may still fuse differently, so allow a few f32 ulps per step.
ADAMW_RTOL = 1e-6
ADAMW_ATOL = 1e-8
# Storing a value in a float format with M mantissa bits errs by at most
# half an ulp: 2**-(M+1) relative for normal values. E4M3: M=3, FP16: M=10.
E4M3_MANT, E4M3_EMIN = 3, -6
FP16_MANT, FP16_EMIN = 10, -14
# The numpy replay of a step differs from the f32 kernel by f32 rounding.
F32_SLACK = 1e-6
# Tiny-gradient run (m f32, v FP16): each store errs <= 2**-11 relative, the
# EMA sums them to <= 2**-11 / (1 - b2) ~ 1% of v, i.e. ~0.5% of sqrt(v).
TINY_GRAD_RTOL = 1e-2
# bytes/param goals allow for per-tensor scales, step counters and the f32
# 1-D leaves of the low-memory mode (0.0003 B/param at 125m).
BYTES_OVERHEAD = 0.01
# Stochastic rounding: the sample mean of n draws lies within 4 sigma.
SR_SIGMAS = 4.0

STEPS = 24


def _tree_np(tree):
  return jax.tree.map(lambda x: np.asarray(x, np.float64), tree)


def _toy_params(key):
  ks = jax.random.split(key, 4)
  return {
      "w": jax.random.normal(ks[0], (6, 4), jnp.float32),
      "emb": jax.random.normal(ks[1], (5, 6), jnp.float32),
      "b": jax.random.normal(ks[2], (4,), jnp.float32),
      "norm": 1.0 + 0.1 * jax.random.normal(ks[3], (6,), jnp.float32),
  }


def _toy_loss(params, targets):
  # A quadratic whose gradients depend on the params, so a wrong update
  # changes every later gradient.
  return sum(jnp.sum((k + 1.0) * (params[n] - targets[n]) ** 2)
             for k, n in enumerate(sorted(params)))


# ------------------------------------------------------------------ parity


def test_f32_matches_optax_adamw_step_by_step():
  # Gradient norms fall from 57 to 36 over the run: clip_norm=45 clips the
  # first half only.
  cfg = optim.OptimConfig(lr=0.05, warmup_frac=0.25, clip_norm=45.0,
                          weight_decay=0.1)
  params = _toy_params(jax.random.key(0))
  targets = _toy_params(jax.random.key(1))
  ours = optim.make_optimizer(cfg, STEPS)
  ref = optax.chain(
      optax.clip_by_global_norm(cfg.clip_norm),
      optax.adamw(optim.make_schedule(cfg, STEPS), b1=cfg.b1, b2=cfg.b2,
                  eps=cfg.eps, weight_decay=cfg.weight_decay,
                  mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)))

  def make_step(tx, apply):
    @jax.jit
    def step(p, s):
      g = jax.grad(_toy_loss)(p, targets)
      u, s = tx.update(g, s, p)
      return apply(p, u), s, optax.global_norm(g)
    return step

  step_ours = make_step(ours, lambda p, u: optim.apply_updates(p, u, cfg))
  step_ref = make_step(ref, optax.apply_updates)
  p_ours, s_ours = params, ours.init(params)
  p_ref, s_ref = params, ref.init(params)
  clipped = 0
  for _ in range(STEPS):
    p_ours, s_ours, _ = step_ours(p_ours, s_ours)
    p_ref, s_ref, gnorm = step_ref(p_ref, s_ref)
    clipped += int(gnorm > cfg.clip_norm)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(
        a, b, rtol=ADAMW_RTOL, atol=ADAMW_ATOL), _tree_np(p_ours),
                 _tree_np(p_ref))
  # The run must exercise clipping and move the params.
  assert 0 < clipped < STEPS
  assert not np.allclose(p_ours["w"], params["w"], atol=1e-3)


def test_schedule_matches_closed_form():
  cfg = optim.OptimConfig(lr=1e-3, warmup_frac=0.1, min_lr_frac=0.1)
  n = 50
  sched = optim.make_schedule(cfg, n)
  w = 5
  for s in range(n + 3):
    if s < w:
      want = cfg.lr * s / w
    else:
      frac = min(s - w, n - w) / (n - w)
      lo = cfg.min_lr_frac * cfg.lr
      want = lo + (cfg.lr - lo) * 0.5 * (1 + math.cos(math.pi * frac))
    np.testing.assert_allclose(float(sched(s)), want, rtol=1e-5, atol=1e-12)
  no_warmup = optim.make_schedule(dataclasses.replace(cfg, warmup_frac=0.0),
                                  n)
  assert float(no_warmup(0)) == pytest.approx(cfg.lr)


# ------------------------------------------------------------- storage


@pytest.mark.parametrize("moments", ["fp32", "paper", "bf16"])
@pytest.mark.parametrize("master", ["fp32", "bf16", "fp16"])
def test_storage_dtypes_hold_after_updates(moments, master):
  cfg = optim.OptimConfig(moments=moments, master=master, lr=1e-2,
                          warmup_frac=0.0)
  tx = optim.make_optimizer(cfg, 10)
  params = optim.cast_master(_toy_params(jax.random.key(2)), cfg)
  targets = _toy_params(jax.random.key(3))
  state = tx.init(params)
  for _ in range(2):
    grads = jax.grad(_toy_loss)(optim.params_for_grad(params, cfg), targets)
    updates, state = tx.update(grads, state, params)
    params = optim.apply_updates(params, updates, cfg)
  adam = state[2]
  assert isinstance(adam, optim.AdamMPState)
  assert adam.count.dtype == jnp.int32 and int(adam.count) == 2
  for name in params:
    want = cfg.master_dtype if params[name].ndim >= 2 else jnp.float32
    assert params[name].dtype == want, name
    assert updates[name].dtype == jnp.float32
    assert adam.mu[name].dtype == cfg.mu_dtype
    assert adam.nu[name].dtype == cfg.nu_dtype
    assert adam.mu_scale[name].dtype == jnp.float32
    assert adam.mu_scale[name].shape == ()
    assert np.all(np.isfinite(np.asarray(params[name], np.float32)))


def _half_ulp(y, mant, emin):
  """Half the grid spacing at |y| (already scaled) of a float format."""
  e = np.floor(np.log2(np.maximum(np.abs(y), 2.0 ** emin)))
  return 2.0 ** (np.maximum(e, emin) - mant - 1)


def _grad_sequence(shape, steps, key):
  # Magnitudes change over 1e-4..1 across steps and elements.
  g = jax.random.normal(key, (steps, *shape), jnp.float32)
  mag = jnp.logspace(-4, 0, shape[-1], dtype=jnp.float32)
  return np.array(g * mag * (1 + jnp.arange(steps) % 3)[:, None, None])


def test_scaled_moments_one_step_equal_rounding_oracle():
  b1, b2 = 0.9, 0.95
  tx = optim.scale_by_adam_mp(b1, b2, mu_dtype=jnp.float8_e4m3fn,
                              nu_dtype=jnp.float16)
  # A whole tensor of small gradients (1e-10..3e-6): unscaled, every m and v
  # would flush to zero in E4M3 / FP16.
  g = 1e-6 * _grad_sequence((8, 16), 1, jax.random.key(4))[0]
  _, state = tx.update({"g": jnp.asarray(g)},
                       tx.init({"g": jnp.zeros_like(g)}))
  m32 = np.float32(1 - b1) * g
  v32 = np.float32(1 - b2) * (g * g)
  for stored, scale, x, fmt, fmax in (
      (state.mu["g"], state.mu_scale["g"], m32, ml_dtypes.float8_e4m3fn, 448),
      (state.nu["g"], state.nu_scale["g"], v32, np.float16, 65504)):
    s = float(scale)
    assert s == 2.0 ** round(math.log2(s)), "scale must be a power of two"
    assert fmax / 2 <= np.abs(x).max() * s <= fmax
    want = (x * np.float32(s)).astype(fmt)
    np.testing.assert_array_equal(np.asarray(stored).view(np.uint8),
                                  want.view(np.uint8))
    assert np.all(x.astype(fmt) == 0)     # premise: unscaled flushes
    assert np.count_nonzero(np.asarray(stored, np.float32)) > 0.9 * x.size


def test_scaled_moments_track_f32_moments():
  """Paper moments vs f32 moments on one gradient sequence.

  Error recursion: e_t = b1 * e_{t-1} + (rounding of the new value), and a
  rounding errs by at most half an ulp of the scaled value, so
  |e_t| <= B_t = b1 * B_{t-1} + half_ulp_t / scale_t elementwise.
  """
  b1, b2 = 0.9, 0.95
  low = optim.scale_by_adam_mp(b1, b2, mu_dtype=jnp.float8_e4m3fn,
                               nu_dtype=jnp.float16)
  ref = optim.scale_by_adam_mp(b1, b2, mu_dtype=jnp.float32,
                               nu_dtype=jnp.float32)
  gs = _grad_sequence((8, 16), 20, jax.random.key(5))
  zeros = {"g": jnp.zeros(gs.shape[1:])}
  s_low, s_ref = low.init(zeros), ref.init(zeros)
  upd_low, upd_ref = jax.jit(low.update), jax.jit(ref.update)
  bound_m = bound_v = 0.0
  dec = lambda q, s: np.asarray(q, np.float64) / float(s)
  for g in gs:
    m_prev = dec(s_low.mu["g"], s_low.mu_scale["g"])
    v_prev = dec(s_low.nu["g"], s_low.nu_scale["g"])
    s_low = upd_low({"g": jnp.asarray(g)}, s_low)[1]
    s_ref = upd_ref({"g": jnp.asarray(g)}, s_ref)[1]
    # The value each step rounds: the f32 update of the stored moments.
    m_new = b1 * m_prev + (1 - b1) * g
    v_new = b2 * v_prev + (1 - b2) * g.astype(np.float64) ** 2
    sm, sv = float(s_low.mu_scale["g"]), float(s_low.nu_scale["g"])
    bound_m = b1 * bound_m + _half_ulp(m_new * sm, E4M3_MANT, E4M3_EMIN) / sm
    bound_v = b2 * bound_v + _half_ulp(v_new * sv, FP16_MANT, FP16_EMIN) / sv
    m_ref = np.asarray(s_ref.mu["g"], np.float64)
    v_ref = np.asarray(s_ref.nu["g"], np.float64)
    err_m = np.abs(dec(s_low.mu["g"], sm) - m_ref)
    err_v = np.abs(dec(s_low.nu["g"], sv) - v_ref)
    assert np.all(err_m <= bound_m + F32_SLACK * np.abs(m_ref))
    assert np.all(err_v <= bound_v + F32_SLACK * np.abs(v_ref))
  # Relative size of the bound where the moment is large: E4M3 rounding
  # accumulated over ~1/(1 - b1) steps.
  big = np.abs(m_ref) > 0.1 * np.abs(m_ref).max()
  assert np.median(bound_m[big] / np.abs(m_ref[big])) < 2.0 ** -4 / (1 - b1)


def test_tiny_grads_do_not_flush_fp16_nu():
  b1, b2 = 0.9, 0.95
  low = optim.scale_by_adam_mp(b1, b2, mu_dtype=jnp.float32,
                               nu_dtype=jnp.float16)
  ref = optim.scale_by_adam_mp(b1, b2, mu_dtype=jnp.float32,
                               nu_dtype=jnp.float32)
  k_mag, k_sign = jax.random.split(jax.random.key(6))
  gs = 1e-8 * (1 + jax.random.uniform(k_mag, (20, 32))) * jnp.where(
      jax.random.bernoulli(k_sign, 0.8, (20, 32)), 1.0, -1.0)
  s_low = low.init({"g": jnp.zeros(32)})
  s_ref = ref.init({"g": jnp.zeros(32)})
  upd_low, upd_ref = jax.jit(low.update), jax.jit(ref.update)
  for g in gs:
    u_low, s_low = upd_low({"g": g}, s_low)
    u_ref, s_ref = upd_ref({"g": g}, s_ref)
    nu_ref = np.asarray(s_ref.nu["g"])
    # Premise: unscaled FP16 would hold zeros here.
    assert np.all(nu_ref.astype(np.float16) == 0)
    assert np.all(np.asarray(s_low.nu["g"], np.float32) > 0)
    np.testing.assert_allclose(u_low["g"], u_ref["g"], rtol=TINY_GRAD_RTOL)


def test_fp8_grad_rounding_matches_oracle_and_saturates_safely():
  g = _grad_sequence((4, 16), 1, jax.random.key(7))[0] * 1000.0
  got = np.asarray(optim.round_grads_to_fp8().update({"g": g}, None)[0]["g"])
  s = 2.0 ** np.floor(np.log2(448.0 / np.abs(g).max()))
  want = (g * s).astype(ml_dtypes.float8_e4m3fn).astype(np.float64) / s
  np.testing.assert_array_equal(got, want)
  assert np.all(np.isfinite(got))
  bad = np.array([1.0, np.inf, np.nan], np.float32)
  out = np.asarray(optim.round_grads_to_fp8().update({"g": bad}, None)[0]["g"])
  assert np.isinf(out[1]) and np.isnan(out[2])


def test_fp8_grad_mask_rounds_only_the_chosen_leaves():
  g = _grad_sequence((4, 16), 1, jax.random.key(11))[0] * 1000.0
  grads = {"kernel": g, "head": g}
  rnd = optim.round_grads_to_fp8(lambda t: {"kernel": True, "head": False})
  out = rnd.update(grads, None)[0]
  whole = optim.round_grads_to_fp8().update({"g": g}, None)[0]["g"]
  np.testing.assert_array_equal(out["kernel"], whole)
  np.testing.assert_array_equal(out["head"], np.asarray(g, np.float32))
  assert not np.array_equal(out["head"], out["kernel"])


def test_grad_fp8_flag_rounds_before_the_optimizer():
  params = _toy_params(jax.random.key(8))
  # Two steps: after one, Adam's update is ~sign(g) whatever the rounding.
  grad_seq = [jax.grad(_toy_loss)(params, _toy_params(jax.random.key(k)))
              for k in (9, 10)]
  cfg = optim.OptimConfig(grad_fp8=True, warmup_frac=0.0)
  plain = dataclasses.replace(cfg, grad_fp8=False)
  rnd = optim.round_grads_to_fp8()

  def run(c, grad_fn):
    tx = optim.make_optimizer(c, 10)
    state = tx.init(params)
    for grads in grad_seq:
      updates, state = tx.update(grad_fn(grads), state, params)
    return updates

  got = run(cfg, lambda g: g)
  want = run(plain, lambda g: rnd.update(g, None)[0])
  unrounded = run(plain, lambda g: g)
  jax.tree.map(np.testing.assert_array_equal, got, want)
  assert not np.array_equal(got["w"], unrounded["w"])


# ------------------------------------------------------------- sharding


def test_sharded_params_keep_shardings_through_jitted_update():
  mesh = jax.make_mesh((8,), ("x",), axis_types=(AxisType.Auto,))
  specs = {"w": P("x", None), "emb": P(None, "x"), "b": P()}
  shapes = {"w": (16, 8), "emb": (8, 16), "b": (8,)}
  cfg = optim.OptimConfig(moments="paper", master="bf16", grad_fp8=True)
  params = {
      n: jax.device_put(jnp.ones(shapes[n]), NamedSharding(mesh, specs[n]))
      for n in shapes}
  params = optim.cast_master(params, cfg)
  tx = optim.make_optimizer(cfg, 10)
  state = tx.init(params)
  grads = jax.tree.map(lambda p: 0.1 * p.astype(jnp.float32), params)
  updates, state = jax.jit(tx.update)(grads, state, params)
  new_params = jax.jit(lambda p, u: optim.apply_updates(p, u, cfg))(
      params, updates)
  adam = state[2]
  for n, p in params.items():
    want = p.sharding
    for got in (updates[n], adam.mu[n], adam.nu[n], new_params[n]):
      assert got.sharding.is_equivalent_to(want, p.ndim), n
    assert new_params[n].dtype == p.dtype
    assert adam.mu[n].dtype == jnp.float8_e4m3fn


# ---------------------------------------------------------- master weights


def test_cast_master_and_params_for_grad():
  cfg = optim.OptimConfig(master="fp16")
  params = optim.cast_master(_toy_params(jax.random.key(10)), cfg)
  assert params["w"].dtype == jnp.float16 and params["b"].dtype == jnp.float32

  def loss(p):
    # A cotangent of 1e-9 reaching an fp16 leaf flushes to zero.
    return jnp.sum(p["w"].astype(jnp.bfloat16).astype(jnp.float32) * 1e-9)

  assert np.all(np.asarray(jax.grad(loss)(params)["w"], np.float32) == 0)
  g = jax.grad(loss)(optim.params_for_grad(params, cfg))["w"]
  assert g.dtype == jnp.float32
  np.testing.assert_allclose(g, 1e-9, rtol=1e-2)   # bf16 cotangent
  bf = optim.OptimConfig(master="bf16")
  assert optim.params_for_grad(params, bf) is params


@pytest.mark.parametrize("dtype,master,delta", [
    (jnp.bfloat16, "bf16", 1e-3), (jnp.bfloat16, "bf16", -1e-3),
    (jnp.float16, "fp16", 1e-4)])
def test_stochastic_master_rounding_is_unbiased(dtype, master, delta):
  cfg = optim.OptimConfig(master=master)
  params = {"w": jnp.ones((64, 64), dtype), "b": jnp.ones((4,), jnp.float32)}
  updates = {"w": jnp.full((64, 64), delta, jnp.float32),
             "b": jnp.full((4,), delta, jnp.float32)}
  # Round to nearest loses an update below half an ulp.
  nearest = optim.apply_updates(params, updates, cfg)
  assert np.all(np.asarray(nearest["w"], np.float32) == 1.0)
  out = optim.apply_updates(params, updates, cfg, key=jax.random.key(11))
  got = np.asarray(out["w"], np.float64).ravel()
  toward = dtype(2.0 if delta > 0 else 0.0)
  lo, hi = sorted([1.0, float(jnp.nextafter(dtype(1.0), toward))])
  assert np.all((got == lo) | (got == hi))
  p = (1 + delta - lo) / (hi - lo)
  sigma = (hi - lo) * math.sqrt(p * (1 - p) / got.size)
  assert abs(got.mean() - (1 + delta)) < SR_SIGMAS * sigma
  assert out["w"].dtype == dtype
  np.testing.assert_array_equal(out["b"], np.float32(1 + delta))


# ---------------------------------------------------------------- memory


def _llama_shapes(vocab=32000, d=768, layers=12, ff=2048):
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  block = dict(attn_norm=s(d), mlp_norm=s(d), q_proj=s(d, d), k_proj=s(d, d),
               v_proj=s(d, d), o_proj=s(d, d), gate_proj=s(d, ff),
               up_proj=s(d, ff), down_proj=s(ff, d))
  return dict(embed=s(vocab, d), final_norm=s(d), lm_head=s(d, vocab),
              layers=[dict(block) for _ in range(layers)])


@pytest.mark.parametrize("moments,master,goal", [
    ("fp32", "fp32", 12.0), ("paper", "fp32", 7.0),
    ("paper", "bf16", 5.0), ("paper", "fp16", 5.0), ("bf16", "bf16", 6.0)])
def test_bytes_per_param_goals(moments, master, goal):
  cfg = optim.OptimConfig(moments=moments, master=master)
  tx = optim.make_optimizer(cfg, 100)
  params = jax.eval_shape(lambda p: optim.cast_master(p, cfg),
                          _llama_shapes())
  state = jax.eval_shape(tx.init, params)
  got = optim.state_bytes(params, state)
  assert 124e6 < got["n_params"] < 136e6
  assert goal <= got["bytes_per_param"] <= goal + BYTES_OVERHEAD


def test_state_bytes_counts_every_leaf():
  params = {"w": jnp.zeros((3, 4), jnp.float32)}
  state = (jnp.zeros([], jnp.int32), {"m": jnp.zeros((3, 4), jnp.bfloat16)})
  got = optim.state_bytes(params, state)
  assert got == dict(total_bytes=48 + 4 + 24, n_params=12,
                     bytes_per_param=76 / 12)


# ----------------------------------------------------------------- config


@pytest.mark.parametrize("key,value", [
    ("lr", 0.0), ("lr", -1e-3), ("lr", "3e-4"), ("lr", True),
    ("lr", float("nan")), ("warmup_frac", 1.0), ("warmup_frac", -0.1),
    ("min_lr_frac", 1.5), ("b1", 1.0), ("b2", -0.1), ("eps", 0.0),
    ("weight_decay", -0.1), ("clip_norm", 0.0), ("moments", "fp8"),
    ("master", "fp8"), ("grad_fp8", "yes")])
def test_bad_config_raises_naming_key(key, value):
  with pytest.raises(ValueError, match=rf"optim\.{key}\b"):
    optim.OptimConfig(**{key: value})


def test_defaults_are_the_paper_hyperparameters():
  cfg = optim.OptimConfig()
  assert (cfg.lr, cfg.b1, cfg.b2, cfg.eps, cfg.weight_decay) == (
      3e-4, 0.9, 0.95, 1e-8, 0.1)
  assert (cfg.warmup_frac, cfg.min_lr_frac) == (0.05, 0.1)
  assert optim.OptimConfig(moments="paper").mu_dtype == jnp.float8_e4m3fn
  assert optim.OptimConfig(moments="paper").nu_dtype == jnp.float16


def test_schedule_longer_than_training_raises():
  cfg = optim.OptimConfig(warmup_frac=0.6)
  with pytest.raises(ValueError, match=r"optim\.warmup_frac.*longer than"):
    optim.validate_schedule(cfg, 1)
  with pytest.raises(ValueError, match=r"optim\.warmup_frac"):
    optim.make_optimizer(cfg, 1)
  with pytest.raises(ValueError, match=r"num_steps"):
    optim.make_schedule(cfg, 0)
  assert optim.validate_schedule(cfg, 10) == 6


def test_bad_moment_dtype_raises():
  with pytest.raises(ValueError, match="mu_dtype"):
    optim.scale_by_adam_mp(mu_dtype=jnp.int8, nu_dtype=jnp.float32)
  with pytest.raises(ValueError, match="nu_dtype"):
    optim.scale_by_adam_mp(mu_dtype=jnp.float32, nu_dtype=jnp.float8_e5m2)
