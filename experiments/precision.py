r"""Fig. 6a analogue: BF16, FP8, direct W4A4 and W4A4 + DGE + OCC.

  python -m experiments.run precision

The paper: direct W4A4 clearly worse; DGE + OCC close most of the gap.
Small anchor model, 150 steps, 3 paired seeds, f32 baseline.
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
SMALL = "size=small"
ARMS = {
    "f32": Arm(f"{SMALL},recipe=f32"),
    "bf16": Arm(f"{SMALL},recipe=bf16"),
    "fp8": Arm(f"{SMALL},recipe=fp8"),
    "w4a4_direct": Arm(f"{SMALL},recipe=w4a4_direct"),
    "w4a4_dge_occ": Arm(f"{SMALL},recipe=fp4_paper"),
}
BASELINE = "f32"
SEEDS = 3
STEPS = 150


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
