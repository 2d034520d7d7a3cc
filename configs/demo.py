r"""CPU demo: the demo LLaMA (2.9M params at vocab 1024) in fp4_paper.

  python -m fp4jax.main --config=configs/demo.py --workdir=runs/demo
  python -m fp4jax.main --config=configs/demo.py:recipe=bf16 \
      --workdir=runs/demo_bf16        # the same run in bf16, to compare
  python -m fp4jax.main --config=configs/demo.py:smoke --workdir=/tmp/smoke

Trains in a few minutes on 2 CPU cores on the offline default corpus: the
Python standard library's own source files (`data.source="stdlib"`, a smoke
corpus that exists on every machine; deterministic for a Python version),
tokenized by a SentencePiece BPE model trained into the workdir.
`:smoke` runs 6 steps of the tiny model on synthetic tokens (tests,
entry-point checks).
"""

from configs import common
from configs import default


def get_config(arg: str | None = None):
  """Demo config; arg: "recipe=NAME" and/or "smoke"."""
  a = common.parse_arg(arg, recipe="fp4_paper", smoke=False)
  c = default.get_config()
  c.model.size = "demo"
  c.quant.recipe = a.recipe
  c.num_steps = 300
  c.log_every = 10
  c.eval_every = 50
  c.eval_steps = 4
  c.checkpoint_every = 50
  c.optim.lr = 3e-3            # small models take a larger step
  c.data.source = "stdlib"
  c.data.vocab_size = 1024
  c.data.seq_len = 128
  c.data.global_batch = 8
  if a.smoke:
    c.model.size = "tiny"
    c.num_steps, c.log_every, c.eval_every, c.checkpoint_every = 6, 2, 3, 3
    c.eval_steps = 1
    c.data.source = "synthetic"
    c.data.vocab_size, c.data.seq_len, c.data.global_batch = 256, 32, 8
  return c
