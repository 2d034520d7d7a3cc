"""Small shard files of every supported format, for the data tests.

`write(path, docs)` writes the documents in the format the path's extension
names (as fp4jax.data.shards reads them); `docs(n, tag)` makes distinct
documents with line breaks, quotes and non-ASCII text.
"""

import gzip
import json

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import zstandard
from array_record.python import array_record_module

from fp4jax.data import shards

SEP = "\n<|endoftext|>\n"
FORMATS = (".txt", ".jsonl", ".jsonl.gz", ".jsonl.zst", ".parquet",
           ".array_record", ".arrow")


def docs(n: int, tag: str = "d") -> list[str]:
  """n distinct documents with line breaks, indents, quotes, non-ASCII."""
  return [f"{tag}{i}: héllo \"wörld\" ✓ {'x' * (i % 7)}\n  second line {i}"
          + ("\n\nthird" if i % 3 == 0 else "") for i in range(n)]


def jsonl_bytes(docs) -> bytes:
  return b"".join(json.dumps({"id": i, "text": d}).encode() + b"\n"
                  for i, d in enumerate(docs))


def write(path, docs) -> str:
  """Writes `docs` to `path` in the format its extension names."""
  path = str(path)
  if path.endswith(".txt"):
    data = (SEP.join(docs) + SEP).encode() if docs else b""
  elif path.endswith(".jsonl"):
    data = jsonl_bytes(docs)
  elif path.endswith(".jsonl.gz"):
    data = gzip.compress(jsonl_bytes(docs))
  elif path.endswith(".jsonl.zst"):
    # Two frames, as `cat a.zst b.zst` gives: both must be read.
    half = len(docs) // 2
    data = b"".join(zstandard.ZstdCompressor().compress(jsonl_bytes(part))
                    for part in (docs[:half], docs[half:]) if part)
  elif path.endswith(".parquet"):
    table = pa.table({"id": list(range(len(docs))),
                      "text": pa.array(docs, pa.string())})
    with fsspec.open(path, "wb") as f:
      pq.write_table(table, f, row_group_size=3)
    return path
  elif path.endswith(".arrow"):
    table = pa.table({"id": list(range(len(docs))),
                      "text": pa.array(docs, pa.string())})
    with fsspec.open(path, "wb") as f:
      with pa.ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=3):
          w.write_batch(batch)
    return path
  elif path.endswith(".array_record"):
    writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
    for d in docs:
      writer.write(shards.encode_record(d))
    writer.close()
    return path
  else:
    data = jsonl_bytes(docs)
  with fsspec.open(path, "wb") as f:
    f.write(data)
  return path


def write_hf_dataset(path, docs, num_shards: int = 2) -> str:
  """`docs` as `datasets.Dataset.save_to_disk(path, num_shards)` lays them
  out (Arrow IPC stream shards and state.json, as datasets 2.x-5.x write
  them), written with pyarrow alone."""
  import os  # pylint: disable=g-import-not-at-top
  os.makedirs(path, exist_ok=True)
  names = []
  for k in range(num_shards):
    name = f"data-{k:05d}-of-{num_shards:05d}.arrow"
    part = docs[k * len(docs) // num_shards:(k + 1) * len(docs) // num_shards]
    table = pa.table({"text": pa.array(part, pa.string()),
                      "id": list(range(len(part)))})
    with pa.OSFile(os.path.join(path, name), "wb") as f:
      with pa.ipc.new_stream(f, table.schema) as w:
        for batch in table.to_batches(max_chunksize=2):
          w.write_batch(batch)
    names.append({"filename": name})
  with open(os.path.join(path, "state.json"), "w") as f:
    json.dump({"_data_files": names, "_split": None}, f)
  return str(path)


def marked_docs(n: int, start: int = 0, tag: str = "") -> list[str]:
  """Documents "D<i:04d>|<tag> words..." for i in [start, start + n): a
  unique marker first, non-ASCII words, every fourth with a second line."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(start)
  words = ["alpha", "beta", "gamma", "délta", "eps", "zeta", "\"eta\"",
           "theta", "✓"]
  return [f"D{i:04d}|{tag} " + " ".join(rng.choice(words, 3 + i % 11)) +
          ("\nsecond line" if i % 4 == 0 else "")
          for i in range(start, start + n)]


def train_tokenizer(path, docs, vocab: int) -> str:
  """A lossless BPE model of `vocab` pieces trained on `docs`' lines."""
  from fp4jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  lines = [l for d in docs for l in d.split("\n")]
  path.write_bytes(tokenizer_lib.train_bpe(lines, vocab))
  return str(path)
