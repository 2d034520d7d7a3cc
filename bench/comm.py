r"""Gradient-communication bytes and step time per comm.grad_dtype, side by side.

  PYTHONPATH=. python bench/comm.py                      # 8 fake CPU devices
  PYTHONPATH=. python bench/comm.py --fsdp=4             # (data 2, fsdp 4)
  PYTHONPATH=. python bench/comm.py --processes=2        # 2 x 4 devices, gloo
  PYTHONPATH=. python bench/comm.py --size=125m --batch=16 --seq=256

Compiles one data-parallel train step per dtype (fp4jax.comm), then times
them in interleaved rounds and prints, per dtype: the gradient payload a
device receives per step (a ring all-reduce, XLA's in f32 or fp4jax.comm's
ring reduce-scatter + all-gather: 2 (n-1)/n x itemsize bytes a
parameter; with FSDP a reduce-scatter over fsdp, (n_f-1)/n_f, and an
all-reduce of the shard over data, 2 (n_d-1)/(n_d n_f)), the collectives
in the lowered step that move the dtype, the median step time and the
ratios to f32. `--processes=N` runs the same in N processes on this
machine (jax.distributed at 127.0.0.1, gloo collectives, 8 / N devices
each); process 0 prints.
On CPU the backend widens FP8 collectives to f16 when it compiles, and
the devices share one memory, so the time column measures the extra
quantize / gather / sum work, not a network saving.
"""

import argparse
import os
import socket
import statistics
import subprocess
import sys
import time

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS",
                                                                 ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=8")

import jax  # pylint: disable=wrong-import-position
import numpy as np  # pylint: disable=wrong-import-position

from fp4jax import comm  # pylint: disable=wrong-import-position
from fp4jax import distributed  # pylint: disable=wrong-import-position
from fp4jax import optim  # pylint: disable=wrong-import-position
from fp4jax import qconfig  # pylint: disable=wrong-import-position
from fp4jax import sharding  # pylint: disable=wrong-import-position
from fp4jax import sizes  # pylint: disable=wrong-import-position
from fp4jax import train_state  # pylint: disable=wrong-import-position
from fp4jax.data import synthetic  # pylint: disable=wrong-import-position

_HLO_TYPES = {"float32": "f32>", "bfloat16": "bf16>",
              "float8_e4m3fn": "f8E4M3FN>", "float8_e5m2": "f8E5M2>"}


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="demo", help="key of fp4jax.sizes.SIZES")
  p.add_argument("--dtypes", default=",".join(comm.GRAD_DTYPES),
                 help="comma-separated comm.grad_dtype values; vs the first")
  p.add_argument("--recipe", default="bf16")
  p.add_argument("--batch", type=int, default=16, help="global batch B")
  p.add_argument("--seq", type=int, default=64, help="sequence length T")
  p.add_argument("--vocab", type=int, default=512)
  p.add_argument("--steps", type=int, default=12, help="timed steps each")
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--fsdp", type=int, default=1, help="mesh.fsdp")
  p.add_argument("--processes", type=int, default=1,
                 help="run as this many processes on this machine")
  p.add_argument("--process_id", type=int, default=-1, help=argparse.SUPPRESS)
  p.add_argument("--coordinator", default="", help=argparse.SUPPRESS)
  return p.parse_args(argv)


def _launch(argv, n: int) -> int:
  """Runs this benchmark as n processes of 8 / n CPU devices; waits."""
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // n}")
  procs = [subprocess.Popen(
      [sys.executable, os.path.abspath(__file__), *argv,
       f"--process_id={i}", f"--coordinator=127.0.0.1:{port}"], env=env,
      stdout=None if i == 0 else subprocess.DEVNULL) for i in range(n)]
  codes = [p.wait() for p in procs]
  return max(codes, key=abs)


def _grad_payload(trainer, itemsize: int) -> float:
  """Gradient bytes one device receives per step (see the docstring)."""
  shape = trainer.mesh.shape
  n_f, n_d = shape["fsdp"], shape["data"]
  n = n_f * n_d
  total = 0.0
  for leaf in jax.tree.leaves(trainer.abstract_state.params):
    size = itemsize * int(np.prod(leaf.shape))
    if n_f > 1 and "fsdp" in str(leaf.sharding.spec):
      total += size * ((n_f - 1) / n_f + 2 * (n_d - 1) / (n_d * n_f))
    else:
      total += size * 2 * (n - 1) / n
  return total


def main(argv=None) -> dict[str, dict[str, float]]:
  argv = sys.argv[1:] if argv is None else argv
  a = _args(argv)
  if a.processes > 1 and a.process_id < 0:
    sys.exit(_launch(argv, a.processes))
  if a.process_id >= 0:
    distributed.initialize({"coordinator_address": a.coordinator,
                            "num_processes": a.processes,
                            "process_id": a.process_id,
                            "local_device_ids": "", "timeout_s": 120})
  dtypes = [d for d in a.dtypes.split(",") if d]
  model_cfg = sizes.get_config(a.size, vocab_size=a.vocab,
                               compute_dtype="float32")
  mesh = sharding.make_mesh(-1, a.fsdp, 1)
  procs, pid = jax.process_count(), jax.process_index()
  data = synthetic.SyntheticInput(vocab_size=a.vocab, seq_len=a.seq,
                                  global_batch=a.batch, seed=0)
  rules = qconfig.default_rules(qconfig.get_recipe(a.recipe))
  params = sizes.param_count(model_cfg)
  say = print if pid == 0 else (lambda *_, **__: None)
  say(f"{a.size}: {params:,} params, B={a.batch} T={a.seq}, recipe "
      f"{a.recipe}, mesh {dict(mesh.shape)} over {procs} process(es), "
      f"{jax.devices()[0].device_kind}, jax {jax.__version__}", flush=True)
  rows = a.batch // procs
  runs = {}
  for dtype in dtypes:
    t = train_state.make_trainer(
        model_cfg, rules, optim.OptimConfig(), num_steps=1000, mesh=mesh,
        global_batch=a.batch, seq_len=a.seq, seed=0, comm_dtype=dtype)
    state = t.init()
    batch = t.put_batch({k: v[pid * rows:(pid + 1) * rows]
                         for k, v in next(data).items()})
    state, m = t.train_step(state, batch)
    jax.block_until_ready(m)
    gathers = [l for l in t.train_step_hlo.splitlines()
               if ("stablehlo.all_gather" in l or
                   "stablehlo.collective_permute" in l) and
               _HLO_TYPES[dtype] in l.split("->")[-1]]
    payload = _grad_payload(t, np.dtype(dtype).itemsize)
    runs[dtype] = {"trainer": t, "state": state, "batch": batch,
                   "times": [], "bytes": payload, "gathers": len(gathers)}
  per_round = max(a.steps // a.rounds, 1)
  for _ in range(a.rounds):
    for run in runs.values():
      for _ in range(per_round):
        t0 = time.perf_counter()
        run["state"], m = run["trainer"].train_step(run["state"],
                                                     run["batch"])
        jax.block_until_ready(m)
        run["times"].append(time.perf_counter() - t0)
  base = runs[dtypes[0]]
  base_t = statistics.median(base["times"])
  say(f"{'grad dtype':<15}{'MB/step/dev':>12}{'x bytes':>9}"
        f"{'dtype moves':>15}{'ms/step':>9}{'x time':>8}")
  out = {}
  for dtype, r in runs.items():
    sec = statistics.median(r["times"])
    out[dtype] = {"bytes": r["bytes"], "seconds": sec}
    say(f"{dtype:<15}{r['bytes'] / 1e6:>12.2f}"
          f"{r['bytes'] / base['bytes']:>8.2f}x{r['gathers']:>15}"
          f"{1e3 * sec:>9.1f}{sec / base_t:>7.2f}x")
  return out


if __name__ == "__main__":
  main()
  if jax.process_count() > 1:
    jax.distributed.shutdown()   # leave together, not at interpreter exit
