"""Checkpoints of the train state and the data position, and run metadata.

Owns: the orbax CheckpointManager under `<workdir>/checkpoints` (async saves,
keep-N, one save interval), the run description `<workdir>/config.json` and
the check that a restart targets the same model, and the stop-signal flag
that lets the train loop save and exit cleanly (`stop_flag`: SIGTERM,
SIGUSR1, SIGINT and SIGHUP).

Resume order: the latest readable checkpoint in the workdir, else a fresh
init. A step folder counts only when it is a complete checkpoint: orbax's
commit marker (`commit_success.txt`) and every required file present, never
by its name alone (`complete_steps`, used by the "already finished" check,
evaluation and export). A checkpoint that is incomplete or fails to restore
(a truncated or missing file) is reported with its step and file, moved
aside to `<workdir>/checkpoints.broken/` (kept for inspection, never
deleted) and the next older one is tried. A read-only restore
(`restore_state`) tells a step deleted while it was read (a live run's
rotation) from a damaged one. A checkpoint holds two items: "state" (the
TrainState pytree, restored into an abstract target that carries the
shardings, so arrays land already sharded) and "data" (the input iterator's JSON state). Saves are atomic
(orbax writes to a tmp dir and renames), so a kill mid-save leaves the
previous checkpoint as the latest. With several processes the "data" item
holds every process's iterator state (gathered to the writer), and each
process resumes from its own.

Must not import: ml_collections, tensorflow_datasets, grain, or fp4jax.train
/ fp4jax.main.
"""

import contextlib
import json
import logging as logging_std
import os
import re
import signal
import sys
import threading
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils

from fp4jax import data

CONFIG_FILE = "config.json"
CHECKPOINT_DIR = "checkpoints"
BROKEN_DIR = "checkpoints.broken"
# orbax's commit marker: written into a step directory as the last act of a
# save (before the rename into place, on local disks), so a step directory
# without it is a save that never finished, or a folder orbax did not write.
COMMIT_MARKER = "commit_success.txt"
# orbax also stamps the commit time into the step metadata when it commits.
_STEP_METADATA = "_CHECKPOINT_METADATA"
# Files every complete step directory has (orbax layout, one process).
_REQUIRED = (_STEP_METADATA, "state/_METADATA", "state/manifest.ocdbt",
             "data/metadata")


def _committed(step_dir: str) -> bool:
  """Whether orbax committed the save in `step_dir` (its marker or stamp)."""
  if os.path.isfile(os.path.join(step_dir, COMMIT_MARKER)):
    return True
  try:
    with open(os.path.join(step_dir, _STEP_METADATA)) as f:
      return bool(json.load(f).get("commit_timestamp_nsecs"))
  except (OSError, ValueError, AttributeError):
    return False


def incomplete_reason(step_dir: str) -> str | None:
  """Why the step directory is not a complete checkpoint, else None.

  Complete: orbax committed it and none of its required files is missing.
  Reads the directory only (cheap, no array is opened); a damaged array
  file is found only by reading it (`UnreadableCheckpoint`).
  """
  if not os.path.isdir(step_dir):
    return "it is not a directory"
  if not _committed(step_dir):
    return (f"it was never committed (no {COMMIT_MARKER}: a save that did "
            f"not finish, or a folder the checkpointer did not write)")
  for rel in _REQUIRED:
    if not os.path.exists(os.path.join(step_dir, rel)):
      return f"{rel} is missing"
  return None


def step_dirs(workdir: str) -> list[int]:
  """Steps of every all-digit folder under `<workdir>/checkpoints`,
  complete or not, ascending (what orbax would take for checkpoints)."""
  root = os.path.join(workdir, CHECKPOINT_DIR)
  try:
    names = os.listdir(root)
  except (FileNotFoundError, NotADirectoryError):
    return []
  return sorted(int(n) for n in names
                if n.isdigit() and os.path.isdir(os.path.join(root, n)))


def complete_steps(workdir: str) -> list[int]:
  """Steps of the complete checkpoints under `workdir`, ascending.

  Reads the directory only (no orbax manager is created, nothing written).
  A folder counts by its content, never by its name alone: an empty,
  uncommitted or damaged step folder is left out (`incomplete_reason`).
  """
  root = os.path.join(workdir, CHECKPOINT_DIR)
  return [s for s in step_dirs(workdir)
          if incomplete_reason(os.path.join(root, str(s))) is None]


def unreadable_reason(step_dir: str, error: BaseException | None = None
                      ) -> str | None:
  """Why the checkpoint in `step_dir` cannot be read, naming the file.

  None when it is complete and `error` names none of its files (the
  failure is then a mismatch with the model, not damage).
  """
  reason = incomplete_reason(step_dir)
  if reason is not None:
    return reason
  text = str(error or "")
  root = re.escape(step_dir.rstrip("/") + "/")
  for m in re.finditer(root + r"([^\s\"']+)", text):
    rel = m.group(1).rstrip("/\\")
    if rel not in ("state", "data"):   # a file, not an item directory
      detail = text.split(":")[0].strip()
      return f"{rel} is unreadable ({detail})"
  if isinstance(error, (FileNotFoundError, json.JSONDecodeError)):
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}"
  return None


def _files(step_dir: str) -> set[str]:
  """Relative paths of the files under `step_dir` (empty if it is gone)."""
  out = set()
  for root, _, names in os.walk(step_dir):
    out.update(os.path.relpath(os.path.join(root, n), step_dir)
               for n in names)
  return out


def _is_orphaned_read(exc: BaseException | None, tb) -> bool:
  """An "Event loop is closed" raised in asyncio's call_soon_threadsafe."""
  if not (isinstance(exc, RuntimeError) and
          str(exc) == "Event loop is closed"):
    return False
  while tb is not None:
    if tb.tb_frame.f_code.co_name == "call_soon_threadsafe":
      return True
    tb = tb.tb_next
  return False


class _UnretrievedReadErrors(logging_std.Filter):
  """Drops asyncio's "exception was never retrieved" about tensorstore
  reads: the other reads of a failed restore, which fail too (the same
  damage) after orbax stopped listening, and are garbage collected later,
  e.g. in the middle of a resumed run's training."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if not str(record.msg).startswith(("Future exception was never retrieved",
                                       "Task exception was never retrieved")):
      return True
    exc = record.exc_info[1] if record.exc_info else None
    return not (exc is not None and "tensorstore" in str(exc))


_UNRETRIEVED_FILTER = _UnretrievedReadErrors()


def quiet_orphaned_reads() -> None:
  """Drops the noise of the reads a failed restore leaves running.

  When one read of a restore fails, orbax's event loop ends and closes
  while tensorstore still completes the other reads; each completion's
  callback then finds the loop closed and Python prints that
  "RuntimeError: Event loop is closed" through sys.unraisablehook (tens to
  hundreds of tracebacks, before and after the program's own error line).
  The reads' results are unwanted anyway, so exactly those are dropped, and
  asyncio's later "exception was never retrieved" about them
  (`_UnretrievedReadErrors`); every other unraisable error still goes to
  the hook that was there and every other asyncio record is logged.
  Called before each restore, since the callbacks may fire before the
  failure reaches our code, and since a harness (pytest) may have swapped
  the hook in the meantime.
  """
  current = sys.unraisablehook
  if not getattr(current, "drops_orphaned_reads", False):

    def hook(unraisable):
      if not _is_orphaned_read(unraisable.exc_value,
                               unraisable.exc_traceback):
        current(unraisable)

    hook.drops_orphaned_reads = True
    sys.unraisablehook = hook
  asyncio_logger = logging_std.getLogger("asyncio")
  if _UNRETRIEVED_FILTER not in asyncio_logger.filters:
    asyncio_logger.addFilter(_UNRETRIEVED_FILTER)
  # The abandoned reads also leave coroutines of the checkpoint library that
  # were never awaited; Python warns about each at exit ("sys:1:
  # RuntimeWarning: coroutine 'Store._get_array_metadatas' was never
  # awaited", seen under load). fp4jax has no coroutines of its own.
  warnings.filterwarnings("ignore", message=r"coroutine '.*' was never awaited",
                          category=RuntimeWarning)


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


def _raise_restore_error(step: int, step_dir: str, error: Exception,
                         mismatch_text: str, mismatch: tuple[type, ...],
                         files_before: set[str] | None = None):
  """Re-raises a failed restore of `step_dir`: CheckpointRemoved when files
  it had before the read (`files_before`) are gone, UnreadableCheckpoint
  when a file is damaged, a one-line ValueError "checkpoint step S
  <mismatch_text>: <first line>" for the `mismatch` kinds, else the error
  itself."""
  if files_before is not None and not files_before <= _files(step_dir):
    raise CheckpointRemoved(step) from error
  reason = unreadable_reason(step_dir, error)
  if reason is not None:
    raise UnreadableCheckpoint(step, reason) from error
  if not isinstance(error, mismatch):
    raise error
  text = str(error).strip()
  first = text.splitlines()[0] if text else repr(error)
  raise ValueError(f"checkpoint step {step} {mismatch_text}: {first}"
                   ) from error


class UnreadableCheckpoint(ValueError):
  """A checkpoint whose files are damaged or missing (not a model mismatch)."""

  def __init__(self, step: int, reason: str):
    super().__init__(f"checkpoint step {step} is unreadable: {reason}")
    self.step, self.reason = step, reason


class CheckpointRemoved(ValueError):
  """A checkpoint that was deleted while it was being read.

  The usual cause is a run still training in the workdir: its
  keep_checkpoints rotation deletes the oldest step after each save.
  """

  def __init__(self, step: int):
    super().__init__(f"checkpoint step {step} was deleted while it was being "
                     f"read (by a run still using the workdir? its "
                     f"keep_checkpoints rotation removes old steps)")
    self.step = step


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
      this process's data iterator state (`data.process_state`: every
      process's when they were another number).

    Raises:
      ValueError: no checkpoint, or one that does not fit the target.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise ValueError(f"no checkpoint in {self.directory}")
    args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                              data=ocp.args.JsonRestore())
    quiet_orphaned_reads()
    try:
      out = self._manager.restore(step, args=args)
    except Exception as e:  # orbax / tensorstore raise many kinds
      _raise_restore_error(step, os.path.join(self.directory, str(step)), e,
                           f"in {self.directory} does not match the model "
                           f"being built", mismatch=(ValueError, KeyError,
                                                     TypeError))
    return out.state, data.process_state(
        out.data["processes"], jax.process_index(), jax.process_count())

  def restore_latest(self, abstract_state: Any, *,
                     defer_set_aside: bool = False
                     ) -> tuple[int, Any, dict[str, Any]] | None:
    """(step, state, data_state) of the newest readable checkpoint, or None.

    A step folder counts by its content, not its name: one that is not a
    complete checkpoint (empty, never committed, a required file missing)
    or fails to read is logged as an error naming its step and file, moved
    to `<workdir>/checkpoints.broken/<step>` (so the run's next save at
    that step is not skipped, and the files stay for inspection), and the
    next older one is tried. Incomplete folders older than the one resumed
    from are moved there too, so the keep-N rotation never deletes them.
    With `defer_set_aside` nothing is moved until `set_aside_deferred()`
    (a start that may still fail restores before it writes anything).

    Raises:
      ValueError: checkpoints exist but none is readable (naming each), or
        the newest readable one does not match the model.
    """
    folders = sorted(self._manager.all_steps(), reverse=True)
    incomplete = {s: incomplete_reason(os.path.join(self.directory, str(s)))
                  for s in folders}
    broken = []
    for step in folders:
      try:
        if incomplete[step] is not None:
          raise UnreadableCheckpoint(step, incomplete[step])
        state, data_state = self.restore(abstract_state, step)
      except UnreadableCheckpoint as e:
        broken.append(e)
        logging.error("checkpoint step %d is unreadable: %s; trying an older "
                      "one", step, e.reason)
        continue
      older = [s for s in folders if s < step and incomplete[s] is not None]
      for s in older:
        logging.error("checkpoint step %d is not a complete checkpoint: %s; "
                      "moved to %s", s, incomplete[s], self._broken_dir())
      if broken or older:
        self._deferred = [e.step for e in broken] + older
        if not defer_set_aside:
          self.set_aside_deferred()
      if broken:
        logging.error("RESUMED FROM AN OLDER CHECKPOINT: step %d (newer %s "
                      "unreadable, kept in %s)", step,
                      ", ".join(f"step {e.step}" for e in broken),
                      self._broken_dir())
      return step, state, data_state
    if broken:
      raise ValueError(f"no readable checkpoint in {self.directory}: " +
                       "; ".join(f"step {e.step}: {e.reason}" for e in broken)
                       + "; use a new --workdir or move them away to start "
                       "fresh")
    return None

  def set_aside_deferred(self) -> None:
    """Moves the folders a `restore_latest(defer_set_aside=True)` skipped."""
    steps, self._deferred = getattr(self, "_deferred", []), []
    if steps:
      self._set_aside(steps)

  def _broken_dir(self) -> str:
    return os.path.join(os.path.dirname(self.directory), BROKEN_DIR)

  def _set_aside(self, steps: list[int]) -> None:
    if jax.process_index() == 0:
      os.makedirs(self._broken_dir(), exist_ok=True)
      for step in steps:
        target = os.path.join(self._broken_dir(), str(step))
        n = 1
        while os.path.exists(target):    # broken twice at one step
          target = os.path.join(self._broken_dir(), f"{step}.{n}")
          n += 1
        os.replace(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices("checkpoint_set_aside")
    self._manager.reload()

  def wait(self) -> None:
    """Blocks until pending async saves are on disk."""
    self._manager.wait_until_finished()

  def close(self) -> None:
    """Finishes pending saves and releases the manager."""
    self._manager.wait_until_finished()
    self._manager.close()


def restore_state(workdir: str, step: int, abstract_state: Any) -> Any:
  """The TrainState of one complete step, read-only (evaluation, export).

  `step` is one `complete_steps` listed: if its folder is gone, it was
  deleted since.

  Unlike `Checkpointer`, creates no manager: nothing under the workdir is
  cleaned up or written, so a live run's saves in progress are safe.

  Raises:
    UnreadableCheckpoint: the step is not a complete checkpoint, or its
      files are damaged (naming the file).
    CheckpointRemoved: the step was deleted while being read.
    ValueError: the checkpoint does not match `abstract_state`.
  """
  step_dir = os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR, str(step))
  # What the folder held before the read: a file gone after a failed read
  # means it was deleted meanwhile (a live run's rotation), not damaged.
  before = _files(step_dir)
  quiet_orphaned_reads()
  try:
    if not before and not os.path.isdir(step_dir):
      # Listed complete by the caller a moment ago, gone now.
      raise CheckpointRemoved(step)
    reason = incomplete_reason(step_dir)
    if reason is not None:
      raise UnreadableCheckpoint(step, reason)
    with ocp.StandardCheckpointer() as ckptr:
      return ckptr.restore(os.path.join(step_dir, "state"), abstract_state)
  except UnreadableCheckpoint:
    if not before <= _files(step_dir):
      raise CheckpointRemoved(step) from None
    raise
  except CheckpointRemoved:
    raise
  except Exception as e:  # orbax / tensorstore raise many kinds
    _raise_restore_error(step, step_dir, e, f"in {step_dir} does not match "
                         f"the run's config.json", mismatch=(Exception,),
                         files_before=before)


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


def check_run_info(workdir: str, info: dict[str, Any],
                   execution_fields: Sequence[str] = ()) -> None:
  """Checks that `workdir` was not started with a different model.

  `info` is the run description: {"model": {LlamaConfig fields}, "quant":
  {...}, ...}, JSON-able. A different "model" is an error (its checkpoints
  would not restore, or would silently mean something else); any other
  difference (recipe, optimizer, data) is logged, since changing them on a
  restart is legitimate (e.g. finishing an FP4 run in bf16).

  Args:
    workdir: the run directory.
    info: the description of the run about to start.
    execution_fields: "model" keys that say how the model runs, not what
      it computes (remat, attention kernel): ignored on both sides, so an
      older config.json that recorded them still matches.

  Raises:
    ValueError: one line naming the first mismatching model field.
  """
  if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
    return
  saved = read_run_info(workdir)
  current = json.loads(json.dumps(info))   # tuples -> lists, like the file
  def identity(model):
    return {k: v for k, v in model.items() if k not in execution_fields}
  model_diff = _diff(identity(saved.get("model", {})),
                     identity(current["model"]), "model.")
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


def read_run_info(workdir: str) -> dict[str, Any]:
  """The run description in `<workdir>/config.json`.

  Raises:
    ValueError: one line naming the file when it is not a JSON object.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  try:
    with open(path) as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{path} is corrupt ({type(e).__name__}: "
                     f"{str(e).splitlines()[0]}); restore it from a backup "
                     f"or use a new --workdir") from None
  if not isinstance(saved, dict):
    raise ValueError(f"{path} is corrupt: not a JSON object")
  return saved


def write_run_info(workdir: str, info: dict[str, Any]) -> None:
  """Writes `<workdir>/config.json` unless it exists (first start only)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if jax.process_index() != 0 or os.path.exists(path):
    return
  os.makedirs(workdir, exist_ok=True)
  tmp = path + ".tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(info, f, indent=2, sort_keys=True)
    os.replace(tmp, path)
  except OSError:   # a full disk: no partial file stays behind
    if os.path.lexists(tmp):
      os.remove(tmp)
    raise


class StopFlag(threading.Event):
  """Set by a stop signal; `signum` says which (None while unset)."""

  signum: int | None = None


# The signals a run stops on, saving first: SIGTERM (schedulers' preemption
# notice), SIGUSR1 (the notice a batch script asks for before its time
# limit, docs/launch/paper.sbatch: its own signal, so the script can tell
# "stopped for the time limit, requeue" (exit 138) from a preemption or
# scancel (SIGTERM, exit 143)), SIGINT (Ctrl-C) and SIGHUP (its terminal or
# ssh session closed, whose default would kill the run unsaved). A SIGHUP
# already ignored when the block starts (`nohup`) stays ignored: the user
# asked to survive it.
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT, signal.SIGHUP)


@contextlib.contextmanager
def stop_flag() -> Iterator[StopFlag]:
  """Within the block, SIGTERM / SIGUSR1 / SIGINT / SIGHUP set the yielded
  flag instead of killing.

  The train loop polls the flag, saves a checkpoint and stops. A second
  SIGINT while the flag is set aborts at once (KeyboardInterrupt: Ctrl-C
  twice). Only the main thread can install signal handlers; elsewhere the
  flag is returned but never set.

  Yields:
    A StopFlag, set (with its signum) when a stop signal arrives.
  """
  flag = StopFlag()
  if threading.current_thread() is not threading.main_thread():
    yield flag
    return

  def handler(signum, frame):
    del frame
    if flag.is_set() and signum == signal.SIGINT:
      raise KeyboardInterrupt
    logging.warning("%s: saving a checkpoint and stopping (Ctrl-C again to "
                    "abort at once)", signal.Signals(signum).name)
    flag.signum = flag.signum or signum
    flag.set()

  previous = {s: signal.signal(s, handler) for s in STOP_SIGNALS
              if not (s == signal.SIGHUP and
                      signal.getsignal(s) == signal.SIG_IGN)}
  try:
    yield flag
  finally:
    for s, h in previous.items():
      signal.signal(s, h)
