#!/usr/bin/env bash
# The device run, one bench/gpu.py section per call, in order:
#
#   bench/gpu_check.sh OUT_DIR
#
# Each call stays under 8 minutes, compiles included (`timeout` stops one
# that does not; its partial results.json is kept), so each fits one
# device session's call and a failure loses one section only. Put the
# figures beside bench/gpu_model.py's estimates in bench/RESULTS.md.
set -u
out=${1:?usage: bench/gpu_check.sh OUT_DIR}
cd "$(dirname "$0")/.."
export PYTHONPATH=.${PYTHONPATH:+:$PYTHONPATH}
python=${PYTHON:-python}
run() {   # name, then bench/gpu.py arguments
  local name=$1; shift
  echo "== $name"
  timeout 480 "$python" bench/gpu.py --out "$out/$name" --budget_s 360 "$@" \
    || echo "== $name: exit $? (partial results in $out/$name)"
}
run corr --sections corr
run kernels --sections kernels
run gemm --sections gemm
run speed --sections speed
run train-125m --sections train \
  --train_runs 125m/bf16/8,125m/fp4_paper/8,125m/fp8/8,125m/nvfp4/8
run train-1.3b --sections train --train_runs 1.3b/bf16/4,1.3b/fp4_paper/4
