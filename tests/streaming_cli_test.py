"""The `files` source through the training CLI: saved stream positions and
resuming on another number of processes.

Oracle: the same iterator built in the test process (fp4jax.data with the
run's resolved config.json) and advanced by as many batches; its state must
equal the one the run saved, so the run read what the unit tests of
tests/streaming_test.py check, and resumed where they say.
"""

import json
import subprocess
import sys

import ml_collections
import pytest

from fp4jax import data
import faults
import shard_files

LAUNCH = str(faults.ROOT / "experiments" / "launch_local.sh")


def _corpus(tmp_path) -> str:
  docs = [f"document {i}: " + " ".join(["the quick brown fox"] * (1 + i % 9))
          + ("\nand a second line" if i % 3 == 0 else "")
          for i in range(120)]
  for k in range(3):
    shard_files.write(tmp_path / f"web-{k}.jsonl.zst", docs[k::3])
  return str(tmp_path / "web-*.jsonl.zst")


def _args(workdir, corpus, steps, *extra):
  data = (f"--config.data.mixture={corpus}" if corpus.startswith("(")
          else f"--config.data.train_files={corpus}")
  return ("--config=configs/demo.py:smoke", f"--workdir={workdir}",
          "--config.data.source=files", data, "--config.data.vocab_size=300",
          "--config.data.tokenizer_train_chars=20000",
          "--config.model.n_layers=1", "--config.data.global_batch=4",
          "--config.data.seq_len=32", f"--config.num_steps={steps}",
          "--config.checkpoint_every=2", *extra)


def _data_config(workdir) -> ml_collections.ConfigDict:
  config = json.loads((workdir / "config.json").read_text())["config"]
  d = ml_collections.ConfigDict(config["data"])
  d.train_files = tuple(d.train_files)
  d.mixture = tuple(d.mixture)
  d.tokenizer_model = str(workdir / "tokenizer.model")
  d.workers = 0
  return d, config


def _seed(config) -> int:
  s = config["data"]["shuffle_seed"]
  return config["seed"] if s == -1 else s


def _states(workdir, step) -> list[dict]:
  path = workdir / "checkpoints" / str(step) / "data" / "metadata"
  return json.loads(path.read_text())["processes"]


def _advance(d, seed, pidx, pcount, batches, start=None):
  it = data.make_input(d, split="train", seed=seed, process_index=pidx,
                       process_count=pcount)
  if start is not None:
    it.set_state(data.process_state(start, pidx, pcount))
  for _ in range(batches):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  it.close()
  return state


def test_a_mixture_run_saves_the_position_the_stream_reached(tmp_path):
  web = _corpus(tmp_path)
  code = [f"def f{i}(x):\n  return x * {i}\n" for i in range(40)]
  shard_files.write(tmp_path / "code.parquet", code)
  mixture = f"('web:0.75:{web}','code:0.25:{tmp_path}/code.parquet')"
  workdir = tmp_path / "run"
  r = faults.run_main(*_args(workdir, mixture, 4, "--config.data.workers=1",
                             "--config.eval_every=2", "--config.eval_steps=1",
                             "--config.data.val_fraction=0.2",
                             "--config.log_every=2"))
  assert r.returncode == 0, r.stderr[-3000:]
  d, config = _data_config(workdir)
  for step in (2, 4):
    saved = _states(workdir, step)
    assert len(saved) == 1 and saved[0]["source"] == "files"
    assert saved[0] == _advance(d, _seed(config), 0, 1, step)
  records = [json.loads(l) for l in
             (workdir / "metrics.jsonl").read_text().splitlines()]
  last = [r for r in records if "data_share/web" in r][-1]
  assert last["data_share/web"] + last["data_share/code"] == pytest.approx(1)
  assert last["data_share/web"] == pytest.approx(0.75, abs=0.1)


def _launch(n, args):
  env = faults._env()   # pylint: disable=protected-access
  env["PYTHON"] = sys.executable
  r = subprocess.run([LAUNCH, str(n), *args], cwd=faults.ROOT, env=env,
                     capture_output=True, text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  return r


@pytest.mark.slow
@pytest.mark.parametrize("before,after", [(2, 1), (1, 2)])
def test_a_files_run_resumes_on_another_process_count(tmp_path, before,
                                                      after):
  corpus = _corpus(tmp_path)
  workdir = tmp_path / "run"
  common = ("--config.eval_steps=0", "--config.data.workers=0")
  _launch(before, _args(workdir, corpus, 2, *common))
  r = _launch(after, _args(workdir, corpus, 4, *common))
  assert f"on {after} processes from the positions of {before}" in r.stderr
  d, config = _data_config(workdir)
  first, second = _states(workdir, 2), _states(workdir, 4)
  assert len(first) == before and len(second) == after
  for p in range(after):
    assert second[p] == _advance(d, _seed(config), p, after, 2, start=first)
