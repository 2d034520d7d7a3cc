"""Fault injection for tests: damage a workdir, run and kill the CLI.

  corrupt_checkpoint(workdir, step, how)   truncate / delete a file of a step
  tear_last_line(path)                     a JSONL line cut mid-write
  snapshot(workdir)                        {relative path: sha256} to compare
  run_main(*args, cwd=, env=)              fp4jax.main in a subprocess
  start_main(*args) / wait_for_step(...)   a running CLI, to signal or kill

Also a data source, "nan_at", for data.SOURCES: synthetic tokens whose
training batches from index `NAN_AT` on carry a NaN mask (a non-finite
loss), for runs driven through `python -c "import faults; faults.main()"`,
and a full disk (`FULL_DISK` kinds) simulated where the libraries would
report ENOSPC, for `python -c "import faults; faults.full_disk_main()"`
(a real small file system needs privileges a test does not have).
"""

import glob
import hashlib
import json
import os
import pathlib
import random
import signal
import subprocess
import sys
import time

import numpy as np

ROOT = pathlib.Path(__file__).resolve().parents[1]
TESTS = pathlib.Path(__file__).resolve().parent

# Ways to damage a checkpoint step directory (orbax layout).
CORRUPTIONS = ("truncate_data", "delete_metadata", "delete_data_metadata")


def corrupt_checkpoint(workdir, step: int, how: str) -> str:
  """Damages checkpoint `step` of `workdir`; returns the file's relative path.

  how: "truncate_data" halves the largest array data file,
  "delete_metadata" deletes state/_METADATA, "delete_data_metadata" deletes
  data/metadata (the input iterator's state).
  """
  step_dir = os.path.join(workdir, "checkpoints", str(step))
  if how == "truncate_data":
    # The merged OCDBT data files (state/d/*) are what a restore reads.
    files = sorted(glob.glob(os.path.join(step_dir, "state", "d", "*")),
                   key=os.path.getsize)
    path = files[-1]
    with open(path, "r+b") as f:
      f.truncate(os.path.getsize(path) // 2)
  elif how == "delete_metadata":
    path = os.path.join(step_dir, "state", "_METADATA")
    os.remove(path)
  elif how == "delete_data_metadata":
    path = os.path.join(step_dir, "data", "metadata")
    os.remove(path)
  else:
    raise ValueError(f"unknown corruption {how!r}; one of {CORRUPTIONS}")
  return os.path.relpath(path, step_dir)


def tear_last_line(path) -> str:
  """Cuts the last line of a text file in half (no newline): a torn write.

  Returns the torn fragment.
  """
  text = pathlib.Path(path).read_text()
  lines = text.splitlines(keepends=True)
  fragment = lines[-1][:len(lines[-1]) // 2]
  pathlib.Path(path).write_text("".join(lines[:-1]) + fragment)
  return fragment


def snapshot(workdir) -> dict[str, str]:
  """{relative path: sha256 of the content} of every file under workdir."""
  out = {}
  for p in sorted(pathlib.Path(workdir).rglob("*")):
    if p.is_file():
      out[str(p.relative_to(workdir))] = hashlib.sha256(
          p.read_bytes()).hexdigest()
  return out


def _env(pythonpath: bool = True) -> dict[str, str]:
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  env.pop("PYTHONPATH", None)
  if pythonpath:
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(TESTS)])
  # One CPU device: the CLI runs as a user's would (conftest forces 8).
  env["XLA_FLAGS"] = " ".join(
      f for f in env.get("XLA_FLAGS", "").split()
      if "xla_force_host_platform_device_count" not in f)
  return env


def run_main(*args, cwd=ROOT, pythonpath: bool = True, timeout: int = 300,
             driver: str | None = None, module: str = "fp4jax.main"
             ) -> subprocess.CompletedProcess:
  """Runs the CLI to completion; stdout and stderr as text.

  driver: Python source run instead of `-m fp4jax.main` (it must end by
    running the CLI, e.g. `faults.main()`); the args follow as sys.argv.
  module: the CLI module (fp4jax.evaluate, ...).
  """
  cmd = ([sys.executable, "-c", driver, *args] if driver else
         [sys.executable, "-m", module, *args])
  return subprocess.run(cmd, cwd=cwd, env=_env(pythonpath),
                        capture_output=True, text=True, timeout=timeout,
                        check=False)


def _as_from_a_terminal() -> None:
  # A run started from a shell has SIGHUP at its default; the test runner
  # itself may have been started under nohup (SIGHUP ignored, which a child
  # inherits and the CLI deliberately honours).
  signal.signal(signal.SIGHUP, signal.SIG_DFL)


def start_main(*args, cwd=ROOT) -> subprocess.Popen:
  """Starts the CLI as from a terminal (SIGHUP at its default); stdout and
  stderr merged into `proc.stdout` (text)."""
  return subprocess.Popen([sys.executable, "-m", "fp4jax.main", *args],
                          cwd=cwd, env=_env(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True,
                          preexec_fn=_as_from_a_terminal)


def wait_for_step(proc: subprocess.Popen, workdir, step: int,
                  timeout: float = 600) -> None:
  """Blocks until metrics.jsonl of workdir has a record at >= step."""
  path = pathlib.Path(workdir) / "metrics.jsonl"
  deadline = time.time() + timeout
  while True:
    if path.exists():
      for line in path.read_text().splitlines():
        try:
          if json.loads(line).get("step", 0) >= step:
            return
        except ValueError:
          pass
    if proc.poll() is not None or time.time() > deadline:
      raise AssertionError(f"no step {step} record (exit {proc.poll()}): "
                           f"{proc.stdout.read() if proc.stdout else ''}")
    time.sleep(0.3)


def text_run(root, recipe: str, *extra: str, seed: int = 0) -> pathlib.Path:
  """Trains the smoke model 6 steps on a small made-up text corpus with its
  own 300-piece tokenizer (f32 compute); returns the workdir."""
  root = pathlib.Path(root)
  rng = random.Random(seed)
  words = ("the cat sat on a mat and the dog ran to the park while birds "
           "sang in the tall green trees").split()
  docs = ["\n".join(" ".join(rng.choices(words, k=12)) for _ in range(20))
          for _ in range(20)]
  corpus = root / "corpus.txt"
  corpus.write_text("\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n")
  workdir = root / "run"
  r = run_main(
      f"--config=configs/demo.py:smoke,recipe={recipe}", f"--workdir={workdir}",
      "--config.data.source=text_files", f"--config.data.train_files={corpus}",
      "--config.data.vocab_size=300", "--config.data.val_fraction=0.1",
      "--config.model.compute_dtype=float32", *extra)
  assert r.returncode == 0, r.stderr[-3000:]
  return workdir


def last_line(text: str) -> str:
  lines = [l for l in text.strip().splitlines() if l.strip()]
  return lines[-1] if lines else ""


# ------------------------------------------------------- a non-finite source
NAN_AT = 2


class _NanFrom:
  """Synthetic batches; from batch NAN_AT on the mask holds a NaN."""

  def __init__(self, inner):
    self._inner, self.vocab_size = inner, inner.vocab_size
    self._n = 0

  def __iter__(self):
    return self

  def __next__(self):
    batch = dict(next(self._inner))
    if self._n >= NAN_AT:
      batch["mask"] = batch["mask"].copy()
      batch["mask"][0, 0] = np.nan
    self._n += 1
    return batch

  def get_state(self):
    return {"inner": self._inner.get_state(), "n": self._n}

  def set_state(self, state):
    self._inner.set_state(state["inner"])
    self._n = state["n"]


def make_input(data_cfg, **kwargs):
  """Source entry point: "nan_at" in data.SOURCES maps to this module."""
  from fp4jax.data import synthetic  # pylint: disable=g-import-not-at-top
  inner = synthetic.make_input(data_cfg, **kwargs)
  return _NanFrom(inner) if kwargs["split"] == "train" else inner


def main() -> None:
  """The CLI with data.source "nan_at" registered (argv: sys.argv[1:])."""
  import runpy  # pylint: disable=g-import-not-at-top
  from fp4jax import data  # pylint: disable=g-import-not-at-top
  data.SOURCES["nan_at"] = __name__
  sys.argv = ["fp4jax.main", *sys.argv[1:]]
  runpy.run_module("fp4jax.main", run_name="__main__", alter_sys=True)


# -------------------------------------------------------------- a full disk
# Where the disk fills, and how the library writing there reports it (the
# texts are those a real full tmpfs gave: tensorstore under orbax,
# array_record under TFDS, Python's OSError for plain files).
FULL_DISK = ("free_space", "checkpoint_write", "corpus", "tokenizer")
FULL_AT_STEP = 6
_ORBAX_ENOSPC = ("RESOURCE_EXHAUSTED: Error writing \"params\" in OCDBT "
                 "database: Failed to write 621289 bytes to file 5: No "
                 "space left on device [os_error_code='28']")


def _full_disk(kind: str) -> None:
  import errno  # pylint: disable=g-import-not-at-top
  if kind == "free_space":    # statvfs reports 1 kB free everywhere
    real_statvfs = os.statvfs

    class _Stat:
      def __init__(self, st):
        self.f_frsize, self.f_bavail = st.f_frsize, 1024 // st.f_frsize
    os.statvfs = lambda path: _Stat(real_statvfs(path))
  elif kind == "checkpoint_write":   # the save of FULL_AT_STEP fails
    import orbax.checkpoint as ocp  # pylint: disable=g-import-not-at-top
    real_save = ocp.CheckpointManager.save

    def save(self, step, *args, **kwargs):
      if step < FULL_AT_STEP:
        return real_save(self, step, *args, **kwargs)
      tmp = os.path.join(str(self.directory),
                         f"{step}.orbax-checkpoint-tmp-1234", "state")
      os.makedirs(tmp)
      pathlib.Path(tmp, "d").write_bytes(b"\0" * 4096)   # a partial file
      raise ValueError(_ORBAX_ENOSPC)
    ocp.CheckpointManager.save = save
  elif kind == "corpus":    # array_record fails writing the train split
    from fp4jax.data import builders  # pylint: disable=g-import-not-at-top

    def prepare(self, **kwargs):
      del kwargs
      partial = pathlib.Path(self.data_dir).parent / "incomplete.X_1.0.0"
      partial.mkdir(parents=True)
      (partial / "text_files-train.array_record-00000-of-00001"
       ).write_bytes(b"\0" * 4096)
      raise RuntimeError(
          f'Failed to finalize writing of split "train": write() failed: '
          f'No space left on device; writing {partial}')
    builders.TextFiles.download_and_prepare = prepare
  elif kind == "tokenizer":   # the model file's rename after a short write
    real_replace = os.replace

    def replace(src, dst, *args, **kwargs):
      if str(dst).endswith("tokenizer.model"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(src))
      return real_replace(src, dst, *args, **kwargs)
    os.replace = replace
  else:
    raise ValueError(f"unknown full-disk kind {kind!r}; one of {FULL_DISK}")


def full_disk_main() -> None:
  """The CLI with a full disk of kind sys.argv[1] (argv[2:]: the CLI's)."""
  import runpy  # pylint: disable=g-import-not-at-top
  _full_disk(sys.argv[1])
  sys.argv = ["fp4jax.main", *sys.argv[2:]]
  runpy.run_module("fp4jax.main", run_name="__main__", alter_sys=True)
