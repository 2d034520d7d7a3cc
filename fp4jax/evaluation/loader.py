"""A trained model out of a run directory: config, parameters, tokenizer.

Owns: rebuilding a run's model from its `config.json` (the record every run
writes at start), restoring the parameters of one checkpoint step (any
recipe, any mesh it was saved on), and finding its tokenizer; and the
evaluation precisions:

  train: the training recipe's forward (quantized projections as trained,
         the run's compute dtype);
  bf16:  no quantization, bfloat16 compute;
  f32:   no quantization, float32 compute.

Must not import: ml_collections, tensorflow_datasets, grain, or the CLI
modules (evaluate, export, main).
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

import jax
from flax import nnx

from fp4jax import checkpoint
from fp4jax import llama
from fp4jax import optim
from fp4jax import sharding
from fp4jax import train
from fp4jax import train_state
from fp4jax.data import pipeline
from fp4jax.data import tokenizer as tokenizer_lib

PRECISIONS = ("train", "bf16", "f32")


@dataclasses.dataclass
class Loaded:
  """A restored model.

  Attributes:
    model_cfg: the model shape and numerics evaluation runs with.
    graphdef: nnx GraphDef of that model.
    params: nnx.State of parameters (on `mesh`).
    tokenizer: the run's `tokenizer.Tokenizer`, or None (synthetic data).
    step: the checkpoint step restored.
    recipe: the training recipe's name.
    quant_table: projection path -> recipe name ("none" = unquantized) of
      the model evaluated.
    mesh: the mesh params live on.
    run_config: the run's config dict (config.json's "config").
  """
  model_cfg: llama.LlamaConfig
  graphdef: Any
  params: Any
  tokenizer: tokenizer_lib.Tokenizer | None
  step: int
  recipe: str
  quant_table: dict[str, str]
  mesh: jax.sharding.Mesh
  run_config: dict[str, Any]

  def model(self) -> llama.Llama:
    return nnx.merge(self.graphdef, self.params)


def tokenizer_path(workdir: str, run_config: dict[str, Any]) -> str | None:
  """The run's tokenizer model file, or None if it has none."""
  given = run_config.get("data", {}).get("tokenizer_model", "")
  if given:
    return given
  stored = os.path.join(workdir, pipeline.TOKENIZER_FILE)
  return stored if os.path.isfile(stored) else None


def load(workdir: str, step: int | None = None, precision: str = "train",
         need_tokenizer: bool = True) -> Loaded:
  """Restores the model of `workdir` at `step` (default: the newest).

  Args:
    workdir: a run directory (config.json, checkpoints/).
    step: checkpoint step; None = the newest complete one.
    precision: one of PRECISIONS.
    need_tokenizer: raise if the run has no tokenizer (text tasks).

  Returns:
    A `Loaded` with parameters on the first local device.

  Raises:
    ValueError / FileNotFoundError: one line naming the workdir, step or
      file that is missing or unreadable.
  """
  if precision not in PRECISIONS:
    raise ValueError(f"--precision must be one of {PRECISIONS}, got "
                     f"{precision!r}")
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir: no such directory {workdir!r}")
  if not os.path.isfile(os.path.join(workdir, checkpoint.CONFIG_FILE)):
    raise FileNotFoundError(f"--workdir {workdir!r} has no "
                            f"{checkpoint.CONFIG_FILE}: not a run directory")
  info = checkpoint.read_run_info(workdir)
  steps = checkpoint.complete_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"--workdir {workdir!r} has no complete "
                            f"checkpoint")
  if step is None:
    step = steps[-1]
  elif step not in steps:
    raise ValueError(f"--step {step}: no complete checkpoint of that step in "
                     f"{workdir!r} (have {steps})")
  run_config = info["config"]
  trained_cfg = llama.LlamaConfig(**info["model"])
  rules, recipe = train.quant_rules(run_config["quant"],
                                    trained_cfg.n_layers)
  tok = None
  path = tokenizer_path(workdir, run_config)
  if path is not None:
    tok = tokenizer_lib.Tokenizer.load(path, key="the run's tokenizer")
  elif need_tokenizer:
    raise ValueError(f"--workdir {workdir!r}: the run has no tokenizer "
                     f"(data.source={run_config['data']['source']!r}); text "
                     f"tasks need one")
  # One device: evaluation batches are small and a replicated model on
  # several would repeat the same work on each.
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])
  optim_cfg = optim.OptimConfig(**run_config["optim"])
  _, abstract = train_state.abstract_state(
      trained_cfg, rules, optim_cfg, num_steps=run_config["num_steps"],
      mesh=mesh, seed=run_config["seed"])
  state = checkpoint.restore_state(workdir, step, abstract)
  params = optim.params_for_grad(state.params, optim_cfg)
  model_cfg = trained_cfg
  if precision != "train":
    rules = None
    model_cfg = dataclasses.replace(
        trained_cfg, compute_dtype="bfloat16" if precision == "bf16"
        else "float32")
  abstract_model = nnx.eval_shape(lambda: llama.Llama(
      model_cfg, rules=rules, rngs=nnx.Rngs(params=jax.random.key(0))))
  graphdef, _ = nnx.split(abstract_model, nnx.Param)
  return Loaded(model_cfg=model_cfg, graphdef=graphdef, params=params,
                tokenizer=tok, step=step, recipe=recipe.name,
                quant_table=dict(abstract_model.quant_table), mesh=mesh,
                run_config=run_config)
