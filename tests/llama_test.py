"""Tests for fp4jax.llama and fp4jax.sizes: shapes, masking, RoPE, GQA,
parameter counts, quantization seam, config validation."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fp4jax import llama
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import sizes

# f32 compute: paths that differ only in op grouping (GQA vs repeated-KV MHA,
# masked vs standalone sequence) agree to a few f32 ulps of O(1) logits.
F32_ATOL = 2e-5
# apply_rope rotates in float32: cos/sin of angles up to ~64 rad carry
# ~64 * 2^-24 absolute error, times |x| <= ~4.
ROPE_ATOL = 2e-5
# FP4 E2M1 with per-token / per-channel absmax scaling has ~10-15 % relative
# RMS error per operand; it enters the logits only through the residual
# branches (embedding and lm_head stay plain). Measured on the tiny model:
# relative error 0.075, correlation 0.997 (fp4_paper); the bounds leave ~2.5x
# headroom for seeds and recipe tweaks while still catching a broken seam.
QUANT_REL_ERR_MAX = 0.2
QUANT_CORR_MIN = 0.95
# FP8 forward alone gives ~0.02 relative change, a bf16 no-op gives exactly 0:
# anything above this means the projections really were quantized.
QUANT_REL_ERR_MIN = 0.01

TINY = sizes.get_config("tiny")
TINY_F32 = dataclasses.replace(TINY, compute_dtype="float32")


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, tokens, segment_ids=None, positions=None):
  model = nnx.merge(graphdef, state)
  return model(tokens, segment_ids=segment_ids, positions=positions)


def forward(model, tokens, **kw):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, tokens, **kw))


def tokens_for(cfg, b, t, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, cfg.vocab_size,
                            dtype=jnp.int32)


@pytest.fixture(scope="module")
def tiny_f32():
  return llama.Llama(TINY_F32, rngs=nnx.Rngs(0))


def test_shapes_and_dtypes():
  model = llama.Llama(TINY, rngs=nnx.Rngs(0))
  logits = forward(model, tokens_for(TINY, 2, 16))
  assert logits.shape == (2, 16, TINY.vocab_size)
  assert logits.dtype == np.float32
  assert np.isfinite(logits).all()
  state = nnx.state(model, nnx.Param)
  assert {v.dtype for v in jax.tree.leaves(state)} == {jnp.dtype("float32")}


def test_rejects_too_long_sequence(tiny_f32):
  with pytest.raises(ValueError, match="max_seq_len"):
    tiny_f32(tokens_for(TINY, 1, TINY.max_seq_len + 1))


def test_causal_mask(tiny_f32):
  tok = np.asarray(tokens_for(TINY, 2, 16))
  changed = tok.copy()
  changed[:, 10:] = (changed[:, 10:] + 7) % TINY.vocab_size
  a = forward(tiny_f32, tok)
  b = forward(tiny_f32, changed)
  np.testing.assert_allclose(a[:, :10], b[:, :10], atol=F32_ATOL, rtol=0)
  assert np.abs(a[:, 10:] - b[:, 10:]).max() > 1e-3  # the change is visible


def test_segment_ids_block_cross_document_attention(tiny_f32):
  tok = np.asarray(tokens_for(TINY, 2, 16))
  seg = np.repeat(np.array([[1, 2], [3, 4]]), 8, axis=1).astype(np.int32)
  changed = tok.copy()
  changed[:, :8] = (changed[:, :8] + 5) % TINY.vocab_size
  a = forward(tiny_f32, tok, segment_ids=seg)
  b = forward(tiny_f32, changed, segment_ids=seg)
  np.testing.assert_allclose(a[:, 8:], b[:, 8:], atol=F32_ATOL, rtol=0)
  # Without segment ids the second document does see the first.
  c = forward(tiny_f32, tok)
  d = forward(tiny_f32, changed)
  assert np.abs(c[:, 8:] - d[:, 8:]).max() > 1e-3
  # With restarted positions, the second document equals running it alone.
  pos = np.tile(np.arange(8, dtype=np.int32), (2, 2))
  e = forward(tiny_f32, tok, segment_ids=seg, positions=pos)
  alone = forward(tiny_f32, tok[:, 8:])
  np.testing.assert_allclose(e[:, 8:], alone, atol=F32_ATOL, rtol=0)


def rope_reference(x, pos, theta):
  """float64 RoPE: dim pairs (i, i + K/2) as complex numbers times e^{i a}."""
  x = np.asarray(x, np.float64)
  half = x.shape[-1] // 2
  freq = theta ** (-np.arange(half) / half)
  ang = np.asarray(pos, np.float64)[:, :, None, None] * freq
  z = (x[..., :half] + 1j * x[..., half:]) * np.exp(1j * ang)
  return np.concatenate([z.real, z.imag], axis=-1)


def test_rope_matches_numpy_float64():
  rng = np.random.default_rng(0)
  x = rng.standard_normal((2, 5, 3, 16)).astype(np.float32)
  pos = rng.integers(0, 64, size=(2, 5)).astype(np.int32)
  got = llama.apply_rope(jnp.asarray(x), jnp.asarray(pos), 10000.0)
  np.testing.assert_allclose(np.asarray(got), rope_reference(x, pos, 1e4),
                             atol=ROPE_ATOL, rtol=0)
  assert got.dtype == jnp.float32


def test_rope_scores_depend_on_relative_position_only():
  rng = np.random.default_rng(1)
  q = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((1, 1, 1, 16)), jnp.float32)

  def score(pq, pk):
    rq = llama.apply_rope(q, jnp.full((1, 1), pq), 10000.0)
    rk = llama.apply_rope(k, jnp.full((1, 1), pk), 10000.0)
    return float(jnp.sum(rq * rk))

  assert score(7, 3) == pytest.approx(score(24, 20), abs=ROPE_ATOL)
  assert abs(score(7, 3) - score(7, 5)) > 1e-3


def test_gqa_equals_mha_with_repeated_kv_heads(tiny_f32):
  cfg_mha = dataclasses.replace(TINY_F32, n_kv_heads=TINY_F32.n_heads)
  mha = llama.Llama(cfg_mha, rngs=nnx.Rngs(1))
  g, r = TINY_F32.n_kv_heads, TINY_F32.n_heads // TINY_F32.n_kv_heads
  kd, d = TINY_F32.head_dim, TINY_F32.d_model
  for src, dst in zip(tiny_f32.layers, mha.layers):
    for name in ("attn_norm", "mlp_norm"):
      getattr(dst, name).scale[...] = getattr(src, name).scale[...]
    for name in ("q_proj", "o_proj"):
      getattr(dst.attn, name).kernel[...] = getattr(src.attn, name).kernel[...]
    for name in ("gate_proj", "up_proj", "down_proj"):
      getattr(dst.mlp, name).kernel[...] = getattr(src.mlp, name).kernel[...]
    for name in ("k_proj", "v_proj"):
      w = getattr(src.attn, name).kernel[...].reshape(d, g, 1, kd)
      getattr(dst.attn, name).kernel[...] = jnp.broadcast_to(
          w, (d, g, r, kd)).reshape(d, g * r * kd)
  mha.embed[...] = tiny_f32.embed[...]
  mha.final_norm.scale[...] = tiny_f32.final_norm.scale[...]
  mha.lm_head.kernel[...] = tiny_f32.lm_head.kernel[...]
  tok = tokens_for(TINY, 2, 16)
  want = forward(mha, tok)
  np.testing.assert_allclose(forward(tiny_f32, tok), want, atol=F32_ATOL,
                             rtol=0)
  # A GQA layout error (e.g. interleaved instead of grouped heads) would
  # show: the repeated copies must be grouped, not tiled.
  assert np.abs(want).max() > 0.1


def expected_params(v, d, layers, heads, kv_heads, ff, tied=False):
  """Hand count: embed, per layer (q, k, v, o, gate, up, down, 2 norms),
  final norm, lm_head."""
  kdim = d // heads * kv_heads
  layer = d * d + d * kdim + d * kdim + d * d + 3 * d * ff + 2 * d
  return v * d + layers * layer + d + (0 if tied else d * v)


HAND = {
    "tiny": expected_params(256, 64, 2, 4, 2, 128),
    "demo": expected_params(4096, 256, 4, 4, 2, 512),
    "125m": expected_params(32000, 768, 12, 12, 12, 2048),
    "350m": expected_params(32000, 1024, 24, 16, 16, 2816),
    "1.3b": expected_params(32000, 2048, 24, 16, 16, 5632),
    "7b": expected_params(32000, 4096, 32, 32, 32, 11008),
    "13b": expected_params(32000, 5120, 40, 40, 40, 13824),
}


def count_model_params(cfg, abstract):
  make = lambda: llama.Llama(cfg, rngs=nnx.Rngs(0))
  model = nnx.eval_shape(make) if abstract else make()
  state = nnx.state(model, nnx.Param)
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))


@pytest.mark.parametrize("size", list(HAND))
def test_param_count(size):
  cfg = sizes.get_config(size)
  assert sizes.param_count(cfg) == HAND[size]
  # Real parameters for small sizes; shapes only (no allocation) otherwise.
  abstract = size not in ("tiny", "demo")
  assert count_model_params(cfg, abstract) == HAND[size]


def test_param_count_known_sizes():
  # LLaMA-2 7B has 6,738,415,616 parameters (vocab 32000, untied).
  assert sizes.param_count(sizes.get_config("7b")) == 6_738_415_616
  assert 3e6 <= sizes.param_count(sizes.get_config("demo")) <= 5e6
  tied = sizes.get_config("tiny", tie_embeddings=True)
  assert sizes.param_count(tied) == expected_params(256, 64, 2, 4, 2, 128,
                                                    tied=True)
  assert count_model_params(tied, abstract=False) == sizes.param_count(tied)


def test_unknown_size():
  with pytest.raises(ValueError, match="model.size"):
    sizes.get_config("3b")


@pytest.mark.parametrize("field,value", [
    ("n_heads", 5),          # does not divide d_model=64
    ("n_kv_heads", 3),       # does not divide n_heads=4
    ("d_model", 0),
    ("vocab_size", -1),
    ("d_ff", 0),
    ("n_layers", 0),
    ("max_seq_len", 0),
    ("norm_eps", 0.0),
    ("compute_dtype", "int8"),
])
def test_bad_config(field, value):
  with pytest.raises(ValueError, match=field):
    dataclasses.replace(TINY, **{field: value})


def test_rule_matching_no_layer():
  recipe = qdot.get_recipe("fp4_paper")
  with pytest.raises(ValueError, match="matched no layer"):
    llama.Llama(TINY, rules=[(r"layers\.7\..*", recipe)], rngs=nnx.Rngs(0))


def test_projection_paths_and_quant_table():
  recipe = qdot.get_recipe("fp4_paper")
  model = llama.Llama(TINY, rules=qconfig.default_rules(recipe),
                      rngs=nnx.Rngs(0))
  table = model.quant_table
  assert list(table) == llama.projection_paths(TINY)
  assert len(table) == 7 * TINY.n_layers + 1
  assert table["layers.1.attn.k_proj"] == "fp4_paper"
  assert table["layers.0.mlp.down_proj"] == "fp4_paper"
  assert table["lm_head"] == "none"
  head = llama.Llama(TINY, rules=[("lm_head", recipe)], rngs=nnx.Rngs(0))
  assert head.quant_table["lm_head"] == "fp4_paper"
  assert head.quant_table["layers.0.attn.q_proj"] == "none"
  # Each path in the table is a real module path holding a kernel.
  params = {".".join(map(str, p)) for p, _ in
            nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {p + ".kernel" for p in table} <= params


@pytest.fixture(scope="module")
def bf16_and_fp4_logits():
  recipe = qdot.get_recipe("fp4_paper")
  plain = llama.Llama(TINY, rngs=nnx.Rngs(0))
  quant = llama.Llama(TINY, rules=qconfig.default_rules(recipe),
                      rngs=nnx.Rngs(0))
  tok = tokens_for(TINY, 2, 32)
  return forward(plain, tok), forward(quant, tok)


def test_fp4_logits_close_to_bf16(bf16_and_fp4_logits):
  ref, got = bf16_and_fp4_logits
  rel = np.linalg.norm(got - ref) / np.linalg.norm(ref)
  corr = np.corrcoef(got.ravel(), ref.ravel())[0, 1]
  assert rel < QUANT_REL_ERR_MAX, rel
  assert corr > QUANT_CORR_MIN, corr


def test_fp4_really_quantizes(bf16_and_fp4_logits):
  ref, got = bf16_and_fp4_logits
  assert np.linalg.norm(got - ref) / np.linalg.norm(ref) > QUANT_REL_ERR_MIN


def test_qdense_plain_and_key_plumbing():
  cfg = TINY_F32
  x = jax.random.normal(jax.random.key(0), (2, 3, cfg.d_model))
  plain = llama.QDense(cfg.d_model, 32, path="p", recipe=None,
                       names=("embed", "mlp"), std=0.02, cfg=cfg,
                       rngs=nnx.Rngs(0))
  want = np.asarray(x, np.float64) @ np.asarray(plain.kernel[...], np.float64)
  np.testing.assert_allclose(np.asarray(plain(x)), want, atol=1e-6, rtol=0)
  # nvfp4 rounds gradients stochastically, so it needs a key: the seam must
  # pass the (folded) key through, and fail loudly without one.
  sr = llama.QDense(cfg.d_model, 32, path="p", recipe=qdot.get_recipe("nvfp4"),
                    names=("embed", "mlp"), std=0.02, cfg=cfg,
                    rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="key"):
    sr(x)
  assert sr(x, jax.random.key(1)).shape == (2, 3, 32)
  assert llama.path_id("layers.0.attn.q_proj") != llama.path_id(
      "layers.0.attn.k_proj")


def test_fp4_gradients_finite():
  recipe = qdot.get_recipe("fp4_paper")
  cfg = dataclasses.replace(TINY, n_layers=1)  # one block: faster compile
  model = llama.Llama(cfg, rules=qconfig.default_rules(recipe),
                      rngs=nnx.Rngs(0))
  tok = tokens_for(TINY, 2, 16)

  @jax.jit
  def grads(state):
    def loss(s):
      logits = nnx.merge(graphdef, s)(tok, key=jax.random.key(0))
      return -jnp.mean(jax.nn.log_softmax(logits)[..., 0])
    return jax.grad(loss)(state)

  graphdef, state = nnx.split(model)
  g = grads(state)
  for leaf in jax.tree.leaves(g):
    assert np.isfinite(np.asarray(leaf)).all()
  q = np.asarray(g["layers"][0]["attn"]["q_proj"]["kernel"][...])
  assert np.abs(q).max() > 0


def test_auto_attention_is_cudnn_on_gpu_only_without_segments(monkeypatch):
  assert llama.attention_impl("auto") == "xla"       # this CPU
  assert llama.attention_impl("cudnn") == "cudnn"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert llama.attention_impl("auto") == "cudnn"
  assert llama.attention_impl("auto", segmented=True) == "xla"
  assert llama.attention_impl("xla") == "xla"
  with pytest.raises(ValueError, match="attention must be one of"):
    llama.LlamaConfig(8, 8, 1, 1, 1, 8, 8, attention="flash")


def test_auto_prng_is_rbg_on_gpu_only(monkeypatch):
  from fp4jax import main   # pylint: disable=g-import-not-at-top
  assert main.resolve_prng_impl("auto") == "threefry2x32"
  assert main.resolve_prng_impl("rbg") == "rbg"
  monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
  assert main.resolve_prng_impl("auto") == "rbg"
