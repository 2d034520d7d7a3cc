"""Tests of configs/*.py and of the command line's handling of bad input.

Bad settings must fail at start, in one line, before anything is compiled
or written; train_and_evaluate is called in-process for those, and the
entry point runs in a subprocess for the flag-level checks.
"""

import ast
import dataclasses
import importlib
import os
import pathlib
import subprocess
import sys

import pytest

from configs import default
from fp4jax import llama
from fp4jax import optim
from fp4jax import qconfig
from fp4jax import runconfig
from fp4jax import train
import harness

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIGS = sorted(f"configs.{p.stem}" for p in (ROOT / "configs").glob("*.py")
                 if p.stem not in ("__init__", "common", "models")) + sorted(
                     f"experiments.{p.stem}"
                     for p in (ROOT / "experiments").glob("*.py")
                     if p.stem not in ("arms", "run"))


def _assigned_keys(tree: ast.AST) -> dict[str, int]:
  """'c.optim.lr' -> line number, for every `c.<...> = value` statement."""
  out = {}
  for node in ast.walk(tree):
    if isinstance(node, ast.Assign):
      for t in node.targets:
        if isinstance(t, ast.Attribute):
          out[ast.unparse(t)] = node.lineno
  return out


def test_every_default_key_has_a_comment():
  path = ROOT / "configs" / "default.py"
  lines = path.read_text().splitlines()
  assigned = _assigned_keys(ast.parse(path.read_text()))
  cfg = default.get_config()
  leaves = []
  for key, value in cfg.items():
    if hasattr(value, "items"):
      leaves += [f"{key}.{k}" for k in value]
    else:
      leaves.append(key)
  for key in leaves:
    assert f"c.{key}" in assigned, f"{key} is not assigned as c.{key} = ..."
    line = lines[assigned[f"c.{key}"] - 1]
    assert "#" in line and line.split("#", 1)[1].strip(), (
        f"configs/default.py: {key} has no comment")


def test_default_sections_equal_the_dataclass_fields():
  cfg = default.get_config()
  fields = {f.name for f in dataclasses.fields(llama.LlamaConfig)}
  # LlamaConfig.gemm (how the GEMMs run) has its own section, `gemm`.
  assert set(cfg.model) == (fields - {"gemm"}) | {"size"}
  assert set(cfg.gemm) == {f.name for f in dataclasses.fields(
      qconfig.Execution)}
  qconfig.Execution(**cfg.gemm.to_dict())    # the defaults are valid
  assert set(cfg.optim) == {f.name for f in dataclasses.fields(
      optim.OptimConfig)}
  optim.OptimConfig(**cfg.optim.to_dict())   # the defaults are valid


@pytest.mark.parametrize("name", CONFIGS)
def test_config_builds_and_converts(name):
  module = importlib.import_module(name)
  cfg = module.get_config()
  model_cfg = runconfig.model_config(cfg.model.to_dict(), cfg.data.vocab_size)
  assert model_cfg.vocab_size == cfg.data.vocab_size
  runconfig.quant_rules(cfg.quant)
  optim.validate_schedule(optim.OptimConfig(**cfg.optim.to_dict()),
                          cfg.num_steps)
  assert cfg.data.seq_len <= model_cfg.max_seq_len


def test_demo_variants():
  from configs import demo  # pylint: disable=g-import-not-at-top
  assert demo.get_config().quant.recipe == "fp4_paper"
  assert demo.get_config("recipe=bf16").quant.recipe == "bf16"
  assert demo.get_config("smoke").model.size == "tiny"
  with pytest.raises(ValueError, match="unknown config arg"):
    demo.get_config("recipee=bf16")


def _bad(**updates):
  from configs import demo  # pylint: disable=g-import-not-at-top
  return harness.set_keys(demo.get_config("smoke,recipe=bf16"), updates)


@pytest.mark.parametrize("updates,match", [
    ({"quant.recipe": "fp5"}, "unknown recipe 'fp5'"),
    ({"quant.overrides": {"occ_alfa": 0.9}}, "occ_alfa"),
    ({"quant.rules": ((r".*\.q_prj", "fp8"),)}, "matched no layer"),
    ({"model.size": "huge"}, "model.size"),
    ({"model.n_heads": 5}, "n_heads=5 does not divide d_model"),
    ({"mesh.data": 3}, "mesh.data=3"),
    ({"mesh.tensor": 8, "model.d_ff": 100}, "not divisible by mesh"),
    ({"data.global_batch": 6}, "data.global_batch=6"),
    ({"data.seq_len": 1000}, "data.seq_len=1000"),
    ({"optim.lr": -1.0}, "optim.lr"),
    ({"data.source": "parquet"}, "data.source"),
    ({"log_every": 0}, "log_every"),
])
def test_bad_settings_fail_in_one_line_before_writing(updates, match,
                                                      tmp_path):
  workdir = tmp_path / "run"
  with pytest.raises(ValueError, match=match) as e:
    train.train_and_evaluate(_bad(**updates), str(workdir))
  assert "\n" not in str(e.value)
  assert not workdir.exists()


def _main(*args):
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  return subprocess.run(
      [sys.executable, "-m", "fp4jax.main", *args], cwd=ROOT, env=env,
      capture_output=True, text=True, timeout=300, check=False)


def test_main_rejects_a_misspelt_override_naming_valid_keys(tmp_path):
  r = _main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}/w",
            "--config.optim.lrr=0.1")
  assert r.returncode != 0
  last = r.stderr.strip().splitlines()[-1]
  assert "unknown config key 'optim.lrr'" in last and "'lr'" in last
  assert not (tmp_path / "w").exists()


def test_main_prints_bad_values_in_one_line(tmp_path):
  r = _main("--config=configs/demo.py:smoke", f"--workdir={tmp_path}/w",
            "--config.model.size=huge")
  assert r.returncode == 1
  assert r.stderr.strip().splitlines()[-1].startswith(
      "error: unknown model.size 'huge'")
  assert "Traceback" not in r.stderr
  assert not (tmp_path / "w").exists()
