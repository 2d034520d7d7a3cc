"""The training loop proper: steps from a ready state to the end of a run.

Owns: `Loop` (one object per start, after the start-up transaction in
`fp4jax.train` committed: the state is restored or initialised and the
workdir may be written) as small named steps: the start lines, one train
step (with its telemetry), the window summary and log line, evaluation,
the save decision (every `checkpoint_every` steps, every
`checkpoint_every_minutes`, at the end and on a stop signal) and the
profiler trace of `profile_steps`; and the ways a run ends other than
finishing: `NonFiniteError`, `Stopped` (a stop signal, after saving) and
`TooManySkipped`.

Must not import: tensorflow_datasets, grain, fp4jax.train, fp4jax.main.
"""

import os
import re
import signal as signal_lib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from fp4jax import diskspace
from fp4jax import flops
from fp4jax import memory
from fp4jax import metrics as metrics_lib
from fp4jax import models
from fp4jax import optim

PROFILE_DIR = "profile"   # under the workdir: jax.profiler traces


class NonFiniteError(FloatingPointError):
  """A step produced a NaN/inf loss or gradient norm (skip_nonfinite=False)."""


class Stopped(Exception):
  """A stop signal (SIGTERM, SIGINT, SIGHUP, SIGUSR1) ended the run early;
  resumable.

  Attributes:
    signum: the signal.
    step: the step the run stopped at.
    saved: whether a checkpoint of `step` was written.
  """

  def __init__(self, signum: int, step: int, saved: bool):
    name = signal_lib.Signals(signum).name
    where = (f"checkpoint of step {step} saved" if saved else
             "no new checkpoint")
    super().__init__(f"stopped by {name} at step {step} ({where}); run the "
                     f"same command to resume")
    self.signum, self.step, self.saved = signum, step, saved


class TooManySkipped(Exception):
  """The run finished but skipped more steps than config.max_skipped_fraction."""


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


def summarize(window: list[tuple[int, dict[str, Any]]], skip: bool,
              ckpt_dir: str, latest: int | None) -> dict[str, Any]:
  """Host-side means over a log window; raises on a non-finite step.

  Raises:
    NonFiniteError: a step of the window was non-finite and `skip` is off.
  """
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


def _agree(votes: list[bool], collective: bool) -> list[bool]:
  """Each vote OR-ed over the processes (one allgather, so every process
  takes the same branch); without `collective`, this process's own."""
  if jax.process_count() == 1 or not collective:
    return votes if jax.process_count() == 1 else [False] * len(votes)
  gathered = multihost_utils.process_allgather(np.asarray(votes, np.int32))
  return [bool(v) for v in np.max(np.reshape(gathered, (-1, len(votes))),
                                  axis=0)]


class Loop:
  """Runs steps from a ready state to num_steps / stop_at_step / a stop
  signal; from step late[0] on with the trainer late[1]() builds
  (quant.switch_back).

  Args:
    config: the run's ConfigDict.
    trainer: the compiled `train_state.Trainer`.
    ckpt: the open `checkpoint.Checkpointer`.
    writer: the `metrics.MetricWriter`.
    train_it / val_it: input iterators (val_it None: no evaluation).
    flag: the `checkpoint.stop_flag`.
    workdir: the run directory (profiler traces).
    late: (step, () -> Trainer) of quant.switch_back, or None.
    ckpt_need: bytes that must be free before each save.
    profile: (start, end) of `profile_steps`, or None.
  """

  def __init__(self, config, trainer, ckpt, writer, train_it, val_it, flag,
               *, workdir: str, late: tuple[int, Callable[[], Any]] | None,
               ckpt_need: float, profile: tuple[int, int] | None):
    self.config = config
    self.trainer = trainer
    self.ckpt, self.writer, self.flag = ckpt, writer, flag
    self.train_it, self.val_it = train_it, val_it
    self.workdir = workdir
    self.late = late
    self.ckpt_need = ckpt_need
    self.profile = profile
    self.tracing = False
    self.val_start = val_it.get_state() if val_it is not None else None
    self.tokens_per_step = config.data.global_batch * config.data.seq_len
    self.last_save = time.monotonic()

  # ------------------------------------------------------------- start
  def log_start(self, state, resumed: bool, from_hf: bool) -> None:
    """The start's log lines; the state's bytes recorded on a fresh run."""
    config, trainer = self.config, self.trainer
    logging.info("model %s: %s, %d parameters", config.model.size,
                 trainer.model_cfg, models.param_count(trainer.model_cfg))
    logging.info("quantization (projection -> recipe):\n%s",
                 "\n".join(quant_table_lines(trainer.quant_table)))
    step = int(jax.device_get(state.step))
    if resumed:
      logging.info("resumed from step %d (%s)", step, self.ckpt.directory)
    elif from_hf:
      logging.info("initialised a fresh state with the weights of %s",
                   config.init_from_hf)
    else:
      logging.info("initialised a fresh state")
    # Memory accounting of the persistent state (params + optimizer
    # state), from shapes and dtypes: logged at every start, recorded once
    # per run.
    mem = optim.state_bytes(trainer.abstract_state.params,
                            trainer.abstract_state.opt_state)
    logging.info("train state: %.2f bytes/param, %.1f MB in all (master %s, "
                 "moments %s)", mem["bytes_per_param"],
                 mem["total_bytes"] / 1e6, config.optim.master,
                 config.optim.moments)
    # The analytic counterpart is the memory plan logged before the data
    # stage (fp4jax.plan); this is the compiled program's own figure.
    xla = memory.compiled_bytes(trainer.train_step)
    logging.info("compiled step: %s", "no memory analysis" if xla is None
                 else f"{xla['temp'] / 1e6:.1f} MB temp, "
                 f"{xla['arguments'] / 1e6:.1f} MB arguments per device "
                 f"(XLA)")
    if not resumed:
      self.writer.write(step, {"state_bytes_per_param":
                               mem["bytes_per_param"],
                               "state_bytes": mem["total_bytes"]})

  # -------------------------------------------------------------- run
  def run(self, state, stop_at_step: int | None):
    """Steps until the end, stop_at_step or a stop signal.

    Returns:
      (the final state, the stop signal's number or None).
    """
    config = self.config
    num_steps = config.num_steps
    step = int(jax.device_get(state.step))
    flops_token = models.flops_per_token(self.trainer.model_cfg,
                                         config.data.seq_len)
    window: list[tuple[int, dict[str, Any]]] = []
    t_last = time.perf_counter()
    try:
      while step < num_steps:
        self._switch_back(step)
        self._trace(step, state)
        state, m, tele = self._step(state, step)
        step += 1
        if self.tracing and step >= self.profile[1]:
          self._end_trace(state)
        if tele is not None:
          t_last += tele["telemetry_seconds"]
        window.append((step, m))
        is_eval = self.val_it is not None and (
            step == num_steps or (config.eval_every and
                                  step % config.eval_every == 0))
        boundary = (step % config.log_every == 0 or step == num_steps or
                    tele is not None or step % config.checkpoint_every == 0
                    or is_eval or step == stop_at_step)
        stop, due = self._votes(boundary)
        stop = stop or step == stop_at_step
        if not (boundary or stop or due):
          continue
        summary = self._summary(window, state, step, t_last, flops_token)
        window = []
        if is_eval:
          summary["val_loss"] = self._evaluate(state)
        if tele is not None:
          summary.update(tele)
        summary.update(_data_shares(self.train_it))
        if (step % config.log_every == 0 or is_eval or step == num_steps
            or stop or tele is not None):
          self.writer.write(step, summary)
          logging.info("%s", metrics_lib.console_line(step, num_steps,
                                                      summary))
        self._save(step, state, force=stop or due or step == num_steps)
        t_last = time.perf_counter()
        if stop:
          signum = None
          if self.flag.is_set() and step < num_steps:
            signum = self.flag.signum
          logging.info("stopping at step %d (checkpoint saved)", step)
          return state, signum
      return state, None
    finally:
      self._end_trace(state)

  # ------------------------------------------------------------ pieces
  def _switch_back(self, step: int) -> None:
    if self.late is None or step < self.late[0]:
      return
    self.trainer = self.late[1]()   # same state layout: the state carries
    self.late = None
    logging.info("switched back at step %d (quant.switch_back=%g, %s): "
                 "projections now\n%s", step, self.config.quant.switch_back,
                 self.config.quant.switch_back_mode,
                 "\n".join(quant_table_lines(self.trainer.quant_table)))

  def _step(self, state, step: int):
    """One train step (and its telemetry): (state, metrics, telemetry or
    None)."""
    config, trainer = self.config, self.trainer
    batch = trainer.put_batch(next(self.train_it))
    tele = None
    if config.telemetry_every and (step + 1) % config.telemetry_every == 0:
      # The stats of the batch this step trains on, at the params it
      # starts from; timed apart from the step.
      t_tele = time.perf_counter()
      tele = jax.device_get(trainer.telemetry_step(state.params, state.rng,
                                                   batch))
      tele["telemetry_seconds"] = time.perf_counter() - t_tele
    state, m = trainer.train_step(state, batch)
    return state, m, tele

  def _votes(self, boundary: bool) -> tuple[bool, bool]:
    """(stop requested, a time-based save due), the same on every process.

    Processes agree only at boundaries (one collective); a single process
    decides every step.
    """
    minutes = self.config.get("checkpoint_every_minutes", 0)
    due = bool(minutes) and (time.monotonic() - self.last_save
                             >= 60 * minutes)
    stop, due = _agree([self.flag.is_set(), due], collective=boundary)
    return stop, due

  def _summary(self, window, state, step: int, t_last: float,
               flops_token: float) -> dict[str, Any]:
    config = self.config
    summary = summarize(window, config.skip_nonfinite, self.ckpt.directory,
                        self.ckpt.latest_step())
    step_time = (time.perf_counter() - t_last) / len(window)
    summary.update(
        step_time=step_time, tokens_per_sec=self.tokens_per_step / step_time,
        skipped_total=int(jax.device_get(state.skipped)),
        eta_sec=step_time * (config.num_steps - step))
    mesh = self.trainer.mesh
    mfu = flops.mfu(summary["tokens_per_sec"], flops_token, mesh.devices.size,
                    mesh.devices.flat[0].device_kind)
    if mfu is not None:
      summary["mfu"] = mfu
    return summary

  def _evaluate(self, state) -> float:
    """Validation loss over the same eval_steps batches every time."""
    trainer = self.trainer
    self.val_it.set_state(self.val_start)
    outs = [trainer.eval_step(state.params, state.rng,
                              trainer.put_batch(next(self.val_it)))
            for _ in range(self.config.eval_steps)]
    outs = jax.device_get(outs)
    nll = sum(float(o["nll_sum"]) for o in outs)
    tokens = sum(float(o["tokens"]) for o in outs)
    return nll / max(tokens, 1.0)

  def _save(self, step: int, state, force: bool) -> None:
    """Saves on the interval or when forced, after checking disk space."""
    if (force or step % self.config.checkpoint_every == 0) and (
        jax.process_index() == 0):
      diskspace.check(self.ckpt.directory, self.ckpt_need,
                      f"the checkpoint of step {step}")
    if self.ckpt.save(step, state, self.train_it.get_state(), force=force):
      self.last_save = time.monotonic()

  def _trace(self, step: int, state) -> None:
    """Starts the profiler trace after step profile[0]."""
    if self.profile is None or self.tracing or step != self.profile[0]:
      return
    jax.block_until_ready(state)   # the trace holds only its own steps
    where = os.path.join(self.workdir, PROFILE_DIR)
    jax.profiler.start_trace(where, create_perfetto_trace=True)
    self.tracing = True
    logging.info("profiling steps %d-%d into %s", step + 1, self.profile[1],
                 where)

  def _end_trace(self, state) -> None:
    if not self.tracing:
      return
    jax.block_until_ready(state)
    jax.profiler.stop_trace()
    self.tracing = False


def _data_shares(it) -> dict[str, float]:
  """A mixture's realized token shares so far ({"data_share/NAME": x}),
  for the metrics; {} for a one-source input."""
  realized = getattr(it, "realized", None)
  if realized is None:
    return {}
  shares = realized()
  if len(shares) < 2:
    return {}
  return {f"data_share/{name}": share for name, share in shares.items()}
