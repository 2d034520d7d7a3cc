"""Tests of the streamed `files` source (fp4jax.data.streaming / files).

Every document starts with a unique marker ("D0042|"); a lossless BPE
model trained on the documents lets a test decode the packed stream back
into documents (rows of a process are consecutive runs of its stream, so
their concatenation is the stream). Oracles: the document lists the tests
wrote, compared as multisets; batches compared element for element.
No JAX, no network.
"""

import collections
import json
import re

import ml_collections
import numpy as np
import pytest

from configs import default
from fp4jax import data
from fp4jax.data import files
from fp4jax.data import streaming
from fp4jax.data import tokenizer as tokenizer_lib

import shard_files

_docs = shard_files.marked_docs

VOCAB = 320
SEQ, ROWS = 24, 3
MARK = re.compile(r"D(\d{4})\|")


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return shard_files.train_tokenizer(
      tmp_path_factory.mktemp("tok") / "stream.model", _docs(400), VOCAB)


@pytest.fixture(scope="module")
def tok(tok_path):
  return tokenizer_lib.Tokenizer.load(tok_path)


def _shards(tmp_path, docs, n: int, ext: str = ".jsonl.zst",
            name: str = "s") -> list[str]:
  return [shard_files.write(tmp_path / f"{name}{k:02d}{ext}", docs[k::n])
          for k in range(n)]


def _cfg(tok_path, **overrides) -> ml_collections.ConfigDict:
  c = default.get_config().data
  c.source = "files"
  c.tokenizer_model = tok_path
  c.vocab_size = VOCAB
  c.seq_len = SEQ
  c.global_batch = ROWS
  c.workers = 0
  c.val_fraction = 0.0
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _input(cfg, split="train", pidx=0, pcount=1, seed=0):
  return data.make_input(cfg, split=split, seed=seed, process_index=pidx,
                         process_count=pcount)


def _stream_docs(tok, batches) -> tuple[list[str], str]:
  """(the whole documents, the unfinished last piece) of consecutive
  batches of one process."""
  ids = np.concatenate([np.concatenate(
      [b["inputs"], b["targets"][:, -1:]], axis=1).reshape(-1)
                        for b in batches])
  cuts = np.flatnonzero(ids == tok.bos_id)
  pieces = np.split(ids, cuts)
  head, rest = pieces[0], pieces[1:]
  whole = [tok.decode(p) for p in rest if p[-1] == tok.eos_id]
  partial = [tok.decode(p) for p in rest if p[-1] != tok.eos_id]
  assert len(partial) <= 1 and all(p[-1] != tok.eos_id for p in rest[:-1]
                                   ) is not None
  del head
  return whole, partial[0] if partial else ""


def _marks(texts) -> list[int]:
  return [int(MARK.match(t).group(1)) for t in texts]


def test_batches_decode_to_the_documents_in_read_order(tmp_path, tok_path,
                                                      tok):
  docs = _docs(40)
  paths = _shards(tmp_path, docs, 4)
  it = _input(_cfg(tok_path, train_files=(str(tmp_path / "*.jsonl.zst"),)))
  batches = [next(it) for _ in range(5)]
  b = batches[0]
  assert b["inputs"].shape == (ROWS, SEQ) and b["inputs"].dtype == np.int32
  assert b["mask"].dtype == np.float32
  np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
  whole, _ = _stream_docs(tok, batches)
  # Shards in the seeded order, each in file order: the oracle reads them.
  reader = streaming.shards_lib.ShardReader(paths, seed=0, num_epochs=1)
  order = list(reader)
  assert 10 <= len(whole) < len(order)
  assert whole == order[:len(whole)]


def test_packing_marks_documents_and_masks_their_first_target(tmp_path,
                                                             tok_path, tok):
  _shards(tmp_path, _docs(30), 3)
  cfg = _cfg(tok_path, train_files=(str(tmp_path / "*"),),
             segment_ids=True)
  b = next(_input(cfg))
  for r in range(ROWS):
    row = np.concatenate([b["inputs"][r], b["targets"][r, -1:]])
    starts = np.flatnonzero(row == tok.bos_id)
    seg = np.ones(SEQ + 1, np.int32)
    for s in starts:
      if s > 0:
        seg[s:] += 1
    np.testing.assert_array_equal(b["segment_ids"][r], seg[:-1])
    np.testing.assert_array_equal(b["mask"][r],
                                  (seg[1:] == seg[:-1]).astype(np.float32))
  flat = next(_input(_cfg(tok_path, train_files=(str(tmp_path / "*"),))))
  np.testing.assert_array_equal(flat["segment_ids"], 1)
  np.testing.assert_array_equal(flat["inputs"], b["inputs"])


@pytest.mark.parametrize("pcount", [2, 3])
def test_processes_share_an_epoch_disjointly_and_completely(
    tmp_path, tok_path, tok, pcount):
  docs = _docs(36)
  paths = _shards(tmp_path, docs, 2)    # fewer shards than 3 processes
  seen = collections.Counter()
  for p in range(pcount):
    it = _input(_cfg(tok_path, train_files=tuple(paths),
                     global_batch=ROWS * pcount), pidx=p, pcount=pcount)
    it._open()
    stream = it._streams[0]
    while True:
      ids, cursor = stream.next()
      if cursor[0] > 0:
        break
      seen[tok.decode(ids)] += 1
    it.close()
  assert seen == collections.Counter(docs)


def test_resume_same_processes_gives_the_identical_next_batches(
    tmp_path, tok_path):
  _shards(tmp_path, _docs(50), 5, ".jsonl.gz")
  cfg = _cfg(tok_path, train_files=(str(tmp_path / "*.jsonl.gz"),),
             segment_ids=True)
  it = _input(cfg, seed=3)
  states, batches = [], []
  for _ in range(14):   # several epochs: cuts inside documents and shards
    states.append(json.loads(json.dumps(it.get_state())))
    batches.append(next(it))
  for k in (0, 1, 5, 9, 13):
    again = _input(cfg, seed=3)
    again.set_state(states[k])
    for want in batches[k:k + 2]:
      got = next(again)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
    again.close()
  assert any(s["current"] for s in states)   # cut inside a document
  it.close()


def _consumed_marks(tok, it, steps: int) -> list[int]:
  """Markers of the documents `steps` batches of `it` took: the whole
  ones decoded from the batches, the one being cut from the iterator."""
  whole, partial = _stream_docs(tok, [next(it) for _ in range(steps)])
  marks = _marks(whole)
  if it._current is not None:
    text = tok.decode(it._current[1])
    assert text.startswith(partial)
    marks += _marks([text])
  return marks


@pytest.mark.parametrize("before,after", [(2, 1), (1, 2), (2, 3)])
def test_resume_on_another_process_count_repeats_and_skips_nothing(
    tmp_path, tok_path, tok, before, after):
  docs = _docs(48)
  paths = _shards(tmp_path, docs, 3)
  steps = 4
  states, taken = [], collections.Counter()
  for p in range(before):
    it = _input(_cfg(tok_path, train_files=tuple(paths),
                     global_batch=ROWS * before), pidx=p, pcount=before)
    taken.update(_consumed_marks(tok, it, steps))
    states.append(json.loads(json.dumps(it.get_state())))
    it.close()
  assert sum(taken.values()) < len(docs)        # still inside epoch 0
  rest = collections.Counter()
  for p in range(after):
    it = _input(_cfg(tok_path, train_files=tuple(paths),
                     global_batch=ROWS * after), pidx=p, pcount=after)
    it.set_state(data.process_state(states, p, after))
    it._open()
    assert it._current is None
    while True:
      ids, cursor = it._streams[0].next()
      if cursor[0] > 0:
        break
      rest.update(_marks([tok.decode(ids)]))
    it.close()
  assert taken + rest == collections.Counter(range(len(docs)))


def test_a_resumed_state_resumes_again_on_a_third_count(tmp_path, tok_path,
                                                        tok):
  paths = _shards(tmp_path, _docs(60), 4)
  taken = collections.Counter()

  def run(pcount, states, steps):
    out = []
    for p in range(pcount):
      it = _input(_cfg(tok_path, train_files=tuple(paths),
                       global_batch=ROWS * pcount), pidx=p, pcount=pcount)
      if states is not None:
        it.set_state(data.process_state(states, p, pcount))
      taken.update(_consumed_marks(tok, it, steps))
      out.append(json.loads(json.dumps(it.get_state())))
      it.close()
    return out

  states = run(2, None, 2)
  states = run(3, states, 1)
  assert max(taken.values()) == 1
  it = _input(_cfg(tok_path, train_files=tuple(paths)))
  it.set_state(data.process_state(states, 0, 1))
  it._open()
  while True:
    ids, cursor = it._streams[0].next()
    if cursor[0] > 0:
      break
    taken.update(_marks([tok.decode(ids)]))
  it.close()
  assert taken == collections.Counter(range(60))


def test_mixture_takes_tokens_in_proportion_and_resumes(tmp_path, tok_path,
                                                       tok):
  web = _shards(tmp_path, _docs(40, 0, "web"), 2, ".jsonl", "web")
  code = _shards(tmp_path, _docs(40, 1000, "code"), 2, ".parquet", "code")
  cfg = _cfg(tok_path, mixture=(f"web:3:{','.join(web)}",
                                ("code", 1.0, tuple(code))))
  it = _input(cfg)
  batches = [next(it) for _ in range(30)]
  shares = it.realized()
  assert shares["web"] == pytest.approx(0.75, abs=0.02)
  whole, _ = _stream_docs(tok, batches)
  counted = collections.Counter("web" if m < 1000 else "code"
                                for m in _marks(whole))
  assert counted["web"] > 2 * counted["code"]
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  again = _input(cfg)
  again.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(again)["inputs"], w["inputs"])
  assert again.realized() == pytest.approx(it.realized(), abs=1e-9)


def test_val_fraction_holds_documents_out_of_training(tmp_path, tok_path,
                                                      tok):
  docs = _docs(80)
  paths = _shards(tmp_path, docs, 2, ".txt")
  cfg = _cfg(tok_path, train_files=tuple(paths), val_fraction=0.25)
  held = {d for d in docs if streaming.held_out(d, 0.25)}
  assert 8 < len(held) < 32
  for split, want in (("train", set(docs) - held), ("val", held)):
    it = _input(cfg, split=split)
    it._open()
    got = set()
    while True:
      ids, cursor = it._streams[0].next()
      if cursor[0] > 0:
        break
      got.add(tok.decode(ids))
    it.close()
    assert got == want, split


def test_val_files_are_their_own_source(tmp_path, tok_path, tok):
  train = _shards(tmp_path, _docs(20), 2, name="t")
  val = _shards(tmp_path, _docs(6, 500), 1, name="v")
  cfg = _cfg(tok_path, train_files=tuple(train), val_files=tuple(val))
  it = _input(cfg, split="val")
  whole, _ = _stream_docs(tok, [next(it) for _ in range(4)])
  assert set(_marks(whole)) <= set(range(500, 506))
  with pytest.raises(ValueError, match="no val split"):
    _input(_cfg(tok_path, train_files=tuple(train)), split="val")


def test_workers_change_the_speed_not_the_batches(tmp_path, tok_path):
  _shards(tmp_path, _docs(120), 3)
  cfg = _cfg(tok_path, train_files=(str(tmp_path / "*"),))
  want = [next(_input(cfg)) for _ in range(1)]
  it0 = _input(cfg)
  want = [next(it0) for _ in range(8)]
  cfg.workers = 2
  it2 = _input(cfg)
  assert it2._pool.workers == 2
  for w in want:
    np.testing.assert_array_equal(next(it2)["inputs"], w["inputs"])
  stats = it2.stats()
  assert stats["consumed"] <= stats["tokenized"]
  it2.close()


@pytest.mark.parametrize("overrides,match", [
    (dict(train_files=("{d}/a.csv",)), r"a\.csv: unsupported shard ext"),
    (dict(train_files=("{d}/none*.jsonl",)), "data.train_files: no file "
     "matches"),
    (dict(train_files=("{d}/s00.jsonl.zst",),
          mixture=("a:1:{d}/s00.jsonl.zst",)), "not both"),
    (dict(mixture=("a:x:{d}/s00.jsonl.zst",)), "weight 'x' is not a number"),
    (dict(mixture=("a:0:{d}/s00.jsonl.zst",)), "weight must be > 0"),
    (dict(mixture=("a:1",)), "is not NAME:WEIGHT:PATTERNS"),
    (dict(mixture=("a:1:{d}/s00.jsonl.zst", "a:2:{d}/s00.jsonl.zst")),
     "names repeat"),
    (dict(train_files=()), "data.train_files is empty"),
    (dict(train_files=("{d}/s00.jsonl.zst",), workers=-3),
     "data.workers must be"),
    (dict(train_files=("{d}/s00.jsonl.zst",), text_key="body"),
     r"s00\.jsonl\.zst:1: no string field 'body'"),
])
def test_bad_settings_fail_in_one_line_naming_the_key(tmp_path, tok_path,
                                                      overrides, match):
  _shards(tmp_path, _docs(4), 1)
  (tmp_path / "a.csv").write_text("text\nhello\n")
  d = str(tmp_path)
  fmt = lambda v: (tuple(x.format(d=d) if isinstance(x, str) else x
                         for x in v) if isinstance(v, tuple) else v)
  cfg = _cfg(tok_path, **{k: fmt(v) for k, v in overrides.items()})
  with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
    _input(cfg)
  assert "\n" not in str(e.value)


def test_a_corrupt_shard_mid_stream_is_one_line_or_counted(tmp_path,
                                                           tok_path):
  docs = _docs(60)
  good = shard_files.write(tmp_path / "a.jsonl.zst", docs[:30])
  raw = open(shard_files.write(tmp_path / "b.jsonl.zst", docs[30:]),
             "rb").read()
  (tmp_path / "b.jsonl.zst").write_bytes(raw[:len(raw) * 2 // 3])
  cfg = _cfg(tok_path, train_files=(good, str(tmp_path / "b.jsonl.zst")),
             seq_len=64)
  it = _input(cfg)
  with pytest.raises(ValueError, match=r"b\.jsonl\.zst: corrupt or "
                     r"truncated .jsonl.zst stream") as e:
    for _ in range(40):
      next(it)
  assert "\n" not in str(e.value)
  # Counted per reading: the shard is bad once per epoch (~4 batches).
  cfg.max_bad_records = 20
  it = _input(cfg)
  for _ in range(12):
    next(it)
  assert it._streams[0].reader.stats.bad_records >= 2
  it.close()


def test_states_are_refused_for_other_data(tmp_path, tok_path):
  _shards(tmp_path, _docs(20), 2)
  cfg = _cfg(tok_path, train_files=(str(tmp_path / "*"),))
  it = _input(cfg)
  next(it)
  state = it.get_state()
  cfg.seq_len = SEQ + 1
  with pytest.raises(ValueError, match=r"seq_len 24 -> 25"):
    _input(cfg).set_state(state)
  cfg.seq_len = SEQ
  with pytest.raises(ValueError, match="seed 0 -> 1"):
    _input(cfg, seed=1).set_state(state)
  with pytest.raises(ValueError, match="not a data.source='files' state"):
    _input(cfg).set_state({"source": "packed"})


def test_packed_text_sources_refuse_another_process_count():
  from fp4jax.data import resume
  with pytest.raises(ValueError, match=r"saved by 2 processes, now 1: "
                     r"data.source='stdlib' cannot split"):
    resume.refuse_resharded({"all_processes": [{}, {}]}, "stdlib", 1)


def test_auto_workers_leave_a_core():
  assert 1 <= files.auto_workers(-1) <= files.MAX_AUTO_WORKERS
  assert files.auto_workers(3) == 3


def test_the_paper_preset_streams_a_dclm_style_glob(tmp_path, tok_path):
  from configs import paper  # pylint: disable=g-import-not-at-top
  _shards(tmp_path, _docs(30), 3)
  (tmp_path / "val").mkdir()
  shard_files.write(tmp_path / "val" / "v.jsonl.zst", _docs(5, 900))
  c = paper.get_config(f"size=1.3b,nodes=1,corpus={tmp_path}/s*.jsonl.zst,"
                       f"val={tmp_path}/val/*.jsonl.zst,tokenizer={tok_path}")
  assert c.data.source == "files"
  d = c.data
  d.vocab_size, d.seq_len, d.global_batch, d.workers = VOCAB, SEQ, ROWS, 0
  b = next(_input(d))
  assert b["inputs"].shape == (ROWS, SEQ)
  v = next(_input(d, split="val"))
  assert v["inputs"].shape == (ROWS, SEQ)


def test_a_state_set_and_saved_again_before_any_batch_is_the_same(
    tmp_path, tok_path):
  # A run stopped right after its restore saves the state it was given;
  # a merged one is saved per process and resumes on yet another count.
  paths = _shards(tmp_path, _docs(30), 3)
  states = []
  for p in range(2):
    it = _input(_cfg(tok_path, train_files=tuple(paths), global_batch=6),
                pidx=p, pcount=2)
    next(it)
    states.append(json.loads(json.dumps(it.get_state())))
    it.close()
  again = _input(_cfg(tok_path, train_files=tuple(paths), global_batch=6),
                 pidx=1, pcount=2)
  again.set_state(states[1])
  assert again.get_state() == states[1]
  want = next(again)
  one = _input(_cfg(tok_path, train_files=tuple(paths)))
  one.set_state(data.process_state(states, 0, 1))
  unread = json.loads(json.dumps(one.get_state()))
  assert unread["sources"][0]["at"]["kind"] == "process"
  first = next(one)
  other = _input(_cfg(tok_path, train_files=tuple(paths)))
  other.set_state(unread)
  np.testing.assert_array_equal(next(other)["inputs"], first["inputs"])
  assert want["inputs"].shape == (3, SEQ)
