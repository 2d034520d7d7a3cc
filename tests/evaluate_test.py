"""Evaluation (fp4jax.evaluate): scores against a float64 oracle, edge models,
padding invariance, and the CLI on a trained tiny run."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fp4jax import evaluate
from fp4jax.evaluation import loader
from fp4jax.evaluation import scoring
from fp4jax.evaluation import tasks
import faults

# f32 logits of the tiny model: a summed log-probability over a handful of
# tokens is within a few f32 ulps of the float64 oracle's.
LL_RTOL = 1e-5
# Other bucket lengths / batch neighbours reassociate the attention's f32
# sums (masked keys add exact zeros, in another order).
PAD_RTOL = 1e-5

V = 8


class _CharTokenizer:
  """ids = (byte % 7) + 1; BOS = 0: enough to drive the scorer."""
  bos_id = 0

  def encode(self, text):
    return np.asarray([b % (V - 1) + 1 for b in text.encode()], np.int32)


def _favouring(token):
  """A model whose every position puts its mass on `token`."""
  def model_fn(x):
    return jnp.broadcast_to(20.0 * jax.nn.one_hot(token, V),
                            (*x.shape, V))
  return scoring.make_forward(model_fn)


def _mc_accuracy(forward, items):
  tok = _CharTokenizer()
  reqs = [scoring.encode_pair(tok, ctx, c) for ctx, ch, _ in items
          for c in ch]
  out = scoring.score(forward, reqs, max_len=32, batch_size=3)
  lls = [[out[2 * i][0], out[2 * i + 1][0]] for i in range(len(items))]
  return scoring.multiple_choice_metrics(
      lls, [ch for _, ch, _ in items], [g for _, _, g in items])


def test_a_model_favouring_the_gold_scores_100_and_one_against_it_0():
  a_id = _CharTokenizer().encode("a")[0]
  # Choice "a..." is all `a_id` tokens; "b..." none (b % 7 != a % 7).
  items = [("Q: x", (" aaa", " bbb"), 0), ("Q: yy", (" bbbb", " aaaa"), 1),
           ("Q: z", (" aaaaa", " bb"), 0)]
  good = _mc_accuracy(_favouring(a_id), items)
  assert good["acc"]["value"] == 1.0 and good["acc_norm"]["value"] == 1.0
  wrong = [(c, ch, 1 - g) for c, ch, g in items]
  bad = _mc_accuracy(_favouring(a_id), wrong)
  assert bad["acc"]["value"] == 0.0 and bad["acc_norm"]["value"] == 0.0
  assert bad["acc"]["n"] == 3


def test_acc_norm_divides_by_the_choice_length_in_characters():
  # ll -6 over 6 chars beats -4 over 2 chars only when normalised.
  m = scoring.multiple_choice_metrics([[-6.0, -4.0]], [("abcdef", "ab")],
                                      [0])
  assert m["acc"]["value"] == 0.0 and m["acc_norm"]["value"] == 1.0


def test_acc_norm_leaves_the_target_delimiter_out_of_the_length():
  # lm-eval divides by len(doc_to_choice), without the " " it prepends:
  # -3/3 > -2.1/2 picks "abc"; counting the space (-3/4 < -2.1/3) would
  # pick "ab".
  item = tasks.Item("Q:", (" abc", " ab"), 0)
  assert item.choice_texts() == ("abc", "ab")
  m = scoring.multiple_choice_metrics([[-3.0, -2.1]], [item.choice_texts()],
                                      [0])
  assert m["acc_norm"]["value"] == 1.0


def test_encode_pair_moves_trailing_spaces_into_the_continuation():
  tok = _CharTokenizer()
  r = scoring.encode_pair(tok, "ab ", "c")
  assert r.context == (0, *tok.encode("ab"))
  assert r.continuation == tuple(tok.encode(" c"))


def test_rolling_windows_predict_every_token_once():
  tokens = list(range(1, 12))
  reqs = scoring.rolling_requests(tokens, 4)
  predicted = [t for r in reqs for t in r.continuation]
  assert predicted == tokens[1:]
  assert all(len(r.continuation) <= 4 and len(r.context) == 1 for r in reqs)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny fp4_paper run on local text with a trained tokenizer."""
  return faults.text_run(tmp_path_factory.mktemp("evalrun"), "fp4_paper")


@pytest.fixture(scope="module")
def loaded_f32(run_dir):
  return loader.load(str(run_dir), precision="f32")


def _oracle_ll(loaded, req):
  """float64 log p(continuation | context) from one unpadded forward."""
  tokens = np.asarray(req.context + req.continuation, np.int32)
  logits = np.asarray(loaded.model()(tokens[None, :-1],
                                     key=jax.random.key(0)), np.float64)[0]
  logp = logits - logits.max(-1, keepdims=True)
  logp = logp - np.log(np.exp(logp).sum(-1, keepdims=True))
  n = len(req.continuation)
  tgt = tokens[1:]
  return float(sum(logp[i, tgt[i]] for i in range(len(tgt) - n, len(tgt))))


def _requests(loaded):
  texts = [("the cat sat", " on a mat"), ("birds sang in the", " tall"),
           ("a", " dog ran to the park while birds"), ("the", " the")]
  return [scoring.encode_pair(loaded.tokenizer, c, x) for c, x in texts]


def test_scores_equal_a_float64_reference(loaded_f32):
  model = loaded_f32.model()
  forward = scoring.make_forward(lambda x: model(x, key=jax.random.key(0)))
  reqs = _requests(loaded_f32)
  out = scoring.score(forward, reqs, max_len=32, batch_size=2)
  for r, (ll, _) in zip(reqs, out):
    ref = _oracle_ll(loaded_f32, r)
    assert math.isclose(ll, ref, rel_tol=LL_RTOL), (ll, ref)


def test_padding_and_batch_size_do_not_change_a_score(loaded_f32):
  model = loaded_f32.model()
  forward = scoring.make_forward(lambda x: model(x, key=jax.random.key(0)))
  reqs = _requests(loaded_f32)
  alone = [scoring.score(forward, [r], max_len=32, batch_size=1)[0][0]
           for r in reqs]
  for bs in (3, 8):
    together = [ll for ll, _ in scoring.score(forward, reqs, max_len=32,
                                              batch_size=bs)]
    np.testing.assert_allclose(together, alone, rtol=PAD_RTOL)


def _task_dir():
  return faults.ROOT / "tests" / "testdata" / "eval"


def test_the_cli_scores_tasks_and_perplexity_and_writes_the_results(run_dir,
                                                                     tmp_path):
  text = tmp_path / "t.txt"
  text.write_text("the cat sat on a mat\nthe dog ran to the park\n")
  every = ",".join(tasks.TASKS)
  r = faults.run_main(f"--workdir={run_dir}", f"--tasks={every},ppl",
                      f"--data_dir={_task_dir()}", f"--files={text}",
                      "--limit=2", module="fp4jax.evaluate")
  assert r.returncode == 0, r.stderr[-3000:]
  assert "| piqa | acc |" in r.stdout and "| ppl | bits_per_byte |" in r.stdout
  saved = {r["task"]: r for r in json.loads(
      (run_dir / "eval" / "step_6.json").read_text())["results"]}
  for name, task in tasks.TASKS.items():   # a handful of items of each
    record = saved[name]
    got = record["metrics"]
    metric = "acc"
    assert got[metric]["n"] == 2 and record["limit"] == 2, name
    assert 0.0 <= got[metric]["value"] <= 1.0 and record["seconds"] >= 0
    assert record["precision"] == "train" and record["step"] == 6
    if task.kind == "lambada":
      assert got["perplexity"]["value"] > 1.0
    else:
      assert "acc_norm" in got
  ppl = saved["ppl"]["metrics"]["token_perplexity"]["value"]
  assert 1.0 < ppl < 300 * 2     # a 6-step model: near the vocabulary size


@pytest.mark.parametrize("args,match", [
    (("--tasks=nope",), "nope"),
    (("--tasks=piqa", "--data_dir=/nonexistent"), "piqa"),
    (("--tasks=ppl",), "--tasks=ppl needs --files"),
    (("--tasks=ppl", "--files=/nonexistent.txt"), "no such file"),
    (("--tasks=piqa", "--precision=fp8"), "--precision must be one of"),
    (("--tasks=piqa", "--step=999"), "--step 999"),
    (("--tasks=piqa", "--limit=0"), "--limit must be >= 1"),
])
def test_bad_input_is_one_line_and_writes_nothing(run_dir, args, match):
  before = faults.snapshot(run_dir)
  argv = [f"--workdir={run_dir}", f"--data_dir={_task_dir()}", *args]
  r = faults.run_main(*argv, module="fp4jax.evaluate")
  assert r.returncode == 1, r.stderr[-2000:]
  last = faults.last_line(r.stderr)
  assert last.startswith("error: ") and match in last, r.stderr[-2000:]
  assert "Traceback" not in r.stderr
  assert faults.snapshot(run_dir) == before


def test_a_run_without_a_tokenizer_is_one_line(tmp_path):
  # The smoke run trains on synthetic tokens: no tokenizer to score text.
  # (One bf16 layer for one step: the refusal reads only the run's record
  # and its complete checkpoint, whatever model they hold.)
  workdir = tmp_path / "synthetic"
  assert faults.run_main("--config=configs/demo.py:smoke,recipe=bf16",
                         "--config.model.n_layers=1", "--config.num_steps=1",
                         f"--workdir={workdir}").returncode == 0
  r = faults.run_main(f"--workdir={workdir}", "--tasks=ppl",
                      f"--files={__file__}", module="fp4jax.evaluate")
  assert r.returncode == 1
  assert "the run has no tokenizer" in faults.last_line(r.stderr)
  assert not (workdir / "eval").exists()


def test_a_missing_workdir_is_one_line(tmp_path):
  r = faults.run_main(f"--workdir={tmp_path}/none",
                      "--tasks=ppl", f"--files={__file__}", module="fp4jax.evaluate")
  assert r.returncode == 1
  assert faults.last_line(r.stderr).startswith("error: --workdir: no such")
  assert not (tmp_path / "none").exists()


def test_markdown_lists_every_metric():
  md = evaluate.markdown({"piqa": {"acc": {"value": 0.5, "stderr": 0.1,
                                           "n": 4}}}, 6, "train", "bf16")
  assert "| piqa | acc | 0.5000 | 0.1000 | 4 |  |" in md
