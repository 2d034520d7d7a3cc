"""Recipes: the named ones, overrides, and the rules that pick one per layer.

Owns: `RECIPES` (the paper's recipe and its variants, and the other
papers': NVFP4, MXFP4, Quartet) written as specs (`fp4jax.qspec`, whose
classes this module re-exports), `get_recipe` (a named recipe with
overrides: `fp4jax.recipe_keys`), `bf16_forward` (quant.switch_back), and
regex rules over layer paths with the BF16 tail a named recipe comes with
(`BF16_TAILS`, `tail_rules`, `default_rules`, `resolve_rules`).

Must not import: jax compute, flax, ml_collections, anything in fp4jax except
`numerics`, `qspec` and `recipe_keys`.
"""

from __future__ import annotations

import ast
import dataclasses
import re
from typing import Any, Sequence

from fp4jax import recipe_keys
from fp4jax.qspec import (ACCUMULATIONS, COMPENSATIONS, FORWARD, IMPLS,
                          REQUANT_FROM, SCALE_RULES, SPARSE_IMPLS, Dge,
                          Execution, Gemm, Occ, Recipe, TensorQuant)
from fp4jax.recipe_keys import (FLAT_KEYS, LAYER_KEYS, RUN_KEYS,
                                derived_name, split_overrides)

__all__ = ["ACCUMULATIONS", "COMPENSATIONS", "FORWARD", "IMPLS",
           "REQUANT_FROM", "SCALE_RULES", "SPARSE_IMPLS", "Dge", "Execution",
           "Gemm", "Occ", "Recipe", "TensorQuant", "FLAT_KEYS", "LAYER_KEYS",
           "RUN_KEYS", "derived_name", "split_overrides", "RECIPES",
           "BF16_TAILS", "bf16_forward", "check_share", "override_value",
           "typed_overrides", "get_recipe",
           "PROJECTION_PATTERN", "bf16_tail_blocks", "default_bf16_tail",
           "tail_rules", "default_rules", "resolve_rules", "Rule"]


# ----------------------------------------------------------------- recipes
_X4 = TensorQuant(fmt="e2m1", axis=-1)                 # per token
_W4 = TensorQuant(fmt="e2m1", axis=0)                  # per output channel
_G8 = TensorQuant(fmt="e5m2", axis=None, rounding="rne")  # per tensor
_E4 = TensorQuant(fmt="e4m3", axis=None, rounding="rne")  # per tensor
_MX = dict(fmt="e2m1", block=32, scale="e8m0", rounding="rne")
_NV = dict(fmt="e2m1", block=16, scale="e4m3_tensor")
# Tseng et al.'s backward operands: stochastic rounding after a 3/4 scale.
_MX_SR = dict(_MX, rounding="stochastic", scale_mult=0.75)


def _simulated(name: str, x=None, w=None, g=_G8, **groups) -> Recipe:
  """The paper's shape: forward x, w; both backward GEMMs reuse them (the
  simulation) and quantize g the same way."""
  return Recipe(name=name, fwd=Gemm(lhs=x, rhs=w),
                dgrad=Gemm(lhs=g, rhs=FORWARD), wgrad=Gemm(lhs=FORWARD, rhs=g),
                **groups)


_PAPER_OCC = Occ(alpha=0.99, compensation="sparse")

RECIPES: dict[str, Recipe] = {
    "bf16": Recipe(name="bf16"),
    "fp8": _simulated("fp8", x=_E4, w=_E4),
    "w4a4_direct": _simulated("w4a4_direct", x=_X4, w=_W4),
    "w4a8": _simulated(
        "w4a8", x=TensorQuant(fmt="e4m3", axis=-1, rounding="rne"), w=_W4,
        dge=Dge()),
    "w8a4": _simulated(
        "w8a4", x=_X4, w=TensorQuant(fmt="e4m3", axis=0, rounding="rne"),
        occ=_PAPER_OCC),
    "fp4_paper": _simulated("fp4_paper", x=_X4, w=_W4, dge=Dge(),
                            occ=_PAPER_OCC),
    "fp4_code": _simulated(
        "fp4_code", x=TensorQuant(fmt="e2m1", axis=-1, scale="pow2"),
        w=TensorQuant(fmt="e2m1", axis=1, scale="pow2"), dge=Dge(),
        occ=Occ(alpha=0.99, compensation="none")),
    # A control, not a quantization recipe: exact GEMMs, but the weight
    # gradient carries DGE's factor f'(W sw) on the E2M1 grid W would have.
    "dge_only": _simulated("dge_only", g=None, dge=Dge()),
    "mxfp4": _simulated("mxfp4", x=TensorQuant(axis=-1, **_MX),
                        w=TensorQuant(axis=0, **_MX)),
    # NVFP4 on all three GEMMs, each operand scaled along its GEMM's
    # contraction, stochastic rounding on the gradients.
    "nvfp4": Recipe(
        name="nvfp4",
        fwd=Gemm(lhs=TensorQuant(axis=-1, rounding="rne", **_NV),
                 rhs=TensorQuant(axis=0, rounding="rne", **_NV)),
        dgrad=Gemm(lhs=TensorQuant(axis=-1, rounding="stochastic", **_NV),
                   rhs=TensorQuant(axis=1, rounding="rne", **_NV)),
        wgrad=Gemm(lhs=TensorQuant(axis=0, rounding="rne", **_NV),
                   rhs=TensorQuant(axis=0, rounding="stochastic", **_NV))),
    # NVIDIA, "Pretraining LLMs with NVFP4" (2509.25149), as Transformer
    # Engine's NVFP4BlockScaling runs it: NVFP4 (E2M1, 1x16 blocks, E4M3
    # block + f32 tensor scales) on all three GEMMs, each operand scaled
    # along its GEMM's contraction; weights in 16x16 tiles so W and W^T
    # quantize identically (the dgrad's W has the forward's values); a
    # 16x16 random Hadamard transform on the wgrad operands along tokens;
    # RNE on X and W, stochastic rounding on gradients only; the last ~16%
    # of the blocks in BF16 (its layer rules: BF16_TAILS). Pieces:
    # overrides rht_wgrad=0, weight_2d=False, grad_sr=False, bf16_tail=0
    # (TE's disable flags).
    "nvfp4_nvidia": Recipe(
        name="nvfp4_nvidia",
        fwd=Gemm(lhs=TensorQuant(axis=-1, rounding="rne", **_NV),
                 rhs=TensorQuant(axis=0, rounding="rne", block_2d=True,
                                 **_NV)),
        dgrad=Gemm(lhs=TensorQuant(axis=1, rounding="stochastic", **_NV),
                   rhs=TensorQuant(axis=1, rounding="rne", block_2d=True,
                                   **_NV)),
        wgrad=Gemm(lhs=TensorQuant(axis=0, rounding="rne", **_NV),
                   rhs=TensorQuant(axis=0, rounding="stochastic", **_NV),
                   rht=16)),
    # Tseng, Yu, Park, "Training LLMs with MXFP4" (2502.20586): MXFP4
    # (E2M1, 1x32 blocks, E8M0 scales) on all GEMMs; the backward GEMMs'
    # operands (G, W for dgrad along N; X, G for wgrad along M) get a
    # 32-block random Hadamard transform, the 3/4 pre-scale and stochastic
    # rounding. The paper keeps the forward in BF16/FP8 (override x=None,
    # w=None for that variant); e8m0_round_up=True is Mishra et al.'s
    # round-the-scale-up rule.
    "mxfp4_tseng": Recipe(
        name="mxfp4_tseng",
        fwd=Gemm(lhs=TensorQuant(axis=-1, **_MX),
                 rhs=TensorQuant(axis=0, **_MX)),
        dgrad=Gemm(lhs=TensorQuant(axis=1, **_MX_SR),
                   rhs=TensorQuant(axis=1, **_MX_SR), rht=32),
        wgrad=Gemm(lhs=TensorQuant(axis=0, **_MX_SR),
                   rhs=TensorQuant(axis=0, **_MX_SR), rht=32)),
    # Quartet (Castro, Panferov et al., 2505.14669) as far as the paper and
    # its released quantizers specify it: forward X and W rotated by a
    # 32-block Hadamard along K, MXFP4 with QuEST's Gaussian-optimal scale
    # (2.92 standard deviations of the block -> 6, E8M0, RNE) and its trust
    # mask (no gradient through saturated entries); backward as mxfp4_tseng
    # (Hadamard-32, 3/4 pre-scale, stochastic rounding on both operands of
    # dgrad and wgrad), applied as in its released code to the forward's
    # quantized X and W (requant_from="quantized"; "clamped" re-quantizes
    # the unquantized rotated X and W). Left out: the per-step re-randomised
    # Hadamard signs of its backward (one fixed sign vector here), its
    # QuTLASS kernels, and Quartet II's MS-EDEN rounding.
    "quartet": Recipe(
        name="quartet",
        fwd=Gemm(lhs=TensorQuant(axis=-1, scale_rule="quest", **_MX),
                 rhs=TensorQuant(axis=0, scale_rule="quest", **_MX), rht=32),
        dgrad=Gemm(lhs=TensorQuant(axis=1, **_MX_SR),
                   rhs=TensorQuant(axis=1, **_MX_SR), rht=32),
        wgrad=Gemm(lhs=TensorQuant(axis=0, **_MX_SR),
                   rhs=TensorQuant(axis=0, **_MX_SR), rht=32),
        clip_mask=True, requant_from="quantized"),
}

# The layer rules a named recipe comes with: the share of the decoder
# blocks, counted from the last, whose projections stay in BF16 (NVIDIA's
# NVFP4 recipe: ~16%). Applied by `tail_rules` to default and explicit
# rules alike; config `quant.bf16_tail` (or the old override key) sets it.
BF16_TAILS: dict[str, float] = {"nvfp4_nvidia": 0.16}


def bf16_forward(r: Recipe) -> Recipe:
  """`r` with its forward GEMMs in BF16 (quant.switch_back): X and W
  unquantized in every GEMM, so no OCC, DGE, forward rotation or trust mask
  either; the gradients keep their quantization (and their rotations)."""
  requant = r.requantizes
  return dataclasses.replace(
      r, name=f"{r.name}+bf16_forward", fwd=Gemm(),
      dgrad=dataclasses.replace(r.dgrad, rhs=None if requant else FORWARD),
      wgrad=dataclasses.replace(r.wgrad, lhs=None if requant else FORWARD),
      occ=None, dge=None, clip_mask=False)


def override_value(text: str) -> Any:
  """A recipe override typed on a command line ("k=v"): a Python literal
  (None, True, 3, 0.97, "e2m1") or else the bare word as a string (ell)."""
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def typed_overrides(items: Sequence[str]
                    ) -> tuple[dict[str, Any], Execution, dict[str, Any]]:
  """"k=v" items typed on a command line (`override_value`) as (recipe
  overrides, the Execution of the run-level keys, layer-rule keys)."""
  fields = {}
  for item in filter(None, items):
    k, _, v = item.partition("=")
    fields[k] = override_value(v)
  recipe, run, layer = split_overrides(fields)
  return recipe, Execution(**run), layer


def get_recipe(name: str | Recipe, /, **overrides: Any) -> Recipe:
  """A named recipe with fields overridden, named for what changed.

  Args:
    name: a key of RECIPES, or a Recipe (returned with overrides applied).
    **overrides: spec paths, dotted ("fwd.lhs.fmt": "e1m2", "occ.alpha":
      0.97, "dge": None, "dgrad.rht": 16; pass them as **{...}), or the
      earlier recipe's flat keys, translated onto the spec (FLAT_KEYS):
      dge_k, dge_cap, occ_alpha, occ_axis, compensation, hw_faithful,
      requant_quantized, rht_fwd / rht_dgrad / rht_wgrad, clip_mask,
      operands x, w, g_dgrad, g_wgrad, w_dgrad, x_wgrad and their fields as
      "<operand>__<field>" (x__fmt="e1m2", w__axis=1, x__pow2=True);
      shortcuts pow2, fmt, scale_fmt, block (forward operands), rounding
      (all FP4 operands), weight_axis ("out" = paper, "in" = released
      code), grad_sr (stochastic vs RNE gradients), weight_2d (16x16
      weight tiles), e8m0_round_up (every E8M0-scaled operand). "name"
      names the result; else it is `derived_name(name, overrides)`.

  Raises:
    ValueError: unknown recipe name or override key, a run-level key
      (RUN_KEYS: an Execution field) or layer-level one (bf16_tail), or a
      combination the spec refuses.
  """
  if isinstance(name, Recipe):
    r = name
  else:
    try:
      r = RECIPES[name]
    except (KeyError, TypeError):
      raise ValueError(f"unknown recipe {name!r}; expected one of "
                       f"{sorted(RECIPES)}") from None
  return recipe_keys.apply(r, overrides)


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


def default_bf16_tail(recipe: Recipe | str | None) -> float:
  """The BF16 tail a named recipe comes with (BF16_TAILS; 0 for others).
  An overridden recipe is known by its derived name's base."""
  if recipe is None:
    return 0.0
  name = recipe if isinstance(recipe, str) else recipe.name
  return BF16_TAILS.get(name.split("+", 1)[0], 0.0)


def check_share(share: Any, key: str = "bf16_tail") -> float:
  """`share` as a float in [0, 1); else a ValueError naming `key`."""
  if (isinstance(share, bool) or not isinstance(share, (int, float))
      or not 0 <= share < 1):
    raise ValueError(f"{key} must be a share in [0, 1), got {share!r}")
  return float(share)


def tail_rules(n_layers: int | None, share: float) -> tuple[Rule, ...]:
  """The rule keeping the last `share` of the decoder blocks plain, to go
  before a recipe's rules (default or explicit); () for share 0.

  Raises:
    ValueError: a share outside [0, 1), or a tail without n_layers.
  """
  share = check_share(share)
  if not share:
    return ()
  if n_layers is None:
    raise ValueError(f"a bf16_tail of {share} needs n_layers")
  tail = bf16_tail_blocks(n_layers, share)
  if not tail:
    return ()
  return ((rf"layers\.({'|'.join(map(str, tail))})\..*", None),)


def default_rules(recipe: Recipe | str | None, n_layers: int | None = None,
                  bf16_tail: float | None = None) -> tuple[Rule, ...]:
  """RECIPE §5 default: `recipe` on the block projections, the rest plain,
  after the BF16 tail rule (`bf16_tail`; None = the named recipe's own,
  `default_bf16_tail`; a tail needs `n_layers`)."""
  if isinstance(recipe, str):
    recipe = get_recipe(recipe)
  if recipe is None or not recipe.quantizes:
    return ()
  share = default_bf16_tail(recipe) if bf16_tail is None else bf16_tail
  return tail_rules(n_layers, share) + ((PROJECTION_PATTERN, recipe),)


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
