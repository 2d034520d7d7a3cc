"""Activation memory of a train step: an analytic count and XLA's own figure.

Owns: the bytes of activations the backward of `llama.Llama` needs, per
token, under each rematerialisation policy (`LlamaConfig.remat`), and
reading a compiled step's `memory_analysis`.

The count is the tensors autodiff must keep, at their dtypes (c = bytes of
the compute dtype), per token and decoder layer. Without remat ("none"):

  attention:  norm input (residual, c) and its f32 rsqrt (4 / D, ignored),
              norm output (c), q / k / v (c (D + 2 G K)), the attention
              output (c D); with "xla" attention the softmax
              probabilities (c H T per token) and its f32 logits are not
              both kept: the probabilities are, c H T; "cudnn" keeps its
              log-sum-exp (4 H).
  MLP:        norm input and output (2 c D), gate and up outputs (2 c F),
              their product, the down projection's input (c F).

A quantized projection's custom_vjp also keeps its quantized input: one
more copy per projection at c bytes (q, k and v quantize their shared input
each: 6 D + F per layer). With remat a block keeps its input (c D) and
what its policy saves; the backward recomputes the rest, one block at a
time:

  "full":           nothing more.
  "dots":           every dot output the backward reads, f32: each
                    projection's GEMM (4 N for an N-wide output; a second
                    for compensation "sparse" through dense GEMMs, the
                    rotated X for fwd.rht) but the down projection's, whose
                    output meets only the residual add, and with "xla"
                    attention its scores (4 H T) and output (4 D); "cudnn"
                    attention is no dot.
  "dots_no_batch":  the projections' GEMMs only.
  "quantized":      for each quantized projection of input width K, what
                    its backward reads of X (qdot's pack_residuals): FP4
                    codes two per byte (K / 2) and the f32 scales (4 per
                    token, 4 K / block for block scales), the OCC residual
                    in ELL form (8 bytes per slot, `compensation.capacity`
                    slots) or dense f32 (tensor-wise OCC); an X that is not
                    on an FP4 grid stays c K. q, k and v quantize one input
                    alike, and so do gate and up: XLA keeps one copy of
                    each (CSE), unless X rounds stochastically.
                    Unquantized projections keep nothing.

All policies add the LM head's input (c D) and its f32 logits (4 V) for
the loss, outside the blocks. XLA's compiled step keeps what the remat
policies count (XLA:CPU at 1.3B width: "full", "dots_no_batch" and
"quantized" to the byte, "dots" 4 % under; tests/remat_test.py). Without
remat it keeps more than the "none" count, the floor of what autodiff must
keep (XLA:CPU, "xla" attention, T = 2048: 2.8x, mostly f32 attention
scores and probabilities, and f32 copies of the normalised activations),
so the start line also prints the compiled step's own temp bytes, which
are exact for the platform at hand.

Must not import: ml_collections, or fp4jax modules right of `llama`.
"""

import math
from typing import Any

import jax.numpy as jnp

from fp4jax import compensation
from fp4jax import llama
from fp4jax import numerics
from fp4jax import qconfig

# The recipe `activation_bytes_per_token` assumes for quantized projections
# when none is named: the paper's (RECIPE §5).
DEFAULT_RECIPE = "fp4_paper"


def _projections(cfg: llama.LlamaConfig) -> list[tuple[int, int, str]]:
  """(input width K, output width N, input name) of a block's seven
  projections; q, k and v share one input, gate and up another."""
  d, f = cfg.d_model, cfg.d_ff
  kv = cfg.n_kv_heads * cfg.head_dim
  h = cfg.n_heads * cfg.head_dim
  return [(d, h, "attn_in"), (d, kv, "attn_in"), (d, kv, "attn_in"),
          (h, d, "attn_out"), (d, f, "mlp_in"), (d, f, "mlp_in"),
          (f, d, "mlp_hidden")]


def _scale_bytes(q: qconfig.TensorQuant, k: int) -> float:
  """f32 scale bytes per token (row) of an X [M, k] quantized per q."""
  if q.block:
    # Blocks along K, or down the tokens (one scale per column per block
    # rows), or block x block tiles: k / block scales per token either way,
    # but a tile's spans `block` tokens.
    return 4 * k / q.block / (q.block if q.block_2d else 1)
  return 4 if q.axis is not None and q.axis % 2 == 1 else 0


def _resid_bytes(r: qconfig.Recipe, k: int, run: qconfig.Execution
                 ) -> float:
  """One row of the OCC residual as the packed residuals keep it."""
  if r.occ.axis is None:
    return 4 * k
  # compensation.Ell: int32 column and f32 value per slot. The ELL
  # products, sparse_impl "ell", keep the slots OCC's top_k found, two more
  # per row (quant.occ_clamp_tails); a plan is an accelerator's, where
  # "auto" is the dense GEMM.
  extra = 2 if (run.sparse_impl == "ell"
                and r.effective_compensation == "sparse") else 0
  return 8 * (compensation.capacity(k, r.occ.alpha) + extra)


def _packed_bytes(r: qconfig.Recipe, k: int, c: int,
                  run: qconfig.Execution) -> float:
  """Bytes per token remat "quantized" keeps of a projection with input
  width k (qdot's _pack_residuals)."""
  comp = r.effective_compensation
  reuse = not r.requantizes
  if ((reuse or r.requant_from == "quantized") and r.x is not None
      and numerics.get_format(r.x.fmt).is_fp4):
    b = math.ceil(k / 2) + _scale_bytes(r.x, k)
    if reuse and comp == "dense":
      b += _resid_bytes(r, k, run)
  else:
    b = c * k
  if comp == "sparse" or (comp == "dense" and not reuse):
    b += _resid_bytes(r, k, run)
  return b


def _dot_bytes(r: qconfig.Recipe | None, cfg: llama.LlamaConfig,
               run: qconfig.Execution) -> float:
  """f32 dot outputs per token of a block's projections (remat "dots")."""
  b = 0
  for k, n, name in _projections(cfg):
    if name == "mlp_hidden":
      continue    # down's output meets only the residual add: not needed
    b += 4 * n
    if (r is not None and r.effective_compensation == "sparse"
        and run.sparse_impl != "ell"):
      # (a plan is for an accelerator, where "auto" is the dense GEMM)
      b += 4 * n          # R W through a dense GEMM
  if r is not None and r.fwd.rht:
    # The rotation of X is a dot too, one per distinct input (see
    # _distinct_inputs).
    b += sum(4 * k for k in _distinct_inputs(r, cfg))
  return b


def _distinct_inputs(r: qconfig.Recipe, cfg: llama.LlamaConfig
                     ) -> list[int]:
  """The width K of each input whose quantization a block keeps once.

  XLA merges identical computations (CSE): q, k and v quantize their
  shared input identically, and so do gate and up, so one copy of what
  they keep is saved per input; unless X rounds stochastically, with keys
  that differ per projection.
  """
  if r.x is not None and r.x.rounding == "stochastic":
    return [k for k, _, _ in _projections(cfg)]
  return list({name: k for k, _, name in _projections(cfg)}.values())


def activation_bytes_per_token(cfg: llama.LlamaConfig, seq_len: int,
                               quantized: bool, remat: str | None = None,
                               recipe: qconfig.Recipe | str | None = None,
                               execution: qconfig.Execution | None = None
                               ) -> float:
  """Bytes of saved activations per token of a device's micro-batch.

  Args:
    cfg: the model.
    seq_len: T (the xla attention keeps H T probabilities per token).
    quantized: the block projections quantize (keep their quantized inputs
      too).
    remat: a `llama.REMATS` policy; default cfg.remat.
    recipe: the block projections' recipe where `quantized`, for the
      policies whose bytes depend on it ("dots", "dots_no_batch",
      "quantized"); default DEFAULT_RECIPE. Ignored otherwise.
    execution: how its GEMMs run (sparse_impl "ell" keeps what the ELL
      products read); default Execution(), planned as on an accelerator.

  Returns:
    Bytes per token, all layers and the head (see the module docstring).
  """
  remat = cfg.remat if remat is None else remat
  if remat not in llama.REMATS:
    raise ValueError(f"remat must be one of {llama.REMATS}, got {remat!r}")
  if isinstance(recipe, str) or (recipe is None and quantized):
    recipe = qconfig.get_recipe(recipe or DEFAULT_RECIPE)
  r = recipe if quantized and recipe.quantizes else None
  run = qconfig.Execution() if execution is None else execution
  c = jnp.dtype(cfg.compute_dtype).itemsize
  d, f = cfg.d_model, cfg.d_ff
  kv = cfg.n_kv_heads * cfg.head_dim
  xla_attention = llama.attention_impl(cfg.attention) == "xla"
  head = c * d + 4 * cfg.vocab_size
  if remat == "none":
    attn = c * (d + d + (d + 2 * kv) + d)
    attn += c * cfg.n_heads * seq_len if xla_attention else 4 * cfg.n_heads
    mlp = c * (2 * d + 3 * f)
    per_layer = attn + mlp
    if quantized:
      per_layer += c * (4 * d + 2 * d + f)   # q k v o; gate up; down
    return cfg.n_layers * per_layer + head
  per_layer = c * d                          # the block's input
  if remat in ("dots", "dots_no_batch"):
    per_layer += _dot_bytes(r, cfg, run)
    if remat == "dots" and xla_attention:
      per_layer += 4 * cfg.n_heads * seq_len + 4 * cfg.n_heads * cfg.head_dim
  elif remat == "quantized" and r is not None:
    per_layer += sum(_packed_bytes(r, k, c, run)
                     for k in _distinct_inputs(r, cfg))
  return cfg.n_layers * per_layer + head


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
