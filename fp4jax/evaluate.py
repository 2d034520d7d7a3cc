r"""Zero-shot evaluation and perplexity of a run's checkpoint.

  python -m fp4jax.evaluate --workdir=runs/demo --tasks=piqa,arc_easy \
      --data_dir=DIR [--step=S] [--limit=N] [--precision=train|bf16|f32] \
      [--batch_size=B] [--out=FILE]
  python -m fp4jax.evaluate --workdir=runs/demo --tasks=ppl \
      --files=a.txt,b.txt

Restores the checkpoint (any recipe; by default in the training recipe's
forward precision, `--precision=bf16|f32` evaluates it unquantized; without
--step the newest complete checkpoint that reads), scores each task as
lm-evaluation-harness does (log-likelihood of each continuation: `acc` and
length-normalised `acc_norm`; LAMBADA's last-word accuracy and perplexity;
BoolQ as yes / no), prints a markdown table and then records the results
in `<workdir>/eval/step_<S>.json` (or --out):

  {"step": S, "results": [{"task", "precision", "recipe", "step", "limit",
   "items", "inputs": [{"file", "sha256", "bytes"}], "metrics": {metric:
   {value, stderr, n}}, "seconds", "batch_size", "evaluated_at"}, ...]}

A record says exactly what it scored: the task's files (or --files) with
their content hash, the limit, precision, recipe and step. A new result
replaces only the record of the same task, precision, recipe, limit and
input contents (the same measurement, redone); results of other inputs
stay. A value that is undefined (the stderr of one item) or not finite is
null, never NaN. `ppl` gives token perplexity and bits per byte of the
files in --files together. The task files are the lm-eval datasets' public
releases (formats in fp4jax/evaluation/tasks.py); --data_dir is a folder
holding them. An empty task file or text file is an error.

A workdir that cannot be written (read-only, someone else's run) is still
evaluated: the scores are printed and a warning names the file that could
not be written (`--out=FILE` keeps them elsewhere).

Exit codes: 0 done, 1 bad input (one `error:` line, before anything is
compiled or written) or results that could not be written to an --out or a
writable workdir (after the table).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import fcntl
import hashlib
import json
import math
import os
import sys
import tempfile
import time
from typing import Any

from fp4jax import diskspace
from fp4jax import errtext
from fp4jax.evaluation import tasks

TASK_PPL = "ppl"
RESULTS_DIR = "eval"
# The fields that make two records the same measurement.
_IDENTITY = ("task", "precision", "recipe", "limit")


class _Parser(argparse.ArgumentParser):
  """argparse with the documented exit code and one `error:` line."""

  def error(self, message):
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(1)


def _args(argv):
  p = _Parser(
      prog="python -m fp4jax.evaluate",
      description=__doc__.split("\n\n")[0].strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the newest)")
  p.add_argument("--tasks", required=True,
                 help="comma-separated lm-eval task names, or ppl")
  p.add_argument("--data_dir", default="",
                 help="folder holding the task files")
  p.add_argument("--files", default="",
                 help="comma-separated text files for --tasks=ppl")
  p.add_argument("--limit", type=int, default=None,
                 help="score the first N items of each task")
  p.add_argument("--precision", default="train",
                 help="train (the recipe's forward) | bf16 | f32")
  p.add_argument("--batch_size", type=int, default=16,
                 help="rows per forward")
  p.add_argument("--out", default="",
                 help="results file (default: <workdir>/eval/step_<S>.json)")
  return p.parse_args(argv)


class _Progress:
  """A one-line progress counter on stderr."""

  def __init__(self, name: str, total: int):
    self.name, self.total, self.t0 = name, total, time.perf_counter()

  def __call__(self, done: int) -> None:
    rate = done / max(time.perf_counter() - self.t0, 1e-9)
    end = "\n" if done >= self.total else ""
    print(f"\r{self.name}: {done}/{self.total} ({rate:.0f}/s)", end=end,
          file=sys.stderr, flush=True)


def _input(path: str, data: bytes | None = None) -> dict[str, Any]:
  """{"file", "sha256", "bytes"} of one input file (read unless `data`)."""
  if data is None:
    with open(path, "rb") as f:
      data = f.read()
  return {"file": os.path.abspath(path),
          "sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}


def _validate(a) -> tuple[list[str], dict[str, list[Any]],
                          list[tuple[str, str]],
                          dict[str, list[dict[str, Any]]]]:
  """Checks the arguments and reads the inputs (cheap, no jax).

  Returns:
    (task names, {task: items}, [(text file, its text)] for ppl,
     {task: the inputs it scores, as `_input` records}).
  """
  names = list(dict.fromkeys(t for t in a.tasks.split(",") if t))
  if not names:
    raise ValueError("--tasks is empty")
  if a.limit is not None and a.limit < 1:
    raise ValueError(f"--limit must be >= 1, got {a.limit}")
  if a.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {a.batch_size}")
  files = [f for f in a.files.split(",") if f]
  items, texts, inputs = {}, [], {}
  for name in names:
    if name == TASK_PPL:
      if not files:
        raise ValueError("--tasks=ppl needs --files=a.txt[,b.txt]")
      for f in files:
        if os.path.isdir(f):
          raise ValueError(f"--files: {f} is a folder; name the text files")
        if not os.path.isfile(f):
          raise FileNotFoundError(f"--files: no such file {f!r}")
        text = tasks.read_text(f)
        if not text.strip():   # its perplexity would be a perfect 1
          raise ValueError(f"--files: {f} is empty")
        texts.append((f, text))
      inputs[name] = [_input(f) for f in files]
      continue
    if not a.data_dir:
      raise ValueError(f"--tasks={name} needs --data_dir, a folder holding "
                       f"its files")
    items[name] = tasks.load(name, a.data_dir, a.limit)
    inputs[name] = [_input(os.path.join(a.data_dir, f))
                    for f in tasks.TASKS[name].files]
  return names, items, texts, inputs


def evaluate(a) -> dict[str, Any]:
  """Runs the evaluation `a` (parsed args) describes; returns the results.

  Raises:
    ValueError / FileNotFoundError: bad input, before anything is compiled
      or written.
    OSError: the results could not be written to --out or a workdir that
      looked writable (the table was printed).
  """
  names, items, texts, inputs = _validate(a)
  if a.out:
    _check_results_file(a.out, "--out")
  from fp4jax.evaluation import loader  # pylint: disable=import-outside-toplevel
  from fp4jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  loaded = loader.load(a.workdir, a.step, a.precision)
  path = a.out or os.path.join(a.workdir, RESULTS_DIR,
                               f"step_{loaded.step}.json")
  unwritable = None
  if not a.out:
    _check_results_file(path, f"{RESULTS_DIR}/{os.path.basename(path)}")
    unwritable = _unwritable(path)
    if unwritable:
      print(f"warning: {unwritable}; the scores are printed only (--out=FILE "
            f"keeps them elsewhere)", file=sys.stderr)
  tok = loaded.tokenizer
  ids = []
  for f, text in texts:
    ids.append([tok.bos_id, *(int(t) for t in tok.encode(text))])
    if len(ids[-1]) < 2:
      raise ValueError(f"--files: {f} has no tokens")
  model = loaded.model()
  key = jax.random.key(0)
  forward = scoring.make_forward(lambda x: model(x, key=key))
  max_len = loaded.model_cfg.max_seq_len
  results: dict[str, Any] = {}
  seconds: dict[str, float] = {}
  for name in names:
    t0 = time.perf_counter()
    _run_task(name, items, texts, ids, tok, forward, max_len, a.batch_size,
              results)
    seconds[name] = time.perf_counter() - t0
  print(markdown(results, loaded.step, a.precision, loaded.recipe, seconds))
  records = [_record(name, results[name], inputs[name], items.get(name),
                     a, loaded, seconds[name]) for name in names]
  if unwritable:
    print(f"warning: results not saved: {unwritable}", file=sys.stderr)
    return results
  _write(path, loaded.step, records)
  print(f"results: {path}", file=sys.stderr)
  return results


def _run_task(name, items, texts, ids, tok, forward, max_len, batch_size,
              results) -> None:
  """Scores one task into results[name]."""
  from fp4jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  if name == TASK_PPL:
    lls, n_tok, n_bytes = [], 0, 0
    for (f, text), file_ids in zip(texts, ids):
      reqs = scoring.rolling_requests(file_ids, max_len)
      out = scoring.score(forward, reqs, max_len=max_len,
                          batch_size=batch_size,
                          progress=_Progress(f"ppl {f}", len(reqs)))
      lls += [ll for ll, _ in out]
      n_tok += len(file_ids) - 1
      n_bytes += len(text.encode("utf-8"))
    results[name] = scoring.text_metrics(lls, n_tok, n_bytes)
    return
  task_items = items[name]
  reqs = [scoring.encode_pair(tok, it.context, c)
          for it in task_items for c in it.choices]
  out = scoring.score(forward, reqs, max_len=max_len, batch_size=batch_size,
                      progress=_Progress(name, len(reqs)))
  if tasks.TASKS[name].kind == "lambada":
    results[name] = scoring.lambada_metrics(out)
    return
  lls, k = [], 0
  for it in task_items:
    lls.append([ll for ll, _ in out[k:k + len(it.choices)]])
    k += len(it.choices)
  results[name] = scoring.multiple_choice_metrics(
      lls, [it.choice_texts() for it in task_items],
      [it.gold for it in task_items])


def _finite(obj: Any) -> Any:
  """`obj` with every non-finite float replaced by None (JSON has no NaN)."""
  if isinstance(obj, float) and not math.isfinite(obj):
    return None
  if isinstance(obj, dict):
    return {k: _finite(v) for k, v in obj.items()}
  if isinstance(obj, list):
    return [_finite(v) for v in obj]
  return obj


def _record(name: str, metrics: dict[str, Any], inputs: list[dict[str, Any]],
            task_items: list[Any] | None, a, loaded, seconds: float
            ) -> dict[str, Any]:
  """One results record: what was scored, how, and the metrics."""
  return _finite({
      "task": name, "precision": a.precision, "recipe": loaded.recipe,
      "step": loaded.step, "limit": None if name == TASK_PPL else a.limit,
      "items": None if task_items is None else len(task_items),
      "inputs": inputs, "metrics": metrics, "seconds": round(seconds, 2),
      "batch_size": a.batch_size,
      "evaluated_at": datetime.datetime.now().isoformat(timespec="seconds")})


def _identity(record: dict[str, Any]) -> tuple[Any, ...]:
  """What makes two records the same measurement (a redo replaces)."""
  hashes = (None if record.get("inputs") is None else
            tuple(i.get("sha256") for i in record["inputs"]))
  return (*(record.get(k) for k in _IDENTITY), hashes)


def _read_results(path: str, what: str) -> list[dict[str, Any]]:
  """The records of the results file `path` ([] if there is none).

  A file of the earlier layout ({precision: {task: metrics}}) is read as
  records whose inputs are unknown, so nothing in it is lost.

  Raises:
    ValueError: one line naming `what` when it is not a results file.
  """
  if not os.path.lexists(path):
    return []
  try:
    with open(path, encoding="utf-8") as f:
      saved = json.load(f)
  except (ValueError, UnicodeDecodeError) as e:
    raise ValueError(f"{what} {path} is not a results file (not JSON: "
                     f"{str(e).splitlines()[0]}); nothing is overwritten: "
                     f"move it away or pass --out=FILE") from None
  if isinstance(saved, dict) and isinstance(saved.get("results"), list):
    return saved["results"]
  if isinstance(saved, dict) and all(
      isinstance(v, dict) and all(isinstance(m, dict) for m in v.values())
      for v in saved.values()):
    return [{"task": task, "precision": precision,
             "limit": entry.get("limit"), "inputs": None,
             "metrics": {k: v for k, v in entry.items()
                         if isinstance(v, dict)},
             "seconds": entry.get("seconds")}
            for precision, by_task in saved.items()
            for task, entry in by_task.items()]
  raise ValueError(f"{what} {path} is not a results file (not the layout "
                   f"fp4jax.evaluate writes); nothing is overwritten: move "
                   f"it away or pass --out=FILE")


def _check_results_file(path: str, what: str) -> None:
  """Checks that `path` is a results file or can become one (writes
  nothing).

  Raises:
    ValueError: one line naming `what` and the problem.
  """
  if os.path.islink(path):
    raise ValueError(f"{what} {path} is a symbolic link; name the file "
                     f"itself (it is replaced when written)")
  if os.path.isdir(path):
    raise ValueError(f"{what} {path} is a folder; name a file, e.g. "
                     f"{os.path.join(path, 'results.json')}")
  if os.path.lexists(path) and not os.path.isfile(path):
    raise ValueError(f"{what} {path} is not a regular file")
  _read_results(path, what)
  if what == "--out":
    problem = _unwritable(path)
    if problem:
      raise ValueError(f"--out: {problem}")


def _unwritable(path: str) -> str | None:
  """Why the results file `path` could not be written, else None (probed
  with an anonymous temporary file: nothing is left behind)."""
  folder = os.path.dirname(os.path.abspath(path))
  probe = folder
  while not os.path.isdir(probe):
    if os.path.lexists(probe):
      return f"cannot write {path}: {probe} is not a folder"
    probe = os.path.dirname(probe)
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    return f"cannot write {path}: {probe} is not writable ({e.strerror or e})"
  return None


@contextlib.contextmanager
def _locked(folder: str):
  """Holds an exclusive lock on `folder` itself (no lock file is made), so
  two evaluations merging into one results file do not lose each other's
  records."""
  fd = os.open(folder, os.O_RDONLY)
  try:
    fcntl.flock(fd, fcntl.LOCK_EX)
    yield
  finally:
    os.close(fd)


def _write(path: str, step: int, records: list[dict[str, Any]]) -> None:
  """Merges `records` into the results file `path` atomically.

  A record replaces only the one of the same identity (`_identity`).

  Raises:
    OSError: the write failed; no partial file is left (a full disk is
      named with the bytes needed).
  """
  folder = os.path.dirname(os.path.abspath(path))
  created = not os.path.isdir(folder)
  tmp, text = None, ""
  try:
    os.makedirs(folder, exist_ok=True)
    with _locked(folder):
      saved = _read_results(path, "results file")
      new = {_identity(r) for r in records}
      merged = [r for r in saved if _identity(r) not in new] + records
      text = json.dumps({"step": step, "results": merged}, indent=2,
                        sort_keys=True, allow_nan=False) + "\n"
      fd, tmp = tempfile.mkstemp(prefix=f".{os.path.basename(path)}.",
                                 suffix=".tmp", dir=folder)
      with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
      umask = os.umask(0)
      os.umask(umask)
      os.chmod(tmp, 0o666 & ~umask)   # mkstemp's files are private
      os.replace(tmp, path)
      tmp = None
  except OSError as e:
    diskspace.raise_if_full(e, path, len(text.encode()), "the results")
    raise
  finally:
    if tmp is not None and os.path.lexists(tmp):
      os.unlink(tmp)   # ours: made by mkstemp above
    if created and os.path.isdir(folder) and not os.path.exists(path):
      with contextlib.suppress(OSError):
        os.rmdir(folder)   # made by this call; removed only if empty


def markdown(results: dict[str, Any], step: int, precision: str,
             recipe: str, seconds: dict[str, float] | None = None) -> str:
  """A markdown table of `results` (and each task's evaluation time)."""
  seconds = seconds or {}
  lines = [f"step {step}, recipe {recipe}, precision {precision}", "",
           "| task | metric | value | stderr | n | seconds |",
           "|---|---|---|---|---|---|"]
  fmt = lambda v: "nan" if v is None else f"{v:.4f}"   # noqa: E731
  for task, metrics in results.items():
    for metric, m in metrics.items():
      err = "" if m["stderr"] is None else fmt(m["stderr"])
      sec = f"{seconds[task]:.1f}" if task in seconds else ""
      lines.append(f"| {task} | {metric} | {fmt(m['value'])} | {err} | "
                   f"{m['n']} | {sec} |")
  return "\n".join(lines)




def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  a = _args(argv)
  try:
    evaluate(a)
  except (ValueError, OSError) as e:
    print(f"error: {errtext.one_line(e)}", file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
