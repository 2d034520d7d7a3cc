"""Tests of checkpoint.py: round trip, retention, donation safety, run info.

No model is compiled here: the state is a small hand-built TrainState with
the same kinds of leaves as a real one (sharded Params with logical names,
the FP8/FP16 Adam state, a typed key).
"""

import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import demo
from fp4jax import checkpoint
from fp4jax import optim
from fp4jax import sharding
from fp4jax import train
from fp4jax import train_state
import harness

OPTIM = optim.OptimConfig(moments="paper")   # e4m3 / f16 leaves round-trip


class _Tiny(nnx.Module):

  def __init__(self, rngs):
    init = sharding.param_init(nnx.initializers.normal(1.0), ("embed", "mlp"))
    self.kernel = nnx.Param(init(rngs.params(), (16, 8), jnp.float32))
    self.scale = nnx.Param(jnp.ones((8,), jnp.float32))


def _state(mesh):
  tx = optim.make_optimizer(OPTIM, 10)

  def init():
    params = nnx.state(_Tiny(nnx.Rngs(0)), nnx.Param)
    return train_state.TrainState(
        step=jnp.int32(3), params=params, opt_state=tx.init(params),
        rng=jax.random.key(7), skipped=jnp.int32(1))

  abstract = jax.eval_shape(init)
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  shardings = jax.tree.map(
      lambda a, s: s if len(s.spec) <= len(a.shape) else replicated,
      abstract, sharding.state_shardings(abstract, mesh))
  state = jax.jit(init, out_shardings=shardings)()
  # One real update, so the moments and scales are not trivial.
  grads = jax.tree.map(jnp.ones_like, state.params)
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  state = state.replace(params=optim.apply_updates(state.params, updates,
                                                   OPTIM),
                        opt_state=opt_state)
  target = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, shardings)
  return state, target


_host = harness.host_tree


@pytest.fixture(scope="module")
def mesh():
  return sharding.make_mesh(2, 2, 2)


def test_round_trip_is_exact_with_dtypes_and_shardings(mesh, tmp_path):
  state, target = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2)
  assert ckpt.save(3, state, {"source": "synthetic", "position": 3})
  ckpt.wait()
  got, data_state = ckpt.restore(target)
  ckpt.close()
  assert data_state == {"source": "synthetic", "position": 3}
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(state)):
    assert a.dtype == b.dtype and a.sharding == b.sharding
  dtypes = {str(x.dtype) for x in jax.tree.leaves(got.opt_state)}
  assert {"float8_e4m3fn", "float16"} <= dtypes
  jax.tree.map(np.testing.assert_array_equal, _host(got), _host(state))


def test_interval_force_and_retention(mesh, tmp_path):
  state, _ = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=2, keep=2)
  saved = [s for s in range(1, 6) if ckpt.save(s, state, {"position": s})]
  assert saved == [2, 4]
  assert ckpt.save(5, state, {"position": 5}, force=True)
  assert not ckpt.save(5, state, {"position": 5}, force=True)  # exists
  ckpt.close()
  assert ckpt.all_steps() == [4, 5] and ckpt.latest_step() == 5


def test_async_save_survives_donation_of_the_saved_buffers(mesh, tmp_path):
  state, target = _state(mesh)
  want = _host(state)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.save(1, state, {"position": 1})
  # Overwrite the saved buffers while the write may still be in flight.
  clobber = jax.jit(lambda s: jax.tree.map(lambda x: x, s.replace(
      params=jax.tree.map(lambda p: p * 0 + 7, s.params))), donate_argnums=0)
  jax.block_until_ready(clobber(state))
  got, _ = ckpt.restore(target, 1)
  ckpt.close()
  jax.tree.map(np.testing.assert_array_equal, _host(got), want)


def test_restore_into_a_different_shape_is_a_value_error(mesh, tmp_path):
  state, target = _state(mesh)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=1)
  ckpt.save(1, state, {"position": 1})
  ckpt.wait()
  bad = jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      tuple(2 * d for d in a.shape), a.dtype, sharding=a.sharding), target)
  with pytest.raises(ValueError, match="does not match"):
    ckpt.restore(bad)
  ckpt.close()


def test_run_info_mismatch_names_the_field(tmp_path):
  info = {"model": {"d_model": 64, "n_layers": 2}, "quant": {"recipe": "a"}}
  checkpoint.write_run_info(str(tmp_path), info)
  checkpoint.check_run_info(str(tmp_path), info)
  checkpoint.check_run_info(str(tmp_path), {**info, "quant": {"recipe": "b"}})
  other = {**info, "model": {"d_model": 64, "n_layers": 3}}
  with pytest.raises(ValueError, match=r"model\.n_layers is 2 there but 3"):
    checkpoint.check_run_info(str(tmp_path), other)
  checkpoint.write_run_info(str(tmp_path), other)   # first start only
  saved = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
  assert saved["model"]["n_layers"] == 2


def test_workdir_of_another_model_is_rejected_untouched(tmp_path):
  """train_and_evaluate fails before writing anything (no compile needed)."""
  cfg = demo.get_config("smoke,recipe=bf16")
  checkpoint.write_run_info(str(tmp_path), {"model": {"n_layers": 7}})
  (tmp_path / "checkpoints" / "5").mkdir(parents=True)
  before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
  text = (tmp_path / checkpoint.CONFIG_FILE).read_text()
  with pytest.raises(ValueError, match=r"model\.") as e:
    train.train_and_evaluate(cfg, str(tmp_path))
  assert "\n" not in str(e.value)
  assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before
  assert (tmp_path / checkpoint.CONFIG_FILE).read_text() == text


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_stop_signals_set_the_flag_and_restore_the_handlers(signum):
  previous = {s: signal.getsignal(s) for s in checkpoint.STOP_SIGNALS}
  with checkpoint.stop_flag() as flag:
    assert not flag.is_set()
    signal.raise_signal(signum)
    assert flag.is_set() and flag.signum == signum
    if signum == signal.SIGINT:   # Ctrl-C twice aborts at once
      with pytest.raises(KeyboardInterrupt):
        signal.raise_signal(signal.SIGINT)
  assert {s: signal.getsignal(s) for s in checkpoint.STOP_SIGNALS} == previous


@pytest.mark.slow
def test_main_saves_and_exits_cleanly_on_sigterm(tmp_path):
  root = pathlib.Path(__file__).resolve().parents[1]
  workdir = tmp_path / "run"
  env = dict(os.environ, PYTHONPATH=str(root), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen(
      [sys.executable, "-m", "fp4jax.main",
       "--config=configs/demo.py:smoke,recipe=bf16", f"--workdir={workdir}",
       "--config.num_steps=500", "--config.log_every=1",
       "--config.checkpoint_every=1000"],
      cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
      text=True)
  metrics_file = workdir / "metrics.jsonl"
  deadline = time.time() + 600
  while not (metrics_file.exists() and metrics_file.read_text()):
    assert proc.poll() is None and time.time() < deadline, proc.stdout.read()
    time.sleep(0.5)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=300)
  assert proc.returncode == 128 + signal.SIGTERM, out   # preempted, saved
  assert out.strip().splitlines()[-1].startswith("stopped by SIGTERM at step")
  last = json.loads(metrics_file.read_text().splitlines()[-1])["step"]
  assert 0 < last < 500
  steps = [int(p.name) for p in (workdir / "checkpoints").iterdir()]
  assert steps == [last], out
