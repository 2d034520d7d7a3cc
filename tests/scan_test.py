"""Scanned decoder layers (model.scan_layers): the unrolled model's values.

Oracle: the same parameters run unrolled (the canonical layout: a scanned
model's parameters are the unrolled model's, so one set serves both).
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
  # One set of parameters for both (the same layout).
  nnx.update(scanned, nnx.state(unrolled, nnx.Param))
  want_loss, want = _loss_and_grads(unrolled)
  got_loss, got = _loss_and_grads(scanned)
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
  nnx.update(scanned, nnx.state(unrolled, nnx.Param))
  original = llama.path_id
  try:
    llama.path_id = lambda path: original(
        "layers.0." + path.split(".", 2)[2] if path.startswith("layers.")
        else path)
    _, got = _loss_and_grads(scanned)
  finally:
    llama.path_id = original
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
