"""Synthetic token source: a fixed sparse Markov chain, deterministic.

Owns: the synthetic "language" (a random bigram table with a few likely
successors per token, so a model can learn it and the loss falls toward the
chain's entropy rate) and an exact, resumable batch iterator over it.

Every example is generated from its own seed (seed, split, example index), so
batch contents depend only on the position, never on how many processes read
them: process p of P gets rows [p*b, (p+1)*b) of the global batch. The
iterator state is just the position.

Must not import: ml_collections, tensorflow_datasets, grain, or any fp4jax
module outside fp4jax.data.
"""

from typing import Any

import numpy as np

from fp4jax.data import resume

# The table is part of the task's definition, not of a run: it stays the same
# across seeds, splits and processes so train and val share one "language".
_TABLE_SEED = 20250117
_SUCCESSORS = 4        # likely next tokens per token (entropy <= log 4)
_DOC_LEN_MEAN = 64     # mean document length when packing with segment ids
_SPLITS = {"train": 0, "val": 1}


def markov_table(vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The fixed chain: successors [V, S] int32 and their CDF [V, S] float64."""
  rng = np.random.default_rng(_TABLE_SEED + vocab_size)
  succ = rng.integers(0, vocab_size, (vocab_size, _SUCCESSORS))
  probs = rng.dirichlet(np.ones(_SUCCESSORS), size=vocab_size)
  return succ.astype(np.int32), np.cumsum(probs, axis=-1)


def entropy_rate(vocab_size: int) -> float:
  """Mean per-token entropy (nats) of the chain's rows: the loss floor.

  Rows are averaged uniformly; successors that collide on one token make the
  true conditional entropy a little lower, so this is an upper bound.
  """
  _, cdf = markov_table(vocab_size)
  p = np.diff(cdf, axis=-1, prepend=0.0)
  return float(-(p * np.log(np.maximum(p, 1e-30))).sum(-1).mean())


class SyntheticInput:
  """Iterator of {"inputs", "targets", "mask", "segment_ids"} numpy batches.

  Attributes:
    vocab_size: number of token ids (ids are in [0, vocab_size)).
  """

  def __init__(self, *, vocab_size: int, seq_len: int, global_batch: int,
               seed: int, split: str = "train", segment_ids: bool = False,
               process_index: int = 0, process_count: int = 1):
    """Builds the iterator at position 0.

    Args:
      vocab_size: token ids are in [0, vocab_size); >= 2.
      seq_len: T, tokens per row.
      global_batch: rows per step over all processes.
      seed: stream seed (the table does not depend on it).
      split: "train" or "val" (disjoint streams).
      segment_ids: pack several documents per row and mark them 1, 2, ...;
        otherwise every row is one document (ids all 1).
      process_index: this process; it reads rows [i*b, (i+1)*b).
      process_count: number of processes; must divide global_batch.

    Raises:
      ValueError: naming the data.* key that is invalid.
    """
    if vocab_size < 2:
      raise ValueError(f"data.vocab_size must be >= 2 for the synthetic "
                       f"source, got {vocab_size}")
    if seq_len < 1:
      raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
    if split not in _SPLITS:
      raise ValueError(f"split must be one of {sorted(_SPLITS)}, got {split!r}")
    if global_batch < 1 or global_batch % process_count:
      raise ValueError(f"data.global_batch={global_batch} must be a positive "
                       f"multiple of the process count {process_count}")
    self.vocab_size = vocab_size
    self._seq_len = seq_len
    self._global_batch = global_batch
    self._local_batch = global_batch // process_count
    self._row0 = process_index * self._local_batch
    self._seed = seed
    self._split = _SPLITS[split]
    self._segment_ids = segment_ids
    self._succ, self._cdf = markov_table(vocab_size)
    self._position = 0
    # What a saved position is only valid for (checked on set_state).
    self._identity = {"vocab_size": vocab_size, "seq_len": seq_len,
                      "global_batch": global_batch, "seed": seed,
                      "split": split, "segment_ids": segment_ids,
                      "process_index": process_index,
                      "process_count": process_count}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    """The batch at the current position; advances by one.

    Returns:
      inputs, targets: int32 [b, T]; mask: float32 [b, T] (0 where the
      target starts a new document); segment_ids: int32 [b, T] (>= 1).
    """
    b, t = self._local_batch, self._seq_len
    first = self._position * self._global_batch + self._row0
    # One generator per example: the rows a process gets do not depend on the
    # process count, and a batch does not depend on earlier batches.
    rngs = [np.random.default_rng([self._seed, self._split, first + r])
            for r in range(b)]
    u = np.stack([g.random(t + 1) for g in rngs])            # [b, T+1]
    starts = np.stack([g.integers(0, self.vocab_size, t + 1) for g in rngs])
    if self._segment_ids:
      new_doc = np.stack([g.random(t + 1) for g in rngs]) < 1 / _DOC_LEN_MEAN
      new_doc[:, 0] = True
    else:
      new_doc = np.zeros((b, t + 1), bool)
      new_doc[:, 0] = True
    tokens = np.empty((b, t + 1), np.int32)
    tokens[:, 0] = starts[:, 0]
    for i in range(1, t + 1):
      prev = tokens[:, i - 1]
      k = (u[:, i, None] >= self._cdf[prev]).sum(-1)
      k = np.minimum(k, _SUCCESSORS - 1)   # u can exceed cdf[-1] by rounding
      nxt = self._succ[prev, k]
      tokens[:, i] = np.where(new_doc[:, i], starts[:, i], nxt)
    seg = np.cumsum(new_doc, axis=1).astype(np.int32)         # [b, T+1]
    self._position += 1
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "mask": (seg[:, 1:] == seg[:, :-1]).astype(np.float32),
        "segment_ids": seg[:, :-1],
    }

  def get_state(self) -> dict[str, Any]:
    """JSON-able position of the iterator."""
    return {"source": "synthetic", "position": self._position,
            "identity": dict(self._identity)}

  def set_state(self, state: dict[str, Any]) -> None:
    """Moves to a position returned by `get_state`, or to the common
    position of another process count's states (the batch at a position
    does not depend on the process count)."""
    states = state.get("all_processes")
    for s in states or [state]:
      if s.get("source") != "synthetic" or "position" not in s:
        raise ValueError(f"not a synthetic data state: {s!r:.200}")
      saved, now = dict(s.get("identity") or {}), dict(self._identity)
      if states:   # only the process layout may differ
        for key in ("process_index", "process_count"):
          saved.pop(key, None)
          now.pop(key, None)
      resume.check_identity(saved, now)
    positions = {int(s["position"]) for s in states or [state]}
    if len(positions) != 1:
      raise ValueError(f"synthetic data states of one step disagree on the "
                       f"position: {sorted(positions)}")
    self._position = positions.pop()


def make_input(data_cfg: Any, *, split: str, seed: int, process_index: int,
               process_count: int, workdir: str | None = None
               ) -> SyntheticInput:
  """Source entry point for `fp4jax.data.make_input` (data.source=synthetic).

  Reads data_cfg.vocab_size, seq_len, global_batch and segment_ids.
  """
  del workdir  # nothing to cache
  return SyntheticInput(
      vocab_size=data_cfg.vocab_size, seq_len=data_cfg.seq_len,
      global_batch=data_cfg.global_batch, seed=seed, split=split,
      segment_ids=bool(data_cfg.segment_ids), process_index=process_index,
      process_count=process_count)
