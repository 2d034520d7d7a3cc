"""Hugging Face export and import against transformers' own LlamaForCausalLM.

Needs the `hf` extra (transformers, torch); the `hf` marker keeps these out
of the default run, and CI runs them as their own step (README).
"""

import json

import jax
import numpy as np
import pytest
from flax import nnx

from fp4jax import hf
from fp4jax import llama
from fp4jax import sharding
from fp4jax import train
from fp4jax import train_state
from fp4jax.evaluation import loader
import faults

transformers = pytest.importorskip("transformers")
torch = pytest.importorskip("torch")

pytestmark = pytest.mark.hf

# Both run the same f32 function; the matmuls and softmax sums are ordered
# differently (torch vs XLA): ~1e-6 relative, far below any wrong layout
# (a transposed or misnamed weight moves logits by O(1)).
LOGIT_RTOL = 1e-4
LOGIT_ATOL = 1e-4


def _hf_logits(model, tokens):
  with torch.no_grad():
    out = model(torch.tensor(np.asarray(tokens), dtype=torch.long))
  return out.logits.numpy().astype(np.float64)


def _ours_logits(cfg, params, tokens):
  model = nnx.merge(_graphdef(cfg), params)
  return np.asarray(model(np.asarray(tokens, np.int32)), np.float64)


def _graphdef(cfg):
  abstract = nnx.eval_shape(lambda: llama.Llama(
      cfg, rngs=nnx.Rngs(params=jax.random.key(0))))
  return nnx.split(abstract, nnx.Param)[0]


def _tokens(vocab, shape=(2, 24), seed=0):
  return np.random.default_rng(seed).integers(0, vocab, shape)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  """A tiny bf16-recipe run (f32 compute) with a trained tokenizer."""
  return faults.text_run(tmp_path_factory.mktemp("hfrun"), "bf16")


def test_an_export_loads_in_transformers_with_the_same_logits(run_dir,
                                                             tmp_path):
  out = tmp_path / "exported"
  r = faults.run_main(f"--workdir={run_dir}", f"--out={out}",
                      module="fp4jax.export")
  assert r.returncode == 0, r.stderr[-3000:]
  config = json.loads((out / "config.json").read_text())
  assert config["num_key_value_heads"] == 2 and config["num_attention_heads"] == 4
  model = transformers.LlamaForCausalLM.from_pretrained(
      str(out), torch_dtype=torch.float32)
  model.eval()
  loaded = loader.load(str(run_dir), precision="f32")
  tokens = _tokens(loaded.model_cfg.vocab_size)
  ours = np.asarray(loaded.model()(np.asarray(tokens, np.int32)), np.float64)
  np.testing.assert_allclose(_hf_logits(model, tokens), ours,
                             rtol=LOGIT_RTOL, atol=LOGIT_ATOL)
  # The tokenizer travels too, and gives our ids on a line of text.
  tok = transformers.AutoTokenizer.from_pretrained(str(out))
  line = "the cat sat on a mat"
  assert tok(line, add_special_tokens=False)["input_ids"] == [
      int(t) for t in loaded.tokenizer.encode(line)]


def test_export_refuses_a_non_empty_out_and_keeps_it(run_dir, tmp_path):
  out = tmp_path / "mine"
  out.mkdir()
  (out / "notes.txt").write_text("keep")
  r = faults.run_main(f"--workdir={run_dir}", f"--out={out}",
                      module="fp4jax.export")
  assert r.returncode == 1
  assert "is not an empty folder" in faults.last_line(r.stderr)
  assert [p.name for p in out.iterdir()] == ["notes.txt"]


def _random_hf(tmp_path, **kw):
  cfg = transformers.LlamaConfig(
      vocab_size=256, hidden_size=64, intermediate_size=128,
      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
      max_position_embeddings=64, rms_norm_eps=1e-5, rope_theta=10000.0,
      tie_word_embeddings=False, **kw)
  torch.manual_seed(0)
  model = transformers.LlamaForCausalLM(cfg).eval()
  with torch.no_grad():   # norms away from 1, so a dropped scale shows
    for name, p in model.named_parameters():
      if "norm" in name:
        p.uniform_(0.5, 1.5)
  folder = tmp_path / "hf"
  model.save_pretrained(str(folder), safe_serialization=True)
  return model, folder


def test_an_hf_checkpoint_imports_with_the_same_logits(tmp_path):
  model, folder = _random_hf(tmp_path)
  hf_cfg, tensors = hf.read_folder(str(folder))
  cfg = hf.llama_config(hf_cfg, compute_dtype="float32")
  params = nnx.state(llama.Llama(cfg, rngs=nnx.Rngs(0)), nnx.Param)
  nnx.replace_by_pure_dict(params, hf.from_hf_tensors(tensors, cfg))
  tokens = _tokens(256)
  np.testing.assert_allclose(_ours_logits(cfg, params, tokens),
                             _hf_logits(model, tokens), rtol=LOGIT_RTOL,
                             atol=LOGIT_ATOL)


def test_a_run_starts_from_imported_weights(tmp_path):
  _, folder = _random_hf(tmp_path)
  hf_cfg, tensors = hf.read_folder(str(folder))
  cfg = hf.llama_config(hf_cfg, compute_dtype="float32")
  _, abstract = train_state.abstract_state(
      cfg, None, train.optim.OptimConfig(), num_steps=4,
      mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]))
  state = abstract.replace(params=jax.tree.map(lambda a: jax.device_put(
      np.zeros(a.shape, a.dtype), a.sharding), abstract.params))
  state = train._with_params(  # pylint: disable=protected-access
      state, hf.from_hf_tensors(tensors, cfg))
  got = nnx.to_pure_dict(state.params)
  np.testing.assert_array_equal(
      np.asarray(got["layers"][1]["mlp"]["down_proj"]["kernel"]),
      tensors["model.layers.1.mlp.down_proj.weight"].T)
  # Through the CLI: a fresh run from those weights trains, and says so.
  r = faults.run_main("--config=configs/demo.py:smoke,recipe=bf16",
                      f"--workdir={tmp_path}/run",
                      f"--config.init_from_hf={folder}")
  assert r.returncode == 0, r.stderr[-3000:]
  assert f"with the weights of {folder}" in r.stderr


def test_an_hf_checkpoint_of_another_shape_is_one_line(tmp_path):
  _, folder = _random_hf(tmp_path)
  r = faults.run_main("--config=configs/demo.py:smoke,recipe=bf16",
                      f"--workdir={tmp_path}/run",
                      f"--config.init_from_hf={folder}",
                      "--config.model.d_ff=96")
  assert r.returncode == 1
  assert faults.last_line(r.stderr).startswith(
      "error: init_from_hf: the checkpoint has d_ff=128")
  assert not (tmp_path / "run").exists()
