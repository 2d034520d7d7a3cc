"""Rematerialisation (LlamaConfig.remat) and FP4-packed saved activations.

Oracles: the unrematerialised model (remat "none") for losses and
gradients; numpy bit operations and np_ref's format tables for the code
packing; the residuals JAX keeps and XLA's own memory analysis for the
saved bytes.
"""

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from fp4jax import compensation
from fp4jax import llama
from fp4jax import memory
from fp4jax import numerics
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import sizes
from fp4jax import telemetry
import np_ref

# XLA may compute a chain of bf16 operations in f32 and round once at the
# end of a fusion ("excess precision"); a rematerialised block is fused
# differently from the forward it recomputes, so bf16 intermediates would
# round at other places. With that off, every policy runs the same
# arithmetic and the bits must agree exactly.
EXACT = {"xla_allow_excess_precision": False}
# The analytic count (fp4jax.memory) against XLA's compiled step: what a
# policy saves is counted to the byte, but XLA adds or drops a few small
# per-layer buffers (measured on XLA:CPU, jax 0.12: every policy within
# 4 %); 15 % leaves room for another XLA version's choices.
XLA_AGREEMENT = 0.15
# The goal of remat "quantized": at most this share of remat "none"'s
# saved-activation bytes per token of the 1.3B model.
QUANTIZED_SHARE_MAX = 1 / 3
# XLA's cross-check, compile only: 1.3B width, 1 and 2 layers, seq 2048.
# The per-layer difference of XLA's temp bytes also holds each layer's
# weight-sized buffers (bf16 copies, quantized weights: ~0.1-0.3 GB) that
# small batches cannot separate from the activations; at 512 x 2048 tokens
# they move the smallest per-token figure (remat "full", 4 KB) by < 5 %.
XLA_SEQ, XLA_BATCH = 2048, 512
# XLA:CPU of jax 0.10 schedules a rematerialised block's recomputation in
# among the forward's ops, where its values live as long as the originals:
# its compiled step shows no policy's savings (measured there, remat "full"
# keeps what "none" does). jax 0.12 schedules it in the backward.
_XLA_SCHEDULES_REMAT = pytest.mark.skipif(
    jax.__version_info__ < (0, 12),
    reason="XLA:CPU before jax 0.12 recomputes remat blocks in the forward")

# One block: each policy wraps every block alike, and a second one doubles
# the compile time of these bit-for-bit tests.
TINY = dataclasses.replace(sizes.get_config("tiny"), attention="xla",
                           n_layers=1)
# Stochastic rounding of X: the recompute must draw the same bits (the key
# is an input of every block), and the packed codes are those draws. OCC
# left out: it only lengthens the compile here.
FP4_SR = dataclasses.replace(
    qconfig.get_recipe("w4a4_direct", x__rounding="stochastic"),
    name="w4a4_x_sr")
# memory's counts are an accelerator's, where sparse_impl "auto" is the
# dense compensation GEMM (gemm.resolve_sparse); XLA:CPU would take ELL.
_AS_ON_GPU = {"fp4_paper": qconfig.Execution(sparse_impl="gemm")}


RECIPES = {
    None: None,
    "fp4_paper": qconfig.get_recipe("fp4_paper"),
    "w4a4_x_sr": FP4_SR,
    "fp4_paper_ell": qconfig.get_recipe("fp4_paper"),
    "fp4_paper_dense": qconfig.get_recipe("fp4_paper", compensation="dense"),
}
# How a case's GEMMs run, where not Execution() (qconfig.Execution: a
# run-level choice, not part of the recipe).
EXECUTIONS = {"fp4_paper_ell": qconfig.Execution(sparse_impl="ell")}


# -------------------------------------------------------------- FP4 codes
def test_pack_nibbles_every_byte():
  byte = np.arange(256, dtype=np.uint8)
  lo, hi = byte & 15, byte >> 4
  codes = np.stack([lo, hi], axis=-1).reshape(1, 512)
  np.testing.assert_array_equal(numerics.unpack_nibbles(
      jnp.asarray(byte)[None], 512), codes)
  np.testing.assert_array_equal(numerics.pack_nibbles(jnp.asarray(codes)),
                                byte[None])


def test_pack_nibbles_odd_length_pads_a_zero_nibble():
  codes = jnp.asarray([[1, 2, 3], [15, 0, 9]], jnp.uint8)
  packed = numerics.pack_nibbles(codes)
  np.testing.assert_array_equal(packed, [[0x21, 0x03], [0x0F, 0x09]])
  np.testing.assert_array_equal(numerics.unpack_nibbles(packed, 3), codes)
  with pytest.raises(ValueError, match="n=5"):
    numerics.unpack_nibbles(packed, 5)


@pytest.mark.parametrize("fmt", np_ref.FP4_FORMATS)
def test_fp4_codes_every_code(fmt):
  codes = np.arange(16, dtype=np.uint8)
  mags = np_ref.magnitudes(fmt)
  want = np.where(codes >= 8, -1.0, 1.0) * mags[codes & 7]
  if fmt == "e2m1":
    # E2M1's codes are the OCP bit patterns ml_dtypes stores.
    np.testing.assert_array_equal(
        codes.view(ml_dtypes.float4_e2m1fn).astype(np.float64), want)
  got = np.asarray(numerics.fp4_from_codes(jnp.asarray(codes), fmt))
  np.testing.assert_array_equal(got, want)
  # Code 8 is -0.0: the sign bit survives the round trip.
  np.testing.assert_array_equal(np.signbit(got), codes >= 8)
  back = numerics.fp4_to_codes(jnp.asarray(want, jnp.float32), fmt)
  np.testing.assert_array_equal(back, codes)


def test_fp4_codes_reject_fp8():
  with pytest.raises(ValueError, match="FP4 fmt"):
    numerics.fp4_to_codes(jnp.zeros(2), "e4m3")


# ------------------------------------------------- qmatmul's packed residuals
_SAVE_PACKED = jax.checkpoint_policies.save_only_these_names(qdot.SAVED_NAME)


def _qmatmul_loss(recipe, pack, remat, execution=None):
  def f(x, w, key):
    y = qdot.qmatmul(jnp.tanh(x), w, recipe, key, pack_residuals=pack,
                     execution=execution)
    return jnp.tanh(y)
  if remat:
    f = jax.checkpoint(f, policy=_SAVE_PACKED)
  return lambda x, w, key: jnp.sum(jnp.square(f(x, w, key).astype(
      jnp.float32)))


# The cases that compile longest (hw_faithful recipes 3-5x the others):
# the slow run covers them.
_HEAVY = pytest.mark.slow


@pytest.mark.parametrize("name", [
    "fp4_paper", "fp4_paper_ell", "fp4_paper_dense", "mxfp4", "w4a8",
    pytest.param("w4a4_x_sr", marks=_HEAVY),
    pytest.param("fp4_paper_tensor_occ", marks=_HEAVY),
    pytest.param("nvfp4", marks=_HEAVY),
    pytest.param("nvfp4_dense", marks=_HEAVY),
    pytest.param("quartet", marks=_HEAVY),
    pytest.param("mxfp4_tseng", marks=_HEAVY)])
def test_qmatmul_packed_residuals_give_the_same_bits(name):
  recipe = {
      **RECIPES, "fp4_paper_tensor_occ": qconfig.get_recipe(
          "fp4_paper", occ_axis=None),
      "nvfp4_dense": qconfig.get_recipe("nvfp4", occ_alpha=0.99,
                                        compensation="dense"),
  }.get(name) or qconfig.get_recipe(name)
  x = (3 * jax.random.normal(jax.random.key(1), (32, 64))).astype(
      jnp.bfloat16)
  w = 0.1 * jax.random.normal(jax.random.key(2), (64, 64))
  key = jax.random.key(3)
  run = EXECUTIONS.get(name)
  grad = lambda pack: jax.jit(jax.value_and_grad(
      _qmatmul_loss(recipe, pack, remat=pack, execution=run), (0, 1))).lower(
          x, w, key).compile(compiler_options=EXACT)(x, w, key)
  _assert_same_bits(grad(False), grad(True))


def _saved_bytes_per_row(recipe, k, m=32, execution=None):
  """Bytes per row of x that a checkpointed packed qmatmul keeps (the
  leaves of its vjp closure) besides the weight: x itself is not kept, the
  backward reads nothing else of it."""
  x = jax.random.normal(jax.random.key(0), (m, k), jnp.bfloat16)
  w = jnp.ones((k, 64), jnp.float32)
  f = jax.checkpoint(lambda x, w: qdot.qmatmul(
      x * 2, w, recipe, jax.random.key(1), pack_residuals=True,
      execution=execution), policy=_SAVE_PACKED)
  leaves = jax.tree.leaves(jax.vjp(f, x, w)[1])
  kinds = [(l.shape, l.dtype) for l in leaves]
  assert kinds.count((w.shape, w.dtype)) == 1, kinds
  return (sum(l.nbytes for l in leaves) - w.nbytes) / m


@pytest.mark.parametrize("name, want", [
    # E2M1 codes two per byte, one f32 scale per token, the residual's
    # capacity(256, 0.99) = 2 + 2 slots of int32 column + f32 value.
    ("fp4_paper", 256 / 2 + 4 + 4 * 8),
    # MXFP4: one f32 scale per 32 elements.
    ("mxfp4", 256 / 2 + 4 * 256 / 32),
    # FP8 activations are not packed: the bf16 dequantized copy.
    ("w4a8", 2 * 256),
    # hw_faithful re-quantizes the unquantized X: kept in bf16 (Quartet's
    # quantized one is packed, but its trust mask and Hadamard constants
    # make it no clean count).
    ("nvfp4", 2 * 256),
])
def test_saved_bytes_of_a_packed_projection(name, want):
  assert _saved_bytes_per_row(qconfig.get_recipe(name), 256,
                              execution=_AS_ON_GPU.get(name)) == want


def test_packed_ell_capacity_is_compensation_capacity():
  # The count the memory model uses for the residual is the one stored
  # (its plan is an accelerator's: the dense compensation GEMMs).
  cap = compensation.capacity(512, 0.99)
  assert cap == 5 + 5
  assert _saved_bytes_per_row(qconfig.get_recipe("fp4_paper"), 512,
                              execution=_AS_ON_GPU["fp4_paper"]) == (
      512 / 2 + 4 + 8 * cap)
  # The ELL products (CPU's "auto") keep the positions OCC's top_k found:
  # the k_top largest and k_bot smallest, two slots more.
  assert _saved_bytes_per_row(qconfig.get_recipe("fp4_paper"), 512) == (
      512 / 2 + 4 + 8 * (cap + 2))


# ------------------------------------------------------------ the model
def test_remat_rejects_an_unknown_policy():
  with pytest.raises(ValueError, match=r"LlamaConfig\.remat must be one of "
                     r"\('none', 'full', 'dots', 'dots_no_batch', "
                     r"'quantized'\), got 'bogus'"):
    dataclasses.replace(TINY, remat="bogus")


def _model_and_loss(remat, recipe, execution=None):
  cfg = dataclasses.replace(TINY, remat=remat,
                            gemm=execution or qconfig.Execution())
  rules = (None if recipe is None
           else qconfig.default_rules(recipe, cfg.n_layers))
  graphdef, state = nnx.split(llama.Llama(cfg, rules=rules,
                                          rngs=nnx.Rngs(0)))

  def loss(state, tokens, key):
    logits = nnx.merge(graphdef, state)(tokens, key=key)
    return jnp.mean(jax.nn.logsumexp(logits, -1) - logits[..., 0])

  return state, loss


@functools.cache
def _loss_and_grads(remat, recipe_name):
  state, loss = _model_and_loss(remat, RECIPES[recipe_name],
                                EXECUTIONS.get(recipe_name))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0,
                              TINY.vocab_size)
  key = jax.random.key(5)
  step = jax.jit(jax.value_and_grad(loss)).lower(state, tokens, key).compile(
      compiler_options=EXACT)
  return jax.device_get(step(state, tokens, key))


def _assert_same_bits(want, got):
  paths = jax.tree_util.tree_leaves_with_path(want)
  for (path, a), b in zip(paths, jax.tree.leaves(got)):
    np.testing.assert_array_equal(a, b, err_msg=jax.tree_util.keystr(path))


# Each policy once in the default run (every pair under -m slow): the
# compiles dominate the suite's time on CPU.
_DEFAULT_PAIRS = {("full", None), ("dots", None), ("dots_no_batch",
                                                   "fp4_paper"),
                  ("quantized", "fp4_paper")}


@pytest.mark.parametrize("remat,recipe", [
    pytest.param(remat, recipe, marks=() if (remat, recipe) in _DEFAULT_PAIRS
                 else pytest.mark.slow)
    for remat in llama.REMATS[1:] for recipe in (None, "fp4_paper")])
def test_every_policy_gives_the_bits_of_none(remat, recipe):
  _assert_same_bits(_loss_and_grads("none", recipe),
                    _loss_and_grads(remat, recipe))


@pytest.mark.parametrize("remat", [pytest.param("full", marks=_HEAVY),
                                   "quantized"])
def test_stochastic_rounding_recomputes_with_the_same_keys(remat):
  _assert_same_bits(_loss_and_grads("none", "w4a4_x_sr"),
                    _loss_and_grads(remat, "w4a4_x_sr"))


@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp4_paper_ell", "fp4_paper_dense"])
@pytest.mark.parametrize("remat", llama.REMATS[1:])
def test_every_policy_gives_the_bits_of_none_with_compensation_variants(
    remat, recipe):
  _assert_same_bits(_loss_and_grads("none", recipe),
                    _loss_and_grads(remat, recipe))


def _rematerialises(jaxpr) -> bool:
  """Whether a jaxpr holds a jax.checkpoint (its primitive's name)."""
  return re.search(r"= (remat2|checkpoint)\[", str(jaxpr)) is not None


def _telemetry(remat):
  """A telemetry step's stats and gradient taps (as train_state's), of a
  recipe without OCC (whose stats only lengthen the compile)."""
  state, loss = _model_and_loss(remat, qconfig.get_recipe("w4a4_direct"))
  tokens = jax.random.randint(jax.random.key(0), (2, 16), 0,
                              TINY.vocab_size)
  paths = [p for p in llama.projection_paths(TINY) if p != "lm_head"]
  taps = {p: jnp.zeros([len(telemetry.STAT_KEYS)]) for p in paths}

  def probed(taps, state):
    with telemetry.probing(taps) as probe:
      value = loss(state, tokens, None)
    return value, probe.stats

  fn = jax.value_and_grad(probed, has_aux=True)
  jaxpr = jax.make_jaxpr(fn)(taps, state)
  out = jax.jit(fn).lower(taps, state).compile(compiler_options=EXACT)(
      taps, state)
  return jax.device_get(out), jaxpr


def test_telemetry_probe_runs_the_blocks_without_remat():
  # A probe records arrays from inside the blocks, which a rematerialised
  # block would trace out of reach: under a probe the model runs its blocks
  # plainly, with the same stats and gradient taps as remat "none".
  want, jaxpr_none = _telemetry("none")
  got, jaxpr_quantized = _telemetry("quantized")
  _assert_same_bits(want, got)
  assert not _rematerialises(jaxpr_none)
  assert not _rematerialises(jaxpr_quantized)
  assert got[0][1]["layers.0.mlp.down_proj"]["x"]["snr_db"] > 0
  assert np.any(got[1]["layers.0.attn.q_proj"] != 0)


def test_unprobed_quantized_model_is_rematerialised():
  state, loss = _model_and_loss("quantized", RECIPES["fp4_paper"])
  tokens = jnp.zeros((1, 8), jnp.int32)
  assert _rematerialises(jax.make_jaxpr(jax.grad(loss))(state, tokens, None))


# --------------------------------------------------------- saved bytes
def _one_point_three_b(attention, **kw):
  return sizes.get_config("1.3b", vocab_size=32000, attention=attention, **kw)


@pytest.mark.parametrize("attention", ["cudnn", "xla"])
def test_quantized_keeps_at_most_a_third_of_none(attention):
  # cudnn: the paper's GPU run; xla: what a CPU (or segment masks) runs.
  cfg = _one_point_three_b(attention)
  count = functools.partial(memory.activation_bytes_per_token, cfg, 2048,
                            True)
  assert count(remat="quantized") <= QUANTIZED_SHARE_MAX * count(
      remat="none")


def test_remat_defaults_to_the_config_and_none_keeps_the_old_count():
  cfg = _one_point_three_b("cudnn")
  old = memory.activation_bytes_per_token(cfg, 2048, True)
  assert old == memory.activation_bytes_per_token(cfg, 2048, True,
                                                  remat="none")
  assert memory.activation_bytes_per_token(
      dataclasses.replace(cfg, remat="quantized"), 2048, True) == (
          memory.activation_bytes_per_token(cfg, 2048, True,
                                            remat="quantized"))


def test_per_policy_hand_count():
  # d 8, kv 1 x 4, f 16, 2 layers, bf16 (c = 2), head c d + 4 V = 56.
  cfg = llama.LlamaConfig(vocab_size=10, d_model=8, n_layers=2, n_heads=2,
                          n_kv_heads=1, d_ff=16, max_seq_len=4,
                          attention="xla")
  count = functools.partial(memory.activation_bytes_per_token, cfg, 4)
  head = 2 * 8 + 4 * 10
  assert count(True, remat="full") == 2 * 2 * 8 + head
  # Dot outputs f32: q 8, k 4, v 4, o 8, gate 16, up 16 (down's is not read)
  # = 56 x 4 = 224; fp4_paper's dense compensation GEMM doubles that; "dots"
  # adds the scores 4 H T = 32 and the attention output 4 D = 32.
  assert count(False, remat="dots_no_batch") == 2 * (16 + 224) + head
  assert count(True, remat="dots_no_batch") == 2 * (16 + 448) + head
  assert count(True, remat="dots") == 2 * (16 + 448 + 64) + head
  # fp4_paper: per distinct input K / 2 codes + a 4-byte scale + the ELL
  # residual (capacity(8) = capacity(16) = 0 at alpha 0.99): inputs of
  # q/k/v (8), o (8), gate/up (8), down (16).
  assert count(True, remat="quantized") == 2 * (
      16 + 3 * (4 + 4) + (8 + 4)) + head
  # Stochastic X (no OCC): every projection keeps its own codes.
  assert count(True, remat="quantized", recipe=FP4_SR) == 2 * (
      16 + 6 * (4 + 4) + (8 + 4)) + head
  # Unquantized projections keep nothing under "quantized".
  assert count(False, remat="quantized") == count(False, remat="full")


@functools.cache
def _xla_temp(recipe_name, remat, n_layers, execution):
  cfg = _one_point_three_b("xla", n_layers=n_layers, remat=remat,
                           gemm=execution)
  rules = (None if recipe_name is None
           else qconfig.default_rules(recipe_name, n_layers))
  graphdef, state = nnx.split(nnx.eval_shape(
      lambda: llama.Llama(cfg, rules=rules, rngs=nnx.Rngs(0))))

  def loss(state, tokens):
    return jnp.mean(jax.nn.logsumexp(nnx.merge(graphdef, state)(tokens), -1))

  tokens = jax.ShapeDtypeStruct((XLA_BATCH, XLA_SEQ), jnp.int32)
  compiled = jax.jit(jax.grad(loss)).lower(state, tokens).compile()
  return memory.compiled_bytes(compiled)["temp"]


def _per_layer(recipe_name, remat):
  """(analytic, XLA) saved bytes per token of one 1.3B-wide layer."""
  run = _AS_ON_GPU.get(recipe_name, qconfig.Execution())
  xla = (_xla_temp(recipe_name, remat, 2, run)
         - _xla_temp(recipe_name, remat, 1, run)) / (XLA_BATCH * XLA_SEQ)
  count = lambda n: memory.activation_bytes_per_token(
      _one_point_three_b("xla", n_layers=n), XLA_SEQ,
      recipe_name is not None, remat=remat, recipe=recipe_name,
      execution=run)
  return count(2) - count(1), xla


@_XLA_SCHEDULES_REMAT
def test_quantized_bytes_agree_with_xla_and_undercut_none():
  analytic, xla = _per_layer("fp4_paper", "quantized")
  assert abs(xla / analytic - 1) <= XLA_AGREEMENT, (analytic, xla)
  none_analytic, none_xla = _per_layer("fp4_paper", "none")
  # "none"'s count is the floor of what autodiff keeps; XLA:CPU keeps more
  # (f32 attention scores and probabilities, f32 copies).
  assert none_analytic <= none_xla, (none_analytic, none_xla)
  assert xla <= QUANTIZED_SHARE_MAX * none_xla, (xla, none_xla)


@pytest.mark.slow
@_XLA_SCHEDULES_REMAT
@pytest.mark.parametrize("recipe", [None, "fp4_paper"])
@pytest.mark.parametrize("remat", ["full", "dots", "dots_no_batch",
                                   "quantized"])
def test_every_policy_agrees_with_xla(remat, recipe):
  analytic, xla = _per_layer(recipe, remat)
  assert abs(xla / analytic - 1) <= XLA_AGREEMENT, (analytic, xla)
