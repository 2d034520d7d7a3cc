"""A second model family is one module plus its size table: a Gemma-style
decoder defined here, registered, trains through the unchanged trainer
with an FP4 recipe on its projections (and plans, and restores)."""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from fp4jax import llama
from fp4jax import models
from fp4jax import optim
from fp4jax import qconfig
from fp4jax import sharding
from fp4jax import train_state


# ------------------------------------------- the family: this module only
@dataclasses.dataclass(frozen=True)
class GemmaConfig:
  """Gemma-style: one KV head, GeGLU, pre- and post-norms, RMSNorm scales
  as 1 + w, tied embeddings scaled by sqrt(D)."""
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  d_ff: int
  max_seq_len: int
  norm_eps: float = 1e-6
  compute_dtype: str = "float32"
  param_dtype: str = "float32"
  remat: str = "none"
  scan_layers: bool = False
  gemm: qconfig.Execution = qconfig.Execution()

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


GEMMA_SIZES = {"gemma_tiny": dict(vocab_size=96, d_model=32, n_layers=2,
                                  n_heads=2, d_ff=64, max_seq_len=32)}
_ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")
_MLP = ("gate_proj", "up_proj", "down_proj")


def gemma_paths(cfg: GemmaConfig) -> list[str]:
  return [f"layers.{i}.{part}.{n}" for i in range(cfg.n_layers)
          for part, names in (("attn", _ATTN), ("mlp", _MLP))
          for n in names]


class _Norm(nnx.Module):
  def __init__(self, cfg: GemmaConfig):
    init = sharding.param_init(nnx.initializers.zeros, ("norm",))
    self.scale = nnx.Param(init(None, (cfg.d_model,), jnp.float32))
    self.eps = cfg.norm_eps

  def __call__(self, x):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True)
                              + self.eps)
    return (x32 * (1. + self.scale[...])).astype(x.dtype)


class _Block(nnx.Module):
  def __init__(self, cfg: GemmaConfig, i: int, table, rngs: nnx.Rngs):
    d, kd = cfg.d_model, cfg.head_dim

    def proj(part, name, d_in, d_out, names):
      path = f"layers.{i}.{part}.{name}"
      return llama.QDense(d_in, d_out, path=path, recipe=table[path],
                          names=names, std=0.02, cfg=cfg, rngs=rngs)

    self.q_proj = proj("attn", "q_proj", d, d, ("embed", "heads"))
    self.k_proj = proj("attn", "k_proj", d, kd, ("embed", "heads"))
    self.v_proj = proj("attn", "v_proj", d, kd, ("embed", "heads"))
    self.o_proj = proj("attn", "o_proj", d, d, ("heads", "embed"))
    self.gate_proj = proj("mlp", "gate_proj", d, cfg.d_ff, ("embed", "mlp"))
    self.up_proj = proj("mlp", "up_proj", d, cfg.d_ff, ("embed", "mlp"))
    self.down_proj = proj("mlp", "down_proj", cfg.d_ff, d, ("mlp", "embed"))
    self.norms = nnx.List([_Norm(cfg) for _ in range(4)])
    self.cfg = cfg

  def __call__(self, x, positions, key):
    cfg, (b, t, _) = self.cfg, x.shape
    h, kd = cfg.n_heads, cfg.head_dim
    y = self.norms[0](x)
    q = llama.apply_rope(self.q_proj(y, key).reshape(b, t, h, kd),
                         positions, 10000.)
    k = llama.apply_rope(self.k_proj(y, key).reshape(b, t, 1, kd),
                         positions, 10000.)
    v = self.v_proj(y, key).reshape(b, t, 1, kd)
    s = jnp.einsum("BTHK,BSGK->BHTS", q, k) / math.sqrt(kd)
    s = jnp.where(jnp.tril(jnp.ones((t, t), bool)), s, -1e30)
    o = jnp.einsum("BHTS,BSGK->BTHK", jax.nn.softmax(s, -1), v)
    x = x + self.norms[1](self.o_proj(o.reshape(b, t, h * kd), key))
    y = self.norms[2](x)
    g = jax.nn.gelu(self.gate_proj(y, key)) * self.up_proj(y, key)
    return x + self.norms[3](self.down_proj(g, key))


class Gemma(nnx.Module):
  def __init__(self, cfg: GemmaConfig, *, table, rngs: nnx.Rngs):
    init = sharding.param_init(nnx.initializers.normal(0.02),
                               ("vocab", "embed"))
    self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                jnp.float32))
    self.layers = nnx.List([_Block(cfg, i, table, rngs)
                            for i in range(cfg.n_layers)])
    self.final_norm = _Norm(cfg)
    self.quant_table = {p: "none" if r is None else r.name
                        for p, r in table.items()}
    self.cfg = cfg

  def __call__(self, tokens, *, segment_ids=None, key=None):
    del segment_ids
    cfg, (b, t) = self.cfg, tokens.shape
    positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    x = jnp.take(self.embed[...], tokens, axis=0) * math.sqrt(cfg.d_model)
    for layer in self.layers:
      x = layer(x, positions, key)
    return (self.final_norm(x) @ self.embed[...].T).astype(jnp.float32)


@pytest.fixture(scope="module")
def gemma():
  family = models.register(models.Family(
      name="gemma_test", config=GemmaConfig, model=Gemma,
      projection_paths=gemma_paths, sizes=GEMMA_SIZES))
  yield family
  del models.FAMILIES[family.name]


# -------------------------------------------------------------- the tests
def test_a_registered_family_trains_through_the_unchanged_trainer(gemma):
  cfg = models.get_config(gemma.name, "gemma_tiny")
  assert models.family_of(cfg) is gemma
  rules = qconfig.default_rules("fp4_paper")
  trainer = train_state.make_trainer(
      cfg, rules, optim.OptimConfig(lr=1e-3, warmup_frac=0.0), num_steps=3,
      mesh=sharding.make_mesh(2, 2, 2), global_batch=4, seq_len=16, seed=0)
  # Every projection quantized by the recipe, from the family's own paths.
  assert set(trainer.quant_table) == set(gemma_paths(cfg))
  assert set(trainer.quant_table.values()) == {"fp4_paper"}
  rng = np.random.default_rng(0)
  batch = {k: rng.integers(1, cfg.vocab_size, (4, 16))
           for k in train_state.BATCH_KEYS}
  batch["mask"] = np.ones((4, 16))
  state = trainer.init()
  losses = []
  for _ in range(3):
    state, m = trainer.train_step(state, trainer.put_batch(batch))
    losses.append(float(m["loss"]))
  assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_the_family_s_layer_table_and_counts_come_from_the_registry(gemma):
  cfg = models.get_config(gemma.name, "gemma_tiny")
  table = models.layer_table(cfg, qconfig.default_rules("w4a4_direct"))
  assert len(table) == 7 * cfg.n_layers
  d, f, kd, v = cfg.d_model, cfg.d_ff, cfg.head_dim, cfg.vocab_size
  per_layer = 2 * d * d + 2 * d * kd + 3 * d * f + 4 * d
  assert models.param_count(cfg) == v * d + cfg.n_layers * per_layer + d
  kernels = 2 * d * d + 2 * d * kd + 3 * d * f
  assert models.flops_per_token(cfg, 16) == 6.0 * cfg.n_layers * kernels
  assert models.activation_bytes_per_token(cfg, 16, quantized=True) is None


def test_an_unregistered_config_is_one_line():
  @dataclasses.dataclass(frozen=True)
  class Other:
    n_layers: int = 1
  with pytest.raises(ValueError, match="no registered model family"):
    models.projection_paths(Other())
  with pytest.raises(ValueError, match="unknown model.family 'gpt'"):
    models.get_config("gpt", "tiny")
  with pytest.raises(ValueError, match="already registered"):
    models.register(dataclasses.replace(models.FAMILIES["llama"]))
