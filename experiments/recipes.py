r"""The paper's recipe vs the block-scaled formats on one model.

  python -m experiments.run recipes

f32 (baseline), fp4_paper, mxfp4 (block 32, E8M0 scales, forward only) and
nvfp4 (block 16, E4M3 + tensor scale, gradients too, stochastic).
Small anchor model, 150 steps, 3 paired seeds.
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
SMALL = "size=small"
ARMS = {
    "f32": Arm(f"{SMALL},recipe=f32"),
    "fp4_paper": Arm(f"{SMALL},recipe=fp4_paper"),
    "mxfp4": Arm(f"{SMALL},recipe=mxfp4"),
    "nvfp4": Arm(f"{SMALL},recipe=nvfp4"),
}
BASELINE = "f32"
SEEDS = 3
STEPS = 150


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
