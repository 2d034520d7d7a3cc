"""What each step range of a run was trained with, and what it reached.

Owns: the history of a workdir's starts (`<workdir>/starts.jsonl`), the
effective config a checkpoint step was trained with (`config_at_step`,
used by evaluation and export), and the check that a run which reached a
step still has a checkpoint (`check_checkpoints_present`).

`config.json` keeps the first start's run description. Every start that
trains appends one record to `starts.jsonl`:

  {"step": S, "changed": {dotted config key: new value, ...},
   "time": ISO time, "prng_impl": the run key's implementation}

S is the checkpoint step it resumed from (0 for a fresh start) and
"changed" lists the keys whose values differ from the config that step
was trained with (e.g. {"quant.recipe": "bf16"} when an FP4 run is
finished in BF16). Start k trains steps S_k + 1, S_k + 2, ..., so the
checkpoint of step T was written by the last start (in file order) with
S_k < T; its config is the config of step S_k with start k's changes
applied, down to config.json's for step 0. A workdir from before this
record has no `starts.jsonl`: its steps all map to config.json.

The file is rewritten whole (write to a temporary file, then rename), so a
kill never leaves a torn record.

Must not import: jax, ml_collections, or fp4jax modules other than
fp4jax.checkpoint, fp4jax.metrics and fp4jax.diskspace.
"""

import copy
import datetime
import json
import os
from typing import Any

from fp4jax import checkpoint
from fp4jax import diskspace
from fp4jax import metrics as metrics_lib

STARTS_FILE = "starts.jsonl"


def read_starts(workdir: str) -> list[dict[str, Any]]:
  """The start records of `workdir`, oldest first ([] if there are none).

  Raises:
    ValueError: one line naming the file when a line is not a record.
  """
  path = os.path.join(workdir, STARTS_FILE)
  try:
    with open(path, encoding="utf-8") as f:
      lines = f.read().splitlines()
  except FileNotFoundError:
    return []
  out = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      ok = (isinstance(record, dict) and isinstance(record.get("step"), int)
            and isinstance(record.get("changed"), dict))
    except ValueError:
      ok = False
    if not ok:
      raise ValueError(f"{path} line {number} is not a start record; "
                       f"restore it from a backup or use a new --workdir")
    out.append(record)
  return out


def flat_keys(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a.b": 1}: every leaf of a config dict."""
  out = {}
  for key, value in config.items():
    if isinstance(value, dict) and value:
      out.update(flat_keys(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def changed_keys(before: dict[str, Any], after: dict[str, Any]
                 ) -> dict[str, Any]:
  """{dotted key: value in `after`} of the leaves that differ (a key
  missing from `after` maps to None)."""
  a, b = flat_keys(before), flat_keys(after)
  return {k: b.get(k) for k in sorted(set(a) | set(b))
          if a.get(k) != b.get(k)}


def _apply(config: dict[str, Any], changed: dict[str, Any]
           ) -> dict[str, Any]:
  out = copy.deepcopy(config)
  for key, value in changed.items():
    node, parts = out, key.split(".")
    for part in parts[:-1]:
      if not isinstance(node.get(part), dict):
        node[part] = {}
      node = node[part]
    node[parts[-1]] = value
  return out


def _config_at(base: dict[str, Any], starts: list[dict[str, Any]],
               step: int, upto: int) -> dict[str, Any]:
  """The config of step `step` as the first `upto` starts left it."""
  for i in reversed(range(upto)):
    if starts[i]["step"] < step:
      before = _config_at(base, starts, starts[i]["step"], i)
      return _apply(before, starts[i]["changed"])
  return copy.deepcopy(base)


def config_at_step(workdir: str, step: int) -> dict[str, Any]:
  """The run config (config.json's "config" layout) checkpoint `step` of
  `workdir` was trained with: the first start's, with the changes of the
  starts that trained up to it (see the module docstring).

  Args:
    workdir: a run directory with a config.json.
    step: a checkpoint step (>= 0).

  Raises:
    ValueError: config.json or starts.jsonl is corrupt (naming the file).
    FileNotFoundError: the workdir has no config.json.
  """
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{workdir} has no {checkpoint.CONFIG_FILE}: "
                            f"not a run directory")
  base = checkpoint.read_run_info(workdir).get("config")
  if not isinstance(base, dict):
    raise ValueError(f"{path} has no 'config' section")
  starts = read_starts(workdir)
  return _config_at(base, starts, step, len(starts))


def record_start(workdir: str, step: int, config: dict[str, Any],
                 **extra: Any) -> dict[str, Any]:
  """Appends this start's record; returns its changed keys.

  Call once the start has restored (or initialised) its state and before
  it trains; only process 0 should call it.

  Args:
    workdir: the run directory (config.json already written).
    step: the checkpoint step the start resumed from (0: fresh).
    config: the start's config as a JSON-able dict.
    **extra: more JSON-able fields for the record (e.g. prng_impl).
  """
  config = json.loads(json.dumps(config))
  changed = changed_keys(config_at_step(workdir, step), config)
  record = {"step": int(step), "changed": changed,
            "time": datetime.datetime.now().isoformat(timespec="seconds"),
            **extra}
  path = os.path.join(workdir, STARTS_FILE)
  lines = [json.dumps(r, sort_keys=True) for r in read_starts(workdir)]
  lines.append(json.dumps(record, sort_keys=True))
  data = ("\n".join(lines) + "\n").encode()
  tmp = path + ".tmp"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    if os.path.lexists(tmp):
      os.remove(tmp)
    diskspace.raise_if_full(e, path, len(data), "the run's start record")
    raise
  return changed


def reached_step(workdir: str) -> int:
  """The furthest step the workdir's records say the run reached: its
  metric records' and its resumed starts' (0 when there are none).
  Unparseable metric lines (torn by a kill) are ignored."""
  reached = 0
  path = os.path.join(workdir, metrics_lib.METRICS_FILE)
  try:
    with open(path, encoding="utf-8", errors="replace") as f:
      for line in f:
        try:
          reached = max(reached, int(json.loads(line).get("step", 0)))
        except (ValueError, TypeError, AttributeError):
          continue
  except FileNotFoundError:
    pass
  try:
    starts = read_starts(workdir)
  except ValueError:
    starts = []
  return max([reached] + [s["step"] for s in starts])


def check_checkpoints_present(workdir: str, first_save: int) -> None:
  """Refuses a workdir whose records say the run reached a checkpoint
  that no longer exists.

  A run that has no complete checkpoint starts from step 0. That is right
  after a crash before its first save, and wrong when the checkpoints
  directory vanished, was emptied, or is a mount point not mounted: the
  run would silently restart and move its metric history aside.

  Args:
    workdir: the run directory.
    first_save: the first step the run saved at (min(checkpoint_every,
      num_steps) of the config it started with).

  Raises:
    ValueError: one line naming the records and the checkpoints directory.
  """
  if checkpoint.complete_steps(workdir):
    return
  reached = reached_step(workdir)
  if reached < max(first_save, 1):
    return
  ckpt_dir = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  state = ("is missing" if not os.path.lexists(ckpt_dir) else
           "holds no complete checkpoint")
  raise ValueError(
      f"{workdir} records training up to step {reached} ({STARTS_FILE} / "
      f"{metrics_lib.METRICS_FILE}) but {ckpt_dir} {state} (deleted, or a "
      f"file system not mounted?); restore the checkpoints, or move "
      f"{metrics_lib.METRICS_FILE} and {STARTS_FILE} aside to train again "
      f"from step 0")
