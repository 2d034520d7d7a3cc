"""Activation memory of a train step: an analytic count and XLA's own figure.

Owns: the bytes of activations the backward of `llama.Llama` needs, per
token (no rematerialization: every layer's are live at the peak), and
reading a compiled step's `memory_analysis`.

The count is the tensors autodiff must keep, at their dtypes (c = bytes of
the compute dtype), per token and decoder layer:

  attention:  norm input (residual, c) and its f32 rsqrt (4 / D, ignored),
              norm output (c), q / k / v (c (D + 2 G K)), the attention
              output (c D); with "xla" attention the softmax
              probabilities (c H T per token) and its f32 logits are not
              both kept: the probabilities are, c H T; "cudnn" keeps its
              log-sum-exp (4 H).
  MLP:        norm input and output (2 c D), gate and up outputs (2 c F),
              their product, the down projection's input (c F).

plus the LM head's input (c D) and its f32 logits (4 V) for the loss. A
quantized projection's custom_vjp also keeps its quantized input: one more
copy per projection at c bytes (q, k and v quantize their shared input
each: 6 D + F per layer). What XLA allocates
differs: it fuses some of these away and keeps temporaries (CPU keeps f32
copies of several), so the start line also prints the compiled step's own
temp bytes, which are exact for the platform at hand.

Must not import: ml_collections, or fp4jax modules right of `llama`.
"""

from typing import Any

import jax.numpy as jnp

from fp4jax import llama


def activation_bytes_per_token(cfg: llama.LlamaConfig, seq_len: int,
                               quantized: bool) -> float:
  """Bytes of saved activations per token of a device's micro-batch.

  Args:
    cfg: the model.
    seq_len: T (the xla attention keeps H T probabilities per token).
    quantized: projections quantize (keep their quantized inputs too).

  Returns:
    Bytes per token, all layers and the head (see the module docstring).
  """
  c = jnp.dtype(cfg.compute_dtype).itemsize
  d, f = cfg.d_model, cfg.d_ff
  kv = cfg.n_kv_heads * cfg.head_dim
  attn = c * (d + d + (d + 2 * kv) + d)
  attn += (c * cfg.n_heads * seq_len if llama.attention_impl(cfg.attention) == "xla"
           else 4 * cfg.n_heads)
  mlp = c * (2 * d + 3 * f)
  per_layer = attn + mlp
  if quantized:
    per_layer += c * (4 * d + 2 * d + f)   # q k v o; gate up; down
  return cfg.n_layers * per_layer + c * d + 4 * cfg.vocab_size


def compiled_bytes(compiled: Any) -> dict[str, int] | None:
  """XLA's memory analysis of a compiled step, per device, or None.

  Returns:
    {"temp", "arguments", "outputs", "aliased"} in bytes; None where the
    backend gives no analysis.
  """
  try:
    m = compiled.memory_analysis()
  except Exception:  # pylint: disable=broad-except  # backend-specific
    return None
  if m is None:
    return None
  return {"temp": int(m.temp_size_in_bytes),
          "arguments": int(m.argument_size_in_bytes),
          "outputs": int(m.output_size_in_bytes),
          "aliased": int(m.alias_size_in_bytes)}
