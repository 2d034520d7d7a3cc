#!/usr/bin/env bash
# Runs one fp4jax training job as N processes on this machine.
#
#   experiments/launch_local.sh N --config=configs/demo.py:smoke --workdir=DIR [--config.k=v ...]
#
# Each process gets DEVICES_PER_PROCESS (default 1) CPU devices; they join
# through jax.distributed at 127.0.0.1:PORT (default: a free port) and
# reduce over gloo, JAX's CPU collectives. The script waits for all of
# them; if one fails, it stops the others and exits with that process's
# code. SIGINT / SIGTERM are passed on (the run saves and exits 130 / 143).
# On a cluster, set the same three distributed.* keys per process instead
# (docs/cluster.md).
set -u
if [ $# -lt 1 ] || ! [[ $1 =~ ^[0-9]+$ ]] || [ "$1" -lt 1 ]; then
  echo "usage: $0 N fp4jax.main-args..." >&2
  exit 2
fi
n=$1; shift
python=${PYTHON:-python}
port=${PORT:-$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
pids=()
for ((i = 0; i < n; i++)); do
  XLA_FLAGS="--xla_force_host_platform_device_count=${DEVICES_PER_PROCESS:-1}" \
  JAX_PLATFORMS=cpu "$python" -m fp4jax.main "$@" \
    --config.distributed.coordinator_address="127.0.0.1:$port" \
    --config.distributed.num_processes="$n" \
    --config.distributed.process_id="$i" &
  pids+=($!)
done
forward() { kill -s "$1" "${pids[@]}" 2>/dev/null; }
trap 'forward INT' INT
trap 'forward TERM' TERM
status=0
for ((left = n; left > 0; left--)); do
  wait -n
  rc=$?
  if [ $rc -ne 0 ] && [ $status -eq 0 ]; then
    status=$rc
    kill "${pids[@]}" 2>/dev/null   # the others would wait on a dead peer
  fi
done
exit $status
