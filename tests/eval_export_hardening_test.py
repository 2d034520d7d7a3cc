"""Export, evaluate and the checkpoints they read, as a hostile user meets them.

One test (or parametrized family) per class of defect, each through the CLI
in a subprocess (tests/faults.py), on copies of one tiny trained text run:

  1. export writes only into a scratch folder of its own and refuses an
     --out it could damage: nothing it did not create is removed or
     overwritten;
  2. a step folder counts only when it is a complete checkpoint (orbax's
     commit marker, its files present), for "already finished" and resume
     as for evaluate and export;
  3. an evaluation result records exactly what it scored, results of other
     inputs stay, and an empty input is an error (never a perfect score or
     a NaN in the JSON);
  4. evaluate on a read-only workdir prints its scores and names the file
     it could not write;
  5. a checkpoint that is unreadable, or deleted while it is read, gives
     one true line and no library noise (falling back without --step);
  6. argument and input errors are one `error:` line naming the input,
     exit 1, no traceback;
  7. a disk that fills up during an export is one line naming the path and
     the space needed, and leaves nothing behind.
"""

import hashlib
import json
import os
import pathlib
import shutil
import subprocess

import pytest

from fp4jax import checkpoint
import faults

EXIT_ERROR = 1
SMOKE = "--config=configs/demo.py:smoke,recipe=bf16"
TASK_DIR = faults.ROOT / "tests" / "testdata" / "eval"
NOISE = ("Traceback", "Event loop is closed")

# Runs a CLI module with every write under one folder failing as on a
# read-only mount (EROFS): root, as tests may run, ignores permission bits.
# argv: ROOT MODULE ARGS...
_READ_ONLY = r"""
import builtins, errno, os, runpy, sys
root = os.path.realpath(sys.argv[1])
module = sys.argv[2]

def guard(path):
  if isinstance(path, int):
    return
  p = os.path.realpath(os.fsdecode(path))
  if p == root or p.startswith(root + os.sep):
    raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fsdecode(path))

WRITE = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND

def wrap(fn, *positions, when=lambda *a, **k: True):
  def inner(*a, **k):
    if when(*a, **k):
      for i in positions:
        if i < len(a):
          guard(a[i])
    return fn(*a, **k)
  return inner

os.open = wrap(os.open, 0, when=lambda p, flags, *a, **k: flags & WRITE)
builtins.open = wrap(builtins.open, 0, when=lambda f, mode="r", *a, **k:
                     any(c in mode for c in "wax+"))
for name in ("mkdir", "rmdir", "remove", "unlink", "chmod"):
  setattr(os, name, wrap(getattr(os, name), 0))
for name in ("rename", "replace", "link", "symlink"):
  setattr(os, name, wrap(getattr(os, name), 0, 1))
sys.argv = [module, *sys.argv[3:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""

# Runs a CLI module whose checkpoint reads find the step folder deleted
# just as the read starts, as a live run's keep-N rotation does.
_VANISHING = r"""
import os, runpy, shutil, sys
import orbax.checkpoint as ocp
module = sys.argv[1]
real = ocp.StandardCheckpointer.restore
done = []

def restore(self, directory, *a, **k):
  step_dir = os.path.dirname(os.fspath(directory))
  if not done:
    done.append(step_dir)
    shutil.rmtree(step_dir)
  return real(self, directory, *a, **k)

ocp.StandardCheckpointer.restore = restore
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


def _cli(module: str, *args, cwd=faults.ROOT, driver: str | None = None
         ) -> subprocess.CompletedProcess:
  if driver is None:
    return faults.run_main(*args, cwd=cwd, module=f"fp4jax.{module}")
  return faults.run_main(f"fp4jax.{module}", *args, cwd=cwd, driver=driver)


def _export(*args, **kw):
  return _cli("export", *args, **kw)


def _evaluate(*args, **kw):
  return _cli("evaluate", *args, **kw)


def _one_error_line(r: subprocess.CompletedProcess, match: str) -> str:
  """Asserts exit 1 and a stderr of exactly one `error:` line holding
  `match`; returns it."""
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert r.returncode == EXIT_ERROR, r.stderr[-3000:]
  assert not any(n in r.stdout + r.stderr for n in NOISE), r.stderr[-3000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
  assert match in lines[0], lines[0]
  return lines[0]


def _clean(r: subprocess.CompletedProcess) -> None:
  assert r.returncode == 0, r.stderr[-3000:]
  assert not any(n in r.stdout + r.stderr for n in NOISE), r.stderr[-3000:]


def _warnings(r: subprocess.CompletedProcess) -> list[str]:
  return [l for l in r.stderr.splitlines() if l.startswith("warning: ")]


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> pathlib.Path:
  """A 6-step bf16 text run with its tokenizer; checkpoints at 3 and 6."""
  workdir = faults.text_run(tmp_path_factory.mktemp("hardening"), "bf16")
  assert checkpoint.complete_steps(str(workdir)) == [3, 6]
  return workdir


def _copy(run, tmp_path, name="run") -> pathlib.Path:
  workdir = tmp_path / name
  shutil.copytree(run, workdir)
  return workdir


def _exported_step(out: pathlib.Path) -> int:
  return json.loads((out / "fp4jax.json").read_text())["step"]


# ------------------------------- 1. export removes nothing it did not make


def test_export_leaves_alone_what_it_did_not_create(run, tmp_path):
  # The old scratch name was --out + ".tmp": here the run's own workdir.
  workdir = _copy(run, tmp_path, "exp.tmp")
  mine = tmp_path / "exp.tmp.old"
  mine.mkdir()
  (mine / "notes.txt").write_text("mine")
  before = {p: faults.snapshot(p) for p in (workdir, mine)}
  out = tmp_path / "exp"
  _clean(_export(f"--workdir={workdir}", f"--out={out}"))
  assert _exported_step(out) == 6
  assert {p: faults.snapshot(p) for p in (workdir, mine)} == before
  # Its own scratch folder is gone too: only --out besides what was there.
  assert sorted(p.name for p in tmp_path.iterdir()) == [
      "exp", "exp.tmp", "exp.tmp.old"]


@pytest.mark.parametrize("out,match", [
    ("", "--out is empty"),
    ("CWD", "is or contains --workdir"),
    ("RUN", "is or contains --workdir"),
    ("RUN/checkpoints/9", "is (in) the run's checkpoints folder"),
    ("MINE", "is not an empty folder or an earlier export (it holds "
     "notes.txt)"),
    ("LINK", "is a symbolic link"),
    ("OTHER", "holds the export of another run"),
])
def test_export_refuses_an_out_it_could_damage_and_changes_nothing(
    run, tmp_path, out, match):
  workdir = _copy(run, tmp_path)
  (tmp_path / ".tmp").mkdir()     # where an empty --out once scratched
  (tmp_path / ".tmp" / "keep.txt").write_text("mine")
  (tmp_path / "mine").mkdir()
  (tmp_path / "mine" / "notes.txt").write_text("mine")
  (tmp_path / "empty").mkdir()
  (tmp_path / "link").symlink_to(tmp_path / "empty")
  (tmp_path / "other").mkdir()
  (tmp_path / "other" / "fp4jax.json").write_text(
      json.dumps({"workdir": "/elsewhere/run", "step": 6}))
  subs = {"CWD": str(tmp_path), "RUN": str(workdir),
          "MINE": str(tmp_path / "mine"), "LINK": str(tmp_path / "link"),
          "OTHER": str(tmp_path / "other")}
  for k, v in subs.items():
    out = out.replace(k, v)
  before = faults.snapshot(tmp_path)
  names = sorted(p.name for p in tmp_path.iterdir())
  r = _export(f"--workdir={workdir}", f"--out={out}", cwd=tmp_path)
  _one_error_line(r, match)
  assert faults.snapshot(tmp_path) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == names


# --------------------------------- 2. only a complete checkpoint counts


def _empty(step_dir: pathlib.Path) -> None:
  step_dir.mkdir()


def _uncommitted(step_dir: pathlib.Path) -> None:
  """A copy of step 6 that orbax never committed."""
  shutil.copytree(step_dir.parent / "6", step_dir)
  (step_dir / "commit_success.txt").unlink()   # orbax's commit marker
  meta = step_dir / "_CHECKPOINT_METADATA"
  info = json.loads(meta.read_text())
  info["commit_timestamp_nsecs"] = None
  meta.write_text(json.dumps(info))


def _missing_file(step_dir: pathlib.Path) -> None:
  shutil.copytree(step_dir.parent / "6", step_dir)
  (step_dir / "state" / "_METADATA").unlink()


KINDS = {"empty": _empty, "uncommitted": _uncommitted,
         "missing_file": _missing_file}


@pytest.mark.parametrize("kind", KINDS)
def test_a_step_folder_counts_by_its_content_not_its_name(run, tmp_path,
                                                          kind):
  # The listing every reader shares (no jax: cheap to run per kind).
  workdir = _copy(run, tmp_path)
  KINDS[kind](workdir / "checkpoints" / "9")
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6", "9"]
  assert checkpoint.complete_steps(str(workdir)) == [3, 6]


def test_export_skips_newest_step_folders_that_are_not_checkpoints(
    run, tmp_path):
  workdir = _copy(run, tmp_path)
  for step, make in zip((9, 8, 7), KINDS.values()):
    make(workdir / "checkpoints" / str(step))
  before = faults.snapshot(workdir)
  # --out holds an earlier export of this run (step 3): replaced whole.
  out = tmp_path / "exported"
  out.mkdir()
  (out / "config.json").write_text("{}")
  (out / "fp4jax.json").write_text(json.dumps({"workdir": str(workdir),
                                               "step": 3}))
  _clean(_export(f"--workdir={workdir}", f"--out={out}"))
  assert _exported_step(out) == 6
  assert (out / "model.safetensors").exists()
  assert faults.snapshot(workdir) == before
  assert sorted(p.name for p in tmp_path.iterdir()) == ["exported", "run"]


def test_an_incomplete_newest_step_folder_is_no_finished_run(run, tmp_path):
  # Stopped at 6 of 9, with an empty folder "9" beside it (and step 6
  # damaged): not finished; resumes from 3, keeping both aside.
  workdir = _copy(run, tmp_path)
  (workdir / "checkpoints" / "9").mkdir()
  faults.corrupt_checkpoint(workdir, 6, "truncate_data")
  corpus = run.parent / "corpus.txt"
  r = faults.run_main(
      SMOKE, f"--workdir={workdir}", "--config.data.source=text_files",
      f"--config.data.train_files={corpus}", "--config.data.vocab_size=300",
      "--config.data.val_fraction=0.1", "--config.model.compute_dtype=float32",
      "--config.num_steps=9")
  _clean(r)
  assert "already finished" not in r.stderr
  assert "RESUMED FROM AN OLDER CHECKPOINT: step 3" in r.stderr
  assert checkpoint.complete_steps(str(workdir))[-1] == 9
  assert sorted(os.listdir(workdir / checkpoint.BROKEN_DIR)) == ["6", "9"]


# ------------------------------------------- 3. evaluation results records


def _sha256(path) -> str:
  return hashlib.sha256(pathlib.Path(path).read_bytes()).hexdigest()


def test_results_record_their_inputs_and_other_inputs_stay(run, tmp_path):
  workdir = _copy(run, tmp_path)
  a, b = tmp_path / "a.txt", tmp_path / "b.txt"
  a.write_text("the cat sat on a mat\n")
  b.write_text("birds sang in the tall green trees\n")
  piqa = [TASK_DIR / f for f in ("piqa_valid.jsonl", "piqa_valid-labels.lst")]
  # Results of an earlier evaluation: ppl of other text (stays) and piqa
  # of the same files, limit, precision and recipe (redone: replaced).
  earlier = [
      {"task": "ppl", "precision": "train", "recipe": "bf16", "limit": None,
       "inputs": [{"file": str(b), "sha256": _sha256(b)}], "metrics": {}},
      {"task": "piqa", "precision": "train", "recipe": "bf16", "limit": 1,
       "inputs": [{"file": str(f), "sha256": _sha256(f)} for f in piqa],
       "metrics": {}}]
  (workdir / "eval").mkdir()
  (workdir / "eval" / "step_6.json").write_text(
      json.dumps({"step": 6, "results": earlier}))
  _clean(_evaluate(f"--workdir={workdir}", "--tasks=ppl,piqa",
                   f"--files={a}", f"--data_dir={TASK_DIR}", "--limit=1"))
  raw = (workdir / "eval" / "step_6.json").read_text()
  assert "NaN" not in raw and "Infinity" not in raw
  saved = json.loads(raw)
  got = sorted((r["task"], r["inputs"][0]["file"], bool(r["metrics"]))
               for r in saved["results"])
  assert got == [("piqa", str(piqa[0]), True), ("ppl", str(a), True),
                 ("ppl", str(b), False)]
  for r in saved["results"]:
    if r["metrics"]:
      assert r["step"] == 6 and r["precision"] == "train"
      assert [i["sha256"] for i in r["inputs"]] == [
          _sha256(i["file"]) for i in r["inputs"]]
    if r["task"] == "piqa":
      assert r["limit"] == 1 and r["items"] == 1
      assert r["metrics"]["acc"]["stderr"] is None   # one item: undefined


@pytest.mark.parametrize("make,args,match", [
    (lambda d: (d / "e.txt").write_text(""), ("--tasks=ppl", "--files=D/e.txt"),
     "--files: D/e.txt is empty"),
    (lambda d: (d / "e.txt").write_text("\n \n"),
     ("--tasks=ppl", "--files=D/e.txt"), "is empty"),
    (lambda d: [(d / f).write_text("") for f in ("piqa_valid.jsonl",
                                                 "piqa_valid-labels.lst")],
     ("--tasks=piqa", "--data_dir=D"), "task 'piqa': no items in D/"),
])
def test_an_empty_input_is_an_error_and_writes_nothing(run, tmp_path, make,
                                                       args, match):
  make(tmp_path)
  args = [a.replace("D", str(tmp_path)) for a in args]
  before = faults.snapshot(run)
  _one_error_line(_evaluate(f"--workdir={run}", *args),
                  match.replace("D", str(tmp_path)))
  assert faults.snapshot(run) == before


# ----------------------------------------------- 4. a read-only workdir


def test_evaluate_on_a_read_only_workdir_prints_scores_and_names_the_file(
    run, tmp_path):
  workdir = _copy(run, tmp_path)
  text = tmp_path / "a.txt"
  text.write_text("the cat sat on a mat\n")
  before = faults.snapshot(workdir)
  r = faults.run_main(str(workdir), "fp4jax.evaluate", f"--workdir={workdir}",
                      "--tasks=ppl", f"--files={text}", driver=_READ_ONLY)
  _clean(r)
  assert "| ppl | token_perplexity |" in r.stdout
  last = faults.last_line(r.stderr)
  assert last.startswith("warning: results not saved: cannot write "
                         f"{workdir}/eval/step_6.json"), r.stderr[-2000:]
  assert faults.snapshot(workdir) == before


# ------------------------------ 5. unreadable or vanishing checkpoints


# The CLI's main run N times in one process (argv: N ARGS...): whether the
# reads a failed restore leaves behind report after its event loop closed
# is a race, which one try often wins.
_REPEAT = r"""
import sys
from fp4jax import export
codes = [export.main(sys.argv[2:]) for _ in range(int(sys.argv[1]))]
sys.exit(max(codes))
"""


def test_an_unreadable_checkpoint_is_one_line_without_library_noise(
    run, tmp_path):
  # (Without --step it falls back with a warning, as below; the resume
  # test above shows the same for a training run.)
  workdir = _copy(run, tmp_path)
  rel = faults.corrupt_checkpoint(workdir, 6, "truncate_data")
  r = faults.run_main("4", f"--workdir={workdir}", f"--out={tmp_path}/x",
                      "--step=6", driver=_REPEAT)
  assert r.returncode == EXIT_ERROR
  lines = [l for l in r.stderr.splitlines() if l.strip()]
  assert len(lines) == 4 and len(set(lines)) == 1, r.stderr[-3000:]
  assert lines[0].startswith(f"error: checkpoint step 6 is unreadable: "
                             f"{rel} is unreadable ("), lines[0]
  assert not (tmp_path / "x").exists()


def test_a_checkpoint_deleted_while_read_is_named_and_skipped(run,
                                                               tmp_path):
  workdir = _copy(run, tmp_path)
  r = _export(f"--workdir={workdir}", f"--out={tmp_path}/y",
              driver=_VANISHING)
  _clean(r)
  assert _exported_step(tmp_path / "y") == 3
  (warning,) = _warnings(r)
  assert warning.startswith("warning: checkpoint step 6 was deleted while "
                            "it was being read"), warning
  assert warning.endswith("; using step 3"), warning


# ------------------------------- 6. one line naming the input, exit 1


@pytest.mark.parametrize("module,args,match", [
    ("export", ("--workdir=RUN", "--out=OUT", "--step=abc"),
     "argument --step: invalid int value: 'abc'"),
    ("export", ("--workdir=RUN",), "the following arguments are required: "
     "--out"),
    ("evaluate", ("--workdir=RUN", "--tasks=ppl", "--files=BIN"),
     "BIN:1: not UTF-8 text (byte 0xff"),
    ("evaluate", ("--workdir=RUN", "--tasks=piqa", "--data_dir=LATIN1"),
     "piqa_valid.jsonl:1: not UTF-8 text"),
    ("evaluate", ("--workdir=RUN", "--tasks=ppl", "--files=TXT",
                  "--out=TMP"), "--out TMP is a folder"),
    ("evaluate", ("--workdir=RUN", "--tasks=ppl", "--files=TXT",
                  "--batch_size=x"), "argument --batch_size"),
    ("export", ("--workdir=NOKEY", "--out=OUT"),
     "config.json has no key 'config.optim'"),
])
def test_bad_arguments_and_inputs_are_one_line_naming_them(
    run, tmp_path, module, args, match):
  (tmp_path / "bin.txt").write_bytes(b"\xff\xfe text")
  (tmp_path / "t.txt").write_text("some text\n")
  latin = tmp_path / "latin1"
  latin.mkdir()
  (latin / "piqa_valid.jsonl").write_bytes(
      '{"goal": "caf\u00e9", "sol1": "a", "sol2": "b"}\n'.encode("latin-1"))
  (latin / "piqa_valid-labels.lst").write_text("0\n")
  nokey = _copy(run, tmp_path, "nokey")
  info = json.loads((nokey / "config.json").read_text())
  del info["config"]["optim"]
  (nokey / "config.json").write_text(json.dumps(info))
  subs = {"RUN": str(run), "OUT": str(tmp_path / "out"),
          "BIN": str(tmp_path / "bin.txt"), "LATIN1": str(latin),
          "TXT": str(tmp_path / "t.txt"), "TMP": str(tmp_path),
          "NOKEY": str(nokey)}

  def sub(s):
    for k, v in subs.items():
      s = s.replace(k, v)
    return s

  before = faults.snapshot(tmp_path)
  _one_error_line(_cli(module, *map(sub, args)), sub(match))
  assert faults.snapshot(tmp_path) == before


# ------------------------------------------------ 7. a disk that fills up

# Runs export with safetensors writing half its file and then failing as a
# full disk does (no small file system can be mounted without root tricks).
_DISK_FULLS = r"""
import errno, os, runpy, sys
from safetensors import numpy as st

def save_file(tensors, path, metadata=None):
  with open(path, "wb") as f:
    f.write(b"\0" * 1000)
  raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), path)

st.save_file = save_file
sys.argv = ["fp4jax.export", *sys.argv[1:]]
runpy.run_module("fp4jax.export", run_name="__main__", alter_sys=True)
"""


def test_a_disk_filling_up_during_export_is_one_line_and_leaves_nothing(
    run, tmp_path):
  (tmp_path / "mine").mkdir()
  before = faults.snapshot(tmp_path)
  # --out in folders that do not exist yet: export makes them, and on
  # failure removes them again with its scratch folder and partial file.
  r = faults.run_main(f"--workdir={run}", f"--out={tmp_path}/new/sub",
                      driver=_DISK_FULLS)
  _one_error_line(r, f"no space left on device for the export in {tmp_path}")
  assert [p.name for p in tmp_path.iterdir()] == ["mine"]
  assert faults.snapshot(tmp_path) == before
