"""The recipe spec: three GEMM specs, one scale-format table, every invalid
combination refused in one line, derived names, the earlier keys' one
translation table (the committed experiment ledgers keep their ids), and
fallbacks said once."""

import dataclasses
import importlib
import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import np_ref
from fp4jax import fallback
from fp4jax import numerics
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import quant
from fp4jax import runconfig
from fp4jax.qconfig import (FORWARD, Dge, Execution, Gemm, Occ, Recipe,
                            TensorQuant, get_recipe)

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_X4 = TensorQuant(fmt="e2m1", axis=-1)
_W4 = TensorQuant(fmt="e2m1", axis=0)
_G8 = TensorQuant(fmt="e5m2", axis=None, rounding="rne")
_PAPER_OCC = Occ(alpha=0.99, compensation="sparse")


def _fwd(**kw):
  return Gemm(lhs=_X4, rhs=_W4, **kw)


# (what, a call that must be refused, a fragment of its one-line message).
# Each is a combination the earlier 21-field recipe accepted and then
# ignored or changed silently, or one the spec cannot hold.
INVALID = [
    ("forward operand in the forward", lambda: Recipe(fwd=Gemm(lhs=FORWARD)),
     "cannot be 'forward'"),
    ("gradient from the forward",
     lambda: Recipe(dgrad=Gemm(lhs=FORWARD, rhs=FORWARD)),
     "cannot be 'forward'"),
    ("one backward operand reused, one re-quantized",
     lambda: Recipe(fwd=_fwd(), dgrad=Gemm(rhs=dataclasses.replace(
         _W4, axis=1)), wgrad=Gemm(lhs=FORWARD)), "must both be"),
    ("backward rotation of reused operands",
     lambda: Recipe(dgrad=Gemm(rhs=FORWARD, rht=16)), "re-quantized"),
    ("requant_from without re-quantizing",
     lambda: Recipe(requant_from="quantized"), "re-quantized"),
    ("unknown requant_from", lambda: Recipe(requant_from="rotated"),
     "unknown requant_from"),
    ("OCC on unquantized activations",
     lambda: Recipe(fwd=Gemm(rhs=_W4), occ=_PAPER_OCC),
     "activations are not quantized"),
    ("OCC with a rotation", lambda: Recipe(fwd=_fwd(rht=32), occ=_PAPER_OCC),
     "do not combine with occ"),
    ("OCC with the trust mask",
     lambda: Recipe(fwd=_fwd(), occ=_PAPER_OCC, clip_mask=True),
     "do not combine with occ"),
    ("DGE with a rotated forward", lambda: Recipe(fwd=_fwd(rht=32), dge=Dge()),
     "does not combine with dge"),
    ("DGE on an FP8 weight",
     lambda: Recipe(fwd=Gemm(lhs=_X4, rhs=TensorQuant(fmt="e4m3", axis=0)),
                    dge=Dge()), "FP4 weight grid"),
    ("trust mask with nothing quantized", lambda: Recipe(clip_mask=True),
     "clip_mask needs"),
    ("OCC quantile", lambda: Occ(alpha=0.4, compensation="none"), "(0.5, 1)"),
    ("unknown compensation", lambda: Occ(alpha=0.99, compensation="both"),
     "unknown compensation"),
    ("OCC axis", lambda: Occ(alpha=0.99, compensation="none", axis=0),
     "occ axis"),
    ("DGE sharpness", lambda: Dge(k=1.0), "> 1"),
    ("DGE cap", lambda: Dge(cap=0.0), "cap must be > 0"),
    ("DGE sharpness typed as a bool", lambda: Dge(k=True), "Dge.k must be"),
    ("rotation block", lambda: Gemm(rht=24), "power of two"),
    ("operand spec type", lambda: Gemm(lhs="e2m1"), "must be a TensorQuant"),
    ("unknown scale format", lambda: TensorQuant(scale="e9m9"),
     "unknown scale format"),
    ("2-D tiles without a block", lambda: TensorQuant(block_2d=True),
     "needs a block"),
    ("blocks without an axis", lambda: TensorQuant(block=32, axis=None),
     "needs an axis"),
    ("unknown rounding", lambda: TensorQuant(rounding="up"),
     "unknown rounding"),
    ("scale multiplier", lambda: TensorQuant(scale_mult=0.0), "> 0"),
    ("unknown element format", lambda: TensorQuant(fmt="e9m9"), "e9m9"),
    ("scale format round-up without E8M0",
     lambda: numerics.ScaleFormat("f32", round_up=True), "E8M0"),
    ("unknown impl", lambda: Execution(impl="cuda"), "unknown impl"),
    ("unknown accumulation", lambda: Execution(accumulation="tf32"),
     "unknown accumulation"),
    ("unknown sparse_impl", lambda: Execution(sparse_impl="csr"),
     "unknown sparse_impl"),
    ("ELL products of a tensor-wise quantile",
     lambda: Execution(sparse_impl="ell").check(
         get_recipe("fp4_paper", occ_axis=None)), "per-token OCC"),
    ("a run-level key as a recipe override",
     lambda: get_recipe("fp4_paper", impl="xla"), "gemm.impl"),
    ("a layer-level key as a recipe override",
     lambda: get_recipe("nvfp4_nvidia", bf16_tail=0.0), "quant.bf16_tail"),
    ("compensation without OCC",
     lambda: get_recipe("w4a4_direct", compensation="dense"),
     "without occ_alpha"),
    ("OCC axis while OCC is turned off",
     lambda: get_recipe("fp4_paper", occ_alpha=None, occ_axis=None),
     "without occ_alpha"),
    ("OCC without a compensation",
     lambda: get_recipe("w4a4_direct", occ_alpha=0.99), "no compensation"),
    ("dge_cap without DGE", lambda: get_recipe("w4a4_direct", dge_cap=2.0),
     "without dge_k"),
    ("DGE on the fp8 recipe's E4M3 weight",
     lambda: get_recipe("fp8", dge_k=5.0), "FP4 weight grid"),
    ("backward operand spec without re-quantizing",
     lambda: get_recipe("fp4_paper", w_dgrad=_W4), "hw_faithful=True"),
    ("a scale-flag combination no format has",
     lambda: get_recipe("fp4_paper", x__scale_fmt="e8m0",
                        x__tensor_scale=True), "no scale format has"),
    ("a field of an absent group",
     lambda: get_recipe("w4a4_direct", **{"occ.alpha": 0.9}), "no 'alpha'"),
    ("an unknown spec path",
     lambda: get_recipe("fp4_paper", **{"occ.beta": 0.9}), "no field 'beta'"),
    ("an unknown key", lambda: get_recipe("fp4_paper", occ_alhpa=0.9),
     "unknown recipe override 'occ_alhpa'"),
    ("an operand the recipe does not quantize",
     lambda: get_recipe("bf16", x__fmt="e1m2"), "does not quantize"),
    ("an unknown recipe", lambda: get_recipe("fp5_paper"), "unknown recipe"),
]


@pytest.mark.parametrize("what,call,fragment", INVALID,
                         ids=[w for w, _, _ in INVALID])
def test_every_invalid_combination_is_refused_in_one_line(what, call,
                                                          fragment):
  del what
  with pytest.raises(ValueError) as e:
    call()
  assert fragment in str(e.value)
  assert "\n" not in str(e.value)


def test_a_recipe_is_its_three_gemms():
  r = get_recipe("fp4_paper")
  assert r.fwd == Gemm(lhs=_X4, rhs=_W4)
  assert r.dgrad == Gemm(lhs=_G8, rhs=FORWARD)
  assert r.wgrad == Gemm(lhs=FORWARD, rhs=_G8)
  assert r.occ == _PAPER_OCC and r.dge == Dge(k=5.0, cap=3.0)
  assert not r.requantizes
  # NVIDIA's NVFP4: every operand scaled along its own GEMM's contraction.
  nv = get_recipe("nvfp4_nvidia")
  assert nv.requantizes and nv.wgrad.rht == 16
  assert (nv.fwd.lhs.axis, nv.dgrad.lhs.axis, nv.wgrad.lhs.axis,
          nv.wgrad.rhs.axis) == (-1, 1, 0, 0)
  assert {q.scale for g in (nv.fwd, nv.dgrad, nv.wgrad)
          for q in g.operands()} == {"e4m3_tensor"}


# The earlier flat keys: (recipe, overrides, what the spec then holds).
TRANSLATIONS = [
    ("fp4_paper", {"hw_faithful": True},
     lambda r: (r.dgrad.rhs == dataclasses.replace(_W4, axis=1)
                and r.wgrad.lhs == dataclasses.replace(_X4, axis=0))),
    ("fp4_paper", {"hw_faithful": True, "x__fmt": "e1m2"},
     lambda r: r.x.fmt == r.wgrad.lhs.fmt == "e1m2"),
    ("fp4_paper", {"x__pow2": True},
     lambda r: (r.x.scale, r.w.scale) == ("pow2", "f32")),
    ("fp4_paper", {"pow2": True},
     lambda r: (r.x.scale, r.w.scale) == ("pow2", "pow2")),
    ("fp4_paper", {"weight_axis": "in"}, lambda r: r.w.axis == 1),
    ("fp4_paper", {"dge_k": None}, lambda r: r.dge is None),
    ("fp4_paper", {"dge_k": 3.0, "dge_cap": 2.0},
     lambda r: r.dge == Dge(k=3.0, cap=2.0)),
    ("fp4_paper", {"occ_alpha": 0.97, "compensation": "dense"},
     lambda r: r.occ == Occ(alpha=0.97, compensation="dense")),
    ("fp4_paper", {"occ_alpha": None}, lambda r: r.occ is None),
    ("fp4_paper", {"rht_fwd": 32, "dge_k": None, "occ_alpha": None},
     lambda r: r.fwd.rht == 32),
    ("mxfp4_tseng", {"e8m0_round_up": True},
     lambda r: {q.scale for g in (r.fwd, r.dgrad, r.wgrad)
                for q in g.operands()} == {"e8m0_up"}),
    ("mxfp4_tseng", {"x": None, "w": None},
     lambda r: r.fwd.operands() == () and r.dgrad.rhs.block == 32),
    ("nvfp4_nvidia", {"grad_sr": False},
     lambda r: r.dgrad.lhs.rounding == r.wgrad.rhs.rounding == "rne"),
    ("nvfp4_nvidia", {"weight_2d": False},
     lambda r: not r.w.block_2d and not r.dgrad.rhs.block_2d),
    ("nvfp4_nvidia", {"rht_wgrad": 0}, lambda r: r.wgrad.rht == 0),
    ("quartet", {"requant_quantized": False},
     lambda r: r.requant_from == "clamped"),
    ("quartet", {"rounding": "rne"},
     lambda r: {q.rounding for g in (r.fwd, r.dgrad, r.wgrad)
                for q in g.operands()} == {"rne"}),
]


@pytest.mark.parametrize("name,overrides,check", TRANSLATIONS)
def test_the_earlier_keys_translate_onto_the_spec(name, overrides, check):
  r = get_recipe(name, **overrides)
  assert check(r), r


def test_the_spec_paths_and_the_earlier_keys_agree():
  pairs = [({"dge_k": None}, {"dge": None}),
           ({"occ_alpha": 0.97}, {"occ.alpha": 0.97}),
           ({"x__fmt": "e1m2"}, {"fwd.lhs.fmt": "e1m2"}),
           ({"x__pow2": True}, {"fwd.lhs.scale": "pow2"}),
           ({"compensation": "dense"}, {"occ.compensation": "dense"})]
  for flat, path in pairs:
    a, b = get_recipe("fp4_paper", **flat), get_recipe("fp4_paper", **path)
    assert dataclasses.replace(a, name="") == dataclasses.replace(b, name="")


def test_every_named_recipe_round_trips_through_the_translation_table():
  # The earlier form's view of each recipe, read back, is the recipe.
  for name, r in qconfig.RECIPES.items():
    assert get_recipe(name, clip_mask=r.clip_mask, name=name) == r, name


def test_an_overridden_recipe_is_named_for_what_changed():
  assert get_recipe("fp4_paper", dge_k=None).name == "fp4_paper+dge_k=None"
  assert (get_recipe("w8a4", occ_alpha=0.97, compensation="dense").name
          == "w8a4+occ_alpha=0.97+compensation=dense")
  assert (get_recipe("fp4_paper", **{"occ.alpha": 0.97}).name
          == "fp4_paper+occ.alpha=0.97")
  assert get_recipe("fp4_paper", dge_k=None, name="ste").name == "ste"
  assert get_recipe("fp4_paper").name == "fp4_paper"


def _config(**quant):
  from configs import default  # pylint: disable=g-import-not-at-top
  c = default.get_config()
  c.model.size = "tiny"
  for k, v in quant.items():
    c.quant[k] = v
  return c


def test_the_derived_name_reaches_the_run_record_and_the_switched_label():
  c = _config(recipe="fp4_paper", overrides={"dge_k": None},
              switch_back=0.5)
  run = runconfig.translate(c)
  assert run.recipe.name == "fp4_paper+dge_k=None"
  assert run.run_info["quant"]["recipe"] == "fp4_paper+dge_k=None"
  _, label = runconfig.rules_at_step(c.quant, c.num_steps,
                                     run.model.n_layers, c.num_steps)
  assert label == "fp4_paper+dge_k=None+bf16_forward"


def test_run_level_keys_reach_the_model_not_the_recipe():
  c = _config(recipe="fp4_paper", overrides={"impl": "xla", "dge_k": None})
  run = runconfig.translate(c)
  assert run.model.gemm == Execution(impl="xla")
  assert run.recipe.name == "fp4_paper+dge_k=None"
  c = _config(recipe="fp4_paper")
  c.gemm.accumulation = "fast"
  assert runconfig.translate(c).model.gemm == Execution(accumulation="fast")
  c.quant.overrides = {"accumulation": "fp32"}
  with pytest.raises(ValueError, match="disagree"):
    runconfig.translate(c)


def test_the_bf16_tail_is_a_layer_rule_kept_with_explicit_rules():
  n = 6
  default = runconfig.quant_rules(_config(recipe="nvfp4_nvidia").quant, n)[0]
  assert default[0] == (r"layers\.(5)\..*", None)
  explicit = runconfig.quant_rules(_config(
      recipe="nvfp4_nvidia", rules=((r".*mlp.*", "nvfp4_nvidia"),)).quant,
                                   n)[0]
  assert explicit[0] == (r"layers\.(5)\..*", None)      # was dropped before
  off = runconfig.quant_rules(_config(recipe="nvfp4_nvidia",
                                      overrides={"bf16_tail": 0}).quant, n)[0]
  assert all(r is not None for _, r in off)
  assert runconfig.quant_rules(_config(recipe="nvfp4_nvidia",
                                       bf16_tail=0.5).quant, n)[0][0] == (
                                           r"layers\.(3|4|5)\..*", None)


def test_every_committed_result_keeps_its_arm_id():
  from experiments import run as runner  # pylint: disable=g-import-not-at-top
  results = os.path.join(_ROOT, "experiments", "results")
  n = 0
  for name in sorted(os.listdir(results)):
    with open(os.path.join(results, name, "finished.json")) as f:
      ledger = json.load(f)
    mod = importlib.import_module(f"experiments.{name}")
    for key, e in ledger.items():
      c = mod.get_config(f"arm={e['arm']},seed={e['seed']},"
                         f"steps={e['steps']}")
      assert key in (runner.arm_hash(c), runner.arm_hash(c, legacy=True)), (
          name, e["arm"], e["seed"])
      runconfig.translate(c)      # and the arm still means a valid run
      n += 1
  assert n >= 100     # the ledgers were read


# --------------------------------------------- a new format: one entry
# A sample block format no recipe uses: E2M1 elements in blocks of 8 with
# E5M2 block scales. Its oracle is numpy with ml_dtypes' E5M2 cast.
_SAMPLE = "e5m2_sample"
# As quant_test's BLOCK_RTOL: the f32 code multiplies by 1/d where the
# oracle divides by d.
BLOCK_RTOL = 1e-6


def _sample_oracle(x: np.ndarray, block: int) -> np.ndarray:
  xb = x.reshape(x.shape[0], -1, block)
  amax = np.max(np.abs(xb), axis=-1, keepdims=True)
  d = (amax / 6.0).astype(np.float32).astype(ml_dtypes.float8_e5m2).astype(
      np.float64)
  safe = np.where(d > 0, d, 1.0)
  return np.where(d > 0, np_ref.round_rne(xb / safe, "e2m1") * d,
                  0.0).reshape(x.shape)


def test_a_new_block_format_is_one_table_entry(monkeypatch):
  monkeypatch.setitem(numerics.SCALE_FORMATS, _SAMPLE,
                      numerics.ScaleFormat("e5m2"))
  spec = TensorQuant(fmt="e2m1", axis=-1, block=8, scale=_SAMPLE,
                     rounding="rne")
  rng = np.random.default_rng(0)
  x = rng.standard_normal((16, 64)) * np.exp(rng.standard_normal((16, 1)))
  got = np.asarray(quant.quantize(jnp.asarray(x, jnp.float32), spec)
                   .dequantize(), np.float64)
  want = _sample_oracle(x.astype(np.float32).astype(np.float64), 8)
  np.testing.assert_allclose(got, want, rtol=BLOCK_RTOL, atol=0)
  # And as the operands of a recipe, through qmatmul and its gradients.
  w = rng.standard_normal((64, 24)) * 0.1
  r = Recipe(name="sample", fwd=Gemm(lhs=spec, rhs=dataclasses.replace(
      spec, axis=0)), dgrad=Gemm(rhs=FORWARD), wgrad=Gemm(lhs=FORWARD))
  y, grads = jax.value_and_grad(
      lambda a, b: jnp.sum(qdot.qmatmul(a, b, r) ** 2), argnums=(0, 1))(
          jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32))
  wq = _sample_oracle(w.astype(np.float32).astype(np.float64).T, 8).T
  y_ref = want @ wq
  np.testing.assert_allclose(float(y), np.sum(y_ref ** 2), rtol=1e-5)
  assert all(np.all(np.isfinite(np.asarray(g))) for g in grads)


# ------------------------------------------------------------ fallbacks
def test_a_fallback_is_said_once(monkeypatch):
  said = []
  monkeypatch.setattr(fallback.logging, "warning",
                      lambda fmt, *args: said.append(fmt % args))
  monkeypatch.setattr(fallback, "_SEEN", {})
  x = jnp.ones((8, 64), jnp.float32)
  w = jnp.ones((64, 8), jnp.float32)
  run = Execution(impl="pallas")
  for _ in range(3):       # block scales: the row kernel cannot serve them
    qdot.qmatmul(x, w, "mxfp4", execution=run)
  assert len(said) == 1 and "pallas row kernel" in said[0]
  assert "not scaled per token in f32" in said[0]
  assert len(fallback.seen()) == 1
