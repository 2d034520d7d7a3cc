"""Joining a multi-process run: `jax.distributed` from the `distributed` keys.

Owns: validating the `distributed` config section and calling
`jax.distributed.initialize` (before anything touches a device), and the
per-process start line.

Keys (JAX's own argument names): coordinator_address ("host:port"),
num_processes, process_id, local_device_ids ("0,1" or ""), timeout_s.
All unset: JAX's own cluster detection when a SLURM or Open MPI job of more
than one task is detected, else a single process (nothing to initialize).
A coordinator that does not answer within timeout_s is an error naming its
address, never a hang; a second process 0 (its coordinator port already in
use) is an error naming the key. A duplicated id above 0 cannot be seen
before joining: JAX's coordination service then aborts every process, its
log naming the task ("N unexpectedly tried to connect with a different
incarnation").

Must not import: ml_collections (reads the section by key), or any fp4jax
module (it runs first).
"""

import errno
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import jax
from absl import logging


def _cluster_job() -> str | None:
  """The multi-task cluster job this process belongs to, if any."""
  def count(*names):
    for n in names:
      if os.environ.get(n, "").isdigit():
        return int(os.environ[n])
    return 1
  if "SLURM_JOB_ID" in os.environ and count("SLURM_STEP_NUM_TASKS",
                                            "SLURM_NTASKS") > 1:
    return "SLURM"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  return None


def _device_ids(value: Any) -> list[int] | None:
  if value in ("", None):
    return None
  parts = str(value).split(",") if isinstance(value, str) else list(value)
  try:
    ids = [int(p) for p in parts]
  except ValueError:
    raise ValueError(f"distributed.local_device_ids must be a comma-"
                     f"separated list of ints, got {value!r}") from None
  return ids


def validate(section: Mapping[str, Any]) -> dict[str, Any] | None:
  """The `jax.distributed.initialize` arguments, or None for one process.

  Raises:
    ValueError: one line naming the distributed.* key that is invalid.
  """
  address = section["coordinator_address"]
  n, pid = section["num_processes"], section["process_id"]
  timeout = section["timeout_s"]
  for key, value, low in (("num_processes", n, 0), ("process_id", pid, -1),
                          ("timeout_s", timeout, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"distributed.{key} must be an int >= {low}, got "
                       f"{value!r}")
  ids = _device_ids(section["local_device_ids"])
  if not address:
    if n or pid >= 0:
      raise ValueError("distributed.num_processes / process_id are set but "
                       "distributed.coordinator_address is not; set it to "
                       "process 0's host:port")
    if _cluster_job() is None:
      return None
    return {"initialization_timeout": timeout, "local_device_ids": ids}
  host, _, port = address.rpartition(":")
  if not host or not port.isdigit():
    raise ValueError(f"distributed.coordinator_address must be host:port, "
                     f"got {address!r}")
  if n < 1 or pid < 0:
    raise ValueError(f"distributed.coordinator_address={address!r} needs "
                     f"distributed.num_processes >= 1 and process_id >= 0, "
                     f"got {n} and {pid}")
  if pid >= n:
    raise ValueError(f"distributed.process_id={pid} is out of range for "
                     f"distributed.num_processes={n}")
  return {"coordinator_address": address, "num_processes": n,
          "process_id": pid, "local_device_ids": ids,
          "initialization_timeout": timeout}


def _wait_for(address: str, timeout_s: int, process_id: int) -> None:
  host, _, port = address.rpartition(":")
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      with socket.create_connection((host, int(port)), timeout=2):
        return
    except OSError as e:
      if time.monotonic() > deadline:
        raise ValueError(
            f"distributed: no coordinator answers at {address} after "
            f"{timeout_s} s (process {process_id}: {e.strerror or e}); "
            f"start process 0 there or fix "
            f"distributed.coordinator_address") from None
      time.sleep(0.5)


def _check_port_free(address: str) -> None:
  """Process 0 hosts the coordinator: its port must not be taken already.

  JAX's coordination service aborts every process (a C++ fatal) when two
  processes claim one id; the commonest case, two processes started as
  process 0, shows here first as a port someone already listens on.
  """
  port = int(address.rpartition(":")[2])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    try:
      s.bind(("", port))
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return     # not ours to judge (permissions, ...): JAX will say
      raise ValueError(
          f"distributed: port {port} of distributed.coordinator_address="
          f"{address} is already in use on this host: is another process "
          f"running with distributed.process_id=0 (each process needs its "
          f"own id, 0..num_processes-1)?") from None


def initialize(section: Mapping[str, Any]) -> None:
  """Joins the run described by `section` (no-op for a single process).

  Must run before any jax call that touches a device.

  Raises:
    ValueError: an invalid key, or a coordinator that did not answer
      within distributed.timeout_s (naming its address).
  """
  args = validate(section)
  if args is None:
    return
  where = args.get("coordinator_address") or _cluster_job()
  if args.get("process_id") == 0:
    _check_port_free(args["coordinator_address"])
  elif args.get("process_id", 0) > 0:
    # XLA aborts the process (a C++ fatal, no Python error) when the
    # coordinator never answers: wait for it here, boundedly, first.
    _wait_for(args["coordinator_address"], args["initialization_timeout"],
              args["process_id"])
  try:
    jax.distributed.initialize(**args)
  except Exception as e:  # DEADLINE_EXCEEDED, connection refused, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ValueError(f"distributed: could not join the run at {where} "
                     f"within {args['initialization_timeout']} s (process "
                     f"{args.get('process_id', '?')}): {first[:200]}"
                     ) from None
  logging.warning("process %d of %d on %s: local devices %s",
                  jax.process_index(), jax.process_count(),
                  socket.gethostname(),
                  [d.id for d in jax.local_devices()])
