"""Test setup: 8 fake CPU devices before any backend starts."""

import os

# Must run before jax initialises its backend, so sharding tests see 8 devices.
os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
  os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Tests never touch the network: tfds must not try to download anything.
os.environ.setdefault("TFDS_DATA_DIR", os.path.join(
    os.path.dirname(__file__), ".tfds_never_used"))


# Set by the pytest process that made the run's cache, for its workers.
_SHARED_CACHE = "FP4JAX_TEST_SHARED_JAX_CACHE"


def pytest_configure(config):
  """A fresh persistent compilation cache for this test process.

  The suite compiles the same small programs many times over: the CLI runs
  in subprocesses (tests/faults.py passes this environment on), the
  telemetry on / off runs, trainers rebuilt with other Python callables.
  JAX keys an entry by the program (its StableHLO without locations), the
  compile options, the devices and the jax / jaxlib versions, so a hit is
  the executable XLA built for the identical program. One directory per
  run of pytest, shared by its pytest-xdist workers (the controller makes
  it before it starts them, and they inherit its environment), created
  empty and removed at the end: nothing carries between runs. A size
  limit makes JAX lock the directory (filelock) around every read and
  write: the workers and the CLI processes they start (two at once in the
  multi-process tests) may compile the same program together, and an
  unlocked reader could see a half-written entry.
  """
  import shutil  # pylint: disable=g-import-not-at-top
  import sys  # pylint: disable=g-import-not-at-top
  import tempfile  # pylint: disable=g-import-not-at-top
  path = os.environ.get(_SHARED_CACHE) if hasattr(config, "workerinput") \
      else None
  if not path:   # the controller, or a run without workers
    path = tempfile.mkdtemp(prefix="fp4jax-test-jax-cache-")
    os.environ[_SHARED_CACHE] = path
    config.add_cleanup(lambda: shutil.rmtree(path, ignore_errors=True))
  limit = 8 << 30   # bytes; a run of the suite writes far less
  os.environ["JAX_COMPILATION_CACHE_DIR"] = path
  os.environ["JAX_COMPILATION_CACHE_MAX_SIZE"] = str(limit)
  if "jax" in sys.modules:   # imported already (a plugin): set it directly
    sys.modules["jax"].config.update("jax_compilation_cache_dir", path)
    sys.modules["jax"].config.update("jax_compilation_cache_max_size", limit)


# Test files by their running time, longest first (seconds of one serial
# run on two busy CPU cores, before the persistent cache above and before
# accum / distributed / evaluate shrank their runs, which took each of
# those three down by ~20-50 s; comm and scan estimated from xdist runs). The
# default run hands whole files to two pytest-xdist workers in collection
# order (setup.cfg: --dist loadfile --no-loadscope-reorder); longest first,
# the short files fill in at the end and the workers finish together.
# (xdist's own order, most tests first, put files of one to six long tests
# - notebooks, accumulation, telemetry, the GPU bench - at the very end.)
# Files not named here follow in their usual order; a stale entry costs
# only balance.
LONGEST_FIRST = (
    "hardening_test.py",            # 216
    "remat_test.py",                # 215
    "comm_test.py",                 # ~200
    "distributed_test.py",          # 209
    "notebooks_test.py",            # 180
    "evaluate_test.py",             # 192
    "train_test.py",                # 164
    "scan_test.py",                 # ~150
    "eval_export_hardening_test.py",  # 134
    "accum_test.py",                # 129
    "telemetry_test.py",            # 119
    "resume_hardening_test.py",     # 102
    "experiments_test.py",          # 76
    "bench_gpu_test.py",            # 69
    "llama_test.py",                # 66
    "quant_test.py",                # 53
    "qdot_test.py",                 # 42
    "gemm_test.py",                 # 39
    "recipes_test.py",              # 39
    "plan_test.py",                 # 36
    "optim_test.py",                # 34
    "checkpoint_test.py",           # 29
    "kernels_test.py",              # 26
    "numerics_test.py",             # 23
)


def pytest_collection_modifyitems(items):
  """Orders the files as LONGEST_FIRST (stable: a file's tests keep their
  order and stay together, so module fixtures are built once)."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
