"""SentencePiece tokenizer: train (BPE) or load, exact round trip, BOS/EOS.

Owns: the tokenizer model of a run. Either `data.tokenizer_model` (an
existing .model file, e.g. LLaMA's) or a BPE model with `data.vocab_size`
pieces trained on a bounded sample of the train split and stored as
`<workdir>/tokenizer.model` (reused on restart; a restart asking for another
vocab size is an error). Next to a trained model, `<name>.json` records what
it was built from (data identity, vocab size, sample size); a stored model
is reused only when that record matches the configured data, so a tokenizer
left by a start on another corpus is refused, never silently reused.

Trained models are lossless: identity normalization, no whitespace
collapsing, whitespace-only pieces allowed, byte fallback (any character
outside the pieces becomes its UTF-8 bytes), and no dummy prefix, so
`decode(encode(text)) == text` for any text. Ids: unk 0, BOS 1, EOS 2; no
pad id (padding is masked, see pipeline.py).

A document is encoded as [BOS] + tokens + [EOS]. Encoding splits the text at
"\\n" and encodes the lines in one batched call: no trained piece contains
"\\n" (training sees lines), so the ids equal those of encoding the whole
document at once, several times faster (SentencePiece slows down on long
strings). For loaded models with a dummy prefix (LLaMA) only the first line
gets the prefix, which again equals whole-document encoding.

Must not import: ml_collections, tensorflow_datasets, grain, or fp4jax
modules other than fp4jax.diskspace.
"""

import hashlib
import io
import itertools
import json
import os
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

from absl import logging
import numpy as np
import sentencepiece as spm
from sentencepiece import sentencepiece_model_pb2

from fp4jax import diskspace

# SentencePiece leaves sentences longer than this many bytes out of training
# (its own default); longer lines are cut into pieces of at most this size
# (`_bounded`), so a corpus of a few enormous lines still trains.
_MAX_TRAIN_LINE_BYTES = 4192


def _bounded(lines: Iterable[str], limit: int = _MAX_TRAIN_LINE_BYTES
             ) -> Iterator[str]:
  """`lines`, each longer than `limit` UTF-8 bytes cut into consecutive
  pieces of at most `limit` bytes: at the last space before the limit, or
  at a character boundary where a piece has no space."""
  for line in lines:
    b = line.encode("utf-8")
    while len(b) > limit:
      cut = b.rfind(b" ", 1, limit + 1)
      if cut <= 0:
        cut = limit
        while b[cut] & 0xC0 == 0x80:   # not inside a multi-byte character
          cut -= 1
      yield b[:cut].decode("utf-8")
      b = b[cut:]
    if b:
      yield b.decode("utf-8")


class Tokenizer:
  """A loaded SentencePiece model.

  Attributes:
    vocab_size: number of ids; every id is in [0, vocab_size).
    bos_id, eos_id: the document delimiters.
    fingerprint: hex digest of the model file (identifies the vocabulary).
    path: where the model was loaded from ("" = from bytes).
    model_proto: the serialized model (what worker processes load).
  """

  def __init__(self, model_proto: bytes, path: str = ""):
    """Loads a serialized model.

    Raises:
      ValueError: not a SentencePiece model, or one without BOS/EOS ids.
    """
    where = path or "tokenizer model"
    try:
      proto = sentencepiece_model_pb2.ModelProto.FromString(model_proto)
      self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
    except Exception as e:  # protobuf DecodeError, RuntimeError
      raise ValueError(f"{where}: not a SentencePiece model "
                       f"({type(e).__name__})") from e
    self.vocab_size = self._sp.vocab_size()
    self.bos_id, self.eos_id = self._sp.bos_id(), self._sp.eos_id()
    if self.bos_id < 0 or self.eos_id < 0:
      raise ValueError(f"{where}: the model has no BOS/EOS piece")
    self.fingerprint = hashlib.sha256(model_proto).hexdigest()[:16]
    self.model_proto = model_proto
    self.path = path
    # Lines after the first continue the document: no dummy prefix there.
    if proto.normalizer_spec.add_dummy_prefix:
      proto.normalizer_spec.add_dummy_prefix = False
      self._sp_rest = spm.SentencePieceProcessor(
          model_proto=proto.SerializeToString())
    else:
      self._sp_rest = self._sp

  @classmethod
  def load(cls, path: str, key: str = "data.tokenizer_model") -> "Tokenizer":
    """Loads a .model file; FileNotFoundError naming `key` if missing."""
    if not os.path.isfile(path):
      raise FileNotFoundError(f"{key}: no such file {path!r}")
    with open(path, "rb") as f:
      return cls(f.read(), path=path)

  def encode(self, text: str) -> np.ndarray:
    """Ids of `text` without BOS/EOS: int32 [n]."""
    lines = text.split("\n")
    pieces = [line + "\n" for line in lines[:-1]]
    if lines[-1]:
      pieces.append(lines[-1])
    if not pieces:
      return np.zeros((0,), np.int32)
    if self._sp_rest is self._sp:
      ids = self._sp.encode(pieces)
    else:
      ids = self._sp.encode(pieces[:1]) + self._sp_rest.encode(pieces[1:])
    n = sum(len(x) for x in ids)
    return np.fromiter(itertools.chain.from_iterable(ids), np.int32, n)

  def encode_document(self, text: str) -> np.ndarray:
    """[BOS] + encode(text) + [EOS]: int32 [n + 2]."""
    body = self.encode(text)
    out = np.empty((body.size + 2,), np.int32)
    out[0], out[-1] = self.bos_id, self.eos_id
    out[1:-1] = body
    return out

  def encode_documents(self, texts: Sequence[str], num_threads: int = 1
                       ) -> tuple[np.ndarray, np.ndarray]:
    """Every text as `encode_document` gives it, in one batched call.

    All lines of all texts go to SentencePiece together (fewer calls than
    one per document; ids equal `encode_document`'s, see the module
    docstring).

    Args:
      texts: documents.
      num_threads: SentencePiece's threads for the call (its own default
        uses every core; a worker process of a pool wants 1).

    Returns:
      (ids int32 [sum of lengths], lengths int32 [len(texts)]): document i
      is ids[offsets[i]:offsets[i] + lengths[i]], BOS and EOS included.
    """
    heads, rests, counts = [], [], []
    for text in texts:
      lines = text.split("\n")
      pieces = [line + "\n" for line in lines[:-1]]
      if lines[-1]:
        pieces.append(lines[-1])
      counts.append(len(pieces))
      if pieces:
        heads.append(pieces[0])
        rests.extend(pieces[1:])
    first = self._sp.encode(heads, num_threads=num_threads)
    rest = self._sp_rest.encode(rests, num_threads=num_threads)
    out: list[int] = []
    lengths = np.empty((len(texts),), np.int32)
    h = r = 0
    bos, eos = self.bos_id, self.eos_id
    for i, n in enumerate(counts):
      size = len(out)
      out.append(bos)
      if n:
        out.extend(first[h])
        h += 1
        for line in rest[r:r + n - 1]:
          out.extend(line)
        r += n - 1
      out.append(eos)
      lengths[i] = len(out) - size
    return np.array(out, np.int32), lengths

  @property
  def adds_dummy_prefix(self) -> bool:
    """Whether a text's first piece gets SentencePiece's "▁" prefix."""
    return self._sp_rest is not self._sp

  def piece(self, i: int) -> str:
    """The piece string of id `i` (e.g. "<s>")."""
    return self._sp.id_to_piece(int(i))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    """Text of ids; BOS/EOS/unk ids decode to ""."""
    return self._sp.decode([int(i) for i in ids])


def train_bpe(lines: Iterable[str], vocab_size: int) -> bytes:
  """A lossless BPE model (serialized) with exactly `vocab_size` pieces.

  Args:
    lines: training sentences (text lines without "\\n").
    vocab_size: number of pieces, including unk/BOS/EOS and 256 bytes.

  Raises:
    ValueError: naming data.vocab_size when SentencePiece cannot reach it
      (too small for the byte pieces + characters, or too large for the
      sample).
  """
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=_bounded(lines), model_writer=model, model_type="bpe",
        vocab_size=vocab_size, normalization_rule_name="identity",
        remove_extra_whitespaces=False, allow_whitespace_only_pieces=True,
        byte_fallback=True, add_dummy_prefix=False, split_digits=True,
        max_sentence_length=_MAX_TRAIN_LINE_BYTES, unk_id=0, bos_id=1,
        eos_id=2, pad_id=-1, num_threads=min(os.cpu_count() or 1, 8),
        minloglevel=2)
  except RuntimeError as e:
    reason = " ".join(str(e).split())
    need = re.search(r"smaller than required_chars\. \d+ vs (\d+)", reason)
    if need:
      raise ValueError(
          f"data.vocab_size={vocab_size} is too small for this corpus: "
          f"byte-fallback BPE needs >= {need.group(1)} pieces (256 bytes, "
          f"unk/BOS/EOS and the corpus's characters)") from None
    raise ValueError(f"data.vocab_size={vocab_size}: SentencePiece BPE "
                     f"training failed: {reason}") from None
  return model.getvalue()


def _write_atomic(path: str, data: bytes) -> None:
  """Writes `data` to `path` whole or not at all (no partial file left).

  Raises:
    diskspace.DiskFull: the file system has no room for it.
  """
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
    os.replace(tmp, path)   # several processes may train the same model
  except OSError as e:
    if os.path.lexists(tmp):
      os.remove(tmp)
    diskspace.raise_if_full(e, path, len(data), "the tokenizer")
    raise


def provenance_path(store_path: str) -> str:
  """The JSON record of what the model at `store_path` was built from."""
  return os.path.splitext(store_path)[0] + ".json"


def _check_provenance(store_path: str, built_from: Mapping[str, Any],
                      data_aliases: Sequence[str] = ()) -> None:
  record_path = provenance_path(store_path)
  if not os.path.exists(record_path):
    # Written before the model, so only a model from before these records
    # lacks one: it cannot be verified, only reported.
    logging.warning("tokenizer: %s has no %s record; cannot verify it was "
                    "built from this data", store_path,
                    os.path.basename(record_path))
    return
  try:
    with open(record_path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f"tokenizer record {record_path} is unreadable "
                     f"({type(e).__name__}); delete it and "
                     f"{os.path.basename(store_path)} to retrain") from None
  current = json.loads(json.dumps(dict(built_from)))
  if saved.get("data") in data_aliases:   # the same data, named as before
    saved = {**saved, "data": current.get("data")}
  for key in sorted(current):
    if saved.get(key) != current[key]:
      raise ValueError(
          f"the stored tokenizer {store_path} was built from {key}="
          f"{saved.get(key)!r}, not the configured {current[key]!r}; use a "
          f"new --workdir (or delete {os.path.basename(store_path)} and "
          f"{os.path.basename(record_path)} to retrain)")


def get_tokenizer(*, vocab_size: int, model_path: str, store_path: str,
                  sample: Iterable[str],
                  built_from: Mapping[str, Any] | None = None,
                  data_aliases: Sequence[str] = ()) -> Tokenizer:
  """The run's tokenizer: loaded, reused from `store_path`, or trained.

  Args:
    vocab_size: data.vocab_size; must equal the model's size.
    model_path: data.tokenizer_model ("" = none: reuse or train).
    store_path: where a trained model is kept (e.g. workdir/tokenizer.model).
    sample: training lines, consumed only when a model is trained.
    built_from: JSON-able identity of the training data (e.g. {"data":
      corpus name, "train_chars": n}); recorded next to a trained model and
      required to match for a stored one to be reused.
    data_aliases: other names of built_from["data"] (what earlier versions
      called the same data), accepted in a stored record.

  Raises:
    FileNotFoundError: data.tokenizer_model is missing.
    ValueError: one line: the loaded / stored model's vocabulary differs
      from data.vocab_size, a stored model was built from other data, or
      training fails.
  """
  built_from = {**(built_from or {}), "vocab_size": vocab_size}
  if model_path:
    tok = Tokenizer.load(model_path)
    if vocab_size != tok.vocab_size:
      raise ValueError(f"data.vocab_size={vocab_size} but "
                       f"data.tokenizer_model={model_path!r} has "
                       f"{tok.vocab_size} pieces; set data.vocab_size="
                       f"{tok.vocab_size}")
    return tok
  if os.path.isfile(store_path):
    tok = Tokenizer.load(store_path, key="stored tokenizer")
    if vocab_size != tok.vocab_size:
      raise ValueError(f"data.vocab_size={vocab_size} but the stored "
                       f"tokenizer {store_path!r} of this run has "
                       f"{tok.vocab_size} pieces; keep data.vocab_size="
                       f"{tok.vocab_size} or use a new workdir")
    _check_provenance(store_path, built_from, data_aliases)
    logging.info("tokenizer: reusing %s (%d pieces)", store_path,
                 tok.vocab_size)
    return tok
  logging.info("tokenizer: training a %d-piece BPE model", vocab_size)
  proto = train_bpe(sample, vocab_size)
  # The record first: a model file never exists without its record.
  _write_atomic(provenance_path(store_path),
                json.dumps(built_from, indent=2, sort_keys=True).encode())
  _write_atomic(store_path, proto)
  logging.info("tokenizer: stored %s", store_path)
  return Tokenizer(proto, path=store_path)
