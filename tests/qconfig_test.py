"""Recipes, overrides and per-layer rules (RECIPE sections 2-5)."""

import dataclasses

import jax
import jax.numpy as jnp
import pytest

from fp4jax import qconfig
from fp4jax.qdot import get_recipe

NAMES = ("bf16", "fp8", "w4a4_direct", "w4a8", "w8a4", "fp4_paper",
         "fp4_code", "mxfp4", "nvfp4")

_LLAMA_PATHS = (
    "embed", "layers.0.attn.q_proj", "layers.0.attn.k_proj",
    "layers.0.attn.v_proj", "layers.0.attn.o_proj", "layers.0.mlp.gate_proj",
    "layers.0.mlp.up_proj", "layers.0.mlp.down_proj", "layers.0.attn_norm",
    "layers.1.attn.q_proj", "layers.1.mlp.down_proj", "final_norm",
    "lm_head")
_PROJ = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
         "down_proj")


@pytest.mark.parametrize("name", NAMES)
def test_named_recipes_build_and_hash(name):
  r = get_recipe(name)
  assert isinstance(r, qconfig.Recipe)
  assert r.quantizes == (name != "bf16")
  # Frozen and hashable: usable as a static argument under jit.
  assert hash(r) == hash(get_recipe(name)) and r == get_recipe(name)
  with pytest.raises(dataclasses.FrozenInstanceError):
    r.dge = None   # type: ignore[misc]
  assert r.needs_key == (name == "nvfp4")


def test_fp4_paper_is_the_paper_recipe():
  r = get_recipe("fp4_paper")
  # Activations: E2M1 per token with float scales, paper (LUT) rounding.
  assert (r.x.fmt, r.x.axis, r.x.scale, r.x.block, r.x.rounding) == (
      "e2m1", -1, "f32", 0, "paper")
  # Weights: E2M1 per output channel = amax over K, axis 0 of [K, N].
  assert (r.w.fmt, r.w.axis, r.w.scale, r.w.block) == ("e2m1", 0, "f32", 0)
  # Gradients: E5M2 per tensor, saturating RNE cast.
  for gq in (r.g_dgrad, r.g_wgrad):
    assert (gq.fmt, gq.axis, gq.rounding) == ("e5m2", None, "rne")
  assert (r.dge.k, r.dge.cap) == (5.0, 3.0)
  assert (r.occ.alpha, r.occ.axis, r.occ.compensation) == (0.99, -1, "sparse")
  assert not r.requantizes
  # The simulation: both backward GEMMs reuse the forward's operands.
  assert (r.dgrad.rhs, r.wgrad.lhs) == (qconfig.FORWARD, qconfig.FORWARD)


def test_fp4_code_and_direct_cast_differ_as_documented():
  code = get_recipe("fp4_code")
  assert code.x.scale == code.w.scale == "pow2"
  assert code.w.axis in (1, -1)           # per INPUT channel: amax over N
  assert code.occ.compensation == "none"
  direct = get_recipe("w4a4_direct")
  assert direct.occ is None and direct.dge is None
  assert direct.x == get_recipe("fp4_paper").x
  assert direct.w == get_recipe("fp4_paper").w


# The earlier flat override keys, read off the recipe spec.
_FLAT = {
    "occ_alpha": lambda r: r.occ.alpha,
    "dge_k": lambda r: r.dge.k,
    "compensation": lambda r: r.occ.compensation,
    "hw_faithful": lambda r: r.requantizes,
}


@pytest.mark.parametrize("overrides", [
    {"occ_alpha": 0.97}, {"dge_k": 3.0}, {"compensation": "dense"},
    {"compensation": "none"}, {"hw_faithful": True},
])
def test_overrides(overrides):
  before = get_recipe("fp4_paper")
  r = get_recipe("fp4_paper", **overrides)
  for k, v in overrides.items():
    assert _FLAT[k](r) == v
  # An overridden recipe is named for what changed.
  assert r.name == qconfig.derived_name("fp4_paper", overrides)
  assert r.name.startswith("fp4_paper+")
  assert r != before
  assert get_recipe("fp4_paper") == before     # the table is not mutated
  assert get_recipe(r) == r                   # a Recipe passes through


def test_operand_shortcuts():
  r = get_recipe("fp4_paper", pow2=True)
  assert r.x.scale == r.w.scale == "pow2"
  r = get_recipe("fp4_paper", weight_axis="in")
  assert r.w.axis in (1, -1) and r.x.axis == -1
  r = get_recipe("fp4_paper", x__fmt="e1m2")
  assert r.x.fmt == "e1m2" and r.w.fmt == "e2m1"


@pytest.mark.parametrize("name,overrides,word", [
    ("fp4_paper", {"occ_alpha": 1.0}, "occ.alpha"),
    ("fp4_paper", {"occ_alpha": 0.5}, "occ.alpha"),
    ("fp4_paper", {"dge_k": 1.0}, "dge.k"),
    ("fp4_paper", {"compensation": "sparse2"}, "compensation"),
    ("fp4_paper", {"no_such_field": 1}, "no_such_field"),
    ("fp4_paper", {"weight_axis": "out_channel"}, "weight_axis"),
    ("bf16", {"occ_alpha": 0.99}, "occ_alpha"),   # nothing to clamp
    ("fp4_paper", {"x__rounding": "nearest"}, "rounding"),
    ("fp4_paper", {"x__fmt": "e9m9"}, "fmt|e9m9"),
    ("no_such_recipe", {}, "no_such_recipe"),
    # OCC without a named compensation is ambiguous: refused, not "none".
    ("w4a4_direct", {"occ_alpha": 0.99}, "compensation"),
])
def test_bad_recipe_raises(name, overrides, word):
  with pytest.raises(ValueError, match=word):
    get_recipe(name, **overrides)


def test_recipe_is_a_static_jit_argument():
  @jax.jit
  def f(x):
    return x * (get_recipe("fp4_paper", dge_k=3.0).dge.k or 0.0)
  assert float(f(jnp.float32(2.0))) == 6.0


# -------------------------------------------------------------------- rules
def test_default_rules_quantize_only_block_projections():
  table = qconfig.resolve_rules(_LLAMA_PATHS,
                                qconfig.default_rules("fp4_paper"))
  assert set(table) == set(_LLAMA_PATHS)
  for p, r in table.items():
    if p.rsplit(".", 1)[-1] in _PROJ:
      assert r == get_recipe("fp4_paper"), p
    else:
      assert r is None, p


def test_default_rules_plain_recipe_is_empty():
  for plain in ("bf16", None):
    assert not qconfig.default_rules(plain)
    table = qconfig.resolve_rules(_LLAMA_PATHS, qconfig.default_rules(plain))
    assert all(r is None for r in table.values())


def test_first_fullmatch_wins():
  fp8, fp4 = get_recipe("fp8"), get_recipe("fp4_paper")
  rules = ((r"layers\.0\..*", fp8), (r".*_proj", fp4),
           (r"lm_head", None))
  table = qconfig.resolve_rules(_LLAMA_PATHS, rules)
  assert table["layers.0.attn.q_proj"] == fp8      # first rule, not second
  assert table["layers.0.attn_norm"] == fp8
  assert table["layers.1.attn.q_proj"] == fp4
  assert table["lm_head"] is None and table["embed"] is None


def test_rules_accept_recipe_names():
  table = qconfig.resolve_rules(_LLAMA_PATHS, ((r".*q_proj", "fp4_code"),))
  assert table["layers.1.attn.q_proj"] == get_recipe("fp4_code")


def test_rule_matching_nothing_raises():
  # fullmatch, not search: "q_proj" alone matches no full path.
  with pytest.raises(ValueError, match="q_proj"):
    qconfig.resolve_rules(_LLAMA_PATHS, (("q_proj", get_recipe("fp8")),))
  with pytest.raises(ValueError, match="typo_proj"):
    qconfig.resolve_rules(_LLAMA_PATHS, ((r".*q_proj", "fp8"),
                                         (r".*typo_proj", "fp8")))


def test_bad_regex_raises():
  with pytest.raises(ValueError, match=r"\(unclosed"):
    qconfig.resolve_rules(_LLAMA_PATHS, ((r"(unclosed", None),))


def test_override_values_typed_on_a_command_line():
  # bench/step_time.py "NAME:k=v;k=v" and bench/gpu_model.py --set.
  assert qconfig.override_value("True") is True
  assert qconfig.override_value("None") is None
  assert qconfig.override_value("0.97") == 0.97
  assert qconfig.override_value("5") == 5
  assert qconfig.override_value("ell") == "ell"          # a bare word
  assert qconfig.override_value("'none'") == "none"
