"""The `files` source: sharded corpora streamed as they are (no copy).

Owns: reading the data.* keys of `data.source="files"` into
`streaming.Source`s (data.train_files, or data.mixture), the val split
(data.val_files, else held out by data.val_fraction), the run's tokenizer
for them, and the tokenizer worker pools a run's iterators share.

Keys:
  data.train_files: shards: paths, URLs or globs, comma-separated or a
    sequence (`shards.expand_shards`), or prepared directories
    (`python -m fp4jax.data.prepare`: token shards, not tokenized again;
    a pattern that is a directory must be a finished one).
  data.mixture: instead of train_files, several sources with weights:
    a sequence of "NAME:WEIGHT:PATTERNS" strings or (name, weight,
    patterns) tuples, e.g. ("web:0.9:/data/dclm/*.jsonl.zst",
    "code:0.1:/data/code/*.parquet").
  data.val_files: shards of the val split; () = hold out data.val_fraction
    of the documents of the training sources.
  data.text_key, data.doc_separator: the text field / .txt separator line.
  data.max_bad_records: bad records skipped and counted before one is an
    error (0 = the first is).
  data.workers: tokenizer processes; -1 = one per core but one, at most 8.
  data.tokenizer_model: a SentencePiece model; "" = the prepared
    directories' tokenizer.model when a source (train or val) is prepared,
    else train one on a sample of the first source
    (data.tokenizer_train_chars characters) and keep it in the run
    directory. With a prepared source it must be the model the directory
    was prepared with; raw sources beside it are tokenized with it too.

Must not import: jax, ml_collections, tensorflow_datasets, grain, or fp4jax
modules outside fp4jax.data.
"""

import atexit
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from typing import Any

from absl import logging

from fp4jax.data import prepare
from fp4jax.data import shards as shards_lib
from fp4jax.data import streaming
from fp4jax.data import tokenize_pool
from fp4jax.data import tokenizer as tokenizer_lib

TOKENIZER_FILE = "tokenizer.model"
MAX_AUTO_WORKERS = 8

# (tokenizer fingerprint, workers) -> pool: the train and val iterators of
# a run tokenize in the same processes.
_POOLS: dict[tuple[str, int], tokenize_pool.TokenizePool] = {}


@atexit.register
def close_pools() -> None:
  """Stops every shared tokenizer pool (at exit, or to time a cold start)."""
  for pool in _POOLS.values():
    pool.close()
  _POOLS.clear()


def auto_workers(workers: int) -> int:
  """data.workers resolved: -1 = one per core but one (>= 1, <= 8)."""
  if workers == -1:
    return max(1, min(MAX_AUTO_WORKERS, (os.cpu_count() or 2) - 1))
  if workers < 0:
    raise ValueError(f"data.workers must be >= 0 or -1 (auto), got "
                     f"{workers}")
  return workers


def pool_for(tokenizer: tokenizer_lib.Tokenizer, workers: int
             ) -> tokenize_pool.TokenizePool:
  """The shared pool of `workers` processes loaded with `tokenizer`."""
  key = (tokenizer.fingerprint, workers)
  if key not in _POOLS:
    _POOLS[key] = tokenize_pool.TokenizePool(tokenizer, workers)
  return _POOLS[key]


def _mixture_entries(mixture: Any) -> list[tuple[str, float, Any]]:
  out = []
  for entry in mixture:
    if isinstance(entry, str):
      parts = entry.split(":", 2)
      if len(parts) != 3:
        raise ValueError(f"data.mixture entry {entry!r} is not "
                         f"NAME:WEIGHT:PATTERNS")
      name, weight, patterns = parts
    else:
      if len(entry) != 3:
        raise ValueError(f"data.mixture entry {entry!r} is not (name, "
                         f"weight, patterns)")
      name, weight, patterns = entry
    try:
      weight = float(weight)
    except (TypeError, ValueError):
      raise ValueError(f"data.mixture entry {name!r}: weight {weight!r} is "
                       f"not a number") from None
    if not weight > 0:
      raise ValueError(f"data.mixture entry {name!r}: weight must be > 0, "
                       f"got {weight}")
    if not str(name).strip():
      raise ValueError(f"data.mixture entry {entry!r} has no name")
    out.append((str(name).strip(), weight, patterns))
  names = [n for n, _, _ in out]
  if len(set(names)) != len(names):
    raise ValueError(f"data.mixture names repeat: {names}")
  return out


def _source(name: str, patterns: Any, weight: float, key: str
            ) -> streaming.Source:
  prepared = prepare.prepared_source(patterns, key)
  if prepared is not None:
    return streaming.Source(name=name, weight=weight,
                            shards=prepared.shards, tokens=True)
  return streaming.Source(name=name, weight=weight, shards=tuple(
      shards_lib.expand_shards(patterns, key)))


def sources(data_cfg: Any, split: str) -> list[streaming.Source]:
  """The sources of `split` ("train" or "val") from the data.* keys.

  Raises:
    ValueError / FileNotFoundError: one line naming the data.* key.
  """
  mixture = tuple(data_cfg.get("mixture", ()) or ())
  train_files = data_cfg.train_files
  if isinstance(train_files, str):
    train_files = (train_files,) if train_files.strip() else ()
  if mixture and train_files:
    raise ValueError("set data.train_files or data.mixture, not both")
  if split == "val" and data_cfg.val_files:
    return [_source("val", data_cfg.val_files, 1.0, "data.val_files")]
  if split == "val" and not data_cfg.val_fraction:
    raise ValueError("no val split: set data.val_files or data.val_fraction "
                     "> 0 (data.source='files')")
  if mixture:
    return [_source(n, p, w, f"data.mixture[{n}]")
            for n, w, p in _mixture_entries(mixture)]
  if not train_files:
    raise ValueError("data.train_files is empty (data.source='files')")
  return [_source("train", train_files, 1.0, "data.train_files")]


def data_name(srcs: Sequence[streaming.Source], data_cfg: Any) -> str:
  """`files_<hash>`: the shards of every source (by name) and the settings
  that change the documents; the data's identity in states and the
  tokenizer record."""
  h = hashlib.sha256(json.dumps({
      "sources": [[s.name, list(s.shards)] for s in srcs],
      "text_key": data_cfg.text_key,
      "separator": data_cfg.doc_separator}, sort_keys=True).encode())
  return f"files_{h.hexdigest()[:16]}"


def _sample_lines(source: streaming.Source, data_cfg: Any
                  ) -> Iterator[str]:
  """Lines of the first ~tokenizer_train_chars characters of documents,
  read in the seeded shard order (every process the same)."""
  reader = shards_lib.ShardReader(
      source.shards, seed=0, num_epochs=1, text_key=data_cfg.text_key,
      separator=data_cfg.doc_separator,
      max_bad_records=data_cfg.get("max_bad_records", 0))
  budget = data_cfg.tokenizer_train_chars
  for doc in reader:
    for line in doc.split("\n"):
      if line:
        budget -= len(line)
        yield line
    if budget <= 0:
      return


def run_tokenizer(data_cfg: Any, srcs: Sequence[streaming.Source],
                  name: str, workdir: str | None
                  ) -> tokenizer_lib.Tokenizer:
  """data.tokenizer_model, the prepared sources' tokenizer, or the run's
  BPE model (trained once on a sample of the first source, then reused
  from the workdir).

  Args:
    srcs: the run's sources: training ones first (a BPE sample comes from
      srcs[0]), and data.val_files' when set (they may be prepared).

  Raises:
    ValueError / FileNotFoundError: naming the data.* key.
  """
  prepared = [s.shards for s in srcs if s.tokens]
  if prepared:
    return prepare.run_tokenizer(prepared, data_cfg.tokenizer_model,
                                 data_cfg.vocab_size)
  store = (os.path.join(workdir, TOKENIZER_FILE) if workdir else "")
  if not data_cfg.tokenizer_model and not workdir:
    raise ValueError("data.source='files' without a workdir needs "
                     "data.tokenizer_model")
  return tokenizer_lib.get_tokenizer(
      vocab_size=data_cfg.vocab_size, model_path=data_cfg.tokenizer_model,
      store_path=store, sample=_sample_lines(srcs[0], data_cfg),
      built_from={"data": name,
                  "train_chars": data_cfg.tokenizer_train_chars})


def make_input(data_cfg: Any, *, split: str, seed: int,
               process_index: int = 0, process_count: int = 1,
               workdir: str | None = None) -> streaming.StreamInput:
  """Source entry point (data.source = "files"); see the module docstring.

  The iterator has read one document of every source (`probe`) before it
  is returned, so a wrong format or text key fails here, before compiling.

  Raises:
    ValueError / FileNotFoundError: one line naming the key or file.
  """
  if split not in streaming.SPLITS:
    raise ValueError(f"split must be one of {streaming.SPLITS}, got "
                     f"{split!r}")
  workers = auto_workers(data_cfg.get("workers", -1))
  max_bad = data_cfg.get("max_bad_records", 0)
  if max_bad < 0:
    raise ValueError(f"data.max_bad_records must be >= 0, got {max_bad}")
  # Each split's patterns are expanded once (a remote glob is a listing).
  # (A held-out val split reads the training sources themselves; without
  # one, sources() refuses the val split before expanding anything.)
  val_srcs = (sources(data_cfg, "val") if data_cfg.val_files or (
      split == "val" and not data_cfg.val_fraction) else [])
  train_srcs = sources(data_cfg, "train")
  srcs = val_srcs if split == "val" and val_srcs else train_srcs
  train_name = data_name(train_srcs, data_cfg)
  name = data_name(srcs, data_cfg) if srcs is val_srcs else train_name
  holdout = 0.0 if data_cfg.val_files else float(data_cfg.val_fraction)
  tok = run_tokenizer(data_cfg, [*train_srcs, *val_srcs], train_name,
                      workdir)
  if all(s.tokens for s in srcs):
    workers = 0     # nothing to tokenize: no worker processes
  it = streaming.StreamInput(
      srcs, tokenizer=tok, pool=pool_for(tok, workers),
      seq_len=data_cfg.seq_len, batch=data_cfg.global_batch // process_count,
      split=split, seed=seed, segment_ids=bool(data_cfg.segment_ids),
      process_index=process_index, process_count=process_count,
      text_key=data_cfg.text_key, separator=data_cfg.doc_separator,
      max_bad_records=max_bad, holdout=holdout, name=name)
  it.probe()
  logging.info("data %s/%s: %s, %d tokenizer workers, vocab %d", name,
               split, ", ".join(
                   f"{s.name} {len(s.shards)} "
                   f"{'prepared ' if s.tokens else ''}shard(s)"
                   f"{f' weight {s.weight:g}' if len(srcs) > 1 else ''}"
                   for s in srcs), workers, tok.vocab_size)
  return it
