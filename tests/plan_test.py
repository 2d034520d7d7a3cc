"""The memory plan (fp4jax.plan) and the paper presets (configs/paper.py).

Oracles: parameter and moment bytes from `sizes.param_count` and the
dtypes' widths (an independent count of the same model), activation bytes
from `memory.activation_bytes_per_token` times the rows a device holds.
"""

import dataclasses
import subprocess
import sys

import pytest

from configs import default
from configs import paper
from fp4jax import memory
from fp4jax import plan
from fp4jax import runconfig
from fp4jax import sizes

NODES = (4, 8, 16, 32)
GB = plan.GB
# Norm gains are f32 whatever the master dtype and the per-tensor scales
# of the paper's moments are scalars: bytes differ from the count by
# these (< 1e-4 of the total).
BYTES_RTOL = 1e-4
# XLA's arguments also hold the step counter, the run key and the moments'
# per-tensor scales (a few bytes each, ~100 leaves): ~1% of the tiny model.
XLA_ARGS_RTOL = 0.02


@pytest.mark.parametrize("size", paper.SIZES)
@pytest.mark.parametrize("recipe", paper.RECIPES)
def test_every_preset_fits_80gb_on_4_to_32_nodes(size, recipe):
  for nodes in NODES:
    c = paper.get_config(f"size={size},recipe={recipe},nodes={nodes}")
    p = plan.plan(c, platform="gpu")
    assert p.fits, (size, recipe, nodes, plan.report(p))
    assert p.devices == 8 * nodes
    rows = c.data.global_batch // (c.mesh.data * c.mesh.fsdp)
    assert rows % c.optim.grad_accum == 0
    # The smallest count that fits: one fewer microbatch's divisor does not.
    smaller = [d for d in range(1, c.optim.grad_accum) if rows % d == 0]
    if smaller and c.model.remat == "none":
      assert not plan.plan(c, platform="gpu", grad_accum=smaller[-1]).fits


def test_presets_are_the_papers_run():
  c = paper.get_config("size=7b,recipe=fp4_paper,nodes=4")
  assert (c.data.seq_len, c.data.global_batch) == (2048, 2048)
  assert c.num_steps == round(100e9 / (2048 * 2048))   # 23842
  o = c.optim
  assert (o.lr, o.warmup_frac, o.min_lr_frac, o.b1, o.b2, o.weight_decay) == (
      3e-4, 0.05, 0.1, 0.9, 0.95, 0.1)
  assert (o.moments, o.grad_fp8) == ("paper", True)
  twin = paper.get_config("size=7b,recipe=bf16,nodes=4")
  assert (twin.optim.moments, twin.optim.grad_fp8) == ("fp32", False)
  assert twin.quant.recipe == "bf16" and c.quant.recipe == "fp4_paper"
  small = paper.get_config("size=1.3b,recipe=fp4_paper,nodes=4")
  assert small.comm.grad_dtype == "float8_e4m3fn"
  with pytest.raises(ValueError, match="size must be one of"):
    paper.get_config("size=70b")


def test_state_bytes_match_an_independent_count():
  c = paper.get_config("size=1.3b,recipe=bf16,nodes=32")
  p = plan.plan(c, platform="gpu")
  n = sizes.param_count(runconfig.model_config(c.model.to_dict(), 32000))
  assert c.mesh.fsdp == 1   # nothing sharded: every device holds it all
  assert p.items["parameters"] == pytest.approx(4 * n, rel=BYTES_RTOL)
  assert p.items["optimizer state"] == pytest.approx(8 * n, rel=BYTES_RTOL)
  fp4 = plan.plan(paper.get_config("size=13b,recipe=fp4_paper,nodes=4"),
                  platform="gpu")
  cfg13 = runconfig.model_config(
      paper.get_config("size=13b,nodes=4").model.to_dict(), 32000)
  n13 = sizes.param_count(cfg13)
  norms = (2 * cfg13.n_layers + 1) * cfg13.d_model   # replicated gains
  # FP8 m + FP16 v: 3 bytes per parameter, sharded 8 ways (fsdp) but for
  # the norm gains.
  assert fp4.items["optimizer state"] == pytest.approx(
      3 * (n13 - norms) / 8 + 3 * norms, rel=BYTES_RTOL)


def test_fp4_presets_reduce_in_fp8_onto_shard_sized_f32_gradients():
  # With FSDP the FP8 reduction gathers bf16 kernels (the embedding table
  # as stored, f32: its lookup reads it so) and reduce-scatters in the
  # backward: no full-size f32 gradient or accumulator.
  for size in ("7b", "13b"):
    for nodes in (4, 32):
      c = paper.get_config(f"size={size},recipe=fp4_paper,nodes={nodes}")
      assert c.comm.grad_dtype == "float8_e4m3fn", (size, nodes)
  c = paper.get_config("size=13b,recipe=fp4_paper,nodes=4")
  p = plan.plan(c, platform="gpu")
  assert p.fits and p.grad_accum > 1
  cfg13 = runconfig.model_config(c.model.to_dict(), 32000)
  n13 = sizes.param_count(cfg13)
  norms = (2 * cfg13.n_layers + 1) * cfg13.d_model   # replicated gains
  table = 32000 * cfg13.d_model
  shard = 4 * ((n13 - norms) / 8 + norms)
  assert p.items["gradients (f32)"] == pytest.approx(shard, rel=BYTES_RTOL)
  assert p.items["accumulation buffer (f32)"] == pytest.approx(
      shard, rel=BYTES_RTOL)
  assert p.items["gathered parameters (compute dtype)"] == pytest.approx(
      2 * (n13 - norms - table) + 4 * table, rel=BYTES_RTOL)
  assert p.items["gradient in flight (largest leaf)"] == 4 * table
  assert not [k for k in p.items if "full size" in k], list(p.items)


def test_the_plan_counts_tensor_shards_and_either_layer_layout():
  """Under tensor parallelism FP8 communication gathers and reduces each
  device's tensor shard (1 / tensor of a leaf). Stacked layers (scanned)
  hold the same state (norm gains still f32), but their backward scan
  hands out every layer's kernel cotangent at once: all in flight."""
  c = paper.get_config("size=13b,recipe=fp4_paper,nodes=4")
  base = plan.plan(c, platform="gpu").items
  c.model.scan_layers = True
  scanned = plan.plan(c, platform="gpu").items
  flight = "gradient in flight (largest leaf)"
  assert {k: v for k, v in scanned.items() if k != flight} == pytest.approx(
      {k: v for k, v in base.items() if k != flight}, rel=1e-12)
  cfg13 = runconfig.model_config(c.model.to_dict(), 32000)
  n13 = sizes.param_count(cfg13)
  norms = (2 * cfg13.n_layers + 1) * cfg13.d_model   # replicated gains
  table = 32000 * cfg13.d_model
  lm_head = table    # untied: [d, V], sharded over fsdp too
  assert scanned[flight] == pytest.approx(
      2 * (n13 - norms - table - lm_head), rel=BYTES_RTOL)
  c.model.scan_layers = False
  c.mesh.fsdp, c.mesh.tensor = c.mesh.fsdp // 2, 2
  tp = plan.plan(c, platform="gpu").items
  # Every kernel and the table are split over tensor: half of each read.
  assert tp["gathered parameters (compute dtype)"] == pytest.approx(
      (2 * (n13 - norms - table) + 4 * table) / 2, rel=BYTES_RTOL)
  assert tp["gradient in flight (largest leaf)"] == 4 * table / 2


def test_activations_are_one_microbatch_of_the_device_rows():
  c = paper.get_config("size=1.3b,recipe=fp4_paper,nodes=4")
  p = plan.plan(c, platform="gpu", grad_accum=4, remat="none")
  cfg = runconfig.model_config(c.model.to_dict(), 32000)
  per_token = memory.activation_bytes_per_token(
      dataclasses.replace(cfg, attention="cudnn", remat="none"), 2048,
      quantized=True)
  rows = 2048 / 32 / 4
  assert p.items["saved activations (one microbatch)"] == pytest.approx(
      per_token * rows * 2048)


def test_a_plan_over_budget_is_one_line_naming_the_largest_item_and_a_fix():
  c = paper.get_config("size=1.3b,recipe=bf16,nodes=4")
  c.optim.grad_accum, c.model.remat = 1, "none"
  with pytest.raises(ValueError) as e:
    plan.check(c, platform="gpu")
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith("plan: ") and "exceeds mesh.device_memory_gb=80" in msg
  assert "largest: saved activations (one microbatch)" in msg
  assert "fits with optim.grad_accum=" in msg


def test_device_memory_gb_must_be_a_non_negative_number():
  c = default.get_config()
  c.mesh.device_memory_gb = -1.0
  with pytest.raises(ValueError, match="^mesh.device_memory_gb must be"):
    plan.plan(c)


def test_cli_prints_the_plan_and_exits_3_when_it_does_not_fit():
  base = [sys.executable, "-m", "fp4jax.plan",
          "--config=configs/paper.py:size=13b,nodes=4"]
  ok = subprocess.run(base, capture_output=True, text=True, check=False)
  assert ok.returncode == 0, ok.stderr
  assert "memory per device (analytic), 32 devices" in ok.stdout
  assert "fits: budget 72.0 GB" in ok.stdout
  bad = subprocess.run(base + ["--config.optim.grad_accum=1"],
                       capture_output=True, text=True, check=False)
  assert bad.returncode == 3
  assert "DOES NOT FIT" in bad.stdout


@pytest.mark.slow   # compiles two trainers: ~40 s on 2 cores
def test_compiled_arguments_agree_with_the_analytic_state_bytes():
  """XLA's per-device argument bytes of the compiled step (state + batch)
  against the plan's parameters + optimizer state, on 4 fake devices with
  FSDP 2: both count the same shards."""
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config("smoke,recipe=fp4_paper")
  c.mesh.data, c.mesh.fsdp = 2, 2
  c.optim.moments = "paper"
  p = plan.plan(c, devices=4)
  import jax  # pylint: disable=g-import-not-at-top
  if jax.device_count() != 4:
    c.mesh.data = jax.device_count() // 2
    p = plan.plan(c)
  xla = plan.compiled(c)
  state = p.items["parameters"] + p.items["optimizer state"]
  batch = 4 * 4 * c.data.global_batch * c.data.seq_len / (
      c.mesh.data * c.mesh.fsdp)   # four int32 / f32 [B, T] arrays
  assert xla["arguments"] == pytest.approx(state + batch, rel=XLA_ARGS_RTOL)
  assert xla["per_layer_temp"] > 0
