"""Tests of `python -m fp4jax.data.prepare` and training from its output.

Small generated shards (tests/shard_files.py) and a lossless BPE model
trained on their documents. Oracles: the documents the tests wrote,
tokenized by `Tokenizer.encode_documents` and decoded back; a single
in-process preparation (bytes) for the concurrent and resumed ones; the
batches of the raw shards for training from a prepared directory. The
CLI runs in subprocesses (tests/faults.py's environment). No JAX, no
network.
"""

import collections
import json
import os
import pathlib
import re
import subprocess
import sys
import time

import ml_collections
import numpy as np
import pytest
from array_record.python import array_record_module

from configs import default
from fp4jax import data
from fp4jax.data import prepare
from fp4jax.data import tokenizer as tokenizer_lib

import faults
import shard_files

_docs = shard_files.marked_docs

VOCAB = 320
SEQ, ROWS = 24, 3
# Runs the command as `python -m` does; at exit it names the heavy
# modules it imported. With a GO file named in the environment it first
# says it is ready and waits for GO, so that several start at once.
DRIVER = r"""
import atexit, os, runpy, sys, time
atexit.register(lambda: print("heavy modules:", sorted(
    m for m in ("jax", "flax", "tensorflow") if m in sys.modules),
    file=sys.stderr))
go = os.environ.get("PREPARE_TEST_GO")
if go:
  open(f"{go}.ready.{os.getpid()}", "w").close()
  while not os.path.exists(go):
    time.sleep(0.01)
runpy.run_module("fp4jax.data.prepare", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
  return shard_files.train_tokenizer(
      tmp_path_factory.mktemp("tok") / "prep.model", _docs(400), VOCAB)


@pytest.fixture(scope="module")
def other_tok_path(tmp_path_factory):
  lines = [l for d in shard_files.docs(300) for l in d.split("\n")]
  path = tmp_path_factory.mktemp("tok") / "other.model"
  path.write_bytes(tokenizer_lib.train_bpe(lines, VOCAB))
  return str(path)


@pytest.fixture(scope="module")
def tok(tok_path):
  return tokenizer_lib.Tokenizer.load(tok_path)


def _shards(folder, docs, exts) -> tuple[list[str], list[list[str]]]:
  """Shard k (of len(exts)) holds docs[k::n] in format exts[k]."""
  folder.mkdir(exist_ok=True)
  n = len(exts)
  parts = [docs[k::n] for k in range(n)]
  paths = [shard_files.write(folder / f"s{k:02d}{ext}", parts[k])
           for k, ext in enumerate(exts)]
  return paths, parts


def _cfg(**overrides) -> ml_collections.ConfigDict:
  c = default.get_config().data
  c.source = "files"
  c.vocab_size = VOCAB
  c.seq_len = SEQ
  c.global_batch = ROWS
  c.workers = 0
  c.val_fraction = 0.0
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _cli(*args, env_extra=None, popen=False):
  """The command in a subprocess (through DRIVER), from the repo root."""
  cmd = [sys.executable, "-c", DRIVER, "--config=configs/demo.py",
         "--workers=0", f"--config.data.vocab_size={VOCAB}", *args]
  # pylint: disable-next=protected-access
  env = dict(faults._env(), **(env_extra or {}))
  if popen:
    return subprocess.Popen(cmd, cwd=faults.ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  r = subprocess.run(cmd, cwd=faults.ROOT, env=env, text=True,
                     capture_output=True, timeout=120, check=False)
  r.stderr = _light(r.stderr)
  return r


def _light(stderr: str) -> str:
  """stderr without DRIVER's last line, which must name no heavy module."""
  head, _, last = stderr.rstrip("\n").rpartition("\n")
  assert last == "heavy modules: []", stderr[-2000:]
  return head


def _records(path) -> list[np.ndarray]:
  reader = array_record_module.ArrayRecordReader(str(path))
  raw = reader.read(list(range(reader.num_records())))
  reader.close()
  return [np.frombuffer(r, "<i4") for r in raw]


def _tree(folder) -> dict[str, tuple[int, bytes]]:
  """{relative path: (mtime_ns, bytes)} of every file under folder."""
  return {str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
          for p in sorted(pathlib.Path(folder).rglob("*")) if p.is_file()}


def _leftovers(folder) -> list[str]:
  """Temporary files and claims under a prepared directory."""
  folder = pathlib.Path(folder)
  return sorted([str(p) for p in folder.rglob("*.tmp.*")] +
                [str(p) for p in (folder / "claims").iterdir()])


def _dead_pid() -> int:
  proc = subprocess.Popen([sys.executable, "-c", "pass"])
  proc.wait()
  return proc.pid


def test_records_are_the_tokenizers_documents_in_file_order(
    tmp_path, tok_path, tok):
  paths, parts = _shards(tmp_path / "in", _docs(90),
                         (".jsonl.zst", ".parquet", ".txt", ".jsonl.gz"))
  out = tmp_path / "out"
  cfg = _cfg(tokenizer_model=tok_path,
             train_files=(str(tmp_path / "in" / "*"),))
  [manifest] = prepare.prepare(cfg, str(out), workers=0)
  assert manifest["tokenizer"] == {"file": "tokenizer.model",
                                   "fingerprint": tok.fingerprint,
                                   "vocab_size": VOCAB}
  assert (manifest["text_key"], manifest["separator"]) == (
      "text", "<|endoftext|>")
  assert manifest["inputs"] == paths
  total = 0
  for k, (shard, docs) in enumerate(zip(manifest["shards"], parts)):
    ids, lengths = tok.encode_documents(docs)
    want = np.split(ids, np.cumsum(lengths)[:-1])
    got = _records(out / shard["file"])
    assert len(got) == len(want) == len(docs)
    for g, w, doc in zip(got, want, docs):
      np.testing.assert_array_equal(g, w)
      assert g[0] == tok.bos_id and g[-1] == tok.eos_id
      assert tok.decode(g) == doc       # lossless: the document itself
    assert shard["file"] == (f"shards/{k:06d}-"
                             f"{os.path.basename(paths[k])}.array_record")
    assert shard["input"] == paths[k]
    assert (shard["documents"], shard["tokens"]) == (len(docs), ids.size)
    assert shard["bytes"] == (out / shard["file"]).stat().st_size
    total += ids.size
  assert (manifest["documents"], manifest["tokens"]) == (90, total)
  assert json.loads((out / "prepared.json").read_text()) == manifest
  assert (out / "tokenizer.model").read_bytes() == open(tok_path,
                                                         "rb").read()
  assert _leftovers(out) == []
  # Worker processes tokenize the same bytes.
  prepare.prepare(cfg, str(tmp_path / "out1"), workers=1)
  assert ({k: v[1] for k, v in _tree(tmp_path / "out1").items()
           if k != "plan.json"} ==
          {k: v[1] for k, v in _tree(out).items() if k != "plan.json"})


def test_four_processes_at_once_write_one_copy(tmp_path, tok_path):
  paths, _ = _shards(tmp_path / "in", _docs(1200), (".jsonl",) * 8)
  one = tmp_path / "one"
  prepare.prepare(_cfg(tokenizer_model=tok_path, train_files=tuple(paths)),
                  str(one), workers=0)
  four = tmp_path / "four"
  go = str(tmp_path / "go")
  procs = [_cli(f"--out={four}", f"--tokenizer={tok_path}",
                f"--config.data.train_files={tmp_path / 'in'}/*.jsonl",
                env_extra={"PREPARE_TEST_GO": go}, popen=True)
           for _ in range(4)]
  deadline = time.time() + 60
  while len(list(tmp_path.glob("go.ready.*"))) < 4:
    assert time.time() < deadline and all(p.poll() is None for p in procs)
    time.sleep(0.02)
  pathlib.Path(go).touch()
  written = collections.Counter()
  for p in procs:
    stdout, stderr = p.communicate(timeout=120)
    assert p.returncode == 0, stderr[-2000:]
    assert stdout.startswith(f"prepared {four}: 8 shard(s), 1200 documents")
    stderr = _light(stderr)
    written.update(re.findall(r"prepare: shard (\d+)/8 ", stderr))
  assert written == collections.Counter(str(k) for k in range(1, 9))
  got, want = _tree(four), _tree(one)
  assert sorted(got) == sorted(want)
  for name in want:
    if name != "plan.json":     # it records the command that made it
      assert got[name][1] == want[name][1], name
  assert _leftovers(four) == []


def test_a_rerun_is_a_noop_and_finishes_a_killed_run(tmp_path, tok_path):
  paths, _ = _shards(tmp_path / "in", _docs(60), (".jsonl.zst",) * 4)
  out = tmp_path / "out"
  cfg = _cfg(tokenizer_model=tok_path, train_files=tuple(paths))
  prepare.prepare(cfg, str(out), workers=0)
  before = _tree(out)
  r = _cli(f"--out={out}", f"--tokenizer={tok_path}",
           f"--config.data.train_files={tmp_path / 'in'}/*")
  assert r.returncode == 0, r.stderr[-2000:]
  assert "is already prepared" in r.stderr
  assert _tree(out) == before                      # not even touched
  # A run killed inside shard 1: its claim (a dead pid of this host) and a
  # partial output stay; shard 3 is held by a process of another host.
  file1, file3 = (json.loads((out / "done" / f"00000{k}.json").read_text()
                             )["file"] for k in (1, 3))
  for name in ("prepared.json", "done/000001.json", file1,
               "done/000003.json"):
    (out / name).unlink()
  host, dead = prepare._host(), _dead_pid()  # pylint: disable=protected-access
  (out / "claims" / "000001").write_text(json.dumps(
      {"host": host, "pid": dead, "nonce": "n1", "time": 0}))
  (out / f"{file1}.tmp.{host}.{dead}").write_bytes(b"partial")
  (out / f"prepared.json.tmp.{host}.{dead}").write_bytes(b"{")
  (out / "claims" / "000003").write_text(json.dumps(
      {"host": "elsewhere", "pid": 1, "nonce": "n3", "time": 0}))
  with pytest.raises(prepare.Waited, match=r"1 shard\(s\) of .* still "
                     r"claimed by others: shard 3 \(elsewhere pid 1\)"):
    prepare.prepare(cfg, str(out), workers=0, wait_s=0.2)
  assert (out / file1).exists() and not (out / "prepared.json").exists()
  prepare.prepare(cfg, str(out), workers=0, steal_claims=True)
  after = _tree(out)
  assert sorted(after) == sorted(before)
  for name, (mtime, content) in before.items():
    assert after[name][1] == content, name
    if name.startswith("shards/") and name not in (file1, file3):
      assert after[name][0] == mtime, name       # done shards not redone
  assert _leftovers(out) == []


def _batches(cfg, p: int, pcount: int, steps: int = 16):
  """(the iterator, its first `steps` batches: several epochs) of process
  p of pcount."""
  cfg = ml_collections.ConfigDict(cfg)
  cfg.global_batch = ROWS * pcount
  it = data.make_input(cfg, split="train", seed=5, process_index=p,
                       process_count=pcount)
  return it, [next(it) for _ in range(steps)]


def test_training_from_a_prepared_directory_gives_the_raw_batches(
    tmp_path, tok_path):
  paths, _ = _shards(tmp_path / "in", _docs(80),
                     (".jsonl.zst", ".txt", ".parquet", ".jsonl"))
  out = tmp_path / "out"
  prepare.prepare(_cfg(tokenizer_model=tok_path, train_files=tuple(paths)),
                  str(out), workers=0)
  raw = _cfg(tokenizer_model=tok_path, train_files=tuple(paths),
             segment_ids=True)
  cases = [_cfg(train_files=(str(out),), segment_ids=True),
           _cfg(train_files=(str(out),), segment_ids=True,
                tokenizer_model=tok_path)]
  for pcount in (1, 2):
    for p in range(pcount):
      _, want = _batches(raw, p, pcount)
      for cfg in cases:
        it, got = _batches(cfg, p, pcount)
        assert it.sources[0].tokens and it._pool.workers == 0
        assert it._streams[0].reader.cursor()[0] >= 1   # a second epoch
        for w, g in zip(want, got):
          for key in w:
            np.testing.assert_array_equal(g[key], w[key], err_msg=key)
  # Resumes exactly; a prepared source mixes with a raw one (tokenized
  # with the prepared directory's tokenizer).
  it = data.make_input(cases[0], split="train", seed=5)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  want = [next(it) for _ in range(3)]
  again = data.make_input(cases[0], split="train", seed=5)
  again.set_state(state)
  for w in want:
    np.testing.assert_array_equal(next(again)["inputs"], w["inputs"])
  extra, _ = _shards(tmp_path / "x", _docs(30, 500), (".jsonl",) * 2)
  mix_raw = _cfg(tokenizer_model=tok_path, mixture=(
      f"a:3:{','.join(paths)}", ("b", 1.0, tuple(extra))))
  mix_prep = _cfg(mixture=(f"a:3:{out}", ("b", 1.0, tuple(extra))))
  a = data.make_input(mix_raw, split="train", seed=1)
  b = data.make_input(mix_prep, split="train", seed=1)
  assert [s.tokens for s in b.sources] == [True, False]
  for _ in range(12):
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])
  # A saved Hugging Face dataset is a folder of raw shards, not prepared.
  hf = shard_files.write_hf_dataset(tmp_path / "hf", _docs(40, 700), 3)
  prepare.prepare(_cfg(tokenizer_model=tok_path, train_files=(hf,)),
                  str(tmp_path / "out_hf"), workers=0)
  a = data.make_input(_cfg(tokenizer_model=tok_path, train_files=(hf,)),
                      split="train", seed=2)
  b = data.make_input(_cfg(train_files=(str(tmp_path / "out_hf"),)),
                      split="train", seed=2)
  assert [s.tokens for s in a.sources + b.sources] == [False, True]
  for _ in range(8):
    np.testing.assert_array_equal(next(a)["inputs"], next(b)["inputs"])
  # data.val_files may name a prepared directory too.
  val = data.make_input(_cfg(train_files=tuple(extra), val_files=(
      str(out),)), split="val", seed=0)
  assert val.sources[0].tokens and next(val)["inputs"].shape == (ROWS, SEQ)


def test_cli_refuses_in_one_line_before_writing(tmp_path, tok_path,
                                               other_tok_path):
  paths, _ = _shards(tmp_path / "in", _docs(20), (".jsonl",) * 2)
  files_flag = f"--config.data.train_files={tmp_path / 'in'}/*"
  r = _cli(f"--out={tmp_path / 'none'}", files_flag)
  assert r.returncode == 1
  assert faults.last_line(r.stderr).startswith(
      "error: prepare needs data.tokenizer_model")
  assert not (tmp_path / "none").exists()
  out = tmp_path / "out"
  prepare.prepare(_cfg(tokenizer_model=tok_path, train_files=tuple(paths)),
                  str(out), workers=0)
  before = _tree(out)
  r = _cli(f"--out={out}", files_flag, f"--tokenizer={other_tok_path}")
  assert r.returncode == 1
  assert faults.last_line(r.stderr) == (
      f"error: --out {out} was prepared from other data/tokenizer; use a "
      f"new directory")
  with pytest.raises(ValueError, match="prepared from other data"):
    prepare.prepare(_cfg(tokenizer_model=tok_path,
                         train_files=tuple(paths[:1])), str(out), workers=0)
  r = _cli(files_flag, f"--tokenizer={tok_path}")
  assert r.returncode == 1
  assert faults.last_line(r.stderr).startswith("error: --out is required")
  assert _tree(out) == before


def test_a_corrupt_shard_is_named_and_leaves_no_output(tmp_path, tok_path):
  docs = _docs(60)
  paths, _ = _shards(tmp_path / "in", docs, (".jsonl.zst",) * 3)
  raw = pathlib.Path(paths[1]).read_bytes()
  pathlib.Path(paths[1]).write_bytes(raw[:len(raw) * 2 // 3])
  out = tmp_path / "out"
  args = (f"--out={out}", f"--tokenizer={tok_path}",
          f"--config.data.train_files={tmp_path / 'in'}/*")
  r = _cli(*args)
  assert r.returncode == 1
  line = faults.last_line(r.stderr)
  assert line.startswith(f"error: {paths[1]}: corrupt or truncated "
                         f".jsonl.zst stream"), line
  assert not list((out / "shards").glob("000001-*"))
  assert not (out / "prepared.json").exists()
  assert _leftovers(out) == []
  # Skipping bad records is allowed on the same directory.
  r = _cli(*args, "--config.data.max_bad_records=5")
  assert r.returncode == 0, r.stderr[-2000:]
  manifest = prepare.read_manifest(str(out))
  assert manifest["shards"][1]["bad_records"] == 1
  assert manifest["shards"][0]["documents"] == 20


@pytest.mark.parametrize("change,match", [
    ("unfinished", r"is not a finished prepared directory \(no "
     r"prepared.json\): run python -m fp4jax.data.prepare "
     r"--config=configs/demo.py"),
    ("other_tokenizer", r"data.tokenizer_model='.*other.model' \("
     r"fingerprint \w+\) is not the tokenizer .* was prepared with"),
    ("vocab", r"data.vocab_size=321 but .* was prepared with a 320-piece "
     r"tokenizer; set data.vocab_size=320"),
    ("mixed", "data.train_files mixes prepared directories and shard "
     "files"),
    ("shard_lost", r"shard shards/000000-s00.jsonl.array_record of its "
     r"prepared.json is missing"),
    ("empty_dir", r"empty is not a finished prepared directory \(no "
     r"prepared.json\): run python -m fp4jax.data.prepare --config=\.\.\. "
     r"--out=.*empty to make it"),
])
def test_training_refuses_a_bad_prepared_directory_in_one_line(
    tmp_path, tok_path, other_tok_path, change, match):
  paths, _ = _shards(tmp_path / "in", _docs(20), (".jsonl",) * 2)
  out = tmp_path / "out"
  prepare.prepare(_cfg(tokenizer_model=tok_path, train_files=tuple(paths)),
                  str(out), workers=0, command="python -m "
                  "fp4jax.data.prepare --config=configs/demo.py --out=X")
  cfg = _cfg(train_files=(str(out),))
  if change == "unfinished":
    (out / "prepared.json").unlink()
  elif change == "other_tokenizer":
    cfg.tokenizer_model = other_tok_path
  elif change == "vocab":
    cfg.vocab_size = VOCAB + 1
  elif change == "mixed":
    cfg.train_files = (str(out), paths[0])
  elif change == "empty_dir":
    (tmp_path / "empty").mkdir()
    cfg.train_files = (str(tmp_path / "empty"),)
  else:
    next((out / "shards").glob("000000-*")).unlink()
  with pytest.raises((ValueError, FileNotFoundError), match=match) as e:
    data.make_input(cfg, split="train", seed=0)
  assert "\n" not in str(e.value)
