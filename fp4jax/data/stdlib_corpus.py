"""The offline smoke corpus: the Python standard library's own source.

Owns: which files make up `data.source="stdlib"`. Every machine that runs
this code has them, so a real-text run needs no download and no data
files. The corpus is the .py files under `sysconfig.get_paths()["stdlib"]`,
sorted by relative path, minus test directories, site-packages and files
over a size cap; one file is one document. It is the same for a given
Python version (e.g. 3.11.7: ~730 files, ~11 MB), so it is a smoke corpus
for checking that the pipeline, the tokenizer and the model learn real text,
not a benchmark corpus: results depend on the Python version.

Must not import: tensorflow_datasets, grain, sentencepiece, ml_collections,
or any other fp4jax module.
"""

import os
import sys
import sysconfig

# Directory names never descended into: tests (large, odd encodings, data
# fixtures), third-party packages and build leftovers.
EXCLUDED_DIRS = frozenset({
    "test", "tests", "idle_test", "site-packages", "dist-packages",
    "__pycache__"})
# Generated tables (pydoc_data/topics.py is ~750 KB of one string) are not
# representative source; 256 KiB keeps every hand-written module.
DEFAULT_MAX_FILE_BYTES = 256 * 1024


def stdlib_root() -> str:
  """The standard library directory of the running interpreter."""
  return sysconfig.get_paths()["stdlib"]


def python_tag() -> str:
  """e.g. "py3.11.7": the corpus is defined per interpreter version."""
  v = sys.version_info
  return f"py{v.major}.{v.minor}.{v.micro}"


def stdlib_files(max_file_bytes: int = DEFAULT_MAX_FILE_BYTES) -> list[str]:
  """Absolute paths of the corpus files, sorted by path below the root.

  Args:
    max_file_bytes: files larger than this are left out; > 0.

  Raises:
    ValueError: max_file_bytes <= 0.
    FileNotFoundError: no stdlib directory or no file in it.
  """
  if max_file_bytes <= 0:
    raise ValueError(f"data.stdlib_max_file_bytes must be > 0, got "
                     f"{max_file_bytes}")
  root = stdlib_root()
  if not os.path.isdir(root):
    raise FileNotFoundError(f"no Python standard library at {root!r}")
  rel: list[str] = []
  for d, dirs, files in os.walk(root):
    dirs[:] = [x for x in dirs if x not in EXCLUDED_DIRS]
    for name in files:
      if not name.endswith(".py"):
        continue
      path = os.path.join(d, name)
      if os.path.isfile(path) and os.path.getsize(path) <= max_file_bytes:
        rel.append(os.path.relpath(path, root))
  if not rel:
    raise FileNotFoundError(f"no .py files under {root!r}")
  return [os.path.join(root, r) for r in sorted(rel)]
