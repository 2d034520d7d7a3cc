"""Bad input and faults: one clear line, a distinct exit code, nothing lost.

One test (or parametrized family) per class of failure: a failed start
leaves the workdir as it was and a leftover tokenizer of other data is
refused (1); an unreadable newest checkpoint falls back to an older one,
kept aside (2); metrics after a crash are neither duplicated nor fatal
when torn (3); a second run on a locked workdir exits naming the holder
(4); bad input fails in one line before compiling (5, 6); stop signals
save and exit 130 / 143 (7); --help and a finished rerun exit 0 at once
(8); too many skipped steps exit 4 (9). CLI classes run `fp4jax.main` in a
subprocess (tests/faults.py); workdir classes run `train_and_evaluate`
in-process to share one compiled trainer.
"""

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import pytest

from fp4jax import checkpoint
from fp4jax import metrics
from fp4jax import rundir
from fp4jax import train
from fp4jax.data import tokenizer as tokenizer_lib
import faults
import smoke_run
from smoke_run import base_run  # pylint: disable=unused-import

SMOKE = "--config=configs/demo.py:smoke,recipe=bf16"
EXIT_ERROR, EXIT_BUSY, EXIT_SKIPPED = 1, 75, 4


def _one_line_error(r: subprocess.CompletedProcess, code: int, match: str):
  out = r.stdout + r.stderr
  assert r.returncode == code, out
  assert "Traceback" not in out, out
  assert match in faults.last_line(r.stderr), r.stderr


def _text_corpus(tmp_path) -> pathlib.Path:
  path = tmp_path / "corpus.txt"
  words = "the quick brown fox jumps over a lazy dog while it sleeps".split()
  lines = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12))
           for i in range(400)]
  # 40 documents, ended by the default separator line.
  path.write_text("".join("\n".join(lines[i:i + 10]) + "\n<|endoftext|>\n"
                          for i in range(0, 400, 10)))
  return path


# ------------------------------------------- 1. failed starts leave nothing


@pytest.mark.parametrize("existing", [False, True])
def test_a_start_failing_after_the_data_stage_leaves_the_workdir_as_it_was(
    tmp_path, existing):
  corpus = _text_corpus(tmp_path)
  workdir = tmp_path / "run"
  if existing:    # a workdir the user prepared: its files stay untouched
    workdir.mkdir()
    (workdir / "notes.txt").write_text("mine")
  before = faults.snapshot(workdir) if existing else None
  # No validation split: found only after the tokenizer was trained and
  # the corpus prepared (both written into the workdir).
  r = faults.run_main(
      SMOKE, f"--workdir={workdir}", "--config.data.source=text_files",
      f"--config.data.train_files={corpus}", "--config.data.vocab_size=300",
      "--config.data.val_fraction=0.0")
  _one_line_error(r, EXIT_ERROR, "no val split")
  if existing:
    assert faults.snapshot(workdir) == before
  else:
    assert not workdir.exists()


def test_a_stored_tokenizer_of_other_data_is_refused(tmp_path):
  store = str(tmp_path / "tokenizer.model")
  lines = [f"line {i} of some text, with words" for i in range(300)]
  tokenizer_lib.get_tokenizer(vocab_size=300, model_path="",
                              store_path=store, sample=iter(lines),
                              built_from={"data": "corpus_a"})
  before = faults.snapshot(tmp_path)
  again = tokenizer_lib.get_tokenizer(
      vocab_size=300, model_path="", store_path=store, sample=iter(()),
      built_from={"data": "corpus_a"})
  assert again.vocab_size == 300
  with pytest.raises(ValueError, match="built from data='corpus_a', not the "
                     "configured 'corpus_b'") as e:
    tokenizer_lib.get_tokenizer(vocab_size=300, model_path="",
                                store_path=store, sample=iter(lines),
                                built_from={"data": "corpus_b"})
  assert "\n" not in str(e.value)
  assert faults.snapshot(tmp_path) == before


# ------------------------------------------ 2-3. damaged workdir, in-process





@pytest.mark.parametrize("how", faults.CORRUPTIONS)
def test_an_unreadable_newest_checkpoint_falls_back_and_is_kept(
    base_run, tmp_path, how, caplog):
  workdir = smoke_run.copy(base_run, tmp_path)
  rel = faults.corrupt_checkpoint(workdir, 6, how)
  damaged = faults.snapshot(workdir / "checkpoints" / "6")
  state = train.train_and_evaluate(smoke_run.config(), str(workdir))
  assert int(state.step) == 6
  # Resumed from 3 and saved a new 6; the damaged one is kept, unchanged.
  assert checkpoint.complete_steps(str(workdir)) == [3, 6]
  kept = workdir / checkpoint.BROKEN_DIR / "6"
  assert faults.snapshot(kept) == damaged
  errors = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
  assert any("checkpoint step 6 is unreadable" in m and rel in m
             for m in errors), errors
  assert any("RESUMED FROM AN OLDER CHECKPOINT: step 3" in m for m in errors)
  steps = [json.loads(l)["step"]
           for l in (workdir / metrics.METRICS_FILE).read_text().splitlines()]
  assert steps == sorted(set(steps))   # steps 4-6 once, not twice


def test_no_readable_checkpoint_is_one_line_and_moves_nothing(base_run,
                                                              tmp_path):
  workdir = smoke_run.copy(base_run, tmp_path)
  faults.corrupt_checkpoint(workdir, 6, "delete_metadata")
  faults.corrupt_checkpoint(workdir, 3, "truncate_data")
  before = faults.snapshot(workdir)
  with pytest.raises(ValueError, match=r"no readable checkpoint .*step 6: "
                     r"state/_METADATA is missing; step 3: state/d/") as e:
    train.train_and_evaluate(smoke_run.config(num_steps=9), str(workdir))
  assert "\n" not in str(e.value)
  after = faults.snapshot(workdir)
  assert {k: v for k, v in after.items() if k != rundir.LOCK_FILE} == {
      k: v for k, v in before.items() if k != rundir.LOCK_FILE}


def test_a_fresh_start_moves_a_crashed_attempts_metrics_aside(base_run,
                                                               tmp_path):
  # Crashed before its first checkpoint (step 3): config.json and the
  # metrics of steps 0-2, no state.
  workdir = smoke_run.copy(base_run, tmp_path)
  shutil.rmtree(workdir / "checkpoints")
  path = workdir / metrics.METRICS_FILE
  path.write_text("".join(l + "\n" for l in path.read_text().splitlines()
                          if json.loads(l)["step"] < 3))
  old = path.read_text()
  train.train_and_evaluate(smoke_run.config(), str(workdir))
  steps = [json.loads(l)["step"]
           for l in (workdir / metrics.METRICS_FILE).read_text().splitlines()]
  assert steps == sorted(set(steps)) and steps[-1] == 6
  assert (workdir / metrics.DROPPED_FILE).read_text() == old


def test_a_torn_metrics_line_is_set_aside_and_the_run_resumes(base_run,
                                                              tmp_path):
  workdir = smoke_run.copy(base_run, tmp_path)
  fragment = faults.tear_last_line(workdir / metrics.METRICS_FILE)
  state = train.train_and_evaluate(smoke_run.config(num_steps=9), str(workdir))
  assert int(state.step) == 9
  records = [json.loads(l) for l in
             (workdir / metrics.METRICS_FILE).read_text().splitlines()]
  assert [r["step"] for r in records][-3:] == [7, 8, 9]
  assert fragment in (workdir / metrics.DROPPED_FILE).read_text()


def test_metric_writer_keeps_records_up_to_the_resume_step(tmp_path):
  path = tmp_path / metrics.METRICS_FILE
  lines = [json.dumps({"step": s, "loss": 1.0}) + "\n" for s in range(5)]
  path.write_text("".join(lines) + '{"step": 5, "lo')
  metrics.MetricWriter(str(tmp_path), resume_step=2).close()
  assert path.read_text() == "".join(lines[:3])
  assert (tmp_path / metrics.DROPPED_FILE).read_text() == (
      "".join(lines[3:]) + '{"step": 5, "lo\n')


# ------------------------------------------------------ 4. one run per dir


def test_a_second_run_on_a_locked_workdir_names_the_holder(tmp_path):
  workdir = tmp_path / "run"
  with rundir.Claim(str(workdir)) as claim:
    claim.commit()
    before = faults.snapshot(workdir)
    r = faults.run_main(SMOKE, f"--workdir={workdir}")
    _one_line_error(r, EXIT_BUSY, f"in use by pid {os.getpid()} on host "
                    f"{socket.gethostname()}")
    assert faults.snapshot(workdir) == before


def test_the_lock_of_a_killed_run_is_not_stale(tmp_path):
  workdir = tmp_path / "run"
  holder = subprocess.Popen(
      [sys.executable, "-c",
       "import sys, time; from fp4jax import rundir\n"
       f"c = rundir.Claim({str(workdir)!r}).__enter__()\n"
       "print('locked', flush=True); time.sleep(600)"],
      env=faults._env(), stdout=subprocess.PIPE, text=True)  # pylint: disable=protected-access
  assert holder.stdout.readline().strip() == "locked"
  with pytest.raises(rundir.WorkdirBusy, match=f"pid {holder.pid} on host"):
    rundir.Claim(str(workdir)).__enter__()
  holder.kill()    # kill -9: no cleanup ran; the lock file stays behind
  holder.wait()
  assert (workdir / rundir.LOCK_FILE).exists()
  with rundir.Claim(str(workdir)):
    assert f"pid {os.getpid()} " in rundir.holder(str(workdir))


# ------------------------------------ 5-6. one line, before any compiling


@pytest.mark.parametrize("args,match", [
    ((f"--workdir=W",), "error: --config is required"),
    (("--config=configs/nope.py", "--workdir=W"),
     "error: --config: no such file 'configs/nope.py'"),
    (("--config=BAD", "--workdir=W"), "syntax error at line 1"),
    (("--config=configs/demo.py:recip=bf16", "--workdir=W"),
     "unknown config arg 'recip'"),
    ((SMOKE, "--workdir=FILE"), "is a file, not a directory"),
    ((SMOKE, "--workdir=FILE/sub"), "is a file, not a directory"),
    ((SMOKE, "--workdir=/proc/fp4jax_test/run"), "is not writable"),
    ((SMOKE, "--workdir=W", "--config.data.source=text_files",
      "--config.data.train_files=/nonexistent/*.txt"),
     "error: data.train_files: no file matches '/nonexistent/*.txt'"),
    ((SMOKE, "--workdir=W", "--config.data.source=text_files",
      "--config.data.train_files=CORPUS", "--config.data.val_files=/no.txt"),
     "error: data.val_files: no such file '/no.txt'"),
    ((SMOKE, "--workdir=W", "--config.data.source=text_files",
      "--config.data.train_files=CORPUS",
      "--config.data.tokenizer_model=/no.model"),
     "error: data.tokenizer_model: no such file '/no.model'"),
    ((SMOKE, "--workdir=W", "--config.data.source=files",
      "--config.data.train_files=FILE"),
     "file: unsupported shard extension; supported: .jsonl.zst, "),
    ((SMOKE, "--workdir=W", "--config.data.source=files",
      "--config.data.train_files=SHARD", "--config.data.text_key=body"),
     "shard.jsonl:1: no string field 'body' (text_key)"),
    ((SMOKE, "--workdir=W", "--config.data.source=files",
      "--config.data.train_files=SHARD", "--config.data.mixture=('a:1:SHARD',)"),
     "error: set data.train_files or data.mixture, not both"),
    ((SMOKE, "--workdir=W", '--config.quant.overrides={"dge_k": "abc"}'),
     "Dge.k must be float, got 'abc'"),
    ((SMOKE, "--workdir=W", "--config.quant.overrides=abc"),
     "error: flag --config.quant.overrides=abc"),
    ((SMOKE, "--workdir=W", "--config.gemm.impl=cuda"),
     "error: gemm: unknown impl 'cuda'"),
    ((SMOKE, "--workdir=W", "--config.quant.bf16_tail=1.5"),
     "error: quant.bf16_tail must be a share in [0, 1)"),
    ((SMOKE, "--workdir=W", "--config.quant.recipe=fp8",
      '--config.quant.overrides={"dge_k": 5.0}'),
     "dge differentiates an FP4 weight grid, but fwd.rhs is e4m3"),
    ((SMOKE, "--workdir=W", "--config.gemm.impl=fp8",
      '--config.quant.overrides={"impl": "xla"}'),
     "error: gemm.impl='fp8' and quant.overrides impl='xla' disagree"),
    ((SMOKE, "--workdir=W", "--config.optim.lrr=1"),
     "unknown config key 'optim.lrr'"),
    ((SMOKE, "--workdir=W", "--config.quant.recipe=mxfp4",
      "--config.model.d_ff=48"),
     "(48 % 32 = 16)"),
    ((SMOKE, "--workdir=W", "--config.optim.grad_accum=3"),
     "optim.grad_accum=3 does not divide the "),
    ((SMOKE, "--workdir=W", "--config.profile_steps=5"),
     "profile_steps must be 'START,END'"),
    ((SMOKE, "--workdir=W", "--config.checkpoint_every_minutes=-1"),
     "checkpoint_every_minutes must be a number >= 0"),
    ((SMOKE, "--workdir=W", "--config.mesh.device_memory_gb=0.000001"),
     "exceeds mesh.device_memory_gb=1e-06 x 0.9 (largest: "),
])
def test_bad_input_is_one_line_and_writes_nothing(tmp_path, args, match):
  (tmp_path / "bad.py").write_text("def get_config(:\n")
  (tmp_path / "file").write_text("")
  corpus = _text_corpus(tmp_path)
  shard = tmp_path / "shard.jsonl"
  shard.write_text('{"text": "a document"}\n')
  subs = {"W": str(tmp_path / "w"), "FILE": str(tmp_path / "file"),
          "BAD": str(tmp_path / "bad.py"), "CORPUS": str(corpus)}
  args = [a.replace("=W", "=" + subs["W"]).replace("FILE", subs["FILE"])
          .replace("BAD", subs["BAD"]).replace("CORPUS", subs["CORPUS"])
          .replace("SHARD", str(shard)) for a in args]
  before = faults.snapshot(tmp_path)
  r = faults.run_main(*args)
  _one_line_error(r, EXIT_ERROR, match)
  assert faults.snapshot(tmp_path) == before
  assert not (tmp_path / "w").exists()


def test_an_absolute_config_path_works_from_any_directory(tmp_path):
  # Without the repository on PYTHONPATH, from another directory: the
  # config's `from configs import ...` must still resolve.
  r = faults.run_main(
      f"--config={faults.ROOT}/configs/demo.py:smoke",
      f"--workdir={tmp_path}/w", "--config.model.size=huge", cwd=tmp_path,
      pythonpath=False)
  _one_line_error(r, EXIT_ERROR, "error: unknown model.size 'huge'")


def test_a_corrupt_config_json_is_named_and_kept(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / checkpoint.CONFIG_FILE).write_text('{"model": {"d_mod')
  before = faults.snapshot(workdir)
  r = faults.run_main(SMOKE, f"--workdir={workdir}")
  _one_line_error(r, EXIT_ERROR, f"{workdir}/config.json is corrupt")
  assert faults.snapshot(workdir) == before


# ------------------------------------------- 7-9. signals, help, exit codes


def test_help_exits_0_naming_the_key_reference_and_the_commands():
  r = faults.run_main("--help")
  assert r.returncode == 0, r.stderr
  assert "configs/default.py" in r.stdout
  assert "python -m fp4jax.main --config=configs/demo.py" in r.stdout
  assert "130" in r.stdout and "143" in r.stdout


def test_ctrl_c_saves_exits_130_and_a_finished_rerun_exits_0_at_once(
    tmp_path):
  workdir = tmp_path / "run"
  args = (SMOKE, f"--workdir={workdir}", "--config.num_steps=400",
          "--config.log_every=1", "--config.checkpoint_every=1000",
          "--config.eval_every=0")
  proc = faults.start_main(*args)
  faults.wait_for_step(proc, workdir, 1)
  proc.send_signal(signal.SIGINT)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGINT, out
  assert "Traceback" not in out
  last = faults.last_line(out)
  assert last.startswith("stopped by SIGINT at step"), out
  step = int(last.split("at step ")[1].split()[0])
  assert checkpoint.complete_steps(str(workdir)) == [step]
  # A rerun asking for no more steps than are saved: nothing to do.
  r = faults.run_main(*args[:2], f"--config.num_steps={step}",
                      "--config.log_every=1")
  assert r.returncode == 0 and "already finished" in r.stderr, r.stderr
  assert "initialised" not in r.stderr and "resumed" not in r.stderr


def test_too_many_skipped_steps_exit_4(tmp_path):
  workdir = tmp_path / "run"
  r = faults.run_main(
      SMOKE, f"--workdir={workdir}", "--config.data.source=nan_at",
      "--config.skip_nonfinite=True", "--config.eval_steps=0",
      driver="import faults; faults.main()")
  # Batches 2-5 of 6 are non-finite: 4 skipped, 67% > 10%.
  _one_line_error(r, EXIT_SKIPPED, "4 of 6 steps were skipped")
  assert checkpoint.complete_steps(str(workdir))[-1] == 6
