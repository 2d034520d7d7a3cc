r"""Fig. 5 analogue: does FP4 train as well as BF16 and FP8?

  python -m experiments.run fp4_vs_bf16

The small anchor model (configs/anchor.py:size=small), 150 steps, 3 paired
seeds: f32 (baseline), bf16, fp8, fp4_paper, fp4_code.
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
SMALL = "size=small"
ARMS = {
    "f32": Arm(f"{SMALL},recipe=f32"),
    "bf16": Arm(f"{SMALL},recipe=bf16"),
    "fp8": Arm(f"{SMALL},recipe=fp8"),
    "fp4_paper": Arm(f"{SMALL},recipe=fp4_paper"),
    "fp4_code": Arm(f"{SMALL},recipe=fp4_code"),
}
BASELINE = "f32"
SEEDS = 3
STEPS = 150


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
