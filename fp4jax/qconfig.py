"""Quantization specs: what each GEMM of a quantized matmul does. No compute.

Owns: the frozen dataclasses `TensorQuant` (one operand) and `Recipe` (the
three GEMMs of a linear layer: forward, dgrad, wgrad, plus DGE and OCC), the
named recipes, and regex rules that pick a recipe per layer path.

Must not import: jax compute, flax, ml_collections, anything in fp4jax except
`numerics` (for the format table).
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Sequence

from fp4jax import numerics

SCALE_FMTS = ("f32", "e8m0", "e4m3")
SCALE_RULES = ("absmax", "quest")
COMPENSATIONS = ("none", "dense", "sparse")
SPARSE_IMPLS = ("auto", "gemm", "ell")
IMPLS = ("auto", "reference", "fast", "fp8", "xla", "pallas")
ACCUMULATIONS = ("fp32", "fast")


# Annotation word -> accepted Python types (bool is not a number here:
# a config typo like dge_k=True must not become k = 1).
_TYPE_WORDS = {"float": (float, int), "int": (int,), "str": (str,),
               "bool": (bool,), "None": (type(None),)}


def _check_field_types(obj: Any) -> None:
  """One-line ValueError naming a field whose value has the wrong type.

  Only fields annotated with plain scalars (float, int, str, bool, None
  unions) are checked; others (operand configs) are checked by their own
  class.
  """
  for f in dataclasses.fields(obj):
    words = [w.strip() for w in str(f.type).split("|")]
    if not all(w in _TYPE_WORDS for w in words):
      continue
    value = getattr(obj, f.name)
    allowed = tuple(t for w in words for t in _TYPE_WORDS[w])
    numeric = "bool" not in words and isinstance(value, bool)
    if numeric or not isinstance(value, allowed):
      raise ValueError(f"{type(obj).__name__}.{f.name} must be "
                       f"{' or '.join(words)}, got {value!r} "
                       f"({type(value).__name__})")


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorQuant:
  """How one 2-D GEMM operand is quantized.

  Attributes:
    fmt: element format, a key of `numerics.FORMATS`.
    axis: the operand axis reduced for absmax: 1 (= -1) on activations
      [M, K] gives one scale per token, 0 on weights [K, N] one scale per
      output channel; None = one scale for the whole tensor.
    block: if > 0, scaling groups are `block` consecutive elements along
      `axis` (MXFP4: 32, NVFP4: 16).
    scale_fmt: how decode scales are stored: "f32" (paper), "e8m0" (MX power
      of two) or "e4m3" (NVFP4).
    pow2: floor the scale to a power of two (the released code).
    rounding: "paper" | "rne" | "stochastic".
    tensor_scale: NVFP4's second level, one f32 scale per tensor so that the
      E4M3 block scales stay in range.
    block_2d: scaling groups are block x block tiles of the 2-D operand
      (NVIDIA's NVFP4 weights: W and W^T then quantize identically); `axis`
      is ignored.
    scale_rule: "absmax" (the group's amax maps to the format's max) or
      "quest" (QuEST / Quartet: 2.92247856 standard deviations of the group
      map to the max, the MSE-optimal clip for Gaussian data; values beyond
      saturate).
    e8m0_round_up: E8M0 scales rounded up to the next power of two so no
      element saturates (Mishra et al. 2506.08027), instead of OCP's floor.
    scale_mult: multiplies the quantization scale (Tseng et al.'s 3/4
      "dither" pre-scale before stochastic rounding keeps values inside
      the grid); dequantization divides it out again.
  """
  fmt: str = "e2m1"
  axis: int | None = -1
  block: int = 0
  scale_fmt: str = "f32"
  pow2: bool = False
  rounding: str = "paper"
  tensor_scale: bool = False
  block_2d: bool = False
  scale_rule: str = "absmax"
  e8m0_round_up: bool = False
  scale_mult: float = 1.0

  def __post_init__(self):
    _check_field_types(self)
    numerics.get_format(self.fmt)
    if self.rounding not in numerics.ROUNDING_MODES:
      raise ValueError(f"unknown rounding {self.rounding!r}; expected one of "
                       f"{numerics.ROUNDING_MODES}")
    if self.scale_fmt not in SCALE_FMTS:
      raise ValueError(f"unknown scale_fmt {self.scale_fmt!r}; expected one "
                       f"of {SCALE_FMTS}")
    if self.axis not in (None, -2, -1, 0, 1):
      raise ValueError(f"axis must be 0, 1 (or -2, -1) or None for a 2-D "
                       f"operand, got axis={self.axis!r}")
    if not isinstance(self.block, int) or self.block < 0:
      raise ValueError(f"block must be a non-negative int, got {self.block!r}")
    if self.block and self.axis is None:
      raise ValueError("block scaling needs an axis, got axis=None")
    if self.block_2d and not self.block:
      raise ValueError("block_2d=True needs a block size (block=16 for "
                       "16x16 tiles)")
    if self.scale_rule not in SCALE_RULES:
      raise ValueError(f"unknown scale_rule {self.scale_rule!r}; expected "
                       f"one of {SCALE_RULES}")
    if self.e8m0_round_up and self.scale_fmt != "e8m0":
      raise ValueError(f"e8m0_round_up=True needs scale_fmt='e8m0', got "
                       f"{self.scale_fmt!r}")
    if not self.scale_mult > 0:
      raise ValueError(f"scale_mult must be > 0, got {self.scale_mult!r}")
    if self.tensor_scale and self.scale_fmt != "e4m3":
      raise ValueError(f"tensor_scale=True is the NVFP4 second level and "
                       f"needs scale_fmt='e4m3', got {self.scale_fmt!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """The quantization of one linear layer y = x @ w, GEMM by GEMM.

  Operands are 2-D: x [M, K], w [K, N], upstream gradient g [M, N].
  `None` for an operand means it stays in high precision.

  Attributes:
    name: for logs.
    x: forward lhs (activations), e.g. FP4 per token.
    w: forward rhs (weights), e.g. FP4 per output channel.
    g_dgrad: g in dx = g @ w^T (axis refers to g's [M, N] layout).
    g_wgrad: g in dw = x^T @ g.
    dge_k: DGE sharpness k (> 1) for the weight gradient; None = STE.
    dge_cap: cap of the DGE derivative.
    occ_alpha: OCC quantile in (0.5, 1); None = no clamping.
    occ_axis: -1 = per token (row) order statistics, None = tensor-wise.
    compensation: what happens to the clamped-off residual R = X - Xc:
      "none" (released code: dropped), "dense" (research code: added back
      before the GEMM, Y = (Q(Xc) + R) Q(W)) or "sparse" (paper: a separate
      high-precision GEMM, Y = Q(Xc) Q(W) + R W). Required (no default)
      whenever occ_alpha is set; ignored without OCC.
    sparse_impl: how "sparse" compensation's three products (R W, R^T G
      and G W^T at R's nonzeros) run: "gemm" (dense GEMMs on the mostly
      zero residual) or "ell" (fp4jax.compensation: a fixed count of
      nonzeros per row, gathers instead of GEMMs; needs per-token OCC) or
      "auto" (gemm.resolve_sparse: "ell" on a CPU target with per-token
      OCC, where the gathers are the cheaper; "gemm" elsewhere, where the
      dense GEMMs run on tensor cores). The same numbers either way, up to
      f32 summation order.
    hw_faithful: re-quantize x and w along the backward GEMMs' own
      contraction axes (as hardware must) instead of reusing the forward's
      quantized operands (exact only in simulation).
    requant_quantized: with hw_faithful, what the backward re-quantizes:
      the forward's quantized (dequantized) X and W, True (Quartet's
      released code: its backward receives the forward quantizers'
      outputs), or the unquantized ones, False (Transformer Engine, Tseng
      et al.). In Quartet's rotated space either way.
    impl: GEMM implementation (fp4jax.gemm.IMPLS): "reference" (f32
      operands, the oracle), "fast" (bf16 operands), "fp8" (forward grid
      GEMM in FP8 E4M3, exact for FP4 and E4M3 grids), "xla" (every GEMM
      whose scales factor out in FP8 through XLA: the forward; with
      hw_faithful also dgrad and wgrad), "pallas" ("xla" plus the Pallas
      fused OCC + quantize row kernel), "auto" (reference on CPU, fast
      elsewhere).
    accumulation: FP8 GEMMs on GPU: "fp32" (exact simulation) or "fast"
      (run for speed: cuBLASLt fast accumulation, XLA's default for FP8,
      and the GEMMs whose product goes straight out write the 16-bit
      result directly, rounded before the scales are applied;
      gemm._scaled_fp8_out).
    w_dgrad: with hw_faithful, how W is re-quantized for the dgrad GEMM
      (contracting N); None = `w` with its axis moved to N.
    x_wgrad: with hw_faithful, how X is re-quantized for the wgrad GEMM
      (contracting M); None = `x` with its axis moved to M.
    rht_fwd: block size of a random Hadamard rotation of X and W along K
      before the forward's quantization (Quartet: 32); 0 = none.
    rht_dgrad: the same for the dgrad GEMM's G and W along N (hw_faithful).
    rht_wgrad: the same for the wgrad GEMM's X and G along M (NVIDIA: 16,
      hw_faithful).
    clip_mask: QuEST's trust mask: the gradient of an X or W entry the
      forward's quantization saturated is zero (straight-through elsewhere).
    bf16_tail: share of the decoder blocks, counted from the last, whose
      projections stay in BF16 (NVIDIA's NVFP4 recipe: ~16%); applied by the
      default layer rules (`default_rules`).
  """
  name: str = "custom"
  x: TensorQuant | None = None
  w: TensorQuant | None = None
  g_dgrad: TensorQuant | None = None
  g_wgrad: TensorQuant | None = None
  dge_k: float | None = None
  dge_cap: float = 3.0
  occ_alpha: float | None = None
  occ_axis: int | None = -1
  compensation: str | None = None
  sparse_impl: str = "auto"
  hw_faithful: bool = False
  requant_quantized: bool = False
  impl: str = "auto"
  accumulation: str = "fp32"
  w_dgrad: TensorQuant | None = None
  x_wgrad: TensorQuant | None = None
  rht_fwd: int = 0
  rht_dgrad: int = 0
  rht_wgrad: int = 0
  clip_mask: bool = False
  bf16_tail: float = 0.0

  def __post_init__(self):
    _check_field_types(self)
    if self.dge_k is not None and not self.dge_k > 1:
      raise ValueError(f"dge_k must be > 1 (or None for STE), got "
                       f"{self.dge_k!r}")
    if not self.dge_cap > 0:
      raise ValueError(f"dge_cap must be > 0, got {self.dge_cap!r}")
    if self.occ_alpha is not None and not 0.5 < self.occ_alpha < 1:
      raise ValueError(f"occ_alpha must be in (0.5, 1) (or None), got "
                       f"{self.occ_alpha!r}")
    if self.occ_axis not in (None, -1, 1):
      raise ValueError(f"occ_axis must be -1 (per token) or None, got "
                       f"{self.occ_axis!r}")
    if self.occ_alpha is not None and self.compensation is None:
      raise ValueError(f"recipe {self.name!r} sets occ_alpha="
                       f"{self.occ_alpha} but no compensation; name one of "
                       f"{COMPENSATIONS} (it changes the forward and both "
                       "gradients)")
    if (self.compensation is not None
        and self.compensation not in COMPENSATIONS):
      raise ValueError(f"unknown compensation {self.compensation!r}; "
                       f"expected one of {COMPENSATIONS}")
    if self.sparse_impl not in SPARSE_IMPLS:
      raise ValueError(f"unknown sparse_impl {self.sparse_impl!r}; expected "
                       f"one of {SPARSE_IMPLS}")
    if (self.sparse_impl == "ell" and self.occ_alpha is not None
        and self.occ_axis is None):
      raise ValueError(f"recipe {self.name!r}: sparse_impl='ell' needs "
                       "per-token OCC (occ_axis=-1): a tensor-wise quantile "
                       "bounds no row's count of outliers")
    if self.impl not in IMPLS:
      raise ValueError(f"unknown impl {self.impl!r}; expected one of {IMPLS}")
    if self.accumulation not in ACCUMULATIONS:
      raise ValueError(f"unknown accumulation {self.accumulation!r}; "
                       f"expected one of {ACCUMULATIONS}")
    for name in ("rht_fwd", "rht_dgrad", "rht_wgrad"):
      b = getattr(self, name)
      if b and (b < 2 or b & (b - 1)):
        raise ValueError(f"{name} must be 0 or a power of two >= 2, got {b}")
    needs_hw = [n for n in ("w_dgrad", "x_wgrad", "rht_dgrad", "rht_wgrad",
                            "requant_quantized") if getattr(self, n)]
    if needs_hw and not self.hw_faithful:
      raise ValueError(f"recipe {self.name!r} sets {needs_hw}, which shape "
                       "the backward's re-quantized operands: set "
                       "hw_faithful=True")
    rotated = [n for n in ("rht_fwd", "rht_dgrad", "rht_wgrad", "clip_mask")
               if getattr(self, n)]
    if rotated and self.occ_alpha is not None:
      raise ValueError(f"recipe {self.name!r}: {rotated} do not combine with "
                       "OCC (occ_alpha)")
    if self.rht_fwd and self.dge_k is not None:
      raise ValueError(f"recipe {self.name!r}: rht_fwd does not combine with "
                       "DGE (the factor lives on the unrotated weight grid)")
    if not 0 <= self.bf16_tail < 1:
      raise ValueError(f"bf16_tail must be in [0, 1), got {self.bf16_tail!r}")
    if self.occ_alpha is not None and self.x is None:
      raise ValueError("occ_alpha is set but activations are not quantized "
                       "(x=None)")

  @property
  def quantizes(self) -> bool:
    """True if any GEMM operand is quantized or the gradient is reshaped."""
    return any(o is not None for o in
               (self.x, self.w, self.g_dgrad, self.g_wgrad)) or (
                   self.dge_k is not None or self.occ_alpha is not None)

  @property
  def effective_compensation(self) -> str:
    """The compensation in force: "none" whenever OCC is off."""
    return "none" if self.occ_alpha is None else self.compensation

  @property
  def needs_key(self) -> bool:
    ops = (self.x, self.w, self.g_dgrad, self.g_wgrad, self.w_dgrad,
           self.x_wgrad)
    return any(o is not None and o.rounding == "stochastic" for o in ops)


# ----------------------------------------------------------------- recipes
_X4 = TensorQuant(fmt="e2m1", axis=-1)                 # per token
_W4 = TensorQuant(fmt="e2m1", axis=0)                  # per output channel
_G8 = TensorQuant(fmt="e5m2", axis=None, rounding="rne")  # per tensor
_MX = dict(fmt="e2m1", block=32, scale_fmt="e8m0", rounding="rne")
_NV = dict(fmt="e2m1", block=16, scale_fmt="e4m3", tensor_scale=True)
# Tseng et al.'s backward operands: stochastic rounding after a 3/4 scale.
_MX_SR = dict(_MX, rounding="stochastic", scale_mult=0.75)

RECIPES: dict[str, Recipe] = {
    "bf16": Recipe(name="bf16"),
    "fp8": Recipe(
        name="fp8", x=TensorQuant(fmt="e4m3", axis=None, rounding="rne"),
        w=TensorQuant(fmt="e4m3", axis=None, rounding="rne"),
        g_dgrad=_G8, g_wgrad=_G8),
    "w4a4_direct": Recipe(name="w4a4_direct", x=_X4, w=_W4, g_dgrad=_G8,
                          g_wgrad=_G8),
    "w4a8": Recipe(
        name="w4a8", x=TensorQuant(fmt="e4m3", axis=-1, rounding="rne"),
        w=_W4, g_dgrad=_G8, g_wgrad=_G8, dge_k=5.0),
    "w8a4": Recipe(
        name="w8a4", x=_X4, w=TensorQuant(fmt="e4m3", axis=0, rounding="rne"),
        g_dgrad=_G8, g_wgrad=_G8, occ_alpha=0.99, compensation="sparse"),
    "fp4_paper": Recipe(name="fp4_paper", x=_X4, w=_W4, g_dgrad=_G8,
                        g_wgrad=_G8, dge_k=5.0, occ_alpha=0.99,
                        compensation="sparse"),
    "fp4_code": Recipe(
        name="fp4_code", x=TensorQuant(fmt="e2m1", axis=-1, pow2=True),
        w=TensorQuant(fmt="e2m1", axis=1, pow2=True), g_dgrad=_G8,
        g_wgrad=_G8, dge_k=5.0, occ_alpha=0.99, compensation="none"),
    # A control, not a quantization recipe: exact GEMMs, but the weight
    # gradient carries DGE's factor f'(W sw) on the E2M1 grid W would have.
    "dge_only": Recipe(name="dge_only", dge_k=5.0),
    "mxfp4": Recipe(
        name="mxfp4", x=TensorQuant(axis=-1, **_MX),
        w=TensorQuant(axis=0, **_MX), g_dgrad=_G8, g_wgrad=_G8),
    "nvfp4": Recipe(
        name="nvfp4", x=TensorQuant(axis=-1, rounding="rne", **_NV),
        w=TensorQuant(axis=0, rounding="rne", **_NV),
        g_dgrad=TensorQuant(axis=-1, rounding="stochastic", **_NV),
        g_wgrad=TensorQuant(axis=0, rounding="stochastic", **_NV),
        hw_faithful=True),
    # NVIDIA, "Pretraining LLMs with NVFP4" (2509.25149), as Transformer
    # Engine's NVFP4BlockScaling runs it: NVFP4 (E2M1, 1x16 blocks, E4M3
    # block + f32 tensor scales) on all three GEMMs, each operand scaled
    # along its GEMM's contraction; weights in 16x16 tiles so W and W^T
    # quantize identically (the dgrad reuses the forward's values); a 16x16
    # random Hadamard transform on the wgrad operands along tokens; RNE on
    # X and W, stochastic rounding on gradients only; the last ~16% of the
    # blocks in BF16. Pieces: overrides rht_wgrad=0, weight_2d=False,
    # grad_sr=False, bf16_tail=0 (TE's disable flags).
    "nvfp4_nvidia": Recipe(
        name="nvfp4_nvidia",
        x=TensorQuant(axis=-1, rounding="rne", **_NV),
        w=TensorQuant(axis=0, rounding="rne", block_2d=True, **_NV),
        g_dgrad=TensorQuant(axis=1, rounding="stochastic", **_NV),
        g_wgrad=TensorQuant(axis=0, rounding="stochastic", **_NV),
        x_wgrad=TensorQuant(axis=0, rounding="rne", **_NV),
        rht_wgrad=16, hw_faithful=True, bf16_tail=0.16),
    # Tseng, Yu, Park, "Training LLMs with MXFP4" (2502.20586): MXFP4
    # (E2M1, 1x32 blocks, E8M0 scales) on all GEMMs; the backward GEMMs'
    # operands (G, W for dgrad along N; X, G for wgrad along M) get a
    # 32-block random Hadamard transform, the 3/4 pre-scale and stochastic
    # rounding. The paper keeps the forward in BF16/FP8 (override x=None,
    # w=None for that variant); e8m0_round_up=True is Mishra et al.'s
    # round-the-scale-up rule.
    "mxfp4_tseng": Recipe(
        name="mxfp4_tseng",
        x=TensorQuant(axis=-1, **_MX), w=TensorQuant(axis=0, **_MX),
        g_dgrad=TensorQuant(axis=1, **_MX_SR),
        g_wgrad=TensorQuant(axis=0, **_MX_SR),
        w_dgrad=TensorQuant(axis=1, **_MX_SR),
        x_wgrad=TensorQuant(axis=0, **_MX_SR),
        rht_dgrad=32, rht_wgrad=32, hw_faithful=True),
    # Quartet (Castro, Panferov et al., 2505.14669) as far as the paper and
    # its released quantizers specify it: forward X and W rotated by a
    # 32-block Hadamard along K, MXFP4 with QuEST's Gaussian-optimal scale
    # (2.92 standard deviations of the block -> 6, E8M0, RNE) and its trust
    # mask (no gradient through saturated entries); backward as mxfp4_tseng
    # (Hadamard-32, 3/4 pre-scale, stochastic rounding on both operands of
    # dgrad and wgrad), applied as in its released code to the forward's
    # quantized X and W (requant_quantized; False re-quantizes the
    # unquantized rotated X and W, as fp4jax did before). Left out: the
    # per-step re-randomised Hadamard signs of its backward (one fixed sign
    # vector here), its QuTLASS kernels, and Quartet II's MS-EDEN rounding.
    "quartet": Recipe(
        name="quartet",
        x=TensorQuant(axis=-1, scale_rule="quest", **_MX),
        w=TensorQuant(axis=0, scale_rule="quest", **_MX),
        g_dgrad=TensorQuant(axis=1, **_MX_SR),
        g_wgrad=TensorQuant(axis=0, **_MX_SR),
        w_dgrad=TensorQuant(axis=1, **_MX_SR),
        x_wgrad=TensorQuant(axis=0, **_MX_SR),
        rht_fwd=32, rht_dgrad=32, rht_wgrad=32, clip_mask=True,
        hw_faithful=True, requant_quantized=True),
}

# Overrides that apply to every quantized operand of the recipe (fwd x and w
# and the gradients) or to the forward operands only.
_ALL_OPERANDS = ("rounding",)
_FWD_OPERANDS = ("pow2", "fmt", "scale_fmt", "block")
_OPERANDS = ("x", "w", "g_dgrad", "g_wgrad", "w_dgrad", "x_wgrad")
# Switches for one piece of a recipe across the operands it touches:
# name -> (TensorQuant field, value from the switch, operands).
_GROUP_SHORTCUTS = {
    "grad_sr": ("rounding", lambda on: "stochastic" if on else "rne",
                ("g_dgrad", "g_wgrad")),
    "weight_2d": ("block_2d", bool, ("w",)),
    "e8m0_round_up": ("e8m0_round_up", bool, _OPERANDS),
}


def override_value(text: str) -> Any:
  """A recipe override typed on a command line ("k=v"): a Python literal
  (None, True, 3, 0.97, "e2m1") or else the bare word as a string (ell)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def get_recipe(name: str | Recipe, **overrides: Any) -> Recipe:
  """A named recipe with fields overridden.

  Args:
    name: a key of RECIPES, or a Recipe (returned with overrides applied).
    **overrides: Recipe fields (dge_k=3.0, occ_alpha=0.97,
      compensation="dense", hw_faithful=True, ...); operand fields as
      "<operand>__<field>" (x__fmt="e1m2", w__axis=1); shortcuts: pow2, fmt,
      scale_fmt, block (forward operands), rounding (all FP4 operands),
      weight_axis ("out" = paper, "in" = released code), grad_sr
      (stochastic vs RNE gradients), weight_2d (16x16 weight tiles),
      e8m0_round_up (every E8M0-scaled operand).

  Raises:
    ValueError: unknown recipe name or override key.
  """
  if isinstance(name, Recipe):
    r = name
  else:
    try:
      r = RECIPES[name]
    except (KeyError, TypeError):
      raise ValueError(f"unknown recipe {name!r}; expected one of "
                       f"{sorted(RECIPES)}") from None
  fields = {f.name for f in dataclasses.fields(Recipe)}
  top, ops = {}, {o: {} for o in _OPERANDS}
  for key, val in overrides.items():
    if key in fields:
      top[key] = val
    elif "__" in key and key.split("__", 1)[0] in _OPERANDS:
      op, field = key.split("__", 1)
      ops[op][field] = val
    elif key in _FWD_OPERANDS:
      ops["x"][key] = ops["w"][key] = val
    elif key in _ALL_OPERANDS:
      for op in _OPERANDS:
        q = getattr(r, op)
        if q is not None and numerics.get_format(q.fmt).is_fp4:
          ops[op][key] = val
    elif key in _GROUP_SHORTCUTS:
      field, value_of, targets = _GROUP_SHORTCUTS[key]
      for op in targets:
        q = getattr(r, op)
        if q is not None and (field != "e8m0_round_up"
                              or q.scale_fmt == "e8m0"):
          ops[op][field] = value_of(val)
    elif key == "weight_axis":
      if val not in ("out", "in"):
        raise ValueError(f"weight_axis must be 'out' or 'in', got {val!r}")
      ops["w"]["axis"] = 0 if val == "out" else 1
    else:
      raise ValueError(f"unknown recipe override {key!r}; expected a Recipe "
                       f"field {sorted(fields)}, <operand>__<field>, or one "
                       f"of {_FWD_OPERANDS + _ALL_OPERANDS + ('weight_axis',) + tuple(_GROUP_SHORTCUTS)}")
  for op, kw in ops.items():
    if not kw:
      continue
    base = top.get(op, getattr(r, op))
    if base is None:
      raise ValueError(f"override {sorted(kw)} for operand {op!r}, which "
                       f"recipe {r.name!r} does not quantize")
    top[op] = dataclasses.replace(base, **kw)
  return dataclasses.replace(r, **top) if top else r


# ------------------------------------------------------------------- rules
Rule = tuple[str, "Recipe | None"]

# RECIPE §5: the four block projections are quantized (QKV, attention out,
# MLP gate/up, MLP down); embeddings, attention scores and LM head are not.
PROJECTION_PATTERN = (r".*\.(q_proj|k_proj|v_proj|o_proj|"
                      r"gate_proj|up_proj|down_proj)")


def bf16_tail_blocks(n_layers: int, share: float) -> tuple[int, ...]:
  """The decoder blocks a `bf16_tail` share keeps in BF16: the last
  round(share * n_layers) (halves round up), as NVIDIA keeps mostly the
  final blocks in BF16."""
  b = int(share * n_layers + 0.5)
  return tuple(range(n_layers - min(b, n_layers), n_layers))


def default_rules(recipe: Recipe | str | None, n_layers: int | None = None
                  ) -> tuple[Rule, ...]:
  """RECIPE §5 default: `recipe` on the block projections, the rest plain;
  the recipe's `bf16_tail` blocks plain too (needs `n_layers`)."""
  if isinstance(recipe, str):
    recipe = get_recipe(recipe)
  if recipe is None or not recipe.quantizes:
    return ()
  rules: list[Rule] = []
  if recipe.bf16_tail:
    if n_layers is None:
      raise ValueError(f"recipe {recipe.name!r} keeps a bf16_tail of "
                       f"{recipe.bf16_tail}: default_rules needs n_layers")
    tail = bf16_tail_blocks(n_layers, recipe.bf16_tail)
    if tail:
      rules.append((rf"layers\.({'|'.join(map(str, tail))})\..*", None))
  return tuple(rules) + ((PROJECTION_PATTERN, recipe),)


def resolve_rules(paths: Sequence[str], rules: Sequence[Rule]
                  ) -> dict[str, Recipe | None]:
  """Maps each layer path to the recipe of the first rule that fullmatches.

  Args:
    paths: module paths such as "layers.0.attn.q_proj".
    rules: ordered (regex, Recipe | recipe name | None) pairs.

  Returns:
    path -> Recipe (None where no rule matched, or the rule says None).

  Raises:
    ValueError: a rule matches no path (a typo would otherwise silently
      leave layers unquantized), or a regex does not compile.
  """
  compiled = []
  for pattern, recipe in rules:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"quant rule {pattern!r} is not a valid regex: {e}"
                       ) from None
  recipes = [get_recipe(r) if isinstance(r, str) else r for _, r in rules]
  table, used = {}, [0] * len(rules)
  for p in paths:
    table[p] = None
    for i, rx in enumerate(compiled):
      if rx.fullmatch(p):
        table[p], used[i] = recipes[i], used[i] + 1
        break
  unused = [rules[i][0] for i, n in enumerate(used) if n == 0]
  if unused:
    raise ValueError(f"quant rules matched no layer: {unused}")
  return table
