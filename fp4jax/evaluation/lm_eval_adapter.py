r"""fp4jax checkpoints as an lm-evaluation-harness model (`--model fp4jax`).

  pip install -e ".[eval]"
  python -m fp4jax.evaluation.lm_eval_adapter --model fp4jax \
      --model_args workdir=runs/demo,precision=train --tasks piqa

The module registers `Fp4jaxLM` under the model name "fp4jax" when
imported; run as above it then hands its arguments to the stock harness
CLI (lm-eval finds only the models it has imported). From Python:
`lm_eval.simple_evaluate(model=Fp4jaxLM(workdir=...), tasks=[...])`.

Scoring is `fp4jax.evaluation.scoring` (the same requests and shapes as
`python -m fp4jax.evaluate`); `generate_until` decodes greedily, one full
forward per token at the padded bucket length (simple, not fast).

Must not import: ml_collections, or the CLI modules (evaluate, export, main).
"""

from __future__ import annotations

import sys
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from fp4jax.evaluation import loader
from fp4jax.evaluation import scoring


@register_model("fp4jax")
class Fp4jaxLM(LM):
  """An fp4jax run directory's checkpoint behind lm-eval's LM interface.

  Args (also `--model_args k=v,...`):
    workdir: the run directory.
    step: checkpoint step (default: the newest).
    precision: "train" (the recipe's forward), "bf16" or "f32".
    batch_size: rows per forward.
  """

  def __init__(self, workdir: str, step: int | None = None,
               precision: str = "train", batch_size: int = 16,
               **unused: Any):
    super().__init__()
    del unused   # lm-eval passes device / dtype keys meant for HF models
    self._loaded = loader.load(workdir, None if step in (None, "") else
                               int(step), precision)
    model = self._loaded.model()
    key = jax.random.key(0)
    self._model_fn = lambda x: model(x, key=key)
    self._forward = scoring.make_forward(self._model_fn)
    self._logits = jax.jit(self._model_fn)
    self._batch = int(batch_size)
    self._max_len = self._loaded.model_cfg.max_seq_len

  @property
  def tokenizer(self):
    return self._loaded.tokenizer

  def loglikelihood(self, requests, disable_tqdm: bool = False
                    ) -> list[tuple[float, bool]]:
    """(log p(continuation | context), greedy) per (context, continuation)."""
    reqs = [scoring.encode_pair(self.tokenizer, *r.args) for r in requests]
    return scoring.score(self._forward, reqs, max_len=self._max_len,
                         batch_size=self._batch)

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False
                            ) -> list[float]:
    """log p(text) per (text,): rolling windows of max_seq_len tokens."""
    out = []
    for r in requests:
      ids = [self.tokenizer.bos_id, *(int(t) for t in
                                      self.tokenizer.encode(r.args[0]))]
      windows = scoring.rolling_requests(ids, self._max_len)
      scores = scoring.score(self._forward, windows, max_len=self._max_len,
                             batch_size=self._batch)
      out.append(float(sum(ll for ll, _ in scores)))
    return out

  def generate_until(self, requests, disable_tqdm: bool = False
                     ) -> list[str]:
    """Greedy continuation of each (context, {until, max_gen_toks})."""
    out = []
    for r in requests:
      context, kwargs = r.args
      until = list(kwargs.get("until") or [])
      max_new = int(kwargs.get("max_gen_toks", 64))
      ids = [self.tokenizer.bos_id, *(int(t) for t in
                                      self.tokenizer.encode(context))]
      new: list[int] = []
      text = ""
      for _ in range(max_new):
        window = (ids + new)[-self._max_len:]
        length = scoring.bucket(len(window), self._max_len)
        x = np.zeros((1, length), np.int32)
        x[0, :len(window)] = window
        logits = self._logits(jnp.asarray(x))
        tok = int(np.argmax(np.asarray(logits[0, len(window) - 1])))
        if tok == self.tokenizer.eos_id:
          break
        new.append(tok)
        text = self.tokenizer.decode(new)
        if any(u in text for u in until):
          break
      for u in until:
        text = text.split(u)[0]
      out.append(text)
    return out


def main() -> None:
  """The stock lm-eval CLI, with the "fp4jax" model registered."""
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  sys.argv[0] = "lm_eval"
  cli_evaluate()


if __name__ == "__main__":
  main()
