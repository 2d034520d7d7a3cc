"""Per-layer quantization telemetry: how much each FP4 operand loses.

Owns: `operand_stats` (quantization error of one GEMM operand against its
unquantized value: SNR, cosine, relative MSE, fractions flushed / saturated /
clamped, scale range, mean DGE factor; paper Table 1), the `Probe` that the
model's quantization seam (`llama.qdense`) reports to while one is active,
and the gradient tap that reads each projection's upstream gradient g in
the backward pass.

Nothing here runs in the training step itself: `train_state` compiles a
separate telemetry step (one forward and backward with the probe active)
and the loop calls it every `telemetry_every` steps, so telemetry off costs
nothing and on costs one extra step per interval.

Must not import: flax, ml_collections, fp4jax modules right of `qdot`.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Any

import jax
import jax.numpy as jnp

from fp4jax import numerics, quant
from fp4jax.qconfig import Recipe, TensorQuant

STAT_KEYS = ("snr_db", "cosine", "rel_mse", "zero_frac", "sat_frac",
             "scale_min", "scale_max")
_TINY = 1e-30
_SAT_SLACK = 1.0 + 1e-6


def operand_stats(v: jax.Array, q: TensorQuant) -> dict[str, jax.Array]:
  """Quantization error of one 2-D operand v quantized per q, f32 scalars.

  Returns:
    {snr_db: 10 log10(|v|^2 / |v - deq|^2), cosine(v, deq), rel_mse:
     |v - deq|^2 / |v|^2, zero_frac: share of the non-zero elements
     flushed to 0, sat_frac: share whose scaled magnitude exceeds the
     format's max (clipped), scale_min / scale_max: range of the decode
     scales 1/sf}. Stochastic rounding draws from a fixed key.
  """
  v32 = v.astype(jnp.float32)
  qt = _quantize(v32, q)
  return _error_stats(v32, qt.dequantize(), v32, qt, q)


def _quantize(v32: jax.Array, q: TensorQuant) -> quant.QTensor:
  # Stochastic rounding draws from a fixed key: the stats of a step do not
  # depend on the step's own randomness.
  key = jax.random.key(0) if q.rounding == "stochastic" else None
  return quant.quantize(v32, q, key)


def _error_stats(ref32, approx, v32, qt, q) -> dict[str, jax.Array]:
  """Error of `approx` against `ref32`; v32 is what was quantized to qt."""
  err = jnp.sum(jnp.square(ref32 - approx))
  power = jnp.sum(jnp.square(ref32))
  dot = jnp.sum(ref32 * approx)
  norms = jnp.sqrt(power * jnp.sum(jnp.square(approx)))
  fmax = numerics.get_format(q.fmt).max
  nonzero = v32 != 0
  decode = 1.0 / jnp.broadcast_to(qt.scale, v32.shape)
  return {
      "snr_db": 10.0 * jnp.log10(jnp.maximum(power, _TINY)
                                 / jnp.maximum(err, _TINY)),
      "cosine": dot / jnp.maximum(norms, _TINY),
      "rel_mse": err / jnp.maximum(power, _TINY),
      "zero_frac": (jnp.sum(nonzero & (qt.values == 0))
                    / jnp.maximum(jnp.sum(nonzero), 1)).astype(jnp.float32),
      # Above max beyond f32 rounding of sf = max / amax (which puts the
      # absmax element itself an ulp over max).
      "sat_frac": jnp.mean((jnp.abs(v32 * qt.scale) > fmax * _SAT_SLACK
                            ).astype(jnp.float32)),
      "scale_min": jnp.min(decode), "scale_max": jnp.max(decode),
  }


def activation_stats(x: jax.Array, r: Recipe) -> dict[str, jax.Array]:
  """Stats of the forward activation operand, OCC and compensation included:
  the error is that of the whole x path (clamp + quantize + the residual,
  if the recipe compensates) against the unclamped x; plus clamp_frac."""
  x32 = x.astype(jnp.float32)
  if r.occ is not None:
    xc, resid = quant.occ_clamp(x32, r.occ.alpha, r.occ.axis)
  else:
    xc, resid = x32, jnp.zeros_like(x32)
  qt = _quantize(xc, r.x)
  approx = qt.dequantize()
  if r.effective_compensation != "none":
    approx = approx + resid
  out = _error_stats(x32, approx, xc, qt, r.x)
  out["clamp_frac"] = jnp.mean((resid != 0).astype(jnp.float32))
  return out


def weight_stats(w: jax.Array, r: Recipe) -> dict[str, jax.Array]:
  """Stats of the forward weight operand; dge_mean = mean f'(W sw) if the
  recipe uses DGE (its factor on the weight gradient)."""
  w32 = w.astype(jnp.float32)
  qt = _quantize(w32, r.w)
  out = _error_stats(w32, qt.dequantize(), w32, qt, r.w)
  if r.dge is not None:
    # (a Recipe holds DGE only on an FP4 weight)
    f = quant.dge_derivative(w32 * qt.scale, r.dge.k, r.dge.cap, r.w.fmt)
    out["dge_mean"] = jnp.mean(f)
    # Adam divides by sqrt(E[(g f')^2]): E[f'] / sqrt(E[f'^2]) is the shrink
    # of its step if f' and g were independent.
    out["dge_step_ratio"] = out["dge_mean"] / jnp.sqrt(jnp.mean(f * f))
  return out


# ----------------------------------------------------------------- probe
class Probe:
  """Collects per-projection stats while active (see `probing`).

  Attributes:
    taps: {path: f32 [len(STAT_KEYS)] zeros}: differentiating the loss
      with respect to taps[path] yields the stats of that projection's
      upstream gradient g (quantized per the recipe's g_dgrad).
    stats: {path: {"x": {...}, "w": {...}}}, filled during the forward.
    tapped: the paths whose tap carries g stats (recipes quantizing g).
  """

  def __init__(self, taps: dict[str, jax.Array]):
    self.taps = taps
    self.stats: dict[str, dict[str, Any]] = {}
    self.tapped: set[str] = set()

  def observe(self, path: str, x2d: jax.Array, w: jax.Array, y: jax.Array,
              r: Recipe | None) -> jax.Array:
    """Called by the seam for every projection: x2d [M, K], w [K, N], its
    output y [M, N] and recipe. Records the stats of the quantized ones;
    returns y, with a gradient tap where g is quantized."""
    if r is None or not r.quantizes:
      return y
    entry = {}
    if r.x is not None:
      entry["x"] = activation_stats(jax.lax.stop_gradient(x2d), r)
    if r.w is not None:
      entry["w"] = weight_stats(jax.lax.stop_gradient(w), r)
    self.stats[path] = entry
    if path in self.taps and r.g_dgrad is not None:
      y = _grad_tap(r.g_dgrad, y, self.taps[path])
      self.tapped.add(path)
    return y


_ACTIVE: list[Probe] = []


@contextlib.contextmanager
def probing(taps: dict[str, jax.Array] | None = None,
            probe: Probe | None = None):
  """Activates `probe` (default: a new Probe over `taps`) for the model
  calls traced or run inside the block; yields it. A subclass overriding
  `observe` can capture operands instead (e.g. activations for notebooks)."""
  p = probe if probe is not None else Probe(taps or {})
  _ACTIVE.append(p)
  try:
    yield p
  finally:
    _ACTIVE.pop()


def active() -> Probe | None:
  """The innermost active Probe, or None (the normal, untapped model)."""
  return _ACTIVE[-1] if _ACTIVE else None


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _grad_tap(q: TensorQuant, y: jax.Array, tap: jax.Array) -> jax.Array:
  del q, tap
  return y


def _grad_tap_fwd(q, y, tap):
  del q, tap
  return y, None


def _grad_tap_bwd(q, _, g):
  s = operand_stats(g, q)
  return g, jnp.stack([s[k] for k in STAT_KEYS])


_grad_tap.defvjp(_grad_tap_fwd, _grad_tap_bwd)


def unpack_tap(vec: jax.Array) -> dict[str, jax.Array]:
  """The gradient of a tap -> {stat name: scalar}."""
  return {k: vec[i] for i, k in enumerate(STAT_KEYS)}
