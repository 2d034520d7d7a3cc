"""The lm-evaluation-harness adapter, called directly on a few requests.

Needs the `eval` extra (lm_eval); runs in CI's Hugging Face step (`-m hf`).
"""

import math

import jax
import numpy as np
import pytest

import faults

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # pylint: disable=wrong-import-position

from fp4jax.evaluation import lm_eval_adapter  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.hf

# The adapter's f32 sums vs the float64 oracle's (see evaluate_test).
LL_RTOL = 1e-5


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
  workdir = faults.text_run(tmp_path_factory.mktemp("lmeval"), "fp4_paper")
  return lm_eval_adapter.Fp4jaxLM(workdir=str(workdir), precision="f32",
                                  batch_size=2)


def _logp(lm, tokens):
  """float64 log-softmax of one unpadded forward: [len - 1, V]."""
  logits = np.asarray(lm._model_fn(np.asarray(tokens[None, :-1], np.int32)),  # pylint: disable=protected-access
                      np.float64)[0]
  z = logits - logits.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _req(kind, *args):
  return Instance(request_type=kind, doc={}, arguments=args, idx=0)


def test_the_registry_knows_the_model():
  from lm_eval.api.registry import get_model  # pylint: disable=import-outside-toplevel
  assert get_model("fp4jax") is lm_eval_adapter.Fp4jaxLM


def test_loglikelihood_equals_a_float64_reference(lm):
  pairs = [("the cat", " sat on"), ("a dog", " ran"), ("", " park")]
  out = lm.loglikelihood([_req("loglikelihood", c, x) for c, x in pairs])
  tok = lm.tokenizer
  for (ctx, cont), (ll, greedy) in zip(pairs, out):
    ctx_ids = [tok.bos_id, *tok.encode(ctx)]
    cont_ids = [int(t) for t in tok.encode(ctx + cont)][len(ctx_ids) - 1:]
    tokens = np.asarray(ctx_ids + cont_ids)
    logp = _logp(lm, tokens)
    pos = range(len(ctx_ids) - 1, len(tokens) - 1)
    ref = sum(logp[i, tokens[i + 1]] for i in pos)
    assert math.isclose(ll, ref, rel_tol=LL_RTOL), (ll, ref)
    assert greedy == all(np.argmax(logp[i]) == tokens[i + 1] for i in pos)


def test_rolling_loglikelihood_covers_a_long_text_in_windows(lm):
  text = " ".join(["the cat sat on a mat"] * 30)   # > 64 tokens
  (ll,) = lm.loglikelihood_rolling([_req("loglikelihood_rolling", text)])
  ids = np.asarray([lm.tokenizer.bos_id, *lm.tokenizer.encode(text)])
  max_len = lm._max_len  # pylint: disable=protected-access
  assert len(ids) > max_len + 1
  ref = 0.0
  for start in range(1, len(ids), max_len):
    window = ids[start - 1:start + max_len]
    logp = _logp(lm, window)
    ref += sum(logp[i, window[i + 1]] for i in range(len(window) - 1))
  assert math.isclose(ll, ref, rel_tol=LL_RTOL), (ll, ref)


def test_generate_until_is_greedy_and_stops(lm):
  ctx = "the cat"
  (text,) = lm.generate_until([_req("generate_until", ctx,
                                    {"until": ["\n"], "max_gen_toks": 5})])
  assert "\n" not in text
  ids = np.asarray([lm.tokenizer.bos_id, *lm.tokenizer.encode(ctx)])
  first = int(np.argmax(_logp(lm, np.append(ids, 0))[-1]))
  assert text.startswith(lm.tokenizer.decode([first])) or first == (
      lm.tokenizer.eos_id)
