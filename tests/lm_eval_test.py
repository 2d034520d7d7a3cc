"""The lm-evaluation-harness adapter: its methods called directly on a few
requests, and the stock harness run on the local task files through it.

Needs the `eval` extra (lm_eval and its dependencies); runs in CI's Hugging
Face step (`-m hf`). The harness reads the task files with the `datasets`
json builder, offline.
"""

import json
import math
import os

# Before lm_eval imports `datasets` / `huggingface_hub`: nothing may reach
# the network (a hub lookup retries for minutes offline).
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax
import numpy as np
import pytest

import faults

lm_eval = pytest.importorskip("lm_eval")
from lm_eval.api.instance import Instance  # pylint: disable=wrong-import-position

from fp4jax import evaluate  # pylint: disable=wrong-import-position
from fp4jax.evaluation import harness_tasks  # pylint: disable=wrong-import-position
from fp4jax.evaluation import lm_eval_adapter  # pylint: disable=wrong-import-position
from fp4jax.evaluation import tasks  # pylint: disable=wrong-import-position

pytestmark = pytest.mark.hf

# The adapter's f32 sums vs the float64 oracle's (see evaluate_test).
LL_RTOL = 1e-5
# Harness vs fp4jax.evaluate: the same f32 log-likelihoods (same batch
# size, so the same padded forwards); the two exp(-mean) differ only by
# float64 summation order.
PPL_RTOL = 1e-9
BATCH = 2
TASK_DIR = faults.ROOT / "tests" / "testdata" / "eval"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  return str(faults.text_run(tmp_path_factory.mktemp("lmeval"), "fp4_paper"))


@pytest.fixture(scope="module")
def lm(workdir):
  return lm_eval_adapter.Fp4jaxLM(workdir=workdir, precision="f32",
                                  batch_size=BATCH)


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


def test_the_stock_harness_on_the_local_tasks_equals_fp4jax_evaluate(
    lm, workdir, tmp_path):
  from lm_eval.tasks import TaskManager  # pylint: disable=import-outside-toplevel
  names = list(tasks.TASKS)
  harness_names = harness_tasks.write(str(TASK_DIR), str(tmp_path / "t"),
                                      names)
  got = lm_eval.simple_evaluate(
      model=lm, tasks=harness_names, bootstrap_iters=0,   # no forked pool
      task_manager=TaskManager(include_path=str(tmp_path / "t")))["results"]
  assert evaluate.main([f"--workdir={workdir}", f"--tasks={','.join(names)}",
                        f"--data_dir={TASK_DIR}", "--precision=f32",
                        f"--batch_size={BATCH}"]) == 0
  step = max(int(f[5:-5]) for f in os.listdir(os.path.join(workdir, "eval")))
  with open(os.path.join(workdir, "eval", f"step_{step}.json")) as f:
    ours = {r["task"]: r["metrics"] for r in json.load(f)["results"]
            if r["precision"] == "f32"}
  for name in names:
    h = got[harness_tasks.task_name(name)]
    n = len(tasks.load(name, str(TASK_DIR)))
    assert h["sample_len"] == n == ours[name]["acc"]["n"], name
    assert h["acc,none"] == ours[name]["acc"]["value"], name
    if tasks.TASKS[name].kind == "lambada":
      assert math.isclose(h["perplexity,none"],
                          ours[name]["perplexity"]["value"],
                          rel_tol=PPL_RTOL), name
    else:
      assert h["acc_norm,none"] == ours[name]["acc_norm"]["value"], name


def test_the_adapter_cli_runs_the_stock_harness_on_local_files(workdir):
  r = faults.run_main(
      "--model", "fp4jax", "--model_args", f"workdir={workdir},precision=f32",
      "--tasks", "fp4jax_boolq,fp4jax_sciq",
      f"--data_dir={TASK_DIR}", "--batch_size", "4",
      module="fp4jax.evaluation.lm_eval_adapter")
  assert r.returncode == 0, r.stderr[-3000:]
  rows = [l for l in r.stdout.splitlines() if l.startswith("|fp4jax_")]
  assert [l.split("|")[1].strip() for l in rows] == [
      "fp4jax_boolq", "fp4jax_sciq"], r.stdout[-2000:]


def test_the_adapter_cli_names_a_bad_data_dir_in_one_line(workdir,
                                                           tmp_path):
  r = faults.run_main(
      "--model", "fp4jax", "--model_args", f"workdir={workdir}",
      "--tasks", "fp4jax_piqa", f"--data_dir={tmp_path}",
      module="fp4jax.evaluation.lm_eval_adapter")
  assert r.returncode == 1, r.stderr[-2000:]
  last = faults.last_line(r.stderr)
  assert last.startswith(f"error: --data_dir {tmp_path}: ") and (
      "piqa" in last), r.stderr[-2000:]
  assert "Traceback" not in r.stderr
