"""The train step compiled deviceless by the real XLA:GPU compiler for an
H200 (bench/gpu_model.py's path): what cuBLASLt and the other kernels run.

Needs the CUDA plugin wheels (bench/gpu_model.py's docstring shows how to
install them; FP4JAX_GPU_PLUGIN or ./.gpu-plugin) and the target configs
(../shared/docs/gpu, or FP4JAX_GPU_TARGET_DIR); skipped without them. The
StableHLO-level checks that need neither are in backend_test.py. Each
compile runs in a subprocess: the plugin must be on the path before JAX
starts its backends.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PLUGIN = os.environ.get("FP4JAX_GPU_PLUGIN", os.path.join(ROOT, ".gpu-plugin"))
TARGETS = os.environ.get("FP4JAX_GPU_TARGET_DIR", os.path.join(
    ROOT, os.pardir, "shared", "docs", "gpu"))

pytestmark = pytest.mark.skipif(
    not (os.path.isdir(PLUGIN)
         and os.path.isfile(os.path.join(TARGETS, "h200.txtpb"))),
    reason="no CUDA plugin wheels / GPU target config (see gpu_model.py)")

# Compiles the 1-layer tiny train step for one H200 and prints, as JSON,
# every GEMM kernel as [rate class, FLOPs, writes bf16] and whether any
# sort is left. (XLA may merge GEMMs that share an operand, e.g. q, k and
# v's dgrads, so kernels are counted by FLOPs, not one per projection.)
_SCRIPT = r"""
import json, re, sys
sys.path.insert(0, sys.argv[1])
from bench import gpu_model
a = gpu_model._args(["--size=tiny", "--batch=8", "--seq=512",
                     "--plugin_dir=" + sys.argv[2],
                     "--target_dir=" + sys.argv[3], "--set=" + sys.argv[5]])
jax, devices = gpu_model._setup(a)
from fp4jax import hlo_cost
text = gpu_model._compile(jax, devices, a, sys.argv[4], 1)
bf16_out = set(re.findall(r"%([\w.\-]+) = \(bf16\[", text))
gemms = [[k.gemm_class(), k.count * k.flops, k.name in bf16_out]
         for k in hlo_cost.kernels(text) if k.kind == "gemm"]
print(json.dumps({"gemms": gemms,
                  "sort": bool(re.search(r"\bsort\(", text))}))
"""
# The tiny model's projections (sizes "tiny": d 64, kv 2 x 16, d_ff 128)
# over 8 x 512 tokens (enough that XLA splits no GEMM along K into f32
# partial products), forward + dgrad + wgrad; gpu_model's vocab is 32000.
_TOKENS = 8 * 512
_PROJ_FLOPS = 3 * 2 * _TOKENS * (64 * 64 + 2 * 64 * 32 + 64 * 64
                                 + 2 * 64 * 128 + 128 * 64)
_HEAD_FLOPS = 3 * 2 * _TOKENS * 64 * 32000


def _compiled(recipe: str, fields: str = "") -> dict:
  out = subprocess.run(
      [sys.executable, "-c", _SCRIPT, ROOT, PLUGIN, TARGETS, recipe, fields],
      capture_output=True, text=True, timeout=900, check=False,
      env=dict(os.environ, JAX_PLATFORMS=""))
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def _flops(c: dict, cls: str, bf16_out: bool | None = None) -> float:
  return sum(f for k, f, b in c["gemms"]
             if k == cls and (bf16_out is None or b == bf16_out))


def test_fp8_recipe_runs_all_three_projection_gemms_on_fp8_tensor_cores():
  c = _compiled("fp8", "impl=xla")
  # Every projection GEMM (forward, dgrad, wgrad) on FP8; the LM head BF16.
  assert _flops(c, "fp8") == _PROJ_FLOPS, c
  assert _flops(c, "bf16") == _HEAD_FLOPS, c
  assert _flops(c, "fp8", bf16_out=True) == 0 and not c["sort"], c
  fast = _compiled("fp8", "impl=xla,accumulation=fast")
  # The forward and dgrad GEMMs write bf16 themselves (per-tensor scales);
  # the wgrads (a third of the FLOPs) meet the f32 weight gradient.
  assert _flops(fast, "fp8") == _PROJ_FLOPS, fast
  assert _flops(fast, "fp8", bf16_out=True) == _PROJ_FLOPS * 2 / 3, fast


def test_fp4_paper_default_program_has_no_sort_and_no_f32_gemm():
  c = _compiled("fp4_paper")
  assert not c["sort"], c                  # OCC's top-k is RAFT's select_k
  # impl auto = fast on a GPU: bf16 GEMMs on the grid values, and three
  # dense compensation GEMMs per projection (sparse_impl auto = gemm).
  assert _flops(c, "f32") == 0, c
  assert _flops(c, "bf16") == 2 * _PROJ_FLOPS + _HEAD_FLOPS, c
