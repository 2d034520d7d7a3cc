r"""Trains a LLaMA model with FP4 (or other) quantized projections.

  python -m fp4jax.main --config=configs/demo.py --workdir=runs/demo
  python -m fp4jax.main --config=configs/demo.py:recipe=bf16 --workdir=DIR \
      --config.num_steps=100          # any key: --config.<section>.<key>=v

Every config key, with its default and a comment, is in configs/default.py;
configs/*.py are small deltas over it. A run resumes from its --workdir
(config.json, starts.jsonl, checkpoints/, metrics.jsonl, tb/); rerunning
the same command continues an interrupted run and does nothing for a
finished one.

Exit codes (one `error:` or `stopped by` line on stderr for every code but 0;
--traceback for the full stack):
  0    finished (or was already finished)
  1    bad input: config, data, workdir or checkpoint; nothing was written.
       Also a full disk: the path, the space needed and free are named and
       no partial file is left
  3    stopped at a non-finite loss / gradient (skip_nonfinite=False)
  4    finished, but skipped more steps than max_skipped_fraction
  75   the workdir is in use by another run (its pid and host are named)
  129  SIGHUP (terminal or ssh session closed): a checkpoint was saved,
       rerun to resume (under `nohup` the run ignores it and goes on)
  130  Ctrl-C: a checkpoint was saved, rerun to resume (twice: abort at once)
  138  SIGUSR1 (a batch script's notice before its time limit,
       docs/launch/paper.sbatch): a checkpoint was saved, rerun to resume
  143  SIGTERM (preemption): a checkpoint was saved, rerun to resume
"""

import importlib.util
import json
import logging as std_logging
import os
import signal
import sys
import time

# jax-free: the preflight below reports with it before jax is imported.
from fp4jax import errtext

# Exit codes (see the module docstring).
EXIT_ERROR = 1
EXIT_NONFINITE = 3
EXIT_SKIPPED = 4
EXIT_BUSY = 75   # EX_TEMPFAIL: try again later


def _usage() -> str:
  return __doc__.strip() + "\n"


def _config_spec(argv: list[str]) -> str | None:
  """The --config value ("path[:arg]"), in either flag form."""
  for i, a in enumerate(argv):
    if a.startswith("--config="):
      return a[len("--config="):]
    if a == "--config" and i + 1 < len(argv):
      return argv[i + 1]
  return None


def _load_config_module(path: str):
  """Imports a config file; configs import `configs.*`, `experiments.*`.

  The file's grandparent directory (the repository root for
  configs/NAME.py) goes on sys.path, so an absolute config path works from
  any directory.
  """
  root = os.path.dirname(os.path.dirname(os.path.abspath(path)))
  if root not in sys.path:
    sys.path.insert(0, root)
  spec = importlib.util.spec_from_file_location("fp4jax_config_check", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _preflight(argv: list[str]) -> None:
  """Exits with one line on a missing, unloadable or unknown --config."""
  if any(a in ("-h", "--help", "--helpshort", "-?") for a in argv[1:]):
    sys.stdout.write(_usage())
    sys.exit(0)
  spec = _config_spec(argv)
  if not spec:
    sys.exit("error: --config is required, e.g. --config=configs/demo.py "
             "(every key is documented in configs/default.py)")
  path, _, arg = spec.partition(":")
  if not os.path.isfile(path):
    sys.exit(f"error: --config: no such file {path!r}")
  try:
    module = _load_config_module(path)
  except SyntaxError as e:
    sys.exit(f"error: --config {path}: syntax error at line {e.lineno}: "
             f"{e.msg}")
  except Exception as e:  # an import error inside the config file
    sys.exit(f"error: --config {path} fails to load: {type(e).__name__}: "
             f"{errtext.one_line(e)}")
  if not hasattr(module, "get_config"):
    sys.exit(f"error: --config {path} has no get_config()")
  try:
    module.get_config(*([arg] if arg else []))
  except Exception as e:  # unknown :arg, bad :arg value
    sys.exit(f"error: --config={spec}: {type(e).__name__}: "
             f"{errtext.one_line(e)}")




def _say(text: str, signum: int | None = None) -> None:
  """One line on stderr, even when the terminal is gone (after SIGHUP a
  write to it fails: the exit code must still be the documented one)."""
  try:
    print(text, file=sys.stderr, flush=True)
  except OSError:
    pass
  if signum == signal.SIGHUP:
    # Python flushes stdout / stderr at exit and turns a failure into
    # exit code 120: point them somewhere that cannot fail.
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)


if __name__ == "__main__":
  _preflight(sys.argv)

# Imported after the preflight: `--help` and a bad --config answer at once.
import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import app, flags, logging  # pylint: disable=g-import-not-at-top
from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

from fp4jax import checkpoint  # pylint: disable=g-import-not-at-top
from fp4jax import distributed  # pylint: disable=g-import-not-at-top
from fp4jax import llama  # pylint: disable=g-import-not-at-top
from fp4jax import loop  # pylint: disable=g-import-not-at-top
from fp4jax import metrics  # pylint: disable=g-import-not-at-top
from fp4jax import rundir  # pylint: disable=g-import-not-at-top
from fp4jax import train  # pylint: disable=g-import-not-at-top

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Full stack on errors.")


def _unknown_key(argv: list[str]) -> str | None:
  """One line naming the first --config.a.b that the config file lacks."""
  path, _, arg = (_config_spec(argv) or "").partition(":")
  cfg = _load_config_module(path).get_config(*([arg] if arg else []))
  for key in (a[9:].split("=")[0] for a in argv if a.startswith("--config.")):
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        where = ".".join(parts[:i]) or "config"
        return f"unknown config key {key!r}; valid keys in {where}: {valid}"
      node = node[part]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return flags.FLAGS(argv)
  except (KeyError, AttributeError) as e:  # config_flags on an unknown key
    sys.exit(f"error: {_unknown_key(argv) or e}")
  except (ValueError, TypeError, flags.Error) as e:   # a malformed value
    sys.exit(f"error: {errtext.one_line(e)}")


def resolve_prng_impl(name: str) -> str:
  """"auto" -> "rbg" on GPU (the 125m init's threefry graph took minutes to
  compile on an H200, rbg seconds), "threefry2x32" elsewhere (bit-stable
  with every CPU run so far); any other name as given."""
  if name != "auto":
    return name
  return "rbg" if jax.default_backend() == "gpu" else "threefry2x32"


def summary_line(config, workdir: str, step: int, seconds: float) -> str:
  """A finished run in one line: the last line of its log, what a
  researcher reads first (final losses, tokens, time, the checkpoint)."""
  last = {}
  try:
    with open(os.path.join(workdir, metrics.METRICS_FILE)) as f:
      for line in f:
        try:
          record = json.loads(line)
        except ValueError:   # a line torn by a kill
          continue
        last.update({k: record[k] for k in ("loss", "val_loss")
                     if k in record})
  except OSError:
    pass
  tokens = step * config.data.global_batch * config.data.seq_len
  parts = [f"finished: step {step}/{config.num_steps}"]
  if "loss" in last:
    parts.append(f"loss {last['loss']:.4f}")
  if "val_loss" in last:
    parts.append(f"val {last['val_loss']:.4f}")
  minutes, secs = divmod(int(round(seconds)), 60)
  ckpt = os.path.join(workdir, checkpoint.CHECKPOINT_DIR, str(step))
  parts += [f"{tokens / 1e6:.2f}M tokens" if tokens >= 1e5 else
            f"{tokens} tokens", f"{minutes}m{secs:02d}s this start",
            f"checkpoint {ckpt}"]
  return " | ".join(parts)


def _run(config, workdir: str) -> int:
  start = time.monotonic()
  distributed.initialize(config.distributed)   # before any device is used
  if jax.process_index() > 0:
    # One console: other processes speak only at WARNING and above.
    logging.set_verbosity(logging.WARNING)
  prng = resolve_prng_impl(config.prng_impl)
  try:
    jax.config.update("jax_default_prng_impl", prng)
  except ValueError as e:
    raise ValueError(f"config.prng_impl: {e}") from None
  logging.info("backend %s: prng_impl=%s -> %s, model.attention=%s -> %s",
               jax.default_backend(), config.prng_impl, prng,
               config.model.attention, llama.attention_impl(
                   config.model.attention,
                   segmented=bool(config.data.get("segment_ids", False))))
  done = train.finished_step(config, workdir)
  if done is not None and jax.process_index() == 0:
    logging.info("the run in %s already finished at step %d "
                 "(num_steps=%d): nothing to do", workdir, done,
                 config.num_steps)
    print(f"already finished: {workdir} holds step {done} of "
          f"{config.num_steps}", file=sys.stderr)
  if done is not None:
    return 0
  state = train.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    _say(summary_line(config, workdir, int(jax.device_get(state.step)),
                      time.monotonic() - start))
  return 0


def main(_) -> None:
  # INFO lines from fp4jax only; libraries (orbax, jax) speak at WARNING+.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or r.pathname.startswith(
          os.path.dirname(train.__file__)))
  codes = ((loop.Stopped, None), (rundir.WorkdirBusy, EXIT_BUSY),
           (loop.NonFiniteError, EXIT_NONFINITE),
           (loop.TooManySkipped, EXIT_SKIPPED),
           (ValueError, EXIT_ERROR), (OSError, EXIT_ERROR))
  try:
    sys.exit(_run(_CONFIG.value, _WORKDIR.value))
  except KeyboardInterrupt:   # Ctrl-C twice, or before the loop's handler
    if _TRACEBACK.value:
      raise
    _say("aborted: interrupted (Ctrl-C); nothing saved since the last "
         "checkpoint")
    sys.exit(128 + signal.SIGINT)
  except tuple(t for t, _ in codes) as e:
    if _TRACEBACK.value:
      raise
    for kind, code in codes:
      if isinstance(e, kind):
        break
    if isinstance(e, loop.Stopped):
      _say(str(e), e.signum)
      sys.exit(128 + e.signum)
    _say(f"error: {errtext.one_line(e)}")
    sys.exit(code)


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
