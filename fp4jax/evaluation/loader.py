"""A trained model out of a run directory: config, parameters, tokenizer.

Owns: rebuilding a run's model from its `config.json` (the record every run
writes at start), restoring the parameters of one checkpoint step (any
recipe, any mesh it was saved on; by default the newest complete one that
reads, skipping with a warning one that is damaged or deleted meanwhile by
a live run), and finding its tokenizer; and the evaluation precisions:

  train: the forward the checkpoint's step was trained with (its recipe's
         quantized projections, the run's compute dtype; a resume with
         another recipe, or quant.switch_back, counts: `runrecord`);
  bf16:  no quantization, bfloat16 compute;
  f32:   no quantization, float32 compute.

Must not import: ml_collections, tensorflow_datasets, grain, or the CLI
modules (evaluate, export, main).
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

import jax
from flax import nnx

from fp4jax import checkpoint
from fp4jax import models
from fp4jax import optim
from fp4jax import recast
from fp4jax import runrecord
from fp4jax import sharding
from fp4jax import runconfig
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
    recipe: the recipe the step's last training steps ran (the
      changes of resumed starts and quant.switch_back applied, e.g. "bf16"
      for an FP4 run finished in BF16, "nvfp4+bf16_forward").
    quant_table: projection path -> recipe name ("none" = unquantized) of
      the model evaluated.
    mesh: the mesh params live on.
    run_config: the config the step was trained with (config.json's
      "config" with the changes of later starts, `runrecord`).
  """
  model_cfg: Any
  graphdef: Any
  params: Any
  tokenizer: tokenizer_lib.Tokenizer | None
  step: int
  recipe: str
  quant_table: dict[str, str]
  mesh: jax.sharding.Mesh
  run_config: dict[str, Any]

  def model(self) -> nnx.Module:
    return nnx.merge(self.graphdef, self.params)


def tokenizer_path(workdir: str, run_config: dict[str, Any]) -> str | None:
  """The run's tokenizer model file, or None if it has none."""
  given = run_config.get("data", {}).get("tokenizer_model", "")
  if given:
    return given
  stored = os.path.join(workdir, pipeline.TOKENIZER_FILE)
  return stored if os.path.isfile(stored) else None


def _warn(message: str) -> None:
  print(f"warning: {message}", file=sys.stderr)


def _key(mapping: Any, dotted: str, where: str) -> Any:
  """mapping[a][b]... for dotted "a.b...", or a ValueError naming the key."""
  node = mapping
  for part in dotted.split("."):
    if not isinstance(node, dict) or part not in node:
      raise ValueError(f"{where} has no key {dotted!r}: not a run "
                       f"description this fp4jax can load")
    node = node[part]
  return node


def load(workdir: str, step: int | None = None, precision: str = "train",
         need_tokenizer: bool = True,
         warn: Callable[[str], None] = _warn) -> Loaded:
  """Restores the model of `workdir` at `step` (default: the newest).

  Only complete checkpoints count (`checkpoint.complete_steps`). Without a
  `step`, a newest one that turns out unreadable, or is deleted while it is
  read (a live run's rotation), is skipped with a `warn` line naming it and
  why, and the newest remaining one is read instead.

  Args:
    workdir: a run directory (config.json, checkpoints/).
    step: checkpoint step; None = the newest complete one.
    precision: one of PRECISIONS.
    need_tokenizer: raise if the run has no tokenizer (text tasks).
    warn: called with each one-line warning (default: "warning: ..." on
      stderr).

  Returns:
    A `Loaded` with parameters on the first local device.

  Raises:
    ValueError / FileNotFoundError: one line naming the workdir, step,
      file or config.json key that is missing or unreadable.
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
  where = os.path.join(workdir, checkpoint.CONFIG_FILE)
  steps = checkpoint.complete_steps(workdir)
  if not steps:
    raise FileNotFoundError(f"--workdir {workdir!r} has no complete "
                            f"checkpoint")
  if step is not None and step not in steps:
    raise ValueError(f"--step {step}: no complete checkpoint of that step in "
                     f"{workdir!r} (have {steps})")
  run_config = _key(info, "config", where)
  # What the step to read was trained with: a resume may have changed the
  # recipe or the optimizer's storage since config.json (runrecord).
  info = {**info, "config": runrecord.config_at_step(
      workdir, steps[-1] if step is None else step)}
  run_config = info["config"]
  try:
    family = models.get_family(info.get("model_family", "llama"))
    trained_cfg = family.config(**_key(info, "model", where))
    rules, recipe = runconfig.quant_rules(_key(info, "config.quant", where),
                                      trained_cfg.n_layers)
    optim_cfg = optim.OptimConfig(**_key(info, "config.optim", where))
    num_steps = _key(info, "config.num_steps", where)
    seed = _key(info, "config.seed", where)
    source = _key(info, "config.data", where).get("source", "?")
  except KeyError as e:   # a key runconfig.quant_rules reads
    raise ValueError(f"{where} has no key 'config.quant.{e.args[0]}': not a "
                     f"run description this fp4jax can load") from None
  except (TypeError, AttributeError) as e:  # wrong fields or kinds
    raise ValueError(f"{where} does not describe a run this fp4jax can "
                     f"load: {e}") from None
  tok = None
  path = tokenizer_path(workdir, run_config)
  if path is not None:
    try:
      tok = tokenizer_lib.Tokenizer.load(path, key="the run's tokenizer")
    except FileNotFoundError:
      raise
    except Exception as e:  # sentencepiece's own errors on a damaged file
      text = str(e).strip()
      raise ValueError(f"the run's tokenizer {path} is unreadable: "
                       f"{type(e).__name__}: "
                       f"{text.splitlines()[0] if text else ''}") from None
  elif need_tokenizer:
    raise ValueError(f"--workdir {workdir!r}: the run has no tokenizer "
                     f"(data.source={source!r}); text tasks need one")
  # One device: evaluation batches are small and a replicated model on
  # several would repeat the same work on each.
  mesh = sharding.make_mesh(1, 1, 1, devices=jax.local_devices()[:1])

  def abstract_for(step: int) -> Any:
    # The layers as that step stores them (a run may resume with
    # model.scan_layers changed): evaluation and export read either.
    try:
      stacked = recast.stored_stacked(recast.stored_leaves(workdir, step))
    except checkpoint.UnreadableCheckpoint:
      stacked = None   # the restore itself names what is wrong
    cfg = trained_cfg if stacked is None else dataclasses.replace(
        trained_cfg, scan_layers=stacked)
    return train_state.abstract_state(
        cfg, rules, optim_cfg, num_steps=num_steps, mesh=mesh, seed=seed)[1]

  state, step = _restore(workdir, step, abstract_for, warn)
  trained_cfg = dataclasses.replace(trained_cfg, scan_layers=(
      recast.stored_stacked(recast.leaf_names(state)) or False))
  # The step read may be an older one (the newest was unreadable); past
  # quant.switch_back its last steps ran the switched-back forward.
  run_config = runrecord.config_at_step(workdir, step)
  rules, recipe_label = runconfig.rules_at_step(
      run_config["quant"], run_config["num_steps"], trained_cfg.n_layers,
      step)
  params = optim.params_for_grad(state.params, optim_cfg)
  model_cfg = trained_cfg
  if precision != "train":
    rules = None
    model_cfg = dataclasses.replace(
        trained_cfg, compute_dtype="bfloat16" if precision == "bf16"
        else "float32")
  abstract_model = models.abstract(model_cfg,
                                   models.layer_table(model_cfg, rules))
  graphdef, _ = nnx.split(abstract_model, nnx.Param)
  return Loaded(model_cfg=model_cfg, graphdef=graphdef, params=params,
                tokenizer=tok, step=step, recipe=recipe_label,
                quant_table=dict(abstract_model.quant_table), mesh=mesh,
                run_config=run_config)


# Newest steps tried before giving up: a live run may keep deleting the one
# being read, but not forever.
_MAX_TRIES = 8


def _restore(workdir: str, step: int | None,
             abstract_for: Callable[[int], Any],
             warn: Callable[[str], None]) -> tuple[Any, int]:
  """(TrainState, its step): `step`, or the newest one that reads, into
  `abstract_for(step)`."""
  if step is not None:
    return checkpoint.restore_state(workdir, step, abstract_for(step)), step
  skipped: set[int] = set()
  while True:
    left = [s for s in checkpoint.complete_steps(workdir)
            if s not in skipped]
    if not left or len(skipped) >= _MAX_TRIES:
      raise ValueError(f"--workdir {workdir!r}: no readable checkpoint "
                       f"(skipped steps {sorted(skipped)}, see above)")
    step = left[-1]
    try:
      return checkpoint.restore_state(workdir, step, abstract_for(step)), step
    except (checkpoint.UnreadableCheckpoint,
            checkpoint.CheckpointRemoved) as e:
      skipped.add(step)
      older = [s for s in checkpoint.complete_steps(workdir)
               if s not in skipped]
      then = f"; using step {older[-1]}" if older else ""
      warn(f"{e}{then}")
