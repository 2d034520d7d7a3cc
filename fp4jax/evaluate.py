r"""Zero-shot evaluation and perplexity of a run's checkpoint.

  python -m fp4jax.evaluate --workdir=runs/demo --tasks=piqa,arc_easy \
      --data_dir=DIR [--step=S] [--limit=N] [--precision=train|bf16|f32] \
      [--batch_size=B]
  python -m fp4jax.evaluate --workdir=runs/demo --tasks=ppl \
      --files=a.txt,b.txt

Restores the checkpoint (any recipe; by default in the training recipe's
forward precision, `--precision=bf16|f32` evaluates it unquantized), scores
each task as lm-evaluation-harness does (log-likelihood of each
continuation: `acc` and length-normalised `acc_norm`; LAMBADA's last-word
accuracy and perplexity; BoolQ as yes / no), and writes
`<workdir>/eval/step_<S>.json` ({precision: {task: {metric: {value,
stderr, n}}}}, merged with what is there) and prints a markdown table.
`ppl` gives token perplexity and bits per byte of each file in --files.
The task files are the lm-eval datasets' public releases (formats in
fp4jax/evaluation/tasks.py); --data_dir is a folder holding them.

Exit codes: 0 done, 1 bad input (one `error:` line, before anything is
compiled or written).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from fp4jax.evaluation import tasks

TASK_PPL = "ppl"


def _args(argv):
  p = argparse.ArgumentParser(
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


def _validate(a) -> tuple[list[str], dict[str, list[Any]], list[str]]:
  """Checks the arguments and reads the task files (cheap, no jax)."""
  names = [t for t in a.tasks.split(",") if t]
  if not names:
    raise ValueError("--tasks is empty")
  if a.limit is not None and a.limit < 1:
    raise ValueError(f"--limit must be >= 1, got {a.limit}")
  if a.batch_size < 1:
    raise ValueError(f"--batch_size must be >= 1, got {a.batch_size}")
  files = [f for f in a.files.split(",") if f]
  items = {}
  for name in names:
    if name == TASK_PPL:
      if not files:
        raise ValueError("--tasks=ppl needs --files=a.txt[,b.txt]")
      for f in files:
        if not os.path.isfile(f):
          raise FileNotFoundError(f"--files: no such file {f!r}")
      continue
    if not a.data_dir:
      raise ValueError(f"--tasks={name} needs --data_dir, a folder holding "
                       f"its files")
    items[name] = tasks.load(name, a.data_dir, a.limit)
  return names, items, files


def evaluate(a) -> dict[str, Any]:
  """Runs the evaluation `a` (parsed args) describes; returns the results."""
  names, items, files = _validate(a)
  from fp4jax.evaluation import loader  # pylint: disable=import-outside-toplevel
  from fp4jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel

  loaded = loader.load(a.workdir, a.step, a.precision)
  model = loaded.model()
  key = jax.random.key(0)
  forward = scoring.make_forward(lambda x: model(x, key=key))
  max_len = loaded.model_cfg.max_seq_len
  tok = loaded.tokenizer
  results: dict[str, Any] = {}
  seconds: dict[str, float] = {}
  for name in names:
    t0 = time.perf_counter()
    _run_task(name, items, files, tok, forward, max_len, a.batch_size,
              results)
    seconds[name] = time.perf_counter() - t0
  _write(a.workdir, loaded.step, a.precision, a.limit, results, seconds)
  print(markdown(results, loaded.step, a.precision, loaded.recipe, seconds))
  return results


def _run_task(name, items, files, tok, forward, max_len, batch_size,
              results) -> None:
  """Scores one task into results[name]."""
  from fp4jax.evaluation import scoring  # pylint: disable=import-outside-toplevel
  if name == TASK_PPL:
    lls, n_tok, n_bytes = [], 0, 0
    for f in files:
      with open(f, encoding="utf-8") as fh:
        text = fh.read()
      ids = [tok.bos_id, *(int(t) for t in tok.encode(text))]
      reqs = scoring.rolling_requests(ids, max_len)
      out = scoring.score(forward, reqs, max_len=max_len,
                          batch_size=batch_size,
                          progress=_Progress(f"ppl {f}", len(reqs)))
      lls += [ll for ll, _ in out]
      n_tok += len(ids) - 1
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


def _write(workdir: str, step: int, precision: str, limit: int | None,
           results: dict[str, Any], seconds: dict[str, float]) -> None:
  """Merges `results` into <workdir>/eval/step_<step>.json atomically."""
  out_dir = os.path.join(workdir, "eval")
  os.makedirs(out_dir, exist_ok=True)
  path = os.path.join(out_dir, f"step_{step}.json")
  saved: dict[str, Any] = {}
  if os.path.isfile(path):
    with open(path) as f:
      saved = json.load(f)
  entry = saved.setdefault(precision, {})
  for task, metrics in results.items():
    entry[task] = {**metrics, "limit": limit,
                   "seconds": round(seconds.get(task, 0.0), 2)}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(saved, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def markdown(results: dict[str, Any], step: int, precision: str,
             recipe: str, seconds: dict[str, float] | None = None) -> str:
  """A markdown table of `results` (and each task's evaluation time)."""
  seconds = seconds or {}
  lines = [f"step {step}, recipe {recipe}, precision {precision}", "",
           "| task | metric | value | stderr | n | seconds |",
           "|---|---|---|---|---|---|"]
  for task, metrics in results.items():
    for metric, m in metrics.items():
      err = "" if m["stderr"] is None else f"{m['stderr']:.4f}"
      sec = f"{seconds[task]:.1f}" if task in seconds else ""
      lines.append(f"| {task} | {metric} | {m['value']:.4f} | {err} | "
                   f"{m['n']} | {sec} |")
  return "\n".join(lines)


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  a = _args(argv)
  try:
    evaluate(a)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else repr(e)}",
          file=sys.stderr)
    return 1
  return 0


if __name__ == "__main__":
  sys.exit(main())
