"""Input pipelines: one entry point, sources chosen by name.

Owns: `make_input`, the table of data sources and the iterator contract they
share. A source is a module with
`make_input(data_cfg, *, split, seed, process_index, process_count, workdir)`
returning an iterator with:

  next(it) -> {"inputs": int32 [b, T], "targets": int32 [b, T],
               "mask": float32 [b, T], "segment_ids": int32 [b, T]}
              (numpy; b = data.global_batch // process_count; this process's
              rows of the global batch)
  it.get_state() -> JSON-able dict; it.set_state(d) resumes exactly there;
    given `process_state`'s {"all_processes": [...]} (the states of a run
    on another number of processes) it continues that run's data, or
    raises ValueError if the source cannot split a position differently
  it.vocab_size -> int

Sources are imported only when chosen, so a run on synthetic data (or the
benchmark) does not need tensorflow_datasets or grain installed.

Must not import (at module level): ml_collections, tensorflow_datasets,
grain, or fp4jax modules right of `data` (checkpoint, train, main).
"""

import importlib
from typing import Any

# What a source may write into the run directory (before training starts):
# a start that then fails removes those of them it created (fp4jax.rundir).
WORKDIR_FILES = ("tokenizer.model", "tokenizer.json", "tfds")

# data.source -> module implementing `make_input`.
SOURCES: dict[str, str] = {
    "synthetic": "fp4jax.data.synthetic",
    "text_files": "fp4jax.data.pipeline",  # local .txt / .jsonl files
    "stdlib": "fp4jax.data.pipeline",      # offline smoke corpus
    "tfds": "fp4jax.data.pipeline",        # prepared TFDS catalogue data
    "files": "fp4jax.data.files",          # sharded corpora, streamed
}


def make_input(data_cfg: Any, *, split: str, seed: int,
               process_index: int = 0, process_count: int = 1,
               workdir: str | None = None) -> Any:
  """Builds the input iterator for `split` from the `data` config section.

  Args:
    data_cfg: the `data` config section (attribute access; a ConfigDict or
      any object with the keys of configs/default.py `data`).
    split: "train" or "val".
    seed: stream / shuffle seed.
    process_index: this process's index (jax.process_index()).
    process_count: number of processes (jax.process_count()).
    workdir: run directory a source may cache derived files under (e.g. a
      trained tokenizer); None = no caching.

  Returns:
    An iterator as described in the module docstring.

  Raises:
    ValueError: naming data.source when it is unknown, or the data.* key a
      source rejects.
  """
  if data_cfg.source not in SOURCES:
    raise ValueError(f"unknown data.source {data_cfg.source!r}; known: "
                     f"{', '.join(sorted(SOURCES))}")
  if process_count < 1 or not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} out of range for "
                     f"process_count={process_count}")
  if data_cfg.global_batch % process_count:
    raise ValueError(f"data.global_batch={data_cfg.global_batch} is not "
                     f"divisible by the process count {process_count}")
  module = importlib.import_module(SOURCES[data_cfg.source])
  return module.make_input(data_cfg, split=split, seed=seed,
                           process_index=process_index,
                           process_count=process_count, workdir=workdir)


def process_state(states: list[dict[str, Any]], process_index: int,
                  process_count: int) -> dict[str, Any]:
  """What `set_state` of process `process_index` gets from a checkpoint.

  Args:
    states: every process's `get_state()`, as the checkpoint holds them.
    process_index, process_count: this process, now.

  Returns:
    states[process_index] when the run had `process_count` processes, else
    {"all_processes": states} (see the module docstring).
  """
  if len(states) == process_count:
    return dict(states[process_index])
  return {"all_processes": [dict(s) for s in states]}
