"""Mixed-precision AdamW: config, schedule, moment storage, master weights.

Owns `OptimConfig` (the `config.optim` keys, one field each), the learning
rate schedule, `scale_by_adam_mp` (Adam whose moments are stored in FP8 /
FP16 / BF16 / F32 while all arithmetic is f32), FP8 weight-gradient rounding,
the weight-decay mask, the low-memory master-weight mode and `state_bytes`.

Layer-stacked leaves (a model with scanned layers keeps each parameter of
its layers as one [L, ...] array; `layer_mask` says which) are L tensors
to every per-tensor rule here: each layer keeps its own moment scales and
FP8 gradient scale (an [L] scale array), and a leaf is a matrix (decayed,
stored in the master dtype) when one layer's slice is.
The low-precision parts follow FP8-LM / MS-AMP O2 (arXiv 2310.18313), which
the FP4 paper inherits: Adam m in FP8 E4M3 and v in FP16, each with a
per-tensor scale, and FP8 E4M3 weight gradients.

Imports jax, optax, numpy, the standard library and `fp4jax.numerics` (for
FP8/FP16 rounding that survives XLA:GPU's excess-precision passes). Must not
import ml_collections, tensorflow_datasets, grain or other fp4jax modules: the
training code converts its config with `OptimConfig(**config.optim.to_dict())`.

Training-loop use (the same five calls in every mode)::

  tx = make_optimizer(cfg, num_steps)
  params = cast_master(params, cfg)            # once, after init
  opt_state = tx.init(params)
  grads = jax.grad(loss_fn)(params_for_grad(params, cfg), batch)
  updates, opt_state = tx.update(grads, opt_state, params)
  params = apply_updates(params, updates, cfg)  # key=... for stochastic
"""

import dataclasses
import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fp4jax import numerics

_F32 = jnp.dtype(jnp.float32)
_BF16 = jnp.dtype(jnp.bfloat16)
_F16 = jnp.dtype(jnp.float16)
_E4M3 = jnp.dtype(jnp.float8_e4m3fn)

# config.optim.moments -> (first moment dtype, second moment dtype).
# "paper" is FP8-LM's precision decoupling: m tolerates FP8 because the update
# is linear in it, v needs FP16 (their FP8-v ablation diverged).
MOMENT_DTYPES = {
    "fp32": (_F32, _F32),
    "paper": (_E4M3, _F16),
    "bf16": (_BF16, _BF16),
}
# config.optim.master -> storage dtype of the master weight matrices.
MASTER_DTYPES = {"fp32": _F32, "bf16": _BF16, "fp16": _F16}

# Largest finite value of the formats stored with a per-tensor scale. JAX's
# FP8 cast does not saturate (500 -> NaN in e4m3fn), so values are clipped
# to these before the cast.
_SCALED_MAX = {_E4M3: 448.0, _F16: 65504.0}
_MOMENT_STORAGE = (_F32, _BF16, _F16, _E4M3)
# Bound on the scale exponent so 2**e stays a finite, normal f32.
_MAX_SCALE_EXP = 126.0


def _is_number(v: Any) -> bool:
  return isinstance(v, numbers.Real) and not isinstance(v, bool)


@dataclasses.dataclass(frozen=True)
class OptimConfig:
  """AdamW settings; fields equal the keys of `config.optim` one-to-one.

  Attributes:
    lr: peak learning rate (> 0).
    warmup_frac: fraction of the steps spent in linear warmup from 0, [0, 1).
    min_lr_frac: final learning rate of the cosine decay, as a fraction of
      lr, [0, 1].
    b1: Adam first-moment decay, [0, 1).
    b2: Adam second-moment decay, [0, 1).
    eps: Adam denominator epsilon (> 0).
    weight_decay: decoupled weight decay (>= 0); matrices only.
    clip_norm: global gradient norm clip (> 0).
    moments: "fp32" | "paper" (m FP8 E4M3, v FP16, per-tensor scales) |
      "bf16".
    master: "fp32" | "bf16" | "fp16": storage of the weight matrices; the
      2-byte modes are the low-memory mode (see `cast_master`).
    grad_fp8: round weight gradients to FP8 E4M3 with a per-tensor scale
      before the optimizer (FP8-LM's FP8 gradients); in a training run, the
      quantized projections' kernels only.
    proj_lr_scale: multiplies the learning rate (and so the decay step) of
      the block projections' kernels (q/k/v/o, gate/up/down); an
      experiment knob for per-group step sizes, applied by the train step.
    grad_accum: microbatches per step (>= 1): each device's rows are split
      into this many, their gradients accumulated in f32; the batch, and so
      the optimisation, is the same, with one microbatch's activations live
      at a time. Reduced across devices once per step, except with sharded
      parameters (fsdp / tensor) and f32 communication, where each
      microbatch's gradient is reduce-scattered onto the shards (see
      `train_state.train_step`).
  """
  lr: float = 3e-4
  warmup_frac: float = 0.05
  min_lr_frac: float = 0.1
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.1
  clip_norm: float = 1.0
  moments: str = "fp32"
  master: str = "fp32"
  grad_fp8: bool = False
  proj_lr_scale: float = 1.0
  grad_accum: int = 1

  def __post_init__(self):
    # (key, predicate, requirement) checked in order; first failure raises.
    checks = (
        ("lr", lambda v: v > 0 and math.isfinite(v), "> 0 and finite"),
        ("warmup_frac", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("min_lr_frac", lambda v: 0 <= v <= 1, "in [0, 1]"),
        ("b1", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("b2", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("eps", lambda v: v > 0 and math.isfinite(v), "> 0 and finite"),
        ("weight_decay", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        ("clip_norm", lambda v: v > 0, "> 0"),
        ("proj_lr_scale", lambda v: 0 < v < math.inf, "> 0 and finite"),
    )
    for key, ok, need in checks:
      v = getattr(self, key)
      if not _is_number(v) or not ok(v):
        raise ValueError(f"optim.{key} must be a number {need}, got {v!r}")
    for key, table in (("moments", MOMENT_DTYPES), ("master", MASTER_DTYPES)):
      v = getattr(self, key)
      if v not in table:
        raise ValueError(f"optim.{key} must be one of {sorted(table)}, "
                         f"got {v!r}")
    if (not isinstance(self.grad_accum, int) or
        isinstance(self.grad_accum, bool) or self.grad_accum < 1):
      raise ValueError(f"optim.grad_accum must be an int >= 1 (microbatches "
                       f"per step), got {self.grad_accum!r}")
    if not isinstance(self.grad_fp8, bool):
      raise ValueError(f"optim.grad_fp8 must be a bool, got "
                       f"{self.grad_fp8!r}")

  @property
  def mu_dtype(self) -> jnp.dtype:
    return MOMENT_DTYPES[self.moments][0]

  @property
  def nu_dtype(self) -> jnp.dtype:
    return MOMENT_DTYPES[self.moments][1]

  @property
  def master_dtype(self) -> jnp.dtype:
    return MASTER_DTYPES[self.master]


# ------------------------------------------------------------------ schedule


def validate_schedule(cfg: OptimConfig, num_steps: int) -> int:
  """Checks that the schedule fits the run; returns the warmup step count.

  Warmup lasts round(warmup_frac * num_steps) steps (to nearest) and the
  cosine decay the rest, which must be at least one step.

  Raises:
    ValueError: num_steps < 1, or warmup as long as training.
  """
  if (not isinstance(num_steps, numbers.Integral)
      or isinstance(num_steps, bool) or num_steps < 1):
    raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
  warmup = round(cfg.warmup_frac * int(num_steps))
  if warmup >= num_steps:
    raise ValueError(
        f"optim.warmup_frac={cfg.warmup_frac} gives {warmup} warmup steps, "
        f"as long as or longer than training (num_steps={num_steps})")
  return warmup


def make_schedule(cfg: OptimConfig, num_steps: int) -> optax.Schedule:
  """Linear warmup 0 -> lr, then cosine to min_lr_frac * lr at num_steps.

  Returns:
    step (int32 []) -> learning rate (f32 []); constant after num_steps.
  """
  warmup = validate_schedule(cfg, num_steps)
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=cfg.lr, warmup_steps=warmup,
      decay_steps=int(num_steps), end_value=cfg.min_lr_frac * cfg.lr)


# ------------------------------------------------- scaled low-precision store
#
# Why a per-tensor scale: Adam's v holds ~g**2, and weight gradients of an
# LLM layer are often 1e-8..1e-4, so v is 1e-16..1e-8. FP16's smallest
# subnormal is 6e-8, so unscaled v flushes to zero; the next step then sees
# only (1 - b2) * g**2 in the denominator and the update grows several-fold
# (or becomes m / eps). FP8 E4M3 is worse (smallest subnormal 2**-9). We
# store x * s with s = 2**floor(log2(fmax / amax(x))): the largest element
# lands in [fmax / 2, fmax], so nothing overflows, and the elements share the
# format's full dynamic range (E4M3 ~2**17, FP16 ~2**40 with subnormals) below
# the tensor's own maximum instead of below 1. A power of two makes scaling
# and unscaling exact, so the only error is the cast's rounding (relative
# 2**-4 for E4M3, 2**-11 for FP16, for normal values).


def _encode(x32: jax.Array, dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
  """f32 x -> (stored, scale) with stored ~ x * scale in dtype; scale f32 []."""
  if dtype not in _SCALED_MAX:
    return x32.astype(dtype), jnp.ones([], _F32)
  fmax = _SCALED_MAX[dtype]
  amax = jnp.max(jnp.abs(x32))
  # All-zero or non-finite tensors keep scale 1, so NaN/Inf propagate. The
  # exponent is that of the exact ratio fmax / amax (frexp, no log2, which
  # rounds up one ulp below a power of two), the power exact (ldexp).
  scale = numerics.pow2_scale(fmax, amax, min_exp=-int(_MAX_SCALE_EXP),
                              max_exp=int(_MAX_SCALE_EXP))
  # |x| * scale <= fmax exactly; the clip is a guard for the cast.
  stored = jnp.clip(x32 * scale, -fmax, fmax).astype(dtype)
  return stored, scale


def _decode(stored: jax.Array, scale: jax.Array) -> jax.Array:
  if stored.dtype not in _SCALED_MAX:  # scale is 1: keep the graph plain
    return stored.astype(_F32)
  # An [L] scale (a layer-stacked leaf) divides its layer's slice.
  return stored.astype(_F32) / _lead(scale, stored.ndim)


def _lead(scale: jax.Array, ndim: int) -> jax.Array:
  """scale [L] (or []) broadcastable against an [L, ...] array of ndim."""
  return scale.reshape(scale.shape + (1,) * (ndim - scale.ndim))


def _per_layer(fn: Callable[..., Any], stacked: bool) -> Callable[..., Any]:
  """fn of one tensor, mapped over the leading layer axis if `stacked`."""
  return jax.vmap(fn) if stacked else fn


def _stacked(mask: Callable[[Any], Any] | None, tree: Any) -> Any:
  """`mask(tree)`, or all False without a mask."""
  return (jax.tree.map(lambda _: False, tree) if mask is None
          else mask(tree))


class AdamMPState(NamedTuple):
  """State of `scale_by_adam_mp`; mu/nu/scales mirror the params tree."""
  count: jax.Array          # int32 []: updates taken
  mu: optax.Updates         # first moment * mu_scale, in mu_dtype
  nu: optax.Updates         # second moment * nu_scale, in nu_dtype
  mu_scale: optax.Updates   # f32 [] per leaf ([L] if layer-stacked): power
                            # of two, 1 if unscaled
  nu_scale: optax.Updates   # f32 [] / [L] per leaf


def reencode_moments(state: AdamMPState, mu_dtype: Any, nu_dtype: Any
                     ) -> AdamMPState:
  """`state` with m and v stored in other dtypes (optim.moments changed).

  Each moment is decoded with its own stored scale and encoded again as
  `scale_by_adam_mp` stores it (a fresh per-tensor scale for FP8 / FP16),
  so the values change only by the new format's rounding; casting the
  stored values without their scales would flush most of an FP8 m to
  zero. `count` is kept.

  Args:
    state: an AdamMPState in any storage.
    mu_dtype, nu_dtype: the new storage dtypes (see `scale_by_adam_mp`).

  Returns:
    An AdamMPState of the same structure; mu/nu in the new dtypes, the
    scales f32 [].
  """
  mu_dtype = _check_storage("mu_dtype", mu_dtype)
  nu_dtype = _check_storage("nu_dtype", nu_dtype)

  def one(stored, scale, dtype):
    # An [L] scale: a layer-stacked leaf, re-encoded layer by layer.
    encode = _per_layer(lambda x: _encode(x, dtype), scale.ndim == 1)
    return encode(_decode(stored, scale))

  def convert(stored_tree, scale_tree, dtype):
    leaves, treedef = jax.tree.flatten(stored_tree)
    outs = [one(q, s, dtype) for q, s in
            zip(leaves, treedef.flatten_up_to(scale_tree))]
    return (jax.tree.unflatten(treedef, [o[0] for o in outs]),
            jax.tree.unflatten(treedef, [o[1] for o in outs]))

  mu, mu_scale = convert(state.mu, state.mu_scale, mu_dtype)
  nu, nu_scale = convert(state.nu, state.nu_scale, nu_dtype)
  return AdamMPState(state.count, mu, nu, mu_scale, nu_scale)


def _check_storage(name: str, dtype: Any) -> jnp.dtype:
  try:
    dt = jnp.dtype(dtype)
  except TypeError as e:
    raise ValueError(f"{name} must be a dtype, got {dtype!r}") from e
  if dt not in _MOMENT_STORAGE:
    raise ValueError(f"{name} must be one of float32, bfloat16, float16, "
                     f"float8_e4m3fn; got {dt}")
  return dt


def scale_by_adam_mp(b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                     *, mu_dtype: Any, nu_dtype: Any,
                     layer_mask: Callable[[Any], Any] | None = None
                     ) -> optax.GradientTransformation:
  """Adam scaling with moments stored in low precision, math in f32.

  Same update as `optax.scale_by_adam` (mu_hat / (sqrt(nu_hat) + eps)). Each
  step decodes the stored moments to f32, updates them and computes the
  update in f32 (the bias corrections too: in bf16, b**t rounds to 1 for
  small t and 1 - b**t to 0), then re-encodes them; FP8 and FP16 storage
  carry a per-tensor power-of-two scale (see the comment above `_encode`),
  BF16 and F32 do not need one (f32 exponent range). With both dtypes f32
  it equals optax.

  Args:
    b1: first-moment decay.
    b2: second-moment decay.
    eps: added to sqrt(nu_hat).
    mu_dtype: storage of m: float32, bfloat16, float16 or float8_e4m3fn.
    nu_dtype: storage of v: same choices.
    layer_mask: params-shaped tree -> bools: the layer-stacked leaves, whose
      scales are per layer ([L]); None = none.

  Returns:
    A GradientTransformation whose state is an `AdamMPState`; updates are
    f32 with the shapes of the gradients.

  Raises:
    ValueError: unsupported mu_dtype / nu_dtype.
  """
  mu_dtype = _check_storage("mu_dtype", mu_dtype)
  nu_dtype = _check_storage("nu_dtype", nu_dtype)

  def scale_ones(p, stacked):
    return jnp.ones(p.shape[:1] if stacked else [], _F32)

  def init_fn(params):
    # zeros_like keeps each leaf's sharding when called outside jit.
    return AdamMPState(
        count=jnp.zeros([], jnp.int32),
        mu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype), params),
        nu=jax.tree.map(lambda p: jnp.zeros_like(p, dtype=nu_dtype), params),
        mu_scale=jax.tree.map(scale_ones, params, _stacked(layer_mask,
                                                           params)),
        nu_scale=jax.tree.map(scale_ones, params, _stacked(layer_mask,
                                                           params)))

  def update_fn(updates, state, params=None):
    del params
    count = optax.safe_increment(state.count)
    # Bias corrections in f32, computed as optax does (float ** int count).
    c1 = (1 - b1 ** count).astype(_F32)
    c2 = (1 - b2 ** count).astype(_F32)
    g_leaves, treedef = jax.tree.flatten(updates)
    per_leaf = zip(g_leaves, *(treedef.flatten_up_to(x) for x in (
        state.mu, state.nu, state.mu_scale, state.nu_scale)))
    outs = []
    for g, m_q, v_q, m_s, v_s in per_leaf:
      # An [L] scale: a layer-stacked leaf, scaled layer by layer.
      stacked = m_s.ndim == 1

      def encode(x, dtype, stacked=stacked):
        return _per_layer(lambda y: _encode(y, dtype), stacked)(x)
      g = g.astype(_F32)
      # Same operation order as optax.scale_by_adam.
      m = (1 - b1) * g + b1 * _decode(m_q, m_s)
      v = (1 - b2) * g ** 2 + b2 * _decode(v_q, v_s)
      # The step uses the f32 moments; only what is stored is rounded.
      u = (m / c1) / (jnp.sqrt(v / c2) + eps)
      outs.append((u, *encode(m, mu_dtype), *encode(v, nu_dtype)))
    u, m_q, m_s, v_q, v_s = (
        jax.tree.unflatten(treedef, [o[i] for o in outs]) for i in range(5))
    return u, AdamMPState(count, m_q, v_q, m_s, v_s)

  return optax.GradientTransformation(init_fn, update_fn)


# ----------------------------------------------------------------- gradients


def _grads_to_f32() -> optax.GradientTransformation:
  """Upcasts gradients so clipping and Adam run in f32 (bf16/fp16 grads)."""
  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(lambda g: g.astype(_F32), updates), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


def round_grads_to_fp8(mask: Callable[[Any], Any] | None = None,
                       layer_mask: Callable[[Any], Any] | None = None
                       ) -> optax.GradientTransformation:
  """Rounds gradient tensors to FP8 E4M3 with a per-tensor scale.

  Simulates FP8-LM's FP8 weight gradients: g -> Q(g * s) / s with s a power
  of two putting amax(g) in [224, 448]. Non-finite entries pass through so
  divergence stays visible. Returns f32 updates (exactly FP8 values / s
  where rounded).

  Args:
    mask: updates -> same-structure tree of Python bools: which leaves are
      rounded (the paper: the quantized projections' kernels; norms, the
      embedding and the LM head stay high precision). None = every leaf.
    layer_mask: the same kind of tree: the layer-stacked leaves, scaled
      per layer. None = none.
  """
  def one(g):
    g = g.astype(_F32)
    _, s = _encode(g, _E4M3)
    # Rounded arithmetically, not by an f32 -> fp8 -> f32 convert pair,
    # which XLA:GPU may remove (see numerics.round_to_float).
    q = numerics.round_to_float(g * s, "e4m3")
    return jnp.where(jnp.isfinite(g), q / s, g)

  def update_fn(updates, state, params=None):
    del params
    chosen = (mask(updates) if mask is not None
              else jax.tree.map(lambda _: True, updates))
    return jax.tree.map(
        lambda g, m, st: _per_layer(one, st)(g) if m else g.astype(_F32),
        updates, chosen, _stacked(layer_mask, updates)), state
  return optax.GradientTransformation(lambda _: optax.EmptyState(), update_fn)


# ------------------------------------------------------------------ chain


def _is_matrix(p: Any, stacked: bool = False) -> bool:
  return len(p.shape) - int(stacked) >= 2


def decay_mask(params: optax.Params,
               layer_mask: Callable[[Any], Any] | None = None) -> Any:
  """True for leaves that get weight decay: >= 2-D (kernels, embeddings),
  per layer for the layer-stacked leaves of `layer_mask`.

  Norm scales and biases (1-D) are not decayed: pulling a norm gain toward 0
  rescales its layer instead of regularising it (LLaMA / GPT practice).
  """
  return jax.tree.map(_is_matrix, params, _stacked(layer_mask, params))


def make_optimizer(cfg: OptimConfig, num_steps: int,
                   fp8_grad_mask: Callable[[Any], Any] | None = None,
                   proj_mask: Callable[[Any], Any] | None = None,
                   schedule: optax.Schedule | None = None,
                   layer_mask: Callable[[Any], Any] | None = None
                   ) -> optax.GradientTransformation:
  """The AdamW of `cfg` as one optax.chain.

  Order: gradients to f32 (rounded to FP8 first if cfg.grad_fp8) ->
  clip_by_global_norm -> scale_by_adam_mp -> add_decayed_weights (matrices
  only, `decay_mask`) -> scale_by_learning_rate(schedule) -> the leaves of
  `proj_mask` scaled by cfg.proj_lr_scale (`_scale_by_learning_rate`,
  stateless). The state has the same structure for every cfg, so checkpoints
  restore across modes. `fp8_grad_mask` picks the leaves cfg.grad_fp8
  rounds (see `round_grads_to_fp8`; None = all).

  Args:
    cfg: the optimizer settings.
    num_steps: the schedule's length.
    fp8_grad_mask: params-shaped tree -> bools, or None.
    proj_mask: params-shaped tree -> bools: the block projections' kernels
      (cfg.proj_lr_scale); None = none.
    schedule: the learning-rate schedule when the caller built it already
      (`make_schedule(cfg, num_steps)`); None = build it here.
    layer_mask: params-shaped tree -> bools: the layer-stacked leaves (see
      the module docstring); None = none.

  Raises:
    ValueError: the schedule does not fit num_steps.
  """
  if schedule is None:
    schedule = make_schedule(cfg, num_steps)
  stages = [
      (round_grads_to_fp8(fp8_grad_mask, layer_mask) if cfg.grad_fp8
       else _grads_to_f32()),
      optax.clip_by_global_norm(cfg.clip_norm),
      scale_by_adam_mp(cfg.b1, cfg.b2, cfg.eps, mu_dtype=cfg.mu_dtype,
                       nu_dtype=cfg.nu_dtype, layer_mask=layer_mask),
      optax.add_decayed_weights(
          cfg.weight_decay,
          mask=lambda params: decay_mask(params, layer_mask)),
      _scale_by_learning_rate(schedule, proj_mask, cfg.proj_lr_scale),
  ]
  return optax.chain(*stages)


def _scale_by_learning_rate(schedule: optax.Schedule,
                            proj_mask: Callable[[Any], Any] | None,
                            proj_scale: float
                            ) -> optax.GradientTransformation:
  """optax.scale_by_learning_rate(schedule), then the `proj_mask` leaves
  times proj_scale (optax.masked over optax.scale, both stateless). The
  state is scale_by_learning_rate's own, so the chain's state structure
  does not depend on proj_scale."""
  inner = optax.scale_by_learning_rate(schedule)
  if proj_mask is None or proj_scale == 1.0:
    return inner
  extra = optax.masked(optax.scale(proj_scale), proj_mask)

  def update(updates, state, params=None):
    updates, state = inner.update(updates, state, params)
    updates, _ = extra.update(updates, extra.init(updates), params)
    return updates, state

  return optax.GradientTransformation(inner.init, update)


# ------------------------------------------------------------ master weights
#
# master="fp32" keeps every parameter in f32. The low-memory mode
# (master="bf16" | "fp16") stores the >= 2-D leaves (kernels, embeddings:
# all but ~0.02% of a LLaMA's parameters) in 2 bytes, and they are the
# weights the model reads: there is no second copy. 1-D leaves (norm gains,
# biases) stay f32, because an update of lr ~3e-4 is below half an ulp of
# 1.0 in bf16 (2**-8) and fp16 (2**-11 * 2 = 4.9e-4) and would round away.
#
# Unlike MS-AMP's FP16 ScalingTensor, the fp16 master carries no scale: the
# model would have to divide it out at every use site. A power-of-two scale
# moves fp16's range but not its 11-bit relative precision, and trained
# LLaMA weights (|w| ~1e-6..10) already lie inside that range (subnormal
# step 6e-8, max 65504); the tensors that do need a scale in FP16, the
# gradients and v, get one (`params_for_grad`, `scale_by_adam_mp`).
#
# Each update is computed in f32 and rounded once to the storage dtype:
# to nearest (= optax.apply_updates), or stochastically when a key is given,
# which keeps updates smaller than half an ulp in expectation.


def cast_master(params: optax.Params, cfg: OptimConfig,
                layer_mask: Callable[[Any], Any] | None = None
                ) -> optax.Params:
  """Casts params to their master storage (apply once, after init).

  >= 2-D float leaves (per layer for the layer-stacked leaves of
  `layer_mask`) -> cfg.master_dtype; other float leaves -> f32; non-float
  leaves unchanged.
  """
  def one(p, stacked):
    if not jnp.issubdtype(p.dtype, jnp.floating):
      return p
    return p.astype(cfg.master_dtype if _is_matrix(p, stacked) else _F32)
  return jax.tree.map(one, params, _stacked(layer_mask, params))


def params_for_grad(params: optax.Params, cfg: OptimConfig) -> optax.Params:
  """The params to differentiate the loss with respect to.

  Identity except for master="fp16": there fp16 leaves are upcast to f32 so
  their gradients keep f32 range; gradients taken w.r.t. fp16 leaves are
  fp16 and flush below 6e-8 (no loss scaling here). The upcast is
  transient (inside the jitted step) and exact.
  """
  if cfg.master != "fp16":
    return params
  return jax.tree.map(
      lambda p: p.astype(_F32) if p.dtype == _F16 else p, params)


def _round_stochastic(x32: jax.Array, dtype: jnp.dtype,
                      key: jax.Array) -> jax.Array:
  """f32 -> dtype, rounding to one of the two neighbours, unbiased."""
  name = {_F16: "float16", jnp.dtype(jnp.bfloat16): "bfloat16"}[
      jnp.dtype(dtype)]
  return numerics.stochastic_round_to_float(x32, name, key).astype(dtype)


def apply_updates(params: optax.Params, updates: optax.Updates,
                  cfg: OptimConfig, key: jax.Array | None = None
                  ) -> optax.Params:
  """params + updates in f32, rounded once to each leaf's storage dtype.

  Args:
    params: the master params (after `cast_master`).
    updates: from `tx.update`, f32.
    cfg: the optimizer config.
    key: optional PRNG key; in the low-memory mode, leaves stored in
      cfg.master_dtype are then rounded stochastically. Ignored for
      master="fp32".

  Returns:
    New params with the dtypes (and, under jit, shardings) of `params`.
    Without a key this is exactly optax.apply_updates.
  """
  if key is None or cfg.master == "fp32":
    return optax.apply_updates(params, updates)
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  out = []
  for p, u, k in zip(leaves, treedef.flatten_up_to(updates), keys):
    x32 = p.astype(_F32) + u.astype(_F32)
    if p.dtype == cfg.master_dtype:
      out.append(_round_stochastic(x32, p.dtype, k))
    else:
      out.append(x32.astype(p.dtype))
  return jax.tree.unflatten(treedef, out)


# ------------------------------------------------------------ memory account


def _nbytes(x: Any) -> int:
  shape = getattr(x, "shape", ())
  dtype = getattr(x, "dtype", None)
  if dtype is None:  # a Python scalar
    dtype = np.asarray(x).dtype
  return int(np.prod(shape, dtype=np.int64)) * jnp.dtype(dtype).itemsize


def state_bytes(params: optax.Params, opt_state: optax.OptState
                ) -> dict[str, float]:
  """Bytes of the persistent train state: params plus optimizer state.

  Leaves may be arrays or jax.ShapeDtypeStruct (e.g. from jax.eval_shape),
  so a large model can be measured without allocating it.

  Returns:
    dict(total_bytes=int, n_params=int (elements of params),
    bytes_per_param=float).

  Raises:
    ValueError: params has no elements.
  """
  p_leaves = jax.tree.leaves(params)
  n_params = sum(int(np.prod(p.shape, dtype=np.int64)) for p in p_leaves)
  if n_params == 0:
    raise ValueError("params has no elements")
  total = sum(_nbytes(x) for x in p_leaves + jax.tree.leaves(opt_state))
  return dict(total_bytes=total, n_params=n_params,
              bytes_per_param=total / n_params)
