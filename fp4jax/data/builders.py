"""TFDS datasets without TensorFlow: local corpora and catalogue look-ups.

Owns: the `text_files` TFDS builder (local .txt / .jsonl / .py files ->
array_record splits "train" and "validation", read back through
`builder.as_data_source()` as random-access records {"text": bytes,
"id": bytes}), its cache key, and the look-up of prepared TFDS catalogue
datasets (`data.source="tfds"`), which never downloads.

A prepared corpus lives in `<data_dir>/text_files/<kind>_<hash>/1.0.0/`,
where the hash covers the content of the files in order (not their paths
or times: a touched or moved file with the same bytes is the same data, so
a run stays resumable) and every setting that changes the records
(separator, text key, decode mode, val fraction), so re-runs reuse it and
any change re-prepares. Errors in the input (missing files, bad UTF-8
under "strict", no documents) surface in a scan before TFDS writes
anything, and so does a data dir without room for the prepared copy
(`fp4jax.diskspace`); a preparation that fails leaves nothing behind.

Must not import: ml_collections, grain, sentencepiece, or fp4jax modules
other than fp4jax.data.documents and fp4jax.diskspace.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import sys
from collections.abc import Sequence
from typing import Any

from absl import logging
import tensorflow_datasets as tfds

from fp4jax import diskspace
from fp4jax.data import documents

# Bump when the record layout or the splitting rules change: old prepared
# copies are then ignored instead of read with the wrong meaning.
RECORD_FORMAT = 1
TRAIN, VAL = "train", "validation"
# Split names tried, in order, for split="val" of a catalogue dataset.
CATALOGUE_VAL_SPLITS = ("validation", "valid", "val", "dev", "test")


@dataclasses.dataclass(frozen=True)
class CorpusSpec:
  """Everything that decides the records of a prepared local corpus.

  Attributes:
    kind: short name prefix of the prepared copy ("text_files", "stdlib").
    train: absolute paths of the training files.
    val: absolute paths of the validation files; () = hold out by fraction.
    val_fraction: share of training documents held out when `val` is ().
    separator: plain-text document separator line.
    text_key: .jsonl document field.
    on_decode_error: "replace", "ignore" or "strict".
    fmt: file format forced for every file (None = by extension).
    train_key: config key (or description) named by error messages.
  """
  kind: str
  train: tuple[str, ...]
  val: tuple[str, ...] = ()
  val_fraction: float = 0.0
  separator: str = documents.DEFAULT_SEPARATOR
  text_key: str = "text"
  on_decode_error: str = "replace"
  fmt: str | None = None
  train_key: str = "data.train_files"

  def _settings_hash(self) -> "hashlib._Hash":
    h = hashlib.sha256()
    settings = dataclasses.asdict(self)
    settings.update(record_format=RECORD_FORMAT, train=None, val=None,
                    train_key=None)
    # The val fraction does not change records when val files are given.
    if self.val:
      settings["val_fraction"] = None
    h.update(json.dumps(settings, sort_keys=True).encode())
    return h

  def _name(self, h) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in self.kind.lower())
    return f"{safe}_{h.hexdigest()[:16]}"

  def cache_name(self) -> str:
    """`<kind>_<hash>`: the TFDS config name of the prepared copy, also the
    data's identity in a checkpoint's data state and the tokenizer record.

    The hash covers the settings and each file's content (`content_hash`),
    in order; never a path or a time stamp.

    Raises:
      FileNotFoundError: a listed file no longer exists.
    """
    h = self._settings_hash()
    for tag, paths in (("train", self.train), ("val", self.val)):
      for path in paths:
        h.update(f"{tag}\0{content_hash(path)}\n".encode())
    return self._name(h)

  def legacy_cache_name(self) -> str | None:
    """The name earlier versions gave this corpus (paths, sizes and mtimes
    hashed), or None if a file is gone: a run started by one of them is
    still resumed while its files are untouched."""
    h = self._settings_hash()
    try:
      for tag, paths in (("train", self.train), ("val", self.val)):
        for path in paths:
          st = os.stat(path)
          h.update(f"{tag}\0{path}\0{st.st_size}\0{st.st_mtime_ns}\n"
                   .encode())
    except OSError:
      return None
    return self._name(h)

  def input_bytes(self) -> int:
    """Total size of the listed files."""
    return sum(os.path.getsize(p) for p in self.train + self.val)


# Files up to this size are hashed whole (SHA-256 reads ~0.5 GB/s); larger
# ones by their size and _SAMPLES evenly spaced blocks, so a start never
# spends minutes hashing a huge corpus. An edit that keeps a huge file's
# size and misses every sampled block goes unnoticed.
_WHOLE_HASH_BYTES = 256 << 20
_SAMPLES, _SAMPLE_BYTES = 64, 64 << 10


def content_hash(path: str) -> str:
  """Hex SHA-256 of the file's bytes (of its size and sampled blocks when
  it is larger than _WHOLE_HASH_BYTES).

  Raises:
    FileNotFoundError: the file does not exist.
  """
  st = os.stat(path)
  # Within one process a file is hashed once (train and val iterators,
  # the builder and the tokenizer record all ask); keyed by its stat so an
  # edit in between is still seen.
  key = (os.path.abspath(path), st.st_size, st.st_mtime_ns, st.st_ino)
  if key not in _HASHES:
    _HASHES[key] = _hash_file(path, st.st_size)
  return _HASHES[key]


_HASHES: dict[tuple[str, int, int, int], str] = {}


def _hash_file(path: str, size: int) -> str:
  h = hashlib.sha256(f"{size}\0".encode())
  with open(path, "rb") as f:
    if size <= _WHOLE_HASH_BYTES:
      while block := f.read(1 << 20):
        h.update(block)
    else:
      h.update(b"sampled\0")
      for i in range(_SAMPLES):
        f.seek(i * (size - _SAMPLE_BYTES) // (_SAMPLES - 1))
        h.update(f.read(_SAMPLE_BYTES))
  return h.hexdigest()


def _not_a_local_corpus_note(record) -> bool:
  """False for TFDS's warnings that hold for every local corpus and ask
  nothing of anyone, so a normal run's log does not repeat them: each
  corpus is a "custom data configuration" (logged at every builder made),
  and its version folder "has no dataset_info.json" until prepared."""
  msg = str(record.msg)
  args = record.args if isinstance(record.args, tuple) else ()
  arg = str(args[0]) if args else ""
  return not (
      (msg.startswith("Using custom data configuration")
       and ("name='text_files_" in arg or "name='stdlib_" in arg))
      or (msg.startswith("Variant folder")
          and f"{os.sep}text_files{os.sep}" in arg))


logging.get_absl_logger().addFilter(_not_a_local_corpus_note)


class TextFiles(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Local text files as a TFDS dataset (array_record, no TensorFlow).

  Records: {"text": the document (Text, read back as UTF-8 bytes),
  "id": "<file name>:<document index in file>"}, in file order.
  Not registered in the TFDS catalogue: built through `prepare_corpus`.
  """

  VERSION = tfds.core.Version("1.0.0")

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and
  # "... downloaded and prepared" to stdout around a preparation: nothing
  # is downloaded here, and prepare_corpus logs what it prepares.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass

  def __init__(self, *, spec: CorpusSpec, data_dir: str,
               val_index: frozenset[int] = frozenset()):
    self._spec = spec
    self._val_index = val_index
    super().__init__(config=tfds.core.BuilderConfig(name=spec.cache_name()),
                     data_dir=data_dir)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description="Local text documents (fp4jax data.source=text_files "
                    "or stdlib).",
        features=tfds.features.FeaturesDict({
            "text": tfds.features.Text(),
            "id": tfds.features.Text(),
        }),
        # File order is kept: shuffling is the input pipeline's job.
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager: Any) -> dict[str, Any]:
    del dl_manager  # local files only: nothing to download
    spec = self._spec
    splits = {TRAIN: self._generate_examples(spec.train, keep="train")}
    if spec.val:
      splits[VAL] = self._generate_examples(spec.val, keep="all")
    elif self._val_index:
      splits[VAL] = self._generate_examples(spec.train, keep="val")
    return splits

  def _generate_examples(self, paths: Sequence[str], keep: str):
    spec = self._spec
    g = 0   # document index over all `paths`, as in the scan
    for f, path in enumerate(paths):
      docs = documents.read_documents(
          path, separator=spec.separator, text_key=spec.text_key,
          on_decode_error=spec.on_decode_error, fmt=spec.fmt)
      for d, text in enumerate(docs):
        held = g in self._val_index
        g += 1
        if keep == "all" or (keep == "val") == held:
          yield f"{f}:{d}", {"text": text,
                             "id": f"{os.path.basename(path)}:{d}"}


def _scan(paths: Sequence[str], spec: CorpusSpec, key: str
          ) -> list[bytes]:
  """Reads every document once: errors, counts and content hashes."""
  hashes: list[bytes] = []
  total = documents.ReadStats()
  for path in paths:
    stats = documents.ReadStats()
    for text in documents.read_documents(
        path, separator=spec.separator, text_key=spec.text_key,
        on_decode_error=spec.on_decode_error, fmt=spec.fmt, stats=stats):
      hashes.append(documents.document_hash(text))
    if stats.decode_errors:
      logging.warning("%s: %d invalid UTF-8 sequence(s) handled with "
                      "data.on_decode_error=%r", path, stats.decode_errors,
                      spec.on_decode_error)
    for field in dataclasses.fields(stats):
      setattr(total, field.name,
              getattr(total, field.name) + getattr(stats, field.name))
  if not hashes:
    where = paths[0] if len(paths) == 1 else f"{len(paths)} files"
    raise ValueError(f"{key}: no documents in {where} (empty or whitespace "
                     f"only)")
  logging.info("%s: %d documents, %d chars, %d empty skipped, %d decode "
               "errors", key, total.documents, total.chars,
               total.skipped_empty, total.decode_errors)
  return hashes


def prepare_corpus(spec: CorpusSpec, data_dir: str) -> TextFiles:
  """The prepared TFDS builder of `spec`, preparing it on first use.

  Args:
    spec: the corpus.
    data_dir: TFDS data directory the prepared copy is cached under.

  Returns:
    A builder whose `as_data_source(split)` reads split "train" and, when
    there is one, "validation".

  Raises:
    FileNotFoundError: a listed file is missing.
    ValueError: one line naming the file / key: no documents, invalid UTF-8
      under "strict", bad JSONL, a val fraction that leaves a side empty.
    diskspace.DiskFull: no room in data_dir (checked before writing, or
      the write ran out); nothing of the preparation is left behind.
  """
  if not spec.train:
    raise ValueError(f"{spec.train_key} is empty: nothing to train on")
  builder = TextFiles(spec=spec, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  hashes = _scan(spec.train, spec, spec.train_key)
  val_index: frozenset[int] = frozenset()
  if spec.val:
    _scan(spec.val, spec, "data.val_files")
  elif spec.val_fraction:
    val_index = frozenset(documents.held_out(hashes, spec.val_fraction))
  builder = TextFiles(spec=spec, data_dir=data_dir, val_index=val_index)
  # The prepared records hold the text once more (plus ids and indexes).
  need = 1.1 * spec.input_bytes() + (1 << 20)
  what = f"the prepared copy of {spec.train_key}"
  diskspace.check(data_dir, need, what)
  logging.info("preparing %s under %s", spec.cache_name(), data_dir)
  # Progress bars on a terminal only: in a log file they are escape codes.
  tfds.display_progress_bar(sys.stderr.isatty())
  made = _missing_dirs(os.path.join(data_dir, builder.name,
                                    spec.cache_name()))
  try:
    builder.download_and_prepare(file_format="array_record")
  except Exception as e:  # array_record / TFDS raise many kinds
    # TFDS removes its own incomplete folder; the folders above it that
    # this preparation created go too, so a failure leaves nothing.
    for path in made:
      shutil.rmtree(path, ignore_errors=True)
    diskspace.raise_if_full(e, data_dir, need, what)
    raise
  return builder


def _missing_dirs(path: str) -> list[str]:
  """`path` and those of its ancestors that do not exist, outermost first."""
  out = []
  path = os.path.abspath(path)
  while not os.path.exists(path):
    out.append(path)
    path = os.path.dirname(path)
  return out[::-1]


def corpus_source(builder: TextFiles, split: str) -> Any:
  """Random-access records of `split` ("train" or "val") of a corpus.

  Raises:
    ValueError: split "val" of a corpus prepared without one.
  """
  name = TRAIN if split == "train" else VAL
  if name not in builder.info.splits:
    raise ValueError("no val split: set data.val_files or data.val_fraction "
                     "> 0")
  return builder.as_data_source(split=name)


def catalogue_source(name: str, split: str, data_dir: str | None,
                     text_key: str) -> tuple[Any, str]:
  """Random-access records of a prepared TFDS catalogue dataset.

  Never downloads: a dataset that is not prepared in `data_dir` is an
  error at once (offline, tfds would retry for minutes).

  Args:
    name: TFDS name, optionally with config and version ("lm1b",
      "tiny_shakespeare:1.0.0").
    split: "train" or "val" (first of CATALOGUE_VAL_SPLITS present).
    data_dir: TFDS data dir; None = TFDS's default ($TFDS_DATA_DIR).
    text_key: the text feature.

  Returns:
    (data source, a cache name for derived files such as the tokenizer).

  Raises:
    ValueError: unknown dataset, missing feature or split, not array_record.
    FileNotFoundError: not prepared in the data dir (says how to prepare).
  """
  if not name:
    raise ValueError("data.tfds_name is empty (data.source='tfds')")
  try:
    builder = tfds.builder(name, data_dir=data_dir or None)
  except Exception as e:  # DatasetNotFoundError, import errors, bad version
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ValueError(f"data.tfds_name={name!r}: {first}") from e
  if not builder.is_prepared():
    raise FileNotFoundError(
        f"data.tfds_name={name!r} is not prepared in {builder.data_dir} and "
        f"will not be downloaded here; on a machine with network run `tfds "
        f"build {name} --file_format=array_record --data_dir=DIR` and set "
        f"data.tfds_data_dir=DIR")
  features = builder.info.features
  if text_key not in features:
    raise ValueError(f"data.text_key={text_key!r} is not a feature of "
                     f"{name!r} (features: {sorted(features.keys())})")
  splits = builder.info.splits
  if split == "train":
    tfds_split = TRAIN if TRAIN in splits else None
  else:
    tfds_split = next((s for s in CATALOGUE_VAL_SPLITS if s in splits), None)
  if tfds_split is None:
    raise ValueError(f"data.tfds_name={name!r} has no {split} split "
                     f"(splits: {sorted(splits.keys())})")
  try:
    source = builder.as_data_source(split=tfds_split)
  except Exception as e:  # prepared as tfrecord: no random access
    cause = str(e).strip().splitlines()[0] if str(e).strip() else ""
    raise ValueError(
        f"data.tfds_name={name!r} in {builder.data_dir} cannot be read "
        f"without TensorFlow ({type(e).__name__}: {cause}); if it was "
        f"prepared as tfrecord, rebuild it with --file_format=array_record"
    ) from e
  cache = "".join(c if c.isalnum() else "_"
                  for c in f"{builder.name}_{builder.info.full_name}")
  return source, cache


def default_data_dir() -> str:
  """TFDS's default data dir: $TFDS_DATA_DIR or ~/tensorflow_datasets."""
  return os.path.expanduser(
      os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")
