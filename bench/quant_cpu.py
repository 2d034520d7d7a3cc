r"""CPU cost of the quantized matmul per recipe, relative to bf16.

  PYTHONPATH=. python bench/quant_cpu.py [--m 4096 --k 512 --n 1536]
      [--reps 7] [--dtype bfloat16] [--recipes bf16,fp4_paper,...]

Times the jitted forward + backward of one GEMM, value_and_grad of
sum(qmatmul(x, w, recipe) * g) with respect to x and w, for each recipe.
Recipes are timed in rotation (one call each per round, `--reps` rounds after
a warmup) so that load from other processes hits them alike; the table shows
the median per recipe and its ratio to the bf16 recipe of the same run. Then
the OCC clamp alone (jitted `quant.occ_clamp` on the [M, K] activation, the
recipe's alpha) as a share of the fp4_paper forward + backward time.

Goals: fp4_paper <= 1.3x bf16, OCC <= 10% of fp4_paper.

Owns: this measurement only. Must not import ml_collections, tfds or grain
(needs only jax, numpy and fp4jax.qdot / fp4jax.quant).
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import qdot, quant

RECIPES = ("bf16", "fp8", "w4a4_direct", "w4a8", "w8a4", "fp4_paper",
           "fp4_code", "mxfp4", "nvfp4")
GOAL_FP4_RATIO = 1.3
GOAL_OCC_SHARE = 0.10


def make_step(recipe):
  """Jitted (x, w, g, key) -> (loss, (dx, dw)) for one recipe."""
  r = qdot.get_recipe(recipe)

  def loss(x, w, g, key):
    y = qdot.qmatmul(x, w, r, key=key if r.needs_key else None)
    return jnp.sum(y.astype(jnp.float32) * g)

  return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def time_call(fn, *args) -> float:
  t0 = time.perf_counter()
  jax.block_until_ready(fn(*args))
  return time.perf_counter() - t0


def run(m: int, k: int, n: int, reps: int, dtype, recipes) -> dict:
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_t(df=4, size=(m, k)), dtype)
  w = jnp.asarray(rng.standard_normal((k, n)) * 0.02, dtype)
  g = jnp.asarray(rng.standard_normal((m, n)), jnp.float32)
  key = jax.random.key(0)

  steps = {name: make_step(name) for name in recipes}
  alpha = qdot.get_recipe("fp4_paper").occ.alpha
  occ = jax.jit(lambda a: quant.occ_clamp(a, alpha))
  calls = dict(steps)
  args = {name: (x, w, g, key) for name in recipes}
  calls["occ_clamp"], args["occ_clamp"] = occ, (x,)

  for name, fn in calls.items():        # compile + one warm call each
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args[name]))
    compile_s = time.perf_counter() - t0
    time_call(fn, *args[name])
    print(f"  compiled {name:12s} {compile_s:6.1f} s", flush=True)

  times = {name: [] for name in calls}
  for _ in range(reps):
    for name, fn in calls.items():
      times[name].append(time_call(fn, *args[name]))
  return {name: statistics.median(t) for name, t in times.items()}


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--m", type=int, default=4096)
  ap.add_argument("--k", type=int, default=512)
  ap.add_argument("--n", type=int, default=1536)
  ap.add_argument("--reps", type=int, default=7)
  ap.add_argument("--dtype", default="bfloat16",
                  choices=("bfloat16", "float32"))
  ap.add_argument("--recipes", default=",".join(RECIPES))
  a = ap.parse_args()
  recipes = [r for r in a.recipes.split(",") if r]
  if "bf16" not in recipes:
    recipes.insert(0, "bf16")
  if "fp4_paper" not in recipes:
    recipes.append("fp4_paper")
  for r in recipes:
    qdot.get_recipe(r)                  # fail early on a bad name
  print(f"jax {jax.__version__} on {jax.devices()[0].platform}; "
        f"[{a.m},{a.k}] @ [{a.k},{a.n}] {a.dtype}, fwd+bwd, median of "
        f"{a.reps}", flush=True)
  med = run(a.m, a.k, a.n, a.reps, jnp.dtype(a.dtype), recipes)

  base = med["bf16"]
  print(f"\n{'recipe':14s} {'ms':>9s} {'x bf16':>8s}")
  for r in recipes:
    print(f"{r:14s} {1e3 * med[r]:9.2f} {med[r] / base:8.2f}")
  share = med["occ_clamp"] / med["fp4_paper"]
  print(f"{'occ_clamp':14s} {1e3 * med['occ_clamp']:9.2f} "
        f"{share:7.1%} of fp4_paper")
  ratio = med["fp4_paper"] / base
  print(f"\ngoal fp4_paper <= {GOAL_FP4_RATIO}x bf16: {ratio:.2f}x "
        f"({'met' if ratio <= GOAL_FP4_RATIO else 'NOT met'}); "
        f"goal OCC <= {GOAL_OCC_SHARE:.0%}: {share:.1%} "
        f"({'met' if share <= GOAL_OCC_SHARE else 'NOT met'})")


if __name__ == "__main__":
  main()
