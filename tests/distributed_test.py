"""Multi-process runs: 2 processes give the 1-process losses; launch errors.

A 2-process run (experiments/launch_local.sh: 1 CPU device each, gloo
collectives) and a 1-process run on 2 CPU devices see the same global
batches (synthetic tokens, each process its rows) and the same mesh size, so
they run the same program up to the order of cross-device sums.
"""

import json
import os
import socket
import subprocess
import sys

import pytest

from fp4jax import distributed
import faults

# 1-process vs 2-process losses, f32 master: both sum the same 2 per-device
# partial gradients / losses, once inside one XLA program and once over
# gloo; a 2-term f32 sum is exact up to its final rounding (2^-24 relative)
# and the steps compound it a little. A wrong split of the data (a repeated
# or missing row) moves the loss by >= 1e-3.
PROCESS_LOSS_RTOL = 1e-6

# Another mesh, f32 compute: tensor / fsdp splits reassociate the f32 sums
# of the matmuls and the loss (~1e3 terms, a few ulps each: ~1e-6); a wrong
# restore (a permuted or stale shard) moves the loss by >= 1e-3.
MESH_LOSS_RTOL = 2e-5

LAUNCH = str(faults.ROOT / "experiments" / "launch_local.sh")


def _losses(workdir) -> dict[int, float]:
  out = {}
  for line in (workdir / "metrics.jsonl").read_text().splitlines():
    r = json.loads(line)
    if "loss" in r:
      out[r["step"]] = r["loss"]
  return out


def _args(recipe, workdir):
  # One layer: the processes split rows and sum gradients the same way
  # whatever the depth, and each run compiles half the blocks.
  return (f"--config=configs/demo.py:smoke,recipe={recipe}",
          f"--workdir={workdir}", "--config.log_every=1",
          "--config.model.n_layers=1",
          "--config.model.compute_dtype=float32", "--config.eval_steps=0")


def _two_process_run(recipe, tmp_path):
  one = tmp_path / "one"
  env = faults._env()   # pylint: disable=protected-access
  env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
  r = subprocess.run([sys.executable, "-m", "fp4jax.main",
                      *_args(recipe, one)],
                     cwd=faults.ROOT, env=env, capture_output=True,
                     text=True, timeout=600, check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  two = tmp_path / "two"
  env = faults._env()   # pylint: disable=protected-access
  env["PYTHON"] = sys.executable
  r = subprocess.run([LAUNCH, "2", *_args(recipe, two)], cwd=faults.ROOT,
                     env=env, capture_output=True, text=True, timeout=600,
                     check=False)
  assert r.returncode == 0, r.stderr[-3000:]
  assert "process 1 of 2" in r.stderr and "process 0 of 2" in r.stderr
  return _losses(one), _losses(two), two


def _assert_close(a, b):
  assert sorted(a) == sorted(b) == list(range(1, 7))
  for step in a:
    assert abs(a[step] - b[step]) <= PROCESS_LOSS_RTOL * abs(a[step]), (
        step, a[step], b[step])


def test_two_processes_give_the_one_process_losses_bf16(tmp_path):
  one, two, workdir = _two_process_run("bf16", tmp_path)
  _assert_close(one, two)
  # One metrics writer (process 0), one checkpoint per step.
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]


@pytest.mark.slow
def test_two_processes_give_the_one_process_losses_fp4_paper(tmp_path):
  one, two, _ = _two_process_run("fp4_paper", tmp_path)
  _assert_close(one, two)


@pytest.mark.parametrize("keys,match", [
    ({"num_processes": 2}, "coordinator_address is not"),
    ({"coordinator_address": "localhost"}, "must be host:port"),
    ({"coordinator_address": "127.0.0.1:9", "num_processes": 2,
      "process_id": 2}, "process_id=2 is out of range"),
    ({"coordinator_address": "127.0.0.1:9"}, "needs distributed.num_processes"),
    ({"timeout_s": 0}, "timeout_s must be an int >= 1"),
])
def test_bad_distributed_keys_name_the_key(keys, match):
  section = {"coordinator_address": "", "num_processes": 0, "process_id": -1,
             "local_device_ids": "", "timeout_s": 120, **keys}
  with pytest.raises(ValueError, match=match) as e:
    distributed.validate(section)
  assert "\n" not in str(e.value)


def test_an_absent_coordinator_is_one_line_not_a_hang(tmp_path):
  r = faults.run_main(
      "--config=configs/demo.py:smoke", f"--workdir={tmp_path}/w",
      "--config.distributed.coordinator_address=127.0.0.1:1",
      "--config.distributed.num_processes=2",
      "--config.distributed.process_id=1", "--config.distributed.timeout_s=2")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert faults.last_line(r.stderr).startswith(
      "error: distributed: no coordinator answers at 127.0.0.1:1")
  assert not (tmp_path / "w").exists()


def test_a_second_process_0_is_one_line_naming_the_key(tmp_path):
  # Someone (a first process 0's coordinator) already listens on the port.
  with socket.socket() as taken:
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    port = taken.getsockname()[1]
    r = faults.run_main(
        "--config=configs/demo.py:smoke", f"--workdir={tmp_path}/w",
        f"--config.distributed.coordinator_address=127.0.0.1:{port}",
        "--config.distributed.num_processes=2",
        "--config.distributed.process_id=0",
        "--config.distributed.timeout_s=2")
  assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr
  assert faults.last_line(r.stderr).startswith(
      f"error: distributed: port {port} of distributed.coordinator_address")
  assert "distributed.process_id=0" in faults.last_line(r.stderr)
  assert not (tmp_path / "w").exists()


# ---------------------------------------------- restore onto another mesh


def test_a_checkpoint_restores_onto_other_meshes_and_trains_on(tmp_path):
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import demo  # pylint: disable=g-import-not-at-top
  from fp4jax import checkpoint, data, optim, runconfig, sharding  # pylint: disable=g-import-not-at-top
  from fp4jax import train_state  # pylint: disable=g-import-not-at-top
  import harness  # pylint: disable=g-import-not-at-top
  cfg = demo.get_config("smoke,recipe=bf16")
  cfg.model.n_layers = 1
  cfg.model.compute_dtype = "float32"
  model_cfg = runconfig.model_config(cfg.model.to_dict(), cfg.data.vocab_size)
  rules, _ = runconfig.quant_rules(cfg.quant)

  def trainer(mesh):
    return train_state.make_trainer(
        model_cfg, rules, optim.OptimConfig(moments="paper"), num_steps=10,
        mesh=mesh, global_batch=cfg.data.global_batch,
        seq_len=cfg.data.seq_len, seed=0)

  it = data.make_input(cfg.data, split="train", seed=0)
  batch = next(it)
  saved_on = trainer(sharding.make_mesh(8, 1, 1))
  state, _ = saved_on.train_step(saved_on.init(), saved_on.put_batch(batch))
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.save(1, state, it.get_state(), force=True)
  ckpt.wait()
  want = harness.host_tree(state)
  _, want_metrics = saved_on.train_step(state, saved_on.put_batch(batch))
  for mesh in (sharding.make_mesh(1, 4, 2),
               sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1])):
    other = trainer(mesh)
    got, data_state = ckpt.restore(other.abstract_state, 1)
    assert data_state == it.get_state()
    jax.tree.map(np.testing.assert_array_equal, harness.host_tree(got), want)
    leaf = jax.tree.leaves(got.params)[0]
    assert leaf.sharding.mesh.shape == mesh.shape
    # Training continues: the next step's loss equals the 8-device one.
    _, m = other.train_step(got, other.put_batch(batch))
    np.testing.assert_allclose(float(m["loss"]), float(want_metrics["loss"]),
                               rtol=MESH_LOSS_RTOL)
  ckpt.close()
