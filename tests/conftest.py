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


def _quick_codegen(config):
  """Unoptimised machine code for a run that leaves out the slow tests
  (the default run's "not slow", or one marker such as "hf").

  Compiling dominates those tests on CPU, and LLVM's optimisation of the
  emitted code is ~40% of each compile (the scan train-step test: 85 -> 51
  CPU seconds; the default run 996 -> 719 s on two cores). XLA's own passes
  (fusion, layouts, the HLO the tests inspect) are the same at every level;
  the machine code may order f32 sums otherwise (fp4_paper's weight
  gradient at [256, 384] x [384, 128]: 26% of the elements differ, by
  <= 6e-5 relative), which every tolerance here already covers (the suite
  also passes on the oldest JAX, another compiler). The slow tests
  train long enough for the code's speed to matter and keep XLA's default,
  as do users' runs and the benchmarks. Set before any backend starts; a
  CLI test's subprocess inherits it.
  """
  marks = config.getoption("markexpr", "") or ""
  try:   # pytest's own parser of -m (its module is not public API)
    from _pytest.mark import expression  # pylint: disable=g-import-not-at-top
    takes_slow = not marks or expression.Expression.compile(marks).evaluate(
        lambda name: name == "slow")
  except Exception:  # pylint: disable=broad-except
    takes_slow = "not slow" not in marks
  if takes_slow:
    return   # a test marked slow alone would be selected
  if "xla_backend_optimization_level" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_backend_optimization_level=0"


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
  _quick_codegen(config)
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


# Test files by their running time, longest first (worker seconds of the
# default run's slowest 150 tests, two workers on two CPU cores, with the
# quick codegen above). The default run hands whole files to two
# pytest-xdist workers in collection order (setup.cfg: --dist loadfile
# --no-loadscope-reorder); longest first, the short files fill in at the
# end and the workers finish together. (xdist's own order, most tests
# first, put files of one to six long tests - notebooks, accumulation,
# telemetry, the GPU bench - at the very end.) Files not named here follow
# in their usual order; a stale entry costs only balance.
LONGEST_FIRST = (
    "hardening_test.py",            # 149
    "remat_test.py",                # 99
    "scan_test.py",                 # 98
    "evaluate_test.py",             # 86
    "comm_test.py",                 # 81
    "notebooks_test.py",            # 76
    "distributed_test.py",          # 73
    "eval_export_hardening_test.py",  # 61
    "resume_hardening_test.py",     # 56
    "train_test.py",                # 53
    "telemetry_test.py",            # 48
    "plan_test.py",                 # 40
    "accum_test.py",                # 33
    "experiments_test.py",          # 28
    "streaming_cli_test.py",        # 25
    "model_family_test.py",         # 24
    "llama_test.py",                # 24
    "bench_gpu_test.py",            # 19
    "gemm_test.py",                 # 15
    "recipes_test.py",              # 11
    "quant_test.py",
    "qdot_test.py",
    "optim_test.py",
    "checkpoint_test.py",
    "kernels_test.py",
    "numerics_test.py",
)


def pytest_collection_modifyitems(items):
  """Orders the files as LONGEST_FIRST (stable: a file's tests keep their
  order and stay together, so module fixtures are built once)."""
  rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))
