r"""Compile time of the train step against depth: scanned vs unrolled layers.

  PYTHONPATH=. python bench/compile_time.py                  # 4 8 16 32
  PYTHONPATH=. python bench/compile_time.py --depths=4,8 --recipe=fp4_paper

For each depth, lowers and compiles the train step (`jax.jit(...).lower
(...).compile()` of `train_state.train_step` on one device, the model at
the "demo" width) with model.scan_layers off and on, in that order, and
prints the seconds of all steps (init, train, eval) and of the train
step alone. Each compile is of a fresh
model config, so nothing is reused from a cache (the persistent
compilation cache is not enabled here).
"""

import argparse
import dataclasses
import sys
import time

import jax

from fp4jax import optim
from fp4jax import qconfig
from fp4jax import sharding
from fp4jax import sizes
from fp4jax import train_state


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="demo", help="key of fp4jax.sizes.SIZES")
  p.add_argument("--depths", default="4,8,16,32")
  p.add_argument("--recipe", default="fp4_paper")
  p.add_argument("--batch", type=int, default=4)
  p.add_argument("--seq", type=int, default=128)
  return p.parse_args(argv)


def compile_seconds(cfg, rules, batch: int, seq: int) -> tuple[float, float]:
  """(all steps, the train step alone): wall seconds to lower and compile
  `cfg`'s trainer."""
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])
  t0 = time.perf_counter()
  t = train_state.make_trainer(cfg, rules, optim.OptimConfig(), num_steps=10,
                               mesh=mesh, global_batch=batch, seq_len=seq,
                               seed=0)
  return time.perf_counter() - t0, t.train_compile_seconds


def main(argv=None) -> int:
  a = _args(argv)
  print(f"jax {jax.__version__}, {jax.devices()[0].device_kind}, size "
        f"{a.size}, recipe {a.recipe}, batch {a.batch} x {a.seq}; seconds "
        f"to lower and compile init + train + eval steps")
  print(f"{'layers':>6} | {'all steps: unrolled':>19} {'scanned':>8} | "
        f"{'train step: unrolled':>20} {'scanned':>8}")
  for depth in (int(d) for d in a.depths.split(",")):
    base = sizes.get_config(a.size, vocab_size=1024, n_layers=depth)
    rules = tuple(qconfig.default_rules(a.recipe, depth))
    t = {scan: compile_seconds(dataclasses.replace(base, scan_layers=scan),
                               rules, a.batch, a.seq)
         for scan in (False, True)}
    print(f"{depth:>6} | {t[False][0]:>19.1f} {t[True][0]:>8.1f} | "
          f"{t[False][1]:>20.1f} {t[True][1]:>8.1f}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
