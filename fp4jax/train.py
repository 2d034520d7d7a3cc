"""The training loop: config in, checkpoints and metrics out.

Owns: `train_and_evaluate` (turns the ConfigDict into LlamaConfig, quant
rules, OptimConfig, mesh and input iterators once; resumes or initialises
the state; runs, logs, evaluates and checkpoints), `finished_step`, and the
ways a run ends other than finishing: `NonFiniteError`, `Stopped` (a stop
signal, after saving) and `TooManySkipped`.

Start order (each stage only after the one before passed): every config
check that needs no data (loop keys, schedule, recipe, mesh, model shape
and its fit to the mesh, attention backend, the workdir's config.json); the
workdir is usable and its records agree with its checkpoints (a run that
reached a step but has no checkpoint is refused, `fp4jax.runrecord`); the
checkpoint to resume from fits the state this start builds, from its
metadata (`fp4jax.recast`: model shape, run key, storage dtypes to
convert); there is disk space for a checkpoint; the workdir is locked
(`fp4jax.rundir`); the data stage (may write the tokenizer and prepared
data, removed again if the start fails) and the saved data position is
checked against it; the steps are compiled; the checkpoint is restored and
converted (nothing moved or written yet). Only then are config.json, the
start record (`starts.jsonl`: the step and the changed keys), checkpoints
and metrics written, so a start that fails leaves the workdir
byte-identical. The pure step functions live in `fp4jax.train_state`,
metric records in `fp4jax.metrics`, FLOP counts in `fp4jax.flops`.

Must not import: tensorflow_datasets, grain (the data sources do), or
fp4jax.main.
"""

import dataclasses
import functools
import json
import os
import re
import shutil
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from fp4jax import checkpoint
from fp4jax import data
from fp4jax import diskspace
from fp4jax import flops
from fp4jax import hf
from fp4jax import llama
from fp4jax import memory
from fp4jax import metrics as metrics_lib
from fp4jax import optim
from fp4jax import qconfig
from fp4jax import qdot
from fp4jax import recast
from fp4jax import rundir
from fp4jax import runrecord
from fp4jax import sharding
from fp4jax import sizes
from fp4jax import train_state


# Compiled trainers by their (hashable) arguments: a notebook or test that
# calls train_and_evaluate again with the same shapes does not recompile.
_make_trainer = functools.lru_cache(maxsize=2)(train_state.make_trainer)


class NonFiniteError(FloatingPointError):
  """A step produced a NaN/inf loss or gradient norm (skip_nonfinite=False)."""


class Stopped(Exception):
  """A stop signal (SIGTERM, SIGINT, SIGHUP) ended the run early; resumable.

  Attributes:
    signum: the signal.
    step: the step the run stopped at.
    saved: whether a checkpoint of `step` was written.
  """

  def __init__(self, signum: int, step: int, saved: bool):
    import signal as signal_lib  # pylint: disable=g-import-not-at-top
    name = signal_lib.Signals(signum).name
    where = (f"checkpoint of step {step} saved" if saved else
             "no new checkpoint")
    super().__init__(f"stopped by {name} at step {step} ({where}); run the "
                     f"same command to resume")
    self.signum, self.step, self.saved = signum, step, saved


class TooManySkipped(Exception):
  """The run finished but skipped more steps than config.max_skipped_fraction."""


def finished_step(config, workdir: str) -> int | None:
  """The step a finished run in `workdir` ended at, else None. Writes nothing.

  Finished: its config.json describes the same `model` section and it holds
  a complete checkpoint at or after config.num_steps.
  """
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  saved = checkpoint.read_run_info(workdir)
  if saved.get("config", {}).get("model") != json.loads(
      json.dumps(config.model.to_dict())):
    return None
  steps = checkpoint.complete_steps(workdir)
  if steps and steps[-1] >= config.num_steps:
    return steps[-1]
  return None


def model_config(model: Mapping[str, Any], data_vocab: int
                 ) -> llama.LlamaConfig:
  """LlamaConfig from the `model` section: size table + non-zero overrides.

  Args:
    model: the `model` config section (size + LlamaConfig fields, where 0
      means "from the size table" and vocab_size 0 means "from the data").
    data_vocab: the input pipeline's vocabulary size.

  Raises:
    ValueError: unknown size, invalid field, or a vocabulary smaller than
      the data's.
  """
  fields = {f.name for f in dataclasses.fields(llama.LlamaConfig)}
  overrides = {}
  for key, value in model.items():
    if key == "size":
      continue
    if key not in fields:
      raise ValueError(f"model.{key} is not a LlamaConfig field")
    unset = (not isinstance(value, bool) and isinstance(value, (int, float))
             and value == 0)
    if not unset:
      overrides[key] = value
  if "vocab_size" not in overrides:
    overrides["vocab_size"] = data_vocab
  elif overrides["vocab_size"] < data_vocab:
    raise ValueError(f"model.vocab_size={overrides['vocab_size']} is smaller "
                     f"than the data's vocabulary ({data_vocab})")
  return sizes.get_config(model["size"], **overrides)


def quant_rules(quant: Mapping[str, Any], n_layers: int | None = None
                ) -> tuple[tuple[tuple[str, Any], ...], qconfig.Recipe]:
  """(rules for llama.Llama, the main recipe) from the `quant` section.

  quant.overrides modify quant.recipe; quant.rules name recipes by RECIPES
  key ("none" = plain), and a rule naming quant.recipe gets the overridden
  one. Empty rules = `qconfig.default_rules(recipe, n_layers)` (RECIPE §5,
  plus the recipe's bf16_tail blocks kept plain).

  Raises:
    ValueError: unknown recipe, override, or malformed rule.
  """
  try:
    recipe = qdot.get_recipe(quant["recipe"], **dict(quant["overrides"]))
  except ValueError as e:
    if not quant["overrides"]:
      raise
    raise ValueError(f"quant.overrides={dict(quant['overrides'])!r} on "
                     f"recipe {quant['recipe']!r}: {e}") from None
  if not quant["rules"]:
    return tuple(qconfig.default_rules(recipe, n_layers)), recipe
  rules = []
  for rule in quant["rules"]:
    if len(rule) != 2 or not all(isinstance(r, str) for r in rule):
      raise ValueError(f"quant.rules entries must be (regex, recipe name) "
                       f"pairs, got {rule!r}")
    pattern, name = rule
    if name == "none":
      rules.append((pattern, None))
    elif name == quant["recipe"]:
      rules.append((pattern, recipe))
    else:
      rules.append((pattern, qdot.get_recipe(name)))
  return tuple(rules), recipe


SWITCH_BACK_MODES = ("forward", "all")


def switch_back_step(quant: Mapping[str, Any], num_steps: int) -> int | None:
  """The first step trained with the switched-back rules, or None (off).

  Raises:
    ValueError: naming quant.switch_back / quant.switch_back_mode.
  """
  share = quant.get("switch_back", 0.0)
  mode = quant.get("switch_back_mode", "forward")
  if (isinstance(share, bool) or not isinstance(share, (int, float))
      or not 0 <= share < 1):
    raise ValueError(f"quant.switch_back must be a share of the steps in "
                     f"[0, 1), got {share!r}")
  if mode not in SWITCH_BACK_MODES:
    raise ValueError(f"quant.switch_back_mode must be one of "
                     f"{SWITCH_BACK_MODES}, got {mode!r}")
  late = int(share * num_steps + 0.5)
  return num_steps - late if late else None


def switched_rules(rules, mode: str):
  """The layer rules for the switched-back steps: every recipe with its
  forward GEMMs in BF16 (X and W unquantized, so no OCC, DGE, rotation or
  trust mask either; the gradients keep their quantization), or no
  quantization at all (mode "all")."""
  out = []
  for pattern, recipe in rules:
    if recipe is None or mode == "all":
      out.append((pattern, None))
      continue
    out.append((pattern, dataclasses.replace(
        recipe, name=f"{recipe.name}+bf16_forward", x=None, w=None,
        occ_alpha=None, compensation=None, dge_k=None, rht_fwd=0,
        clip_mask=False)))
  return tuple(out)


def rules_at_step(quant: Mapping[str, Any], num_steps: int, n_layers: int,
                  step: int) -> tuple[tuple[tuple[str, Any], ...], str]:
  """(layer rules, recipe label) the last step before checkpoint `step`
  was trained with: `quant_rules`, switched back past
  quant.switch_back's step (label "<recipe>+bf16_forward", or "bf16" for
  switch_back_mode "all").

  Raises:
    ValueError: as `quant_rules` and `switch_back_step`.
  """
  rules, recipe = quant_rules(quant, n_layers)
  late = switch_back_step(quant, num_steps)
  if late is None or step <= late:
    return rules, recipe.name
  mode = quant.get("switch_back_mode", "forward")
  label = "bf16" if mode == "all" else f"{recipe.name}+bf16_forward"
  return switched_rules(rules, mode), label


def _check_attention(model_cfg: llama.LlamaConfig, segment_ids: bool) -> None:
  """model.attention="cudnn" where it cannot run: one line before compiling
  (the trace would fail deep inside jax)."""
  if llama.attention_impl(model_cfg.attention, segment_ids) != "cudnn":
    return
  if jax.default_backend() != "gpu":
    raise ValueError(f"model.attention='cudnn' needs an NVIDIA GPU (the "
                     f"backend is {jax.default_backend()}); use 'auto' or "
                     f"'xla'")
  if segment_ids:
    raise ValueError("model.attention='cudnn' takes no segment masks; set "
                     "data.segment_ids=False or model.attention='auto'")


def _resume_point(workdir: str, abstract: Any) -> tuple[int, Any, list[str]
                                                        ] | None:
  """(step, its stored leaves, the conversions it needs) of the checkpoint
  a start will resume from, from metadata only; None when there is none.

  The newest complete step whose metadata reads is the one checked (an
  older one is restored only if its arrays turn out damaged).

  Raises:
    ValueError: one line: the step does not fit `abstract` (recast.check).
  """
  where = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
  for step in reversed(checkpoint.complete_steps(workdir)):
    try:
      stored = recast.stored_leaves(workdir, step)
    except checkpoint.UnreadableCheckpoint:
      continue   # the restore falls back past it and says so
    return step, stored, recast.check(stored, abstract, step=step,
                                      where=where)
  return None


def _check_loop_keys(config) -> None:
  for key, low in (("num_steps", 1), ("log_every", 1), ("eval_every", 0),
                   ("eval_steps", 0), ("checkpoint_every", 1),
                   ("keep_checkpoints", 1), ("telemetry_every", 0)):
    value = config[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      raise ValueError(f"{key} must be an int >= {low}, got {value!r}")
  share = config.max_skipped_fraction
  if isinstance(share, bool) or not 0 <= share <= 1:
    raise ValueError(f"max_skipped_fraction must be in [0, 1], got "
                     f"{share!r}")


def quant_table_lines(table: Mapping[str, str]) -> list[str]:
  """Collapses "layers.<i>.<rest>" paths into one line per (rest, recipe)."""
  groups: dict[tuple[str, str], list[str]] = {}
  for path, recipe in table.items():
    m = re.fullmatch(r"layers\.(\d+)\.(.*)", path)
    key = (f"layers.*.{m.group(2)}" if m else path, recipe)
    groups.setdefault(key, []).append(m.group(1) if m else "")
  width = max(len(p) for p, _ in groups)
  out = []
  for (path, recipe), layers in groups.items():
    where = f" (layers {layers[0]}-{layers[-1]})" if layers[0] else ""
    out.append(f"  {path:<{width}}  {recipe}{where}")
  return out


def _summarize(window: list[tuple[int, dict[str, Any]]], skip: bool,
               ckpt_dir: str, latest: int | None) -> dict[str, Any]:
  """Host-side means over a log window; raises on a non-finite step."""
  fetched = jax.device_get([m for _, m in window])
  flats = [metrics_lib.flatten(m) for m in fetched]
  if not skip:
    for (step, _), f in zip(window, flats):
      if f["nonfinite"]:
        bad = "loss" if not np.isfinite(f["loss"]) else "grad_norm"
        where = (f"step {latest} in {ckpt_dir}" if latest is not None
                 else "none saved yet")
        raise NonFiniteError(
            f"step {step}: {bad} is {f[bad]} (loss {f['loss']}, grad_norm "
            f"{f['grad_norm']}); stopped without saving that state; last "
            f"checkpoint: {where}. Set skip_nonfinite=True to skip such "
            f"steps instead.")
  out: dict[str, Any] = {}
  for key in flats[-1]:
    values = np.asarray([f[key] for f in flats], np.float64)
    if key == "lr":
      out[key] = float(values[-1])
    elif key == "nonfinite":
      out["skipped"] = int(values.sum())
    else:
      finite = values[np.isfinite(values)]
      out[key] = float(finite.mean()) if finite.size else float(values[-1])
  return out


def _evaluate(trainer, state, val_it, val_start, steps: int) -> float:
  val_it.set_state(val_start)   # the same batches at every evaluation
  outs = [trainer.eval_step(state.params, state.rng,
                            trainer.put_batch(next(val_it)))
          for _ in range(steps)]
  outs = jax.device_get(outs)
  nll = sum(float(o["nll_sum"]) for o in outs)
  tokens = sum(float(o["tokens"]) for o in outs)
  return nll / max(tokens, 1.0)


def _stop_requested(flag, boundary: bool) -> bool:
  if jax.process_count() == 1:
    return flag.is_set()
  if not boundary:   # processes agree only at boundaries (one collective)
    return False
  votes = multihost_utils.process_allgather(np.int32(flag.is_set()))
  return bool(np.max(votes))


def train_and_evaluate(config, workdir: str, *,
                       stop_at_step: int | None = None,
                       metrics_fn: Any = None) -> train_state.TrainState:
  """Trains per `config`, resuming from `workdir` if it holds a checkpoint.

  Args:
    config: a ConfigDict with the keys of configs/default.py.
    workdir: run directory: checkpoints/, config.json, starts.jsonl,
      metrics.jsonl, tb/.
    stop_at_step: stop after this step as if preempted (save, return);
      for tests and time-boxed jobs. The schedule still spans num_steps.
    metrics_fn: optional (params=, grads=) -> nested dict of scalars, run
      inside the jitted step; logged as "a/b/c" keys (per-layer telemetry).

  Returns:
    The final TrainState.

  Raises:
    ValueError / FileNotFoundError: one line naming the config key, file or
      workdir that is invalid; a start failing so leaves the workdir
      byte-identical.
    diskspace.DiskFull: no room for a checkpoint (before the start, or at a
      save: the partial save is removed, earlier checkpoints stay), the
      prepared corpus or the tokenizer.
    rundir.WorkdirBusy: another live run holds the workdir.
    NonFiniteError: a non-finite loss / grad norm with skip_nonfinite=False.
    Stopped: SIGTERM / SIGINT / SIGHUP arrived; a checkpoint was saved
      first.
    TooManySkipped: the run finished but skipped more than
      config.max_skipped_fraction of its steps.
  """
  _check_loop_keys(config)
  num_steps = config.num_steps
  optim_cfg = optim.OptimConfig(**config.optim.to_dict())
  optim.validate_schedule(optim_cfg, num_steps)
  rules, recipe = quant_rules(config.quant,
                              model_config(config.model, 1).n_layers)
  late_step = switch_back_step(config.quant, num_steps)
  mesh = sharding.make_mesh(**config.mesh.to_dict())
  seed = config.data.shuffle_seed
  seed = config.seed if seed < 0 else seed
  pidx, pcount = jax.process_index(), jax.process_count()
  # Every text source's tokenizer has exactly data.vocab_size pieces (a
  # trained one by construction, a given one is checked), and synthetic
  # tokens use it too: the model is built and checked before the data.
  model_cfg = model_config(config.model.to_dict(), config.data.vocab_size)
  _check_attention(model_cfg, bool(config.data.get("segment_ids", False)))
  run_info = {"model": dataclasses.asdict(model_cfg),
              "quant": {"recipe": recipe.name,
                        "overrides": dict(config.quant.overrides),
                        "rules": [list(r) for r in config.quant.rules]},
              "config": config.to_dict()}
  init_params = None
  if config.init_from_hf:
    hf_cfg, tensors = hf.read_folder(config.init_from_hf)
    hf.check_matches(hf_cfg, model_cfg)
    init_params = hf.from_hf_tensors(tensors, model_cfg)
    del tensors
  rundir.check_usable(workdir)
  checkpoint.check_run_info(workdir, run_info)
  fit = dict(mesh=mesh, global_batch=config.data.global_batch,
             seq_len=config.data.seq_len, comm_dtype=config.comm.grad_dtype)
  train_state.check_fit(model_cfg, rules, **fit)
  if late_step is not None:
    train_state.check_fit(model_cfg, switched_rules(
        rules, config.quant.switch_back_mode), **fit)
  _check_records(config, workdir)
  # The state this start builds (shapes only), against the checkpoint it
  # will resume from and the space a checkpoint of it takes.
  _, abstract = train_state.abstract_state(
      model_cfg, rules, optim_cfg, num_steps=num_steps, mesh=mesh,
      seed=config.seed)
  resume = _resume_point(workdir, abstract)
  ckpt_bytes = optim.state_bytes(abstract.params,
                                 abstract.opt_state)["total_bytes"]
  ckpt_need = 1.05 * ckpt_bytes + (1 << 20)   # + orbax's metadata files
  if pidx == 0:
    diskspace.check(os.path.join(workdir, checkpoint.CHECKPOINT_DIR),
                    ckpt_need, "a checkpoint")
  with rundir.Claim(workdir, artefacts=data.WORKDIR_FILES,
                    primary=pidx == 0) as claim, \
      checkpoint.stop_flag() as flag:
    train_it = data.make_input(config.data, split="train", seed=seed,
                               process_index=pidx, process_count=pcount,
                               workdir=workdir)
    val_it = None
    if config.eval_steps:
      val_it = data.make_input(config.data, split="val", seed=seed,
                               process_index=pidx, process_count=pcount,
                               workdir=workdir)
    if train_it.vocab_size > model_cfg.vocab_size:
      raise ValueError(f"model.vocab_size={model_cfg.vocab_size} is smaller "
                       f"than the data's vocabulary ({train_it.vocab_size})")
    if resume is not None:
      # The saved data position must fit this data before anything
      # compiles (set again from the restored checkpoint below).
      try:
        train_it.set_state(recast.stored_data_state(workdir, resume[0]))
      except checkpoint.UnreadableCheckpoint:
        pass   # the restore falls back past this step and says so
      except ValueError as e:
        raise ValueError(f"checkpoint step {resume[0]} cannot resume with "
                         f"this data: {e}") from None
    make = functools.partial(
        _make_trainer, model_cfg, optim_cfg=optim_cfg, num_steps=num_steps,
        mesh=mesh, global_batch=config.data.global_batch,
        seq_len=config.data.seq_len, seed=config.seed,
        skip_nonfinite=config.skip_nonfinite,
        segment_ids=config.data.segment_ids, metrics_fn=metrics_fn,
        telemetry_on=config.telemetry_every > 0,
        comm_dtype=config.comm.grad_dtype)
    trainer = make(rules)
    # Compiled when the run reaches the step (or at once on a resume past
    # it): the switch depends on the step alone, so a resumed run switches
    # exactly where an uninterrupted one does.
    late = None if late_step is None else (
        late_step, functools.partial(make, switched_rules(
            rules, config.quant.switch_back_mode)))
    opened: list[checkpoint.Checkpointer] = []   # closed on the way out
    try:
      # Restored before anything is written: a checkpoints folder exists
      # already, so opening the checkpointer creates nothing, and damaged
      # steps are moved aside only once the start is committed.
      restored = None
      if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
        opened.append(_checkpointer(config, workdir))
        restored = _restore(opened[0], trainer.abstract_state, resume,
                            workdir)
      if restored is None:
        state = trainer.init()
        if init_params is not None:
          state = _with_params(state, init_params)
        restored_step = 0
      else:
        restored_step, state, data_state = restored
        train_it.set_state(data_state)
      if late is not None and restored_step >= late[0]:
        trainer, late = late[1](), None   # compiled before the commit
      # Everything is validated: from here on the workdir may be written.
      claim.commit()
      if not opened:
        opened.append(_checkpointer(config, workdir))
      ckpt = opened[0]
      ckpt.set_aside_deferred()
      if pidx == 0:
        checkpoint.write_run_info(workdir, run_info)
        changed = runrecord.record_start(
            workdir, restored_step, config.to_dict(),
            prng_impl=str(jax.config.jax_default_prng_impl))
        if restored is not None and changed:
          logging.info("resumed from step %d with changed settings: %s",
                       restored_step, ", ".join(
                           f"{k}={v!r}" for k, v in changed.items()))
      writer = metrics_lib.MetricWriter(
          workdir, enabled=pidx == 0,
          resume_step=None if restored is None else restored_step)
      try:
        state, stop = _loop(config, trainer, ckpt, writer, train_it, val_it,
                            stop_at_step, restored is not None, state, flag,
                            late, ckpt_need, init_params is not None)
      finally:
        writer.close()
      opened.pop().close()   # waits for the last save: may run out of space
    except BaseException as e:
      for c in opened:
        try:
          c.close()
        except Exception:  # pylint: disable=broad-except
          pass   # the error being raised says what went wrong
      if isinstance(e, Exception) and diskspace.is_full(e):
        if pidx == 0:
          _remove_partial_saves(workdir)
        diskspace.raise_if_full(e, os.path.join(
            workdir, checkpoint.CHECKPOINT_DIR), ckpt_need,
                                "a checkpoint (and the run's records)")
      raise
  step = int(jax.device_get(state.step))
  if stop is not None:
    raise Stopped(stop, step, saved=step in checkpoint.complete_steps(workdir))
  _check_skipped(config, state, step)
  return state


def _checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(workdir, every=config.checkpoint_every,
                                 keep=config.keep_checkpoints)


def _restore(ckpt, abstract: Any, resume, workdir: str):
  """(step, state in this start's layout, data state), or None.

  Each leaf is read in the dtype the step stored it in and converted
  afterwards (recast); a step other than the one `resume` checked (the
  newer ones were damaged) is checked and, if stored differently, read
  again in its own dtypes.
  """
  if resume is None:
    # No complete step: any step folders are damaged, and restore_latest
    # names them in its one-line error.
    return ckpt.restore_latest(abstract, defer_set_aside=True)
  step, stored, conversions = resume
  restored = ckpt.restore_latest(recast.target(abstract, stored),
                                 defer_set_aside=True)
  if restored is None:
    return None
  if restored[0] != step:
    where = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
    step = restored[0]
    stored_then = recast.stored_leaves(workdir, step)
    conversions = recast.check(stored_then, abstract, step=step, where=where)
    if stored_then != stored:
      state, data_state = ckpt.restore(recast.target(abstract, stored_then),
                                       step)
      restored = (step, state, data_state)
  state = recast.convert(restored[1], abstract)
  for line in conversions:
    logging.warning("checkpoint step %d converted to this start's storage: "
                    "%s", step, line)
  return step, state, restored[2]


def _remove_partial_saves(workdir: str) -> None:
  """Deletes the unfinished saves (orbax's "*.orbax-checkpoint-tmp*"
  folders) a full disk left in the checkpoints folder."""
  root = os.path.join(workdir, checkpoint.CHECKPOINT_DIR)
  try:
    names = os.listdir(root)
  except OSError:
    return
  for name in names:
    if ".orbax-checkpoint-tmp" in name:
      shutil.rmtree(os.path.join(root, name), ignore_errors=True)


def _check_records(config, workdir: str) -> None:
  """The workdir's records against its checkpoints (runrecord), before
  anything else looks at the workdir."""
  runrecord.read_starts(workdir)   # a damaged record: one line, now
  first = config
  if os.path.isfile(os.path.join(workdir, checkpoint.CONFIG_FILE)):
    first = checkpoint.read_run_info(workdir).get("config", {}) or config
  try:
    first_save = min(int(first["checkpoint_every"]), int(first["num_steps"]))
  except (KeyError, TypeError, ValueError):
    first_save = min(config.checkpoint_every, config.num_steps)
  if checkpoint.step_dirs(workdir):
    return   # folders to restore from (or to name as damaged)
  runrecord.check_checkpoints_present(workdir, first_save)


def _check_skipped(config, state, step: int) -> None:
  if step < config.num_steps or not config.skip_nonfinite:
    return
  skipped = int(jax.device_get(state.skipped))
  if skipped > config.max_skipped_fraction * config.num_steps:
    raise TooManySkipped(
        f"{skipped} of {config.num_steps} steps were skipped as non-finite "
        f"({100 * skipped / config.num_steps:.1f}% > max_skipped_fraction="
        f"{config.max_skipped_fraction}); the run is saved but suspect")


def _with_params(state, pure: dict[str, Any]):
  """`state` with its params replaced by a pure dict (imported weights),
  each cast to the master dtype and placed as the old leaf was."""
  params = state.params
  old = nnx.to_pure_dict(params)
  new = jax.tree.map(lambda n, o: jax.device_put(
      np.asarray(n).astype(o.dtype), o.sharding), pure, old)
  nnx.replace_by_pure_dict(params, new)
  return state.replace(params=params)


def _loop(config, trainer, ckpt, writer, train_it, val_it, stop_at_step,
          resumed, state, flag, late=None, ckpt_need=0.0, from_hf=False):
  """Runs steps from `state` (restored when `resumed`, else fresh) to
  num_steps / stop_at_step / a stop signal; from step late[0] on with the
  trainer late[1]() builds (quant.switch_back). Before each save, checks
  that `ckpt_need` bytes are free.

  Returns:
    (the final state, the stop signal's number or None).
  """
  num_steps = config.num_steps
  logging.info("model %s: %s, %d parameters", config.model.size,
               trainer.model_cfg, sizes.param_count(trainer.model_cfg))
  logging.info("quantization (projection -> recipe):\n%s",
               "\n".join(quant_table_lines(trainer.quant_table)))
  step = int(jax.device_get(state.step))
  latest = step if resumed else None
  if resumed:
    logging.info("resumed from step %d (%s)", step, ckpt.directory)
  elif from_hf:
    logging.info("initialised a fresh state with the weights of %s",
                 config.init_from_hf)
  else:
    logging.info("initialised a fresh state")
  val_start = val_it.get_state() if val_it is not None else None
  # Memory accounting of the persistent state (params + optimizer state),
  # from shapes and dtypes: logged at every start, recorded once per run.
  mem = optim.state_bytes(trainer.abstract_state.params,
                          trainer.abstract_state.opt_state)
  logging.info("train state: %.2f bytes/param, %.1f MB in all (master %s, "
               "moments %s)", mem["bytes_per_param"], mem["total_bytes"] / 1e6,
               config.optim.master, config.optim.moments)
  devices = trainer.mesh.devices.size
  batch_ways = devices // (trainer.mesh.shape["tensor"])
  act = memory.activation_bytes_per_token(
      trainer.model_cfg, config.data.seq_len,
      quantized=any(r != "none" for r in trainer.quant_table.values())
  ) * config.data.global_batch * config.data.seq_len / batch_ways
  xla = memory.compiled_bytes(trainer.train_step)
  logging.info("activations: %.1f MB/device saved for the backward "
               "(analytic); compiled step: %s", act / 1e6,
               "no memory analysis" if xla is None else
               f"{xla['temp'] / 1e6:.1f} MB temp, "
               f"{xla['arguments'] / 1e6:.1f} MB arguments per device (XLA)")
  if latest is None:
    writer.write(step, {"state_bytes_per_param": mem["bytes_per_param"],
                        "state_bytes": mem["total_bytes"]})
  tokens_per_step = config.data.global_batch * config.data.seq_len
  flops_token = flops.flops_per_token(trainer.model_cfg, config.data.seq_len)
  kind = trainer.mesh.devices.flat[0].device_kind
  window: list[tuple[int, dict[str, Any]]] = []
  t_last = time.perf_counter()
  stop_signal = None
  while step < num_steps:
    if late is not None and step >= late[0]:
      trainer = late[1]()     # same state layout: the state carries over
      late = None
      logging.info("switched back at step %d (quant.switch_back=%g, %s): "
                   "projections now\n%s", step, config.quant.switch_back,
                   config.quant.switch_back_mode,
                   "\n".join(quant_table_lines(trainer.quant_table)))
    batch = trainer.put_batch(next(train_it))
    tele = None
    if config.telemetry_every and (step + 1) % config.telemetry_every == 0:
      # The stats of the batch this step trains on, at the params it
      # starts from; timed apart from the step.
      t_tele = time.perf_counter()
      tele = jax.device_get(trainer.telemetry_step(state.params, state.rng,
                                                   batch))
      tele["telemetry_seconds"] = time.perf_counter() - t_tele
      t_last += tele["telemetry_seconds"]
    state, m = trainer.train_step(state, batch)
    step += 1
    window.append((step, m))
    is_eval = val_it is not None and (
        step == num_steps or (config.eval_every and
                              step % config.eval_every == 0))
    boundary = (step % config.log_every == 0 or step == num_steps or
                tele is not None or
                step % config.checkpoint_every == 0 or is_eval or
                step == stop_at_step)
    stop = _stop_requested(flag, boundary) or step == stop_at_step
    if not (boundary or stop):
      continue
    summary = _summarize(window, config.skip_nonfinite, ckpt.directory,
                         ckpt.latest_step())
    elapsed = time.perf_counter() - t_last
    step_time = elapsed / len(window)
    summary.update(
        step_time=step_time, tokens_per_sec=tokens_per_step / step_time,
        skipped_total=int(jax.device_get(state.skipped)),
        eta_sec=step_time * (num_steps - step))
    summary["mfu"] = flops.mfu(summary["tokens_per_sec"], flops_token,
                               devices, kind)
    if summary["mfu"] is None:
      del summary["mfu"]
    window = []
    if is_eval:
      summary["val_loss"] = _evaluate(trainer, state, val_it, val_start,
                                      config.eval_steps)
    if tele is not None:
      summary.update(tele)
    if (step % config.log_every == 0 or is_eval or step == num_steps or
        stop or tele is not None):
      writer.write(step, summary)
      logging.info("%s", metrics_lib.console_line(step, num_steps, summary))
    force = stop or step == num_steps
    if (force or step % config.checkpoint_every == 0) and (
        jax.process_index() == 0):
      diskspace.check(ckpt.directory, ckpt_need,
                      f"the checkpoint of step {step}")
    ckpt.save(step, state, train_it.get_state(), force=force)
    t_last = time.perf_counter()
    if stop:
      if flag.is_set() and step < num_steps:
        stop_signal = flag.signum
      logging.info("stopping at step %d (checkpoint saved)", step)
      break
  return state, stop_signal
