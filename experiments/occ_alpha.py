r"""Fig. 6c analogue: W8A4 without OCC and with alpha 0.999, 0.99, 0.97
(sparse compensation).

  python -m experiments.run occ_alpha

The paper: OCC needed; a lower alpha (more clamping, more compensation) is
better. At K = 128 / 352, alpha 0.999 clamps nothing: int(0.999 K) = K - 1.
Small anchor model, 150 steps, 3 paired seeds, f32 baseline.
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
SMALL = "size=small"
ARMS = {
    "f32": Arm(f"{SMALL},recipe=f32"),
    "w8a4_no_occ": Arm(f"{SMALL},recipe=w8a4,overrides={{'occ_alpha': None}}"),
    "w8a4_a0.999": Arm(f"{SMALL},recipe=w8a4,overrides={{'occ_alpha': 0.999}}"),
    "w8a4_a0.99": Arm(f"{SMALL},recipe=w8a4"),
    "w8a4_a0.97": Arm(f"{SMALL},recipe=w8a4,overrides={{'occ_alpha': 0.97}}"),
}
BASELINE = "f32"
SEEDS = 3
STEPS = 150


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
