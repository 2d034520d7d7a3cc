"""Streamed, packed batches from sharded corpora (data.source = "files").

Owns: `StreamInput`, the iterator that turns one or more sources of shards
(a mixture) into packed token batches with no copy of the corpus, and its
resumable state, on the same or another number of processes.

Pipeline, per process and source: a `shards.ShardReader` (this process's
share of the shards, in a seeded order per epoch) runs in a background
thread, which groups documents into batches of about `chunk_chars`
characters and hands them to a `tokenize_pool.TokenizePool` (worker
processes); up to `depth` batches are in flight per source. The consumer
takes tokenized documents in read order, so the workers decide only the
speed, never the data. Every document is tokenized once (a resume
re-tokenizes the one it stopped inside).

Packing: the chosen documents, each [BOS] + tokens + [EOS], are
concatenated into one stream per process and cut into rows of seq_len + 1
tokens, b = global_batch / process_count consecutive rows per batch:
inputs = row[:-1], targets = row[1:]. `packing.finish_batch` gives the
mask and segment_ids exactly as for the other text sources.

Mixtures: with several sources (`data.mixture`), each next document comes
from the source whose share of the tokens taken so far is furthest below
its weight (ties: the first listed), counting each document whole when it
is taken. No random draw: the choice depends only on the documents, so it
is deterministic and resumes exactly. `realized()` gives the shares.

Validation: `data.val_files` are a source of their own, read in file
order; without them a document is held out when the first 8 bytes of its
SHA-256 (of its UTF-8 text, or of its ids for prepared shards), read as an
integer, fall below data.val_fraction * 2**64. The train stream skips held
documents and the val stream keeps only them, so the two never share one,
whatever the process count. (Finding them reads the whole corpus order
up to the batches wanted; set data.val_files for a large corpus.)

State (`get_state`, per process, JSON): per source, the reader position
before its next untaken document ("at") and its tokens taken; the
document being cut ("current": source, tokens already used, the position
after it). Same process count: every stream restarts at "at" and the
current document is re-tokenized and cut at the same token, so the next
batch is identical. Another process count (`set_state` given the states
of all old processes, `fp4jax.data.resharded`): each source's positions
are merged (`shards.merge_positions`) with the current documents counted
as read, so nothing is repeated or skipped: the document a process was
inside loses its untaken tail. Token counts are summed and split evenly.

Must not import: jax, ml_collections, tensorflow_datasets, grain, or fp4jax
modules outside fp4jax.data.
"""

import atexit
import dataclasses
import hashlib
import json
import queue
import threading
import weakref
from collections.abc import Sequence
from typing import Any

from absl import logging
import numpy as np

from fp4jax.data import packing
from fp4jax.data import resume
from fp4jax.data import shards as shards_lib
from fp4jax.data import tokenize_pool
from fp4jax.data import tokenizer as tokenizer_lib

STATE_VERSION = 1
SPLITS = packing.SPLITS
# A batch handed to the tokenizer: ~16k tokens of English, tens of ms of
# one worker, far above the cost of passing it between processes.
CHUNK_CHARS = 65536
_STOP_POLL = 0.1   # seconds between the reader thread's looks at `stop`


@dataclasses.dataclass(frozen=True)
class Source:
  """One corpus of a (possibly one-source) mixture.

  Attributes:
    name: its name in logs, states and the realized shares.
    shards: expanded shard paths or URLs (`shards.expand_shards`).
    weight: its share of the tokens (weights are normalized).
    tokens: prepared token shards (ids, no tokenizing).
  """
  name: str
  shards: tuple[str, ...]
  weight: float = 1.0
  tokens: bool = False


def held_out(doc: Any, fraction: float) -> bool:
  """Whether document `doc` (str, or int32 ids) is in the val split."""
  data = doc.encode("utf-8", "surrogatepass") if isinstance(doc, str) else (
      np.asarray(doc, "<i4").tobytes())
  head = int.from_bytes(hashlib.sha256(data).digest()[:8], "big")
  return head < fraction * 2.0**64


# Every open stream, closed at exit: a reader thread still inside zstd or
# SentencePiece while the interpreter finalizes aborts the process.
_OPEN: "weakref.WeakSet[_DocStream]" = weakref.WeakSet()


@atexit.register
def _close_all() -> None:
  for stream in list(_OPEN):
    stream.close()


class _End:
  """Put in the queue when a reader with a last epoch has read it."""


class _DocStream:
  """One source's tokenized documents in read order.

  `next()` -> (ids int32 [n], the reader cursor just after the document),
  raising StopIteration at the end of a finite stream and re-raising the
  reader thread's error (a bad shard) where it happened in the stream.
  """

  def __init__(self, reader: shards_lib.ShardReader,
               pool: tokenize_pool.TokenizePool, *, keep: Any,
               depth: int, chunk_chars: int, what: str):
    self.reader = reader
    self.start = reader.cursor()
    self._pool = pool
    self._keep = keep            # doc -> bool (the held-out filter), or None
    self._chunk_chars = chunk_chars
    self._what = what
    self._queue: queue.Queue = queue.Queue(maxsize=depth)
    self._stop = threading.Event()
    self._ids = np.zeros((0,), np.int32)
    self._bounds: list[tuple[int, int]] = []
    self._cursors: list[Any] = []
    self._next = 0
    self.tokenized = 0           # tokens of every batch handed back so far
    self.seconds = 0.0           # tokenizer time of those batches
    self._thread = threading.Thread(target=self._run, daemon=True,
                                    name=f"fp4jax-data-{what}")
    _OPEN.add(self)
    self._thread.start()

  def _put(self, item: Any) -> bool:
    while not self._stop.is_set():
      try:
        self._queue.put(item, timeout=_STOP_POLL)
        return True
      except queue.Full:
        continue
    return False

  def _run(self) -> None:
    texts, cursors = [], []
    try:
      chars = 0
      epoch, kept = self.start[0], 0
      for doc in self.reader:
        cursor = self.reader.cursor()
        if cursor[0] != epoch:     # an epoch passed
          if not kept and self._keep is not None:
            raise ValueError(f"{self._what}: no document of an epoch is in "
                             f"this split (data.val_fraction too small "
                             f"for the corpus?)")
          epoch, kept = cursor[0], 0
        if self._keep is not None and not self._keep(doc):
          continue
        kept += 1
        texts.append(doc)
        cursors.append(cursor)
        chars += len(doc)
        if chars >= self._chunk_chars:
          if not self._submit(texts, cursors):
            return
          texts, cursors, chars = [], [], 0
      if texts and not self._submit(texts, cursors):
        return
      self._put(_End())
    except BaseException as e:  # handed to the consumer, raised there
      # The documents read before the error come first.
      try:
        handed = not texts or self._submit(texts, cursors)
      except BaseException:  # the pool itself failed: say the first error
        handed = True
      if handed:
        self._put(e)

  def _submit(self, docs: list[Any], cursors: list[Any]) -> bool:
    if self.reader.tokens:
      lengths = np.array([d.size for d in docs], np.int32)
      handle = tokenize_pool.Done((np.concatenate(docs), lengths, 0.0))
    else:
      handle = self._pool.submit(docs)
    return self._put((handle, cursors))

  def next(self) -> tuple[np.ndarray, Any]:
    if self._next == len(self._bounds):
      item = self._queue.get()
      if isinstance(item, _End):
        self._queue.put(item)
        raise StopIteration
      if isinstance(item, BaseException):
        self._queue.put(item)
        raise item
      handle, self._cursors = item
      self._ids, lengths, seconds = handle.result()
      self.tokenized += self._ids.size
      self.seconds += seconds
      ends = np.cumsum(lengths)
      self._bounds = list(zip((ends - lengths).tolist(), ends.tolist()))
      self._next = 0
    begin, end = self._bounds[self._next]
    cursor = self._cursors[self._next]
    self._next += 1
    return self._ids[begin:end], cursor

  def close(self) -> None:
    self._stop.set()
    self._thread.join()
    _OPEN.discard(self)


def _resharded_positions(states: Sequence[dict[str, Any]], source: int
                         ) -> dict[str, Any]:
  """The merged global position of `source` over every old process."""
  positions = []
  for state in states:
    entry = state["sources"][source]
    current = state.get("current")
    if current is not None and current["source"] == source:
      positions.append(current["after"])   # its document counts as read
    else:
      positions.append(entry["at"])
  return shards_lib.merge_positions(positions)


class StreamInput:
  """Iterator of packed {"inputs", "targets", "mask", "segment_ids"} batches
  streamed from shards (module docstring).

  Attributes:
    vocab_size: the tokenizer's vocabulary size.
    tokenizer: the `tokenizer.Tokenizer`.
    sources: the `Source`s, in mixture order.
  """

  def __init__(self, sources: Sequence[Source], *,
               tokenizer: tokenizer_lib.Tokenizer,
               pool: tokenize_pool.TokenizePool, seq_len: int, batch: int,
               split: str, seed: int, segment_ids: bool = False,
               process_index: int = 0, process_count: int = 1,
               text_key: str = "text",
               separator: str = shards_lib.documents.DEFAULT_SEPARATOR,
               max_bad_records: int = 0, holdout: float = 0.0,
               name: str = "files", chunk_chars: int = CHUNK_CHARS,
               depth: int | None = None):
    """Builds the iterator at the start of the streams (nothing is read
    until the first batch; `probe()` reads one document per source).

    Args:
      sources: the corpora; weights need not sum to 1.
      tokenizer: encodes the text sources (and names the vocabulary).
      pool: where documents are tokenized.
      seq_len: T, tokens per row.
      batch: rows per batch in this process.
      split: "train" (shards reshuffled every epoch, held-out documents
        skipped) or "val" (file order, only held-out documents when
        `holdout` > 0).
      seed: shard order seed.
      segment_ids: number documents within rows (else all ones).
      process_index, process_count: this process's share.
      text_key, separator, max_bad_records: as `shards.ShardReader`.
      holdout: data.val_fraction when the val split is held out of the
        training shards; 0 = no filter.
      name: the data's identity (state check, tokenizer record).
      chunk_chars: characters per tokenizer batch.
      depth: tokenizer batches in flight per source; None = 2 per worker
        plus 2.

    Raises:
      ValueError: one line naming the data.* key: sizes, weights.
    """
    packing.check_layout(split, seq_len, batch)
    if not sources:
      raise ValueError("data.source='files' has no sources")
    weights = np.array([s.weight for s in sources], np.float64)
    if not (np.all(np.isfinite(weights)) and np.all(weights > 0)):
      raise ValueError(f"data.mixture weights must be > 0, got "
                       f"{weights.tolist()}")
    if not 0.0 <= holdout < 1.0:
      raise ValueError(f"data.val_fraction must be in [0, 1), got {holdout}")
    self.sources = list(sources)
    self._weights = weights / weights.sum()
    self.tokenizer = tokenizer
    self.vocab_size = tokenizer.vocab_size
    self._pool = pool
    self._seq_len, self._batch = seq_len, batch
    self._split, self._seed = split, seed
    self._segment_ids = segment_ids
    self._pidx, self._pcount = process_index, process_count
    self._reader_args = dict(text_key=text_key, separator=separator,
                             max_bad_records=max_bad_records)
    self._holdout = holdout
    self._chunk_chars = chunk_chars
    self._depth = depth if depth is not None else 2 * pool.workers + 2
    self._identity = {
        "data": name, "tokenizer": tokenizer.fingerprint, "split": split,
        "seed": seed if split == "train" else None, "seq_len": seq_len,
        "sources": [[s.name, float(w)] for s, w in zip(sources,
                                                         self._weights)],
        "holdout": holdout}
    self._streams: list[_DocStream] | None = None
    self._positions: list[dict[str, Any] | None] = [None] * len(sources)
    self._taken = np.zeros((len(sources),), np.int64)
    self._at: list[Any] = [None] * len(sources)
    # The document being cut: [source, ids, tokens used, cursor after].
    self._current: list[Any] | None = None
    self._pending: tuple[int, int] | None = None  # (source, offset) to cut
    self._saved: dict[str, Any] | None = None     # set_state's, until read
    self.consumed = 0

  # --- streams ---------------------------------------------------------

  def _reader(self, i: int, position: dict[str, Any] | None
              ) -> shards_lib.ShardReader:
    return shards_lib.ShardReader(
        self.sources[i].shards, process_count=self._pcount,
        process_index=self._pidx, seed=self._seed,
        shuffle=self._split == "train", position=position,
        tokens=self.sources[i].tokens, **self._reader_args)

  def _keep(self) -> Any:
    if not self._holdout:
      return None
    want = self._split == "val"
    fraction = self._holdout
    return lambda doc: held_out(doc, fraction) == want

  def _open(self) -> list[_DocStream]:
    if self._streams is None:
      self._streams = []
      for i, source in enumerate(self.sources):
        stream = _DocStream(
            self._reader(i, self._positions[i]), self._pool,
            keep=self._keep(), depth=self._depth,
            chunk_chars=self._chunk_chars,
            what=f"{source.name}/{self._split}")
        self._streams.append(stream)
        self._at[i] = stream.start
      if self._pending is not None:
        i, offset = self._pending
        ids, cursor = self._streams[i].next()
        if offset >= ids.size:
          raise ValueError(f"data state: the document being cut has "
                           f"{ids.size} tokens, not more than {offset} "
                           f"(tokenizer or shards changed?)")
        self._current = [i, ids, offset, cursor]
        self._pending = None
      self._saved = None
    return self._streams

  def close(self) -> None:
    """Stops the reader threads (the pool is the caller's)."""
    if self._streams is not None:
      for stream in self._streams:
        stream.close()
      self._streams = None

  def probe(self) -> None:
    """Reads the first document of each source in this process's order:
    a wrong format, text key or damaged first shard fails here, in one
    line, before anything slow.

    Raises:
      ValueError: naming the shard (and line / record).
    """
    for i in range(len(self.sources)):
      reader = self._reader(i, self._positions[i])
      reader.num_epochs = reader.cursor()[0] + 1
      next(iter(reader), None)

  # --- packing ---------------------------------------------------------

  def _choose(self) -> int:
    total = self._taken.sum()
    return int(np.argmax(self._weights * total - self._taken))

  def _take_document(self) -> None:
    streams = self._open()
    i = self._choose()
    ids, cursor = streams[i].next()
    self._taken[i] += ids.size
    self._current = [i, ids, 0, cursor]

  def __iter__(self) -> "StreamInput":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The next batch: inputs, targets, segment_ids int32 [b, T]; mask
    float32 [b, T] (see packing.finish_batch)."""
    self._open()
    width = self._seq_len + 1
    tokens = np.empty((self._batch, width), np.int32)
    seg = np.empty((self._batch, width), np.int32)
    for r in range(self._batch):
      filled, segment = 0, 0
      while filled < width:
        if self._current is None:
          self._take_document()
        i, ids, used, cursor = self._current
        take = min(width - filled, ids.size - used)
        segment += 1
        tokens[r, filled:filled + take] = ids[used:used + take]
        seg[r, filled:filled + take] = segment
        filled += take
        used += take
        if used == ids.size:
          self._at[i] = cursor
          self._current = None
        else:
          self._current[2] = used
    self.consumed += tokens.size
    return packing.finish_batch(tokens, seg, self._segment_ids)

  # --- state -------------------------------------------------------------

  def realized(self) -> dict[str, float]:
    """Each source's share of the tokens taken so far."""
    total = max(int(self._taken.sum()), 1)
    return {s.name: float(t) / total for s, t in zip(self.sources,
                                                        self._taken)}

  def stats(self) -> dict[str, float]:
    """Tokens tokenized (handed back by the pool) and consumed (in
    batches) so far, and tokenizer seconds."""
    streams = self._streams or []
    return {"tokenized": sum(s.tokenized for s in streams),
            "consumed": self.consumed,
            "tokenize_seconds": sum(s.seconds for s in streams)}

  def get_state(self) -> dict[str, Any]:
    """JSON-able position (module docstring)."""
    if self._streams is None and self._saved is not None:
      return json.loads(json.dumps(self._saved))   # set, not yet read on
    sources = []
    for i in range(len(self.sources)):
      if self._streams is None:   # a start or a merged global position
        at = self._reader(i, self._positions[i]).position()
      else:
        at = self._streams[i].reader.position_at(self._at[i])
      sources.append({"at": at, "taken": int(self._taken[i])})
    current = None
    if self._current is not None:
      i, _, used, cursor = self._current
      current = {"source": i, "used": used,
                 "after": self._streams[i].reader.position_at(cursor)}
    return {"source": "files", "version": STATE_VERSION,
            "identity": dict(self._identity),
            "process_index": self._pidx, "process_count": self._pcount,
            "sources": sources, "current": current}

  def set_state(self, state: dict[str, Any]) -> None:
    """Continues where `get_state` was taken; given the states of every
    process of a run with another process count (`fp4jax.data.resharded`),
    continues their epoch with nothing repeated or skipped.

    Raises:
      ValueError: a state of another source, data, tokenizer, split or
        settings.
    """
    states = state.get("all_processes") if isinstance(state, dict) else None
    for s in states or [state]:
      if (not isinstance(s, dict) or s.get("source") != "files" or
          s.get("version") != STATE_VERSION):
        raise ValueError(f"not a data.source='files' state (version "
                         f"{STATE_VERSION}): keys {sorted(s or {})}")
      resume.check_identity(s.get("identity"), self._identity)
    self.close()
    self._current = None
    self._saved = None
    if states is None:
      self._saved = json.loads(json.dumps(state))
      self._positions = [s["at"] for s in state["sources"]]
      self._taken = np.array([s["taken"] for s in state["sources"]],
                             np.int64)
      current = state.get("current")
      self._pending = ((current["source"], current["used"])
                       if current is not None else None)
    else:
      self._positions = [_resharded_positions(states, i)
                         for i in range(len(self.sources))]
      taken = np.sum([[s["taken"] for s in st["sources"]]
                      for st in states], axis=0)
      self._taken = np.asarray(taken, np.int64) // self._pcount
      self._pending = None
      logging.info("data: resumed %s on %d processes from the positions "
                   "of %d", self._identity["data"], self._pcount,
                   len(states))
