"""The recipe spec: what each GEMM of a quantized matmul does. No compute.

Owns: the frozen dataclasses of a recipe, `TensorQuant` (one operand: its
element format, scale granularity, scale format and rounding), `Gemm` (one
GEMM's two operands and its rotation), `Occ` and `Dge` (the paper's two
groups) and `Recipe` (the three GEMMs of a linear layer: forward, dgrad,
wgrad), each refusing in one line what cannot mean anything; and
`Execution`, how the GEMMs run (a run-level choice, not part of a recipe).
The named recipes and the rules that choose them are `qconfig`'s.

Must not import: jax compute, flax, ml_collections, anything in fp4jax except
`numerics` (for the format tables).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from fp4jax import numerics

SCALE_RULES = ("absmax", "quest")
COMPENSATIONS = ("none", "dense", "sparse")
SPARSE_IMPLS = ("auto", "gemm", "ell")
IMPLS = ("auto", "reference", "fast", "fp8", "xla", "pallas")
ACCUMULATIONS = ("fp32", "fast")
REQUANT_FROM = ("clamped", "quantized")

# A backward GEMM operand that is the forward's quantized operand, reused
# as it is (the paper's simulation: exact only there, since its scales lie
# along the backward GEMM's contraction). Its opposite is a TensorQuant:
# the operand re-quantized along that GEMM's own axes, as hardware must.
FORWARD = "forward"


# Annotation word -> accepted Python types (bool is not a number here:
# a config typo like dge k=True must not become k = 1).
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
    scale: how scales are made and stored, a key of
      `numerics.SCALE_FORMATS`: "f32" (paper), "pow2" (released code),
      "e8m0" / "e8m0_up" (MX, exponent rounded down / up), "e4m3" or
      "e4m3_tensor" (NVFP4: E4M3 block scales under an f32 tensor scale).
    rounding: "paper" | "rne" | "stochastic".
    block_2d: scaling groups are block x block tiles of the 2-D operand
      (NVIDIA's NVFP4 weights: W and W^T then quantize identically); needs
      a block, and `axis` is then unused.
    scale_rule: "absmax" (the group's amax maps to the format's max) or
      "quest" (QuEST / Quartet: 2.92247856 standard deviations of the group
      map to the max, the MSE-optimal clip for Gaussian data; values beyond
      saturate).
    scale_mult: multiplies the quantization scale (Tseng et al.'s 3/4
      "dither" pre-scale before stochastic rounding keeps values inside
      the grid); dequantization divides it out again.
  """
  fmt: str = "e2m1"
  axis: int | None = -1
  block: int = 0
  scale: str = "f32"
  rounding: str = "paper"
  block_2d: bool = False
  scale_rule: str = "absmax"
  scale_mult: float = 1.0

  def __post_init__(self):
    _check_field_types(self)
    numerics.get_format(self.fmt)
    numerics.scale_format(self.scale)
    if self.rounding not in numerics.ROUNDING_MODES:
      raise ValueError(f"unknown rounding {self.rounding!r}; expected one of "
                       f"{numerics.ROUNDING_MODES}")
    if self.axis not in (None, -2, -1, 0, 1):
      raise ValueError(f"axis must be 0, 1 (or -2, -1) or None for a 2-D "
                       f"operand, got axis={self.axis!r}")
    if self.block < 0:
      raise ValueError(f"block must be a non-negative int, got {self.block!r}")
    if self.block and self.axis is None and not self.block_2d:
      raise ValueError("block scaling needs an axis, got axis=None")
    if self.block_2d and not self.block:
      raise ValueError("block_2d=True needs a block size (block=16 for "
                       "16x16 tiles)")
    if self.scale_rule not in SCALE_RULES:
      raise ValueError(f"unknown scale_rule {self.scale_rule!r}; expected "
                       f"one of {SCALE_RULES}")
    if not self.scale_mult > 0:
      raise ValueError(f"scale_mult must be > 0, got {self.scale_mult!r}")

  def short(self) -> str:
    """The fields that differ from the defaults, for derived names."""
    rest = [f"{f.name}={getattr(self, f.name)}"
            for f in dataclasses.fields(self) if f.name != "fmt"
            and getattr(self, f.name) != f.default]
    return f"{self.fmt}({','.join(rest)})"


@dataclasses.dataclass(frozen=True, kw_only=True)
class Gemm:
  """One GEMM of a linear layer: its two operands and its rotation.

  Attributes:
    lhs, rhs: each a TensorQuant (quantized along this GEMM's operand
      layout: see `Recipe`), None (high precision), or FORWARD (the
      backward GEMMs' reuse of a forward operand: dgrad.rhs = the
      forward's quantized W, wgrad.lhs = its quantized X).
    rht: block size of a random Hadamard rotation of both operands along
      this GEMM's contraction before they are quantized (Quartet: 32 on
      the forward; NVIDIA: 16 on the wgrad); 0 = none. It cancels in the
      product.
  """
  lhs: TensorQuant | str | None = None
  rhs: TensorQuant | str | None = None
  rht: int = 0

  def __post_init__(self):
    for side in ("lhs", "rhs"):
      v = getattr(self, side)
      if not (v is None or v == FORWARD or isinstance(v, TensorQuant)):
        raise ValueError(f"Gemm.{side} must be a TensorQuant, None or "
                         f"{FORWARD!r}, got {v!r}")
    if (not isinstance(self.rht, int) or isinstance(self.rht, bool)
        or self.rht < 0 or (self.rht and (self.rht < 2
                                          or self.rht & (self.rht - 1)))):
      raise ValueError(f"Gemm.rht must be 0 or a power of two >= 2, got "
                       f"{self.rht!r}")

  def operands(self) -> tuple[TensorQuant, ...]:
    """The operands this GEMM quantizes itself."""
    return tuple(q for q in (self.lhs, self.rhs)
                 if isinstance(q, TensorQuant))


@dataclasses.dataclass(frozen=True, kw_only=True)
class Occ:
  """Outlier Clamping and Compensation of the activations (RECIPE §4).

  Attributes:
    alpha: the quantile in (0.5, 1): values beyond the alpha / 1 - alpha
      quantiles are clamped to them before X is quantized.
    compensation: what happens to the clamped-off residual R = X - Xc:
      "none" (released code: dropped), "dense" (research code: added back
      before the GEMM, Y = (Q(Xc) + R) Q(W)) or "sparse" (paper: a separate
      high-precision GEMM, Y = Q(Xc) Q(W) + R W). No default: it changes
      the forward and both gradients.
    axis: -1 = per token (row) order statistics, None = tensor-wise.
  """
  alpha: float
  compensation: str
  axis: int | None = -1

  def __post_init__(self):
    _check_field_types(self)
    if not 0.5 < self.alpha < 1:
      raise ValueError(f"occ alpha must be in (0.5, 1), got {self.alpha!r}")
    if self.compensation not in COMPENSATIONS:
      raise ValueError(f"unknown compensation {self.compensation!r}; "
                       f"expected one of {COMPENSATIONS}")
    if self.axis not in (None, -1, 1):
      raise ValueError(f"occ axis must be -1 (per token) or None, got "
                       f"{self.axis!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Dge:
  """The Differentiable Gradient Estimator on the weight gradient (§3).

  Attributes:
    k: sharpness (> 1) of the smooth stand-in for the weight's rounding.
    cap: the cap of its derivative.
  """
  k: float = 5.0
  cap: float = 3.0

  def __post_init__(self):
    _check_field_types(self)
    if not self.k > 1:
      raise ValueError(f"dge k must be > 1, got {self.k!r}")
    if not self.cap > 0:
      raise ValueError(f"dge cap must be > 0, got {self.cap!r}")


@dataclasses.dataclass(frozen=True, kw_only=True)
class Recipe:
  """The quantization of one linear layer y = x @ w, GEMM by GEMM.

  Operands are 2-D: x [M, K], w [K, N], upstream gradient g [M, N]. An
  operand spec's `axis` refers to that operand's own layout in its GEMM.

  Attributes:
    name: for logs, metrics and records; `get_recipe` derives it for an
      overridden recipe (`fp4_paper+dge_k=None`).
    fwd: y = x @ w: lhs = x (e.g. FP4 per token), rhs = w (FP4 per output
      channel).
    dgrad: dx = g @ w^T: lhs = g, rhs = w (FORWARD, or re-quantized along
      N: a TensorQuant with axis 1).
    wgrad: dw = x^T @ g: lhs = x (FORWARD, or re-quantized along M: axis
      0), rhs = g.
      The backward reuses both forward operands or re-quantizes both.
    occ: OCC on x, or None.
    dge: DGE on the weight gradient, or None (straight-through).
    clip_mask: QuEST's trust mask: the gradient of an X or W entry the
      forward's quantization saturated is zero (straight-through elsewhere).
    requant_from: what a re-quantizing backward quantizes: the clamped X
      and the unrotated-back W ("clamped": Transformer Engine, Tseng et
      al.) or the forward's quantized X and W ("quantized": Quartet's
      released code, whose backward receives the forward quantizers'
      outputs). In a rotated forward's space either way.
  """
  name: str = "custom"
  fwd: Gemm = Gemm()
  dgrad: Gemm = Gemm(rhs=FORWARD)
  wgrad: Gemm = Gemm(lhs=FORWARD)
  occ: Occ | None = None
  dge: Dge | None = None
  clip_mask: bool = False
  requant_from: str = "clamped"

  def __post_init__(self):
    _check_field_types(self)
    for gname in ("fwd", "dgrad", "wgrad"):
      if not isinstance(getattr(self, gname), Gemm):
        raise ValueError(f"Recipe.{gname} must be a Gemm, got "
                         f"{getattr(self, gname)!r}")
    if self.occ is not None and not isinstance(self.occ, Occ):
      raise ValueError(f"Recipe.occ must be an Occ or None, got {self.occ!r}")
    if self.dge is not None and not isinstance(self.dge, Dge):
      raise ValueError(f"Recipe.dge must be a Dge or None, got {self.dge!r}")
    for where, v in (("fwd.lhs", self.fwd.lhs), ("fwd.rhs", self.fwd.rhs),
                     ("dgrad.lhs", self.dgrad.lhs),
                     ("wgrad.rhs", self.wgrad.rhs)):
      if v == FORWARD:
        raise ValueError(f"recipe {self.name!r}: {where} cannot be "
                         f"{FORWARD!r} (only dgrad.rhs = W and wgrad.lhs = X "
                         "come from the forward)")
    reuse = (self.dgrad.rhs == FORWARD, self.wgrad.lhs == FORWARD)
    if reuse[0] != reuse[1]:
      raise ValueError(f"recipe {self.name!r}: dgrad.rhs and wgrad.lhs must "
                       f"both be {FORWARD!r} (the forward's quantized W and X) "
                       "or both re-quantized")
    if self.requant_from not in REQUANT_FROM:
      raise ValueError(f"unknown requant_from {self.requant_from!r}; expected "
                       f"one of {REQUANT_FROM}")
    if not self.requantizes:
      shaped = [n for n, on in (("dgrad.rht", self.dgrad.rht),
                                ("wgrad.rht", self.wgrad.rht),
                                ("requant_from='quantized'",
                                 self.requant_from == "quantized")) if on]
      if shaped:
        raise ValueError(f"recipe {self.name!r} sets {shaped}, which shape "
                         "re-quantized backward operands, but dgrad.rhs and "
                         f"wgrad.lhs are {FORWARD!r}")
    if self.occ is not None:
      if self.fwd.lhs is None:
        raise ValueError(f"recipe {self.name!r}: occ is set but activations "
                         "are not quantized (fwd.lhs=None)")
      rotated = [n for n, on in (("fwd.rht", self.fwd.rht),
                                 ("dgrad.rht", self.dgrad.rht),
                                 ("wgrad.rht", self.wgrad.rht),
                                 ("clip_mask", self.clip_mask)) if on]
      if rotated:
        raise ValueError(f"recipe {self.name!r}: {rotated} do not combine "
                         "with occ")
    if self.dge is not None:
      if self.fwd.rht:
        raise ValueError(f"recipe {self.name!r}: fwd.rht does not combine "
                         "with dge (the factor lives on the unrotated weight "
                         "grid)")
      w = self.fwd.rhs
      if w is not None and not numerics.get_format(w.fmt).is_fp4:
        raise ValueError(f"recipe {self.name!r}: dge differentiates an FP4 "
                         f"weight grid, but fwd.rhs is {w.fmt} (set dge=None, "
                         "or an FP4 weight)")
    if self.clip_mask and self.fwd.lhs is None and self.fwd.rhs is None:
      raise ValueError(f"recipe {self.name!r}: clip_mask needs a quantized "
                       "forward operand (fwd.lhs or fwd.rhs)")

  # Shorthands for the operands by their role in y = x @ w.
  @property
  def x(self) -> TensorQuant | None:
    return self.fwd.lhs

  @property
  def w(self) -> TensorQuant | None:
    return self.fwd.rhs

  @property
  def g_dgrad(self) -> TensorQuant | None:
    return self.dgrad.lhs

  @property
  def g_wgrad(self) -> TensorQuant | None:
    return self.wgrad.rhs

  @property
  def requantizes(self) -> bool:
    """True if the backward re-quantizes X and W along its own axes."""
    return self.dgrad.rhs != FORWARD

  @property
  def quantizes(self) -> bool:
    """True if any GEMM operand is quantized or the gradient is reshaped."""
    return bool(self.fwd.operands() or self.dgrad.operands()
                or self.wgrad.operands() or self.dge or self.occ)

  @property
  def effective_compensation(self) -> str:
    """The compensation in force: "none" without OCC."""
    return "none" if self.occ is None else self.occ.compensation

  @property
  def needs_key(self) -> bool:
    return any(q.rounding == "stochastic" for g in (self.fwd, self.dgrad,
                                                     self.wgrad)
               for q in g.operands())


@dataclasses.dataclass(frozen=True, kw_only=True)
class Execution:
  """How a run's quantized GEMMs execute: the same numbers (up to f32
  summation order, or as `accumulation` says), other programs. Not part of
  a recipe: one per run (config section `gemm`).

  Attributes:
    impl: GEMM implementation (fp4jax.gemm.IMPLS): "reference" (f32
      operands, the oracle), "fast" (bf16 operands), "fp8" (forward grid
      GEMM in FP8 E4M3, exact for FP4 and E4M3 grids), "xla" (every GEMM
      whose scales factor out in FP8 through XLA), "pallas" ("xla" plus the
      Pallas fused OCC + quantize row kernel), "auto" (reference on CPU,
      fast elsewhere).
    accumulation: FP8 GEMMs on GPU: "fp32" (exact simulation) or "fast"
      (cuBLASLt fast accumulation, and the GEMMs whose product goes
      straight out write the 16-bit result directly, rounded before the
      scales are applied; gemm._scaled_fp8_out).
    sparse_impl: how "sparse" compensation's three products (R W, R^T G and
      G W^T at R's nonzeros) run: "gemm" (dense GEMMs on the mostly zero
      residual), "ell" (fp4jax.compensation: a fixed count of nonzeros per
      row, gathers; needs per-token OCC) or "auto" (gemm.resolve_sparse:
      "ell" on a CPU target with per-token OCC, "gemm" elsewhere).
  """
  impl: str = "auto"
  accumulation: str = "fp32"
  sparse_impl: str = "auto"

  def __post_init__(self):
    _check_field_types(self)
    for name, allowed in (("impl", IMPLS), ("accumulation", ACCUMULATIONS),
                          ("sparse_impl", SPARSE_IMPLS)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"unknown {name} {getattr(self, name)!r}; expected "
                         f"one of {allowed}")

  def check(self, recipe: Recipe | None) -> None:
    """ValueError where this execution cannot run `recipe` as specified."""
    if (recipe is not None and self.sparse_impl == "ell"
        and recipe.occ is not None and recipe.occ.axis is None):
      raise ValueError(f"recipe {recipe.name!r}: sparse_impl='ell' needs "
                       "per-token OCC (occ axis -1): a tensor-wise quantile "
                       "bounds no row's count of outliers")
