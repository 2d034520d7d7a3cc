r"""One-shot accelerator check: correctness on the device, then timings.

  PYTHONPATH=. python bench/gpu.py --out /tmp/gpu_results [--quick]

Sections (each guarded, so one failure does not lose the others):
  1. env: jax version, devices.
  2. qmatmul correctness on the device: every recipe, forward and both
     gradients, "reference" impl on the device vs the same function on the
     host CPU (must agree to f32 rounding), and the "fast" / "fp8" / "xla"
     / "pallas" impls vs it (bf16 rounding of dequantized operands).
  2b. kernels: the Pallas fused OCC + quantize row kernel vs its jnp
     reference on a large input (bit equality), both timed, with a copy's
     bandwidth as the yardstick; the FP8 GEMM count of an fp4_paper
     fwd+bwd under impl "xla" (compiled HLO on GPU: cuBLASLt f8 calls).
  2c. gemm: BF16 GEMM vs the grid (FP8) GEMM TFLOP/s at 4096^3 and 8192^3
     and the dgrad / wgrad layouts, fp32 and fast accumulation.
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
OUT_DIR = None
DEADLINE = [float("inf")]   # wall-clock time after which timings are skipped


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


def _save_partial(name, value):
  RESULTS[name] = value
  if OUT_DIR:
    with open(os.path.join(OUT_DIR, "results.json"), "w") as f:
      json.dump(RESULTS, f, indent=1)


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
      if OUT_DIR:   # partial results survive a timeout
        with open(os.path.join(OUT_DIR, "results.json"), "w") as f:
          json.dump(RESULTS, f, indent=1)
    return run
  return deco


@section("env")
def env():
  return {"jax": jax.__version__, "backend": jax.default_backend(),
          "devices": [d.device_kind for d in jax.devices()]}


def _vjp_all(x, w, g, recipe, execution, key):
  """y, dx, dw of qmatmul; jit it with static_argnums=(3, 4)."""
  y, pull = jax.vjp(lambda a, b: qdot.qmatmul(a, b, recipe, key,
                                              execution=execution), x, w)
  return (y,) + pull(g)


IMPLS = ("reference", "fast", "fp8", "xla", "pallas")
QUICK_RECIPES = ("fp4_paper", "nvfp4_nvidia", "mxfp4")


@section("qmatmul_correctness")
def qmatmul_correctness(m=256, k=512, n=384, recipes=None):
  rng = np.random.default_rng(0)
  x = rng.standard_normal((m, k)).astype(np.float32)
  x[rng.random((m, k)) < 0.01] *= 20.   # outliers for OCC
  w = (rng.standard_normal((k, n)) * 0.05).astype(np.float32)
  g = rng.standard_normal((m, n)).astype(np.float32)
  cpu = jax.devices("cpu")[0]
  dev = jax.devices()[0]
  out = {}
  for name in recipes or qdot.RECIPES:
    key = jax.random.key(1)
    r = qdot.get_recipe(name)
    f = jax.jit(_vjp_all, static_argnums=(3, 4))
    with jax.default_device(cpu):
      host = [np.asarray(t) for t in f(
          x, w, g, r, qdot.Execution(impl="reference"), key)]
    row = {}
    for impl in IMPLS:
      with jax.default_device(dev):
        got = [np.asarray(t) for t in f(x, w, g, r,
                                         qdot.Execution(impl=impl), key)]
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
  f = jax.jit(_vjp_all, static_argnums=(3, 4))
  out = {}
  base = _median_time(f, x, w, g, qdot.get_recipe("bf16"), qdot.Execution(),
                      key, iters=iters)
  flops = 3 * 2 * m * k * n
  out["bf16"] = {"ms": base * 1e3, "tflops": flops / base / 1e12}
  for name in qdot.RECIPES:
    if name == "bf16":
      continue
    for impl in ("fast", "fp8", "xla", "pallas"):
      t = _median_time(f, x, w, g, qdot.get_recipe(name),
                       qdot.Execution(impl=impl), key, iters=iters)
      out[f"{name}/{impl}"] = {"ms": t * 1e3, "ratio": t / base}
  return out


@section("kernels")
def kernels(m=8192, k=2048, iters=10):
  from fp4jax.kernels import row_quant   # pylint: disable=g-import-not-at-top
  interpret = jax.default_backend() != "gpu"
  rng = np.random.default_rng(3)
  x = rng.standard_normal((m, k)).astype(np.float32)
  x[:, rng.choice(k, 8, replace=False)] *= 30.
  x = jnp.asarray(x, jnp.bfloat16)
  kern = jax.jit(lambda x: row_quant.occ_quantize(x, 0.99,
                                                  interpret=interpret))
  ref = jax.jit(lambda x: row_quant.occ_quantize_reference(x, 0.99))
  got, want = kern(x), ref(x)
  same = {f: bool(np.array_equal(np.asarray(getattr(got, f), np.float32),
                                 np.asarray(getattr(want, f), np.float32)))
          for f in ("values", "scale", "residual")}
  copy = jax.jit(lambda x: x + jnp.bfloat16(0))
  t_copy = _median_time(copy, x, iters=iters)
  t_k = _median_time(kern, x, iters=iters)
  t_r = _median_time(ref, x, iters=iters)
  # Bytes each must move at least: read x (2 B), write codes (1 B), the
  # residual (2 B) and the row scales.
  moved = x.size * 5 + m * 4
  out = {"bit_equal": same, "copy_gbs": 2 * x.nbytes / t_copy / 1e9,
         "kernel_ms": t_k * 1e3, "reference_ms": t_r * 1e3,
         "kernel_gbs": moved / t_k / 1e9,
         "kernel_vs_copy_bw": (moved / t_k) / (2 * x.nbytes / t_copy),
         "interpret": interpret}
  out["compensation"] = _compensation_speed(m, k, iters)
  # FP8 GEMMs in the fwd+bwd of fp4_paper (hw_faithful) under impl xla.
  xs = jnp.asarray(rng.standard_normal((256, 512)), jnp.float32)
  ws = jnp.asarray(rng.standard_normal((512, 384)) * 0.05, jnp.float32)
  gs = jnp.asarray(rng.standard_normal((256, 384)), jnp.float32)
  r = qdot.get_recipe("fp4_paper", hw_faithful=True)
  f = jax.jit(_vjp_all, static_argnums=(3, 4))
  lowered = f.lower(xs, ws, gs, r, qdot.Execution(impl="xla"), None)
  text = lowered.as_text()
  out["fp8_dots_lowered"] = sum(1 for l in text.splitlines()
                                if "dot_general" in l and "f8E" in l)
  if jax.default_backend() == "gpu":
    hlo = lowered.compile().as_text()
    out["cublaslt_f8_calls"] = hlo.count("__cublas$lt$matmul$f8")
  return out


def _compensation_speed(m, k, iters):
  """fp4_paper's fwd + bwd at [m, k] x [k, k] with OCC's compensation as
  dense GEMMs (sparse_impl "gemm") vs ELL gathers ("ell"): time and the
  difference of their outputs (the same math up to summation order)."""
  rng = np.random.default_rng(4)
  x = jnp.asarray(rng.standard_t(3, (m, k)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((k, k)) * 0.05, jnp.float32)
  g = jnp.asarray(rng.standard_normal((m, k)), jnp.float32)
  f = jax.jit(_vjp_all, static_argnums=(3, 4))
  outs, times = {}, {}
  r = qdot.get_recipe("fp4_paper")
  for impl in ("gemm", "ell"):
    run = qdot.Execution(sparse_impl=impl)
    outs[impl] = [np.asarray(t) for t in f(x, w, g, r, run, None)]
    times[impl] = _median_time(f, x, w, g, r, run, None, iters=iters)
  return {"gemm_ms": times["gemm"] * 1e3, "ell_ms": times["ell"] * 1e3,
          "ell_vs_gemm": times["ell"] / times["gemm"],
          "max_rel_diff": max(_rel(a, b) for a, b in
                              zip(outs["ell"], outs["gemm"]))}


@section("gemm")
def gemm_speed(sizes_=(4096, 8192), iters=10):
  from fp4jax import gemm   # pylint: disable=g-import-not-at-top
  out = {}
  nn, nt, tn = ((((1,), (0,)), ((), ())), (((1,), (1,)), ((), ())),
                (((0,), (0,)), ((), ())))
  for s_ in sizes_:
    if time.time() > DEADLINE[0]:
      out[str(s_)] = "skipped: time budget"
      continue
    key = jax.random.key(s_)
    a = jax.random.normal(key, (s_, s_), jnp.float32)
    bf = jax.jit(lambda a, b, d: jax.lax.dot_general(
        a.astype(jnp.bfloat16), b.astype(jnp.bfloat16), d,
        preferred_element_type=jnp.float32), static_argnums=2)
    fl = 2 * s_ ** 3
    for lname, d in (("fwd", nn), ("dgrad", nt), ("wgrad", tn)):
      t_bf = _median_time(bf, a, a, d, iters=iters)
      row = {"bf16_tflops": fl / t_bf / 1e12}
      # Grid values (integers in E4M3's range) with scales on the free dims:
      # the form every projection GEMM of impl "xla" takes.
      v = jnp.clip(jnp.round(a), -6, 6)
      sa = jnp.ones((s_, 1)) if lname != "wgrad" else jnp.ones((1, s_))
      # The gradient is E5M2, the other operand E4M3 (dgrad: G @ W^T,
      # wgrad: X^T @ G): Hopper has no E5M2 x E5M2 FP8 GEMM.
      fa = "e5m2" if lname == "dgrad" else "e4m3"
      fb = "e5m2" if lname == "wgrad" else "e4m3"
      for acc in ("fp32", "fast"):
        f8 = jax.jit(lambda x, y, sx, acc=acc, d=d, fa=fa, fb=fb: gemm.scaled_dot(
            gemm.Operand(x, sx, fa), gemm.Operand(y, None, fb), d,
            gemm.IMPLS["xla"], backward=True, accumulation=acc))
        t = _median_time(f8, v, v, sa, iters=iters)
        row[f"fp8_{acc}_tflops"] = fl / t / 1e12
        row[f"fp8_{acc}_x_bf16"] = t_bf / t
      out[f"{s_}/{lname}"] = row
  return out


def _make_trainer(size, recipe, batch, seq, attention, moments):
  from fp4jax import llama, optim, qconfig, sharding, sizes, train_state
  kw = dict(sizes.SIZES[size])
  kw["max_seq_len"] = max(kw["max_seq_len"], seq)
  cfg = llama.LlamaConfig(**kw, attention=attention)
  tr = train_state.make_trainer(
      cfg, qconfig.default_rules(recipe, cfg.n_layers),
      optim.OptimConfig(moments=moments),
      num_steps=1000, mesh=sharding.make_mesh(data=-1), global_batch=batch,
      seq_len=seq, seed=0)
  rng = np.random.default_rng(0)
  toks = rng.integers(0, cfg.vocab_size, (batch, seq + 1), dtype=np.int32)
  local = {"inputs": toks[:, :-1], "targets": toks[:, 1:],
           "mask": np.ones((batch, seq), np.float32),
           "segment_ids": np.ones((batch, seq), np.int32)}
  return cfg, tr, tr.put_batch(local)


# (size, recipe, per-device batch): the headline pairs first, extras after,
# so a time budget cuts the least important ones.
TRAIN_RUNS = (("125m", "bf16", 8), ("125m", "fp4_paper", 8),
              ("1.3b", "bf16", 4), ("1.3b", "fp4_paper", 4),
              ("125m", "fp8", 8), ("125m", "nvfp4", 8),
              ("125m", "fp4_code", 8), ("1.3b", "fp8", 4))


@section("train_step")
def train_step_speed(runs=TRAIN_RUNS, seq=2048, iters=5, moments="paper"):
  from fp4jax import flops, sizes
  out = {}
  attention = "cudnn" if jax.default_backend() == "gpu" else "xla"
  base = {}
  for size, rec, batch in runs:
    name = f"{size}/{rec}"
    if time.time() > DEADLINE[0]:
      out[name] = "skipped: time budget"
      continue
    try:
      cfg, tr, b = _make_trainer(size, rec, batch, seq, attention, moments)
    except Exception as e:   # cudnn attention unavailable: fall back
      print(f"   {name}: {type(e).__name__}: {str(e)[:200]}; attention=xla")
      attention = "xla"
      cfg, tr, b = _make_trainer(size, rec, batch, seq, attention, moments)
    state = tr.init()
    state, m = tr.train_step(state, b)       # warm up
    jax.block_until_ready(m["loss"])
    t0 = time.perf_counter()
    for _ in range(iters):
      state, m = tr.train_step(state, b)
    loss = float(m["loss"])
    t = (time.perf_counter() - t0) / iters
    if rec == "bf16":
      base[size] = t
    toks = batch * seq / t
    n_params = sizes.param_count(cfg)
    out[name] = {
        "step_ms": t * 1e3, "ratio_to_bf16": t / base[size] if size in base
        else None, "tokens_per_s": toks, "batch": batch, "seq": seq,
        "mfu": flops.mfu(toks, flops.flops_per_token(cfg, seq),
                         jax.device_count(), jax.devices()[0].device_kind),
        "compile_s": tr.compile_seconds, "loss": loss,
        "attention": attention, "params": n_params}
    print(f"   {name}: {t*1e3:.1f} ms/step, compile {tr.compile_seconds:.0f}"
          f" s, loss {loss:.3f}", flush=True)
    _save_partial("train_step", out)
    del state, tr, b
  return out


def main():
  ap = argparse.ArgumentParser()
  ap.add_argument("--out", required=True)
  ap.add_argument("--quick", action="store_true",
                  help="small shapes (dry run on CPU)")
  ap.add_argument("--budget_s", type=float, default=420.,
                  help="start no new train-step timing after this many s")
  ap.add_argument("--sections", default="corr,kernels,gemm,speed,train",
                  help="comma list of corr, kernels, gemm, speed, train "
                       "(--quick: corr, kernels, gemm at toy sizes; add "
                       "speed / train for those too)")
  ap.add_argument("--train_runs", default="",
                  help="size/recipe/batch,... (default: TRAIN_RUNS)")
  ap.add_argument("--prng", default="rbg",
                  help="default PRNG impl; threefry init compiled in >3 min "
                       "for 125m on an H200, rbg does not")
  a = ap.parse_args()
  jax.config.update("jax_default_prng_impl", a.prng)
  sections = set(a.sections.split(","))
  runs = TRAIN_RUNS
  if a.train_runs:
    runs = tuple((r.split("/")[0], r.split("/")[1], int(r.split("/")[2]))
                 for r in a.train_runs.split(","))
  os.makedirs(a.out, exist_ok=True)
  global OUT_DIR
  OUT_DIR = a.out
  DEADLINE[0] = time.time() + a.budget_s
  env()
  if a.quick:
    qmatmul_correctness(64, 128, 96, recipes=QUICK_RECIPES)
    kernels(64, 256, iters=1)
    gemm_speed(sizes_=(64,), iters=1)
    if "speed" in sections:
      qmatmul_speed(256, 128, 256, iters=2)
    if "train" in sections:
      train_step_speed(runs=(("tiny", "bf16", 2), ("tiny", "fp4_paper", 2)),
                       seq=32, iters=1)
  else:
    if "corr" in sections:
      qmatmul_correctness()
    if "kernels" in sections:
      kernels()
    if "gemm" in sections:
      gemm_speed()
    if "speed" in sections:
      qmatmul_speed()
    if "train" in sections:
      train_step_speed(runs=runs)
  summarize(RESULTS)
  return 0


def summarize(res):
  """A short table of the headline numbers (the full data is results.json)."""
  print("\n#### summary", json.dumps(res.get("env")))
  corr = res.get("qmatmul_correctness", {})
  if "error" in corr:
    print("correctness ERROR", corr["error"])
  for name, row in corr.items():
    if isinstance(row, dict) and "reference" in row:
      cells = " ".join(f"{impl}:y{v['y']:.1e}/dx{v['dx']:.1e}/dw{v['dw']:.1e}"
                       f"{'' if v['finite'] else ' NONFINITE'}"
                       for impl, v in row.items())
      print(f"corr {name:12s} {cells}")
  for sec in ("kernels", "gemm", "qmatmul_speed", "train_step"):
    for name, v in res.get(sec, {}).items():
      if isinstance(v, dict):
        print(f"{sec} {name:22s} " + " ".join(
            f"{k}={x:.4g}" if isinstance(x, float) else f"{k}={x}"
            for k, x in v.items()))
      else:
        print(f"{sec} {name:22s} {v}")


if __name__ == "__main__":
  sys.exit(main())
