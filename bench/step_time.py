r"""Time the jitted train step per quantization recipe, side by side.

  PYTHONPATH=. python bench/step_time.py                       # demo model
  PYTHONPATH=. python bench/step_time.py --size=125m --batch=8 --seq=1024 \
      --recipes=bf16,fp4_paper,mxfp4,nvfp4

Builds the model and optimizer through the fp4jax API (no ml_collections,
grain or tfds, so it runs on a bare GPU image), compiles one train step per
recipe, then times them in interleaved rounds (so machine load drifts hit
every recipe alike) and prints the median step time and its ratio to the
first recipe (bf16 by default; the goal for fp4_paper is <= 1.15x).

`--telemetry_every=N` also times each recipe's telemetry step (one probe
forward + backward, `fp4jax.telemetry`) in the same rounds and prints its
cost as a share of N train steps (goal: <= 5% at N = 50).
"""

import argparse
import dataclasses
import statistics
import sys
import time

import jax

from fp4jax import optim
from fp4jax import qconfig
from fp4jax import sharding
from fp4jax import sizes
from fp4jax import train_state
from fp4jax.data import synthetic


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--size", default="demo", help="key of fp4jax.sizes.SIZES")
  p.add_argument("--recipes", default="bf16,fp4_paper",
                 help="comma-separated recipes, each NAME or NAME:k=v;k=v "
                      "(get_recipe overrides, e.g. nvfp4_nvidia:rht_wgrad=0; "
                      "the run-level keys impl, accumulation, sparse_impl "
                      "set the GEMMs' qconfig.Execution, bf16_tail the "
                      "layer rules); ratios are vs the first")
  # Defaults are configs/demo.py's shapes.
  p.add_argument("--batch", type=int, default=8, help="global batch B")
  p.add_argument("--seq", type=int, default=64, help="sequence length T")
  p.add_argument("--vocab", type=int, default=512,
                 help="vocabulary (0 = the size table's)")
  p.add_argument("--compute_dtype", default="bfloat16")
  p.add_argument("--attention", default="xla", help="xla | cudnn (GPU)")
  p.add_argument("--steps", type=int, default=12, help="timed steps each")
  p.add_argument("--rounds", type=int, default=3,
                 help="interleaved rounds the timed steps are split into")
  p.add_argument("--telemetry_every", type=int, default=0,
                 help="also time the telemetry step; cost vs N steps")
  p.add_argument("--warmup", type=int, default=2,
                 help="untimed steps after compiling")
  return p.parse_args(argv)


def _recipe(spec: str) -> tuple[qconfig.Recipe, qconfig.Execution,
                                 float | None]:
  """NAME or NAME:k=v;k=v -> (the overridden recipe, how its GEMMs run,
  its bf16_tail or None for the recipe's own), the run-level and
  layer-level keys split off (qconfig.split_overrides)."""
  name, _, rest = spec.partition(":")
  recipe, run, layer = qconfig.typed_overrides(rest.split(";"))
  return qconfig.get_recipe(name, **recipe), run, layer.get("bf16_tail")


def main(argv=None) -> dict[str, float]:
  a = _args(argv)
  recipes = [r for r in a.recipes.split(",") if r]
  overrides = {"compute_dtype": a.compute_dtype, "attention": a.attention}
  if a.vocab:
    overrides["vocab_size"] = a.vocab
  model_cfg = sizes.get_config(a.size, **overrides)
  optim_cfg = optim.OptimConfig()
  mesh = sharding.make_mesh(-1, 1, 1)
  data = synthetic.SyntheticInput(
      vocab_size=model_cfg.vocab_size, seq_len=a.seq, global_batch=a.batch,
      seed=0)
  device = jax.devices()[0]
  print(f"{a.size}: {sizes.param_count(model_cfg):,} params, B={a.batch} "
        f"T={a.seq}, {jax.device_count()} x {device.device_kind}, "
        f"jax {jax.__version__}", flush=True)
  runs = {}
  for name in recipes:
    recipe, execution, tail = _recipe(name)
    execution.check(recipe)
    rules = qconfig.default_rules(recipe, model_cfg.n_layers, tail)
    t = train_state.make_trainer(
        dataclasses.replace(model_cfg, gemm=execution), rules, optim_cfg,
        num_steps=1000, mesh=mesh,
        global_batch=a.batch, seq_len=a.seq, seed=0,
        telemetry_on=a.telemetry_every > 0)
    state = t.init()
    batch = t.put_batch(next(data))
    for _ in range(a.warmup):
      state, m = t.train_step(state, batch)
    jax.block_until_ready(m)
    runs[name] = {"trainer": t, "state": state, "batch": batch, "times": [],
                  "tele": []}
    print(f"  {name}: compiled in {t.compile_seconds:.1f} s", flush=True)
  per_round = max(a.steps // a.rounds, 1)
  for _ in range(a.rounds):
    for run in runs.values():
      for _ in range(per_round):
        t0 = time.perf_counter()
        run["state"], m = run["trainer"].train_step(run["state"],
                                                     run["batch"])
        jax.block_until_ready(m)
        run["times"].append(time.perf_counter() - t0)
      if a.telemetry_every:
        t0 = time.perf_counter()
        jax.device_get(run["trainer"].telemetry_step(
            run["state"].params, run["state"].rng, run["batch"]))
        run["tele"].append(time.perf_counter() - t0)
  medians = {n: statistics.median(r["times"]) for n, r in runs.items()}
  base = medians[recipes[0]]
  print(f"{'recipe':<40}{'median ms/step':>16}{'ratio':>8}")
  for name, sec in medians.items():
    print(f"{name:<40}{1e3 * sec:>16.1f}{sec / base:>7.2f}x")
  if a.telemetry_every:
    print(f"{'recipe':<14}{'telemetry ms':>16}{'x step':>8}"
          f"{'cost @' + str(a.telemetry_every):>12}")
    for name, r in runs.items():
      if not r["trainer"].telemetry_step or not r["tele"]:
        continue
      tel = statistics.median(r["tele"])
      print(f"{name:<14}{1e3 * tel:>16.1f}{tel / medians[name]:>7.2f}x"
            f"{100 * tel / (a.telemetry_every * medians[name]):>11.2f}%")
  return medians


if __name__ == "__main__":
  main(sys.argv[1:])
