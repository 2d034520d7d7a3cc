"""Scanned decoder layers (model.scan_layers): the unrolled model's values.

Oracle: the same parameters run unrolled. A scanned model stacks each
layer parameter on a leading layer axis; `llama.stack_layers` /
`unstack_layers` (and, for whole train states, `recast`) move one set of
values between the layouts.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fp4jax import llama
from fp4jax import qconfig
from fp4jax import sizes
from fp4jax import train_state
import harness

# Unrolled vs scanned, f32 compute: the same operations on the same values;
# XLA may fuse the scan body differently (e.g. reassociate a norm's f32
# mean), a few ulps; a wrong layer's parameters or key is off by O(1).
SCAN_RTOL = 1e-6
SCAN_ATOL_OF_MAX = 1e-6
B, T = 2, 8


def _model(scan: bool, recipe: str, n_layers: int = 3):
  cfg = sizes.get_config("tiny", vocab_size=64, n_layers=n_layers,
                         compute_dtype="float32", scan_layers=scan)
  rules = qconfig.default_rules(recipe, n_layers) if recipe != "bf16" else None
  return llama_model(cfg, rules)


def llama_model(cfg, rules):
  return llama.Llama(cfg, rules=rules, rngs=nnx.Rngs(params=0))


def _copy_params(unrolled, scanned):
  """The unrolled model's parameter values into the scanned one."""
  state = nnx.state(scanned, nnx.Param)
  nnx.replace_by_pure_dict(state, llama.stack_layers(
      nnx.to_pure_dict(nnx.state(unrolled, nnx.Param))))
  nnx.update(scanned, state)


def _loss_and_grads(model):
  graphdef, params = nnx.split(model, nnx.Param)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, 64, (B, T)), jnp.int32)
  targets = jnp.roll(tokens, -1, axis=1)
  mask = jnp.ones((B, T), jnp.float32)

  def loss(p):
    logits = nnx.merge(graphdef, p)(tokens, key=jax.random.key(3))
    nll, n = train_state.cross_entropy(logits, targets, mask)
    return nll / n

  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  return float(value), harness.host_tree(grads)


# nvfp4 draws stochastic rounding for its gradients: the scanned layers must
# use each layer's own draws, not layer 0's.
@pytest.mark.parametrize("recipe", [
    "bf16", pytest.param("fp4_paper", marks=pytest.mark.slow), "nvfp4"])
def test_scanned_layers_give_the_unrolled_loss_and_gradients(recipe):
  unrolled = _model(False, recipe)
  scanned = _model(True, recipe)
  _copy_params(unrolled, scanned)
  want_loss, want = _loss_and_grads(unrolled)
  got_loss, got = _loss_and_grads(scanned)
  got = llama.unstack_layers(nnx.to_pure_dict(got))
  want = nnx.to_pure_dict(want)
  np.testing.assert_allclose(got_loss, want_loss, rtol=SCAN_RTOL)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(
        g, w, rtol=SCAN_RTOL, atol=SCAN_ATOL_OF_MAX * float(np.max(np.abs(w))),
        err_msg=str(path))


@pytest.mark.slow   # ~30-50 s: a mutation check of the test above
def test_layers_use_their_own_draws():
  """The check above can fail: scanning with every layer given layer 0's
  path ids changes a stochastic recipe's gradients."""
  unrolled = _model(False, "nvfp4")
  _, want = _loss_and_grads(unrolled)
  scanned = _model(True, "nvfp4")
  _copy_params(unrolled, scanned)
  original = llama.path_id
  try:
    llama.path_id = lambda path: original(
        "layers.0." + path.split(".", 2)[2] if path.startswith("layers.")
        else path)
    _, got = _loss_and_grads(scanned)
  finally:
    llama.path_id = original
  got = llama.unstack_layers(nnx.to_pure_dict(got))
  want = nnx.to_pure_dict(want)
  assert any(not np.allclose(a, b) for a, b in zip(
      jax.tree.leaves(got), jax.tree.leaves(want)))


def test_per_layer_rules_are_refused_in_one_line():
  cfg = sizes.get_config("tiny", vocab_size=64, n_layers=3, scan_layers=True)
  rules = [(r"layers\.2\..*", None)] + list(qconfig.default_rules(
      "fp4_paper", 3))
  with pytest.raises(ValueError, match=r"^model.scan_layers=True runs every "
                     r"layer with one program, but layers.2.attn.q_proj has "
                     r"recipe 'none' and layers.0.attn.q_proj 'fp4_paper'"):
    llama_model(cfg, rules)


def test_scan_layers_is_a_bool():
  with pytest.raises(ValueError, match="LlamaConfig.scan_layers must be a "
                     "bool"):
    dataclasses.replace(sizes.get_config("tiny", vocab_size=64),
                        scan_layers="yes")


def test_a_run_may_change_execution_fields_between_starts(tmp_path):
  """scan_layers, remat and attention say how the model runs, not what it
  computes: a workdir started unrolled resumes scanned (one parameter
  layout for both), while a real model change is still refused."""
  from fp4jax import checkpoint  # pylint: disable=g-import-not-at-top
  from fp4jax import runconfig  # pylint: disable=g-import-not-at-top
  cfg = sizes.get_config("tiny", vocab_size=64)
  checkpoint.write_run_info(str(tmp_path), {
      "model": dataclasses.asdict(cfg), "quant": {}, "config": {}})
  later = dataclasses.replace(cfg, scan_layers=True, remat="full",
                              attention="xla")
  checkpoint.check_run_info(str(tmp_path), {
      "model": runconfig.model_identity(later), "quant": {}, "config": {}},
                            runconfig.EXECUTION_FIELDS)
  other = dataclasses.replace(cfg, d_ff=cfg.d_ff * 2)
  with pytest.raises(ValueError, match="model.d_ff is"):
    checkpoint.check_run_info(str(tmp_path), {
        "model": runconfig.model_identity(other), "quant": {}, "config": {}},
                              runconfig.EXECUTION_FIELDS)


# Two optimizer steps, unrolled vs scanned from the same state: the same
# f32 gradients up to the scan's fusion (a few ulps), then the same
# per-tensor FP8 / FP16 roundings. Such an ulp can push an element of m
# across an E4M3 rounding boundary: that element's update then moves by
# one E4M3 step of m (at most 2^-3 relative: |u| <= 1, so <= LR / 8 per
# step) and the rest of the tensor does not. So: every element within
# 2 LR / 8, and at most BOUNDARY_FRACTION of any leaf beyond STEP_RTOL.
# One scale for a whole stack instead of one per layer re-rounds the m of
# every layer whose amax is not the stack's: most of its elements move.
LR = 1e-2
STEP_RTOL = 1e-5
BOUNDARY_FRACTION = 1e-3


def _trainers(recipe, moments="paper"):
  from fp4jax import optim  # pylint: disable=g-import-not-at-top
  from fp4jax import sharding  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  out = []
  for scan in (False, True):
    cfg = sizes.get_config("tiny", vocab_size=64, n_layers=2,
                           compute_dtype="float32", scan_layers=scan)
    out.append(train_state.make_trainer(
        cfg, qconfig.default_rules(recipe, 2),
        optim.OptimConfig(moments=moments, grad_fp8=True,
                          warmup_frac=0.0, lr=LR),
        num_steps=10, mesh=mesh, global_batch=B, seq_len=T, seed=0))
  return out


def test_a_scanned_train_step_is_the_unrolled_one(tmp_path):
  """The paper's optimizer (FP8 m, FP16 v, FP8 weight gradients): a
  stacked leaf keeps one scale per layer, so two steps of the scanned run,
  split per layer (recast), are the unrolled run's. (A bf16 / fp16 master
  rounds stochastically with one key per leaf: the same distribution in
  both layouts, other draws.) The unrolled state's checkpoint restores into
  the scanned layout exactly."""
  from fp4jax import checkpoint  # pylint: disable=g-import-not-at-top
  from fp4jax import recast  # pylint: disable=g-import-not-at-top
  unrolled, scanned = _trainers("fp4_paper")
  rng = np.random.default_rng(1)
  tokens = rng.integers(0, 64, (B, T + 1)).astype(np.int32)
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:],
           "mask": np.ones((B, T), np.float32),
           "segment_ids": np.ones((B, T), np.int32)}
  su = unrolled.init()
  ss = recast.convert(su, scanned.abstract_state)
  # The stacked state holds [L] moment scales (per layer), not scalars.
  assert {a.shape for a in jax.tree.leaves(ss.opt_state[2].mu_scale)} == {
      (), (2,)}
  for _ in range(2):
    su, mu = unrolled.train_step(su, unrolled.put_batch(batch))
    ss, ms = scanned.train_step(ss, scanned.put_batch(batch))
    np.testing.assert_allclose(float(ms["loss"]), float(mu["loss"]),
                               rtol=SCAN_RTOL)
  back = harness.host_tree(recast.convert(ss, unrolled.abstract_state))
  want = harness.host_tree(su)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(back.params)[0],
                          jax.tree.leaves(want.params)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    where = jax.tree_util.keystr(path)
    np.testing.assert_array_less(np.abs(g - w), 2 * LR / 8 + 1e-12,
                                 err_msg=where)
    off = np.abs(g - w) > STEP_RTOL * np.abs(w) + 1e-7
    assert off.mean() <= BOUNDARY_FRACTION, (where, int(off.sum()), off.size)
  # The unrolled checkpoint, read into the scanned layout (recast).
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.save(2, su, {"position": 0}, force=True)
  ckpt.wait()
  ckpt.close()
  stored = recast.stored_leaves(str(tmp_path), 2)
  assert recast.check(stored, scanned.abstract_state, step=2, where="x") == [
      "model.scan_layers: the layers stacked on a leading layer axis (saved "
      "one per layer) (values unchanged)"]
  read = checkpoint.restore_state(str(tmp_path), 2, recast.target(
      scanned.abstract_state, stored, lambda: unrolled.abstract_state))
  got = harness.host_tree(recast.convert(read, scanned.abstract_state))
  want = harness.host_tree(recast.convert(su, scanned.abstract_state))
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w, err_msg=jax.tree_util.keystr(path))


@pytest.mark.slow   # ~60-100 s: the CLI twin of the checkpoint check above
def test_a_run_resumes_and_exports_in_the_other_layer_layout(tmp_path):
  """A workdir trained unrolled resumes scanned: the checkpoint is
  restacked exactly (recast), the run goes on, and evaluation / export
  read either layout's steps (the HF tensors of a stacked step are its
  layers one by one)."""
  from fp4jax import checkpoint  # pylint: disable=g-import-not-at-top
  from fp4jax import hf  # pylint: disable=g-import-not-at-top
  from fp4jax import recast  # pylint: disable=g-import-not-at-top
  from fp4jax import train  # pylint: disable=g-import-not-at-top
  from fp4jax.evaluation import loader  # pylint: disable=g-import-not-at-top
  import smoke_run  # pylint: disable=g-import-not-at-top
  workdir = str(tmp_path / "run")
  base = {"model.n_layers": 2, "optim.moments": "paper"}
  train.train_and_evaluate(smoke_run.config(
      **base, num_steps=2, checkpoint_every=2), workdir)
  stored = recast.stored_leaves(workdir, 2)
  assert recast.stored_stacked(stored) is False
  state = train.train_and_evaluate(smoke_run.config(
      **base, num_steps=3, checkpoint_every=1,
      **{"model.scan_layers": True}), workdir)
  assert int(state.step) == 3
  assert checkpoint.complete_steps(workdir) == [2, 3]
  assert recast.stored_stacked(recast.stored_leaves(workdir, 3)) is True
  # Restacking is exact both ways: step 2 read into the stacked layout and
  # split again is step 2 as saved.
  per_layer = loader.load(workdir, step=2, need_tokenizer=False,
                          warn=lambda _: None)
  stacked = loader.load(workdir, step=3, need_tokenizer=False,
                        warn=lambda _: None)
  assert not per_layer.model_cfg.scan_layers and stacked.model_cfg.scan_layers
  flat2 = nnx.to_pure_dict(per_layer.params)
  assert sorted(flat2["layers"]) == [0, 1]
  hf2 = hf.to_hf_tensors(flat2, per_layer.model_cfg)
  hf3 = hf.to_hf_tensors(nnx.to_pure_dict(stacked.params), stacked.model_cfg)
  assert sorted(hf2) == sorted(hf3)
  w = np.asarray(nnx.to_pure_dict(stacked.params)["layers"]["mlp"]["up_proj"]
                 ["kernel"], np.float32)
  np.testing.assert_array_equal(hf3["model.layers.1.mlp.up_proj.weight"],
                                w[1].T)
  # Imported back into a scanned model: the stacked layout again.
  again = hf.from_hf_tensors(hf3, stacked.model_cfg)
  np.testing.assert_array_equal(again["layers"]["mlp"]["up_proj"]["kernel"],
                                w)


def test_telemetry_sees_each_stacked_layer_under_its_own_path():
  """A telemetry probe runs the stacked layers one by one: the same
  per-layer paths and statistics as the unrolled model."""
  from fp4jax import telemetry  # pylint: disable=g-import-not-at-top
  unrolled = _model(False, "fp4_paper", n_layers=2)
  scanned = _model(True, "fp4_paper", n_layers=2)
  _copy_params(unrolled, scanned)
  tokens = jnp.asarray(np.random.default_rng(2).integers(0, 64, (B, T)),
                       jnp.int32)

  def stats(model):
    graphdef, params = nnx.split(model, nnx.Param)

    @jax.jit
    def run(params):
      with telemetry.probing() as probe:
        nnx.merge(graphdef, params)(tokens)
      return probe.stats
    return harness.host_tree(run(params))

  want, got = stats(unrolled), stats(scanned)
  assert sorted(got) == sorted(want)
  assert "layers.1.mlp.down_proj" in got
  for (path, g), w in zip(jax.tree_util.tree_flatten_with_path(got)[0],
                          jax.tree.leaves(want)):
    np.testing.assert_allclose(g, w, rtol=SCAN_RTOL, atol=1e-7,
                               err_msg=jax.tree_util.keystr(path))
