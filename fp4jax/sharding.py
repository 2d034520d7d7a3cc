"""Device mesh, logical axis names and the shardings derived from them.

Owns: the mesh layout ("data", "fsdp", "tensor"), the default logical -> mesh
axis rules, annotating parameter initialisers with logical axis names,
activation sharding constraints, and turning a model state into a pytree of
`NamedSharding`s. This is the only module that calls jax/flax sharding APIs;
everything else speaks in logical axis names.

Parameters carry their logical names in the flax NNX `out_sharding` variable
metadata (flax 0.12 stores it there; `with_partitioning` is the documented
way to attach it). Eager sharding is switched off for them: the names are
logical, not mesh axes, so the state is placed by `state_shardings` instead.

Must not import: ml_collections, tensorflow_datasets, grain, or any fp4jax
module but backend (the model imports this one, not the other way round).
"""

import contextlib
import contextvars
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import jax
from flax import nnx
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

from fp4jax import backend

MESH_AXES = ("data", "fsdp", "tensor")

MeshAxes = str | tuple[str, ...] | None
Rules = Sequence[tuple[str, MeshAxes]]
Names = Sequence[str | None]

# Logical axis -> mesh axes. Parameters and activations use separate
# vocabularies so that, e.g., the embedding dim of a weight can be sharded
# (FSDP) while the embedding dim of an activation stays whole.
LOGICAL_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("norm", None),
    ("layers", None),   # the stacked layer axis (model.scan_layers)
    ("act_batch", ("data", "fsdp")),
    ("act_seq", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
)

# Rules used by `constrain` while tracing; set by `use_mesh`.
_ACTIVE_RULES: contextvars.ContextVar[Rules] = contextvars.ContextVar(
    "fp4jax_sharding_rules", default=LOGICAL_RULES)


def mesh_sizes(axes: Mapping[str, Any], devices: int, exact: bool = True
               ) -> dict[str, int]:
  """Axis sizes of MESH_AXES with a -1 resolved against `devices`.

  Args:
    axes: {"data", "fsdp", "tensor"}: positive ints, at most one -1.
    devices: the device count the mesh spans.
    exact: also require the product to equal `devices` (a mesh being
      built); False plans for devices not at hand.

  Raises:
    ValueError: naming `mesh.<axis>` when a size is invalid or the sizes do
      not fit the device count.
  """
  sizes = {a: axes[a] for a in MESH_AXES}
  for name, size in sizes.items():
    if (not isinstance(size, int) or isinstance(size, bool)
        or (size < 1 and size != -1)):
      raise ValueError(f"mesh.{name} must be a positive int or -1, "
                       f"got {size!r}")
  free = [name for name, size in sizes.items() if size == -1]
  if len(free) > 1:
    raise ValueError(f"only one mesh axis may be -1, got "
                     f"{', '.join('mesh.' + f for f in free)}")
  fixed = math.prod(s for s in sizes.values() if s != -1)
  desc = ", ".join(f"mesh.{k}={v}" for k, v in sizes.items())
  if free:
    if devices % fixed:
      raise ValueError(f"{desc}: the fixed axes ({fixed}) do not divide the "
                       f"{devices} devices")
    sizes[free[0]] = devices // fixed
  elif exact and fixed != devices:
    raise ValueError(f"{desc}: product {fixed} != {devices} devices")
  return sizes


def make_mesh(data: int = -1, fsdp: int = 1, tensor: int = 1,
              devices: Sequence[Any] | None = None) -> Mesh:
  """Builds a ("data", "fsdp", "tensor") mesh with Auto axis types.

  Auto axes let GSPMD propagate shardings through matmuls whose contraction
  dim is sharded (FSDP); Explicit axes (the `jax.make_mesh` default) reject
  those without an explicit `out_sharding`.

  Args:
    data: data-parallel size; -1 takes all devices the other axes leave.
    fsdp: parameter-sharding (ZeRO-3 style) size; -1 as for `data`.
    tensor: tensor-parallel size; -1 as for `data`.
    devices: devices to use (default: all of `jax.devices()`).

  Returns:
    A `jax.sharding.Mesh` with axes `MESH_AXES`.

  Raises:
    ValueError: naming `mesh.<axis>` when a size is invalid or the sizes do
      not fit the device count.
  """
  devices = list(jax.devices() if devices is None else devices)
  sizes = mesh_sizes({"data": data, "fsdp": fsdp, "tensor": tensor},
                     len(devices))
  shape = tuple(sizes[a] for a in MESH_AXES)
  return jax.make_mesh(shape, MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES),
                       devices=devices)


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> Iterator[Mesh]:
  """Makes `mesh` and `rules` current, so `constrain` takes effect, and
  the mesh's platform the target (`backend.target`: the program is built
  for the mesh's devices, whatever the process's default backend).

  Trace (first call of a jitted function) inside this context.

  Args:
    mesh: the mesh activations are constrained on.
    rules: logical -> mesh axis rules for `constrain`.

  Yields:
    The mesh.
  """
  token = _ACTIVE_RULES.set(tuple(rules))
  try:
    with jax.set_mesh(mesh), backend.targeting(backend.of_devices(mesh)):
      yield mesh
  finally:
    _ACTIVE_RULES.reset(token)


def logical_to_spec(names: Names, rules: Rules = LOGICAL_RULES
                    ) -> PartitionSpec:
  """Maps logical axis names to a PartitionSpec (first matching rule wins).

  Args:
    names: one logical name (or None = replicated) per array dim.
    rules: ordered (logical name, mesh axes) pairs.

  Returns:
    A PartitionSpec with one entry per name.

  Raises:
    ValueError: if a name has no rule, or two dims map to one mesh axis.
  """
  table: dict[str, MeshAxes] = {}
  for logical, axes in rules:
    table.setdefault(logical, axes)
  entries, seen = [], set()
  for name in names:
    if name is None:
      entries.append(None)
      continue
    if name not in table:
      raise ValueError(f"logical axis {name!r} has no sharding rule "
                       f"(known: {sorted(table)})")
    axes = table[name]
    for a in (axes,) if isinstance(axes, str) else (axes or ()):
      if a in seen:
        raise ValueError(f"names {tuple(names)} map mesh axis {a!r} twice")
      seen.add(a)
    entries.append(tuple(axes) if isinstance(axes, list) else axes)
  return PartitionSpec(*entries)


def param_init(init_fn: Callable[..., jax.Array], names: Names
               ) -> Callable[..., Any]:
  """Annotates a parameter initialiser with logical axis names.

  `nnx.Param(param_init(init, ("embed", "mlp"))(key, shape, dtype))` creates
  a parameter whose variable metadata carries the names.

  Args:
    init_fn: a `jax.nn.initializers`-style `(key, shape, dtype) -> array`.
    names: one logical name (or None) per dim of the parameter.

  Returns:
    The wrapped initialiser (returns `nnx.VariableMetadata`).
  """
  return nnx.with_partitioning(init_fn, tuple(names), eager_sharding=False)


def param_names(variable: Any) -> tuple[str | None, ...] | None:
  """The logical names attached by `param_init`, or None if none."""
  if not isinstance(variable, nnx.Variable):
    return None
  names = variable.get_metadata().get("out_sharding")
  return tuple(names) if names else None


def constrain(x: jax.Array, names: Names) -> jax.Array:
  """Constrains an activation's sharding by logical names.

  A no-op unless a mesh is current (see `use_mesh`), so single-device code
  and tests need no mesh; also a no-op inside `shard_map` (manual axes).

  Args:
    x: the activation, one dim per name.
    names: logical (activation) axis names.

  Returns:
    x, with a sharding constraint when a mesh is active.
  """
  if len(names) != x.ndim:
    raise ValueError(f"names {tuple(names)} do not match rank {x.ndim}")
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or mesh.manual_axes:
    return x   # inside shard_map the arrays are already the local shards
  spec = logical_to_spec(names, _ACTIVE_RULES.get())
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def _is_var(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def path_str(path: Sequence[Any]) -> str:
  """A key path of a params tree as "layers.0.attn.q_proj.kernel"."""
  parts = []
  for k in path:
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        parts.append(str(getattr(k, attr)))
        break
    else:
      parts.append(str(k))
  return ".".join(parts)


def flat_specs(state: Any, rules: Rules = LOGICAL_RULES
               ) -> dict[str, PartitionSpec]:
  """Dotted parameter path -> PartitionSpec (for logging and golden tests).

  Args:
    state: an `nnx.State` (abstract or concrete) or any pytree of Variables.
    rules: logical -> mesh axis rules.

  Returns:
    {"layers.0.attn.q_proj.kernel": PartitionSpec(...), ...}; leaves without
    logical names get `PartitionSpec()` (replicated).
  """
  leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_var)[0]
  out = {}
  for path, leaf in leaves:
    names = param_names(leaf)
    out[path_str(path)] = (logical_to_spec(names, rules) if names
                            else PartitionSpec())
  return out


def state_shardings(state: Any, mesh: Mesh, rules: Rules = LOGICAL_RULES
                    ) -> Any:
  """A pytree of NamedShardings matching `state`, from logical names.

  Args:
    state: an `nnx.State` (e.g. from `nnx.split(nnx.eval_shape(...))`) or
      any pytree; Variables with logical names are sharded per `rules`,
      every other leaf is replicated.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.

  Returns:
    The same structure as `state` with NamedSharding leaves; usable as
    `jax.jit(..., in_shardings=/out_shardings=)` and `jax.device_put`.
  """
  def one(leaf):
    names = param_names(leaf)
    value = leaf.get_value() if _is_var(leaf) else leaf
    ndim = len(getattr(value, "shape", ()))
    if names and len(names) == ndim:
      spec = logical_to_spec(names, rules)
    elif not names or ndim == 0 or (ndim == 1 and names[0] == "layers"):
      # Scalars mapped from a parameter (an optimizer's per-tensor scale)
      # inherit its names with its Variable; they are replicated, and so
      # are the [L] per-layer scales of a layer-stacked parameter.
      spec = PartitionSpec()
    else:
      raise ValueError(f"logical names {names} do not match an array of "
                       f"shape {tuple(value.shape)}")
    if _is_var(leaf):
      return leaf.replace(NamedSharding(mesh, spec))
    return NamedSharding(mesh, spec)
  return jax.tree.map(one, state, is_leaf=_is_var)


def batch_sharding(mesh: Mesh, rules: Rules = LOGICAL_RULES) -> NamedSharding:
  """Sharding for [B, T] model inputs (tokens, targets, segment ids)."""
  return NamedSharding(mesh, logical_to_spec(("act_batch", "act_seq"), rules))


def check_divisible(abstract_params: Any, mesh: Mesh,
                    rules: Rules = LOGICAL_RULES,
                    blocks: dict[str, dict[int, int]] | None = None) -> None:
  """Checks every sharded parameter dim divides by its mesh axes' size.

  Args:
    abstract_params: an `nnx.State` of (abstract or concrete) Variables.
    mesh: the device mesh.
    rules: logical -> mesh axis rules.
    blocks: {param path: {dim: block}} for block-scaled quantization: each
      shard of that dim must hold whole blocks, so that a scale block never
      straddles devices (scales then shard like their values).

  Raises:
    ValueError: naming the parameter path and dim that does not divide.
  """
  leaves = jax.tree_util.tree_flatten_with_path(
      abstract_params, is_leaf=_is_var)[0]
  for path, leaf in leaves:
    names = param_names(leaf)
    if not names:
      continue
    shape = tuple(leaf.shape)
    if len(names) != len(shape):
      raise ValueError(f"param {path_str(path)}: names {names} do not match "
                       f"shape {shape}")
    spec = logical_to_spec(names, rules)
    for dim, axes in enumerate(spec):
      axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
      size = math.prod(mesh.shape[a] for a in axes)
      if shape[dim] % size:
        raise ValueError(
            f"param {path_str(path)} dim {dim} ({names[dim]!r}, size "
            f"{shape[dim]}) is not divisible by mesh axes {axes} "
            f"(size {size})")
      block = (blocks or {}).get(path_str(path), {}).get(dim, 0)
      if block and shape[dim] % block:
        raise ValueError(
            f"param {path_str(path)} dim {dim} ({names[dim]!r}, size "
            f"{shape[dim]}) is not a multiple of the recipe's quantization "
            f"block {block} ({shape[dim]} % {block} = {shape[dim] % block}); "
            f"pick model sizes that are multiples of {block}")
      if block and (shape[dim] // size) % block:
        raise ValueError(
            f"param {path_str(path)} dim {dim}: quantization blocks of "
            f"{block} straddle the {size} shards of mesh axes {axes} "
            f"({shape[dim] // size} elements each); change mesh.* or the "
            f"recipe's block")
