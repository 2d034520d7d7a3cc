"""Tokenization in worker processes: batches of documents in, ids out.

Owns: the pool of tokenizer processes an input stream hands its documents
to (`TokenizePool`), and the one function they run. Results come back in
the order the batches were submitted, so the pool never changes what a
stream yields, only how fast: a run gives the same batches with 0, 1 or 8
workers.

Workers are spawned (never forked: the parent may hold JAX's threads and
locks) and load the tokenizer from its serialized model once. A spawned
process normally re-imports the parent's main module; the training CLI's
imports JAX and the whole trainer (seconds, and hundreds of MB per
worker), which a worker never uses, so the pool is started with a bare
`__main__` in place (`_bare_main`): workers import this module and the
tokenizer only. Each worker runs SentencePiece on one thread, so W
workers use W cores.

With workers=0 the batches are tokenized in the calling thread (with the
tokenizer's own threads), for tests and small runs.

Must not import: jax, ml_collections, tensorflow_datasets, grain, or fp4jax
modules outside fp4jax.data.
"""

import concurrent.futures
import contextlib
import multiprocessing
import os
import sys
import time
import types
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from fp4jax.data import tokenizer as tokenizer_lib

# Spawn a worker takes well over this long, so the warm-up tasks submitted
# back to back each meet a busy pool and start one new worker apiece.
_WARMUP_SECONDS = 0.2

_WORKER_TOKENIZER: tokenizer_lib.Tokenizer | None = None


def _init_worker(model_proto: bytes) -> None:
  global _WORKER_TOKENIZER
  _WORKER_TOKENIZER = tokenizer_lib.Tokenizer(model_proto)


def _warm_up() -> int:
  time.sleep(_WARMUP_SECONDS)
  return os.getpid()


def _encode(texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray, float]:
  start = time.perf_counter()
  ids, lengths = _WORKER_TOKENIZER.encode_documents(texts, num_threads=1)
  return ids, lengths, time.perf_counter() - start


@contextlib.contextmanager
def _bare_main() -> Iterator[None]:
  """`__main__` replaced by an empty module while workers are spawned."""
  main = sys.modules.get("__main__")
  sys.modules["__main__"] = types.ModuleType("__main__")
  try:
    yield
  finally:
    if main is not None:
      sys.modules["__main__"] = main


class Done:
  """A finished result with the `concurrent.futures.Future.result` API."""

  def __init__(self, value: Any):
    self._value = value

  def result(self) -> Any:
    return self._value


class TokenizePool:
  """Tokenizes batches of documents, in worker processes or in place.

  Attributes:
    workers: worker processes (0 = the calling thread).
  """

  def __init__(self, tokenizer: tokenizer_lib.Tokenizer, workers: int):
    """Starts `workers` processes (0: none).

    Raises:
      ValueError: workers < 0 (naming data.workers).
    """
    if workers < 0:
      raise ValueError(f"data.workers must be >= 0, got {workers}")
    self.workers = workers
    self._tokenizer = tokenizer
    self._executor = None
    if workers:
      self._executor = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"),
          initializer=_init_worker, initargs=(tokenizer.model_proto,))
      with _bare_main():
        warm = [self._executor.submit(_warm_up) for _ in range(workers)]
      for f in warm:
        f.result()

  def submit(self, texts: Sequence[str]) -> Any:
    """Starts tokenizing `texts`; returns a handle whose `result()` is
    (ids int32 [n], lengths int32 [len(texts)], seconds) as
    `Tokenizer.encode_documents` gives them."""
    if self._executor is None:
      start = time.perf_counter()
      ids, lengths = self._tokenizer.encode_documents(texts)
      return Done((ids, lengths, time.perf_counter() - start))
    return self._executor.submit(_encode, list(texts))

  def close(self) -> None:
    """Stops the workers (pending batches are dropped)."""
    if self._executor is not None:
      self._executor.shutdown(wait=False, cancel_futures=True)
      self._executor = None

  def __enter__(self) -> "TokenizePool":
    return self

  def __exit__(self, *exc: Any) -> None:
    self.close()
