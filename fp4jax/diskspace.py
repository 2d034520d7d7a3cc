"""Free disk space: checked before large writes, named when a write runs out.

Owns: `DiskFull` (an OSError whose text is one line naming the path, the
space needed and the space free; the CLIs print it as their `error:` line
and exit 1), `check` (refuses a write of known size that cannot fit, before
anything is written) and `raise_if_full` (turns a write that ran out of
space, wherever the library that wrote it reports it, into a DiskFull).

A check before writing cannot see space that other processes take
meanwhile, so writers also clean up after a failed write and call
`raise_if_full`; the check makes the common case (a disk already full at
the start) fail before anything slow or anything written.

Must not import: jax or any fp4jax module.
"""

import errno
import os

# How each library reports ENOSPC in its own exception text (tensorstore:
# "[os_error_code='28']", array_record: "write() failed: No space left on
# device"); Python's OSError carries errno.
_NO_SPACE_TEXT = (os.strerror(errno.ENOSPC), "os_error_code='28'",
                  "No space left on device")


def _mb(n: float) -> str:
  if n >= 1e9:
    return f"{n / 1e9:.1f} GB"
  if n >= 1e6:
    return f"{n / 1e6:.1f} MB"
  return f"{n / 1e3:.1f} kB"


class DiskFull(OSError):
  """A write that does not fit on its file system.

  Attributes:
    path: where it was to be written.
    need: bytes the write needs (an estimate).
    free: bytes free there when it was checked.
  """

  def __init__(self, path: str, need: float, free: float, what: str):
    self.message = (f"no space left on device for {what} in {path}: needs "
                    f"about {_mb(need)}, {_mb(free)} free; free some space "
                    f"(or write elsewhere) and rerun")
    super().__init__(errno.ENOSPC, self.message, path)
    self.path, self.need, self.free = path, need, free

  def __str__(self) -> str:
    return self.message


def free_bytes(path: str) -> int:
  """Bytes an unprivileged writer may still use on `path`'s file system.

  `path` need not exist: its nearest existing ancestor is measured.
  """
  probe = os.path.abspath(path)
  while not os.path.exists(probe):
    parent = os.path.dirname(probe)
    if parent == probe:
      break
    probe = parent
  st = os.statvfs(probe)
  return st.f_bavail * st.f_frsize


def check(path: str, need: float, what: str) -> None:
  """Raises DiskFull if fewer than `need` bytes are free at `path`."""
  free = free_bytes(path)
  if free < need:
    raise DiskFull(path, need, free, what)


def is_full(error: BaseException) -> bool:
  """Whether `error`, or an exception it was raised from, is ENOSPC."""
  seen = set()
  e: BaseException | None = error
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
      return True
    if any(t in str(e) for t in _NO_SPACE_TEXT):
      return True
    e = e.__cause__ or e.__context__
  return False


def raise_if_full(error: BaseException, path: str, need: float,
                  what: str) -> None:
  """Raises DiskFull (from None) if `error` is a write that ran out of
  space; returns otherwise, so the caller re-raises `error` itself."""
  if isinstance(error, DiskFull):
    raise error
  if is_full(error):
    raise DiskFull(path, need, free_bytes(path), what) from None
