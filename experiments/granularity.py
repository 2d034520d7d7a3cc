r"""Fig. 6d analogue: tensor-wise vs vector-wise scaling of W and A.

  python -m experiments.run granularity

Direct W4A4 (no DGE, no OCC, to isolate scaling): per-token activations and
per-output-channel weights (the paper's choice), either one tensor-wise, or
both. The paper: vector-wise scaling needed, most of all for activations.
Small anchor model, 150 steps, 3 paired seeds, f32 baseline.
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
SMALL = "size=small"
ARMS = {
    "f32": Arm(f"{SMALL},recipe=f32"),
    "w_chan_a_token": Arm(f"{SMALL},recipe=w4a4_direct"),
    "w_tensor_a_token": Arm(f"{SMALL},recipe=w4a4_direct",
                            sets=(("quant.overrides", {"w__axis": None}),)),
    "w_chan_a_tensor": Arm(f"{SMALL},recipe=w4a4_direct",
                           sets=(("quant.overrides", {"x__axis": None}),)),
    "w_tensor_a_tensor": Arm(f"{SMALL},recipe=w4a4_direct", sets=(
        ("quant.overrides", {"w__axis": None, "x__axis": None}),)),
}
BASELINE = "f32"
SEEDS = 3
STEPS = 150


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
