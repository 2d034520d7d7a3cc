r"""Does the gap grow with tokens? f32 vs fp4_paper for 2000 steps.

  python -m experiments.run long_pair      # resumable across sessions

The anchor run at lr 3e-3 (the best LR of both f32 and fp4_paper in
lr_sweep), seed 0, 2000 steps (8.2M tokens); validation every 100 steps (the
loss curves show the gap over time).
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
SMALL = "size=small"
ARMS = {
    "f32": Arm("recipe=f32,lr=3e-3", sets=(("eval_every", 100),
                                   ("checkpoint_every", 100))),
    "fp4_paper": Arm("recipe=fp4_paper,lr=3e-3", sets=(("eval_every", 100),
                                               ("checkpoint_every", 100))),
}
BASELINE = "f32"
SEEDS = 1
STEPS = 2000


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
