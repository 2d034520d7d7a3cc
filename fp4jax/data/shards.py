"""Streaming, process-sharded, resumable reading of sharded text corpora.

Owns: expanding shard globs through fsspec (`expand_shards`), reading the
documents out of one shard of any supported format, dealing shards to
processes epoch by epoch, and the resumable positions of that stream
(`ShardReader.position`, `merge_positions`). Pure Python over fsspec,
zstandard, pyarrow and array_record: nothing here tokenizes or batches.

Shard formats (chosen by extension; anything else is refused, never read
as text):
  .txt: documents separated as in documents.py (a line equal to
    `separator`, default "<|endoftext|>", ends one; "" = empty lines).
  .jsonl, .jsonl.gz, .jsonl.zst: one JSON object per line, the document
    under `text_key`; blank lines are skipped.
  .parquet: the string column `text_key`, read one row group at a time.
  .array_record: each record one UTF-8 JSON object, the document under
    `text_key` (`encode_record` writes one), the same as a .jsonl line.
    Local files only: ArrayRecordReader opens the path itself.
  .arrow: Arrow IPC (stream or file format), the string column
    `text_key`: the shards of a Hugging Face `datasets` Dataset saved with
    `save_to_disk`. Its directory may be named instead of its files: it
    stands for the shards its state.json lists, in order (reading needs
    pyarrow only, not `datasets`).
Text is decoded as strict UTF-8 (documents.py's default replaces bad
bytes instead). Documents that are empty or whitespace only are skipped
and counted, as in documents.py.

Records: a shard is a sequence of records numbered from 0: a line of a
.jsonl*, a separator-delimited chunk of a .txt, a row of a .parquet, a
record of an .array_record. A record gives at most one document; one that
gives none (a blank line, an empty document, a skipped bad record) still
counts as a record, so record numbers depend only on the file's bytes.

Bad input: a record that is not valid UTF-8, not JSON, or without a string
`text_key`, and a shard that cannot be read on (a truncated or corrupt
compressed stream or file, a missing text column) is a bad record. With
`max_bad_records=0` (the default) the first raises a one-line ValueError
naming the file and the line, row, record or byte offset; with N > 0 bad
records are skipped, counted (`ShardStats.bad_records`) and logged, and
the (N+1)-th raises. A bad shard ends there: its later records are not
read. An empty shard (no records, zero bytes included) is counted
(`ShardStats.empty_shards`) and logged, not an error.

Dealing (each epoch): with n shards and P processes, each shard is cut
into m = ceil(P / n) pieces when n < P (else m = 1); piece j of a shard
holds its records i with i % m == j. The epoch's pieces ("units") are
listed shard by shard, the shards in an order fixed by (seed, epoch)
(sorted by sha256 of "seed:epoch:index"; file order if shuffle=False).
Process p reads units p, p + P, p + 2P, ... of that list, each from its
first record, one after another; then it starts the next epoch without
waiting for the others (so processes may be an epoch apart). n * m >= P,
so every process has work, and the units partition the records, so an
epoch reads every record, hence every document, exactly once. Costs: a
piece of a compressed or text shard is found by reading the whole
stream (m pieces decompress it m times), and restarting inside one
re-reads its records up to the position; .parquet skips whole row groups
and .array_record reads the wanted records only.

Positions and the resume rule. A process's position (`position()`) is
{epoch e, unit k, record c}: it has read its units before k in epoch e
and the first c records (of that piece) of its unit k. Restarting the
same process (same shards, seed, P and p) from it yields exactly the rest
of its stream, in the same order.

To resume on another process count, `merge_positions` turns the P
positions of one moment into a global position that does not mention P:
per unfinished epoch, the units read whole ("done", by place in the
epoch's list) and, for units begun, how many of their records were read
("partial"). A reader started from it with any P' lists the epoch's units
as before, drops the done ones, and deals the rest round robin to its P'
processes; a begun unit restarts after its partial count, and keeps the
piece count m of the epoch that cut it. Epochs nobody had begun start
afresh, cut for P'. Why nothing repeats or is skipped: a unit is only
ever read by one process at a time, from a record count on, in record
order, so what an epoch has read is always "the done units, plus the
first c records of each partial unit"; a merge records exactly that set
and a resumed reader reads exactly its complement, split disjointly
between processes. A position carries the global position its reader
started from (pruned to epochs not yet passed), so resuming again, on
any count, composes. Positions stay small: done units are stored as "all
below F, and these few above", and there is one partial count per unit
begun (about one per process per resume).

Must not import: jax, tensorflow_datasets, grain, sentencepiece,
ml_collections, or any fp4jax module but documents.
"""

import contextlib
import dataclasses
import glob
import gzip
import hashlib
import io
import json
import os
import zlib
from collections.abc import Iterator, Sequence
from typing import Any

import fsspec
from absl import logging
import numpy as np
import zstandard

from fp4jax.data import documents

# Longest first: ".jsonl.gz" must not be taken for an unknown ".gz".
EXTENSIONS = (".jsonl.zst", ".jsonl.gz", ".jsonl", ".txt", ".parquet",
              ".array_record", ".arrow")
HF_STATE = "state.json"           # a `datasets` Dataset.save_to_disk dir
HF_DICT = "dataset_dict.json"     # a DatasetDict's: one folder per split
POSITION_VERSION = 1
_CHUNK = 1 << 20             # compressed bytes read per zstd step
_ARRAY_RECORD_BATCH = 256    # records fetched per ArrayRecordReader.read


class _BadShard(Exception):
  """A shard that cannot be read on (message names file and where)."""


@dataclasses.dataclass
class ShardStats:
  """What a reader found so far (for logs and error messages)."""
  documents: int = 0
  chars: int = 0
  records: int = 0         # records read, documents or not
  bad_records: int = 0     # skipped under max_bad_records
  skipped_empty: int = 0   # empty or whitespace-only documents left out
  empty_shards: int = 0    # shards without a record (counted once, piece 0)


def shard_format(path: str) -> str:
  """The extension of `path` that picks its reader, one of EXTENSIONS.

  Raises:
    ValueError: an unsupported extension (one line, naming the file).
  """
  name = path.lower()
  for ext in EXTENSIONS:
    if name.endswith(ext):
      return ext
  raise ValueError(f"{path}: unsupported shard extension; supported: "
                   f"{', '.join(EXTENSIONS)}")


def _is_local(fs: Any) -> bool:
  protocol = fs.protocol if isinstance(fs.protocol, tuple) else (
      fs.protocol,)
  return "file" in protocol


def _shard_files(pattern: str, key: str) -> list[str]:
  """The files a path, URL or glob names, through fsspec: absolute local
  paths, or URLs with their protocol (glob matches sorted)."""
  fs, path = fsspec.core.url_to_fs(pattern)
  if not glob.has_magic(path) and fs.isdir(path):
    found = _hf_files(fs, path.rstrip("/"), key, pattern)
  else:
    found = documents.match(path, key, fs.glob, fs.isfile, shown=pattern)
  return [os.path.abspath(p) if _is_local(fs) else fs.unstrip_protocol(p)
          for p in found]


def _hf_files(fs: Any, path: str, key: str, shown: str) -> list[str]:
  """The .arrow shards of a Hugging Face `datasets` directory, in order.

  Raises:
    ValueError: a DatasetDict (names its splits), or a directory that is
      not a saved dataset.
  """
  if fs.isfile(f"{path}/{HF_DICT}"):
    with fs.open(f"{path}/{HF_DICT}", "rb") as f:
      splits = json.load(f).get("splits", [])
    raise ValueError(f"{key}: {shown!r} holds the splits {splits} of a "
                     f"Hugging Face DatasetDict; name one split's folder, "
                     f"e.g. {shown.rstrip('/')}/{(splits or ['train'])[0]}")
  if not fs.isfile(f"{path}/{HF_STATE}"):
    raise ValueError(f"{key}: {shown!r} is a directory, not a shard, a "
                     f"glob or a saved Hugging Face dataset (no {HF_STATE})")
  with fs.open(f"{path}/{HF_STATE}", "rb") as f:
    state = json.load(f)
  names = [d["filename"] for d in state.get("_data_files", [])]
  if not names:
    raise ValueError(f"{key}: {shown!r}/{HF_STATE} lists no data files")
  for name in names:
    if not fs.isfile(f"{path}/{name}"):
      raise FileNotFoundError(f"{key}: {shown!r}/{HF_STATE} lists "
                              f"{name!r}, which is missing")
  return [f"{path}/{n}" for n in names]


def expand_shards(patterns: str | Sequence[str],
                  key: str = "data.shards") -> list[str]:
  """Shard paths or URLs named by `patterns`, each format checked.

  Args:
    patterns: a path, URL or glob (fsspec: "memory://...", "gs://..." with
      gcsfs installed), a comma-separated string of them, or a sequence.
      Glob matches are sorted; duplicates are dropped; otherwise the given
      order is kept.
    key: the config key the patterns came from (for error messages).

  Returns:
    Absolute local paths, or URLs with their protocol for other
    filesystems; `ShardReader` opens either.

  Raises:
    FileNotFoundError: a path that is not a file or a glob matching none.
    ValueError: a file with an unsupported extension.
  """
  out = documents.expand_files(patterns, key, resolve=_shard_files)
  for path in out:
    shard_format(path)
  return out


def encode_record(text: str, text_key: str = "text") -> bytes:
  """One .array_record record holding `text`, as ShardReader reads it."""
  return json.dumps({text_key: text}, ensure_ascii=False).encode("utf-8")


def _one_line(e: BaseException) -> str:
  return " ".join(str(e).split()) or type(e).__name__


class _ZstdReader(io.RawIOBase):
  """The decompressed bytes of a zstd stream; raises if it is truncated.

  zstandard's stream_reader hands back a truncated frame's bytes and then
  a clean EOF (zstandard 0.22 to 0.25), which would make a cut shard look
  whole; a decompressobj's `eof` says whether its frame ended. Frames
  follow each other (as `zstd` writes concatenated input).
  """

  def __init__(self, raw: Any):
    super().__init__()
    self._raw = raw
    self._dctx = zstandard.ZstdDecompressor()
    self._dobj = self._dctx.decompressobj()
    self._in_frame = False
    self._buf = b""
    self._pos = 0

  def readable(self) -> bool:
    return True

  def _feed(self, data: bytes) -> bytes:
    out = []
    while data:
      out.append(self._dobj.decompress(data))
      self._in_frame = True
      if self._dobj.eof:
        data = self._dobj.unused_data
        self._dobj = self._dctx.decompressobj()
        self._in_frame = False
      else:
        data = b""
    return b"".join(out)

  def readinto(self, b: Any) -> int:
    while self._pos >= len(self._buf):
      chunk = self._raw.read(_CHUNK)
      if not chunk:
        if self._in_frame:
          raise _BadShard("zstd stream ends inside a frame (truncated)")
        return 0
      self._buf, self._pos = self._feed(chunk), 0
    n = min(len(b), len(self._buf) - self._pos)
    b[:n] = self._buf[self._pos:self._pos + n]
    self._pos += n
    return n


class _ShardFile:
  """Reads the wanted records of one shard: indices first, first + step, ...

  `records()` yields (record index, document or None); None is a record
  that gives no document (blank line, bad record already reported). Bad
  records go to `bad(message)`, which raises or counts.
  """

  def __init__(self, path: str, *, text_key: str, separator: str,
               bad: Any, tokens: bool = False):
    self.path = path
    self.fmt = shard_format(path)
    self.tokens = tokens
    if tokens and self.fmt != ".array_record":
      raise ValueError(f"{path}: token shards are .array_record files")
    self.text_key = text_key
    self.separator = separator
    self.bad = bad
    self.total: int | None = None   # records in the file, once known

  def records(self, first: int, step: int
              ) -> Iterator[tuple[int, str | None]]:
    try:
      if self.fmt in (".jsonl", ".jsonl.gz", ".jsonl.zst"):
        yield from self._jsonl(first, step)
      elif self.fmt == ".txt":
        yield from self._txt(first, step)
      elif self.fmt == ".parquet":
        yield from self._parquet(first, step)
      elif self.fmt == ".arrow":
        yield from self._arrow(first, step)
      else:
        yield from self._array_record(first, step)
    except _BadShard as e:
      self.bad(f"{self.path}: {e}")

  @contextlib.contextmanager
  def _lines(self) -> Iterator[Any]:
    """The shard's decompressed bytes, iterable by line (b"\\n" kept)."""
    with fsspec.open(self.path, "rb") as raw:
      if self.fmt == ".jsonl.gz":
        with gzip.GzipFile(fileobj=raw, mode="rb") as stream:
          yield stream
      elif self.fmt == ".jsonl.zst":
        with io.BufferedReader(_ZstdReader(raw)) as stream:
          yield stream
      else:
        yield raw

  def _iter_lines(self, stream: Any, where: Any) -> Iterator[bytes]:
    """Lines of `stream`; a decompression failure is a _BadShard.

    Args:
      stream: from `_lines`.
      where: () -> str, the lines read so far (for the message).
    """
    try:
      yield from stream
    except (_BadShard, EOFError, gzip.BadGzipFile, zlib.error,
            zstandard.ZstdError) as e:
      raise _BadShard(f"corrupt or truncated {self.fmt} stream after "
                      f"{where()} ({_one_line(e)})") from None

  def _decode(self, raw: bytes, where: str, offset: int) -> str | None:
    try:
      return raw.decode("utf-8")
    except UnicodeDecodeError as e:
      self.bad(f"{where}: invalid UTF-8 at byte offset {offset + e.start}")
      return None

  def _json_text(self, raw: bytes, where: str, offset: int) -> str | None:
    line = self._decode(raw, where, offset)
    if line is None or not line.strip():
      return None
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      self.bad(f"{where}: not valid JSON ({e.msg})")
      return None
    if not isinstance(obj, dict) or not isinstance(obj.get(self.text_key),
                                                   str):
      self.bad(f"{where}: no string field {self.text_key!r} (text_key)")
      return None
    return obj[self.text_key]

  def _jsonl(self, first: int, step: int):
    n, offset = 0, 0
    with self._lines() as stream:
      for raw in self._iter_lines(stream, lambda: f"line {n}"):
        i, n = n, n + 1
        if i >= first and (i - first) % step == 0:
          yield i, self._json_text(raw, f"{self.path}:{n}", offset)
        offset += len(raw)
    self.total = n

  def _txt(self, first: int, step: int):
    # documents.py's splitting, on bytes (its reader opens local paths
    # only): a line equal to the separator ends a document and the newline
    # before it belongs to the separator.
    sep = self.separator.encode("utf-8")
    index, lineno, offset = 0, 0, 0
    parts: list[bytes] = []
    start_line, start_offset, has_lines = 1, 0, False

    def flush():
      raw = b"".join(parts)
      if raw.endswith(b"\n"):
        raw = raw[:-2] if raw.endswith(b"\r\n") else raw[:-1]
      parts.clear()
      try:
        return raw.decode("utf-8")
      except UnicodeDecodeError as e:
        line = start_line + raw.count(b"\n", 0, e.start)
        self.bad(f"{self.path}:{line}: document {index}: invalid UTF-8 at "
                 f"byte offset {start_offset + e.start}")
        return None

    with self._lines() as stream:
      for raw in self._iter_lines(stream, lambda: f"line {lineno}"):
        lineno += 1
        wanted = index >= first and (index - first) % step == 0
        if raw.rstrip(b"\r\n") == sep:
          if wanted:
            yield index, flush()
          index += 1
          start_line, start_offset, has_lines = lineno + 1, offset + len(
              raw), False
        else:
          has_lines = True
          if wanted:
            parts.append(raw)
        offset += len(raw)
      if has_lines:     # a file ending in a separator ends there
        if index >= first and (index - first) % step == 0:
          yield index, flush()
        index += 1
    self.total = index

  def _parquet(self, first: int, step: int):
    # pyarrow and array_record are imported when a shard needs them: a
    # .jsonl-only run (and every import of this module) skips their
    # import time.
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    fs, path = fsspec.core.url_to_fs(self.path)
    if self._empty(fs, path):
      return
    with fs.open(path, "rb") as f:
      try:
        pf = pq.ParquetFile(f)
      except (pyarrow.ArrowException, OSError) as e:
        raise _BadShard(f"not a readable parquet file ({_one_line(e)})"
                        ) from None
      self._check_text_column(pf.schema_arrow)
      row = 0
      for group in range(pf.metadata.num_row_groups):
        rows = pf.metadata.row_group(group).num_rows
        end, start = row + rows, max(first, row)
        start += (first - start) % step     # the next wanted index
        if start < end:
          try:
            column = pf.read_row_group(group, columns=[self.text_key])
          except (pyarrow.ArrowException, OSError) as e:
            raise _BadShard(f"row group {group}: unreadable "
                            f"({_one_line(e)})") from None
          yield from self._rows(column.column(0), row, start, end, step)
        row = end
      self.total = row

  def _empty(self, fs: Any, path: str) -> bool:
    """Whether the file has zero bytes (an empty shard: 0 records)."""
    if fs.size(path):
      return False
    self.total = 0
    return True

  def _check_text_column(self, schema: Any) -> None:
    import pyarrow  # pylint: disable=g-import-not-at-top
    at = schema.get_field_index(self.text_key)
    if at < 0:
      raise _BadShard(f"no column {self.text_key!r} (text_key); columns: "
                      f"{', '.join(schema.names)}")
    kind = schema.field(at).type
    if not (pyarrow.types.is_string(kind)
            or pyarrow.types.is_large_string(kind)):
      raise _BadShard(f"column {self.text_key!r} (text_key) is {kind}, "
                      f"not a string")

  def _rows(self, column: Any, row: int, start: int, end: int, step: int
            ) -> Iterator[tuple[int, str | None]]:
    """Rows start, start + step, ... < end of a text column whose first
    row is number `row`; a null is a bad record."""
    values = column.to_pylist()
    for i in range(start, end, step):
      text = values[i - row]
      if text is None:
        self.bad(f"{self.path}: row {i}: {self.text_key!r} is null")
      yield i, text

  def _arrow(self, first: int, step: int):
    # A Hugging Face `datasets` shard (Dataset.save_to_disk): Arrow IPC,
    # stream format (the file format is read too), one record batch at a
    # time.
    import pyarrow  # pylint: disable=g-import-not-at-top
    import pyarrow.ipc  # pylint: disable=g-import-not-at-top
    fs, path = fsspec.core.url_to_fs(self.path)
    if self._empty(fs, path):
      return
    with fs.open(path, "rb") as f:
      try:
        batches = pyarrow.ipc.open_stream(f)
      except (pyarrow.ArrowException, OSError):
        f.seek(0)
        try:
          batches = pyarrow.ipc.open_file(f)
        except (pyarrow.ArrowException, OSError) as e:
          raise _BadShard(f"not a readable Arrow IPC file "
                          f"({_one_line(e)})") from None
      self._check_text_column(batches.schema)
      at = batches.schema.get_field_index(self.text_key)
      if isinstance(batches, pyarrow.ipc.RecordBatchFileReader):
        chunks = (batches.get_batch(i)
                  for i in range(batches.num_record_batches))
      else:
        chunks = iter(batches)
      row = 0
      while True:
        try:
          batch = next(chunks, None)
        except (pyarrow.ArrowException, OSError) as e:
          raise _BadShard(f"record batch after row {row}: unreadable "
                          f"({_one_line(e)})") from None
        if batch is None:
          break
        end, start = row + batch.num_rows, max(first, row)
        start += (first - start) % step
        if start < end:
          yield from self._rows(batch.column(at), row, start, end, step)
        row = end
      self.total = row

  def _array_record(self, first: int, step: int):
    # pylint: disable-next=g-import-not-at-top
    from array_record.python import array_record_module
    fs, path = fsspec.core.url_to_fs(self.path)
    if not _is_local(fs):
      raise ValueError(f"{self.path}: .array_record shards must be local "
                       f"files (ArrayRecordReader opens the path itself)")
    if self._empty(fs, path):
      return
    try:
      reader = array_record_module.ArrayRecordReader(path)
    except RuntimeError as e:
      raise _BadShard(f"not a readable array_record file "
                      f"({_one_line(e)})") from None
    try:
      # A truncated file opens with ok() False and no records, which would
      # pass for an empty shard.
      if not reader.ok():
        raise _BadShard("not a readable array_record file (truncated or "
                        "corrupt footer)")
      total = reader.num_records()
      wanted = range(first, total, step)
      for at in range(0, len(wanted), _ARRAY_RECORD_BATCH):
        indices = list(wanted[at:at + _ARRAY_RECORD_BATCH])
        try:
          batch = reader.read(indices)
        except RuntimeError as e:
          raise _BadShard(f"records {indices[0]}..{indices[-1]}: corrupt "
                          f"({_one_line(e)})") from None
        for i, raw in zip(indices, batch):
          if self.tokens:
            yield i, _token_record(raw, self.path, i, self.bad)
          else:
            yield i, self._json_text(raw, f"{self.path}: record {i}", 0)
      self.total = total
    finally:
      # A reader that failed reports the failure again on close.
      with contextlib.suppress(RuntimeError):
        reader.close()


def _token_record(raw: bytes, path: str, index: int, bad: Any
                  ) -> np.ndarray | None:
  """A prepared record: the document's int32 ids (little-endian)."""
  if len(raw) % 4:
    bad(f"{path}: record {index}: {len(raw)} bytes is not a whole number "
        f"of int32 token ids")
    return None
  return np.frombuffer(raw, "<i4").astype(np.int32)


def encode_tokens(ids: np.ndarray) -> bytes:
  """One token-shard record (`ShardReader(tokens=True)`) holding `ids`."""
  return np.asarray(ids, "<i4").tobytes()


# --- dealing and positions -------------------------------------------------


def _fingerprint(shards: Sequence[str]) -> str:
  return hashlib.sha256("\n".join(shards).encode("utf-8")).hexdigest()[:16]


def _pieces(num_shards: int, process_count: int) -> int:
  return 1 if num_shards >= process_count else -(-process_count //
                                                  num_shards)


def _units(num_shards: int, pieces: int, seed: int, epoch: int,
           shuffle: bool) -> list[tuple[int, int]]:
  """The epoch's (shard index, piece) list, in dealing order."""
  order = list(range(num_shards))
  if shuffle:
    # A hash, not an RNG: the order is the same on every Python / numpy.
    order.sort(key=lambda s: hashlib.sha256(
        f"{seed}:{epoch}:{s}".encode()).digest())
  return [(s, j) for s in order for j in range(pieces)]


def _epoch_state(epoch: int, pieces: int, done: set[int],
                 partial: dict[int, int]) -> dict[str, Any]:
  """A JSON-able epoch state; `done` stored as a prefix plus extras."""
  below = 0
  while below in done:
    below += 1
  return {"epoch": epoch, "pieces": pieces, "done_below": below,
          "done": sorted(u for u in done if u > below),
          "partial": sorted([u, c] for u, c in partial.items()
                            if u not in done and c > 0)}


def _state_sets(state: dict[str, Any]) -> tuple[set[int], dict[int, int]]:
  done = set(range(state["done_below"])) | set(state["done"])
  return done, {u: c for u, c in state["partial"]}


@dataclasses.dataclass
class _Plan:
  """One process's units of one epoch and where each starts."""
  epoch: int
  pieces: int
  units: list[tuple[int, int]]   # (shard, piece) per unit, in read order
  slots: list[int]               # each unit's position in the epoch list
  starts: list[int]              # records of each unit read before


def _plan(num_shards: int, process_count: int, process_index: int,
          seed: int, shuffle: bool, epoch: int,
          base: dict[str, Any] | None) -> _Plan:
  pieces = base["pieces"] if base else _pieces(num_shards, process_count)
  units = _units(num_shards, pieces, seed, epoch, shuffle)
  done, partial = _state_sets(base) if base else (set(), {})
  left = [u for u in range(len(units)) if u not in done]
  slots = left[process_index::process_count]
  return _Plan(epoch, pieces, [units[u] for u in slots], slots,
               [partial.get(u, 0) for u in slots])


class ShardReader:
  """This process's documents, epoch after epoch, with a resumable position.

  Iterating yields document strings. `position()` after any document is a
  small JSON-able dict; a reader built with `position=` that dict (same
  shards, seed, process count and index) yields exactly the documents the
  first would have yielded next. A dict from `merge_positions` may be
  passed with any process count instead (module docstring).

  Args:
    shards: shard paths or URLs (`expand_shards`), at least one.
    process_count: number of processes reading the corpus together.
    process_index: this process, in [0, process_count).
    seed: shard order seed (the order changes every epoch).
    epoch: the first epoch (ignored when resuming from a position).
    num_epochs: stop before this epoch; None = never stop.
    shuffle: False reads the shards in the given order every epoch.
    position: a `position()` or `merge_positions` dict to resume from.
    text_key: JSON field / parquet column holding the document.
    separator: .txt document separator line ("" = empty lines).
    max_bad_records: bad records skipped (and counted) before one raises.
    tokens: the shards are prepared token shards (.array_record records of
      int32 ids, `encode_tokens`): yields int32 [n] arrays, not strings.

  Raises:
    ValueError: no shards, an unsupported extension, bad process index,
      or a position saved for other shards, seed or process layout.
  """

  def __init__(self, shards: Sequence[str], *, process_count: int = 1,
               process_index: int = 0, seed: int = 0, epoch: int = 0,
               num_epochs: int | None = None, shuffle: bool = True,
               position: dict[str, Any] | None = None,
               text_key: str = "text",
               separator: str = documents.DEFAULT_SEPARATOR,
               max_bad_records: int = 0, tokens: bool = False):
    self.shards = list(shards)
    if not self.shards:
      raise ValueError("ShardReader: no shards")
    for path in self.shards:
      shard_format(path)
    if process_count < 1 or not 0 <= process_index < process_count:
      raise ValueError(f"process_index={process_index} out of range for "
                       f"process_count={process_count}")
    if max_bad_records < 0:
      raise ValueError(f"max_bad_records must be >= 0, got "
                       f"{max_bad_records}")
    self.process_count = process_count
    self.process_index = process_index
    self.seed = seed
    self.shuffle = shuffle
    self.num_epochs = num_epochs
    self.text_key = text_key
    self.separator = separator
    self.max_bad_records = max_bad_records
    self.tokens = tokens
    self.stats = ShardStats()
    self._fingerprint = _fingerprint(self.shards)
    self._start: list[dict[str, Any]] = []   # global states, by epoch
    self._start_all: list[dict[str, Any]] = []   # never pruned
    self._epoch, self._unit, self._record = epoch, 0, None
    if position is not None:
      self._resume(position)
    self._it = self._documents()

  def _check(self, position: dict[str, Any]) -> None:
    if position.get("version") != POSITION_VERSION:
      raise ValueError(f"shard position version {position.get('version')}"
                       f", expected {POSITION_VERSION}")
    if (position["shards"] != self._fingerprint
        or position["num_shards"] != len(self.shards)):
      raise ValueError(f"shard position was saved for another shard list "
                       f"({position['num_shards']} shards, fingerprint "
                       f"{position['shards']}; now {len(self.shards)}, "
                       f"{self._fingerprint})")
    if position["seed"] != self.seed or position["shuffle"] != self.shuffle:
      raise ValueError(f"shard position was saved with seed="
                       f"{position['seed']} shuffle={position['shuffle']}; "
                       f"now seed={self.seed} shuffle={self.shuffle}")

  def _resume(self, position: dict[str, Any]) -> None:
    self._check(position)
    self._start = [dict(s) for s in position["start"]]
    self._start_all = list(self._start)
    if position["kind"] == "global":
      self._epoch, self._unit, self._record = position["epoch"], 0, None
      return
    if (position["process_count"], position["process_index"]) != (
        self.process_count, self.process_index):
      raise ValueError(
          f"shard position of process {position['process_index']}/"
          f"{position['process_count']} given to process "
          f"{self.process_index}/{self.process_count}; resume on another "
          f"process count from merge_positions() of all processes")
    self._epoch, self._unit = position["epoch"], position["unit"]
    self._record = position["record"]

  def _base(self, epoch: int) -> dict[str, Any] | None:
    return next((s for s in self._start if s["epoch"] == epoch), None)

  def position(self) -> dict[str, Any]:
    """Where this process is: JSON-able, for `position=` or merging."""
    return self.position_at(self.cursor())

  def cursor(self) -> tuple[int, int, int | None]:
    """Where this process is, as a cheap tuple for `position_at` (taken
    after each document by a consumer that may stop at any of them)."""
    return self._epoch, self._unit, self._record

  def position_at(self, cursor: tuple[int, int, int | None]
                  ) -> dict[str, Any]:
    """The `position()` this reader had when `cursor()` returned `cursor`."""
    epoch, unit, record = cursor
    if record is None:   # nothing read in this unit yet: its start count
      plan = _plan(len(self.shards), self.process_count, self.process_index,
                   self.seed, self.shuffle, epoch,
                   next((s for s in self._start_all if s["epoch"] == epoch),
                        None))
      record = plan.starts[unit] if unit < len(plan.starts) else 0
    return {"version": POSITION_VERSION, "kind": "process",
            "shards": self._fingerprint, "num_shards": len(self.shards),
            "seed": self.seed, "shuffle": self.shuffle,
            "process_count": self.process_count,
            "process_index": self.process_index, "epoch": epoch,
            "unit": unit, "record": record,
            "start": [s for s in self._start_all if s["epoch"] >= epoch]}

  def __iter__(self) -> "ShardReader":
    return self

  def __next__(self) -> str:
    return next(self._it)

  def _bad(self, message: str) -> None:
    self.stats.bad_records += 1
    if self.stats.bad_records > self.max_bad_records:
      raise ValueError(f"{message} (bad record {self.stats.bad_records}, "
                       f"max_bad_records={self.max_bad_records})")
    logging.warning("shards: skipped bad record %d/%d: %s",
                    self.stats.bad_records, self.max_bad_records, message)

  def _documents(self) -> Iterator[str]:
    while self.num_epochs is None or self._epoch < self.num_epochs:
      base = self._base(self._epoch)
      plan = _plan(len(self.shards), self.process_count, self.process_index,
                   self.seed, self.shuffle, self._epoch, base)
      whole = self._unit == 0 and self._record is None
      found = 0
      while self._unit < len(plan.units):
        shard, piece = plan.units[self._unit]
        if self._record is None:
          self._record = plan.starts[self._unit]
        reader = _ShardFile(self.shards[shard], text_key=self.text_key,
                            separator=self.separator, bad=self._bad,
                            tokens=self.tokens)
        for i, text in reader.records(piece + plan.pieces * self._record,
                                      plan.pieces):
          self._record = (i - piece) // plan.pieces + 1
          self.stats.records += 1
          if text is None:
            continue
          if not (text.size if self.tokens else text.strip()):
            self.stats.skipped_empty += 1
            continue
          self.stats.documents += 1
          self.stats.chars += len(text)
          found += 1
          yield text
        if reader.total == 0 and piece == 0:
          self.stats.empty_shards += 1
          logging.info("shards: %s is empty", self.shards[shard])
        self._unit, self._record = self._unit + 1, None
      # An endless stream over shards without documents would spin here.
      if whole and base is None and not found and self.num_epochs is None:
        raise ValueError(
            f"process {self.process_index}/{self.process_count} read no "
            f"document in epoch {self._epoch} from its {len(plan.units)} "
            f"shard piece(s) of {len(self.shards)} shards (empty, or all "
            f"skipped as bad)")
      self._epoch, self._unit, self._record = self._epoch + 1, 0, None
      self._start = [s for s in self._start if s["epoch"] >= self._epoch]


def merge_positions(positions: Sequence[dict[str, Any]]) -> dict[str, Any]:
  """The global position of one moment, from every process's position.

  Args:
    positions: `ShardReader.position()` of processes 0..P-1 (any order),
      taken at the same step (all from readers started from one position
      or none).

  Returns:
    A JSON-able dict for `ShardReader(position=...)` on any process count.

  Raises:
    ValueError: positions of other shards / seeds / process counts mixed,
      a process missing or repeated, or readers started differently.
  """
  if not positions:
    raise ValueError("merge_positions: no positions")
  head = positions[0]
  count = head["process_count"]
  same = ("version", "kind", "shards", "num_shards", "seed", "shuffle",
          "process_count")
  for pos in positions:
    if pos.get("kind") != "process":
      raise ValueError("merge_positions takes ShardReader.position() dicts")
    if any(pos[k] != head[k] for k in same):
      raise ValueError(f"merge_positions: process {pos['process_index']} "
                       f"differs from process {head['process_index']} in "
                       f"{[k for k in same if pos[k] != head[k]]}")
  by_index = {pos["process_index"]: pos for pos in positions}
  if sorted(by_index) != list(range(count)) or len(positions) != count:
    raise ValueError(f"merge_positions: need one position per process "
                     f"0..{count - 1}, got processes "
                     f"{sorted(p['process_index'] for p in positions)}")
  first = min(positions, key=lambda p: p["epoch"])
  start = {s["epoch"]: s for s in first["start"]}
  for pos in positions:
    if pos["start"] != [s for s in first["start"]
                        if s["epoch"] >= pos["epoch"]]:
      raise ValueError(f"merge_positions: process {pos['process_index']} "
                       f"was started from another position")
  n = head["num_shards"]
  last = max(p["epoch"] for p in positions)
  states: list[dict[str, Any]] = []
  begin = None      # the first epoch not finished
  end = max([last, *start]) + 1
  for epoch in range(first["epoch"], end):
    base = start.get(epoch)
    done, partial = _state_sets(base) if base else (set(), {})
    pieces = base["pieces"] if base else _pieces(n, count)
    if epoch <= last:
      for q in range(count):
        plan = _plan(n, count, q, head["seed"], head["shuffle"], epoch,
                     base)
        pos = by_index[q]
        if pos["epoch"] > epoch:
          read = len(plan.slots)
        else:
          read = pos["unit"] if pos["epoch"] == epoch else 0
        done.update(plan.slots[:read])
        if pos["epoch"] == epoch and read < len(plan.slots):
          partial[plan.slots[read]] = pos["record"]
    if begin is None:
      if len(done) == n * pieces:
        continue          # finished before any unfinished epoch: dropped
      begin = epoch
    # An untouched epoch is left out: it is read afresh, cut for the
    # count that resumes it.
    if done or any(partial.values()):
      states.append(_epoch_state(epoch, pieces, done, partial))
  return {"version": POSITION_VERSION, "kind": "global",
          "shards": head["shards"], "num_shards": n, "seed": head["seed"],
          "shuffle": head["shuffle"], "epoch": end if begin is None
          else begin, "start": states}
