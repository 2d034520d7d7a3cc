"""Gradient accumulation (optim.grad_accum): n microbatches == one batch.

The oracle is the same step on the whole batch (grad_accum=1): loss and
every gradient leaf, on a sharded mesh, in f32 compute. Each trainer is
compiled once per module (tiny model, 1 layer: accumulation sums whole
gradient trees, the same for every layer; fp4_paper keeps no bf16 tail,
so the one block is quantized).
"""

import re

import jax
import numpy as np
import pytest
from flax import nnx

from configs import demo
from fp4jax import data
from fp4jax import optim
from fp4jax import runconfig
from fp4jax import sharding
from fp4jax import train_state
import harness

# n microbatches vs one batch, f32 compute: the programs differ only in the
# order of the f32 sums over rows (a weight-gradient GEMM over B rows vs n
# GEMMs over B/n rows, added), which moves a value by a few ulps relative
# to the largest term it sums; a wrong microbatch scale or a dropped or
# doubled microbatch is off by >= 1/n.
ACCUM_RTOL = 1e-6
# Relative to each leaf's largest |value|: elements that cancel to ~0 carry
# the rounding of their largest terms, not of themselves.
ACCUM_ATOL_OF_MAX = 1e-6
# bf16 gradient communication rounds each partial sum of the ring to bf16
# (8 bits): an ulp-level f32 difference before a rounding can move it by one
# bf16 ulp of that partial sum, which may exceed the final element (the
# shards' gradients cancel); partial sums stay within a few times the leaf's
# largest element, so the bound is a bf16 ulp relative to that.
BF16_COMM_RTOL = 2.0 ** -7

GLOBAL_BATCH = 16
SEQ = 16


def _cfg():
  c = demo.get_config("smoke,recipe=bf16")
  c.model.n_layers = 1
  c.model.compute_dtype = "float32"
  c.data.global_batch = GLOBAL_BATCH
  c.data.seq_len = SEQ
  return c


def _grads_metrics(params, grads):
  del params
  return {"grads": grads}


def _rules(recipe, n_layers, **overrides):
  quant = {"recipe": recipe, "overrides": overrides, "rules": ()}
  return runconfig.quant_rules(quant, n_layers)[0]


def _trainer(recipe, accum, mesh, comm_dtype="float32", **overrides):
  cfg = _cfg()
  model_cfg = runconfig.model_config(cfg.model.to_dict(), cfg.data.vocab_size)
  return train_state.make_trainer(
      model_cfg, _rules(recipe, model_cfg.n_layers, **overrides),
      optim.OptimConfig(grad_accum=accum, warmup_frac=0.0),
      num_steps=10, mesh=mesh, global_batch=GLOBAL_BATCH, seq_len=SEQ,
      seed=0, metrics_fn=_grads_metrics, comm_dtype=comm_dtype)


def _batch():
  it = data.make_input(_cfg().data, split="train", seed=0)
  return next(it)


def _step(trainer, batch):
  state = trainer.init()
  _, m = trainer.train_step(state, trainer.put_batch(batch))
  return harness.host_tree(m)


def _assert_same(got, want, rtol=ACCUM_RTOL, atol_of_max=ACCUM_ATOL_OF_MAX):
  np.testing.assert_allclose(got["loss"], want["loss"], rtol=rtol)
  flat_got = jax.tree_util.tree_flatten_with_path(got["grads"])[0]
  flat_want = jax.tree.leaves(want["grads"])
  assert len(flat_got) == len(flat_want)
  for (path, g), w in zip(flat_got, flat_want):
    scale = float(np.max(np.abs(w)))
    assert scale > 0, path   # a zero gradient would compare trivially
    np.testing.assert_allclose(
        g, w, rtol=rtol, atol=atol_of_max * scale,
        err_msg=sharding.path_str(path))


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(2, 2, 1, devices=jax.devices()[:4])


def _collectives(hlo: str) -> dict[str, int]:
  """{computation header: number of cross-device collectives in it}."""
  out = {}
  for comp in re.split(r"\n(?=\S.*\{\n)", hlo):
    head = comp.split("\n", 1)[0]
    out[head] = len(re.findall(
        r" (?:all-reduce|reduce-scatter|all-gather|collective-permute)"
        r"(?:-start)?\(", comp))
  return out


# fp4_paper with its per-tensor E5M2 gradient scales made per-row: every
# scale then depends on one row, as the paper's per-token activation and
# per-channel weight scales, DGE and OCC do; see the next test for the
# per-tensor case.
PER_ROW_GRADS = {"g_dgrad__axis": -1, "g_wgrad__axis": -1}


@pytest.mark.parametrize("recipe,overrides", [
    # bf16's equality is also checked (on the per-shard path) below.
    pytest.param("bf16", {}, marks=pytest.mark.slow),
    ("fp4_paper", PER_ROW_GRADS)])
def test_microbatches_equal_one_batch(mesh, recipe, overrides):
  batch = _batch()
  want = _step(_trainer(recipe, 1, mesh, **overrides), batch)
  got = _step(_trainer(recipe, 4, mesh, **overrides), batch)
  _assert_same(got, want)


def test_replicated_params_reduce_once_per_step_not_per_microbatch():
  """Pure data parallelism: the microbatch loop (the while body) moves
  nothing between devices; the one reduction is outside it."""
  data_only = sharding.make_mesh(4, 1, 1, devices=jax.devices()[:4])
  batch = _batch()
  one = _trainer("bf16", 1, data_only)
  four = _trainer("bf16", 4, data_only)
  _assert_same(_step(four, batch), _step(one, batch))
  counts = _collectives(four.train_step.as_text())
  loops = {h: k for h, k in counts.items() if "ENTRY" not in h and k}
  entry = sum(k for h, k in counts.items() if "ENTRY" in h)
  # (With fsdp=2 the loop body holds the per-microbatch all-gathers and
  # reduce-scatters: this assertion is what tells the two apart.)
  assert entry > 0 and not loops, loops


@pytest.mark.slow   # ~40 s: two more trainers
def test_low_precision_communication_accumulates_microbatches(mesh):
  """comm.grad_dtype=bfloat16 (the per-shard path of fp4jax.comm, fsdp 2):
  each microbatch's gradient is reduce-scattered onto the shards and
  summed there in f32, so the step matches one batch up to the payload's
  own rounding."""
  batch = _batch()
  want = _step(_trainer("bf16", 1, mesh, comm_dtype="bfloat16"), batch)
  got = _step(_trainer("bf16", 2, mesh, comm_dtype="bfloat16"), batch)
  _assert_same(got, want, rtol=BF16_COMM_RTOL, atol_of_max=BF16_COMM_RTOL)


@pytest.mark.slow   # ~60 s: two trainers and an eager oracle
def test_per_tensor_gradient_scales_are_per_microbatch(mesh):
  """fp4_paper's E5M2 gradient scale is one per tensor the backward sees:
  with microbatches, one per microbatch, as the released code's is per
  Megatron micro-batch. Oracle: each microbatch's gradient computed alone
  (its own rows, the whole batch's token count), summed."""
  batch = _batch()
  trainer = _trainer("fp4_paper", 2, mesh)
  got = _step(trainer, batch)
  state = trainer.init()
  params = harness.host_tree(state.params)
  graphdef = trainer.graphdef
  key = jax.random.split(jax.random.fold_in(state.rng, 0))[0]
  micro = train_state.split_microbatches(
      {k: np.asarray(v) for k, v in batch.items()}, 2, 4)
  tokens = float(np.sum(batch["mask"]))

  def loss(p, rows, k):
    model = nnx.merge(graphdef, p)
    nll, _ = train_state.cross_entropy(model(rows["inputs"], key=k),
                                       rows["targets"], rows["mask"])
    return nll / tokens

  want_loss, want_grads = 0.0, None
  for i in range(2):
    rows = {k: v[i] for k, v in micro.items()}
    value, g = jax.value_and_grad(loss)(params, rows,
                                        jax.random.fold_in(key, i))
    want_loss += float(value)
    want_grads = g if want_grads is None else jax.tree.map(
        lambda a, b: a + b, want_grads, g)
  _assert_same(got, {"loss": want_loss,
                     "grads": harness.host_tree(want_grads)})
  # ... and that differs from one scale over the whole batch.
  whole = _step(_trainer("fp4_paper", 1, mesh), batch)
  assert any(not np.array_equal(a, b) for a, b in zip(
      jax.tree.leaves(got["grads"]), jax.tree.leaves(whole["grads"])))


def test_a_microbatch_count_that_does_not_divide_the_device_rows_is_one_line(
    mesh):
  cfg = _cfg()
  model_cfg = runconfig.model_config(cfg.model.to_dict(), cfg.data.vocab_size)
  with pytest.raises(ValueError, match=r"^optim.grad_accum=3 does not divide "
                     r"the 4 rows each of the 4 batch shards gets"):
    train_state.check_fit(model_cfg, None, mesh=mesh,
                          global_batch=GLOBAL_BATCH, seq_len=SEQ,
                          grad_accum=3)


def test_grad_accum_must_be_a_positive_int():
  for bad in (0, -1, 1.5, True):
    with pytest.raises(ValueError, match=r"^optim.grad_accum must be an int"):
      optim.OptimConfig(grad_accum=bad)


def test_split_keeps_rows_on_their_shard():
  x = np.arange(16)[:, None] * np.ones((1, 3), np.int32)
  micro = train_state.split_microbatches({"inputs": x}, 2, 4)["inputs"]
  # Shard s holds rows 4s..4s+3; microbatch 0 takes 4s, 4s+1 of each.
  np.testing.assert_array_equal(micro[0][:, 0], [0, 1, 4, 5, 8, 9, 12, 13])
  np.testing.assert_array_equal(micro[1][:, 0], [2, 3, 6, 7, 10, 11, 14, 15])
