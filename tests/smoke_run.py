"""A finished 6-step smoke run that workdir fault tests copy and damage.

`base_run` (module-scoped fixture; import it into a test module): the bf16
demo smoke config with one layer, fp32 moments, checkpoints at steps 3 and
6. `config(**updates)` builds that config with dotted-key updates;
`copy(base_run, tmp_path)` gives a test its own copy to damage.
"""

import pathlib
import shutil

import pytest

from configs import demo
from fp4jax import checkpoint
from fp4jax import train
import harness


def config(**updates):
  c = demo.get_config("smoke,recipe=bf16")
  c.model.n_layers = 1
  c.num_steps, c.log_every, c.checkpoint_every = 6, 1, 3
  c.eval_every, c.eval_steps = 0, 1
  return harness.set_keys(c, updates)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
  """A finished 6-step run with checkpoints at steps 3 and 6."""
  workdir = tmp_path_factory.mktemp("base") / "run"
  train.train_and_evaluate(config(), str(workdir))
  assert checkpoint.complete_steps(str(workdir)) == [3, 6]
  return workdir


def copy(base_run, tmp_path) -> pathlib.Path:   # pylint: disable=redefined-outer-name
  workdir = tmp_path / "run"
  shutil.copytree(base_run, workdir)
  return workdir
