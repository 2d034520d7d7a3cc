r"""Fig. 6b analogue: W4A8 with a straight-through weight gradient vs DGE
at k = 3, 5, 10.

  python -m experiments.run dge_k

The paper: DGE better than STE, k = 5 best. Small anchor model, 150 steps,
3 paired seeds, f32 baseline.
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
SMALL = "size=small"
ARMS = {
    "f32": Arm(f"{SMALL},recipe=f32"),
    "w4a8_ste": Arm(f"{SMALL},recipe=w4a8,overrides={{'dge_k': None}}"),
    "w4a8_k3": Arm(f"{SMALL},recipe=w4a8,overrides={{'dge_k': 3.0}}"),
    "w4a8_k5": Arm(f"{SMALL},recipe=w4a8"),
    "w4a8_k10": Arm(f"{SMALL},recipe=w4a8,overrides={{'dge_k': 10.0}}"),
}
BASELINE = "f32"
SEEDS = 3
STEPS = 150


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
