"""Tests of fp4jax.data.shards: formats, bad input, dealing, resume.

Small shards of every format written to tmp_path (and fsspec's in-memory
filesystem); no JAX, no network. Oracles are the document lists the tests
wrote, compared as lists (order) or multisets (collections.Counter).
"""

import collections
import gzip
import itertools
import json
import re

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import zstandard
from array_record.python import array_record_module

from fp4jax.data import shards

import shard_files

SEP = shard_files.SEP
FORMATS = shard_files.FORMATS
_docs = shard_files.docs
_write = shard_files.write
_jsonl_bytes = shard_files.jsonl_bytes


def _read(paths, **kw) -> list[str]:
  kw.setdefault("num_epochs", 1)
  return list(shards.ShardReader(paths, **kw))


def _one_line_error(match: str, paths, **kw) -> str:
  with pytest.raises(ValueError, match=match) as e:
    _read(paths, **kw)
  message = str(e.value)
  assert "\n" not in message
  return message


# --- formats -----------------------------------------------------------------


@pytest.mark.parametrize("ext", FORMATS)
def test_every_format_reads_the_written_documents(tmp_path, ext):
  docs = _docs(11)
  path = _write(tmp_path / f"a{ext}", docs)
  assert _read([path]) == docs
  assert _read(shards.expand_shards(str(tmp_path / "*"))) == docs


def test_txt_splits_as_documents_py(tmp_path):
  path = tmp_path / "a.txt"
  path.write_text("a\n<|endoftext|>\nb\r\n<|endoftext|>\r\n\n  \n"
                  "<|endoftext|>\nc\n\nd", encoding="utf-8")
  assert _read([str(path)]) == ["a", "b", "c\n\nd"]
  path.write_text("a\n\n\nb\nc\n", encoding="utf-8")
  assert _read([str(path)], separator="") == ["a", "b\nc"]


def test_memory_filesystem_globs_sorted():
  fs = fsspec.filesystem("memory")
  try:
    docs = _docs(12)
    _write("memory://corpus/b.jsonl.zst", docs[4:8])
    _write("memory://corpus/a.jsonl", docs[:4])
    _write("memory://corpus/c.parquet", docs[8:])
    found = shards.expand_shards("memory://corpus/*")
    assert [p.rsplit("/", 1)[1] for p in found] == [
        "a.jsonl", "b.jsonl.zst", "c.parquet"]
    assert _read(found, shuffle=False) == docs
    with pytest.raises(FileNotFoundError, match="memory://nowhere"):
      shards.expand_shards("memory://nowhere/*.jsonl")
  finally:
    fs.rm("/corpus", recursive=True)


def test_expand_shards_order_and_duplicates(tmp_path):
  for name in ("b.jsonl", "a.jsonl", "c.txt"):
    _write(tmp_path / name, ["x"])
  found = shards.expand_shards(
      f"{tmp_path}/c.txt,{tmp_path}/*.jsonl,{tmp_path}/a.jsonl")
  assert [p.rsplit("/", 1)[1] for p in found] == ["c.txt", "a.jsonl",
                                                  "b.jsonl"]
  with pytest.raises(FileNotFoundError, match="data.shards: no such file"):
    shards.expand_shards(str(tmp_path / "missing.jsonl"))


@pytest.mark.parametrize("name", ["a.jsonl.bz2", "a.json", "a.gz", "a.zst",
                                  "a.py"])
def test_unknown_extension_refused(tmp_path, name):
  path = tmp_path / name
  path.write_bytes(_jsonl_bytes(["x"]))
  for call in (lambda: shards.expand_shards(str(tmp_path / "*")),
               lambda: shards.ShardReader([str(path)])):
    with pytest.raises(ValueError) as e:
      call()
    message = str(e.value)
    assert "\n" not in message
    assert name in message and ".jsonl.zst" in message
    assert ".array_record" in message


# --- bad input ---------------------------------------------------------------


def _bad_jsonl(tmp_path, lines: list[bytes], ext=".jsonl") -> str:
  data = b"".join(lines)
  if ext == ".jsonl.gz":
    data = gzip.compress(data)
  elif ext == ".jsonl.zst":
    data = zstandard.ZstdCompressor().compress(data)
  path = tmp_path / f"bad{ext}"
  path.write_bytes(data)
  return str(path)


GOOD = [json.dumps({"text": f"good {i}"}).encode() + b"\n" for i in range(3)]


@pytest.mark.parametrize("ext", [".jsonl", ".jsonl.gz", ".jsonl.zst"])
@pytest.mark.parametrize("line,match", [
    (b"{not json\n", r"bad\.jsonl[.a-z]*:2: not valid JSON"),
    (b'{"title": "x"}\n', r"bad\.jsonl[.a-z]*:2: no string field 'text'"),
    (b'{"text": 5}\n', r"bad\.jsonl[.a-z]*:2: no string field 'text'"),
    (b'["text"]\n', r"bad\.jsonl[.a-z]*:2: no string field 'text'"),
])
def test_bad_jsonl_record(tmp_path, ext, line, match):
  path = _bad_jsonl(tmp_path, [GOOD[0], line, GOOD[1], GOOD[2]], ext)
  _one_line_error(match, [path])
  reader = shards.ShardReader([path], num_epochs=1, max_bad_records=1)
  assert list(reader) == ["good 0", "good 1", "good 2"]
  assert reader.stats.bad_records == 1


def test_non_utf8_jsonl_names_byte_offset(tmp_path):
  bad = b'{"text": "caf\xe9"}\n'
  path = _bad_jsonl(tmp_path, [GOOD[0], GOOD[1], bad, GOOD[2]])
  offset = len(GOOD[0]) + len(GOOD[1]) + bad.index(b"\xe9")
  _one_line_error(rf"bad\.jsonl:3: invalid UTF-8 at byte offset {offset}\b",
                  [path])
  assert _read([path], max_bad_records=1) == ["good 0", "good 1", "good 2"]


def test_non_utf8_txt_names_line_and_offset(tmp_path):
  raw = b"one\n<|endoftext|>\ntwo\ntw\xffo\n<|endoftext|>\nthree\n"
  path = tmp_path / "bad.txt"
  path.write_bytes(raw)
  offset = raw.index(b"\xff")
  _one_line_error(rf"bad\.txt:4: document 1: invalid UTF-8 at byte offset "
                  rf"{offset}\b", [str(path)])
  assert _read([str(path)], max_bad_records=1) == ["one", "three"]


def test_more_bad_records_than_allowed_raises(tmp_path):
  path = _bad_jsonl(tmp_path, [b"{\n", GOOD[0], b"[\n", GOOD[1], b"x\n"])
  reader = shards.ShardReader([path], num_epochs=1, max_bad_records=2)
  assert next(reader) == "good 0"
  assert next(reader) == "good 1"
  with pytest.raises(ValueError, match=r"bad\.jsonl:5: not valid JSON.*"
                     r"bad record 3, max_bad_records=2"):
    next(reader)
  assert _read([path], max_bad_records=3) == ["good 0", "good 1"]


def _cut(data: bytes) -> bytes:
  return data[:len(data) * 2 // 3]


@pytest.mark.parametrize("ext,mangle,match", [
    (".jsonl.zst", _cut, r"corrupt or truncated \.jsonl\.zst stream after "
     r"line \d+ \(zstd stream ends inside a frame"),
    (".jsonl.zst", lambda d: d[:40] + b"garbage" * 9,
     r"corrupt or truncated \.jsonl\.zst stream after line \d+"),
    (".jsonl.gz", _cut, r"corrupt or truncated \.jsonl\.gz stream after "
     r"line \d+"),
    (".jsonl.gz", lambda d: b"not gzip" + d,
     r"corrupt or truncated \.jsonl\.gz stream after line 0"),
    (".parquet", _cut, r"not a readable parquet file"),
    (".array_record", _cut, r"not a readable array_record file"),
    (".array_record", lambda d: d[:80] + bytes([d[80] ^ 255]) + d[81:],
     r"records 0\.\.\d+: corrupt"),
    (".arrow", _cut, r"record batch after row \d+: unreadable"),
    (".arrow", lambda d: b"not arrow" + d, r"not a readable Arrow IPC file"),
])
def test_truncated_or_corrupt_shard(tmp_path, ext, mangle, match):
  docs = _docs(400)
  path = _write(tmp_path / f"good{ext}", docs)
  with open(path, "rb") as f:
    data = f.read()
  bad = tmp_path / f"bad{ext}"
  bad.write_bytes(mangle(data))
  _one_line_error(rf"bad{re.escape(ext)}: {match}", [str(bad)])
  # Skipped: the shard ends at the damage (a cut line may count as one
  # more bad record), never a garbage document.
  reader = shards.ShardReader([str(bad), path], num_epochs=1, shuffle=False,
                              max_bad_records=2)
  got = list(reader)
  assert 1 <= reader.stats.bad_records <= 2
  assert got[len(got) - len(docs):] == docs
  assert got[:len(got) - len(docs)] == docs[:len(got) - len(docs)]


def test_parquet_bad_rows_and_columns(tmp_path):
  path = tmp_path / "bad.parquet"
  pq.write_table(pa.table({"text": ["a", None, "c"]}), path)
  _one_line_error(r"bad\.parquet: row 1: 'text' is null", [str(path)])
  assert _read([str(path)], max_bad_records=1) == ["a", "c"]
  pq.write_table(pa.table({"body": ["a"]}), path)
  _one_line_error(r"bad\.parquet: no column 'text' \(text_key\); columns: "
                  r"body", [str(path)])
  assert _read([str(path)], text_key="body") == ["a"]
  pq.write_table(pa.table({"text": [1, 2]}), path)
  _one_line_error(r"bad\.parquet: column 'text' \(text_key\) is int64",
                  [str(path)])


def test_array_record_bad_records(tmp_path):
  path = str(tmp_path / "bad.array_record")
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  for record in (shards.encode_record("a"), b"not json", b"\xff\xfe",
                 b'{"text": null}', shards.encode_record("e")):
    writer.write(record)
  writer.close()
  _one_line_error(r"bad\.array_record: record 1: not valid JSON", [path])
  reader = shards.ShardReader([path], num_epochs=1, max_bad_records=3)
  assert list(reader) == ["a", "e"]
  assert reader.stats.bad_records == 3


def test_a_saved_hugging_face_dataset_is_its_arrow_shards(tmp_path):
  docs = _docs(11)
  folder = shard_files.write_hf_dataset(tmp_path / "ds", docs, 3)
  paths = shards.expand_shards(folder + "/", "data.train_files")
  assert [p.rsplit("/", 1)[1] for p in paths] == [
      f"data-{k:05d}-of-00003.arrow" for k in range(3)]
  assert _read(paths, shuffle=False) == docs
  assert collections.Counter(_read(paths, process_count=2, process_index=0)
                             + _read(paths, process_count=2,
                                     process_index=1)) == collections.Counter(
                                         docs)
  (tmp_path / "dd").mkdir()
  (tmp_path / "dd" / "dataset_dict.json").write_text(
      '{"splits": ["train", "test"]}')
  with pytest.raises(ValueError, match=r"holds the splits \['train', "
                     r"'test'\] of a Hugging Face DatasetDict; name one "
                     r"split's folder, e\.g\. .*dd/train"):
    shards.expand_shards(str(tmp_path / "dd"), "data.train_files")
  with pytest.raises(ValueError, match="is a directory, not a shard"):
    shards.expand_shards(str(tmp_path), "data.train_files")
  (tmp_path / "ds" / "data-00001-of-00003.arrow").unlink()
  with pytest.raises(FileNotFoundError, match=r"lists 'data-00001-of-00003"
                     r"\.arrow', which is missing"):
    shards.expand_shards(folder, "data.train_files")


@pytest.mark.hf
def test_datasets_save_to_disk_reads_back(tmp_path):
  datasets = pytest.importorskip("datasets")
  docs = _docs(9)
  ds = datasets.Dataset.from_dict({"text": docs, "n": list(range(9))})
  ds.save_to_disk(str(tmp_path / "ds"), num_shards=2)
  paths = shards.expand_shards(str(tmp_path / "ds"), "data.train_files")
  assert len(paths) == 2 and _read(paths, shuffle=False) == docs


def test_array_record_needs_a_local_file():
  fs = fsspec.filesystem("memory")
  try:
    with fsspec.open("memory://ar/a.array_record", "wb") as f:
      f.write(b"x")
    _one_line_error(r"memory://ar/a\.array_record: \.array_record shards "
                    r"must be local", ["memory://ar/a.array_record"])
  finally:
    fs.rm("/ar", recursive=True)


def test_empty_shards_are_counted_not_errors(tmp_path):
  docs = _docs(5)
  paths = [_write(tmp_path / "good.jsonl", docs)]
  for ext in FORMATS:
    paths.append(_write(tmp_path / f"empty{ext}", []))
  zero = tmp_path / "zero.parquet"
  zero.write_bytes(b"")
  paths.append(str(zero))
  reader = shards.ShardReader(paths, num_epochs=1)
  assert sorted(reader) == sorted(docs)
  assert reader.stats.empty_shards == len(FORMATS) + 1
  assert reader.stats.bad_records == 0
  # Nothing to read at all: an endless stream says so instead of spinning.
  with pytest.raises(ValueError, match=r"process 0/1 read no document in "
                     r"epoch 0"):
    next(shards.ShardReader(paths[1:]))


# --- dealing -----------------------------------------------------------------


def _corpus(tmp_path, sizes) -> tuple[list[str], list[str]]:
  """Shards of rotating formats holding sizes[k] documents "s<k>d<i>"."""
  paths, docs = [], []
  for k, n in enumerate(sizes):
    part = _docs(n, tag=f"s{k}d")
    paths.append(_write(tmp_path / f"shard{k:02d}{FORMATS[k % len(FORMATS)]}", part))
    docs += part
  return paths, docs


def _shard_of(doc: str) -> str:
  return doc.split("d", 1)[0]


@pytest.mark.parametrize("sizes,count", [
    ((5, 7, 0, 3, 9, 4), 2), ((5, 7, 0, 3, 9, 4), 3), ((8, 3, 6), 3),
    ((13,), 3), ((13,), 2), ((4, 9), 3), ((2,), 5)])
def test_processes_read_disjoint_complete_subsets(tmp_path, sizes, count):
  paths, docs = _corpus(tmp_path, sizes)
  per = [_read(paths, process_count=count, process_index=p, seed=3)
         for p in range(count)]
  assert collections.Counter(itertools.chain(*per)) == (
      collections.Counter(docs))
  if len(sizes) >= count:
    # Whole shards per process: no shard is read by two.
    owners = collections.defaultdict(set)
    for p, got in enumerate(per):
      for d in got:
        owners[_shard_of(d)].add(p)
    assert all(len(o) == 1 for o in owners.values())
  elif sum(sizes) >= 2 * count:
    assert all(per)    # fewer shards than processes: still work for all


def test_order_is_deterministic_and_changes_by_epoch(tmp_path):
  paths, docs = _corpus(tmp_path, [2] * 8)
  two = _read(paths, seed=5, num_epochs=2)
  assert two == _read(paths, seed=5, num_epochs=2)
  first, second = two[:len(docs)], two[len(docs):]
  assert sorted(first) == sorted(second) == sorted(docs)
  assert first != second
  assert _read(paths, seed=6) != first
  assert _read(paths, shuffle=False) == docs


def test_every_epoch_reads_every_document_once(tmp_path):
  paths, docs = _corpus(tmp_path, (4, 1, 6))
  per = [_read(paths, process_count=5, process_index=p, num_epochs=3)
         for p in range(5)]
  assert collections.Counter(itertools.chain(*per)) == collections.Counter(
      docs * 3)


# --- resume ------------------------------------------------------------------


def _roundtrip(position):
  return json.loads(json.dumps(position))


@pytest.mark.parametrize("sizes,count,index", [
    ((5, 7, 0, 3, 9, 4), 2, 1), ((13,), 3, 2), ((6, 2), 1, 0)])
def test_resume_same_process_yields_exactly_the_rest(tmp_path, sizes, count,
                                                     index):
  paths, _ = _corpus(tmp_path, sizes)
  kw = dict(process_count=count, process_index=index, seed=1, num_epochs=2)
  full = _read(paths, **kw)
  for k in range(len(full) + 1):
    reader = shards.ShardReader(paths, **kw)
    assert list(itertools.islice(reader, k)) == full[:k]
    position = _roundtrip(reader.position())
    assert shards.ShardReader(paths, position=position,
                              **kw).position() == position
    assert list(shards.ShardReader(paths, position=position, **kw)) == (
        full[k:])


def _run(paths, count, steps, position=None, num_epochs=1):
  """Readers of `count` processes, process q reading steps[q] documents.

  Returns:
    (documents read, the merged position).
  """
  readers = [shards.ShardReader(paths, process_count=count, process_index=q,
                                seed=7, num_epochs=num_epochs,
                                position=position) for q in range(count)]
  got = [d for r, k in zip(readers, steps) for d in itertools.islice(r, k)]
  merged = shards.merge_positions(
      [_roundtrip(r.position()) for r in reversed(readers)])
  return got, _roundtrip(merged)


@pytest.mark.parametrize("sizes", [(5, 7, 0, 3, 9, 4), (13,), (4, 9)])
@pytest.mark.parametrize("counts,steps", [
    ((2, 1), [(4, 9)]),
    ((1, 2), [(11,)]),
    ((3, 2), [(1, 5, 3)]),
    ((2, 3, 1), [(6, 2), (3, 0, 4)]),
    ((3, 1, 2, 4), [(2, 2, 2), (5,), (1, 6)]),
])
def test_resume_on_another_process_count(tmp_path, sizes, counts, steps):
  paths, docs = _corpus(tmp_path, sizes)
  seen, position = [], None
  for count, step in zip(counts, steps):
    got, position = _run(paths, count, step, position)
    seen += got
  # The last count reads the rest of the epoch.
  count = counts[-1]
  rest = [_read(paths, process_count=count, process_index=q, seed=7,
                position=position) for q in range(count)]
  assert collections.Counter(seen + list(itertools.chain(*rest))) == (
      collections.Counter(docs))
  assert len(json.dumps(position)) < 2000


@pytest.mark.parametrize("counts", [(2, 1), (1, 3), (3, 2)])
def test_resume_across_epochs_on_another_process_count(tmp_path, counts):
  # Processes far apart: one is in epoch 1 while another is in epoch 0.
  paths, docs = _corpus(tmp_path, (6, 1, 5, 2))
  first, then = counts
  steps = [len(docs) + 3] + [2] * (first - 1)
  seen, position = _run(paths, first, steps, num_epochs=2)
  assert position["epoch"] == (1 if first == 1 else 0)
  rest = [_read(paths, process_count=then, process_index=q, seed=7,
                num_epochs=2, position=position) for q in range(then)]
  assert collections.Counter(seen + list(itertools.chain(*rest))) == (
      collections.Counter(docs * 2))


def test_finished_epochs_leave_the_merged_position(tmp_path):
  paths, docs = _corpus(tmp_path, (3, 4))
  got, position = _run(paths, 2, [100, 100], num_epochs=1)
  assert sorted(got) == sorted(docs)
  assert position["epoch"] == 1 and position["start"] == []


def test_positions_from_elsewhere_are_refused(tmp_path):
  paths, _ = _corpus(tmp_path, (3, 4))
  reader = shards.ShardReader(paths, process_count=2, process_index=0)
  next(reader)
  position = reader.position()
  with pytest.raises(ValueError, match="saved with seed=0"):
    shards.ShardReader(paths, process_count=2, seed=1, position=position)
  with pytest.raises(ValueError, match="another shard list"):
    shards.ShardReader(paths[:1], process_count=2, position=position)
  with pytest.raises(ValueError, match=r"merge_positions\(\)"):
    shards.ShardReader(paths, process_count=3, position=position)
  with pytest.raises(ValueError, match="one position per process"):
    shards.merge_positions([position])
