"""The start-up transaction of a training run: config in, a running loop.

Owns: `train_and_evaluate` (translates the ConfigDict once through
`fp4jax.runconfig`; checks, claims and reads the workdir; resumes or
initialises the state; hands over to `fp4jax.loop.Loop`, which runs, logs,
evaluates and checkpoints) and `finished_step`.

Start order (each stage only after the one before passed): every config
check that needs no data (`runconfig.translate`: loop keys, schedule,
recipe, model shape, attention backend; then the mesh, the workdir's
config.json and the model's fit to the mesh: `_check_workdir`); the
workdir is usable and its records agree with its checkpoints (a run that
reached a step but has no checkpoint is refused, `fp4jax.runrecord`); the
checkpoint to resume from fits the state this start builds, from its
metadata (`fp4jax.recast`: model shape, run key, storage dtypes to
convert); there is disk space for a checkpoint; the workdir is locked
(`fp4jax.rundir`); the data stage (may write the tokenizer and prepared
data, removed again if the start fails) and the saved data position is
checked against it (`_inputs`); the steps are compiled; the checkpoint is
restored and converted (`_restore_or_init`; nothing moved or written yet).
Only then are config.json, the start record (`starts.jsonl`: the step and
the changed keys), checkpoints and metrics written, so a start that fails
leaves the workdir byte-identical. The pure step functions live in
`fp4jax.train_state`, metric records in `fp4jax.metrics`.

Must not import: tensorflow_datasets, grain (the data sources do), or
fp4jax.main.
"""

import dataclasses
import functools
import json
import os
import shutil
from typing import Any

import jax
import numpy as np
from absl import logging
from flax import nnx

from fp4jax import checkpoint
from fp4jax import data
from fp4jax import diskspace
from fp4jax import hf
from fp4jax import llama
from fp4jax import loop
from fp4jax import metrics as metrics_lib
from fp4jax import optim
from fp4jax import plan
from fp4jax import recast
from fp4jax import rundir
from fp4jax import runconfig
from fp4jax import runrecord
from fp4jax import sharding
from fp4jax import train_state


# Compiled trainers by their (hashable) arguments: a notebook or test that
# calls train_and_evaluate again with the same shapes does not recompile.
_make_trainer = functools.lru_cache(maxsize=2)(train_state.make_trainer)


def finished_step(config, workdir: str) -> int | None:
  """The step a finished run in `workdir` ended at, else None. Writes nothing.

  Finished: its config.json describes the same `model` section and it holds
  a complete checkpoint at or after config.num_steps.
  """
  path = os.path.join(workdir, checkpoint.CONFIG_FILE)
  if not os.path.isfile(path):
    return None
  saved = checkpoint.read_run_info(workdir)
  def identity(model):
    return {k: v for k, v in (model or {}).items()
            if k not in runconfig.EXECUTION_FIELDS}
  if identity(saved.get("config", {}).get("model")) != identity(json.loads(
      json.dumps(config.model.to_dict()))):
    return None
  steps = checkpoint.complete_steps(workdir)
  if steps and steps[-1] >= config.num_steps:
    return steps[-1]
  return None


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


def train_and_evaluate(config, workdir: str, *,
                       stop_at_step: int | None = None,
                       metrics_fn: Any = None) -> train_state.TrainState:
  """Trains per `config`, resuming from `workdir` if it holds a checkpoint.

  Args:
    config: a ConfigDict with the keys of configs/default.py.
    workdir: run directory: checkpoints/, config.json, starts.jsonl,
      metrics.jsonl, tb/ (and profile/ with profile_steps).
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
    loop.NonFiniteError: a non-finite loss / grad norm with
      skip_nonfinite=False.
    loop.Stopped: SIGTERM / SIGINT / SIGHUP / SIGUSR1 arrived; a checkpoint
      was saved first.
    loop.TooManySkipped: the run finished but skipped more than
      config.max_skipped_fraction of its steps.
  """
  run = runconfig.translate(config)
  mesh = sharding.make_mesh(**runconfig.mesh_axes(config))
  # The memory plan (analytic, shapes only): a run that cannot fit
  # mesh.device_memory_gb stops here, before data and compilation.
  memory_plan = plan.check(config)
  logging.info("%s", plan.report(memory_plan))
  pidx = jax.process_index()
  init_params = _hf_params(config, run.model)
  resume, ckpt_need = _check_workdir(config, run, mesh, workdir)
  with rundir.Claim(workdir, artefacts=data.WORKDIR_FILES,
                    primary=pidx == 0) as claim, \
      checkpoint.stop_flag() as flag:
    train_it, val_it = _inputs(config, run, workdir, resume)
    make = functools.partial(
        _make_trainer, run.model, optim_cfg=run.optim,
        num_steps=run.num_steps, mesh=mesh,
        global_batch=config.data.global_batch, seq_len=config.data.seq_len,
        seed=run.seed, skip_nonfinite=config.skip_nonfinite,
        segment_ids=config.data.segment_ids, metrics_fn=metrics_fn,
        telemetry_on=config.telemetry_every > 0,
        comm_dtype=config.comm.grad_dtype)
    trainer = make(run.rules)
    # Compiled when the run reaches the step (or at once on a resume past
    # it): the switch depends on the step alone, so a resumed run switches
    # exactly where an uninterrupted one does.
    late = None if run.late_step is None else (
        run.late_step, functools.partial(make, run.late_rules))
    opened: list[checkpoint.Checkpointer] = []   # closed on the way out
    try:
      state, restored_step, resumed = _restore_or_init(
          config, workdir, trainer, resume, train_it, init_params, opened)
      if late is not None and restored_step >= late[0]:
        trainer, late = late[1](), None   # compiled before the commit
      # Everything is validated: from here on the workdir may be written.
      claim.commit()
      ckpt = _open_for_writing(config, workdir, opened)
      _record_start(config, run, workdir, restored_step, resumed)
      writer = metrics_lib.MetricWriter(
          workdir, enabled=pidx == 0,
          resume_step=restored_step if resumed else None)
      try:
        steps = loop.Loop(config, trainer, ckpt, writer, train_it, val_it,
                          flag, workdir=workdir, late=late,
                          ckpt_need=ckpt_need, profile=run.profile)
        steps.log_start(state, resumed, init_params is not None)
        state, stop = steps.run(state, stop_at_step)
      finally:
        writer.close()
      opened.pop().close()   # waits for the last save: may run out of space
    except BaseException as e:
      _close_all(opened)
      if isinstance(e, Exception) and diskspace.is_full(e):
        if pidx == 0:
          _remove_partial_saves(workdir)
        diskspace.raise_if_full(e, os.path.join(
            workdir, checkpoint.CHECKPOINT_DIR), ckpt_need,
                                "a checkpoint (and the run's records)")
      raise
  step = int(jax.device_get(state.step))
  if stop is not None:
    raise loop.Stopped(stop, step,
                       saved=step in checkpoint.complete_steps(workdir))
  _check_skipped(config, state, step)
  return state


def _hf_params(config, model_cfg: Any) -> dict[str, Any] | None:
  """The weights of config.init_from_hf (a pure dict), checked against the
  model, or None."""
  if not config.init_from_hf:
    return None
  if not isinstance(model_cfg, llama.LlamaConfig):
    raise ValueError(f"init_from_hf reads LLaMA checkpoints; this run's "
                     f"model is a {type(model_cfg).__name__}")
  hf_cfg, tensors = hf.read_folder(config.init_from_hf)
  hf.check_matches(hf_cfg, model_cfg)
  return hf.from_hf_tensors(tensors, model_cfg)


def _check_workdir(config, run: runconfig.Run, mesh,
                   workdir: str) -> tuple[Any, float]:
  """Every check before the workdir is claimed: the workdir is usable and
  of this model, the model fits the mesh (with the switched-back rules
  too), the records agree with the checkpoints, the checkpoint to resume
  from fits this start's state (metadata only), and there is room for a
  checkpoint. Writes nothing.

  Returns:
    (`_resume_point`'s result, the bytes a save needs free).
  """
  rundir.check_usable(workdir)
  checkpoint.check_run_info(workdir, run.run_info,
                            runconfig.EXECUTION_FIELDS)
  fit = dict(mesh=mesh, global_batch=config.data.global_batch,
             seq_len=config.data.seq_len, comm_dtype=config.comm.grad_dtype,
             grad_accum=run.optim.grad_accum)
  abstract_model = train_state.check_fit(run.model, run.rules, **fit)
  if run.late_rules is not None:
    train_state.check_fit(run.model, run.late_rules, **fit)
  _check_records(config, workdir)
  # The state this start builds (shapes only), against the checkpoint it
  # will resume from and the space a checkpoint of it takes.
  _, abstract = train_state.abstract_state(
      run.model, run.rules, run.optim, num_steps=run.num_steps, mesh=mesh,
      seed=run.seed, abstract_model=abstract_model)
  resume = _resume_point(workdir, abstract)
  ckpt_bytes = optim.state_bytes(abstract.params,
                                 abstract.opt_state)["total_bytes"]
  ckpt_need = 1.05 * ckpt_bytes + (1 << 20)   # + orbax's metadata files
  if jax.process_index() == 0:
    diskspace.check(os.path.join(workdir, checkpoint.CHECKPOINT_DIR),
                    ckpt_need, "a checkpoint")
  return resume, ckpt_need


def _inputs(config, run: runconfig.Run, workdir: str, resume):
  """(train iterator, val iterator or None): the data stage, and the saved
  data position checked against it before anything compiles."""
  pidx, pcount = jax.process_index(), jax.process_count()
  train_it = data.make_input(config.data, split="train", seed=run.data_seed,
                             process_index=pidx, process_count=pcount,
                             workdir=workdir)
  val_it = None
  if config.eval_steps:
    val_it = data.make_input(config.data, split="val", seed=run.data_seed,
                             process_index=pidx, process_count=pcount,
                             workdir=workdir)
  if train_it.vocab_size > run.model.vocab_size:
    raise ValueError(f"model.vocab_size={run.model.vocab_size} is smaller "
                     f"than the data's vocabulary ({train_it.vocab_size})")
  if resume is not None:
    # Set again from the restored checkpoint later.
    try:
      train_it.set_state(recast.stored_data_state(workdir, resume[0]))
    except checkpoint.UnreadableCheckpoint:
      pass   # the restore falls back past this step and says so
    except ValueError as e:
      raise ValueError(f"checkpoint step {resume[0]} cannot resume with "
                       f"this data: {e}") from None
  return train_it, val_it


def _restore_or_init(config, workdir: str, trainer, resume, train_it,
                     init_params, opened: list):
  """(state, its step, whether it was restored): the newest restorable
  checkpoint converted to this start's layout, else a fresh state (with
  init_from_hf's weights). Nothing is moved or written: a checkpoints
  folder exists already when there is one to open, and damaged steps are
  set aside only once the start is committed.
  """
  restored = None
  if os.path.isdir(os.path.join(workdir, checkpoint.CHECKPOINT_DIR)):
    opened.append(_checkpointer(config, workdir))
    restored = _restore(opened[0], trainer.abstract_state, resume, workdir,
                        other=lambda: _other_layout(config, trainer))
  if restored is None:
    state = trainer.init()
    if init_params is not None:
      state = _with_params(state, init_params)
    return state, 0, False
  step, state, data_state = restored
  train_it.set_state(data_state)
  return state, step, True


def _open_for_writing(config, workdir: str, opened: list
                      ) -> checkpoint.Checkpointer:
  """The checkpointer (opened now if the workdir had no checkpoints
  folder), its damaged steps set aside."""
  if not opened:
    opened.append(_checkpointer(config, workdir))
  opened[0].set_aside_deferred()
  return opened[0]


def _record_start(config, run: runconfig.Run, workdir: str, step: int,
                  resumed: bool) -> None:
  """config.json and the start record (process 0), logging what a resume
  changed."""
  if jax.process_index() != 0:
    return
  checkpoint.write_run_info(workdir, run.run_info)
  changed = runrecord.record_start(
      workdir, step, config.to_dict(),
      prng_impl=str(jax.config.jax_default_prng_impl))
  if resumed and changed:
    logging.info("resumed from step %d with changed settings: %s", step,
                 ", ".join(f"{k}={v!r}" for k, v in changed.items()))


def _close_all(opened: list) -> None:
  for c in opened:
    try:
      c.close()
    except Exception:  # pylint: disable=broad-except
      pass   # the error being raised says what went wrong


def _checkpointer(config, workdir: str) -> checkpoint.Checkpointer:
  return checkpoint.Checkpointer(workdir, every=config.checkpoint_every,
                                 keep=config.keep_checkpoints)


def _other_layout(config, trainer) -> Any:
  """This start's abstract TrainState with the layers laid out the other
  way (model.scan_layers flipped): the restore target of a checkpoint
  saved in that layout (recast)."""
  run = runconfig.translate(config)
  model = dataclasses.replace(run.model, scan_layers=not run.model.scan_layers)
  return train_state.abstract_state(
      model, run.rules, run.optim, num_steps=run.num_steps,
      mesh=trainer.mesh, seed=run.seed)[1]


def _restore(ckpt, abstract: Any, resume, workdir: str, other=None):
  """(step, state in this start's layout, data state), or None.

  Each leaf is read in the dtype the step stored it in and converted
  afterwards (recast); a step other than the one `resume` checked (the
  newer ones were damaged) is checked and, if stored differently, read
  again in its own dtypes. `other()` gives the state in the other layer
  layout, for a step saved that way (recast.target).
  """
  if resume is None:
    # No complete step: any step folders are damaged, and restore_latest
    # names them in its one-line error.
    return ckpt.restore_latest(abstract, defer_set_aside=True)
  step, stored, conversions = resume
  restored = ckpt.restore_latest(recast.target(abstract, stored, other),
                                 defer_set_aside=True)
  if restored is None:
    return None
  if restored[0] != step:
    where = os.path.join(os.path.abspath(workdir), checkpoint.CHECKPOINT_DIR)
    step = restored[0]
    stored_then = recast.stored_leaves(workdir, step)
    conversions = recast.check(stored_then, abstract, step=step, where=where)
    if stored_then != stored:
      state, data_state = ckpt.restore(recast.target(abstract, stored_then,
                                                     other), step)
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
    raise loop.TooManySkipped(
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
