"""The run directory as a transaction: checked, locked, rolled back on failure.

Owns: the checks that a workdir can be used (a directory or creatable, and
writable), the exclusive lock a run holds on it (`<workdir>/.lock`, so a
double-submitted job cannot interleave with the first), and the rollback of
what a start created before it failed.

A start claims its workdir in three phases:
  1. `check_usable` (nothing written);
  2. `Claim.__enter__`: takes the lock (creating the workdir if needed); the
     data stage may now write its derived files (tokenizer, prepared data);
  3. `Claim.commit()` once every check has passed (the train loop writes
     config.json, checkpoints and metrics from then on).
If the block raises before `commit()`, the files this start created are
removed again, inside an artefact directory that existed too (a second
corpus prepared under an existing `tfds/`), and the lock file gets back
the content and times it had: a failed start leaves the workdir
byte-identical, and the next start trusts nothing it did not verify. Files
that existed before the start are never touched.

The lock is an `fcntl.flock` on `<workdir>/.lock`: the kernel drops it when
the holder dies, so a lock of a killed run is never stale. The file holds
the holder's pid and host, for the message the second run prints. Local and
NFSv4 file systems honour flock; others may not.

Must not import: jax, ml_collections, or other fp4jax modules.
"""

import datetime
import fcntl
import os
import shutil
import socket
import tempfile
from collections.abc import Sequence

LOCK_FILE = ".lock"


class WorkdirBusy(RuntimeError):
  """Another live process holds the workdir's lock."""


def check_usable(workdir: str) -> None:
  """Checks that `workdir` is, or can be created as, a writable directory.

  Writes nothing (see `check_creatable`).

  Raises:
    ValueError: one line naming --workdir and the problem.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise ValueError(f"--workdir {workdir} is a file, not a directory")
  check_creatable(path, f"--workdir {workdir}")


def check_creatable(path: str, label: str) -> None:
  """Checks that files can be created in `path` or, where it does not exist
  yet, in its nearest existing ancestor (so it can be made there).

  Writes nothing: writability is probed with an anonymous temporary file
  (deleted on close, never linked).

  Raises:
    ValueError: one line starting with `label` (e.g. "--out x"): an
      ancestor is a file, or the directory is not writable.
  """
  probe = os.path.abspath(path)
  while not os.path.isdir(probe):
    if os.path.lexists(probe):   # an ancestor that is a file
      raise ValueError(f"{label}: {probe} is a file, not a directory")
    probe = os.path.dirname(probe)
  try:
    with tempfile.TemporaryFile(dir=probe):
      pass
  except OSError as e:
    raise ValueError(f"{label} is not writable: cannot create files in "
                     f"{probe} ({e.strerror or e})") from None


def holder(workdir: str) -> str:
  """The lock file's "pid P on host H since T" line ("" if none)."""
  try:
    with open(os.path.join(workdir, LOCK_FILE)) as f:
      return f.read().strip()
  except OSError:
    return ""


class Claim:
  """Exclusive use of a workdir, rolled back unless committed.

  Usage:
    with rundir.Claim(workdir, artefacts=("tokenizer.model", "tfds")) as c:
      ... prepare data (may write the artefacts) ...
      c.commit()
      ... train ...
  """

  def __init__(self, workdir: str, *, artefacts: Sequence[str] = (),
               primary: bool = True):
    """Args:
      workdir: the run directory.
      artefacts: names inside the workdir a start may create before
        `commit()`; those it created are removed if it fails.
      primary: False on the processes of a multi-process run other than
        process 0: they share process 0's claim (no lock, no rollback).
    """
    self.primary = primary
    self.workdir = os.path.abspath(workdir)
    self._artefacts = tuple(artefacts)
    self._fd: int | None = None
    self._committed = False
    self._created_dir = False
    self._existing: set[str] = set()
    # Paths inside existing artefact directories, and the old lock file's
    # bytes and times, to put back after a failed start.
    self._inside: dict[str, set[str]] = {}
    self._old_lock: tuple[bytes, int, int] | None = None

  def __enter__(self) -> "Claim":
    if not self.primary:
      self._committed = True    # nothing to lock or roll back here
      return self
    self._created_dir = not os.path.isdir(self.workdir)
    self._existing = {a for a in self._artefacts + (LOCK_FILE,)
                      if os.path.lexists(os.path.join(self.workdir, a))}
    os.makedirs(self.workdir, exist_ok=True)
    fd = os.open(os.path.join(self.workdir, LOCK_FILE),
                 os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      who = holder(self.workdir) or "another process"
      raise WorkdirBusy(f"workdir {self.workdir} is in use by {who}; wait "
                        f"for that run to end or use another --workdir"
                        ) from None
    if LOCK_FILE in self._existing:
      st = os.fstat(fd)
      self._old_lock = (os.pread(fd, st.st_size, 0), st.st_atime_ns,
                        st.st_mtime_ns)
    self._inside = {a: _tree(os.path.join(self.workdir, a))
                    for a in self._existing - {LOCK_FILE}
                    if os.path.isdir(os.path.join(self.workdir, a))}
    since = datetime.datetime.now().isoformat(timespec="seconds")
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on host {socket.gethostname()} since "
                 f"{since}\n".encode())
    self._fd = fd
    return self

  def commit(self) -> None:
    """Every check passed: what was written stays, even if training fails."""
    self._committed = True

  def __exit__(self, exc_type, exc, tb) -> None:
    try:
      if exc_type is not None and not self._committed:
        self._rollback()
    finally:
      if self._fd is not None:
        # The file stays after a run (unlinking it would let a third process
        # lock a new inode while a second still holds the old one); only a
        # failed start that created it removes it, as it removes the rest.
        failed = exc_type is not None and not self._committed
        if failed and LOCK_FILE not in self._existing:
          os.remove(os.path.join(self.workdir, LOCK_FILE))
        elif failed and self._old_lock is not None:
          data, atime, mtime = self._old_lock
          os.ftruncate(self._fd, 0)
          os.pwrite(self._fd, data, 0)
          os.utime(self._fd, ns=(atime, mtime))
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None
      if exc_type is not None and not self._committed and self._created_dir:
        shutil.rmtree(self.workdir, ignore_errors=True)

  def _rollback(self) -> None:
    for name in self._artefacts:
      path = os.path.join(self.workdir, name)
      if name in self._inside:
        _remove_new(path, self._inside[name])
        continue
      if name in self._existing:
        continue
      if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path, ignore_errors=True)
      elif os.path.lexists(path):
        os.remove(path)


def _tree(root: str) -> set[str]:
  """Relative paths of every file and directory under `root`."""
  out = set()
  for parent, dirs, files in os.walk(root):
    rel = os.path.relpath(parent, root)
    out.update(os.path.normpath(os.path.join(rel, n)) for n in dirs + files)
  return out


def _remove_new(root: str, before: set[str]) -> None:
  """Removes what appeared under `root` since `_tree(root)` gave `before`."""
  for rel in sorted(_tree(root) - before, key=len, reverse=True):
    path = os.path.join(root, rel)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path, ignore_errors=True)
    elif os.path.lexists(path):
      os.remove(path)
