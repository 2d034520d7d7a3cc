"""Joining a multi-process run: `jax.distributed` from the `distributed` keys.

Owns: validating the `distributed` config section and calling
`jax.distributed.initialize` (before anything touches a device), and the
per-process start line.

Keys (JAX's own argument names): coordinator_address ("host:port"),
num_processes, process_id, local_device_ids ("0,1" or ""), timeout_s.
All unset: in a SLURM job of more than one task, the layout SLURM describes
(`slurm_layout`); in an Open MPI job of more than one task, JAX's own
cluster detection; else a single process (nothing to initialize).

Under SLURM the launch passes every argument itself, local devices
included, and turns JAX's detection off: JAX fills an unset
local_device_ids with [SLURM_LOCALID] whenever it sees SLURM, which gives a
task that owns a whole node (one task per node, 8 GPUs) one GPU, so a 4x8
mesh cannot be built. `slurm_layout` gives such a task all the GPUs it
sees, a task per GPU its own, and a task per group of GPUs its group; the
start line says which. With the process keys set by hand, an unset
local_device_ids means every device the process sees, or inside a SLURM
step of several tasks the step's layout.

A coordinator that does not answer within timeout_s is an error naming its
address, never a hang; a second process 0 (its coordinator port already in
use) is an error naming the key. A duplicated id above 0 cannot be seen
before joining: JAX's coordination service then aborts every process, its
log naming the task ("N unexpectedly tried to connect with a different
incarnation").

Must not import: ml_collections (reads the section by key), or any fp4jax
module (it runs first).
"""

import dataclasses
import errno
import os
import re
import socket
import time
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
from absl import logging


def _cluster_job(env: Mapping[str, str]) -> str | None:
  """The multi-task cluster job this process belongs to, if any."""
  def count(*names):
    for n in names:
      if env.get(n, "").isdigit():
        return int(env[n])
    return 1
  if "SLURM_JOB_ID" in env and count("SLURM_STEP_NUM_TASKS",
                                     "SLURM_NTASKS") > 1:
    return "SLURM"
  if count("OMPI_COMM_WORLD_SIZE") > 1:
    return "Open MPI"
  return None


@dataclasses.dataclass(frozen=True)
class SlurmLayout:
  """This task's place in a SLURM job step, as `jax.distributed` wants it.

  Attributes:
    coordinator_address: "host:port" on the step's first node.
    num_processes: tasks in the step.
    process_id: this task's rank (SLURM_PROCID).
    local_device_ids: the GPU ordinals this task owns, as the task numbers
      them (after CUDA_VISIBLE_DEVICES); None: every device it sees (no GPU
      is described, e.g. a CPU job).
    note: how the ids were chosen, for the start line.
  """

  coordinator_address: str
  num_processes: int
  process_id: int
  local_device_ids: list[int] | None
  note: str


def _first(env: Mapping[str, str], *names: str) -> tuple[str, str] | None:
  """(name, value) of the first of `names` that `env` sets, non-empty."""
  for name in names:
    if env.get(name, "").strip():
      return name, env[name].strip()
  return None


def _int(env: Mapping[str, str], *names: str) -> tuple[str, int] | None:
  found = _first(env, *names)
  if found is None:
    return None
  name, value = found
  if not value.isdigit():
    raise ValueError(f"SLURM: {name}={value!r} is not a number; is this a "
                     f"SLURM job step (srun)?")
  return name, int(value)


def _per_node(name: str, value: str) -> list[int]:
  """"8(x3),7" -> [8, 8, 8, 7] (SLURM's tasks-per-node notation)."""
  counts = []
  for part in value.split(","):
    m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
    if not m:
      raise ValueError(f"SLURM: cannot read {name}={value!r}; expected "
                       f"counts like 8(x4) or 2,1")
    counts += [int(m.group(1))] * int(m.group(2) or 1)
  return counts


def _first_host(name: str, nodelist: str) -> str:
  """The first host of a SLURM node list: "gpu[07-09,12],cpu1" -> "gpu07"."""
  host, i = "", 0
  while i < len(nodelist) and nodelist[i] != ",":
    if nodelist[i] == "[":
      end = nodelist.find("]", i)
      if end < 0:
        raise ValueError(f"SLURM: cannot read {name}={nodelist!r} (no "
                         f"closing bracket)")
      host += re.split(r"[,-]", nodelist[i + 1:end])[0]
      i = end + 1
    else:
      host += nodelist[i]
      i += 1
  return host


def _gpu_list(value: str) -> list[str]:
  """The entries of CUDA_VISIBLE_DEVICES / SLURM_*_GPUS ("" -> none)."""
  if value.strip() in ("", "NoDevFiles"):   # old SLURMs: "no GPUs for you"
    return []
  return [v for v in value.split(",") if v.strip()]


def slurm_layout(env: Mapping[str, str]) -> SlurmLayout:
  """This task's layout in a SLURM job step, from its environment alone.

  Local devices: a task alone on its node owns every GPU it sees; tasks
  sharing a node's GPUs split them evenly by SLURM_LOCALID (one task per
  GPU: [SLURM_LOCALID]); a task whose CUDA_VISIBLE_DEVICES SLURM already
  narrowed to its own GPUs (--gpu-bind, --gpus-per-task) owns all it sees,
  [0] for one. The step's variables win over the job's (SLURM_STEP_* over
  SLURM_NTASKS, SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE, SLURM_NODELIST),
  as an srun inside a batch script may lay out fewer tasks than the job.

  Args:
    env: the environment (os.environ, or a fake one in tests).

  Returns:
    The SlurmLayout.

  Raises:
    ValueError: one line naming the SLURM variables that are missing,
      unreadable or inconsistent (e.g. 3 tasks sharing 8 GPUs).
  """
  total = _int(env, "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS")
  rank = _int(env, "SLURM_PROCID")
  local = _int(env, "SLURM_LOCALID")
  nodes_var = _first(env, "SLURM_STEP_NODELIST", "SLURM_JOB_NODELIST",
                     "SLURM_NODELIST")
  missing = [n for n, v in (("SLURM_STEP_NUM_TASKS or SLURM_NTASKS", total),
                            ("SLURM_PROCID", rank), ("SLURM_LOCALID", local),
                            ("SLURM_STEP_NODELIST or SLURM_NODELIST",
                             nodes_var)) if v is None]
  if missing:
    raise ValueError(f"SLURM: {', '.join(missing)} not set; start each "
                     f"task with srun inside the job, or set the "
                     f"distributed.* keys")
  (total_name, n), (_, pid), (_, lid) = total, rank, local
  if pid >= n:
    raise ValueError(f"SLURM: SLURM_PROCID={pid} is out of range for "
                     f"{total_name}={n}")

  # Tasks on this node: the step's per-node counts, this node's entry.
  per_node = _first(env, "SLURM_STEP_TASKS_PER_NODE",
                    "SLURM_NTASKS_PER_NODE", "SLURM_TASKS_PER_NODE")
  if per_node is None:
    raise ValueError("SLURM: none of SLURM_STEP_TASKS_PER_NODE, "
                     "SLURM_NTASKS_PER_NODE, SLURM_TASKS_PER_NODE is set; "
                     "start each task with srun inside the job")
  per_name, per_value = per_node
  counts = _per_node(per_name, per_value)
  # One count ("8", from --ntasks-per-node) may stand for several nodes.
  if sum(counts) > n or (len(counts) > 1 and sum(counts) != n):
    raise ValueError(f"SLURM: {per_name}={per_value} lays out "
                     f"{sum(counts)} tasks but {total_name}={n}")
  if len(set(counts)) == 1:
    here = counts[0]
  else:
    node = _int(env, "SLURM_NODEID")
    if node is None or node[1] >= len(counts):
      raise ValueError(f"SLURM: {per_name}={per_value} differs between "
                       f"nodes and SLURM_NODEID="
                       f"{env.get('SLURM_NODEID')!r} does not pick one")
    here = counts[node[1]]
  if lid >= here:
    raise ValueError(f"SLURM: SLURM_LOCALID={lid} is out of range for "
                     f"{here} tasks on this node ({per_name}={per_value})")

  # GPUs: those this task sees, and those SLURM gave the node.
  cvd = env.get("CUDA_VISIBLE_DEVICES")
  node_name, node_gpus = _int(env, "SLURM_GPUS_ON_NODE") or (None, None)
  if node_gpus is None and (
      listed := _first(env, "SLURM_STEP_GPUS", "SLURM_JOB_GPUS")):
    node_name, node_gpus = listed[0], len(_gpu_list(listed[1]))
  if cvd is not None:
    seen, seen_name = len(_gpu_list(cvd)), "CUDA_VISIBLE_DEVICES"
  else:
    seen, seen_name = node_gpus, node_name
  tasks = f"{here} task{'s' if here > 1 else ''} on this node ({per_name}"
  tasks += f"={per_value})"
  if not seen:   # no GPUs described (None) or none visible (0)
    if seen is None and here > 1:
      ids, note = [lid], f"{tasks}, GPUs not described: [SLURM_LOCALID]"
    else:
      ids, note = None, f"{tasks}, no GPUs described: every local device"
  elif here == 1:
    ids = list(range(seen))
    note = f"{tasks}: all {seen} GPUs it sees ({seen_name})"
  elif cvd is not None and (seen < node_gpus if node_gpus else seen < here):
    ids = list(range(seen))
    note = (f"{tasks}: its own {seen} GPU{'s' if seen > 1 else ''} "
            f"(CUDA_VISIBLE_DEVICES={cvd} narrowed by SLURM)")
  else:
    if seen % here:
      raise ValueError(f"SLURM: {here} tasks on a node cannot share its "
                       f"{seen} GPUs evenly ({per_name}={per_value}, "
                       f"{seen_name}={env.get(seen_name)}); ask for a task "
                       f"per node or per GPU, or set "
                       f"distributed.local_device_ids")
    k = seen // here
    ids = list(range(lid * k, lid * k + k))
    note = (f"{tasks}: GPUs {ids} of the {seen} it shares ({seen_name}, "
            f"SLURM_LOCALID={lid})")

  if env.get("JAX_LOCAL_DEVICE_IDS"):   # JAX's own override wins, as in JAX
    ids = _device_ids(env["JAX_LOCAL_DEVICE_IDS"], "JAX_LOCAL_DEVICE_IDS")
    note = f"{tasks}: JAX_LOCAL_DEVICE_IDS={env['JAX_LOCAL_DEVICE_IDS']}"
  # The port JAX's own SLURM detection derives from the job id (the top of
  # the ephemeral range), so every task of the step computes the same one.
  job = _int(env, "SLURM_JOB_ID")
  port = env.get("JAX_COORDINATOR_PORT") or str(
      (job[1] if job else 0) % 2**12 + 65536 - 2**12)
  address = env.get("JAX_COORDINATOR_ADDRESS") or (
      f"{_first_host(*nodes_var)}:{port}")
  return SlurmLayout(address, n, pid, ids, note)


def _device_ids(value: Any, key: str = "distributed.local_device_ids"
                ) -> list[int] | None:
  if value in ("", None):
    return None
  parts = str(value).split(",") if isinstance(value, str) else list(value)
  try:
    ids = [int(p) for p in parts]
  except ValueError:
    raise ValueError(f"{key} must be a comma-separated list of ints, got "
                     f"{value!r}") from None
  return ids


# Where the coordinator address came from, for the errors that name it.
_KEYS = "distributed.coordinator_address"
_SLURM = ("the first node of the SLURM step (JAX_COORDINATOR_ADDRESS / "
          "JAX_COORDINATOR_PORT override it)")


class _Plan(NamedTuple):
  args: dict[str, Any] | None  # jax.distributed.initialize's; None: 1 process
  source: str                  # where the coordinator address came from
  note: str                    # the start line's account of the devices


def _plan(section: Mapping[str, Any], env: Mapping[str, str]) -> _Plan:
  address = section["coordinator_address"]
  n, pid = section["num_processes"], section["process_id"]
  timeout = section["timeout_s"]
  for key, value, low in (("num_processes", n, 0), ("process_id", pid, -1),
                          ("timeout_s", timeout, 1)):
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ValueError(f"distributed.{key} must be an int >= {low}, got "
                       f"{value!r}")
  ids = _device_ids(section["local_device_ids"])
  job = _cluster_job(env)
  slurm = f"SLURM job {env.get('SLURM_JOB_ID')}"
  if not address:
    if n or pid >= 0:
      raise ValueError("distributed.num_processes / process_id are set but "
                       "distributed.coordinator_address is not; set it to "
                       "process 0's host:port")
    if job is None:
      return _Plan(None, _KEYS, "")
    if job != "SLURM":
      return _Plan({"initialization_timeout": timeout,
                    "local_device_ids": ids}, job, "")
    layout = slurm_layout(env)
    note = (layout.note if ids is None else
            f"distributed.local_device_ids={section['local_device_ids']}")
    return _Plan({"coordinator_address": layout.coordinator_address,
                  "num_processes": layout.num_processes,
                  "process_id": layout.process_id,
                  "local_device_ids": (layout.local_device_ids
                                       if ids is None else ids),
                  "initialization_timeout": timeout,
                  # Every argument is given; JAX's detection would only
                  # put [SLURM_LOCALID] back as the devices.
                  "cluster_detection_method": "deactivate"},
                 _SLURM, f" ({slurm}: {note})")
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
  note = ""
  if ids is None and job == "SLURM":
    # Keys set by hand inside a SLURM step: the devices still follow the
    # step's layout.
    layout = slurm_layout(env)
    ids, note = layout.local_device_ids, f" ({slurm}: {layout.note})"
  # Every argument is given: JAX's cluster detection could only replace
  # "every local device" by [local rank], wrong for a process that owns a
  # whole node (the documented default of local_device_ids is all).
  return _Plan({"coordinator_address": address, "num_processes": n,
                "process_id": pid, "local_device_ids": ids,
                "initialization_timeout": timeout,
                "cluster_detection_method": "deactivate"}, _KEYS, note)


def validate(section: Mapping[str, Any],
             env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
  """The `jax.distributed.initialize` arguments, or None for one process.

  Args:
    section: the `distributed` config section.
    env: the environment the cluster is read from (default os.environ).

  Raises:
    ValueError: one line naming the distributed.* key that is invalid, or
      the SLURM variables that are (`slurm_layout`).
  """
  return _plan(section, os.environ if env is None else env).args


def _wait_for(address: str, timeout_s: int, process_id: int,
              source: str = _KEYS) -> None:
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
            f"start process 0 there or fix {source}") from None
      time.sleep(0.5)


def _check_port_free(address: str, source: str = _KEYS) -> None:
  """Process 0 hosts the coordinator: its port must not be taken already.

  JAX's coordination service aborts every process (a C++ fatal) when two
  processes claim one id; the commonest case, two processes started as
  process 0, shows here first as a port someone already listens on.
  """
  port = int(address.rpartition(":")[2])
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    # Only a live listener counts: a requeued SLURM job gets the same port
    # back, and the connections of its last start may still sit in
    # TIME_WAIT for a minute, which a plain bind would take for "in use".
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
      s.bind(("", port))
    except OSError as e:
      if e.errno != errno.EADDRINUSE:
        return     # not ours to judge (permissions, ...): JAX will say
      if source != _KEYS:
        raise ValueError(
            f"distributed: port {port} of the coordinator {address} "
            f"({source}) is already in use on this host: is another run "
            f"of this job still up? Set JAX_COORDINATOR_PORT to a free "
            f"port") from None
      raise ValueError(
          f"distributed: port {port} of distributed.coordinator_address="
          f"{address} is already in use on this host: is another process "
          f"running with distributed.process_id=0 (each process needs its "
          f"own id, 0..num_processes-1)?") from None


def initialize(section: Mapping[str, Any]) -> None:
  """Joins the run described by `section` (no-op for a single process).

  Must run before any jax call that touches a device. Each process logs
  one start line: its index, host, devices and, under SLURM, the layout
  its devices came from.

  Raises:
    ValueError: an invalid key or SLURM variable, or a coordinator that
      did not answer within distributed.timeout_s (naming its address).
  """
  args, source, note = _plan(section, os.environ)
  if args is None:
    return
  where = args.get("coordinator_address") or source
  if args.get("process_id") == 0:
    _check_port_free(args["coordinator_address"], source)
  elif args.get("process_id", 0) > 0:
    # XLA aborts the process (a C++ fatal, no Python error) when the
    # coordinator never answers: wait for it here, boundedly, first.
    _wait_for(args["coordinator_address"], args["initialization_timeout"],
              args["process_id"], source)
  try:
    jax.distributed.initialize(**args)
  except Exception as e:  # DEADLINE_EXCEEDED, connection refused, ...
    first = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise ValueError(f"distributed: could not join the run at {where} "
                     f"within {args['initialization_timeout']} s (process "
                     f"{args.get('process_id', '?')}): {first[:200]}"
                     ) from None
  logging.warning("process %d of %d on %s: local devices %s%s",
                  jax.process_index(), jax.process_count(),
                  socket.gethostname(),
                  [d.id for d in jax.local_devices()], note)
