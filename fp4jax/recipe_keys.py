"""Recipe override keys: spec paths and the earlier flat keys, one table.

Owns: `apply(recipe, overrides)`, the one translation of an override
mapping onto a Recipe: spec paths ("fwd.lhs.fmt", "occ.alpha", "dge") and
the flat keys of the earlier 21-field recipe form (`FLAT_KEYS`: dge_k,
occ_alpha, hw_faithful, x__fmt, pow2, grad_sr, ...), so configs and
experiment arms written with them keep their meaning and their ids;
`split_overrides`, which routes the run-level (`RUN_KEYS`: an Execution)
and layer-level keys (`LAYER_KEYS`) away from the recipe; and
`derived_name`, the name of an overridden recipe.

Must not import: jax, flax, ml_collections, anything in fp4jax except
`numerics` and `qspec`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

from fp4jax import numerics
from fp4jax.qspec import (COMPENSATIONS, FORWARD, Dge, Gemm, Occ, Recipe,
                          TensorQuant)

# A recipe override is either a path into the spec ("fwd.lhs.fmt",
# "dgrad.rht", "occ.alpha", "dge", "clip_mask") or one of the flat keys of
# the earlier 21-field recipe, which the one translation table below maps
# onto the spec (configs and experiment arms written with them keep their
# meaning, and their hashes). Run-level and layer-level keys are not part
# of a recipe: `split_overrides` routes them.

# Recipe fields whose flat key is a spec path of its own.
_SPEC_FIELDS = ("fwd", "dgrad", "wgrad", "occ", "dge", "requant_from")

# Flat keys that leave the recipe: to `Execution` (config section `gemm`)
# and to the layer rules (config `quant.bf16_tail`).
RUN_KEYS = ("impl", "accumulation", "sparse_impl")
LAYER_KEYS = ("bf16_tail",)

# The earlier recipe's fields, in terms of which the flat keys are read.
_FLAT_OPERANDS = ("x", "w", "g_dgrad", "g_wgrad", "w_dgrad", "x_wgrad")
_FLAT_FIELDS = _FLAT_OPERANDS + (
    "hw_faithful", "requant_quantized", "rht_fwd", "rht_dgrad", "rht_wgrad",
    "dge_k", "dge_cap", "occ_alpha", "occ_axis", "compensation",
    "clip_mask")
# Operand fields of the earlier TensorQuant folded into `scale`.
_SCALE_FLAGS = ("scale_fmt", "pow2", "e8m0_round_up", "tensor_scale")
# Shortcuts: the forward operands; every FP4 operand; one switch for a
# piece of a recipe across the operands it touches (TensorQuant field or
# scale flag, value from the switch, operands).
_FWD_SHORTCUTS = ("pow2", "fmt", "scale_fmt", "block")
_GROUP_SHORTCUTS = {
    "grad_sr": ("rounding", lambda on: "stochastic" if on else "rne",
                ("g_dgrad", "g_wgrad")),
    "weight_2d": ("block_2d", bool, ("w", "w_dgrad")),
    "e8m0_round_up": ("e8m0_round_up", bool, _FLAT_OPERANDS),
}
FLAT_KEYS = (_FLAT_FIELDS + _FWD_SHORTCUTS + ("rounding", "weight_axis")
             + tuple(_GROUP_SHORTCUTS))
# A backward operand the earlier form left to be derived, but which the
# spec holds as unquantized (inexpressible there; kept as it is).
_UNQUANTIZED = "<unquantized>"


def split_overrides(overrides: Mapping[str, Any]
                    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
  """(recipe overrides, Execution fields, layer-rule keys) of a mapping of
  override keys (config `quant.overrides`)."""
  recipe, run, layer = {}, {}, {}
  for k, v in overrides.items():
    (run if k in RUN_KEYS else layer if k in LAYER_KEYS else recipe)[k] = v
  return recipe, run, layer


def _flags(q: TensorQuant) -> dict[str, Any]:
  s = numerics.scale_format(q.scale)
  return {"scale_fmt": s.storage, "pow2": s.pow2 and s.storage == "f32",
          "e8m0_round_up": s.round_up, "tensor_scale": s.tensor_scale}


def _scale_named(flags: Mapping[str, Any]) -> str:
  """The SCALE_FORMATS key with these earlier flags (pow2 is implied by
  E8M0 storage)."""
  for name, s in numerics.SCALE_FORMATS.items():
    if (s.storage == flags["scale_fmt"] and s.round_up == flags["e8m0_round_up"]
        and s.tensor_scale == flags["tensor_scale"]
        and (s.storage == "e8m0" or s.pow2 == flags["pow2"])):
      return name
  raise ValueError(f"no scale format has {dict(flags)}; the scale formats "
                   f"are {sorted(numerics.SCALE_FORMATS)}")


def _replace_operand(q: TensorQuant, changes: Mapping[str, Any]
                     ) -> TensorQuant:
  """q with fields changed, the earlier scale flags included."""
  fields = {f.name for f in dataclasses.fields(TensorQuant)}
  flags = {k: v for k, v in changes.items() if k in _SCALE_FLAGS}
  rest = {k: v for k, v in changes.items() if k not in _SCALE_FLAGS}
  unknown = sorted(set(rest) - fields)
  if unknown:
    raise ValueError(f"unknown operand field(s) {unknown}; expected one of "
                     f"{sorted(fields | set(_SCALE_FLAGS))}")
  if flags:
    for k, v in flags.items():
      if k != "scale_fmt" and not isinstance(v, bool):
        raise ValueError(f"TensorQuant.{k} must be bool, got {v!r}")
    rest["scale"] = _scale_named({**_flags(q), **flags})
  return dataclasses.replace(q, **rest)


def _moved(q: TensorQuant | None, axis: int) -> TensorQuant | None:
  """q re-scaled along `axis` (the earlier form's derived backward spec)."""
  if q is None:
    return None
  return dataclasses.replace(q, axis=None if q.axis is None else axis)


def _flat_view(r: Recipe) -> dict[str, Any]:
  """The recipe as the earlier form's fields."""
  hw = r.requantizes

  def own(spec, fwd_spec, axis):
    if not hw or spec == _moved(fwd_spec, axis):
      return None
    return _UNQUANTIZED if spec is None else spec

  return {"x": r.fwd.lhs, "w": r.fwd.rhs, "g_dgrad": r.dgrad.lhs,
          "g_wgrad": r.wgrad.rhs, "w_dgrad": own(r.dgrad.rhs, r.fwd.rhs, 1),
          "x_wgrad": own(r.wgrad.lhs, r.fwd.lhs, 0), "hw_faithful": hw,
          "requant_quantized": r.requant_from == "quantized",
          "rht_fwd": r.fwd.rht, "rht_dgrad": r.dgrad.rht,
          "rht_wgrad": r.wgrad.rht,
          "dge_k": r.dge.k if r.dge else None,
          "dge_cap": r.dge.cap if r.dge else Dge.cap,
          "occ_alpha": r.occ.alpha if r.occ else None,
          "occ_axis": r.occ.axis if r.occ else -1,
          "compensation": r.occ.compensation if r.occ else None,
          "clip_mask": r.clip_mask}


def _from_flat(f: Mapping[str, Any], name: str, named: set[str]) -> Recipe:
  """A Recipe from the earlier form's fields; `named`: the fields the
  overrides set (a group's field set while the group is off is refused,
  not ignored)."""
  if not isinstance(f["hw_faithful"], bool):
    raise ValueError(f"hw_faithful must be bool, got {f['hw_faithful']!r}")
  needs_hw = [n for n in ("w_dgrad", "x_wgrad", "rht_dgrad", "rht_wgrad",
                          "requant_quantized") if f[n]]
  if needs_hw and not f["hw_faithful"]:
    raise ValueError(f"recipe {name!r} sets {needs_hw}, which shape the "
                     "backward's re-quantized operands: set hw_faithful=True")

  def own(spec, fwd_spec, axis):
    if spec is None:
      return _moved(fwd_spec, axis)
    return None if spec == _UNQUANTIZED else spec

  if f["hw_faithful"]:
    w_d, x_w = own(f["w_dgrad"], f["w"], 1), own(f["x_wgrad"], f["x"], 0)
  else:
    w_d = x_w = FORWARD
  occ = dge = None
  if f["occ_alpha"] is None:
    idle = sorted(named & {"compensation", "occ_axis"})
    if idle:
      raise ValueError(f"recipe {name!r}: {idle} set without occ_alpha "
                       "(OCC is off), which would have no effect")
  else:
    if f["compensation"] is None:
      raise ValueError(f"recipe {name!r} sets occ_alpha={f['occ_alpha']} "
                       f"but no compensation; name one of {COMPENSATIONS} "
                       "(it changes the forward and both gradients)")
    occ = Occ(alpha=f["occ_alpha"], compensation=f["compensation"],
              axis=f["occ_axis"])
  if f["dge_k"] is None:
    if "dge_cap" in named:
      raise ValueError(f"recipe {name!r}: dge_cap set without dge_k (DGE is "
                       "off), which would have no effect")
  else:
    dge = Dge(k=f["dge_k"], cap=f["dge_cap"])
  if not isinstance(f["requant_quantized"], bool):
    raise ValueError(f"requant_quantized must be bool, got "
                     f"{f['requant_quantized']!r}")
  return Recipe(
      name=name, fwd=Gemm(lhs=f["x"], rhs=f["w"], rht=f["rht_fwd"]),
      dgrad=Gemm(lhs=f["g_dgrad"], rhs=w_d, rht=f["rht_dgrad"]),
      wgrad=Gemm(lhs=x_w, rhs=f["g_wgrad"], rht=f["rht_wgrad"]),
      occ=occ, dge=dge, clip_mask=f["clip_mask"],
      requant_from="quantized" if f["requant_quantized"] else "clamped")


def _apply_flat(r: Recipe, overrides: Mapping[str, Any]) -> Recipe:
  """The translation table: the earlier form's flat keys on a Recipe."""
  flat = _flat_view(r)
  top, ops = {}, {o: {} for o in _FLAT_OPERANDS}

  def quantized(op):
    q = flat[op]
    return q if isinstance(q, TensorQuant) else None

  for key, val in overrides.items():
    if key in _FLAT_FIELDS:
      top[key] = val
    elif "__" in key and key.split("__", 1)[0] in _FLAT_OPERANDS:
      op, field = key.split("__", 1)
      ops[op][field] = val
    elif key in _FWD_SHORTCUTS:
      ops["x"][key] = ops["w"][key] = val
    elif key == "rounding":
      for op in _FLAT_OPERANDS:
        q = quantized(op)
        if q is not None and numerics.get_format(q.fmt).is_fp4:
          ops[op][key] = val
    elif key in _GROUP_SHORTCUTS:
      field, value_of, targets = _GROUP_SHORTCUTS[key]
      for op in targets:
        q = quantized(op)
        if q is not None and (field != "e8m0_round_up"
                              or _flags(q)["scale_fmt"] == "e8m0"):
          ops[op][field] = value_of(val)
    elif key == "weight_axis":
      if val not in ("out", "in"):
        raise ValueError(f"weight_axis must be 'out' or 'in', got {val!r}")
      ops["w"]["axis"] = 0 if val == "out" else 1
    else:
      raise ValueError(
          f"unknown recipe override {key!r}; expected a spec path (fwd.lhs."
          "fmt, dgrad.rht, occ.alpha, dge.k, ...) or one of "
          f"{sorted(FLAT_KEYS)} or <operand>__<field> with operand in "
          f"{_FLAT_OPERANDS}")
  flat.update(top)
  for op, kw in ops.items():
    if not kw:
      continue
    base = flat[op]
    if not isinstance(base, TensorQuant):
      raise ValueError(f"override {sorted(kw)} for operand {op!r}, which "
                       f"recipe {r.name!r} does not quantize")
    flat[op] = _replace_operand(base, kw)
  return _from_flat(flat, r.name, set(top))


def _replace_path(obj: Any, path: Sequence[str], value: Any, key: str
                  ) -> Any:
  if not path:
    return value
  head, rest = path[0], path[1:]
  if obj is None or isinstance(obj, str) or not dataclasses.is_dataclass(obj):
    raise ValueError(f"recipe override {key!r}: there is no "
                     f"{head!r} in {obj!r}")
  fields = {f.name for f in dataclasses.fields(obj)}
  if isinstance(obj, TensorQuant) and not rest and head in _SCALE_FLAGS:
    return _replace_operand(obj, {head: value})
  if head not in fields:
    raise ValueError(f"recipe override {key!r}: {type(obj).__name__} has no "
                     f"field {head!r}; its fields are {sorted(fields)}")
  return dataclasses.replace(
      obj, **{head: _replace_path(getattr(obj, head), rest, value, key)})


def _apply_paths(r: Recipe, overrides: Mapping[str, Any]) -> Recipe:
  """Spec paths ("fwd.lhs.fmt": "e1m2", "occ": None) on a Recipe, all at
  once: the Recipe checks the combination, not each step."""
  by_field: dict[str, list[tuple[list[str], Any, str]]] = {}
  for key, val in overrides.items():
    head, *rest = key.split(".")
    by_field.setdefault(head, []).append((rest, val, key))
  fields = {f.name for f in dataclasses.fields(Recipe)}
  changes = {}
  for head, items in by_field.items():
    if head not in fields or head == "name":
      raise ValueError(f"recipe override {items[0][2]!r}: Recipe has no "
                       f"field {head!r}; its fields are "
                       f"{sorted(fields - {'name'})}")
    value = getattr(r, head)
    for rest, val, key in items:
      value = _replace_path(value, rest, val, key)
    changes[head] = value
  return dataclasses.replace(r, **changes)


def _text(v: Any) -> str:
  if isinstance(v, TensorQuant):
    return v.short()
  if dataclasses.is_dataclass(v):
    return type(v).__name__ + "(" + ",".join(
        f"{f.name}={_text(getattr(v, f.name))}"
        for f in dataclasses.fields(v)) + ")"
  return str(v)


def derived_name(base: str, overrides: Mapping[str, Any]) -> str:
  """The name of `base` with `overrides`: "fp4_paper+dge_k=None"."""
  return "+".join([base] + [f"{k}={_text(v)}" for k, v in overrides.items()])


def apply(r: Recipe, overrides: Mapping[str, Any]) -> Recipe:
  """`r` with `overrides` (spec paths and flat keys; "name" names the
  result, else `derived_name`).

  Raises:
    ValueError: a run-level or layer-level key, an unknown key, or a
      combination the spec refuses.
  """
  if not overrides:
    return r
  given = dict(overrides)
  new_name = given.pop("name", None)
  for key in given:
    if key in RUN_KEYS:
      raise ValueError(f"{key!r} is how the GEMMs run, not part of a recipe: "
                       f"pass Execution({key}=...) (config gemm.{key})")
    if key in LAYER_KEYS:
      raise ValueError(f"{key!r} is a layer rule, not part of a recipe "
                       f"(config quant.{key}; qconfig.tail_rules)")
  paths = {k: v for k, v in given.items() if "." in k or k in _SPEC_FIELDS}
  flat = {k: v for k, v in given.items() if k not in paths}
  out = _apply_flat(r, flat) if flat else r
  out = _apply_paths(out, paths) if paths else out
  if new_name is not None and not isinstance(new_name, str):
    raise ValueError(f"recipe name must be a str, got {new_name!r}")
  return dataclasses.replace(
      out, name=new_name or derived_name(r.name, given))
