"""SLURM launches: each task's layout, SIGUSR1, and docs/launch/paper.sbatch.

`distributed.slurm_layout` reads a fake environment (a dict; os.environ is
never touched) shaped like the one srun gives each task. The sbatch script
runs under bash with stub `srun`, `scontrol` and `python` commands first on
PATH: the stub run records what it was started with and exits the way the
test asks (finished, stopped on SIGUSR1, failed, ...).
"""

import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import pytest

from fp4jax import checkpoint
from fp4jax import distributed
import faults

ROOT = pathlib.Path(__file__).resolve().parents[1]
SBATCH = ROOT / "docs" / "launch" / "paper.sbatch"
JOBSET = ROOT / "docs" / "launch" / "jobset.yaml"

JOB_ID = 812
# The port JAX's own SLURM detection derives from the job id.
PORT = JOB_ID % 4096 + 61440
# fp4jax/main.py's exit codes: 128 + SIGUSR1 when SIGUSR1 stopped the run;
# bad input, a non-finite loss, too many skipped steps (a restart would end
# the same way).
EXIT_USR1 = 128 + signal.SIGUSR1
EXIT_ERROR, EXIT_NONFINITE, EXIT_SKIPPED = 1, 3, 4


def _slurm(nodes: int, per_node: int, rank: int, gpus: int | None = 8,
           **extra: str) -> dict[str, str]:
  """The variables srun sets for task `rank` of a block-distributed step."""
  n = nodes * per_node
  env = {"SLURM_JOB_ID": str(JOB_ID), "SLURM_NTASKS": str(n),
         "SLURM_STEP_NUM_TASKS": str(n), "SLURM_PROCID": str(rank),
         "SLURM_LOCALID": str(rank % per_node),
         "SLURM_NODEID": str(rank // per_node),
         "SLURM_NTASKS_PER_NODE": str(per_node),
         "SLURM_STEP_TASKS_PER_NODE": f"{per_node}(x{nodes})",
         "SLURM_STEP_NODELIST": f"gpu[07-{6 + nodes:02d}]",
         "SLURM_NODELIST": f"gpu[07-{6 + nodes:02d}]"}
  if gpus is not None:
    env["SLURM_GPUS_ON_NODE"] = str(gpus)
    env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, range(gpus)))
  env.update(extra)
  return env


# ------------------------------------------------------------ the layout


@pytest.mark.parametrize("rank", [0, 1, 3])
def test_one_task_per_node_owns_all_eight_gpus(rank):
  layout = distributed.slurm_layout(_slurm(4, 1, rank))
  assert layout.num_processes == 4 and layout.process_id == rank
  assert layout.local_device_ids == list(range(8))
  assert layout.coordinator_address == f"gpu07:{PORT}"
  assert "all 8 GPUs" in layout.note


@pytest.mark.parametrize("rank", [0, 13, 31])
def test_one_task_per_gpu_owns_its_localid(rank):
  layout = distributed.slurm_layout(_slurm(4, 8, rank))
  assert (layout.num_processes, layout.process_id) == (32, rank)
  assert layout.local_device_ids == [rank % 8]
  assert layout.coordinator_address == f"gpu07:{PORT}"


def test_a_gpu_bound_by_slurm_is_device_0():
  # --gpus-per-task=1 / --gpu-bind: each task sees only its own GPU.
  env = _slurm(4, 8, 13, CUDA_VISIBLE_DEVICES="5")
  layout = distributed.slurm_layout(env)
  assert layout.local_device_ids == [0] and "narrowed" in layout.note
  assert layout.process_id == 13


def test_tasks_sharing_a_node_split_its_gpus_evenly():
  assert distributed.slurm_layout(
      _slurm(2, 2, 3)).local_device_ids == [4, 5, 6, 7]


def test_the_gpu_count_comes_from_slurm_when_cuda_visible_devices_is_unset():
  env = _slurm(4, 1, 0)
  del env["CUDA_VISIBLE_DEVICES"]
  assert distributed.slurm_layout(env).local_device_ids == list(range(8))
  del env["SLURM_GPUS_ON_NODE"]
  env["SLURM_JOB_GPUS"] = "0,1,2,3"
  assert distributed.slurm_layout(env).local_device_ids == [0, 1, 2, 3]


def test_without_gpus_a_task_keeps_every_device_or_its_localid():
  assert distributed.slurm_layout(
      _slurm(4, 1, 2, gpus=None)).local_device_ids is None
  # Several tasks on a node and no GPUs described: JAX's own choice.
  assert distributed.slurm_layout(
      _slurm(2, 4, 6, gpus=None)).local_device_ids == [2]


def test_nodes_with_different_task_counts_pick_theirs_by_nodeid():
  env = _slurm(2, 4, 5, SLURM_NTASKS="6", SLURM_STEP_NUM_TASKS="6",
               SLURM_STEP_TASKS_PER_NODE="4,2", SLURM_NODEID="1",
               SLURM_LOCALID="1")
  assert distributed.slurm_layout(env).local_device_ids == [4, 5, 6, 7]


def test_the_step_wins_over_the_job():
  # An srun of 4 tasks, one per node, inside a job of 32.
  env = _slurm(4, 1, 2, SLURM_NTASKS="32", SLURM_NTASKS_PER_NODE="8",
               SLURM_TASKS_PER_NODE="8(x4)")
  layout = distributed.slurm_layout(env)
  assert layout.num_processes == 4
  assert layout.local_device_ids == list(range(8))


@pytest.mark.parametrize("nodelist,host", [
    ("node001", "node001"), ("node001,host2", "node001"),
    ("gpu[07-09,12],cpu1", "gpu07"), ("n[3,5-6]", "n3"),
    ("rack1-[04-05]-ib", "rack1-04-ib")])
def test_the_coordinator_is_the_first_node(nodelist, host):
  env = _slurm(2, 1, 0, SLURM_STEP_NODELIST=nodelist)
  assert distributed.slurm_layout(
      env).coordinator_address == f"{host}:{PORT}"


def test_jax_coordinator_variables_override_the_derived_address():
  env = _slurm(2, 1, 0, JAX_COORDINATOR_PORT="4321")
  assert distributed.slurm_layout(env).coordinator_address == "gpu07:4321"
  env["JAX_COORDINATOR_ADDRESS"] = "head:99"
  assert distributed.slurm_layout(env).coordinator_address == "head:99"


@pytest.mark.parametrize("change,names", [
    # 3 tasks cannot share 8 GPUs evenly.
    (dict(SLURM_NTASKS="12", SLURM_STEP_NUM_TASKS="12",
          SLURM_STEP_TASKS_PER_NODE="3(x4)"),
     ["SLURM_STEP_TASKS_PER_NODE=3(x4)", "CUDA_VISIBLE_DEVICES", "8 GPUs"]),
    (dict(SLURM_LOCALID="1"), ["SLURM_LOCALID=1"]),
    (dict(SLURM_PROCID="4"), ["SLURM_PROCID=4", "SLURM_STEP_NUM_TASKS=4"]),
    (dict(SLURM_STEP_TASKS_PER_NODE="2(x4)"),
     ["SLURM_STEP_TASKS_PER_NODE=2(x4)", "SLURM_STEP_NUM_TASKS=4"]),
    (dict(SLURM_STEP_TASKS_PER_NODE="one"), ["SLURM_STEP_TASKS_PER_NODE"]),
    (dict(SLURM_GPUS_ON_NODE="eight"), ["SLURM_GPUS_ON_NODE"]),
    (dict(SLURM_STEP_NODELIST="gpu[07-10"), ["SLURM_STEP_NODELIST"]),
    (dict(SLURM_PROCID=None), ["SLURM_PROCID"]),
    (dict(SLURM_STEP_TASKS_PER_NODE=None, SLURM_NTASKS_PER_NODE=None),
     ["SLURM_STEP_TASKS_PER_NODE"]),
])
def test_an_inconsistent_environment_is_one_line_naming_the_variables(
    change, names):
  env = _slurm(4, 1, 0)
  for k, v in change.items():
    if v is None:
      env.pop(k)
    else:
      env[k] = v
  with pytest.raises(ValueError) as e:
    distributed.slurm_layout(env)
  msg = str(e.value)
  assert "\n" not in msg and msg.startswith("SLURM: "), msg
  for name in names:
    assert name in msg, (name, msg)


# --------------------------------------------- what jax.distributed gets

SECTION = {"coordinator_address": "", "num_processes": 0, "process_id": -1,
           "local_device_ids": "", "timeout_s": 120}


def test_validate_passes_the_whole_layout_and_turns_detection_off():
  args = distributed.validate(SECTION, _slurm(4, 1, 2))
  assert args == {"coordinator_address": f"gpu07:{PORT}",
                  "num_processes": 4, "process_id": 2,
                  "local_device_ids": list(range(8)),
                  "initialization_timeout": 120,
                  "cluster_detection_method": "deactivate"}
  # The key overrides the layout's devices.
  args = distributed.validate({**SECTION, "local_device_ids": "0,1"},
                              _slurm(4, 1, 2))
  assert args["local_device_ids"] == [0, 1]


def test_keys_set_by_hand_inside_a_step_keep_the_steps_devices():
  section = {**SECTION, "coordinator_address": "head:1234",
             "num_processes": 4, "process_id": 1}
  args = distributed.validate(section, _slurm(4, 1, 1))
  assert args["coordinator_address"] == "head:1234"
  assert args["local_device_ids"] == list(range(8))
  assert args["cluster_detection_method"] == "deactivate"
  assert distributed.validate(section, {})["local_device_ids"] is None


def test_one_task_or_no_cluster_is_one_process():
  assert distributed.validate(SECTION, {}) is None
  one = _slurm(1, 1, 0)
  assert distributed.validate(SECTION, one) is None


def test_the_start_line_names_the_layout(monkeypatch, caplog):
  with socket.socket() as s:   # process 0 checks that its port is free
    s.bind(("", 0))
    port = str(s.getsockname()[1])
  for k, v in _slurm(4, 1, 0, JAX_COORDINATOR_PORT=port).items():
    monkeypatch.setenv(k, v)
  got = {}
  monkeypatch.setattr(distributed.jax.distributed, "initialize",
                      lambda **kw: got.update(kw))
  with caplog.at_level("WARNING"):
    distributed.initialize(SECTION)
  assert got["local_device_ids"] == list(range(8))
  assert got["process_id"] == 0 and got["num_processes"] == 4
  line = [r.getMessage() for r in caplog.records
          if "local devices" in r.getMessage()][-1]
  assert f"SLURM job {JOB_ID}" in line and "all 8 GPUs" in line, line


# ---------------------------------------------------------------- SIGUSR1


def test_sigusr1_sets_the_stop_flag_like_sigterm():
  assert signal.SIGUSR1 in checkpoint.STOP_SIGNALS
  previous = {s: signal.getsignal(s) for s in checkpoint.STOP_SIGNALS}
  with checkpoint.stop_flag() as flag:
    assert not flag.is_set()
    signal.raise_signal(signal.SIGUSR1)
    assert flag.is_set() and flag.signum == signal.SIGUSR1
  assert {s: signal.getsignal(s) for s in checkpoint.STOP_SIGNALS} == previous


@pytest.mark.slow
def test_main_saves_and_exits_138_on_sigusr1(tmp_path):
  workdir = tmp_path / "run"
  proc = faults.start_main("--config=configs/demo.py:smoke,recipe=bf16",
                           f"--workdir={workdir}", "--config.num_steps=400",
                           "--config.log_every=1",
                           "--config.checkpoint_every=1000",
                           "--config.eval_every=0")
  faults.wait_for_step(proc, workdir, 1)
  proc.send_signal(signal.SIGUSR1)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == EXIT_USR1, out[-3000:]
  last = faults.last_line(out)
  assert last.startswith("stopped by SIGUSR1 at step"), out[-3000:]
  step = int(last.split("at step ")[1].split()[0])
  assert checkpoint.complete_steps(str(workdir)) == [step]


# ------------------------------------------------ docs/launch/paper.sbatch

# The stub run: records its arguments and environment, then ends as
# STUB_RUN says ("stop": saves and exits 138 on SIGUSR1, as fp4jax.main).
_PYTHON_STUB = r"""#!/bin/bash
printf '%s\n' "$@" > "$STUB_LOG/python.args"
for v in XLA_FLAGS XLA_PYTHON_CLIENT_MEM_FRACTION NCCL_DEBUG \
         JAX_COMPILATION_CACHE_DIR; do
  echo "$v=${!v}" >> "$STUB_LOG/python.env"
done
case "$STUB_RUN" in
  finish) exit 0 ;;
  fail) exit 1 ;;
  preempted) exit 143 ;;
  stop|finish_on_usr1)
    if [ "$STUB_RUN" = stop ]; then trap 'exit 138' USR1
    else trap 'exit 0' USR1; fi
    touch "$STUB_LOG/started"
    for _ in $(seq 400); do sleep 0.05; done
    exit 99 ;;
  no_handler_yet)   # killed by the notice before it could save
    touch "$STUB_LOG/started"
    exec sleep 20 ;;
esac
exit 98
"""
_SRUN_STUB = r"""#!/bin/bash
printf '%s\n' "$@" > "$STUB_LOG/srun.args"
while [[ $1 == --* ]]; do shift; done
exec "$@"
"""
_SCONTROL_STUB = r"""#!/bin/bash
echo "$*" >> "$STUB_LOG/scontrol.log"
exit "${STUB_SCONTROL_RC:-0}"
"""


@pytest.fixture(name="cluster")
def _cluster(tmp_path):
  stubs = tmp_path / "bin"
  stubs.mkdir()
  for name, text in (("python", _PYTHON_STUB), ("srun", _SRUN_STUB),
                     ("scontrol", _SCONTROL_STUB)):
    (stubs / name).write_text(text)
    (stubs / name).chmod(0o755)
  log = tmp_path / "log"
  log.mkdir()
  env = {"PATH": f"{stubs}:{os.environ.get('PATH', '/usr/bin:/bin')}",
         "HOME": str(tmp_path), "STUB_LOG": str(log),
         "SLURM_JOB_ID": str(JOB_ID), "SLURM_JOB_NUM_NODES": "4",
         "SLURM_GPUS_ON_NODE": "8", "SLURM_CPUS_ON_NODE": "16",
         "SLURM_SUBMIT_DIR": str(tmp_path),
         "WORKDIR": str(tmp_path / "runs" / "r1")}
  return tmp_path, env


def _sbatch(cluster, run: str, *args: str, notice: bool = False,
            **extra: str) -> tuple[int, str, pathlib.Path]:
  """Runs the script as SLURM would; `notice`: SIGUSR1 once the run runs."""
  tmp, env = cluster
  env = {**env, "STUB_RUN": run, **extra}
  proc = subprocess.Popen(["bash", str(SBATCH), *args], env=env, cwd=tmp,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  log = tmp / "log"
  if notice:
    deadline = time.monotonic() + 10
    while not (log / "started").exists():
      assert proc.poll() is None and time.monotonic() < deadline, (
          proc.communicate())
      time.sleep(0.02)
    proc.send_signal(signal.SIGUSR1)
  _, err = proc.communicate(timeout=30)
  return proc.returncode, err, log


def _requeued(log) -> list[str]:
  path = log / "scontrol.log"
  return path.read_text().splitlines() if path.exists() else []


def test_sbatch_starts_the_preset_and_a_finished_run_is_not_requeued(
    cluster):
  rc, err, log = _sbatch(cluster, "finish", "--config.log_every=20")
  tmp, _ = cluster
  assert rc == 0, err
  assert (log / "python.args").read_text().splitlines() == [
      "-m", "fp4jax.main",
      "--config=configs/paper.py:size=1.3b,recipe=fp4_paper,nodes=4,"
      "gpus_per_node=8",
      f"--workdir={tmp}/runs/r1", "--config.log_every=20"]
  assert "--cpus-per-task=16" in (log / "srun.args").read_text()
  env = dict(line.split("=", 1)
             for line in (log / "python.env").read_text().splitlines())
  assert env["JAX_COMPILATION_CACHE_DIR"] == f"{tmp}/runs/jax_cache"
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env["XLA_FLAGS"]
  assert env["NCCL_DEBUG"] == "WARN"
  assert _requeued(log) == [] and "not requeued" in err


def test_the_notice_reaches_the_run_and_requeues_the_job(cluster):
  rc, err, log = _sbatch(cluster, "stop", notice=True)
  assert rc == 0, err
  assert _requeued(log) == [f"requeue {JOB_ID}"], err
  assert "SIGUSR1" in err


def test_a_run_killed_by_the_notice_before_it_could_save_is_requeued(
    cluster):
  # Its last checkpoint is still there: the requeued start resumes from it.
  rc, err, log = _sbatch(cluster, "no_handler_yet", notice=True)
  assert rc == 0, err
  assert _requeued(log) == [f"requeue {JOB_ID}"]


@pytest.mark.parametrize("run,notice,code", [
    ("finish_on_usr1", True, 0),  # the notice came at the last step
    ("fail", False, 1),           # bad input: a rerun fails the same way
    ("preempted", False, 143),    # SIGTERM: preemption or scancel
])
def test_only_a_stop_on_the_notice_requeues(cluster, run, notice, code):
  rc, err, log = _sbatch(cluster, run, notice=notice)
  assert rc == code, err
  assert _requeued(log) == []


def test_requeues_stop_at_max_requeues(cluster):
  rc, err, log = _sbatch(cluster, "stop", notice=True,
                         SLURM_RESTART_COUNT="3", MAX_REQUEUES="3")
  assert rc == EXIT_USR1 and _requeued(log) == [], err
  assert "MAX_REQUEUES=3" in err


def test_a_failed_requeue_keeps_the_runs_code(cluster):
  rc, err, log = _sbatch(cluster, "stop", notice=True, STUB_SCONTROL_RC="1")
  assert rc == EXIT_USR1 and _requeued(log) == [f"requeue {JOB_ID}"]
  assert "requeue" in err and "failed" in err


def test_sbatch_without_workdir_starts_nothing(cluster):
  tmp, env = cluster
  del env["WORKDIR"]
  rc, err, log = _sbatch((tmp, env), "finish")
  assert rc == 2 and "WORKDIR" in err
  assert not (log / "python.args").exists()


def test_train_cmd_and_config_replace_the_defaults(cluster):
  rc, err, log = _sbatch(cluster, "finish", TRAIN_CMD="python -u -m x.main",
                         CONFIG="configs/demo.py:smoke")
  assert rc == 0, err
  assert (log / "python.args").read_text().splitlines()[:4] == [
      "-u", "-m", "x.main", "--config=configs/demo.py:smoke"]


def test_sbatch_directives_come_before_any_command():
  lines = SBATCH.read_text().splitlines()
  directives = [i for i, line in enumerate(lines)
                if line.startswith("#SBATCH")]
  # sbatch stops reading directives at the first command.
  assert all(not lines[i].strip() or lines[i].startswith("#")
             for i in range(directives[-1]))
  options = {lines[i].split()[1] for i in directives}
  assert {"--signal=B:USR1@300", "--requeue", "--open-mode=append",
          "--ntasks-per-node=1", "--gpus-per-node=8"} <= options


def test_xla_flags_parse_and_the_jobset_uses_the_same(cluster):
  yaml = pytest.importorskip("yaml")
  rc, err, log = _sbatch(cluster, "finish")
  assert rc == 0, err
  env = dict(line.split("=", 1)
             for line in (log / "python.env").read_text().splitlines())
  flags = env["XLA_FLAGS"].split()
  # XLA aborts a start on a flag it does not know: parse them with this
  # jaxlib (the GPU flags are known to every build).
  run_env = faults._env()   # pylint: disable=protected-access
  run_env["XLA_FLAGS"] = " ".join(flags)
  r = subprocess.run([sys.executable, "-c",
                      "import jax; jax.numpy.zeros(1).block_until_ready()"],
                     env=run_env, capture_output=True, text=True,
                     timeout=120, check=False)
  assert r.returncode == 0, r.stderr[-2000:]
  spec = yaml.safe_load(JOBSET.read_text())
  job = spec["spec"]["replicatedJobs"][0]["template"]["spec"]
  pod = job["template"]["spec"]
  container = pod["containers"][0]
  k8s_env = {e["name"]: e["value"] for e in container["env"]}
  assert sorted(k8s_env["XLA_FLAGS"].split()) == sorted(flags)
  for key in ("XLA_PYTHON_CLIENT_MEM_FRACTION", "NCCL_DEBUG"):
    assert k8s_env[key] == env[key]
  # Exit codes that a restart would repeat fail the JobSet.
  rule = job["podFailurePolicy"]["rules"][0]
  assert rule["action"] == "FailJob"
  assert sorted(rule["onExitCodes"]["values"]) == [
      EXIT_ERROR, EXIT_NONFINITE, EXIT_SKIPPED]
  assert pod["restartPolicy"] == "Never"
  assert pod["terminationGracePeriodSeconds"] >= 300
