"""A checkpoint's stored layout against the state a start builds.

Owns: what a checkpoint step stores, read without restoring an array (each
leaf's shape and dtype from orbax's metadata, and this process's data
position); the check, before anything compiles or is written, that a
start can resume from that step (`check`); the restore target that reads
every leaf in the dtype it was stored in (`target`); and the conversion of
the restored state into the layout of this start (`convert`).

A resume may change settings that change how the state is stored:

  optim.moments  Adam's m and v: decoded with their stored per-tensor scales
                 and encoded again with fresh ones
                 (`optim.reencode_moments`). Restoring straight into the new
                 dtypes would cast without the scales and flush most of an
                 FP8 m to zero.
  optim.master   the weight matrices: rounded to nearest into the new
                 dtype, as `optim.cast_master` does at init (refused if a
                 weight does not fit it).
  prng_impl      the run key: the implementations' keys are different
                 bits, so this is refused in one line naming the key.
  model.scan_layers
                 the layers' parameters and optimizer state: one leaf per
                 layer ("params.layers.3.attn.q_proj.kernel") or stacked on
                 a leading layer axis ("params.layers.attn.q_proj.kernel",
                 per-tensor scales [L]); stacked or split exactly (values
                 unchanged). Reading a checkpoint of the other layout needs
                 that layout's abstract state as the restore target
                 (`target`'s `other`); `stored_stacked` says which it is.

Any other difference (a leaf's shape, a leaf no setting explains) means
another model: refused in one line naming the leaf.

Must not import: ml_collections, tensorflow_datasets, grain, or fp4jax
modules other than fp4jax.checkpoint and fp4jax.optim.
"""

import os
import re
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from fp4jax import checkpoint
from fp4jax import data
from fp4jax import optim
from fp4jax import sharding

# Leaves whose dtype a setting changes, and how they are converted.
_MOMENT = re.compile(r"opt_state\.\d+\.(mu|nu)\.")
_PARAM = re.compile(r"params\.")
# Key-data words of the jax PRNG implementations (rbg and unsafe_rbg share
# a shape; their keys differ in how they are used, not in size).
_KEY_WORDS = {2: "threefry2x32", 4: "rbg or unsafe_rbg"}
# A leaf of one layer ("<tree>.layers.<i>.<rest>") and of the stacked
# layers ("<tree>.layers.<rest>", rest not starting with a digit).
_PER_LAYER = re.compile(r"^(.*?\blayers)\.(\d+)\.(.+)$")
_STACKED = re.compile(r"^(.*?\blayers)\.(\D.*)$")




def _step_dir(workdir: str, step: int) -> str:
  return os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR,
                      str(step))


def _unreadable(step: int, item: str, e: Exception
                ) -> checkpoint.UnreadableCheckpoint:
  """The one-line error for `item` of checkpoint `step` failing to read."""
  text = str(e).strip()
  return checkpoint.UnreadableCheckpoint(
      step, f"{item} is unreadable ({type(e).__name__}: "
      f"{text.splitlines()[0] if text else ''})")


def stored_leaves(workdir: str, step: int
                  ) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{leaf name: (shape, dtype)} of checkpoint `step`'s "state" item.

  Reads orbax's metadata only (no array, nothing written). A typed PRNG
  key is stored as its key data (uint32 words).

  Raises:
    checkpoint.UnreadableCheckpoint: the metadata is missing or damaged.
  """
  path = os.path.join(_step_dir(workdir, step), "state")
  checkpoint.quiet_orphaned_reads()
  handler = ocp.StandardCheckpointHandler()
  try:
    meta = handler.metadata(epath.Path(path))
  except Exception as e:  # orbax / tensorstore raise many kinds
    raise _unreadable(step, "state/_METADATA", e) from None
  finally:
    handler.close()
  return {m.name: (tuple(m.shape), np.dtype(m.dtype))
          for m in jax.tree.leaves(meta)}


def stored_data_state(workdir: str, step: int) -> dict[str, Any]:
  """This process's input-iterator state in checkpoint `step` (read-only).

  Raises:
    checkpoint.UnreadableCheckpoint: the data item is missing or damaged.
    ValueError: it was written by another number of processes.
  """
  path = os.path.join(_step_dir(workdir, step), "data")
  checkpoint.quiet_orphaned_reads()
  handler = ocp.JsonCheckpointHandler()
  try:
    item = handler.restore(epath.Path(path), args=ocp.args.JsonRestore())
    states = item["processes"]
  except Exception as e:  # orbax raises many kinds
    raise _unreadable(step, "data/metadata", e) from None
  finally:
    handler.close()
  return data.process_state(states, jax.process_index(), jax.process_count())


def _stored_view(leaf: Any) -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) a leaf of an abstract state is stored as."""
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    data = jax.eval_shape(jax.random.key_data, leaf)
    return tuple(data.shape), np.dtype(data.dtype)
  return tuple(leaf.shape), np.dtype(leaf.dtype)


def _names(abstract: Any) -> list[tuple[str, Any]]:
  return [(sharding.path_str(p), leaf) for p, leaf in
          jax.tree_util.tree_flatten_with_path(abstract)[0]]


def leaf_names(state: Any) -> list[str]:
  """The names `stored_leaves` gives a state's leaves."""
  return [n for n, _ in _names(state)]


def stored_stacked(names: Any) -> bool | None:
  """Whether leaf names (a `stored_leaves` dict, or any iterable of names)
  hold the layers stacked (True), one per layer (False), or no layers."""
  for name in names:
    if name.startswith("params.layers."):
      return not name.split(".")[2].isdigit()
  return None


def _in_layout(stored: dict[str, tuple[tuple[int, ...], np.dtype]],
               stacked: bool) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """`stored` as the leaves it becomes in the other layer layout (names and
  shapes); itself when it is in `stacked`'s layout already. Layers whose
  leaves disagree in shape or dtype, or whose indices have gaps, stack
  to an impossible shape (-1,), which `check` then names."""
  if stored_stacked(stored) in (None, stacked):
    return stored
  out = {}
  if not stacked:
    for name, (shape, dtype) in stored.items():
      m = _STACKED.match(name)
      if m is None or not shape:
        out[name] = (shape, dtype)
        continue
      for i in range(shape[0]):
        out[f"{m[1]}.{i}.{m[2]}"] = (tuple(shape[1:]), dtype)
    return out
  groups: dict[str, list[tuple[int, tuple[int, ...], np.dtype]]] = {}
  for name, (shape, dtype) in stored.items():
    m = _PER_LAYER.match(name)
    if m is None:
      out[name] = (shape, dtype)
    else:
      groups.setdefault(f"{m[1]}.{m[3]}", []).append(
          (int(m[2]), tuple(shape), dtype))
  for name, layers in groups.items():
    layers.sort()
    _, shape, dtype = layers[0]
    whole = ([i for i, _, _ in layers] == list(range(len(layers))) and
             all((s, d) == (shape, dtype) for _, s, d in layers))
    out[name] = ((len(layers), *shape) if whole else (-1,), dtype)
  return out


def _relayout(state: Any, abstract: Any) -> Any:
  """`state` (one layer layout) with `abstract`'s structure (the other):
  stacked leaves gathered from the per-layer ones, or sliced out of them.
  Traceable; values unchanged."""
  named = dict(_names(state))
  leaves = []
  for name, leaf in _names(abstract):
    if name in named:
      leaves.append(named[name])
      continue
    m = _STACKED.match(name)
    if m is not None:
      leaves.append(jnp.stack([named[f"{m[1]}.{i}.{m[2]}"]
                               for i in range(leaf.shape[0])]))
    else:
      m = _PER_LAYER.match(name)
      leaves.append(named[f"{m[1]}.{m[3]}"][int(m[2])])
  return jax.tree.unflatten(jax.tree.structure(abstract), leaves)


def check(stored: dict[str, tuple[tuple[int, ...], np.dtype]],
          abstract: Any, *, step: int, where: str) -> list[str]:
  """Checks that checkpoint `step` (its `stored_leaves`) can become
  `abstract`; returns one line per conversion it needs ([] = none).

  Args:
    stored: `stored_leaves` of the step.
    abstract: the TrainState of ShapeDtypeStructs this start builds.
    step: the step (for messages).
    where: the checkpoints directory (for messages).

  Raises:
    ValueError: one line naming the leaf or config key that differs in a
      way no conversion covers.
  """
  needed: dict[str, set[str]] = {}
  stacked = stored_stacked(n for n, _ in _names(abstract))
  relaid = stacked is not None and stored_stacked(stored) not in (None,
                                                                  stacked)
  if relaid:
    stored = _in_layout(stored, stacked)
    needed["model.scan_layers"] = {
        "the layers stacked on a leading layer axis (saved one per layer)"
        if stacked else "the layers one per layer (saved stacked)"}
  for name, leaf in _names(abstract):
    want_shape, want_dtype = _stored_view(leaf)
    if name not in stored:
      raise ValueError(f"checkpoint step {step} in {where} does not match the "
                       f"model being built: it has no {name}; use a new "
                       f"--workdir")
    shape, dtype = stored[name]
    if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
      if shape != want_shape:
        words = shape[-1] if shape else 0
        now = jax.config.jax_default_prng_impl
        raise ValueError(
            f"prng_impl: checkpoint step {step} in {where} holds a "
            f"{_KEY_WORDS.get(words, f'{words}-word')} run key, this start "
            f"uses {now}; rerun with --config.prng_impl="
            f"{_KEY_WORDS.get(words, '...').split()[0]} to resume it")
      continue
    if shape != want_shape:
      raise ValueError(f"checkpoint step {step} in {where} does not match the "
                       f"model being built: {name} is {shape} there, "
                       f"{want_shape} now; use a new --workdir")
    if dtype == want_dtype:
      continue
    both_float = (jnp.issubdtype(dtype, jnp.floating) and
                  jnp.issubdtype(want_dtype, jnp.floating))
    key = ("optim.moments" if _MOMENT.match(name) else
           "optim.master" if _PARAM.match(name) else None)
    if key is None or not both_float:
      raise ValueError(f"checkpoint step {step} in {where}: {name} is stored "
                       f"as {dtype}, this start needs {want_dtype}, and no "
                       f"conversion between them is known; resume with the "
                       f"settings it was saved with")
    what = name.split(".")[2] if key == "optim.moments" else "weights"
    needed.setdefault(key, set()).add(f"{what} {dtype} -> {want_dtype}")
  extra = sorted(set(stored) - {n for n, _ in _names(abstract)})
  if extra:
    raise ValueError(f"checkpoint step {step} in {where} does not match the "
                     f"model being built: it holds {extra[0]}, which this "
                     f"model has not; use a new --workdir")
  how = {"optim.moments": "decoded and re-encoded with fresh per-tensor "
                          "scales",
         "optim.master": "rounded to nearest",
         "model.scan_layers": "values unchanged"}
  return [f"{key}: {', '.join(sorted(v))} ({how[key]})"
          for key, v in sorted(needed.items())]


def target(abstract: Any,
           stored: dict[str, tuple[tuple[int, ...], np.dtype]],
           other: Callable[[], Any] | None = None) -> Any:
  """`abstract` with each float leaf in the dtype `stored` holds it in
  (the restore target: nothing is cast while reading).

  Args:
    abstract: the TrainState of ShapeDtypeStructs this start builds.
    stored: `stored_leaves` of the step.
    other: () -> the same start's abstract TrainState in the other layer
      layout (model.scan_layers flipped): called only when `stored` is in
      that layout, whose state is then the target (`convert` restacks).
  """
  mine = stored_stacked(n for n, _ in _names(abstract))
  if stored_stacked(stored) not in (None, mine):
    if other is None:
      raise ValueError("recast.target: the checkpoint's layers are laid out "
                       "the other way; pass the other layout's state")
    abstract = other()

  def one(path, leaf):
    name = sharding.path_str(path)
    if (jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key) or
        name not in stored):
      return leaf
    return jax.ShapeDtypeStruct(leaf.shape, stored[name][1],
                                sharding=leaf.sharding)
  return jax.tree_util.tree_map_with_path(one, abstract)


def convert(state: Any, abstract: Any) -> Any:
  """The restored `state` in the layout of `abstract` (see the module
  docstring); `state` itself when the dtypes already agree.

  Raises:
    ValueError: naming optim.master when a weight does not fit the new
      master dtype, or prng_impl when the run key's implementation
      differs.
  """
  relaid = (stored_stacked(n for n, _ in _names(state)) !=
            stored_stacked(n for n, _ in _names(abstract)))
  if state.rng.dtype != abstract.rng.dtype:
    raise ValueError(f"prng_impl: the checkpoint's run key is "
                     f"{state.rng.dtype}, this start uses "
                     f"{abstract.rng.dtype}; rerun with the prng_impl it was "
                     f"saved with")
  if not relaid and all(s.dtype == a.dtype for s, a in
                       zip(jax.tree.leaves(state), jax.tree.leaves(abstract))):
    return state

  def moment_dtypes(opt):
    return (jax.tree.leaves(opt.mu)[0].dtype, jax.tree.leaves(opt.nu)[0].dtype)

  def fn(state):
    if relaid:
      state = _relayout(state, abstract)
    opt = tuple(
        optim.reencode_moments(s, *moment_dtypes(a))
        if isinstance(s, optim.AdamMPState) and
        moment_dtypes(s) != moment_dtypes(a) else s
        for s, a in zip(state.opt_state, abstract.opt_state))
    old = jax.tree.leaves(state.params)
    params = jax.tree.map(lambda p, a: p.astype(a.dtype), state.params,
                          abstract.params)
    # A finite weight the new dtype cannot hold (|w| > 65504 in fp16).
    lost = sum(jnp.sum(jnp.isfinite(o) & ~jnp.isfinite(n))
               for o, n in zip(old, jax.tree.leaves(params)))
    return state.replace(params=params, opt_state=opt), lost

  shardings = jax.tree.map(lambda a: a.sharding, abstract)
  out, lost = jax.jit(fn, out_shardings=(shardings, abstract.step.sharding)
                      )(state)
  lost = int(np.asarray(lost.addressable_shards[0].data))
  if lost:
    dtype = next(a.dtype for a in jax.tree.leaves(abstract.params)
                 if len(a.shape) >= 2)
    raise ValueError(f"optim.master: {lost} weights of the checkpoint "
                     f"do not fit {dtype}; resume with the master dtype it "
                     f"was saved with")
  return out
