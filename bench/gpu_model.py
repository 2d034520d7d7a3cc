r"""A GPU step-time model from the compiled XLA:GPU program, on a CPU machine.

  pip install --no-deps --target .gpu-plugin \
      jax-cuda13-plugin==$(python -c 'import jax; print(jax.__version__)') \
      jax-cuda13-pjrt==$(python -c 'import jax; print(jax.__version__)')
  PYTHONPATH=. python bench/gpu_model.py --size=1.3b --recipes=bf16,fp4_paper

Compiles the real train step (train_state.lower_train_step: model,
quantized GEMMs, loss, AdamW) for one GPU of the target (--gpu: a
GpuTargetConfigProto text, --target_config or --target_dir) with the real XLA:GPU
compiler and no device: fusion, the cuBLASLt FP8 rewrite, Triton GEMMs.
Nothing runs and nothing is autotuned. Then it reads the compiled program
(fp4jax.hlo_cost) and prints per recipe: GEMM FLOPs by operand class, the
bytes every other kernel moves, activation-sized passes per block, kernel
launches, and a roofline time, each labelled an estimate; and two floors
from the same programs: the recipe with quantization free (its GEMMs, bf16's
other kernels) and any recipe with every projection GEMM on FP8 tensor cores.

The program is compiled at 1 and 2 layers; a layer's cost is the
difference, and the full depth is extrapolated (the layers are identical).
The attention core is costed apart: the program is compiled with XLA
attention (cuDNN's fused kernel needs the cuDNN library and a driver to
compile), whose kernels are dropped, and every recipe is charged the same
analytic flash-attention time (causal FLOPs at --attention_efficiency of
the BF16 peak). Calibration: --calibrate (with --size=125m --gpu=h200)
compares the estimates with the one device measurement (bench/RESULTS.md,
H200, 125m, batch 8 x 2048: bf16 63.6 ms, fp4_paper 139.9 ms with that
day's code). Ratios between recipes are what the model is for; absolute
times are a roofline's (launch gaps, poor small-GEMM tiles and overlap
are not modelled).

Owns: this estimate only.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
TARGETS = {"h200": "h200.txtpb", "b200": "b200.txtpb"}
# The one device measurement (bench/RESULTS.md, 2026-11-28, H200).
MEASURED_125M = {"bf16": 63.6e-3, "fp4_paper": 139.9e-3}
# The roofline's factors (stated, not fitted): GEMMs at 60% of peak,
# other kernels at 70% of HBM bandwidth, 4 us per launch.
GEMM_EFFICIENCY = 0.6
MEMORY_EFFICIENCY = 0.7


def _args(argv):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--size", default="125m")
  p.add_argument("--recipes", default="bf16,fp4_paper")
  p.add_argument("--gpu", default="h200", choices=sorted(TARGETS))
  p.add_argument("--target_config", default="",
                 help="GpuTargetConfigProto text; default: the --gpu one in "
                 "--target_dir")
  p.add_argument("--target_dir", default=os.path.join(
      ROOT, os.pardir, "shared", "docs", "gpu"))
  p.add_argument("--plugin_dir", default=os.environ.get(
      "FP4JAX_GPU_PLUGIN", os.path.join(ROOT, ".gpu-plugin")))
  p.add_argument("--batch", type=int, default=8, help="rows per GPU")
  p.add_argument("--seq", type=int, default=2048)
  p.add_argument("--set", default="",
                 help="overrides for every quantized recipe, e.g. "
                 "impl=xla,sparse_impl=ell,occ_axis=-1: recipe keys "
                 "(qconfig.get_recipe), run-level keys impl, accumulation, "
                 "sparse_impl (qconfig.Execution) and bf16_tail (the layer "
                 "rules' share of the last blocks kept BF16)")
  p.add_argument("--moments", default="paper")
  p.add_argument("--attention_efficiency", type=float, default=0.5)
  p.add_argument("--calibrate", action="store_true")
  p.add_argument("--breakdown", type=int, default=0,
                 help="also print a block's N costliest groups of non-GEMM "
                      "kernels (by jax op name), in activation passes")
  p.add_argument("--out", default="")
  return p.parse_args(argv)


def _setup(a):
  """jax with the CUDA plugin on the path; the target's one device."""
  if not os.path.isdir(a.plugin_dir):
    sys.exit(f"error: no CUDA plugin in --plugin_dir={a.plugin_dir!r}; "
             f"install it as the module docstring shows")
  sys.path.insert(0, a.plugin_dir)
  os.environ.setdefault("JAX_SKIP_CUDA_CONSTRAINTS_CHECK", "1")
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  # The GPU CLI's PRNG (fp4jax.main.resolve_prng_impl): threefry's init
  # takes minutes to compile for a GPU.
  jax.config.update("jax_default_prng_impl", "rbg")
  path = a.target_config or os.path.join(a.target_dir, TARGETS[a.gpu])
  with open(path, encoding="utf-8") as f:
    config = f.read()
  topo = topologies.get_topology_desc(
      platform="cuda", topology_name="", target_config=config,
      topology="1x1x1")
  return jax, list(topo.devices)


def _overrides(a):
  """--set as (recipe overrides, qconfig.Execution, layer-rule keys)."""
  from fp4jax import qconfig  # pylint: disable=g-import-not-at-top
  return qconfig.typed_overrides(a.set.split(","))


def _bf16_tail(a, recipe: str) -> float:
  """The share of the last blocks kept BF16: --set bf16_tail=, else the
  named recipe's own (qconfig.BF16_TAILS)."""
  from fp4jax import qconfig  # pylint: disable=g-import-not-at-top
  share = _overrides(a)[2].get("bf16_tail")
  if share is None:
    return qconfig.default_bf16_tail(recipe)
  return qconfig.check_share(share, "--set bf16_tail")


def _compile(jax, devices, a, recipe: str, layers: int) -> str:
  from fp4jax import llama, optim, qconfig, sharding, sizes, train_state  # pylint: disable=g-import-not-at-top
  recipe_over, run, _ = _overrides(a)
  cfg = dataclasses.replace(sizes.get_config(a.size), n_layers=layers,
                            vocab_size=32000, attention="xla",
                            max_seq_len=max(a.seq, 2048), gemm=run)
  del llama
  # The BF16 tail (nvfp4_nvidia) is added per layer by model_recipe.
  rules = qconfig.default_rules(recipe, bf16_tail=0.0)
  if recipe_over:
    rules = [(p, qconfig.get_recipe(r, **recipe_over) if r else r)
             for p, r in rules]
  for _, r in rules:
    run.check(r)
  mesh = sharding.make_mesh(devices=devices)
  lowered = train_state.lower_train_step(
      cfg, rules, optim.OptimConfig(moments=a.moments), num_steps=1000,
      mesh=mesh, global_batch=a.batch, seq_len=a.seq)
  return lowered.compile().as_text()


def _flash_seconds(cfg, a, gpu) -> float:
  """Causal flash attention, forward + backward (2.5x), one layer."""
  fwd = 4 * a.batch * a.seq * a.seq * cfg.n_heads * cfg.head_dim / 2
  return 3.5 * fwd / (gpu.flops["bf16"] * a.attention_efficiency)


def model_recipe(jax, devices, a, recipe: str, gpu, model,
                 bf16_layer: dict | None = None) -> dict:
  """The estimate of one recipe at a.size's depth (a BF16 tail's layers
  cost `bf16_layer`, bf16's per-layer figures)."""
  from fp4jax import hlo_cost, qconfig, sizes  # pylint: disable=g-import-not-at-top
  cfg = sizes.get_config(a.size)
  r = qconfig.get_recipe(recipe)
  share = _bf16_tail(a, recipe) if r.quantizes else 0.0
  tail = len(qconfig.bf16_tail_blocks(cfg.n_layers, share)) if share else 0
  if tail and bf16_layer is None:
    raise ValueError(f"{recipe}'s BF16 tail needs bf16 in --recipes")
  sums, groups = [], []
  t0 = time.perf_counter()
  for layers in (1, 2):
    ks = [k for k in hlo_cost.kernels(_compile(jax, devices, a, recipe,
                                               layers))
          if k.kind != "attention"]
    sums.append(hlo_cost.summarize(ks, gpu, model))
    groups.append(_groups(ks))
  keys = set(sums[0]) | set(sums[1])
  per_layer = {k: sums[1].get(k, 0) - sums[0].get(k, 0) for k in keys}
  keys |= set(bf16_layer or ())
  total = {k: sums[0].get(k, 0) + (cfg.n_layers - 1 - tail) * per_layer.get(
      k, 0) + tail * (bf16_layer or {}).get(k, 0) for k in keys}
  flash = _flash_seconds(cfg, a, gpu)
  total["attention_seconds"] = cfg.n_layers * flash
  total["seconds"] += total["attention_seconds"]
  act = a.batch * a.seq * cfg.d_model * 2      # one bf16 activation
  block = {}   # the second layer's groups: 2-layer minus 1-layer program
  for k, (b2, n2) in groups[1].items():
    b1, n1 = groups[0].get(k, (0.0, 0))
    if b2 > b1:
      block[k] = ((b2 - b1) / act, n2 - n1)
  return {"recipe": recipe, "per_layer": per_layer, "total": total,
          "layers": cfg.n_layers,
          "passes_per_block": per_layer.get("other_bytes", 0) / act,
          "block_groups": block,
          "compile_seconds": time.perf_counter() - t0}


def _groups(ks) -> dict[str, tuple[float, int]]:
  """Non-GEMM kernels by their jax op name, layer numbers and the outer
  transforms dropped: {name: (bytes, launches)}."""
  out: dict[str, tuple[float, int]] = {}
  for k in ks:
    if k.kind != "other":
      continue
    name = re.sub(r"\d+", "#", "/".join(k.op_name.split("/")[-3:]))
    b, n = out.get(name, (0.0, 0))
    out[name] = (b + k.bytes * k.count, n + k.count)
  return out


def floors(r: dict, base: dict) -> dict[str, float]:
  """What bounds a recipe's step, from the same estimates (seconds):

  quantization_free: its GEMMs as compiled, with bf16's other kernels (what
    the step would cost if quantizing, OCC and the scale passes were free;
    the rest of its gap to bf16 is its GEMM mix);
  fp8_floor: bf16's step with every projection GEMM at the FP8 rate and
    nothing else changed, the floor of any FP4 recipe simulated on FP8
    tensor cores (projection GEMMs are the layers' GEMMs; the LM head and
    attention stay BF16).
  """
  t, b = r["total"], base["total"]
  proj_bf16 = base["layers"] * base["per_layer"].get("gemm_seconds", 0)
  return {
      "quantization_free": t["seconds"] - t.get("other_seconds", 0)
                           + b.get("other_seconds", 0),
      "fp8_floor": b["seconds"] - proj_bf16 / 2,
  }


def _report(r: dict, base: dict | None, gpu) -> None:
  t, p = r["total"], r["per_layer"]
  flops = ", ".join(f"{k[11:]} {v / 1e12:.1f}T" for k, v in sorted(t.items())
                    if k.startswith("gemm_flops_"))
  print(f"{r['recipe']} ({gpu.name}, estimate): step "
        f"{t['seconds'] * 1e3:.1f} ms = GEMMs {t.get('gemm_seconds', 0) * 1e3:.1f}"
        f" + other kernels {t.get('other_seconds', 0) * 1e3:.1f} + attention "
        f"{t['attention_seconds'] * 1e3:.1f} ms; GEMM FLOPs {flops}; other "
        f"kernels move {t.get('other_bytes', 0) / 1e9:.1f} GB; per block "
        f"{r['passes_per_block']:.1f} activation-sized passes, "
        f"{p['launches']:.0f} launches")
  if base is not None:
    b = base["total"]["seconds"]
    f = floors(r, base)
    print(f"  {r['recipe']}: {t['seconds'] / b:.2f}x bf16 step time "
          f"({gpu.name}, estimate); with quantization free "
          f"{f['quantization_free'] / b:.2f}x; any recipe with every "
          f"projection GEMM FP8: >= {f['fp8_floor'] / b:.2f}x")


def main(argv=None) -> dict:
  a = _args(argv)
  jax, devices = _setup(a)
  from fp4jax import hlo_cost  # pylint: disable=g-import-not-at-top
  gpu = hlo_cost.GPUS[a.gpu]
  model = hlo_cost.Model(GEMM_EFFICIENCY, MEMORY_EFFICIENCY)
  recipes = a.recipes.split(",")
  if "bf16" in recipes:
    recipes = ["bf16"] + [r for r in recipes if r != "bf16"]
  results = {}
  for recipe in recipes:
    results[recipe] = model_recipe(
        jax, devices, a, recipe, gpu, model,
        results["bf16"]["per_layer"] if "bf16" in results else None)
    _report(results[recipe], results.get("bf16"), gpu)
    if a.breakdown:
      top = sorted(results[recipe]["block_groups"].items(),
                   key=lambda kv: -kv[1][0])[:a.breakdown]
      print("  a block's costliest non-GEMM kernels (estimate; "
            "activation passes, launches, jax op name):")
      for name, (passes, n) in top:
        print(f"    {passes:7.2f} {n:4d}  {name}")
  if a.out:
    with open(a.out, "w", encoding="utf-8") as f:
      json.dump(results, f, indent=1)
  if a.calibrate:
    for recipe, seconds in MEASURED_125M.items():
      if recipe in results and a.size == "125m" and a.gpu == "h200":
        est = results[recipe]["total"]["seconds"]
        print(f"calibration {recipe}: estimate {est * 1e3:.1f} ms vs "
              f"{seconds * 1e3:.1f} ms measured (H200, 125m, batch 8 x 2048,"
              f" that day's code): {est / seconds:.2f}x")
  last = [r for r in recipes if r != "bf16"]
  if "bf16" in results and last:
    ratio = (results[last[-1]]["total"]["seconds"] /
             results["bf16"]["total"]["seconds"])
    print(f"{last[-1]}: {ratio:.2f}x bf16 step time ({gpu.name}, estimate)")
  return results


if __name__ == "__main__":
  main()
