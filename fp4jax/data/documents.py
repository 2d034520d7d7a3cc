"""Local text corpora: file lists, UTF-8 decoding and document splitting.

Owns: expanding `data.train_files` / `data.val_files` (files or globs),
reading documents out of local files, the handling of non-UTF-8 bytes
(`data.on_decode_error`) and the deterministic held-out split by document
(`data.val_fraction`). Pure Python: the TFDS builder (`builders.py`) calls it.

File formats (chosen by extension):
  .jsonl: one JSON object per line, the document under `text_key`.
  .py (and `fmt="file"`): the whole file is one document.
  anything else: plain text; a line equal to `separator` (default
    `<|endoftext|>`) ends a document; with separator "" every empty line
    does. The newline before a separator line belongs to the separator, so
    `"a\\n<|endoftext|>\\nb"` holds the documents "a" and "b".
Documents that are empty or whitespace only are skipped (and counted).

Must not import: tensorflow_datasets, grain, sentencepiece, ml_collections,
or any other fp4jax module.
"""

import dataclasses
import glob
import hashlib
import json
import os
from collections.abc import Callable, Iterator, Sequence

DECODE_MODES = ("replace", "ignore", "strict")
DEFAULT_SEPARATOR = "<|endoftext|>"


@dataclasses.dataclass
class ReadStats:
  """What reading one or more files found (for logs and error messages)."""
  documents: int = 0
  chars: int = 0
  decode_errors: int = 0   # invalid UTF-8 sequences replaced or dropped
  skipped_empty: int = 0   # whitespace-only documents left out


def file_format(path: str) -> str:
  """"jsonl", "file" (whole file = one document) or "txt", by extension."""
  ext = os.path.splitext(path)[1].lower()
  if ext == ".jsonl":
    return "jsonl"
  if ext == ".py":
    return "file"
  return "txt"


def expand_files(patterns: str | Sequence[str], key: str,
                 resolve: Callable[[str, str], list[str]] | None = None
                 ) -> list[str]:
  """Absolute paths of the files named by `patterns`, in the given order.

  Args:
    patterns: a path, a glob, a comma-separated string of them, or a
      sequence of them. Glob matches are sorted; duplicates are dropped.
    key: the config key the patterns came from (for error messages).
    resolve: (pattern, key) -> the files it names, raising
      FileNotFoundError; default: local files (`_local_files`).

  Returns:
    Absolute file paths (or whatever `resolve` names them by).

  Raises:
    FileNotFoundError: a path that is not a file or a glob matching none.
  """
  if isinstance(patterns, str):
    patterns = patterns.split(",")
  out: list[str] = []
  for pattern in patterns:
    pattern = os.path.expanduser(str(pattern).strip())
    if pattern:
      out.extend((resolve or _local_files)(pattern, key))
  return list(dict.fromkeys(out))


def _local_files(pattern: str, key: str) -> list[str]:
  """The local files a path or glob names (absolute; glob matches sorted)."""
  found = match(pattern, key, lambda g: glob.glob(g, recursive=True),
                os.path.isfile)
  return [os.path.abspath(p) for p in found]


def match(pattern: str, key: str, glob_fn: Callable[[str], list[str]],
          isfile: Callable[[str], bool], shown: str | None = None
          ) -> list[str]:
  """The files of a file system (its `glob_fn` and `isfile`) a path or
  glob names, glob matches sorted.

  Raises:
    FileNotFoundError: naming `key` and the pattern (as `shown`, default
      itself): a glob matching no file, or a path that is not a file.
  """
  shown = pattern if shown is None else shown
  if glob.has_magic(pattern):
    found = [p for p in sorted(glob_fn(pattern)) if isfile(p)]
    if not found:
      raise FileNotFoundError(f"{key}: no file matches {shown!r}")
    return found
  if isfile(pattern):
    return [pattern]
  raise FileNotFoundError(f"{key}: no such file {shown!r}")


def decode(raw: bytes, mode: str, path: str, offset: int = 0
           ) -> tuple[str, int]:
  """UTF-8 text of `raw` and the number of invalid sequences in it.

  Args:
    raw: bytes read from `path` starting at byte `offset`.
    mode: "strict" (raise), "replace" (U+FFFD per invalid sequence, as
      Python's "replace" handler) or "ignore" (drop them).
    path: file name for the error message.
    offset: byte offset of raw[0] in the file, for the error message.

  Raises:
    ValueError: mode "strict" and invalid UTF-8, naming file and offset.
  """
  try:
    return raw.decode("utf-8"), 0
  except UnicodeDecodeError as e:
    if mode == "strict":
      raise ValueError(
          f"{path}: invalid UTF-8 at byte offset {offset + e.start} "
          f"(data.on_decode_error='strict'; 'replace' would keep the "
          f"text)") from None
  # The UTF-8 decoder is stateless between characters, so resuming after
  # each error is the same as Python's handlers, and it lets us count.
  parts, errors, pos = [], 0, 0
  while True:
    try:
      parts.append(raw[pos:].decode("utf-8"))
      break
    except UnicodeDecodeError as e:
      parts.append(raw[pos:pos + e.start].decode("utf-8"))
      if mode == "replace":
        parts.append("\ufffd")
      errors += 1
      pos += e.end
  return "".join(parts), errors


def _text_documents(path: str, separator: str, mode: str,
                    stats: ReadStats) -> Iterator[str]:
  lines: list[str] = []

  def flush():
    text = "".join(lines)
    if text.endswith("\n"):      # the newline that precedes the separator
      text = text[:-2] if text.endswith("\r\n") else text[:-1]
    lines.clear()
    return text

  offset = 0
  with open(path, "rb") as f:
    for raw in f:                # binary lines keep their b"\n"
      line, errors = decode(raw, mode, path, offset)
      stats.decode_errors += errors
      offset += len(raw)
      if line.rstrip("\r\n") == separator:
        yield flush()
      else:
        lines.append(line)
  if lines:                      # a file ending in a separator ends there
    yield flush()


def _jsonl_documents(path: str, text_key: str, mode: str,
                     stats: ReadStats) -> Iterator[str]:
  offset = 0
  with open(path, "rb") as f:
    for lineno, raw in enumerate(f, 1):
      line, errors = decode(raw, mode, path, offset)
      stats.decode_errors += errors
      offset += len(raw)
      if not line.strip():
        continue
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: not valid JSON ({e.msg})"
                         ) from None
      if not isinstance(obj, dict) or not isinstance(obj.get(text_key), str):
        raise ValueError(f"{path}:{lineno}: no string field {text_key!r} "
                         f"(data.text_key)")
      yield obj[text_key]


def read_documents(path: str, *, separator: str = DEFAULT_SEPARATOR,
                   text_key: str = "text", on_decode_error: str = "replace",
                   fmt: str | None = None,
                   stats: ReadStats | None = None) -> Iterator[str]:
  """Yields the non-empty documents of one file, in file order.

  Args:
    path: the file.
    separator: plain-text document separator line ("" = empty lines).
    text_key: .jsonl field holding the document.
    on_decode_error: one of DECODE_MODES.
    fmt: "txt", "jsonl" or "file"; None = `file_format(path)`.
    stats: updated in place with counts, if given.

  Raises:
    FileNotFoundError: the file does not exist.
    ValueError: bad mode, invalid UTF-8 under "strict", or bad JSONL.
  """
  if on_decode_error not in DECODE_MODES:
    raise ValueError(f"data.on_decode_error must be one of {DECODE_MODES}, "
                     f"got {on_decode_error!r}")
  if not os.path.isfile(path):
    raise FileNotFoundError(f"no such file {path!r}")
  stats = stats if stats is not None else ReadStats()
  fmt = fmt or file_format(path)
  if fmt == "jsonl":
    docs = _jsonl_documents(path, text_key, on_decode_error, stats)
  elif fmt == "file":
    with open(path, "rb") as f:
      text, errors = decode(f.read(), on_decode_error, path)
    stats.decode_errors += errors
    docs = iter([text])
  elif fmt == "txt":
    docs = _text_documents(path, separator, on_decode_error, stats)
  else:
    raise ValueError(f"unknown file format {fmt!r} for {path}")
  for doc in docs:
    if not doc.strip():
      stats.skipped_empty += 1
      continue
    stats.documents += 1
    stats.chars += len(doc)
    yield doc


def document_hash(text: str) -> bytes:
  """Content hash deciding a document's held-out membership."""
  return hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()


def held_out(hashes: Sequence[bytes], fraction: float) -> set[int]:
  """Indices of the documents held out for validation.

  The round(fraction * n) documents (at least 1) with the smallest content
  hashes: the choice depends only on the documents, not on file order, and
  a document's membership never depends on the run, seed or process count.

  Args:
    hashes: `document_hash` of every training document, in order.
    fraction: the held-out share, in (0, 1).

  Raises:
    ValueError: fraction outside (0, 1), or too few documents to leave at
      least one on each side.
  """
  n = len(hashes)
  if not 0.0 < fraction < 1.0:
    raise ValueError(f"data.val_fraction must be in (0, 1), got {fraction}")
  if n < 2:
    raise ValueError(f"data.val_fraction={fraction} needs >= 2 documents in "
                     f"data.train_files, found {n}; set data.val_files")
  k = min(max(1, round(fraction * n)), n - 1)
  order = sorted(range(n), key=lambda i: (hashes[i], i))
  return set(order[:k])
