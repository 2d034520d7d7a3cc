"""Quantization telemetry: stats vs float64 oracles, the gradient tap, and
the loop's telemetry records (which must not change training)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from fp4jax import qconfig
from fp4jax import telemetry
from fp4jax import train
import harness
import np_ref

# The stats are f32 reductions of ~1e3 terms of an oracle-exact quantization
# (inputs are f32; scales and grid values agree except within f32 rounding of
# a threshold, which a Gaussian sample of this size does not hit): relative
# error of a few 1e-6 on sums of squares; SNR in dB is 10 log10 of a ratio.
STAT_RTOL = 1e-4
SNR_ATOL_DB = 1e-3


def _oracle(v, fmt, axis):
  q, sf = np_ref.quantize(v, fmt, axis=axis)
  deq = q / sf
  err = np.sum((v - deq) ** 2)
  power = np.sum(v ** 2)
  return {"snr_db": 10 * np.log10(power / err),
          "cosine": np.sum(v * deq) / np.sqrt(power * np.sum(deq ** 2)),
          "rel_mse": err / power,
          "zero_frac": np.sum((v != 0) & (q == 0)) / np.sum(v != 0),
          "scale_min": np.min(1 / sf), "scale_max": np.max(1 / sf)}


@pytest.mark.parametrize("fmt,axis", [("e2m1", -1), ("e2m1", 0),
                                      ("e4m3", None)])
def test_operand_stats_match_float64(fmt, axis):
  v = np.random.default_rng(0).standard_normal((32, 48)).astype(np.float32)
  got = jax.jit(lambda a: telemetry.operand_stats(
      a, qconfig.TensorQuant(fmt=fmt, axis=axis, rounding="rne"
                             if fmt != "e2m1" else "paper")))(v)
  want = _oracle(v.astype(np.float64), fmt, axis)
  np.testing.assert_allclose(float(got["snr_db"]), want["snr_db"],
                             atol=SNR_ATOL_DB)
  for k in ("cosine", "rel_mse", "zero_frac", "scale_min", "scale_max"):
    np.testing.assert_allclose(float(got[k]), want[k], rtol=STAT_RTOL,
                               err_msg=k)
  assert float(got["sat_frac"]) == 0.0   # absmax scaling clips nothing
  if fmt == "e2m1":
    assert want["zero_frac"] > 0.01     # FP4 flushes: the check can fail


def test_activation_stats_count_occ_clamps_and_compensation():
  x = np.random.default_rng(1).standard_t(3, (16, 200)).astype(np.float32)
  r = qconfig.RECIPES["fp4_paper"]
  s = telemetry.activation_stats(jnp.asarray(x), r)
  xc, resid = np_ref.occ_clamp(x.astype(np.float64), r.occ.alpha)
  assert float(s["clamp_frac"]) == pytest.approx(np.mean(resid != 0))
  # Compensation adds the residual back: the error is that of Q(Xc) alone.
  q, sf = np_ref.quantize(xc, "e2m1", axis=-1)
  err = np.sum((xc - q / sf) ** 2)
  want = 10 * np.log10(np.sum(x.astype(np.float64) ** 2) / err)
  np.testing.assert_allclose(float(s["snr_db"]), want, atol=SNR_ATOL_DB)
  none = telemetry.activation_stats(
      jnp.asarray(x), qconfig.get_recipe("fp4_paper", compensation="none"))
  assert float(none["snr_db"]) < float(s["snr_db"]) - 1.0


def test_grad_tap_is_identity_forward_and_returns_cotangent_stats():
  c = np.random.default_rng(2).standard_normal((8, 12)).astype(np.float32)
  q = qconfig.RECIPES["fp4_paper"].g_dgrad
  y0 = jnp.asarray(np.arange(96, dtype=np.float32).reshape(8, 12))

  def f(y, tap):
    with telemetry.probing({}):
      out = telemetry._grad_tap(q, y, tap)   # pylint: disable=W0212
    return jnp.sum(out * c)

  tap = jnp.zeros([len(telemetry.STAT_KEYS)])
  gy, gtap = jax.grad(f, argnums=(0, 1))(y0, tap)
  np.testing.assert_array_equal(gy, c)       # the gradient passes unchanged
  want = telemetry.operand_stats(jnp.asarray(c), q)
  got = telemetry.unpack_tap(gtap)
  for k in telemetry.STAT_KEYS:
    np.testing.assert_array_equal(got[k], want[k])


def _run(tmp_path, name, every):
  c = demo.get_config("smoke,recipe=fp4_paper")
  harness.set_keys(c, {"num_steps": 4, "log_every": 2, "eval_every": 0,
                       "checkpoint_every": 4, "telemetry_every": every,
                       "model.compute_dtype": "float32"})
  train.train_and_evaluate(c, str(tmp_path / name))
  import json  # pylint: disable=g-import-not-at-top
  with open(tmp_path / name / "metrics.jsonl") as f:
    return [json.loads(line) for line in f]


def test_loop_records_telemetry_without_changing_training(tmp_path):
  on = _run(tmp_path, "on", 2)
  off = _run(tmp_path, "off", 0)
  loss = lambda recs: [(r["step"], r["loss"]) for r in recs if "loss" in r]
  assert loss(on) == loss(off)
  tele = [r for r in on if any(k.startswith("telemetry/") for k in r)]
  assert [r["step"] for r in tele] == [2, 4]
  keys = tele[0]
  for proj in ("layers.0.attn.q_proj", "layers.1.mlp.down_proj"):
    for op in ("x", "w", "g"):
      assert f"telemetry/{proj}/{op}/snr_db" in keys, (proj, op)
    assert 0 < keys[f"telemetry/{proj}/w/dge_mean"] <= 3.0
  assert not any("lm_head" in k for k in keys)
  assert keys["telemetry_seconds"] > 0
