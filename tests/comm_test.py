"""Low-precision gradient reduction (fp4jax.comm) against a float64 oracle."""

import functools

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from configs import demo
from fp4jax import comm
from fp4jax import sharding
from fp4jax import train
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


def _bound(x, dtype):
  """Per-element error bound of the ring (n > 2) or all-gather (n = 2) sum.

  x: float64 [n, L], device i's addend in row i. Chunk j of the flat
  vector starts at device j + 1 and goes round the ring; every partial
  sum that is sent, and the final sum, is rounded once.
  """
  n, length = x.shape
  m, sub = FORMATS[dtype]
  # bf16 has f32's range: sent unscaled. FP8: the shared power of two.
  scale = (1.0 if dtype == "bfloat16" else
           2.0**min(np.floor(np.log2(_fmax(dtype) / (n * np.abs(x).max()))),
                    comm.MAX_SCALE_EXP))
  def rounding(v):
    return np.maximum(np.abs(v) * scale * 2.0**-(m + 1), sub / 2) / scale
  if n == 2:   # each addend rounded once, summed in f32
    return rounding(x[0]) + rounding(x[1]) + 2 * F32_EPS * np.abs(x).sum(0)
  chunk = -(-length // n)
  start = (np.arange(length) // chunk + 1) % n     # device sending first
  order = (start[None, :] + np.arange(n)[:, None]) % n   # [n, L]
  partial = np.zeros(length)
  bound = np.zeros(length)
  for k in range(n):
    partial = partial + x[order[k], np.arange(length)]
    # Partials after 1..n-1 contributions are sent; the n-th is gathered.
    bound = bound + rounding(np.abs(partial) + bound)
  return bound + n * F32_EPS * np.abs(x).sum(0)


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


def test_f32_is_a_plain_psum(mesh):
  x = np.random.default_rng(1).standard_normal((8, 64)).astype(np.float32)
  out = np.asarray(_sum_fn(mesh, "float32")(x))
  np.testing.assert_allclose(out[0], x.astype(np.float64).sum(0),
                             rtol=8 * F32_EPS * 10, atol=1e-6)


def test_bad_dtype_and_mesh_are_one_line(mesh):
  with pytest.raises(ValueError, match="comm.grad_dtype must be one of"):
    comm.check("float16", mesh)
  with pytest.raises(ValueError, match="needs a data-parallel mesh"):
    comm.check("float8_e4m3fn", sharding.make_mesh(4, 2, 1))


def _config(grad_dtype, steps):
  c = demo.get_config("smoke,recipe=bf16")
  return harness.set_keys(c, {
      "model.n_layers": 1, "model.compute_dtype": "float32",
      "num_steps": steps, "log_every": steps, "eval_steps": 0,
      "checkpoint_every": 1000, "comm.grad_dtype": grad_dtype,
      "optim.warmup_frac": 0.0})


@functools.lru_cache(maxsize=None)
def _trainer(grad_dtype, steps):
  cfg = _config(grad_dtype, steps)
  model_cfg = train.model_config(cfg.model.to_dict(), cfg.data.vocab_size)
  rules, _ = train.quant_rules(cfg.quant)
  return train._make_trainer(  # pylint: disable=protected-access
      model_cfg, rules, train.optim.OptimConfig(**cfg.optim.to_dict()),
      num_steps=steps, mesh=sharding.make_mesh(8, 1, 1),
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


def test_fp8_communication_trains_like_f32(tmp_path):
  losses = {}
  for dtype in ("float32", "bfloat16", "float8_e4m3fn"):
    state = train.train_and_evaluate(_config(dtype, 50),
                                     str(tmp_path / dtype))
    del state
    rec = (tmp_path / dtype / "metrics.jsonl").read_text().splitlines()[-1]
    losses[dtype] = float(__import__("json").loads(rec)["loss"])
  f32 = losses["float32"]
  for dtype in ("bfloat16", "float8_e4m3fn"):
    assert abs(losses[dtype] - f32) <= FP8_COMM_LOSS_RTOL * f32, losses
