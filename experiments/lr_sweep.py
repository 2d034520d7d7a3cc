r"""Does FP4 still beat f32 when each recipe runs at its own best LR?

  python -m experiments.run lr_sweep --seeds 1          # the sweep, seed 0
  python -m experiments.run lr_sweep --seeds 3 \
      --arms f32_lr0.001,fp4_paper_lr0.001,fp4_paper_ste_lr0.001  # 3 seeds

The anchor run (configs/anchor.py, 200 steps) for f32, bf16, fp4_paper and
fp4_paper with a straight-through weight gradient (`dge_k=None`), each at
peak LR 3e-4, 1e-3 and 3e-3 (3x each side of the anchor's 1e-3), and 1e-2
because 3e-3 was the best of those for both f32 and fp4_paper, so the sweep
has to show that the loss rises again above it. The fair comparison is each
recipe at its own best LR (table.md's second table).
"""

from experiments import arms as arms_lib

RECIPES = {
    "f32": "recipe=f32",
    "bf16": "recipe=bf16",
    "fp4_paper": "recipe=fp4_paper",
    "fp4_paper_ste": "recipe=fp4_paper,overrides={'dge_k': None}",
}
LRS = (1e-3, 3e-3, 3e-4, 1e-2)   # run order: the anchor's LR first
ARMS = arms_lib.lr_arms(RECIPES, LRS)
BASELINE = "f32_lr0.001"
SEEDS = 3
STEPS = 200


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
