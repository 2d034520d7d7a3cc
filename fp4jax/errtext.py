"""The one line a CLI prints for an error (`error: <line>`).

Owns: `one_line`, shared by `main`, `evaluate` and `export`, so that every
entry point names a file the same way.

Must not import: jax or any fp4jax module but `diskspace`.
"""

import errno

from fp4jax import diskspace


def one_line(e: BaseException) -> str:
  """`e` as one line: a full disk names its path and the space needed; an
  OSError names its file and the cause (Python's bare "[Errno 28] ..." text
  names no file); anything else is its first line."""
  if isinstance(e, diskspace.DiskFull):
    return str(e)
  if isinstance(e, OSError) and e.filename and str(e).startswith("[Errno"):
    if e.errno == errno.ENOSPC:
      return f"no space left on device writing {e.filename}"
    if e.strerror:
      return f"{e.filename}: {e.strerror}"
  text = str(e).strip()
  return text.splitlines()[0] if text else repr(e)
