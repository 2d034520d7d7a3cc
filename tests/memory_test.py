"""Activation accounting (fp4jax.memory) against a hand count and XLA."""

import jax
import pytest

from fp4jax import llama
from fp4jax import memory
from fp4jax import optim
from fp4jax import qconfig
from fp4jax import sharding
from fp4jax import train_state


def _cfg(**kw):
  return llama.LlamaConfig(**{**dict(
      vocab_size=10, d_model=8, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=16,
      max_seq_len=4, compute_dtype="bfloat16"), **kw})


def test_the_count_is_the_hand_count():
  # d 8, kv 1 x 4, f 16, H 2, T 4, bf16 (2 bytes), 2 layers, V 10:
  # attention 2 (8 + 8 + 16 + 8) + 2 * 2 * 4 probabilities = 96;
  # MLP 2 (16 + 48) = 128; head input 16 and f32 logits 40.
  assert memory.activation_bytes_per_token(_cfg(), 4, False) == (
      2 * (96 + 128) + 16 + 40)
  # Quantized: one more bf16 copy of each projection input: 2 (48 + 16).
  assert memory.activation_bytes_per_token(_cfg(), 4, True) == (
      2 * (96 + 128 + 128) + 16 + 40)
  # cudnn keeps a f32 log-sum-exp per head instead of the probabilities.
  assert memory.activation_bytes_per_token(_cfg(attention="cudnn"), 4,
                                           False) == (
      2 * (80 + 8 + 128) + 16 + 40)


# remat_test's XLA check asserts the same bound for fp4_paper at the 1.3B
# width in the default run; this one (~70 s) runs with -m slow.
@pytest.mark.slow
@pytest.mark.parametrize("recipe", ["fp4_paper"])
def test_the_count_is_a_lower_bound_of_what_xla_allocates_per_token(recipe):
  # The temp bytes XLA's compiled step allocates grow with the batch by at
  # least what autodiff must keep (CPU fuses less and keeps more).
  cfg = llama.LlamaConfig(vocab_size=256, d_model=64, n_layers=2, n_heads=4,
                          n_kv_heads=2, d_ff=128, max_seq_len=32)
  rules = qconfig.default_rules(qconfig.get_recipe(recipe))
  temp = {}
  for batch in (2, 4):
    t = train_state.make_trainer(
        cfg, rules, optim.OptimConfig(), num_steps=4,
        mesh=sharding.make_mesh(1, 1, 1, devices=jax.devices()[:1]),
        global_batch=batch, seq_len=32, seed=0)
    temp[batch] = memory.compiled_bytes(t.train_step)["temp"]
  per_token = (temp[4] - temp[2]) / (2 * 32)
  count = memory.activation_bytes_per_token(cfg, 32, recipe != "bf16")
  assert count <= per_token, (count, per_token)
