"""Packed token batches from text records: sources text_files, stdlib, tfds.

Owns: `make_input` for the real-text sources and `PackedInput`, the
resumable, process-sharded packing iterator.

Packing. Each process takes the documents (records) p, p+P, p+2P, ... of the
split (disjoint shards whose union is the split). grain orders them into an
endless document stream: a new permutation per epoch (seeded) for "train",
file order for "val". Every document becomes [BOS] + tokens + [EOS] and the
stream is their concatenation. The b = global_batch // process_count rows of
a batch are b lanes reading that one stream at evenly spaced positions: lane
r starts r/b of the way through the first epoch (in document units, a
fraction of a document turning into a token offset) and every lane moves on
by seq_len + 1 tokens per batch, so two rows never hold the same tokens at
the same step, rows of a batch come from b far-apart places (a long book
does not fill a batch), and the per-lane split is the classic "concatenate
then cut into seq_len + 1" packing. Row = lane tokens [T+1]:
inputs = row[:-1], targets = row[1:].

segment_ids: within a row, the documents are numbered 1, 2, ... (the
document continued from the previous row is 1); all ones when
data.segment_ids is False (attention may then cross documents).
mask: 0 where the target is the BOS of a document that starts inside the
row (the previous document's EOS cannot predict which document follows),
else 1, in both modes. The stream never ends, so there is no padding.

Resume: the state is each lane's (stream document index, token offset);
`set_state` re-tokenizes those documents and continues exactly. States are
per process (each process saves its own).

Tokenization runs in process, in the calling thread, one batched
SentencePiece call per document (see tokenizer.py), with a small LRU cache
of tokenized documents; grain's multiprocess workers are not used (they
need absl.app.run).

Must not import: ml_collections (reads the config by attribute), jax, or
fp4jax modules outside fp4jax.data.
"""

import collections
import functools
import os
import time
from collections.abc import Iterator
from typing import Any

from absl import logging
import grain
import numpy as np

from fp4jax.data import builders
from fp4jax.data import documents
from fp4jax.data import packing
from fp4jax.data import resume
from fp4jax.data import stdlib_corpus
from fp4jax.data import tokenizer as tokenizer_lib

SPLITS = packing.SPLITS
# Kept in the workdir (listed in fp4jax.data.WORKDIR_FILES with the
# tokenizer's provenance record).
TOKENIZER_FILE = "tokenizer.model"
TFDS_DIR = "tfds"
STATE_VERSION = 1


def _text(record: Any, text_key: str) -> str:
  value = record[text_key] if isinstance(record, dict) else record
  if isinstance(value, bytes):
    return value.decode("utf-8", "replace")
  return str(value)


class PackedInput:
  """Iterator of packed {"inputs", "targets", "mask", "segment_ids"} batches.

  Attributes:
    vocab_size: the tokenizer's vocabulary size.
    tokenizer: the `tokenizer.Tokenizer` (for decoding).
    num_documents: documents in this process's shard of the split.
    tokenize_stats: documents read + tokenized so far, their tokens and the
      seconds it took (cache misses only; for benchmarks).
  """

  def __init__(self, records: Any, *, tokenizer: tokenizer_lib.Tokenizer,
               seq_len: int, batch: int, split: str, seed: int,
               segment_ids: bool = False, process_index: int = 0,
               process_count: int = 1, text_key: str = "text",
               name: str = "records", aliases: tuple[str, ...] = (),
               source: str = "text_files"):
    """Builds the iterator at the start of the stream.

    Args:
      records: random-access records (len + getitem), each a dict with
        `text_key` (str or UTF-8 bytes) or a str.
      tokenizer: encodes documents.
      seq_len: T, tokens per row (rows hold T + 1 tokens before the shift).
      batch: rows per batch in this process.
      split: "train" (reshuffled every epoch) or "val" (file order).
      seed: shuffle seed (train).
      segment_ids: number documents within rows (else all ones).
      process_index, process_count: this process's shard.
      text_key: record field holding the text.
      name: the data's identity (cache name), part of the state check.
      aliases: other names of the same data (what earlier versions called
        it): a state saved under one of them is accepted.
      source: the data.source it serves (for messages).

    Raises:
      ValueError: one line naming the data.* key: bad sizes, a shard with no
        documents, or a split with fewer than seq_len + 1 tokens.
    """
    packing.check_layout(split, seq_len, batch)
    total = len(records)
    ds = grain.MapDataset.range(total)[process_index::process_count]
    self.num_documents = len(ds)
    if not self.num_documents:
      raise ValueError(f"the {split} split of {name} has {total} document(s),"
                       f" fewer than the {process_count} processes")
    if split == "train":
      # A permutation per epoch: grain reshuffles when shuffle precedes repeat.
      ds = ds.shuffle(seed=seed % 2**32)
    self._stream = ds.repeat()          # stream position -> record index
    self._records = records
    self._text_key = text_key
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self._seq_len, self._batch = seq_len, batch
    self._segment_ids = segment_ids
    self._cache: collections.OrderedDict[int, np.ndarray] = (
        collections.OrderedDict())
    self.tokenize_stats = {"documents": 0, "tokens": 0, "seconds": 0.0}
    self._positions: collections.OrderedDict[int, int] = (
        collections.OrderedDict())
    self._cache_size = 2 * batch + 4
    self._identity = {
        "data": name, "tokenizer": tokenizer.fingerprint, "split": split,
        "seed": seed if split == "train" else None,
        "documents": self.num_documents, "rows": batch, "seq_len": seq_len,
        "process_index": process_index, "process_count": process_count}
    self._aliases = tuple(a for a in aliases if a and a != name)
    self.source = source
    self._split = split
    self._check_length()
    self._lanes = self._start_lanes()

  def _tokens(self, position: int) -> np.ndarray:
    """[BOS] + tokens + [EOS] of the document at stream `position`."""
    index = self._positions.get(position)
    if index is None:   # grain's shuffled lookup costs ~0.1 ms: memoize
      index = self._positions[position] = int(self._stream[position])
      if len(self._positions) > self._cache_size:
        self._positions.popitem(last=False)
    doc = self._cache.get(index)
    if doc is None:
      start = time.perf_counter()
      text = _text(self._records[index], self._text_key)
      doc = self.tokenizer.encode_document(text)
      self.tokenize_stats["documents"] += 1
      self.tokenize_stats["tokens"] += doc.size
      self.tokenize_stats["seconds"] += time.perf_counter() - start
      self._cache[index] = doc
      if len(self._cache) > self._cache_size:
        self._cache.popitem(last=False)
    else:
      self._cache.move_to_end(index)
    return doc

  def _check_length(self) -> None:
    need, have = self._seq_len + 1, 0
    for position in range(self.num_documents):
      have += self._tokens(position).size
      if have >= need:
        return
    shard = (f" (process shard {self._identity['process_index']} of "
             f"{self._identity['process_count']})"
             if self._identity["process_count"] > 1 else "")
    raise ValueError(f"data.seq_len={self._seq_len} is longer than the "
                     f"{self._split} split{shard}: {have} tokens in "
                     f"{self.num_documents} document(s) with BOS/EOS")

  def _start_lanes(self) -> list[list[int]]:
    lanes = []
    for r in range(self._batch):
      # Lane r starts at document position r * n / b of the first epoch.
      position, part = divmod(r * self.num_documents, self._batch)
      offset = part * self._tokens(position).size // self._batch
      lanes.append([position, offset])
    return lanes

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch.

    Returns:
      inputs, targets: int32 [b, T]; mask: float32 [b, T];
      segment_ids: int32 [b, T] (see the module docstring).
    """
    width = self._seq_len + 1
    tokens = np.empty((self._batch, width), np.int32)
    seg = np.empty((self._batch, width), np.int32)
    for r, lane in enumerate(self._lanes):
      position, offset = lane
      filled, segment = 0, 0
      while filled < width:
        doc = self._tokens(position)
        take = min(width - filled, doc.size - offset)
        segment += 1          # every piece after the first starts a document
        tokens[r, filled:filled + take] = doc[offset:offset + take]
        seg[r, filled:filled + take] = segment
        filled += take
        offset += take
        if offset == doc.size:
          position, offset = position + 1, 0
      lane[0], lane[1] = position, offset
    return packing.finish_batch(tokens, seg, self._segment_ids)

  def get_state(self) -> dict[str, Any]:
    """JSON-able position: every lane's (document position, token offset)."""
    return {"source": "packed", "version": STATE_VERSION,
            "identity": dict(self._identity),
            "lanes": [list(lane) for lane in self._lanes]}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues exactly where `get_state` was taken.

    Raises:
      ValueError: a state of another source, data, tokenizer, split, shape
        or process.
    """
    resume.refuse_resharded(state, self.source, self._identity[
        "process_count"])
    if (not isinstance(state, dict) or state.get("source") != "packed" or
        state.get("version") != STATE_VERSION):
      raise ValueError(f"not a packed-text data state (version "
                       f"{STATE_VERSION}): keys {sorted(state or {})}")
    saved = state.get("identity")
    if isinstance(saved, dict) and saved.get("data") in self._aliases:
      saved = {**saved, "data": self._identity["data"]}
    resume.check_identity(saved, self._identity)
    lanes = state.get("lanes")
    if (not isinstance(lanes, list) or len(lanes) != self._batch or
        any(len(l) != 2 or min(l) < 0 for l in lanes)):
      raise ValueError(f"data state has malformed lanes: {lanes!r:.80}")
    self._lanes = [[int(p), int(o)] for p, o in lanes]


def _sample_lines(records: Any, text_key: str, max_chars: int
                  ) -> Iterator[str]:
  """Up to ~max_chars of lines from documents spread over `records`."""
  n = len(records)
  m = min(n, 1 << 20)
  budget = max_chars
  # Documents in a fixed pseudo-random order: the sample does not depend on
  # file order and stops at the budget without reading the whole split.
  for j in np.random.default_rng(0).permutation(m):
    for line in _text(records[int(j) * n // m], text_key).split("\n"):
      if line:
        budget -= len(line)
        yield line
    if budget <= 0:
      return


def _corpus_spec(data_cfg: Any) -> builders.CorpusSpec:
  common = dict(separator=data_cfg.doc_separator, text_key=data_cfg.text_key,
                on_decode_error=data_cfg.on_decode_error)
  if data_cfg.on_decode_error not in documents.DECODE_MODES:
    raise ValueError(f"data.on_decode_error must be one of "
                     f"{documents.DECODE_MODES}, got "
                     f"{data_cfg.on_decode_error!r}")
  if data_cfg.source == "stdlib":
    return builders.CorpusSpec(
        kind=f"stdlib_{stdlib_corpus.python_tag()}",
        train=tuple(stdlib_corpus.stdlib_files(
            data_cfg.stdlib_max_file_bytes)),
        val_fraction=data_cfg.val_fraction, fmt="file",
        train_key="the stdlib corpus", **common)
  train = documents.expand_files(data_cfg.train_files, "data.train_files")
  if not train:
    raise ValueError("data.train_files is empty (data.source='text_files')")
  val = documents.expand_files(data_cfg.val_files, "data.val_files")
  return builders.CorpusSpec(kind="text_files", train=tuple(train),
                             val=tuple(val),
                             val_fraction=data_cfg.val_fraction, **common)


def make_input(data_cfg: Any, *, split: str, seed: int,
               process_index: int = 0, process_count: int = 1,
               workdir: str | None = None) -> PackedInput:
  """Source entry point (data.source = text_files | stdlib | tfds).

  Reads data.{source, train_files, val_files, val_fraction, tfds_name,
  tfds_data_dir, vocab_size, tokenizer_model, seq_len, global_batch,
  segment_ids, on_decode_error, doc_separator, text_key,
  tokenizer_train_chars, stdlib_max_file_bytes}.

  Local corpora are prepared (TFDS array_record) under data.tfds_data_dir,
  else `<workdir>/tfds`, else TFDS's default dir; the tokenizer is kept as
  `<workdir>/tokenizer.model` (without a workdir: next to the prepared
  data, keyed by data and vocab size).

  Raises:
    ValueError / FileNotFoundError: one line naming the key or file.
  """
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if data_cfg.global_batch < 1 or data_cfg.global_batch % process_count:
    raise ValueError(f"data.global_batch={data_cfg.global_batch} must be a "
                     f"positive multiple of the process count "
                     f"{process_count}")
  text_key = data_cfg.text_key
  if data_cfg.source in ("text_files", "stdlib"):
    spec = _corpus_spec(data_cfg)
    data_dir = (data_cfg.tfds_data_dir or
                (os.path.join(workdir, TFDS_DIR) if workdir else
                 builders.default_data_dir()))
    builder = builders.prepare_corpus(spec, data_dir)
    records = builders.corpus_source(builder, split)
    train_records = functools.partial(builders.corpus_source, builder,
                                      "train")
    name, text_key = spec.cache_name(), "text"
    legacy = spec.legacy_cache_name()
    aliases = (legacy,) if legacy else ()
  elif data_cfg.source == "tfds":
    aliases = ()
    records, name = builders.catalogue_source(
        data_cfg.tfds_name, split, data_cfg.tfds_data_dir or None, text_key)

    def train_records():   # only read when a tokenizer must be trained
      return builders.catalogue_source(
          data_cfg.tfds_name, "train", data_cfg.tfds_data_dir or None,
          text_key)[0]

    data_dir = data_cfg.tfds_data_dir or builders.default_data_dir()
  else:
    raise ValueError(f"data.source={data_cfg.source!r} is not a text source")
  vocab = data_cfg.vocab_size
  store = (os.path.join(workdir, TOKENIZER_FILE) if workdir else
           os.path.join(data_dir, "tokenizers", f"{name}_bpe{vocab}.model"))

  def sample() -> Iterator[str]:
    yield from _sample_lines(train_records(), text_key,
                             data_cfg.tokenizer_train_chars)

  tok = tokenizer_lib.get_tokenizer(
      vocab_size=vocab, model_path=data_cfg.tokenizer_model,
      store_path=store, sample=sample(),
      built_from={"data": name,
                  "train_chars": data_cfg.tokenizer_train_chars},
      data_aliases=aliases)
  it = PackedInput(
      records, tokenizer=tok, seq_len=data_cfg.seq_len,
      batch=data_cfg.global_batch // process_count, split=split, seed=seed,
      segment_ids=bool(data_cfg.segment_ids), process_index=process_index,
      process_count=process_count, text_key=text_key, name=name,
      aliases=aliases, source=data_cfg.source)
  logging.info("data %s/%s: %d documents in this shard, vocab %d (%s)",
               name, split, it.num_documents, tok.vocab_size,
               tok.path or "in memory")
  return it

