"""bench/gpu.py's device checks at toy sizes on CPU (kernels in Pallas
interpret mode), so the script that runs on a lent GPU is exercised on
every submission."""

import json
import os
import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).parents[1]


def test_gpu_bench_quick_runs_its_checks_on_cpu(tmp_path):
  env = dict(os.environ, PYTHONPATH=str(ROOT))
  p = subprocess.run(
      [sys.executable, str(ROOT / "bench" / "gpu.py"), "--out",
       str(tmp_path), "--quick", "--sections", "corr,kernels,gemm"],
      env=env, capture_output=True, text=True, timeout=600, check=False)
  assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-2000:]
  res = json.loads((tmp_path / "results.json").read_text())
  for sec in ("qmatmul_correctness", "kernels", "gemm"):
    assert "error" not in res[sec], (sec, res[sec])
  assert all(res["kernels"]["bit_equal"].values())
  assert res["kernels"]["fp8_dots_lowered"] == 3   # fwd, dgrad, wgrad
  # ELL vs GEMM compensation: the same math, f32 summation order apart.
  assert res["kernels"]["compensation"]["max_rel_diff"] < 1e-5
  corr = res["qmatmul_correctness"]["fp4_paper"]
  assert corr["reference"]["y"] == 0.0              # same program as host
  assert all(v["finite"] for v in corr.values())
  assert "#### summary" in p.stdout
