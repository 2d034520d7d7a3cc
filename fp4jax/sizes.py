"""Model size table and analytic parameter count.

Owns: `SIZES` (size name -> `LlamaConfig` keyword arguments), `get_config`
and `param_count`. Shapes follow LLaMA-2 for 7b / 13b, RECIPE.md §7's guess
for 1.3b, and GPT-3-like depth/width for 125m / 350m; `tiny` and `demo` are
for tests and CPU demos.

Must not import: ml_collections, tensorflow_datasets, grain, or fp4jax
modules to the right of `llama`.
"""

from typing import Any

from fp4jax import llama

_BIG = dict(vocab_size=32000, max_seq_len=2048)

SIZES: dict[str, dict[str, Any]] = {
    # Unit tests: every dim small, GQA (2 kv heads for 4 query heads).
    "tiny": dict(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                 n_kv_heads=2, d_ff=128, max_seq_len=64),
    # CPU demos: 4,458,752 parameters with the untied 4096-token vocab.
    "demo": dict(vocab_size=4096, d_model=256, n_layers=4, n_heads=4,
                 n_kv_heads=2, d_ff=512, max_seq_len=256),
    "125m": dict(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12,
                 d_ff=2048, **_BIG),
    "350m": dict(d_model=1024, n_layers=24, n_heads=16, n_kv_heads=16,
                 d_ff=2816, **_BIG),
    "1.3b": dict(d_model=2048, n_layers=24, n_heads=16, n_kv_heads=16,
                 d_ff=5632, **_BIG),
    "7b": dict(d_model=4096, n_layers=32, n_heads=32, n_kv_heads=32,
               d_ff=11008, **_BIG),
    "13b": dict(d_model=5120, n_layers=40, n_heads=40, n_kv_heads=40,
                d_ff=13824, **_BIG),
}


def get_config(size: str, **overrides: Any) -> llama.LlamaConfig:
  """The LlamaConfig of a named size, with fields overridden.

  Raises:
    ValueError: unknown size name (or an invalid override, via LlamaConfig).
  """
  if size not in SIZES:
    raise ValueError(f"unknown model.size {size!r}; expected one of "
                     f"{list(SIZES)}")
  return llama.LlamaConfig(**{**SIZES[size], **overrides})


def param_count(cfg: llama.LlamaConfig) -> int:
  """Number of parameters of `llama.Llama(cfg)`, from the shapes alone."""
  d, kv = cfg.d_model, cfg.n_kv_heads * cfg.head_dim
  attn = d * d * 2 + d * kv * 2          # q, o; k, v
  mlp = 3 * d * cfg.d_ff                 # gate, up, down
  per_layer = attn + mlp + 2 * d         # + two RMSNorm scales
  embed = cfg.vocab_size * d
  head = 0 if cfg.tie_embeddings else d * cfg.vocab_size
  return embed + cfg.n_layers * per_layer + d + head
