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

--mode=stream measures the streamed `files` source instead (no train
step; nothing but the data modules):

  PYTHONPATH=. python bench/data_throughput.py --mode=stream \
      [--tokenizer=llama.model] [--first_batch_gb=1]

It cuts a corpus (--corpus, default the Gutenberg training books) into
web-sized documents (log-normal lengths, median ~2k characters, as DCLM's),
writes them as --shards .jsonl.zst shards, and reports, on this machine's
cores: the tokenizer's raw encode speed on those documents in memory
(SentencePiece's own batched call on 1 thread and on every core), the
delivered tokens/s of the pipeline (2048-token rows) with 1, 2, ... workers,
the ratios against the goals (>= 0.8x raw encode on the same cores, >= 1.7x
from 1 to 2 workers) and tokenized / consumed tokens (goal <= 1.02). With
--first_batch_gb it also times the first batch of a sample that large
(streamed) against the text_files source's preparation of the same text.

Owns: this measurement only. Needs tensorflow_datasets, grain and
sentencepiece (the data modules), plus jax and fp4jax.runconfig to measure a step.
"""

import json
import os
import statistics
import tempfile
import time

from absl import app, flags
from ml_collections import config_flags
import numpy as np

from fp4jax import data
from fp4jax.data import files

GOAL_RATIO = 10.0
GOAL_RAW = 0.8        # delivered / raw encode on the same cores
GOAL_SCALING = 1.7    # 2 workers / 1 worker
GOAL_TOKENIZED = 1.02  # tokenized / consumed
_DEFAULT_CORPUS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
    "shared", "data", "corpus", "gutenberg_en_train.txt")

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
_MODE = flags.DEFINE_enum("mode", "step", ["step", "stream"],
                          "step: pipeline vs train step; stream: the files "
                          "source against raw encode (module docstring).")
_CORPUS = flags.DEFINE_string("corpus", _DEFAULT_CORPUS,
                              "stream: text cut into documents.")
_TOKENIZER = flags.DEFINE_string(
    "tokenizer", "", "stream: SentencePiece model; '' = train a 32k BPE.")
_NUM_SHARDS = flags.DEFINE_integer("shards", 16, "stream: shards written.")
_WORKERS = flags.DEFINE_list("workers", ["1", "2"],
                             "stream: worker counts measured.")
_TOKENS = flags.DEFINE_integer("tokens", 6_000_000,
                               "stream: tokens delivered per measurement.")
_FIRST_GB = flags.DEFINE_float(
    "first_batch_gb", 0.0, "stream: also time the first batch of a sample "
    "this large against text_files' preparation (0 = skip).")


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


def _web_documents(path: str, limit_chars: int | None = None
                   ) -> list[str]:
  """Paragraphs of `path` grouped into documents of log-normal length
  (median ~2k characters, mean ~3.4k, as web pages), fixed seed."""
  with open(path, encoding="utf-8") as f:
    text = f.read(limit_chars) if limit_chars else f.read()
  paras = [p for p in text.split("\n\n") if p.strip()]
  rng = np.random.default_rng(0)
  docs, cur, size = [], [], 0
  want = rng.lognormal(np.log(2000), 1.0)
  for p in paras:
    cur.append(p)
    size += len(p)
    if size >= want:
      docs.append("\n\n".join(cur))
      cur, size = [], 0
      want = rng.lognormal(np.log(2000), 1.0)
  return docs


def _write_shards(docs: list[str], out: str, n: int, repeat: int = 1
                  ) -> list[str]:
  """`docs` (`repeat` times, each copy marked) as n .jsonl.zst shards."""
  import zstandard  # pylint: disable=g-import-not-at-top
  paths = []
  for k in range(n):
    path = os.path.join(out, f"shard-{k:05d}.jsonl.zst")
    with open(path, "wb") as raw:
      with zstandard.ZstdCompressor(level=3).stream_writer(raw) as w:
        for r in range(repeat):
          for i in range(k, len(docs), n):
            text = docs[i] if repeat == 1 else f"[{r}] {docs[i]}"
            w.write(json.dumps({"text": text}).encode() + b"\n")
    paths.append(path)
  return paths


def _stream_config(shards: str, tokenizer, workers: int):
  from configs import default  # pylint: disable=g-import-not-at-top
  d = default.get_config().data
  d.source = "files"
  d.train_files = (shards,)
  d.tokenizer_model = tokenizer.path
  d.vocab_size = tokenizer.vocab_size
  d.seq_len = 2048
  d.global_batch = 8
  d.val_fraction = 0.0
  d.workers = workers
  return d


def _raw_encode(tokenizer, docs: list[str], threads: int) -> float:
  """SentencePiece's own batched encode of `docs`, tokens/s."""
  t0 = time.perf_counter()
  ids, _ = tokenizer.encode_documents(docs, num_threads=threads)
  return ids.size / (time.perf_counter() - t0)


def _delivered(d, tokens: int) -> dict[str, float]:
  """Tokens/s of the files source after its first batch (which starts
  the workers), over at least `tokens` tokens."""
  it = data.make_input(d, split="train", seed=0)
  next(it)
  start = it.stats()
  t0 = time.perf_counter()
  n = 0
  while n < tokens:
    n += next(it)["inputs"].size
  elapsed = time.perf_counter() - t0
  end = it.stats()
  it.close()
  return {"tokens_per_s": (end["consumed"] - start["consumed"]) / elapsed,
          "tokenized": end["tokenized"], "consumed": end["consumed"]}


def _first_batch(tmp: str, docs: list[str], tokenizer, gb: float) -> None:
  """Seconds to the first batch of a `gb` GB sample: streamed (.jsonl.zst
  shards) vs text_files (prepares its TFDS copy of the same .jsonl)."""
  size = sum(len(d) for d in docs)
  repeat = max(1, int(gb * 1e9 / size + 0.5))
  big = os.path.join(tmp, "big")
  os.makedirs(big, exist_ok=True)
  t0 = time.perf_counter()
  _write_shards(docs, big, 64, repeat)
  jsonl = os.path.join(tmp, "big.jsonl")
  with open(jsonl, "w", encoding="utf-8") as f:
    for r in range(repeat):
      for text in docs:
        f.write(json.dumps({"text": f"[{r}] {text}"}) + "\n")
  print(f"sample: {repeat * size / 1e9:.2f} GB of text written in "
        f"{time.perf_counter() - t0:.0f} s")
  d = _stream_config(os.path.join(big, "*.jsonl.zst"), tokenizer, 1)
  files.close_pools()   # the first batch includes starting the worker
  t0 = time.perf_counter()
  it = data.make_input(d, split="train", seed=0)
  next(it)
  streamed = time.perf_counter() - t0
  it.close()
  d.source, d.train_files = "text_files", (jsonl,)
  d.tfds_data_dir = os.path.join(tmp, "tfds")
  t0 = time.perf_counter()
  it = data.make_input(d, split="train", seed=0)
  next(it)
  prepared = time.perf_counter() - t0
  print(f"first batch: streamed {streamed:.1f} s vs text_files "
        f"{prepared:.1f} s (prepare {os.path.getsize(jsonl) / prepared / 1e6:.0f}"
        f" MB/s): {prepared / streamed:.0f}x sooner")


def stream_main() -> None:
  """--mode=stream (module docstring)."""
  from fp4jax.data import tokenizer as tokenizer_lib  # pylint: disable=g-import-not-at-top
  cores = os.cpu_count() or 1
  tmp = tempfile.mkdtemp(prefix="stream_bench_")
  docs = _web_documents(_CORPUS.value)
  chars = sum(len(d) for d in docs)
  print(f"corpus: {len(docs)} documents, {chars / 1e6:.1f}M characters, "
        f"median {int(np.median([len(d) for d in docs]))} characters; "
        f"{cores} cores")
  if _TOKENIZER.value:
    tok = tokenizer_lib.Tokenizer.load(_TOKENIZER.value)
  else:
    path = os.path.join(tmp, "bpe32k.model")
    lines = [l for d in docs[: len(docs) // 2] for l in d.split("\n") if l]
    t0 = time.perf_counter()
    with open(path, "wb") as f:
      f.write(tokenizer_lib.train_bpe(lines, 32000))
    tok = tokenizer_lib.Tokenizer.load(path)
    print(f"tokenizer: {tok.vocab_size}-piece BPE trained in "
          f"{time.perf_counter() - t0:.0f} s")
  shard_dir = os.path.join(tmp, "shards")
  os.makedirs(shard_dir)
  _write_shards(docs, shard_dir, _NUM_SHARDS.value)
  window = docs[: len(docs) // 3]
  raw1 = _raw_encode(tok, window, 1)
  raw = _raw_encode(tok, window, cores)
  print(f"raw encode (in memory): {raw1:,.0f} tokens/s on 1 thread, "
        f"{raw:,.0f} on {cores}")
  rates = {}
  for w in (int(x) for x in _WORKERS.value):
    r = _delivered(_stream_config(os.path.join(shard_dir, "*.jsonl.zst"),
                                  tok, w), _TOKENS.value)
    rates[w] = r["tokens_per_s"]
    ratio = r["tokenized"] / r["consumed"]
    print(f"workers {w}: {r['tokens_per_s']:,.0f} tokens/s delivered "
          f"({r['tokens_per_s'] / w:,.0f} per worker core), tokenized / "
          f"consumed {ratio:.3f} (goal <= {GOAL_TOKENIZED})")
  best = max(rates.values())
  print(f"delivered / raw encode on {cores} cores: {best / raw:.2f}x (goal >= "
        f"{GOAL_RAW}): {'OK' if best >= GOAL_RAW * raw else 'BELOW GOAL'}")
  if 1 in rates and 2 in rates:
    scale = rates[2] / rates[1]
    print(f"1 -> 2 workers: {scale:.2f}x (goal >= {GOAL_SCALING}): "
          f"{'OK' if scale >= GOAL_SCALING else 'BELOW GOAL'}")
  if _FIRST_GB.value:
    _first_batch(tmp, docs, tok, _FIRST_GB.value)


def main(argv):
  del argv
  if _MODE.value == "stream":
    stream_main()
    return
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
