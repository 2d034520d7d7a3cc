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
           ".array_record")


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
