"""Log-likelihood scoring of continuations, batched at a few fixed shapes.

Owns: turning (context, continuation) text pairs into token requests the way
lm-evaluation-harness does, scoring them with one jitted forward per padded
shape, and the per-task metrics (acc, acc_norm, LAMBADA's accuracy and
perplexity, rolling perplexity and bits per byte of text files).

Requests are padded on the right to the smallest bucket length (powers of
two from MIN_BUCKET up to the model's max_seq_len) and grouped into batches
of one fixed size, so a whole task compiles at most a handful of programs.
The model is causal and every recipe scales activations per token, so
neither the padding nor a request's batch neighbours change its score
(beyond f32 reassociation in the attention sums).

Must not import: ml_collections, or the CLI modules (evaluate, export).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

# Shortest padded length: shorter requests share one compiled shape.
MIN_BUCKET = 16
# The key of the model's stochastic pieces (none in an evaluation forward).
_EVAL_KEY_SEED = 0


@dataclasses.dataclass(frozen=True)
class Request:
  """One scored continuation: int token ids (context starts with BOS)."""
  context: tuple[int, ...]
  continuation: tuple[int, ...]


def encode_pair(tokenizer: Any, context: str, continuation: str) -> Request:
  """lm-eval's pairing: trailing spaces of the context join the
  continuation; the continuation's tokens are those of context +
  continuation after the context's own (so a merge across the boundary
  counts for the continuation); BOS starts the context."""
  spaces = len(context) - len(context.rstrip(" "))
  if spaces:
    continuation = context[-spaces:] + continuation
    context = context[:-spaces]
  whole = [int(t) for t in tokenizer.encode(context + continuation)]
  ctx = [int(t) for t in tokenizer.encode(context)]
  cont = whole[len(ctx):]
  if not cont:   # the tokenizer folded the continuation into the context
    cont = [int(t) for t in tokenizer.encode(continuation)]
  return Request((tokenizer.bos_id, *ctx), tuple(cont))


def bucket(length: int, max_len: int) -> int:
  """The padded length of a request of `length` input tokens."""
  b = MIN_BUCKET
  while b < length:
    b *= 2
  return min(b, max_len)


def make_forward(model_fn: Callable[[jax.Array], jax.Array]
                 ) -> Callable[..., tuple[jax.Array, jax.Array]]:
  """A jitted (inputs, targets, mask) -> (sum log p [B], all greedy [B]).

  Args:
    model_fn: int32 [B, L] inputs -> f32 [B, L, V] logits.

  Returns:
    fn(inputs int32 [B, L], targets int32 [B, L], mask f32 [B, L]):
    per row, the sum of log p(target) over masked positions (f32) and
    whether every masked target is the argmax (bool).
  """
  @jax.jit
  def fn(inputs, targets, mask):
    logits = model_fn(inputs).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    greedy = jnp.argmax(logits, axis=-1) == targets
    ll = jnp.sum(tok * mask, axis=-1)
    all_greedy = jnp.all(greedy | (mask == 0), axis=-1)
    return ll, all_greedy
  return fn


def score(forward: Callable[..., Any], requests: Sequence[Request], *,
          max_len: int, batch_size: int,
          progress: Callable[[int], None] | None = None
          ) -> list[tuple[float, bool]]:
  """(log p(continuation | context), greedy) of each request, in order.

  Args:
    forward: `make_forward`'s function.
    requests: the requests.
    max_len: the model's longest input; longer requests keep their last
      max_len + 1 tokens (as lm-eval truncates), the continuation first.
    batch_size: rows per forward (the last batch of a bucket is padded).
    progress: called with the number of requests done after each batch.

  Returns:
    One (float, bool) per request.
  """
  rows = []
  for r in requests:
    tokens = (r.context + r.continuation)[-(max_len + 1):]
    n_cont = min(len(r.continuation), len(tokens) - 1)
    rows.append((tokens, n_cont))
  order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
  out: list[tuple[float, bool] | None] = [None] * len(rows)
  by_bucket: dict[int, list[int]] = {}
  for i in order:
    by_bucket.setdefault(bucket(len(rows[i][0]) - 1, max_len), []).append(i)
  done = 0
  for length, idx in by_bucket.items():
    for start in range(0, len(idx), batch_size):
      chunk = idx[start:start + batch_size]
      inputs = np.zeros((batch_size, length), np.int32)
      targets = np.zeros((batch_size, length), np.int32)
      mask = np.zeros((batch_size, length), np.float32)
      for row, i in enumerate(chunk):
        tokens, n_cont = rows[i]
        n = len(tokens) - 1
        inputs[row, :n] = tokens[:-1]
        targets[row, :n] = tokens[1:]
        mask[row, n - n_cont:n] = 1.0
      ll, greedy = jax.device_get(forward(inputs, targets, mask))
      for row, i in enumerate(chunk):
        out[i] = (float(ll[row]), bool(greedy[row]))
      done += len(chunk)
      if progress is not None:
        progress(done)
  return out  # type: ignore[return-value]


def rolling_requests(tokens: Sequence[int], max_len: int) -> list[Request]:
  """Disjoint windows of up to max_len predicted tokens covering `tokens`.

  tokens: [BOS] + the text's ids. Each window predicts its tokens from the
  window itself and the one token before it (lm-eval's rolling windows with
  a context of 1), so every token after BOS is predicted exactly once.
  """
  out = []
  for start in range(1, len(tokens), max_len):
    out.append(Request((tokens[start - 1],),
                       tuple(tokens[start:start + max_len])))
  return out


def _stderr(values: Sequence[float]) -> float | None:
  """Standard error of the mean (sample std / sqrt n), as lm-eval reports;
  None for fewer than 2 values (undefined: no NaN goes into a record)."""
  n = len(values)
  if n < 2:
    return None
  return float(np.std(np.asarray(values, np.float64), ddof=1) / math.sqrt(n))


def multiple_choice_metrics(lls: Sequence[Sequence[float]],
                            choices: Sequence[Sequence[str]],
                            golds: Sequence[int]) -> dict[str, Any]:
  """acc (argmax log p) and acc_norm (argmax log p / len(choice) in
  characters, lm-eval's length normalisation), with stderr and n.

  `choices` are the choice texts as lm-eval's doc_to_choice gives them,
  without the target delimiter it prepends when scoring (its acc_norm
  divides by len(" abc") - 1 = 3, not 4; `Item.choice_texts()`)."""
  acc = [float(int(np.argmax(ll)) == g) for ll, g in zip(lls, golds)]
  acc_norm = [float(int(np.argmax([v / max(len(c), 1)
                                   for v, c in zip(ll, ch)])) == g)
              for ll, ch, g in zip(lls, choices, golds)]
  return {"acc": _metric(acc), "acc_norm": _metric(acc_norm)}


def lambada_metrics(results: Sequence[tuple[float, bool]]) -> dict[str, Any]:
  """acc (the last word is the greedy continuation) and perplexity
  exp(-mean log p(last word)), as lm-eval's lambada_openai."""
  acc = [float(g) for _, g in results]
  lls = [ll for ll, _ in results]
  ppl = math.exp(-float(np.mean(lls))) if lls else float("nan")
  return {"acc": _metric(acc),
          "perplexity": {"value": ppl, "stderr": None, "n": len(lls)}}


def text_metrics(lls: Iterable[float], n_tokens: int, n_bytes: int
                 ) -> dict[str, Any]:
  """Token perplexity exp(-sum log p / tokens) and bits per byte."""
  total = float(sum(lls))
  return {"token_perplexity": {"value": math.exp(-total / max(n_tokens, 1)),
                               "stderr": None, "n": n_tokens},
          "bits_per_byte": {"value": -total / math.log(2) / max(n_bytes, 1),
                            "stderr": None, "n": n_bytes}}


def _metric(values: Sequence[float]) -> dict[str, Any]:
  return {"value": float(np.mean(values)) if values else float("nan"),
          "stderr": _stderr(values), "n": len(values)}
