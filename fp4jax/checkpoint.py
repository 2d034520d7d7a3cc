"""Checkpoints of the train state and the data position, and run metadata.

Owns: the orbax CheckpointManager under `<workdir>/checkpoints` (async saves,
keep-N, one save interval), the run description `<workdir>/config.json` and
the check that a restart targets the same model, and the SIGTERM flag that
lets the train loop save and exit cleanly.

Resume order: the latest complete checkpoint in the workdir, else a fresh
init. A checkpoint holds two items: "state" (the TrainState pytree, restored
into an abstract target that carries the shardings, so arrays land already
sharded) and "data" (the input iterator's JSON state). Saves are atomic
(orbax writes to a tmp dir and renames), so a kill mid-save leaves the
previous checkpoint as the latest. With several processes the "data" item
holds every process's iterator state (gathered to the writer), and each
process resumes from its own.

Must not import: ml_collections, tensorflow_datasets, grain, or fp4jax.train
/ fp4jax.main.
"""

import contextlib
import json
import os
import signal
import threading
from collections.abc import Iterator
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"


def _gather_json(obj: Any) -> list[Any]:
  """Every process's JSON-able `obj`, in process order (a collective)."""
  if jax.process_count() == 1:
    return [obj]
  raw = np.frombuffer(json.dumps(obj).encode(), np.uint8)
  size = int(np.max(multihost_utils.process_allgather(np.int32(raw.size))))
  padded = np.zeros(size, np.uint8)
  padded[:raw.size] = raw
  rows = multihost_utils.process_allgather(padded)        # [P, size]
  return [json.loads(bytes(row).rstrip(b"\0")) for row in rows]


class Checkpointer:
  """Saves and restores (TrainState, data state) pairs under a workdir."""

  def __init__(self, workdir: str, *, every: int, keep: int,
               async_save: bool = True):
    """Opens (or creates) `<workdir>/checkpoints`.

    Args:
      workdir: the run directory.
      every: save interval in steps (save() with force=False skips others).
      keep: number of most recent checkpoints kept.
      async_save: write in a background thread after the device-to-host copy
        (which save() does before returning, so the caller may then donate
        or overwrite the state's buffers).

    Raises:
      ValueError: naming checkpoint_every / keep_checkpoints if < 1.
    """
    if every < 1:
      raise ValueError(f"checkpoint_every must be >= 1, got {every}")
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be >= 1, got {keep}")
    self.directory = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)
    self.every = every
    # The interval is applied here (orbax's policy would also save the first
    # step of a run); orbax keeps the newest `keep`.
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest complete checkpoint's step, or None."""
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    """Steps of all complete checkpoints, ascending."""
    return sorted(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict[str, Any], *,
           force: bool = False) -> bool:
    """Saves if `step` is on the interval (or `force`); returns if it did.

    Args:
      step: the number of optimizer steps `state` has taken.
      state: the TrainState (sharded jax arrays).
      data_state: the input iterator's `get_state()` after `step` batches.
      force: save even off the interval (end of run, preemption).
    """
    if step % self.every and not force:
      return False
    if step in self._manager.all_steps():
      return False  # already saved at this step (e.g. end == interval)
    data_item = {"processes": _gather_json(data_state)}
    args = ocp.args.Composite(state=ocp.args.StandardSave(state),
                              data=ocp.args.JsonSave(data_item))
    saved = self._manager.save(step, args=args, force=True)
    if saved:
      logging.info("checkpoint: saving step %d to %s", step, self.directory)
    return saved

  def restore(self, abstract_state: Any, step: int | None = None
              ) -> tuple[Any, dict[str, Any]]:
    """Restores (state, data_state) at `step` (default: the latest).

    Args:
      abstract_state: pytree of `jax.ShapeDtypeStruct` with `.sharding`,
        shaped like the saved TrainState.
      step: which checkpoint; None = latest.

    Returns:
      The restored TrainState (arrays placed per the target shardings) and
      this process's data iterator state.

    Raises:
      ValueError: no checkpoint, one that does not fit the target, or one
        written by a different number of processes.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {self.directory}")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    try:
      out = self._manager.restore(step, args=args)
    except (ValueError, KeyError, TypeError) as e:
      first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
      raise ValueError(f"checkpoint step {step} in {self.directory} does not "
                       f"match the model being built: {first}") from e
    states = out.data["processes"]
    if len(states) != jax.process_count():
      raise ValueError(f"checkpoint step {step} in {self.directory} was "
                       f"written by {len(states)} processes, now "
                       f"{jax.process_count()}; the data position cannot be "
                       f"split differently")
    return out.state, dict(states[jax.process_index()])

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def _diff(saved: dict[str, Any], current: dict[str, Any], prefix: str
          ) -> list[str]:
  """Dotted keys whose values differ between two nested dicts."""
  out = []
  for key in sorted(set(saved) | set(current)):
    a, b = saved.get(key), current.get(key)
    if isinstance(a, dict) and isinstance(b, dict):
      out += _diff(a, b, f"{prefix}{key}.")
    elif a != b:
      out.append(f"{prefix}{key}")
  return out


def check_run_info(workdir: str, info: dict[str, Any]) -> None:
  """Checks that `workdir` was not started with a different model.

  `info` is the run description: {"model": {LlamaConfig fields}, "quant":
  {...}, ...}, JSON-able. A different "model" is an error (its checkpoints
  would not restore, or would silently mean something else); any other
  difference (recipe, optimizer, data) is logged, since changing them on a
  restart is legitimate (e.g. finishing an FP4 run in bf16).

  Args:
    workdir: the run directory.
    info: the description of the run about to start.

  Raises:
    ValueError: one line naming the first mismatching model field.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    saved = json.load(f)
  current = json.loads(json.dumps(info))   # tuples -> lists, like the file
  model_diff = _diff(saved.get("model", {}), current["model"], "model.")
  if model_diff:
    key = model_diff[0]
    field = key.split(".", 1)[1]
    raise ValueError(
        f"workdir {workdir} holds a run of a different model: {key} is "
        f"{saved.get('model', {}).get(field)!r} there but "
        f"{current['model'].get(field)!r} now; use a new --workdir")
  other = [k for k in _diff(saved, current, "") if not k.startswith("model.")]
  if other:
    logging.warning("resuming %s with changed settings: %s", workdir,
                    ", ".join(other))


def write_run_info(workdir: str, info: dict[str, Any]) -> None:
  """Writes `<workdir>/config.json` unless it exists (first start only)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if jax.process_index() != 0 or os.path.exists(path):
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(info, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


@contextlib.contextmanager
def sigterm_flag() -> Iterator[threading.Event]:
  """Within the block, SIGTERM sets the yielded event instead of killing.

  The train loop polls the event, saves a checkpoint and returns. Only the
  main thread can install signal handlers; elsewhere the event is returned
  but never set.

  Yields:
    A threading.Event set when SIGTERM arrives.
  """
  flag = threading.Event()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    logging.warning("signal %d: saving a checkpoint and stopping", signum)
    flag.set()

  previous = signal.signal(signal.SIGTERM, handler)
  try:
    yield flag
  finally:
    signal.signal(signal.SIGTERM, previous)
