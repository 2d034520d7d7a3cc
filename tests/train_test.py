"""Tests of the train step, the loop, metrics and the synthetic data source.

One tiny model (1 layer, f32 compute) is compiled per mesh in a module
fixture and shared; the end-to-end runs share one more compile through
train.py's trainer cache (same shapes every run).
"""

import json
import math

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from fp4jax import data
from fp4jax import flops
from fp4jax import llama
from fp4jax import loop
from fp4jax import metrics
from fp4jax import optim
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import runconfig
from fp4jax import sharding
from fp4jax import sizes
from fp4jax import train
from fp4jax import train_state
from fp4jax.data import synthetic
import harness

# Sharded vs single-device losses, f32 compute: the programs differ only in
# the order of the cross-device sums (psum of partial matmuls / means);
# f32 reassociation over ~1e3 terms moves a value by a few ulps (~1e-6
# relative), far below a real sharding bug (wrong rows, double counting:
# >= 1e-2).
SHARDED_LOSS_RTOL = 2e-5
# float64 oracle vs f32 cross-entropy of O(1) logits over V=7.
XENT_RTOL = 1e-6

STEPS = 3


def _config(**updates):
  """The shared tiny run: 1 layer, f32 compute, bf16 recipe, batch 8."""
  c = demo.get_config("smoke,recipe=bf16")
  c.model.n_layers = 1
  c.model.compute_dtype = "float32"
  c.num_steps = 4
  c.log_every = 1
  c.eval_every = 2
  c.eval_steps = 1
  c.checkpoint_every = 3
  c.optim.warmup_frac = 0.0
  c.data.global_batch = 8
  c.data.seq_len = 16
  return harness.set_keys(c, updates)


def _trainer(cfg, mesh):
  model_cfg = runconfig.model_config(cfg.model.to_dict(), cfg.data.vocab_size)
  rules, _ = runconfig.quant_rules(cfg.quant)
  return train_state.make_trainer(
      model_cfg, rules, optim.OptimConfig(**cfg.optim.to_dict()),
      num_steps=cfg.num_steps, mesh=mesh,
      global_batch=cfg.data.global_batch, seq_len=cfg.data.seq_len,
      seed=cfg.seed, skip_nonfinite=True)


@pytest.fixture(scope="module")
def trainers():
  cfg = _config()
  meshes = {
      "1 device": sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
      "data=8": sharding.make_mesh(8, 1, 1),
      "data=2,fsdp=2,tensor=2": sharding.make_mesh(2, 2, 2),
  }
  return cfg, {name: _trainer(cfg, m) for name, m in meshes.items()}


def _batches(cfg, n):
  it = data.make_input(cfg.data, split="train", seed=0)
  return [next(it) for _ in range(n)]


_host = harness.host_tree


# ------------------------------------------------------------ step functions


def test_cross_entropy_matches_float64_oracle():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, 7)).astype(np.float32)
  targets = rng.integers(0, 7, (2, 3)).astype(np.int32)
  mask = np.array([[1, 1, 0], [1, 0, 1]], np.float32)
  got_sum, got_n = train_state.cross_entropy(logits, targets, mask)
  x = logits.astype(np.float64)
  lse = np.log(np.exp(x).sum(-1))
  nll = lse - np.take_along_axis(x, targets[..., None], -1)[..., 0]
  np.testing.assert_allclose(float(got_sum), (nll * mask).sum(),
                             rtol=XENT_RTOL)
  assert float(got_n) == mask.sum()


def test_sharded_meshes_give_the_same_losses(trainers):
  cfg, ts = trainers
  batches = _batches(cfg, STEPS)
  losses = {}
  for name, t in ts.items():
    state = t.init()
    losses[name] = []
    for b in batches:
      state, m = t.train_step(state, t.put_batch(b))
      losses[name].append(float(m["loss"]))
  ref = losses["1 device"]
  assert all(math.isfinite(v) for v in ref)
  assert ref[-1] < ref[0]   # it trains, so equal losses are not trivially so
  for name, got in losses.items():
    np.testing.assert_allclose(got, ref, rtol=SHARDED_LOSS_RTOL, err_msg=name)


def test_state_is_created_sharded(trainers):
  _, ts = trainers
  t = ts["data=2,fsdp=2,tensor=2"]
  state = t.init()
  for leaf, want in zip(jax.tree.leaves(state), jax.tree.leaves(
      t.state_shardings)):
    assert leaf.sharding.is_equivalent_to(want, leaf.ndim)
  kernel = state.params["layers"][0]["mlp"]["up_proj"]["kernel"][...]
  assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")


def test_skip_nonfinite_keeps_params_and_counts(trainers):
  cfg, ts = trainers
  t = ts["1 device"]
  good, nan = _batches(cfg, 2)
  nan = dict(nan, mask=nan["mask"].copy())
  nan["mask"][0, 0] = np.nan
  state = t.init()
  before = _host((state.params, state.opt_state))
  state, m = t.train_step(state, t.put_batch(nan))
  assert int(m["nonfinite"]) == 1 and not math.isfinite(float(m["loss"]))
  assert int(state.skipped) == 1 and int(state.step) == 1
  after = _host((state.params, state.opt_state))
  jax.tree.map(np.testing.assert_array_equal, after, before)
  state, m = t.train_step(state, t.put_batch(good))
  assert int(m["nonfinite"]) == 0 and int(state.skipped) == 1
  moved = jax.tree.map(lambda a, b: not np.array_equal(a, b),
                       _host(state.params), before[0])
  assert all(jax.tree.leaves(moved))


def test_metrics_fn_seam_flattens_per_layer_scalars():
  flat = metrics.flatten({"loss": np.float32(2.0),
                          "layers": {"0": {"amax": 3}, "1": {"amax": 4.5}}})
  assert flat == {"loss": 2.0, "layers/0/amax": 3, "layers/1/amax": 4.5}
  with pytest.raises(ValueError, match="layers/0"):
    metrics.flatten({"layers": {"0": np.ones(2)}})


def test_fp8_grads_cover_exactly_the_quantized_projection_kernels():
  model_cfg = sizes.get_config("tiny", vocab_size=64)
  rules = qconfig.default_rules("fp4_paper")
  params = nnx.state(nnx.eval_shape(lambda: llama.Llama(
      model_cfg, rules=rules, rngs=nnx.Rngs(0))), nnx.Param)
  mask = train_state.fp8_grad_mask(
      train_state.layer_table(model_cfg, rules), model_cfg)(params)
  chosen = {sharding.path_str(p).removesuffix(".value") for p, m in
            jax.tree_util.tree_flatten_with_path(mask)[0] if m}
  want = {f"{p}.kernel" for p in llama.projection_paths(model_cfg)
          if p != "lm_head"}
  assert chosen == want
  # Unquantized runs round nothing.
  none = train_state.fp8_grad_mask(train_state.layer_table(
      model_cfg, qconfig.default_rules("bf16")), model_cfg)
  assert not any(jax.tree.leaves(none(params)))


def test_proj_lr_scale_scales_exactly_the_projection_kernels():
  model_cfg = sizes.get_config("tiny", vocab_size=64)
  params = nnx.state(nnx.eval_shape(lambda: llama.Llama(
      model_cfg, rules=(), rngs=nnx.Rngs(0))), nnx.Param)
  ones = jax.tree.map(lambda a: np.ones(a.shape, np.float32), params)
  mask = train_state.projection_mask(model_cfg)

  def update(scale):
    cfg = optim.OptimConfig(proj_lr_scale=scale, warmup_frac=0.0)
    tx = optim.make_optimizer(cfg, 10, proj_mask=mask)
    state = tx.init(ones)
    out, _ = tx.update(ones, state, ones)
    return out, jax.tree.structure(state)

  half, half_state = update(0.5)
  full, full_state = update(1.0)
  # Inside the optax chain, with no state of its own: checkpoints restore
  # across proj_lr_scale values.
  assert half_state == full_state
  ratio = jax.tree.map(lambda a, b: float(np.max(np.asarray(a) /
                                                 np.asarray(b))), half, full)
  got = {sharding.path_str(p).removesuffix(".value"): v
         for p, v in jax.tree_util.tree_flatten_with_path(ratio)[0]}
  proj = {f"{p}.kernel" for p in llama.projection_paths(model_cfg)
          if p != "lm_head"}
  assert {k for k, v in got.items() if v == 0.5} == proj
  assert all(v == 1.0 for k, v in got.items() if k not in proj)


def test_flops_and_peaks():
  cfg = runconfig.model_config(_config().model.to_dict(), 256)
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  kv = cfg.n_kv_heads * cfg.head_dim
  want = 2 * d * d + 2 * d * kv + 3 * d * f + d * v
  assert flops.matmul_params(cfg) == want
  assert flops.flops_per_token(cfg, 16) == 6 * want + 12 * 16 * d
  assert flops.peak_flops("NVIDIA H200") == 989e12
  assert flops.peak_flops("NVIDIA H100 PCIe") == 756e12
  assert flops.peak_flops("cpu") is None
  assert flops.mfu(1e3, 1e9, 1, "cpu") is None


# --------------------------------------------------------------- end to end


def _all_records(workdir):
  with open(workdir / metrics.METRICS_FILE) as f:
    return [json.loads(line) for line in f]


def _records(workdir):
  """The per-step records (the start-up memory record has no loss)."""
  return [r for r in _all_records(workdir) if "loss" in r]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  # Profiled (steps 2-3), which must change nothing the resume test compares.
  workdir = tmp_path_factory.mktemp("full")
  state = train.train_and_evaluate(_config(profile_steps="1,3"),
                                   str(workdir))
  return workdir, _host(state)


def test_profile_steps_write_a_trace_tensorboard_and_perfetto_read(
    uninterrupted):
  workdir, _ = uninterrupted
  root = workdir / loop.PROFILE_DIR
  assert list(root.glob("plugins/profile/*/*.xplane.pb"))   # TensorBoard
  assert list(root.glob("plugins/profile/*/*.trace.json.gz"))   # Perfetto


def test_checkpoint_every_minutes_saves_between_step_intervals(tmp_path):
  # Due after every step (a microsecond), though checkpoint_every is far.
  cfg = _config(checkpoint_every=100, keep_checkpoints=10,
                checkpoint_every_minutes=1e-8, eval_steps=0)
  train.train_and_evaluate(cfg, str(tmp_path))
  from fp4jax import checkpoint  # pylint: disable=g-import-not-at-top
  assert checkpoint.complete_steps(str(tmp_path)) == [1, 2, 3, 4]


def test_metrics_records_have_required_keys(uninterrupted):
  workdir, _ = uninterrupted
  records = _records(workdir)
  assert [r["step"] for r in records] == [1, 2, 3, 4]
  for r in records:
    assert {"step", "loss", "lr", "tokens_per_sec", "grad_norm"} <= set(r)
  assert "val_loss" in records[1] and "val_loss" in records[3]
  assert records[-1]["loss"] < records[0]["loss"]
  assert list((workdir / metrics.TB_DIR).glob("events.out.tfevents.*"))
  info = json.loads((workdir / "config.json").read_text())
  assert info["model"]["n_layers"] == 1 and info["quant"]["recipe"] == "bf16"
  # One memory record at the start: f32 params + f32 Adam m and v = 12
  # bytes per parameter (plus the int32 step count and scalar scales).
  mem = [r for r in _all_records(workdir) if "state_bytes_per_param" in r]
  assert len(mem) == 1 and mem[0]["step"] == 0, mem
  assert 12.0 <= mem[0]["state_bytes_per_param"] < 12.01, mem


def test_resume_is_bit_identical(uninterrupted, tmp_path):
  full_dir, full = uninterrupted
  train.train_and_evaluate(_config(), str(tmp_path), stop_at_step=2)
  assert (tmp_path / "checkpoints" / "2").is_dir()   # forced save (every=3)
  resumed = _host(train.train_and_evaluate(_config(), str(tmp_path)))
  assert int(resumed.step) == 4
  jax.tree.map(np.testing.assert_array_equal, resumed.params, full.params)
  jax.tree.map(np.testing.assert_array_equal, resumed.opt_state,
               full.opt_state)
  want = {r["step"]: r["loss"] for r in _records(full_dir)}
  got = {r["step"]: r["loss"] for r in _records(tmp_path)}
  assert got == want   # steps 3, 4 saw the same batches after the restart
  assert [r["step"] for r in _records(tmp_path)] == [1, 2, 3, 4]


class _NanAt:
  """Wraps the synthetic source; the batch at `position` has a NaN mask."""

  def __init__(self, inner, position):
    self._inner, self._position = inner, position
    self.vocab_size = inner.vocab_size

  def __iter__(self):
    return self

  def __next__(self):
    at = self._inner.get_state()["position"]
    batch = next(self._inner)
    if at == self._position:
      batch["mask"] = batch["mask"].copy()
      batch["mask"][0, 0] = np.nan
    return batch

  def get_state(self):
    return self._inner.get_state()

  def set_state(self, state):
    self._inner.set_state(state)


def make_input(data_cfg, **kwargs):
  """A data source for data.SOURCES: NaN in the third training batch."""
  inner = synthetic.make_input(data_cfg, **kwargs)
  return _NanAt(inner, 2) if kwargs["split"] == "train" else inner


def test_nonfinite_stops_naming_step_and_keeps_good_checkpoints(
    uninterrupted, tmp_path, monkeypatch):
  del uninterrupted  # only for its compiled trainer (same shapes)
  monkeypatch.setitem(data.SOURCES, "nan_at_2", __name__)
  cfg = _config(**{"data.source": "nan_at_2", "checkpoint_every": 1})
  with pytest.raises(loop.NonFiniteError, match=r"^step 3: loss is nan"):
    train.train_and_evaluate(cfg, str(tmp_path))
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir())
  assert steps == [1, 2]


# ------------------------------------------------------------ synthetic data


def test_synthetic_is_deterministic_and_split_by_process():
  cfg = _config().data
  whole = next(data.make_input(cfg, split="train", seed=3))
  again = next(data.make_input(cfg, split="train", seed=3))
  parts = [next(data.make_input(cfg, split="train", seed=3, process_index=i,
                                process_count=2)) for i in range(2)]
  for key in ("inputs", "targets", "mask", "segment_ids"):
    np.testing.assert_array_equal(whole[key], again[key])
    np.testing.assert_array_equal(
        whole[key], np.concatenate([p[key] for p in parts]))
  assert whole["inputs"].dtype == np.int32 and whole["mask"].dtype == np.float32
  assert whole["inputs"].shape == (cfg.global_batch, cfg.seq_len)
  np.testing.assert_array_equal(whole["inputs"][:, 1:],
                                whole["targets"][:, :-1])
  val = next(data.make_input(cfg, split="val", seed=3))
  assert not np.array_equal(val["inputs"], whole["inputs"])


def test_synthetic_state_resumes_exactly():
  cfg = _config().data
  it = data.make_input(cfg, split="train", seed=0)
  next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = next(it)
  other = data.make_input(cfg, split="train", seed=0)
  other.set_state(state)
  np.testing.assert_array_equal(next(other)["inputs"], want["inputs"])


def test_synthetic_resumes_on_another_process_count():
  cfg = _config().data
  parts = [data.make_input(cfg, split="train", seed=0, process_index=i,
                           process_count=2) for i in range(2)]
  for it in parts:
    next(it)
  states = [json.loads(json.dumps(it.get_state())) for it in parts]
  want = np.concatenate([next(it)["inputs"] for it in parts])
  one = data.make_input(cfg, split="train", seed=0)
  one.set_state(data.process_state(states, 0, 1))
  np.testing.assert_array_equal(next(one)["inputs"], want)
  states[1]["position"] = 5
  with pytest.raises(ValueError, match=r"disagree on the position: \[1, 5\]"):
    one.set_state(data.process_state(states, 0, 1))


def test_synthetic_is_learnable_and_segments_mask_targets():
  cfg = _config(**{"data.segment_ids": True, "data.seq_len": 256}).data
  b = next(data.make_input(cfg, split="train", seed=0))
  succ, _ = synthetic.markov_table(cfg.vocab_size)
  inside = b["mask"] == 1
  # Every in-document transition is one of the chain's few successors.
  ok = (succ[b["inputs"]] == b["targets"][..., None]).any(-1)
  assert ok[inside].all()
  new_doc = b["segment_ids"][:, 1:] != b["segment_ids"][:, :-1]
  np.testing.assert_array_equal(b["mask"][:, :-1] == 0, new_doc)
  assert b["segment_ids"].min() == 1 and b["segment_ids"].max() > 1
  assert synthetic.entropy_rate(cfg.vocab_size) < math.log(4)


def test_unknown_source_names_the_key():
  cfg = _config(**{"data.source": "parquet"}).data
  with pytest.raises(ValueError, match="data.source"):
    data.make_input(cfg, split="train", seed=0)


# ------------------------------------------------------------- slow checks


@pytest.mark.slow
def test_skip_nonfinite_end_to_end_counts_skips(monkeypatch, tmp_path):
  monkeypatch.setitem(data.SOURCES, "nan_at_2", __name__)
  # 1 of 4 steps skipped: exactly the allowed share.
  cfg = _config(**{"data.source": "nan_at_2", "skip_nonfinite": True,
                   "max_skipped_fraction": 0.25})
  state = train.train_and_evaluate(cfg, str(tmp_path))
  assert int(state.step) == 4 and int(state.skipped) == 1
  records = {r["step"]: r for r in _records(tmp_path)}
  assert records[3]["skipped"] == 1 and records[4]["skipped_total"] == 1
  assert math.isfinite(records[4]["loss"])


@pytest.mark.slow
def test_fp4_paper_sharded_matches_single_device():
  # FP4 rounding is a step function: a reassociated sum that lands an
  # element on the other side of a rounding threshold moves the loss by more
  # than f32 noise (measured: 2e-7 with no flip; one flipped element among
  # ~1e4 is < 1e-5); a sharding bug (wrong scale axis) moves it by > 1e-2.
  rtol = 1e-4
  cfg = _config(**{"quant.recipe": "fp4_paper"})
  single = _trainer(cfg, sharding.make_mesh(1, 1, 1,
                                            devices=jax.devices()[:1]))
  sharded = _trainer(cfg, sharding.make_mesh(2, 2, 2))
  batches = _batches(cfg, 2)
  losses = []
  for t in (single, sharded):
    state, out = t.init(), []
    for b in batches:
      state, m = t.train_step(state, t.put_batch(b))
      out.append(float(m["loss"]))
    losses.append(out)
  np.testing.assert_allclose(losses[1], losses[0], rtol=rtol)


def test_metric_writer_drops_records_after_the_resume_step(tmp_path):
  # A run logged steps 1-5 but its last checkpoint is step 3: the resumed
  # run redoes 4 and 5, so their first records must not stay behind.
  w = metrics.MetricWriter(str(tmp_path))
  for step in range(1, 6):
    w.write(step, {"loss": float(step)})
  w.close()
  w = metrics.MetricWriter(str(tmp_path), resume_step=3)
  w.write(4, {"loss": 40.0})
  w.close()
  got = [(r["step"], r["loss"]) for r in _all_records(tmp_path)]
  assert got == [(1, 1.0), (2, 2.0), (3, 3.0), (4, 40.0)]


def test_synthetic_state_rejects_other_settings():
  it = synthetic.SyntheticInput(vocab_size=16, seq_len=8, global_batch=4,
                                seed=0)
  next(it)
  other = synthetic.SyntheticInput(vocab_size=16, seq_len=8, global_batch=8,
                                   seed=0)
  with pytest.raises(ValueError, match="global_batch 4 -> 8"):
    other.set_state(it.get_state())


def test_block_scales_must_not_straddle_shards():
  # tiny: q/k/v kernels [64, .] with "embed" (dim 0) on fsdp. fsdp=4 leaves
  # 16 rows per shard, less than one MXFP4 block of 32 along K.
  cfg = llama.LlamaConfig(**sizes.SIZES["tiny"])
  rules = qconfig.default_rules("mxfp4")
  with pytest.raises(ValueError, match=r"_proj.kernel dim 0: quantization "
                     r"blocks of 32 straddle the 4 shards"):
    train_state.make_trainer(
        cfg, rules, optim.OptimConfig(), num_steps=2,
        mesh=sharding.make_mesh(data=2, fsdp=4), global_batch=8,
        seq_len=16, seed=0)


# ---------------------------------------------------------- switch back
_FP4 = {"quant.recipe": "fp4_paper"}


def test_switch_back_step_and_rules():
  assert runconfig.switch_back_step({"switch_back": 0.1}, 1000) == 900
  assert runconfig.switch_back_step({"switch_back": 0.0}, 1000) is None
  assert runconfig.switch_back_step({}, 10) is None
  with pytest.raises(ValueError, match="quant.switch_back must"):
    runconfig.switch_back_step({"switch_back": 1.0}, 10)
  with pytest.raises(ValueError, match="quant.switch_back_mode"):
    runconfig.switch_back_step({"switch_back": 0.5, "switch_back_mode": "x"}, 10)
  rules = qconfig.default_rules("fp4_paper")
  (_, fwd), = runconfig.switched_rules(rules, "forward")
  assert fwd.x is fwd.w is fwd.occ is fwd.dge is None
  assert fwd.g_dgrad == qdot.get_recipe("fp4_paper").g_dgrad
  assert runconfig.switched_rules(rules, "all") == ((rules[0][0], None),)


def test_switch_back_runs_bf16_forward_late_and_resumes_at_the_switch(
    tmp_path):
  switch = dict(_FP4, **{"quant.switch_back": 0.5})
  plain_dir, full_dir, cut_dir = (tmp_path / n for n in ("p", "f", "c"))
  train.train_and_evaluate(_config(**_FP4), str(plain_dir))
  train.train_and_evaluate(_config(**switch), str(full_dir))
  plain = {r["step"]: r["loss"] for r in _records(plain_dir)}
  full = {r["step"]: r["loss"] for r in _records(full_dir)}
  # Steps 1-2 run fp4_paper in both; 3-4 (the last half) differ. The loss of
  # step s is computed before its update, so step 3 is the first to differ.
  assert [full[s] for s in (1, 2)] == [plain[s] for s in (1, 2)]
  assert full[3] != plain[3] and full[4] != plain[4]
  # Stopped past the switch and resumed: the same losses.
  train.train_and_evaluate(_config(**switch), str(cut_dir), stop_at_step=3)
  train.train_and_evaluate(_config(**switch), str(cut_dir))
  assert {r["step"]: r["loss"] for r in _records(cut_dir)} == full
