"""Metric records: metrics.jsonl, TensorBoard events and the console line.

Owns: flattening nested metric dicts ("layers/3/amax"), the per-run writer
(one JSON object per log step appended to `<workdir>/metrics.jsonl`, scalars
to TensorBoard event files under `<workdir>/tb`), and the console format.

Must not import: ml_collections, tensorflow_datasets, grain, or any fp4jax
module.
"""

import json
import math
import os
from collections.abc import Mapping
from typing import Any

from absl import logging
import numpy as np

METRICS_FILE = "metrics.jsonl"
DROPPED_FILE = "metrics.dropped.jsonl"
TB_DIR = "tb"


def flatten(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a": {"b": 1}} -> {"a/b": 1}; leaves become Python floats / ints.

  Nested dicts are how per-layer scalars ride along with the step metrics.
  """
  out: dict[str, Any] = {}
  for key, value in metrics.items():
    name = f"{prefix}{key}"
    if isinstance(value, Mapping):
      out.update(flatten(value, name + "/"))
    else:
      a = np.asarray(value)
      if a.size != 1:
        raise ValueError(f"metric {name!r} is not a scalar: shape {a.shape}")
      v = a.reshape(()).item()
      out[name] = v
  return out


def _json_value(v: Any) -> Any:
  # JSON has no NaN/inf; keep them readable and parseable as strings.
  if isinstance(v, float) and not math.isfinite(v):
    return str(v)
  return v


def _trim(path: str, step: int | None) -> None:
  """Keeps the records of metrics.jsonl with "step" <= step (None: none).

  Records after `step` (written before an interruption, about to be
  redone) and lines that do not parse (a line torn by a kill mid-write) are
  moved to `metrics.dropped.jsonl` next to it, never deleted; each torn
  line is logged with its number.
  """
  with open(path) as f:
    lines = f.readlines()
  keep, drop = [], []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      record_step = int(record.get("step", 0))
    except (ValueError, TypeError, AttributeError):
      logging.warning("%s line %d is not a JSON record (torn by a kill?): "
                      "moved to %s", path, number, DROPPED_FILE)
      drop.append(line if line.endswith("\n") else line + "\n")
      continue
    (keep if step is not None and record_step <= step else drop).append(line)
  if not drop:
    return
  dropped = os.path.join(os.path.dirname(path), DROPPED_FILE)
  with open(dropped, "a") as f:
    f.writelines(drop)
    f.flush()
    os.fsync(f.fileno())
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    f.writelines(keep)
  os.replace(tmp, path)   # atomic: a crash here loses nothing
  logging.info("metrics: %d record(s) after step %s moved to %s", len(drop),
               step if step is not None else "0 (fresh start)", DROPPED_FILE)


class MetricWriter:
  """Appends metric records for one run; a no-op when `enabled` is False."""

  def __init__(self, workdir: str, *, enabled: bool = True,
               resume_step: int | None = None):
    """Opens `<workdir>/metrics.jsonl` (append) and a TensorBoard writer.

    Args:
      workdir: the run directory.
      enabled: False on processes other than 0, so records are written once.
      resume_step: the checkpoint step a resumed run restarts from (None:
        a fresh start): records after it (written before the interruption,
        about to be redone) are moved from metrics.jsonl to
        metrics.dropped.jsonl and purged from TensorBoard.
    """
    self._enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self.path = os.path.join(workdir, METRICS_FILE)
    if os.path.exists(self.path):
      _trim(self.path, resume_step)
    self._file = open(self.path, "a")
    # Imported here: the package works without TensorBoard installed.
    try:
      import tensorboardX  # pylint: disable=g-import-not-at-top
    except ImportError:
      tensorboardX = None
    if tensorboardX is not None:
      self._tb = tensorboardX.SummaryWriter(
          os.path.join(workdir, TB_DIR),
          purge_step=0 if resume_step is None else resume_step + 1)

  def write(self, step: int, metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Records `metrics` (nested dicts allowed) at `step`; returns them flat."""
    flat = flatten(metrics)
    if not self._enabled:
      return flat
    record = {"step": int(step), **{k: _json_value(v) for k, v in flat.items()}}
    self._file.write(json.dumps(record) + "\n")
    self._file.flush()
    if self._tb is not None:
      for key, value in flat.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
          self._tb.add_scalar(key, value, int(step))
      self._tb.flush()
    return flat

  def close(self) -> None:
    if not self._enabled:
      return
    self._file.close()
    if self._tb is not None:
      self._tb.close()


def _duration(seconds: float) -> str:
  seconds = max(int(seconds), 0)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


def console_line(step: int, num_steps: int, m: Mapping[str, Any]) -> str:
  """One human line: step, loss, lr, grad norm, throughput, MFU, ETA."""
  parts = [f"step {step}/{num_steps}", f"loss {m['loss']:.4f}"]
  if "val_loss" in m:
    parts.append(f"val {m['val_loss']:.4f}")
  parts += [f"lr {m['lr']:.2e}", f"gnorm {m['grad_norm']:.3f}"]
  if "tokens_per_sec" in m:
    parts.append(f"{m['tokens_per_sec'] / 1e3:.1f}k tok/s")
  if "step_time" in m:
    parts.append(f"{m['step_time']:.3f} s/step")
  if m.get("mfu") is not None:
    parts.append(f"MFU {100 * m['mfu']:.1f}%")
  if m.get("skipped_total"):
    parts.append(f"skipped {m['skipped_total']}")
  shares = [f"{k.split('/', 1)[1]} {v:.3f}" for k, v in m.items()
            if k.startswith("data_share/")]
  if shares:
    parts.append("data " + " ".join(shares))
  if "eta_sec" in m:
    parts.append(f"ETA {_duration(m['eta_sec'])}")
  return " | ".join(parts)
