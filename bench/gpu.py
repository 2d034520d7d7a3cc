r"""One-shot accelerator check: correctness on the device, then timings.

  PYTHONPATH=. python bench/gpu.py --out /tmp/gpu_results [--quick]

Sections (each guarded, so one failure does not lose the others):
  1. env: jax version, devices.
  2. qmatmul correctness on the device: every recipe, forward and both
     gradients, "reference" impl on the device vs the same function on the
     host CPU (must agree to f32 rounding), and "fast"/"fp8" impls vs
     "reference" (bf16 rounding of dequantized operands).
  3. qmatmul fwd+bwd time per recipe and impl at a LLaMA-1.3B MLP shape,
     as a ratio to the bf16 recipe measured side by side.
  4. LLaMA train step (fp4jax.llama + fp4jax.optim) time per recipe at
     125m/350m/1.3b sizes, ratio to bf16, tokens/s and MFU.
Writes results.json and a log under --out; prints a table last.
Needs only jax, flax, optax, numpy (no ml_collections / tfds / grain).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

from fp4jax import qdot

RESULTS: dict = {}
H200_BF16_PEAK = 989e12   # dense bf16 FLOP/s, datasheet (SXM)


def _median_time(fn, *args, iters=10, warmup=2):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  ts = []
  for _ in range(iters):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    ts.append(time.perf_counter() - t0)
  return float(np.median(ts))


def _rel(a, b):
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def section(name):
  def deco(fn):
    def run(*a, **k):
      print(f"== {name}", flush=True)
      t0 = time.time()
      try:
        RESULTS[name] = fn(*a, **k)
      except Exception as e:  # keep going: one section must not lose others
        traceback.print_exc()
        RESULTS[name] = {"error": f"{type(e).__name__}: {e}"}
      print(f"   ({time.time() - t0:.1f} s)", flush=True)
    return run
  return deco


@section("env")
def env():
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()]}


def _vjp_all(x, w, g, recipe, key):
  y, pull = jax.vjp(lambda a, b: qdot.qmatmul(a, b, recipe, key), x, w)
  return (y,) + pull(g)


@section("qmatmul_correctness")
def qmatmul_correctness(m=256, k=512, n=384):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((m, k)).astype(np.float32)
  x[rng.random((m, k)) < 0.01] *= 20.   # outliers for OCC
  w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
  g = rng.standard_normal((m, n)).astype(np.float32)
  cpu = jax.devices("cpu")[0]
  dev = jax.devices()[0]
  out = {}
  for name in qdot.RECIPES:
    key = jax.random.key(1)
    ref_r = qdot.get_recipe(name, impl="reference")
    f = jax.jit(_vjp_all, static_argnums=3)
    with jax.default_device(cpu):
      host = [np.asarray(t) for t in f(x, w, g, ref_r, key)]
    row = {}
    for impl in ("reference", "fast", "fp8"):
      r = qdot.get_recipe(name, impl=impl)
      with jax.default_device(dev):
        got = [np.asarray(t) for t in f(x, w, g, r, key)]
      row[impl] = {t: _rel(a, b) for t, a, b in
                   zip(("y", "dx", "dw"), got, host)}
      row[impl]["finite"] = bool(all(np.isfinite(a).all() for a in got))
    out[name] = row
  return out


@section("qmatmul_speed")
def qmatmul_speed(m=8192, k=2048, n=5632, iters=20):
  kx, kw, kg = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(kx, (m, k), jnp.bfloat16)
  w = (jax.random.normal(kw, (k, n), jnp.float32) * 0.02).astype(jnp.bfloat16)
  g = jax.random.normal(kg, (m, n), jnp.bfloat16)
  key = jax.random.key(2)
  f = jax.jit(_vjp_all, static_argnums=3)
  out = {}
  base = _median_time(f, x, w, g, qdot.get_recipe("bf16"), key, iters=iters)
  flops = 3 * 2 * m * k * n
  out["bf16"] = {"ms": base * 1e3, "tflops": flops / base / 1e12}
  for name in qdot.RECIPES:
    if name == "bf16":
      continue
    for impl in ("fast", "fp8"):
      t = _median_time(f, x, w, g, qdot.get_recipe(name, impl=impl), key,
                       iters=iters)
      out[f"{name}/{impl}"] = {"ms": t * 1e3, "ratio": t / base}
  return out


def _train_step_fn(cfg, recipe_name, batch, seq):
  import optax
  from flax import nnx
  from fp4jax import llama, qconfig
  rules = qconfig.default_rules(recipe_name)
  model = llama.Llama(cfg, rules=rules, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  tx = optax.chain(optax.clip_by_global_norm(1.0),
                   optax.adamw(3e-4, 0.9, 0.95, 1e-8, weight_decay=0.1))
  opt_state = tx.init(params)

  def loss_fn(p, tokens, key):
    logits = nnx.merge(graphdef, p)(tokens[:, :-1], key=key)
    lp = jax.nn.log_softmax(logits.astype(jnp.float32))
    tgt = tokens[:, 1:]
    return -jnp.mean(jnp.take_along_axis(lp, tgt[..., None], -1))

  @jax.jit
  def step(p, o, tokens, key):
    loss, grads = jax.value_and_grad(loss_fn)(p, tokens, key)
    upd, o = tx.update(grads, o, p)
    return optax.apply_updates(p, upd), o, loss

  tokens = jax.random.randint(jax.random.key(3), (batch, seq + 1), 0,
                              cfg.vocab_size)
  return step, params, opt_state, tokens


@section("train_step")
def train_step_speed(sizes=("125m", "350m", "1.3b"), batch=8, seq=2048,
                     recipes=("bf16", "fp8", "fp4_paper", "fp4_code",
                              "nvfp4"), iters=5):
  from fp4jax import llama, sizes as size_table
  out = {}
  for size in sizes:
    kw = dict(size_table.SIZES[size])
    kw["max_seq_len"] = max(kw.get("max_seq_len", seq), seq)
    cfg = llama.LlamaConfig(**kw)
    n_params = size_table.param_count(cfg)
    flops_tok = 6 * n_params + 12 * cfg.n_layers * cfg.d_model * seq
    base = None
    for rec in recipes:
      step, p, o, tok = _train_step_fn(cfg, rec, batch, seq)
      key = jax.random.key(4)
      t0 = time.perf_counter()
      jax.block_until_ready(step(p, o, tok, key))
      compile_s = time.perf_counter() - t0
      t = _median_time(lambda: step(p, o, tok, key), iters=iters, warmup=1)
      base = t if rec == "bf16" else base
      toks = batch * seq / t
      out[f"{size}/{rec}"] = {
          "step_ms": t * 1e3, "ratio": t / base if base else None,
          "tokens_per_s": toks, "mfu": toks * flops_tok / H200_BF16_PEAK,
          "compile_s": compile_s}
      print(f"   {size} {rec}: {t*1e3:.1f} ms", flush=True)
      del step, p, o
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true",
                  help="small shapes (dry run on CPU)")
  a = ap.parse_args()
  os.makedirs(a.out, exist_ok=True)
  env()
  if a.quick:
    qmatmul_correctness(64, 128, 96)
    qmatmul_speed(256, 128, 256, iters=2)
    train_step_speed(sizes=("tiny",), batch=2, seq=32, iters=1,
                     recipes=("bf16", "fp4_paper"))
  else:
    qmatmul_correctness()
    qmatmul_speed()
    train_step_speed()
  with open(os.path.join(a.out, "results.json"), "w") as f:
    json.dump(RESULTS, f, indent=1)
  print(json.dumps(RESULTS, indent=1))
  return 0


if __name__ == "__main__":
  sys.exit(main())
