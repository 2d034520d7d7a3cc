"""LLaMA decoder in Flax NNX with one quantization seam.

Owns: `LlamaConfig` (frozen, validated), the modules (QDense, RMSNorm,
Attention with GQA, SwiGLU MLP, Block, Llama), `apply_rope`, and the
rematerialisation policies the blocks run under (`REMAT_POLICIES`).

Every weight matmul (q/k/v/o, gate/up/down, lm_head) goes through `qdense`,
the single seam where a `qconfig.Recipe` chosen by regex rules over the
projection paths ("layers.{i}.attn.q_proj", ..., "lm_head") turns the matmul
into `qdot.qmatmul`. Attention score/value matmuls, norms and the embedding
lookup are never quantized. Parameters carry logical axis names (see
`fp4jax.sharding`); activations are constrained at block boundaries.

Two parameter layouts: one `Block` per layer ("layers.<i>.attn.q_proj.
kernel" [K, N]), or, with `LlamaConfig.scan_layers`, one stacked `Block`
whose parameters carry a leading layer axis ("layers.attn.q_proj.kernel"
[L, K, N], logical axis LAYER_AXIS), run by one `lax.scan`, so the train
step (optimizer included) compiles one layer whatever the depth.
`stack_layers` / `unstack_layers` translate dicts between the two.

Must not import: ml_collections, tensorflow_datasets, grain, or fp4jax
modules to the right of this one (optim, data, checkpoint, train, main).
"""

import contextvars
import dataclasses
import functools
import math
import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from fp4jax import backend
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import sharding
from fp4jax import telemetry

ACT_BTD = ("act_batch", "act_seq", "act_embed")
INIT_STD = 0.02  # GPT-2 / LLaMA-style init for embeddings and projections.


ATTENTIONS = ("auto", "xla", "cudnn")
# jax.named_scope of the attention core (scores, softmax, weighted values).
ATTENTION_SCOPE = "attention_core"

# LlamaConfig.remat -> the jax.checkpoint policy each decoder block runs
# under (None: no rematerialisation). What each keeps for the backward, per
# token and layer, is counted in fp4jax.memory.
REMAT_POLICIES = {
    # Every intermediate autodiff needs stays live until the backward.
    "none": None,
    # Only the block's inputs: the backward recomputes the whole block.
    "full": jax.checkpoint_policies.nothing_saveable,
    # Every dot output (the projections' GEMMs and, with attention "xla",
    # the [T, S] scores and their product with V), f32 as the dots return.
    "dots": jax.checkpoint_policies.checkpoint_dots,
    # Dot outputs without batch dims: the projections' GEMMs, not the
    # attention einsums.
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    # What each quantized projection's backward reads of its input, compact:
    # FP4 codes two per byte, scales, the OCC residual in ELL form
    # (qdot.qmatmul's pack_residuals); the rest of the block is recomputed.
    "quantized": jax.checkpoint_policies.save_only_these_names(
        qdot.SAVED_NAME),
}
REMATS = tuple(REMAT_POLICIES)

# The logical name of the leading axis of layer-stacked parameters
# (LlamaConfig.scan_layers); never sharded (sharding.LOGICAL_RULES).
LAYER_AXIS = "layers"

# While a stacked layer runs (LlamaConfig.scan_layers): ({projection path
# below "layers.<i>." (e.g. "attn.q_proj"): that path's `path_id` in the
# layer being run, traced under the scan}, "layers.<i>" when i is known
# in Python (the telemetry loop) else None).
_LAYER: contextvars.ContextVar[tuple[dict[str, Any], str | None] | None] = (
    contextvars.ContextVar("fp4jax_layer", default=None))


def attention_impl(attention: str, segmented: bool = False) -> str:
  """What LlamaConfig.attention = `attention` runs as: "xla" or "cudnn".

  "auto" is cuDNN's fused flash attention on GPU (it never materialises the
  [T, T] scores) unless documents are packed with segment_ids, which it
  does not take; xla everywhere else (cuDNN attention does not exist on CPU).
  Resolved in Python, before tracing.
  """
  if attention != "auto":
    return attention
  return ("cudnn" if backend.target() == "gpu" and not segmented
          else "xla")


@dataclasses.dataclass(frozen=True)
class LlamaConfig:
  """Model shape and numerics. Hashable: usable as a static jit argument.

  Attributes:
    vocab_size: V, number of token ids.
    d_model: D, residual width.
    n_layers: number of decoder blocks.
    n_heads: H, query heads; head dim K = D // H.
    n_kv_heads: G, key/value heads (GQA); divides H.
    d_ff: F, SwiGLU hidden width.
    max_seq_len: longest sequence the model accepts.
    rope_theta: RoPE base.
    norm_eps: RMSNorm epsilon.
    tie_embeddings: use the embedding transposed as the LM head.
    compute_dtype: dtype of activations and matmul operands.
    param_dtype: dtype parameters are stored in.
    attention: "xla" (einsum + softmax, any backend, segment masks),
      "cudnn" (fused flash attention via jax.nn.dot_product_attention on
      NVIDIA GPUs; causal only, no segment_ids) or "auto" (cudnn on GPU
      without segment_ids, xla otherwise; see `attention_impl`).
    remat: what each decoder block keeps for the backward, a key of
      `REMAT_POLICIES`: "none" (everything), "full" (its input only),
      "dots" / "dots_no_batch" (dot outputs), "quantized" (its quantized
      projections' packed FP4 inputs). Every policy computes the same
      values, key draws included; bit for bit where XLA keeps no excess
      precision (xla_allow_excess_precision=false), as it may round bf16
      intermediates of a recomputed block at other places.
    scan_layers: the decoder stack as one `lax.scan` over layer-stacked
      parameters ([L, ...] per block parameter, see the module docstring):
      the step compiles one block whatever the depth; the same values as
      the unrolled model holding the same parameters. Per-layer recipe
      rules are refused under it. Checkpoints and HF exports move between
      the layouts (`recast`, `hf`).
    gemm: how the quantized projections' GEMMs run (`qconfig.Execution`:
      impl, accumulation, sparse_impl), like `attention` a choice of the
      run, not of the model (config section `gemm`).
  """
  vocab_size: int
  d_model: int
  n_layers: int
  n_heads: int
  n_kv_heads: int
  d_ff: int
  max_seq_len: int
  rope_theta: float = 10000.0
  norm_eps: float = 1e-5
  tie_embeddings: bool = False
  compute_dtype: str = "bfloat16"
  param_dtype: str = "float32"
  attention: str = "auto"
  remat: str = "none"
  scan_layers: bool = False
  gemm: qconfig.Execution = qconfig.Execution()

  def __post_init__(self):
    if self.attention not in ATTENTIONS:
      raise ValueError(f"LlamaConfig.attention must be one of {ATTENTIONS}, "
                       f"got {self.attention!r}")
    if self.remat not in REMATS:
      raise ValueError(f"LlamaConfig.remat must be one of {REMATS}, "
                       f"got {self.remat!r}")
    if not isinstance(self.gemm, qconfig.Execution):
      raise ValueError(f"LlamaConfig.gemm must be a qconfig.Execution, got "
                       f"{self.gemm!r}")
    if not isinstance(self.scan_layers, bool):
      raise ValueError(f"LlamaConfig.scan_layers must be a bool, got "
                       f"{self.scan_layers!r}")
    for name in ("vocab_size", "d_model", "n_layers", "n_heads",
                 "n_kv_heads", "d_ff", "max_seq_len"):
      v = getattr(self, name)
      if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise ValueError(f"LlamaConfig.{name} must be a positive int, "
                         f"got {v!r}")
    if self.d_model % self.n_heads:
      raise ValueError(f"LlamaConfig.n_heads={self.n_heads} does not divide "
                       f"d_model={self.d_model}")
    if self.n_heads % self.n_kv_heads:
      raise ValueError(f"LlamaConfig.n_kv_heads={self.n_kv_heads} does not "
                       f"divide n_heads={self.n_heads}")
    if self.head_dim % 2:
      raise ValueError(f"LlamaConfig.d_model / n_heads = {self.head_dim} "
                       "must be even for RoPE")
    for name in ("rope_theta", "norm_eps"):
      if not getattr(self, name) > 0:
        raise ValueError(f"LlamaConfig.{name} must be > 0, "
                         f"got {getattr(self, name)!r}")
    for name in ("compute_dtype", "param_dtype"):
      try:
        ok = jnp.issubdtype(jnp.dtype(getattr(self, name)), jnp.floating)
      except TypeError:
        ok = False
      if not ok:
        raise ValueError(f"LlamaConfig.{name} must name a float dtype, "
                         f"got {getattr(self, name)!r}")

  @property
  def head_dim(self) -> int:
    return self.d_model // self.n_heads


def projection_paths(cfg: LlamaConfig) -> list[str]:
  """Paths of every weight matmul, in model order; the keys of quant rules."""
  paths = []
  for i in range(cfg.n_layers):
    paths += [f"layers.{i}.attn.{p}"
              for p in ("q_proj", "k_proj", "v_proj", "o_proj")]
    paths += [f"layers.{i}.mlp.{p}"
              for p in ("gate_proj", "up_proj", "down_proj")]
  return paths + ["lm_head"]


def path_id(path: str) -> int:
  """Stable per-path integer for folding PRNG keys (independent of order)."""
  return zlib.crc32(path.encode()) & 0x7FFFFFFF


def qdense(x: jax.Array, kernel: jax.Array, recipe, key: jax.Array | None,
           pid: int, out_dtype, path: str = "", pack: bool = False,
           execution: qconfig.Execution | None = None) -> jax.Array:
  """The quantization seam: x @ kernel per `recipe`.

  Args:
    x: [..., Kc] activations in the compute dtype.
    kernel: [Kc, N] weight, already in the compute dtype.
    recipe: a `qconfig.Recipe`, or None for a plain matmul.
    key: PRNG key (or None); folded with `pid` so projections draw
      independent randomness.
    pid: this projection's `path_id`.
    out_dtype: dtype of the result.
    path: the projection's path, for an active `telemetry.Probe`.
    pack: keep the backward's view of x packed and named for remat
      "quantized" (`qdot.qmatmul`'s pack_residuals).
    execution: how its GEMMs run (LlamaConfig.gemm).

  Returns:
    [..., N] in out_dtype.
  """
  lead = x.shape[:-1]
  x2d = x.reshape(-1, x.shape[-1])
  k = None if key is None or recipe is None else jax.random.fold_in(key, pid)
  # f32 accumulation, one rounding to out_dtype (plain matmul when the
  # recipe is None or does not quantize).
  y = qdot.qmatmul(x2d, kernel, recipe, k, out_dtype=out_dtype,
                   pack_residuals=pack, execution=execution)
  probe = telemetry.active()
  if probe is not None:
    y = probe.observe(path, x2d, kernel, y, recipe)
  return y.reshape(*lead, kernel.shape[-1])


class QDense(nnx.Module):
  """A bias-free projection y = x @ kernel that may be quantized.

  Attributes:
    kernel: [in, out] Param with logical names.
    recipe: static `qconfig.Recipe` or None.
  """

  def __init__(self, d_in: int, d_out: int, *, path: str, recipe,
               names: tuple[str, str], std: float, cfg: LlamaConfig,
               out_dtype: str | None = None, rngs: nnx.Rngs):
    init = sharding.param_init(nnx.initializers.normal(std), names)
    self.kernel = nnx.Param(init(rngs.params(), (d_in, d_out),
                                 jnp.dtype(cfg.param_dtype)))
    self.recipe = recipe
    self.pid = path_id(path)
    self.path = path
    self.compute_dtype = cfg.compute_dtype
    self.out_dtype = out_dtype or cfg.compute_dtype
    self.pack = cfg.remat == "quantized"
    self.execution = cfg.gemm

  def __call__(self, x: jax.Array, key: jax.Array | None = None
               ) -> jax.Array:
    """x: [..., in] -> [..., out] in out_dtype."""
    kernel = self.kernel[...].astype(self.compute_dtype)
    pid, path = self.pid, self.path
    layer = _LAYER.get()
    if layer is not None:
      # A stacked block's modules are built as layer 0's; the caller hands
      # over the ids (and, when known, the path) of the layer it runs, so
      # the randomness per path is the unrolled model's.
      pids, prefix = layer
      suffix = path.split(".", 2)[2]
      pid = pids[suffix]
      path = path if prefix is None else f"{prefix}.{suffix}"
    return qdense(x.astype(self.compute_dtype), kernel, self.recipe, key,
                  pid, self.out_dtype, path, self.pack, self.execution)


class RMSNorm(nnx.Module):
  """Root-mean-square norm with a learned scale, computed in float32."""

  def __init__(self, dim: int, cfg: LlamaConfig):
    init = sharding.param_init(nnx.initializers.ones, ("norm",))
    self.scale = nnx.Param(init(None, (dim,), jnp.dtype(cfg.param_dtype)))
    self.eps = cfg.norm_eps
    self.dtype = cfg.compute_dtype

  def __call__(self, x: jax.Array) -> jax.Array:
    """x: [..., D] -> [..., D] in the compute dtype."""
    x32 = x.astype(jnp.float32)
    inv = jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    return (x32 * inv * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def apply_rope(x_bthk: jax.Array, positions_bt: jax.Array,
               theta: float) -> jax.Array:
  """Rotary position embedding, half-split ("rotate_half") layout.

  Dim pairs (i, i + K/2) rotate by angle pos * theta^(-2i/K).

  Args:
    x_bthk: [B, T, H, K] queries or keys, K even.
    positions_bt: [B, T] integer positions.
    theta: RoPE base.

  Returns:
    [B, T, H, K] in x's dtype (rotation computed in float32).
  """
  half = x_bthk.shape[-1] // 2
  freq = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  ang = positions_bt.astype(jnp.float32)[..., None] * freq  # [B, T, K/2]
  cos = jnp.cos(ang)[:, :, None, :]
  sin = jnp.sin(ang)[:, :, None, :]
  x = x_bthk.astype(jnp.float32)
  x1, x2 = x[..., :half], x[..., half:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x_bthk.dtype)


def _out_std(cfg: LlamaConfig) -> float:
  # Residual-branch outputs (o_proj, down_proj) start smaller so the
  # residual stream's variance does not grow with depth.
  return INIT_STD / math.sqrt(2 * cfg.n_layers)


def _projection(cfg, prefix, table, rngs, name, d_in, d_out, names,
                std=INIT_STD) -> "QDense":
  """The QDense at `<prefix>.<name>` with its recipe from the rule table."""
  path = f"{prefix}.{name}"
  return QDense(d_in, d_out, path=path, recipe=table[path], names=names,
                std=std, cfg=cfg, rngs=rngs)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with RoPE."""

  def __init__(self, cfg: LlamaConfig, prefix: str, table: dict,
               rngs: nnx.Rngs):
    d, kd = cfg.d_model, cfg.head_dim
    out_std = _out_std(cfg)
    proj = functools.partial(_projection, cfg, prefix, table, rngs)
    self.q_proj = proj("q_proj", d, cfg.n_heads * kd, ("embed", "heads"))
    self.k_proj = proj("k_proj", d, cfg.n_kv_heads * kd, ("embed", "heads"))
    self.v_proj = proj("v_proj", d, cfg.n_kv_heads * kd, ("embed", "heads"))
    self.o_proj = proj("o_proj", cfg.n_heads * kd, d, ("heads", "embed"),
                       out_std)
    self.cfg = cfg

  def __call__(self, x_btd: jax.Array, positions_bt: jax.Array,
               mask_bts: jax.Array | None, key: jax.Array | None
               ) -> jax.Array:
    """x_btd: [B, T, D]; mask_bts: [B, T, S] bool (True = may attend), or
    None for causal attention through cuDNN's fused kernel."""
    cfg = self.cfg
    b, t, _ = x_btd.shape
    g, r, kd = cfg.n_kv_heads, cfg.n_heads // cfg.n_kv_heads, cfg.head_dim
    q = self.q_proj(x_btd, key).reshape(b, t, g * r, kd)
    k = self.k_proj(x_btd, key).reshape(b, t, g, kd)
    v = self.v_proj(x_btd, key).reshape(b, t, g, kd)
    q = apply_rope(q, positions_bt, cfg.rope_theta).reshape(b, t, g, r, kd)
    k = apply_rope(k, positions_bt, cfg.rope_theta)
    # The scope names the attention core's kernels in the compiled program
    # (bench/gpu_model.py costs it apart from the projections).
    with jax.named_scope(ATTENTION_SCOPE):
      o = self._core(q, k, v, mask_bts)
    return self.o_proj(o, key)

  def _core(self, q, k, v, mask_bts):
    """softmax(q k^T / sqrt(K)) v: q [B, T, G, R, K], k / v [B, S, G, K]
    -> [B, T, G * R * K] in the compute dtype."""
    cfg = self.cfg
    b, t, g, r, kd = q.shape
    if mask_bts is None:
      # Fused causal flash attention (segment_ids never come this way:
      # attention_impl chose xla for them).
      o = jax.nn.dot_product_attention(
          q.reshape(b, t, g * r, kd), k, v, is_causal=True,
          implementation="cudnn")
      return o.reshape(b, t, g * r * kd)
    # Query head h = g * R + r shares kv head g: consecutive query heads
    # form a group, the layout LLaMA checkpoints use.
    s = jnp.einsum("BTGRK,BSGK->BGRTS", q, k,
                   preferred_element_type=jnp.float32) / math.sqrt(kd)
    s = jnp.where(mask_bts[:, None, None], s, jnp.finfo(jnp.float32).min)
    p = jax.nn.softmax(s, axis=-1).astype(cfg.compute_dtype)
    o = jnp.einsum("BGRTS,BSGK->BTGRK", p, v,
                   preferred_element_type=jnp.float32)
    return o.astype(cfg.compute_dtype).reshape(b, t, g * r * kd)


class MLP(nnx.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  def __init__(self, cfg: LlamaConfig, prefix: str, table: dict,
               rngs: nnx.Rngs):
    out_std = _out_std(cfg)
    proj = functools.partial(_projection, cfg, prefix, table, rngs)
    self.gate_proj = proj("gate_proj", cfg.d_model, cfg.d_ff,
                          ("embed", "mlp"))
    self.up_proj = proj("up_proj", cfg.d_model, cfg.d_ff, ("embed", "mlp"))
    self.down_proj = proj("down_proj", cfg.d_ff, cfg.d_model,
                          ("mlp", "embed"), out_std)

  def __call__(self, x_btd: jax.Array, key: jax.Array | None) -> jax.Array:
    """x_btd: [B, T, D] -> [B, T, D]."""
    h = jax.nn.silu(self.gate_proj(x_btd, key)) * self.up_proj(x_btd, key)
    h = sharding.constrain(h, ("act_batch", "act_seq", "act_mlp"))
    return self.down_proj(h, key)


class Block(nnx.Module):
  """Pre-norm decoder block: x + attn(norm(x)), then h + mlp(norm(h))."""

  def __init__(self, cfg: LlamaConfig, i: int, table: dict, rngs: nnx.Rngs):
    self.attn_norm = RMSNorm(cfg.d_model, cfg)
    self.attn = Attention(cfg, f"layers.{i}.attn", table, rngs)
    self.mlp_norm = RMSNorm(cfg.d_model, cfg)
    self.mlp = MLP(cfg, f"layers.{i}.mlp", table, rngs)

  def __call__(self, x_btd, positions_bt, mask_bts, key):
    h = x_btd + self.attn(self.attn_norm(x_btd), positions_bt, mask_bts, key)
    h = sharding.constrain(h, ACT_BTD)
    out = h + self.mlp(self.mlp_norm(h), key)
    return sharding.constrain(out, ACT_BTD)


def _call_block(block: Block, x_btd, positions_bt, mask_bts, key):
  return block(x_btd, positions_bt, mask_bts, key)


@functools.cache
def _block_fn(remat: str, scanned: bool = False):
  """`_call_block`, rematerialised under the policy named `remat`.

  prevent_cse: in a Python loop of blocks, without it XLA may merge the
  backward's recomputation with the forward's values and keep them live
  after all; inside a scan (`scanned`) the loop boundary already keeps
  them apart, and the barriers would only block fusion.
  """
  if REMAT_POLICIES[remat] is None:
    return _call_block
  return nnx.remat(_call_block, policy=REMAT_POLICIES[remat],
                   prevent_cse=not scanned)


def _check_uniform_layers(table: dict) -> None:
  """Scanned layers run one block's program for every layer: the resolved
  recipes must not differ between layers (one line naming the first that
  does)."""
  for path, recipe in table.items():
    parts = path.split(".", 2)
    if parts[0] != "layers" or parts[1] == "0":
      continue
    first = table[f"layers.0.{parts[2]}"]
    if recipe != first:
      def name(r):
        return "none" if r is None else r.name
      raise ValueError(
          f"model.scan_layers=True runs every layer with one program, but "
          f"{path} has recipe {name(recipe)!r} and layers.0.{parts[2]} "
          f"{name(first)!r} (per-layer rules or a bf16 tail); use "
          f"scan_layers=False")


def _stacked_blocks(cfg: LlamaConfig, table: dict, rngs: nnx.Rngs) -> Block:
  """One Block whose parameters are stacked on a leading [n_layers] axis
  (logical name LAYER_AXIS), each layer initialised from its own key; built
  by one vmapped program, so initialisation, too, compiles one layer."""
  @nnx.split_rngs(splits=cfg.n_layers)
  @nnx.vmap(in_axes=(0,), out_axes=0,
            transform_metadata={nnx.PARTITION_NAME: LAYER_AXIS})
  def build(layer_rngs):
    return Block(cfg, 0, table, layer_rngs)
  return build(rngs)


def stack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """A pure-dict param tree ({"layers": {i: layer}, ...}) in the stacked
  layout ({"layers": layer with a leading [L] axis on every leaf});
  unchanged if already stacked. numpy and jax arrays alike."""
  layers = params["layers"]
  if not _per_layer(layers):
    return dict(params)
  ordered = [layers[k] for k in sorted(layers, key=int)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs) if isinstance(
      xs[0], jax.Array) else np.stack(xs), *ordered)
  return {**params, "layers": stacked}


def unstack_layers(params: Mapping[str, Any]) -> dict[str, Any]:
  """The inverse of `stack_layers`: {"layers": {i: layer i}}; unchanged if
  already one entry per layer."""
  layers = params["layers"]
  if _per_layer(layers):
    return dict(params)
  n = jax.tree.leaves(layers)[0].shape[0]
  return {**params, "layers": {
      i: jax.tree.map(lambda a, i=i: a[i], layers) for i in range(n)}}


def _per_layer(layers: Mapping[Any, Any]) -> bool:
  """Whether a "layers" subtree is keyed by layer index."""
  return all(isinstance(k, int) or str(k).isdigit() for k in layers)


class Llama(nnx.Module):
  """LLaMA decoder-only LM.

  Args:
    cfg: model shape and numerics.
    table: the resolved layer table {projection path: Recipe or None} over
      `projection_paths(cfg)` (what the trainer passes: `models.build`).
    rules: instead of a table, ordered (regex, Recipe | None) pairs over
      `projection_paths(cfg)`, first full match wins, unmatched paths are
      plain; resolved here by `qconfig.resolve_rules` (a rule matching
      nothing is a ValueError). Neither: no projection is quantized.
    rngs: parameter initialisation randomness.
  """

  def __init__(self, cfg: LlamaConfig, *,
               table: Mapping[str, Any] | None = None,
               rules: Sequence[qconfig.Rule] | None = None,
               rngs: nnx.Rngs):
    paths = projection_paths(cfg)
    if table is not None:
      if rules is not None:
        raise ValueError("Llama takes a layer table or rules, not both")
      if list(table) != paths:
        raise ValueError(f"the layer table's paths are not this model's "
                         f"projection paths (first: {paths[:1]})")
      table = dict(table)
    else:   # no rules: every path plain
      table = qconfig.resolve_rules(paths, rules or ())
    if cfg.scan_layers:
      _check_uniform_layers(table)
    self.cfg = cfg
    # A tuple of pairs: static under nnx, and order is the model order.
    self._quant_items = tuple(
        (p, "none" if r is None or not r.quantizes else r.name)
        for p, r in table.items())
    init = sharding.param_init(nnx.initializers.normal(INIT_STD),
                               ("vocab", "embed"))
    self.embed = nnx.Param(init(rngs.params(), (cfg.vocab_size, cfg.d_model),
                                jnp.dtype(cfg.param_dtype)))
    if cfg.scan_layers:
      self.layers = _stacked_blocks(cfg, table, rngs)
    else:
      self.layers = nnx.List([Block(cfg, i, table, rngs)
                              for i in range(cfg.n_layers)])
    self.final_norm = RMSNorm(cfg.d_model, cfg)
    self.lm_recipe = table["lm_head"]
    self.lm_pid = path_id("lm_head")
    if not cfg.tie_embeddings:
      self.lm_head = QDense(cfg.d_model, cfg.vocab_size, path="lm_head",
                            recipe=table["lm_head"], names=("embed", "vocab"),
                            std=INIT_STD, cfg=cfg, out_dtype="float32",
                            rngs=rngs)

  @property
  def quant_table(self) -> dict[str, str]:
    """Projection path -> recipe name, or "none" when not quantized."""
    return dict(self._quant_items)

  def _layer_pids(self) -> dict[str, list[int]]:
    """{projection path below "layers.<i>.": [its path_id in layer i]}."""
    suffixes = [p.split(".", 2)[2] for p in self._layer_paths(0)]
    return {s: [path_id(f"layers.{i}.{s}") for i in range(self.cfg.n_layers)]
            for s in suffixes}

  def _stacked_state(self):
    """(graphdef, state) of the stacked block, kernels (>= 2-D per layer)
    cast to the compute dtype they are read in: one cast per stacked
    parameter, outside the loop, so the gradient communication
    (`comm.read_dtypes`) sees each kernel read in that dtype."""
    graphdef, state = nnx.split(self.layers)
    compute = jnp.dtype(self.cfg.compute_dtype)
    return graphdef, jax.tree.map(
        lambda v: v.astype(compute) if v.ndim >= 3 else v, state)

  def _scan_layers(self, block_fn, x, positions, mask, key):
    """The decoder stack as one `lax.scan` over the stacked block's
    parameters (LlamaConfig.scan_layers). Layer i runs with slice i of
    every parameter and layer i's path ids (`_LAYER`), so the values and
    random draws are those of the unrolled model holding the same
    parameters (`unstack_layers`)."""
    graphdef, state = self._stacked_state()
    pids = {s: jnp.asarray(v, jnp.int32) for s, v in self._layer_pids().items()}

    def body(h, xs):
      layer_state, layer_pids = xs
      token = _LAYER.set((layer_pids, None))
      try:
        h = block_fn(nnx.merge(graphdef, layer_state), h, positions, mask,
                     key)
      finally:
        _LAYER.reset(token)
      return h, None

    x, _ = jax.lax.scan(body, x, (state, pids))
    return x

  def _loop_stacked(self, block_fn, x, positions, mask, key):
    """The stacked block run layer by layer in Python (a telemetry probe
    needs each layer's arrays and path)."""
    graphdef, state = self._stacked_state()
    pids = self._layer_pids()
    for i in range(self.cfg.n_layers):
      layer = nnx.merge(graphdef, jax.tree.map(lambda v, i=i: v[i], state))
      token = _LAYER.set(({s: v[i] for s, v in pids.items()},
                          f"layers.{i}"))
      try:
        x = block_fn(layer, x, positions, mask, key)
      finally:
        _LAYER.reset(token)
    return x

  def _layer_paths(self, i: int) -> list[str]:
    return [p for p, _ in self._quant_items if p.startswith(f"layers.{i}.")]

  def __call__(self, tokens: jax.Array, *,
               segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None,
               key: jax.Array | None = None) -> jax.Array:
    """Next-token logits.

    Args:
      tokens: [B, T] int32 token ids.
      segment_ids: optional [B, T] int; tokens attend only within their own
        segment (packed documents).
      positions: optional [B, T] int RoPE positions (default 0..T-1).
      key: optional PRNG key for stochastic-rounding recipes.

    Returns:
      [B, T, V] float32 logits.
    """
    cfg = self.cfg
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [B, T], got shape {tokens.shape}")
    b, t = tokens.shape
    if t > cfg.max_seq_len:
      raise ValueError(f"tokens length {t} > LlamaConfig.max_seq_len "
                       f"{cfg.max_seq_len}")
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is not None and cfg.attention == "cudnn":
      raise ValueError("LlamaConfig.attention='cudnn' supports causal "
                       "masks only; use attention='xla' with segment_ids")
    mask = None    # None: fused causal attention, no mask materialised
    if attention_impl(cfg.attention, segmented=segment_ids is not None) == "xla":
      causal = jnp.tril(jnp.ones((t, t), dtype=jnp.bool_))
      mask = jnp.broadcast_to(causal, (b, t, t))
      if segment_ids is not None:
        mask = mask & (segment_ids[:, :, None] == segment_ids[:, None, :])
    x = jnp.take(self.embed[...], tokens, axis=0).astype(cfg.compute_dtype)
    x = sharding.constrain(x, ACT_BTD)
    # An active telemetry Probe records arrays traced inside the blocks; a
    # rematerialised block's would be tracers of its own trace, unusable
    # outside it, so a probed call (the separate telemetry step) runs the
    # blocks without remat: the same values, the memory of remat "none".
    probed = telemetry.active() is not None
    block_fn = _block_fn("none" if probed else cfg.remat)
    if cfg.scan_layers and probed:
      x = self._loop_stacked(block_fn, x, positions, mask, key)
    elif cfg.scan_layers:
      x = self._scan_layers(_block_fn(cfg.remat, scanned=True), x,
                            positions, mask, key)
    else:
      for layer in self.layers:
        x = block_fn(layer, x, positions, mask, key)
    x = self.final_norm(x)
    if cfg.tie_embeddings:
      kernel = self.embed[...].astype(cfg.compute_dtype).T
      return qdense(x, kernel, self.lm_recipe, key, self.lm_pid, jnp.float32,
                    pack=cfg.remat == "quantized", execution=cfg.gemm)
    return self.lm_head(x, key)
