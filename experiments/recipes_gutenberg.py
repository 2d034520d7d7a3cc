r"""How far is each FP4 recipe from bf16 on real prose at demo scale?

  python -m fp4jax.main --config=experiments/recipes_gutenberg.py:recipe=bf16 \
      --workdir=runs/recipes/bf16
  python -m fp4jax.main --config=experiments/recipes_gutenberg.py:recipe=fp4_paper \
      --workdir=runs/recipes/fp4_paper
  (and fp4_code, w4a4_direct, mxfp4, nvfp4, fp8; `:smoke` = 20 steps)

The demo LLaMA on the Gutenberg books, 1000 steps with the paper's optimizer
moments (FP8 m, FP16 v). Expectation from the paper (RECIPE §8): fp4_paper
within a few percent of bf16's final loss, w4a4_direct worse. Compare the
last `val_loss` of each workdir's metrics.jsonl.
"""

from configs import common
from configs import gutenberg


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, recipe="fp4_paper", smoke=False)
  c = gutenberg.get_config(f"recipe={a.recipe}")
  c.num_steps = 20 if a.smoke else 1000
  c.eval_every = 10 if a.smoke else 250
  c.eval_steps = 16
  c.checkpoint_every = 250
  c.optim.moments = "paper"
  return c
