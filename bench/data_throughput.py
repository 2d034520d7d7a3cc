r"""Input pipeline throughput against what the train step consumes.

  PYTHONPATH=. python bench/data_throughput.py                # stdlib corpus
  PYTHONPATH=. python bench/data_throughput.py --config=configs/gutenberg.py
  PYTHONPATH=. python bench/data_throughput.py --step_time=0.25 \
      --config.data.source=stdlib --config.data.vocab_size=4096

Builds the configured input (data.source must be a text source; the demo
config is switched to "stdlib"), reports the cold start (prepare the TFDS
copy + train the tokenizer, or reuse them from --workdir), pulls --warmup
batches, then times --batches batches: tokens/s = batches * b * T / time.
The train step's consumption is global_batch * seq_len / step time, with
the step time from --step_time or, when it is 0, measured on this machine
(median of --steps compiled train steps of the configured model on these
very batches, one device). Goal: pipeline >= 10x consumption.

Owns: this measurement only. Needs tensorflow_datasets, grain and
sentencepiece (the data modules), plus jax and fp4jax.runconfig to measure a step.
"""

import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags

from fp4jax import data

GOAL_RATIO = 10.0

_CONFIG = config_flags.DEFINE_config_file("config", "configs/demo.py",
                                          lock_config=False)
_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Where the TFDS copy and tokenizer are cached "
    "(default: a fresh temporary dir, i.e. a cold start).")
_WARMUP = flags.DEFINE_integer("warmup", 20, "Untimed batches first.")
_BATCHES = flags.DEFINE_integer("batches", 300, "Timed batches.")
_STEP_TIME = flags.DEFINE_float(
    "step_time", 0.0, "Train step seconds; 0 = measure the configured model.")
_STEPS = flags.DEFINE_integer("steps", 5, "Train steps timed (after 2).")


def _measure_step_time(config, it, steps: int) -> float:
  """Median seconds of the configured train step on one device."""
  # Imported here: the pipeline alone needs no jax (--step_time given).
  import jax  # pylint: disable=g-import-not-at-top
  from fp4jax import optim  # pylint: disable=g-import-not-at-top
  from fp4jax import sharding  # pylint: disable=g-import-not-at-top
  from fp4jax import runconfig  # pylint: disable=g-import-not-at-top
  from fp4jax import train_state  # pylint: disable=g-import-not-at-top
  model_cfg = runconfig.model_config(config.model.to_dict(), it.vocab_size)
  rules, _ = runconfig.quant_rules(config.quant)
  mesh = sharding.make_mesh(devices=jax.devices()[:1])
  trainer = train_state.make_trainer(
      model_cfg, rules, optim.OptimConfig(**config.optim.to_dict()),
      num_steps=config.num_steps, mesh=mesh,
      global_batch=config.data.global_batch, seq_len=config.data.seq_len,
      seed=config.seed, segment_ids=config.data.segment_ids)
  state = trainer.init()
  times = []
  for i in range(steps + 2):
    batch = trainer.put_batch(next(it))
    t0 = time.perf_counter()
    state, metrics = trainer.train_step(state, batch)
    jax.block_until_ready(metrics)
    if i >= 2:   # the first calls include one-off work
      times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv):
  del argv
  config = _CONFIG.value
  if config.data.source == "synthetic":
    config.data.source = "stdlib"
  workdir = _WORKDIR.value or tempfile.mkdtemp(prefix="data_bench_")
  d = config.data
  t0 = time.perf_counter()
  it = data.make_input(d, split="train", seed=0, workdir=workdir)
  cold = time.perf_counter() - t0
  print(f"source {d.source}: {it.num_documents} documents, vocab "
        f"{it.vocab_size}, b={d.global_batch} T={d.seq_len}; make_input "
        f"{cold:.1f} s (prepare + tokenizer, workdir {workdir})")
  for _ in range(_WARMUP.value):
    next(it)
  before = dict(it.tokenize_stats)
  t0 = time.perf_counter()
  for _ in range(_BATCHES.value):
    next(it)
  elapsed = time.perf_counter() - t0
  tok = {k: it.tokenize_stats[k] - before[k] for k in before}
  consumed = _BATCHES.value * d.global_batch * d.seq_len
  print(f"timed: {consumed / elapsed:,.0f} tokens/s over {_BATCHES.value} "
        f"batches ({elapsed / _BATCHES.value * 1e3:.2f} ms/batch); "
        f"{tok['documents']} documents tokenized in the window")
  # Long documents are tokenized rarely, so a short window can miss most of
  # that cost. In steady state every consumed token is tokenized once:
  # per-token time = packing time / consumed + tokenizing time / tokenized.
  if tok["tokens"]:
    rate = tok["tokens"] / max(tok["seconds"], 1e-9)
    pipeline = 1.0 / ((elapsed - tok["seconds"]) / consumed + 1.0 / rate)
    print(f"tokenizer: {rate:,.0f} tokens/s; pipeline steady state: "
          f"{pipeline:,.0f} tokens/s")
  else:
    pipeline = consumed / elapsed
    print("no document was tokenized in the window: raise --batches to "
          "include the tokenizer's cost")
  step_time = _STEP_TIME.value
  how = "given"
  if step_time <= 0:
    step_time = _measure_step_time(config, it, _STEPS.value)
    how = f"measured, {config.model.size} model, {config.quant.recipe}"
  consumed = d.global_batch * d.seq_len / step_time
  ratio = pipeline / consumed
  print(f"train step: {step_time * 1e3:.1f} ms ({how}) -> consumes "
        f"{consumed:,.0f} tokens/s")
  print(f"ratio pipeline / consumption: {ratio:.1f}x (goal >= "
        f"{GOAL_RATIO:.0f}x): {'OK' if ratio >= GOAL_RATIO else 'BELOW GOAL'}")


if __name__ == "__main__":
  app.run(main)
