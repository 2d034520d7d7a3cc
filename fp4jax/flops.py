"""Model FLOPs per token and device peaks, for MFU in the train log.

Owns: the analytic training FLOPs of `llama.Llama` and a small table of peak
dense bf16 FLOP/s by `jax.Device.device_kind`.

Must not import: ml_collections, tensorflow_datasets, grain, or fp4jax
modules right of `llama`.
"""

from fp4jax import llama

# Peak dense bf16 FLOP/s per device (vendor datasheets, no sparsity), matched
# as a substring of device_kind, first match wins (so "H100 PCIe" precedes
# "H100"). Unknown kinds (CPU) give no MFU rather than a made-up one.
PEAK_BF16_FLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756e12),
    ("H100", 989e12),
    ("H200", 989e12),
    ("H800", 989e12),
    ("A100", 312e12),
    ("B200", 2.25e15),
    ("L4", 121e12),
    ("TPU v4", 275e12),
    ("TPU v5 lite", 197e12),
    ("TPU v5e", 197e12),
    ("TPU v5", 459e12),       # v5p
    ("TPU v6 lite", 918e12),  # v6e (Trillium)
)


def peak_flops(device_kind: str) -> float | None:
  """Peak bf16 FLOP/s of one device of this kind, or None if unknown."""
  for key, peak in PEAK_BF16_FLOPS:
    if key.lower() in device_kind.lower():
      return peak
  return None


def matmul_params(cfg: llama.LlamaConfig) -> int:
  """Weights that take part in a matmul per token (no embedding lookup)."""
  d, k = cfg.d_model, cfg.head_dim
  attn = d * cfg.n_heads * k * 2 + d * cfg.n_kv_heads * k * 2  # q, o; k, v
  mlp = 3 * d * cfg.d_ff
  return cfg.n_layers * (attn + mlp) + d * cfg.vocab_size     # + LM head


def flops_per_token(cfg: llama.LlamaConfig, seq_len: int) -> float:
  """Training FLOPs per token: forward + backward (3x the forward).

  6 * matmul weights, plus attention scores and values: 2 matmuls of
  T x K per head and layer forward, i.e. 12 * layers * T * (heads * K) for
  forward and backward (PaLM, appendix B; the causal mask is not discounted).
  """
  attn = 12 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
  return 6.0 * matmul_params(cfg) + attn


def mfu(tokens_per_sec: float, flops_token: float, n_devices: int,
        device_kind: str) -> float | None:
  """Model FLOPs utilisation in [0, 1], or None for an unknown device."""
  peak = peak_flops(device_kind)
  if peak is None or n_devices < 1:
    return None
  return tokens_per_sec * flops_token / (peak * n_devices)
