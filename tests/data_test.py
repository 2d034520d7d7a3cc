"""Tests of the real-text input pipeline (fp4jax.data text sources).

Small corpora written to tmp_path, a 320-piece BPE model trained once per
session, TFDS data dirs under tmp_path. Nothing here touches the network.
Oracles are plain Python: str.split for documents, whole-document
SentencePiece calls for tokens, global stream positions for packing.
"""

import json
import logging
import os
import pathlib
import re
import time

import numpy as np
import pytest
import sentencepiece as spm
import tensorflow_datasets as tfds

from configs import default
from fp4jax import data
from fp4jax.data import builders
from fp4jax.data import documents
from fp4jax.data import stdlib_corpus
from fp4jax.data import tokenizer as tokenizer_lib

# Smallest vocabulary that fits the byte pieces (256), unk/BOS/EOS and the
# ~30 characters of the word corpus below, with a few merges to spare.
VOCAB = 320
# A missing catalogue dataset must fail at once; tfds's own offline failure
# takes minutes of retries.
FAST_FAIL_SECONDS = 5.0
SEP = "\n<|endoftext|>\n"
WORDS = ("alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta",
         "theta", "iota", "kappa", "lambda", "mu")


def _docs(n: int, seed: int = 0, max_words: int = 40) -> list[str]:
  """n distinct documents "doc<i>: words ..." with line breaks, indents."""
  rng = np.random.default_rng(seed)
  out = []
  for i in range(n):
    words = [WORDS[j] for j in rng.integers(0, len(WORDS),
                                            rng.integers(3, max_words))]
    lines = [" ".join(words[k:k + 7]) for k in range(0, len(words), 7)]
    out.append(f"doc{i}: " + "\n  ".join(lines))
  return out


def _write_txt(path, docs) -> str:
  path.write_text(SEP.join(docs) + SEP, encoding="utf-8")
  return str(path)


@pytest.fixture(scope="session")
def tok_path(tmp_path_factory):
  lines = [l for d in _docs(300, seed=99) for l in d.split("\n")]
  path = tmp_path_factory.mktemp("tok") / "words.model"
  path.write_bytes(tokenizer_lib.train_bpe(lines, VOCAB))
  return str(path)


def _cfg(tmp_path, tok_path="", **overrides):
  c = default.get_config().data
  c.source = "text_files"
  c.vocab_size = VOCAB
  c.tokenizer_model = tok_path
  c.seq_len = 16
  c.global_batch = 4
  c.val_fraction = 0.0
  c.tfds_data_dir = str(tmp_path / "tfds")
  for key, value in overrides.items():
    setattr(c, key, value)
  return c


def _oracle_doc_tokens(tok_path, docs):
  sp = spm.SentencePieceProcessor(model_file=tok_path)
  return [np.array([sp.bos_id()] + sp.encode(d) + [sp.eos_id()])
          for d in docs]


def _oracle_rows(doc_tokens, b, t, steps):
  """Rows [steps, b, T+1] and segment ids of the documented lane packing."""
  n = len(doc_tokens)
  lens = [len(d) for d in doc_tokens]
  epochs = 2 + (b * steps * (t + 1)) // sum(lens)
  flat = np.concatenate(doc_tokens * epochs)
  is_start = np.zeros(flat.size, bool)
  is_start[np.cumsum([0] + lens * epochs)[:-1]] = True
  rows = np.zeros((steps, b, t + 1), np.int64)
  seg = np.zeros((steps, b, t + 1), np.int64)
  for r in range(b):
    k, part = divmod(r * n, b)
    start = sum(lens[:k]) + part * lens[k] // b
    for s in range(steps):
      a = start + s * (t + 1)
      rows[s, r] = flat[a:a + t + 1]
      starts = is_start[a:a + t + 1].copy()
      starts[0] = True
      seg[s, r] = np.cumsum(starts)
  return rows, seg


def _lane_text(batches, lane, tok):
  """Decoded token stream of one lane over consecutive batches."""
  ids = []
  for b in batches:
    ids.extend(b["inputs"][lane].tolist() + [int(b["targets"][lane, -1])])
  return tok.decode(ids)


# ----------------------------------------------------------------- documents


def test_text_documents_match_split_oracle(tmp_path):
  docs = _docs(7) + ["trailing newline\n", "  indented\n\n  twice"]
  path = _write_txt(tmp_path / "c.txt", docs)
  got = list(documents.read_documents(path))
  text = open(path, encoding="utf-8").read()
  assert got == [d for d in text.split(SEP) if d]
  assert got == docs


def test_gutenberg_corpus_books():
  corpus = (pathlib.Path(__file__).resolve().parents[2] / "shared" / "data" /
            "corpus")
  if not corpus.is_dir():
    pytest.skip("shared data not present")
  # The data README: 64 training books and 6 held-out books.
  for split, books in (("train", 64), ("val", 6)):
    stats = documents.ReadStats()
    path = str(corpus / f"gutenberg_en_{split}.txt")
    for _ in documents.read_documents(path, on_decode_error="strict",
                                      stats=stats):
      pass
    assert (stats.documents, stats.skipped_empty) == (books, 0)


def test_blank_line_separator_and_jsonl(tmp_path):
  p = tmp_path / "s.txt"
  p.write_text("a b\nc\n\n\nd e\n\nf\n", encoding="utf-8")
  assert list(documents.read_documents(str(p), separator="")) == [
      "a b\nc", "d e", "f"]
  j = tmp_path / "d.jsonl"
  j.write_text("\n".join(json.dumps({"text": d, "n": i})
                         for i, d in enumerate(_docs(4))) + "\n")
  assert list(documents.read_documents(str(j))) == _docs(4)


def test_val_fraction_split_is_deterministic_by_document(tmp_path):
  docs = _docs(40, seed=3)
  a = _write_txt(tmp_path / "a.txt", docs[:25])
  b = _write_txt(tmp_path / "b.txt", docs[25:])

  def splits(files, data_dir):
    spec = builders.CorpusSpec(kind="text_files", train=tuple(files),
                               val_fraction=0.25)
    builder = builders.prepare_corpus(spec, str(data_dir))
    out = []
    for split in ("train", "val"):
      src = builders.corpus_source(builder, split)
      out.append({src[i]["text"].decode() for i in range(len(src))})
    return out

  train, val = splits([a, b], tmp_path / "d1")
  assert len(val) == 10 and not train & val and train | val == set(docs)
  # Other file order, fresh data dir: the same documents are held out.
  assert splits([b, a], tmp_path / "d2") == [train, val]


def test_prepared_corpus_is_reused_until_a_file_changes(tmp_path):
  path = tmp_path / "c.txt"
  _write_txt(path, _docs(6))
  spec = builders.CorpusSpec(kind="text_files", train=(str(path),))
  builder = builders.prepare_corpus(spec, str(tmp_path / "d"))
  files = sorted(pathlib.Path(builder.data_dir).iterdir())
  stamps = [f.stat().st_mtime_ns for f in files]
  again = builders.prepare_corpus(spec, str(tmp_path / "d"))
  assert again.data_dir == builder.data_dir
  assert [f.stat().st_mtime_ns for f in files] == stamps
  _write_txt(path, _docs(7))
  changed = builders.prepare_corpus(spec, str(tmp_path / "d"))
  assert changed.data_dir != builder.data_dir
  assert len(builders.corpus_source(changed, "train")) == 7


# ----------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_is_exact(tmp_path, tok_path):
  tok = tokenizer_lib.Tokenizer.load(tok_path)
  texts = ["def f(x):\n    return x  # trailing  \n\n\tTab\r\nend",
           "  leading spaces, ünïcödé, 漢字, emoji 😀\n\n\n",
           _docs(1)[0], "", "\n", " "]
  sp = spm.SentencePieceProcessor(model_file=tok_path)
  for text in texts:
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    # Batched per-line encoding equals encoding the whole string.
    assert ids.tolist() == sp.encode(text)
    doc = tok.encode_document(text)
    assert doc[0] == tok.bos_id and doc[-1] == tok.eos_id
  assert tok.vocab_size == VOCAB


def test_dummy_prefix_model_matches_whole_document_encoding(tmp_path):
  # LLaMA-style models add a dummy prefix: only the document start gets it.
  lines = [l for d in _docs(200) for l in d.split("\n")]
  path = tmp_path / "prefix.model"
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter(lines), model_prefix=str(path)[:-6],
      model_type="bpe", vocab_size=VOCAB, byte_fallback=True,
      normalization_rule_name="identity", remove_extra_whitespaces=False,
      add_dummy_prefix=True, minloglevel=2)
  tok = tokenizer_lib.Tokenizer.load(str(path))
  sp = spm.SentencePieceProcessor(model_file=str(path))
  for text in _docs(5, seed=1):
    assert tok.encode(text).tolist() == sp.encode(text)
    assert tok.decode(tok.encode(text)) == text


def test_trained_tokenizer_is_stored_reused_and_checked(tmp_path):
  path = _write_txt(tmp_path / "c.txt", _docs(60))
  workdir = tmp_path / "run"
  c = _cfg(tmp_path, train_files=(path,), val_fraction=0.1)
  it = data.make_input(c, split="train", seed=0, workdir=str(workdir))
  stored = workdir / "tokenizer.model"
  assert it.vocab_size == VOCAB and stored.is_file()
  mtime = stored.stat().st_mtime_ns
  again = data.make_input(c, split="val", seed=0, workdir=str(workdir))
  assert stored.stat().st_mtime_ns == mtime
  assert again.tokenizer.fingerprint == it.tokenizer.fingerprint
  c.vocab_size = VOCAB + 8
  with pytest.raises(ValueError, match="data.vocab_size=328") as e:
    data.make_input(c, split="train", seed=0, workdir=str(workdir))
  assert "\n" not in str(e.value)


# ------------------------------------------------------------------- packing


@pytest.mark.parametrize("rows", [3, 8])   # more lanes than documents too
def test_packing_matches_oracle(tmp_path, tok_path, rows):
  docs = _docs(5 if rows == 8 else 9, seed=5)
  train = _write_txt(tmp_path / "t.txt", _docs(4, seed=6))
  val = _write_txt(tmp_path / "v.txt", docs)
  c = _cfg(tmp_path, tok_path, train_files=(train,), val_files=(val,),
           global_batch=rows, seq_len=16, segment_ids=True)
  it = data.make_input(c, split="val", seed=0)
  steps = 12
  want, want_seg = _oracle_rows(_oracle_doc_tokens(tok_path, docs), rows,
                                16, steps)
  for s in range(steps):
    b = next(it)
    assert {k: (v.dtype.name, v.shape) for k, v in b.items()} == {
        "inputs": ("int32", (rows, 16)), "targets": ("int32", (rows, 16)),
        "mask": ("float32", (rows, 16)),
        "segment_ids": ("int32", (rows, 16))}
    np.testing.assert_array_equal(b["inputs"], want[s, :, :-1])
    np.testing.assert_array_equal(b["targets"], want[s, :, 1:])
    np.testing.assert_array_equal(b["segment_ids"], want_seg[s, :, :-1])
    np.testing.assert_array_equal(
        b["mask"], want_seg[s, :, 1:] == want_seg[s, :, :-1])


def test_segment_ids_and_mask_follow_document_starts(tmp_path, tok_path):
  path = _write_txt(tmp_path / "c.txt", _docs(30, max_words=12))
  c = _cfg(tmp_path, tok_path, train_files=(path,), val_fraction=0.2,
           seq_len=32, global_batch=4, segment_ids=True)
  with_seg = data.make_input(c, split="train", seed=1)
  c.segment_ids = False
  without = data.make_input(c, split="train", seed=1)
  bos = with_seg.tokenizer.bos_id
  for _ in range(6):
    a, b = next(with_seg), next(without)
    np.testing.assert_array_equal(a["inputs"], b["inputs"])
    np.testing.assert_array_equal(b["segment_ids"], 1)
    # BOS appears only where a document starts: there the segment changes
    # and the target predicting it is masked.
    np.testing.assert_array_equal(a["mask"], a["targets"] != bos)
    np.testing.assert_array_equal(b["mask"], a["mask"])
    np.testing.assert_array_equal(a["segment_ids"][:, 0], 1)
    np.testing.assert_array_equal(np.diff(a["segment_ids"], axis=1),
                                  a["inputs"][:, 1:] == bos)


def test_train_order_is_a_seeded_permutation_per_epoch(tmp_path, tok_path):
  docs = _docs(10, max_words=8)
  path = _write_txt(tmp_path / "c.txt", docs)
  val = _write_txt(tmp_path / "v.txt", _docs(2))
  c = _cfg(tmp_path, tok_path, train_files=(path,), val_files=(val,),
           global_batch=1, seq_len=16)

  def order(seed):
    it = data.make_input(c, split="train", seed=seed)
    text = _lane_text([next(it) for _ in range(60)], 0, it.tokenizer)
    return [int(m) for m in re.findall(r"doc(\d+):", text)]

  o = order(7)
  assert len(o) >= 20
  assert sorted(o[:10]) == list(range(10)) == sorted(o[10:20])
  assert o[:10] != o[10:20]          # reshuffled each epoch
  assert order(7) == o and order(8) != o


def test_resume_yields_the_same_batches(tmp_path, tok_path):
  path = _write_txt(tmp_path / "c.txt", _docs(12, max_words=10))
  c = _cfg(tmp_path, tok_path, train_files=(path,), val_fraction=0.2,
           global_batch=3, seq_len=16, segment_ids=True)
  ref = data.make_input(c, split="train", seed=3)
  want = [next(ref) for _ in range(14)]   # crosses several epochs
  first = data.make_input(c, split="train", seed=3)
  for _ in range(5):
    next(first)
  state = json.loads(json.dumps(first.get_state()))
  resumed = data.make_input(c, split="train", seed=3)
  resumed.set_state(state)
  for w in want[5:]:
    got = next(resumed)
    for key in w:
      np.testing.assert_array_equal(got[key], w[key])
  c.seq_len = 8
  other = data.make_input(c, split="train", seed=3)
  with pytest.raises(ValueError, match="seq_len 16 -> 8"):
    other.set_state(state)


def test_processes_read_disjoint_shards_covering_the_split(tmp_path,
                                                          tok_path):
  docs = _docs(24, max_words=10)
  path = _write_txt(tmp_path / "c.txt", docs)
  val = _write_txt(tmp_path / "v.txt", _docs(2))
  c = _cfg(tmp_path, tok_path, train_files=(path,), val_files=(val,),
           global_batch=4, seq_len=32)
  seen = []
  for p in range(2):
    it = data.make_input(c, split="train", seed=0, process_index=p,
                         process_count=2)
    assert it.num_documents == 12
    batches = [next(it) for _ in range(40)]
    assert batches[0]["inputs"].shape == (2, 32)
    text = "".join(_lane_text(batches, r, it.tokenizer) for r in range(2))
    seen.append({int(m) for m in re.findall(r"doc(\d+):", text)})
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == set(range(24))
  assert seen[0] == set(range(0, 24, 2))   # records p, p + 2, ...


# -------------------------------------------------------------------- errors


def _one_line(excinfo):
  assert "\n" not in str(excinfo.value)
  return str(excinfo.value)


def test_missing_files_name_the_file(tmp_path, tok_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="data.train_files") as e:
    data.make_input(_cfg(tmp_path, tok_path, train_files=(missing,)),
                    split="train", seed=0)
  assert missing in _one_line(e)
  with pytest.raises(FileNotFoundError, match=r"no file matches"):
    data.make_input(_cfg(tmp_path, tok_path,
                         train_files=(str(tmp_path / "*.none"),)),
                    split="train", seed=0)
  ok = _write_txt(tmp_path / "c.txt", _docs(5))
  with pytest.raises(FileNotFoundError, match="data.tokenizer_model"):
    data.make_input(_cfg(tmp_path, str(tmp_path / "x.model"),
                         train_files=(ok,)), split="train", seed=0)


def test_empty_corpus_is_an_error(tmp_path, tok_path):
  path = tmp_path / "empty.txt"
  path.write_text(" \n<|endoftext|>\n\n<|endoftext|>\n", encoding="utf-8")
  with pytest.raises(ValueError, match="no documents") as e:
    data.make_input(_cfg(tmp_path, tok_path, train_files=(str(path),)),
                    split="train", seed=0)
  assert str(path) in _one_line(e)


def test_invalid_utf8_strict_and_replace(tmp_path, tok_path, caplog):
  raw = b"doc0: alpha\n<|endoftext|>\ndoc1: beta \xff\xfe gamma \xc3\n"
  path = tmp_path / "bad.txt"
  path.write_bytes(raw)
  c = _cfg(tmp_path, tok_path, train_files=(str(path),),
           on_decode_error="strict")
  with pytest.raises(ValueError, match="invalid UTF-8") as e:
    data.make_input(c, split="train", seed=0)
  msg = _one_line(e)
  offset = raw.index(b"\xff")
  assert str(path) in msg and f"byte offset {offset}" in msg
  stats = documents.ReadStats()
  got = list(documents.read_documents(str(path), stats=stats))
  want = [d for d in raw.decode("utf-8", "replace").split(SEP) if d]
  assert got == [w.rstrip("\n") for w in want]
  assert stats.decode_errors == "".join(want).count("\ufffd") == 3
  ignored = list(documents.read_documents(str(path), on_decode_error="ignore"))
  assert ignored[1] == "doc1: beta  gamma "
  c.on_decode_error = "replace"
  c.seq_len = 8
  with caplog.at_level(logging.WARNING):
    it = data.make_input(c, split="train", seed=0)
  assert f"{path}: 3 invalid UTF-8 sequence(s)" in caplog.text
  assert next(it)["inputs"].shape == (4, 8)


def test_bad_jsonl_names_file_and_line(tmp_path):
  path = tmp_path / "d.jsonl"
  path.write_text('{"text": "ok"}\n{"body": "no text"}\n', encoding="utf-8")
  with pytest.raises(ValueError, match=r"d.jsonl:2: no string field 'text'"):
    list(documents.read_documents(str(path)))


def test_seq_len_longer_than_corpus(tmp_path, tok_path):
  path = _write_txt(tmp_path / "c.txt", ["doc0: alpha", "doc1: beta"])
  c = _cfg(tmp_path, tok_path, train_files=(path,), seq_len=4096)
  with pytest.raises(ValueError, match="data.seq_len=4096 is longer") as e:
    data.make_input(c, split="train", seed=0)
  _one_line(e)


def test_tokenizer_model_vocab_mismatch(tmp_path, tok_path):
  path = _write_txt(tmp_path / "c.txt", _docs(5))
  c = _cfg(tmp_path, tok_path, train_files=(path,), vocab_size=32000)
  with pytest.raises(ValueError, match="set data.vocab_size=320") as e:
    data.make_input(c, split="train", seed=0)
  _one_line(e)


def test_too_small_vocab_is_a_one_line_error(tmp_path):
  lines = [l for d in _docs(50) for l in d.split("\n")]
  with pytest.raises(ValueError, match=r"data.vocab_size=260 is too small") \
      as e:
    tokenizer_lib.train_bpe(lines, 260)
  assert "needs >= " in _one_line(e)


def test_a_corpus_of_one_enormous_line_trains_a_tokenizer():
  # SentencePiece drops sentences over 4192 bytes: a corpus that is one
  # long line (minified text, a book without newlines) left it nothing and
  # the failure was blamed on data.vocab_size.
  words = "the quick brown fox jumps over a lazy dog while it sleeps".split()
  rng = np.random.default_rng(0)
  line = " ".join(rng.choice(words, 60_000)) + " naïve café " * 300
  tok = tokenizer_lib.Tokenizer(tokenizer_lib.train_bpe([line], 300))
  assert tok.vocab_size == 300
  assert tok.decode(tok.encode(line[:500])) == line[:500]


def test_long_lines_are_cut_into_bounded_pieces_losing_nothing():
  lines = ["a" * 10 + " " + "b" * 9, "é" * 7, "x y", ""]
  got = list(tokenizer_lib._bounded(lines, limit=8))  # pylint: disable=protected-access
  assert all(len(p.encode()) <= 8 for p in got)
  assert "".join(got) == "".join(lines)
  assert "é" * 4 in got   # cut at a character boundary (2-byte chars)


def test_missing_val_split_is_an_error(tmp_path, tok_path):
  path = _write_txt(tmp_path / "c.txt", _docs(5))
  with pytest.raises(ValueError, match="no val split"):
    data.make_input(_cfg(tmp_path, tok_path, train_files=(path,)),
                    split="val", seed=0)


# -------------------------------------------------------------- stdlib, tfds


def test_stdlib_corpus_is_deterministic(tmp_path, tok_path):
  files = stdlib_corpus.stdlib_files()
  assert files == stdlib_corpus.stdlib_files() and len(files) > 100
  root = stdlib_corpus.stdlib_root()
  assert not any(
      set(os.path.relpath(f, root).split(os.sep)) & stdlib_corpus.EXCLUDED_DIRS
      for f in files)
  # Small files only keep the test fast; the rules are the same.
  c = _cfg(tmp_path, tok_path, source="stdlib", val_fraction=0.1,
           stdlib_max_file_bytes=2048, seq_len=32)
  firsts = []
  for run in range(2):
    c.tfds_data_dir = str(tmp_path / f"tfds{run}")
    it = data.make_input(c, split="train", seed=0)
    builder = builders.prepare_corpus(
        builders.CorpusSpec(kind=f"stdlib_{stdlib_corpus.python_tag()}",
                            train=tuple(stdlib_corpus.stdlib_files(2048)),
                            val_fraction=0.1, fmt="file"),
        c.tfds_data_dir)
    rec = builders.corpus_source(builder, "train")[0]
    firsts.append((documents.document_hash(rec["text"].decode()),
                   next(it)["inputs"].tolist()))
  assert firsts[0] == firsts[1]


class Fp4jaxTestCatalogue(tfds.core.GeneratorBasedBuilder):
  """A registered (catalogue-style) dataset prepared locally by the test."""

  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(
        builder=self, description="test catalogue dataset",
        features=tfds.features.FeaturesDict({"text": tfds.features.Text()}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(_docs(8)),
            "test": self._generate_examples(_docs(3, seed=1))}

  def _generate_examples(self, docs):
    for i, d in enumerate(docs):
      yield i, {"text": d}


def test_tfds_catalogue_prepared_dataset(tmp_path, tok_path):
  data_dir = str(tmp_path / "catalogue")
  Fp4jaxTestCatalogue(data_dir=data_dir).download_and_prepare(
      file_format="array_record")
  c = _cfg(tmp_path, tok_path, source="tfds",
           tfds_name="fp4jax_test_catalogue", tfds_data_dir=data_dir)
  it = data.make_input(c, split="val", seed=0)   # "test" stands in for val
  assert it.num_documents == 3
  text = _lane_text([next(it) for _ in range(4)], 0, it.tokenizer)
  assert text.startswith(_docs(3, seed=1)[0])


def test_tfds_catalogue_missing_fails_fast(tmp_path, tok_path):
  c = _cfg(tmp_path, tok_path, source="tfds", tfds_name="tiny_shakespeare",
           tfds_data_dir=str(tmp_path / "empty"))
  start = time.monotonic()
  with pytest.raises(FileNotFoundError, match="not prepared") as e:
    data.make_input(c, split="train", seed=0)
  assert time.monotonic() - start < FAST_FAIL_SECONDS
  assert "tfds build tiny_shakespeare" in _one_line(e)
  c.tfds_name = "no_such_dataset_xyz"
  with pytest.raises(ValueError, match="no_such_dataset_xyz") as e:
    data.make_input(c, split="train", seed=0)
  _one_line(e)
