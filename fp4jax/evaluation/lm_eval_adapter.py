r"""fp4jax checkpoints as an lm-evaluation-harness model (`--model fp4jax`).

  pip install -e ".[eval]"
  fp4jax-lm-eval --model fp4jax \
      --model_args workdir=runs/demo,precision=train --tasks piqa
  fp4jax-lm-eval --model fp4jax --model_args workdir=runs/demo \
      --tasks fp4jax_piqa --data_dir DIR        # local files, offline

The module registers `Fp4jaxLM` under the model name "fp4jax" when
imported; `fp4jax-lm-eval` (or `python -m` this module) then hands its
arguments to the stock harness CLI: lm-eval 0.4 finds only the models of
its own table or ones already imported, so a bare `lm_eval --model fp4jax`
cannot. `--data_dir` is ours (see `main`). From Python:
`lm_eval.simple_evaluate(model=Fp4jaxLM(workdir=...), tasks=[...])`.

Scoring is `fp4jax.evaluation.scoring` (the same requests and shapes as
`python -m fp4jax.evaluate`); `generate_until` decodes greedily, one full
forward per token at the padded bucket length (simple, not fast).

Must not import: ml_collections, or the CLI modules (evaluate, export, main).
"""

from __future__ import annotations

import sys
import tempfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from fp4jax.evaluation import harness_tasks
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
    if batch_size is None or str(batch_size).startswith("auto"):
      batch_size = 16   # lm-eval's "auto[:N]" probes HF models' memory
    self._loaded = loader.load(workdir, None if step in (None, "") else
                               int(step), precision)
    model = self._loaded.model()
    key = jax.random.key(0)
    self._model_fn = lambda x: model(x, key=key)
    self._forward = scoring.make_forward(self._model_fn)
    self._logits = jax.jit(self._model_fn)
    self._batch = int(batch_size)
    self._max_len = self._loaded.model_cfg.max_seq_len

  @classmethod
  def create_from_arg_obj(cls, arg_dict, additional_config=None):
    """Keys given in --model_args win over the harness's own (its
    --batch_size default 1 must not clash with batch_size=N there)."""
    extra = {k: v for k, v in (additional_config or {}).items()
             if v is not None and k not in arg_dict}
    return cls(**arg_dict, **extra)

  @classmethod
  def create_from_arg_string(cls, arg_string, additional_config=None):
    from lm_eval import utils  # pylint: disable=import-outside-toplevel
    return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string),
                                   additional_config)

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


def _flag_value(argv: list[str], flag: str, pop: bool = False
                ) -> str | None:
  """VALUE of `flag VALUE` or `flag=VALUE` in argv (removed if `pop`)."""
  for i, a in enumerate(argv):
    if a == flag and i + 1 < len(argv):
      value = argv[i + 1]
      if pop:
        del argv[i:i + 2]
      return value
    if a.startswith(flag + "="):
      if pop:
        del argv[i]
      return a[len(flag) + 1:]
  return None


def main(argv: list[str] | None = None) -> None:
  """The stock lm-eval CLI, with the "fp4jax" model registered.

  One flag of ours: `--data_dir DIR` writes the local task files in DIR as
  harness tasks `fp4jax_<task>` (`harness_tasks`) into a fresh temporary
  folder and passes it to the harness as `--include_path`.
  """
  from lm_eval.__main__ import cli_evaluate  # pylint: disable=import-outside-toplevel
  argv = list(sys.argv[1:] if argv is None else argv)
  data_dir = _flag_value(argv, "--data_dir", pop=True)
  if data_dir is not None:
    names = [t[len(harness_tasks.PREFIX):]
             for t in (_flag_value(argv, "--tasks") or "").split(",")
             if t.startswith(harness_tasks.PREFIX)]
    out_dir = tempfile.mkdtemp(prefix="fp4jax_harness_tasks_")
    try:
      harness_tasks.write(data_dir, out_dir, names)
    except ValueError as e:
      sys.exit(f"error: --data_dir {data_dir}: {e}")
    argv += ["--include_path", out_dir]
  sys.argv = ["lm_eval", *argv]
  cli_evaluate()


if __name__ == "__main__":
  main()
