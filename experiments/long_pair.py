r"""Does the gap grow with tokens? f32 vs fp4_paper for 5x the anchor's steps.

  python -m experiments.run long_pair              # 1000 steps, resumable
  python -m experiments.run long_pair --steps 2000 # the same pair, longer

The anchor run at lr 3e-3 (the best LR of both f32 and fp4_paper in
lr_sweep), seed 0, 1000 steps (4.1M tokens; both arms take ~1.5 h together on two
CPU cores, 2000 steps twice that); validation every 100 steps (the loss
curves show the gap over time).
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
STEPS = 1000


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
