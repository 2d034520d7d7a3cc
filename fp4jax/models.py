"""Model families: the one place the trainer learns what a model is.

Owns: `Family` (a config type, its size table, the model class, its
projection paths, and its analytic costs), `FAMILIES` ("llama"),
`register`, and what the trainer, the planner and evaluation ask of any
model: `family_of(cfg)`, `build(cfg, table, rngs)`, `projection_paths`,
`get_config(family, size)`, `param_count`, `flops_per_token`,
`activation_bytes_per_token`.

A family is a module of its own plus one `register` call. Its config is a
frozen dataclass (hashable: a static jit argument) with at least the
fields the trainer reads: vocab_size, max_seq_len, n_layers, d_model,
compute_dtype, param_dtype, remat, scan_layers and gemm (a
`qconfig.Execution`). Its model class is built as `Model(cfg, table=...,
rngs=...)`, where `table` is the resolved layer table {projection path:
Recipe or None} (the trainer resolves the rules once); it is called as
`model(tokens, segment_ids=..., key=...)` -> f32 logits [B, T, V] and says
`quant_table` ({path: recipe name or "none"}). Its parameters carry the
logical axis names of `sharding.LOGICAL_RULES`; decoder blocks live under
"layers.<i>." ("layers." stacked, with scan_layers).

Must not import: fp4jax modules right of `llama` (optim, data, train_state,
...).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from fp4jax import flops
from fp4jax import llama
from fp4jax import memory
from fp4jax import qconfig
from fp4jax import sizes


@dataclasses.dataclass(frozen=True)
class Family:
  """What the trainer needs of one model family.

  Attributes:
    name: the config's `model.family`.
    config: the frozen config dataclass.
    model: the nnx.Module class, Model(cfg, *, table, rngs).
    projection_paths: cfg -> the paths of its weight matmuls in model
      order (the keys of quant rules; RECIPE §5's block projections match
      `qconfig.PROJECTION_PATTERN`).
    sizes: size name -> config keyword arguments.
    flops_per_token: (cfg, seq_len) -> training FLOPs per token, or None
      (then 6 x matmul parameters, attention left out).
    activation_bytes_per_token: (cfg, seq_len, quantized, remat, recipe,
      execution) -> saved bytes per token (memory plans), or None (then
      the planner counts the remat "none" upper bound it cannot know:
      unplanned).
  """
  name: str
  config: type
  model: Callable[..., nnx.Module]
  projection_paths: Callable[[Any], list[str]]
  sizes: Mapping[str, Mapping[str, Any]]
  flops_per_token: Callable[[Any, int], float] | None = None
  activation_bytes_per_token: Callable[..., float] | None = None


FAMILIES: dict[str, Family] = {}


def register(family: Family) -> Family:
  """Adds `family` (a name or config type already taken is a ValueError)."""
  if family.name in FAMILIES:
    raise ValueError(f"model family {family.name!r} is already registered")
  if any(f.config is family.config for f in FAMILIES.values()):
    raise ValueError(f"config {family.config.__name__} already belongs to a "
                     "model family")
  FAMILIES[family.name] = family
  return family


register(Family(
    name="llama", config=llama.LlamaConfig, model=llama.Llama,
    projection_paths=llama.projection_paths, sizes=sizes.SIZES,
    flops_per_token=flops.flops_per_token,
    activation_bytes_per_token=memory.activation_bytes_per_token))


def family_of(cfg: Any) -> Family:
  """The registered family whose config type `cfg` is."""
  for f in FAMILIES.values():
    if type(cfg) is f.config:      # pylint: disable=unidiomatic-typecheck
      return f
  raise ValueError(f"{type(cfg).__name__} is the config of no registered "
                   f"model family ({sorted(FAMILIES)}): models.register it")


def get_family(name: str) -> Family:
  try:
    return FAMILIES[name]
  except (KeyError, TypeError):
    raise ValueError(f"unknown model.family {name!r}; expected one of "
                     f"{sorted(FAMILIES)}") from None


def get_config(family: str, size: str, **overrides: Any) -> Any:
  """The config of a named size of `family`, with fields overridden.

  Raises:
    ValueError: unknown family or size (or an invalid override, via the
      config's own checks).
  """
  f = get_family(family)
  if size not in f.sizes:
    raise ValueError(f"unknown model.size {size!r} of family {f.name!r}; "
                     f"expected one of {list(f.sizes)}")
  return f.config(**{**f.sizes[size], **overrides})


def projection_paths(cfg: Any) -> list[str]:
  return family_of(cfg).projection_paths(cfg)


def layer_table(cfg: Any, rules) -> dict[str, qconfig.Recipe | None]:
  """{projection path: Recipe or None}: the layer rules resolved over the
  model's projection paths (`qconfig.resolve_rules`; None: all plain)."""
  return qconfig.resolve_rules(projection_paths(cfg), rules or ())


def build(cfg: Any, table: Mapping[str, Any] | None, rngs: nnx.Rngs
          ) -> nnx.Module:
  """The model of `cfg` with its resolved layer table (None: plain)."""
  if table is None:
    table = layer_table(cfg, None)
  return family_of(cfg).model(cfg, table=dict(table), rngs=rngs)


def abstract(cfg: Any, table: Mapping[str, Any] | None = None) -> nnx.Module:
  """`build` by `nnx.eval_shape`: shapes only, nothing allocated."""
  return nnx.eval_shape(lambda: build(
      cfg, table, nnx.Rngs(params=jax.random.key(0))))


def param_count(cfg: Any) -> int:
  """Number of parameters of the model of `cfg`, from the shapes alone."""
  params = nnx.state(abstract(cfg), nnx.Param)
  return int(sum(math.prod(a.shape) for a in jax.tree.leaves(params)))


def flops_per_token(cfg: Any, seq_len: int) -> float:
  """Training FLOPs per token: the family's own count, else 6 x the
  parameters of its matmuls (its projection kernels and the head)."""
  f = family_of(cfg)
  if f.flops_per_token is not None:
    return f.flops_per_token(cfg, seq_len)
  params = nnx.state(abstract(cfg), nnx.Param)
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  n = sum(int(np.prod(a.shape)) for p, a in leaves
          if "kernel" in jax.tree_util.keystr(p))
  return 6.0 * n


def activation_bytes_per_token(cfg: Any, seq_len: int, **kw: Any
                               ) -> float | None:
  """Saved activation bytes per token (`memory`), or None where the family
  has no model of them."""
  f = family_of(cfg)
  if f.activation_bytes_per_token is None:
    return None
  return f.activation_bytes_per_token(cfg, seq_len, **kw)
