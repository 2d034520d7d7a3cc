r"""The FP4 training recipes of four papers side by side on the anchor run.

  python -m experiments.run recipes_all --seeds 1     # seed 0, every arm
  python -m experiments.run recipes_all --seeds 2 \
      --arms f32_lr0.003,fp4_paper_lr0.003,...         # seed 1 at the best LRs
  python -m experiments.run recipes_all --seeds 2 \
      --arms nvfp4_nvidia_lr0.003_sb0.1                # late switch to BF16

f32 (baseline), fp4_paper (Wang et al.), nvfp4_nvidia (NVIDIA 2509.25149),
mxfp4_tseng (Tseng et al. 2502.20586) and quartet (Castro et al.
2505.14669) on the anchor model, 200 steps, each at lr 1e-3 and 3e-3 (the
best LR of f32 and fp4_paper in lr_sweep: 3e-3), so each recipe is compared
at its own best LR. SwiGLU width 704 instead of the anchor's 688 in every
arm: MXFP4's 32-element blocks and the 32-point Hadamard transforms must
tile every contraction (688 = 16 x 43 does not split into 32s), and the
baseline must be the same model.
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
RECIPES = ("f32", "fp4_paper", "nvfp4_nvidia", "mxfp4_tseng", "quartet")
LRS = (3e-3, 1e-3)
D_FF = 704
ARMS = {f"{r}_lr{lr:g}": Arm(f"recipe={r},lr={lr}",
                             sets=(("model.d_ff", D_FF),), group=r)
        for lr in LRS for r in RECIPES}
# NVIDIA's Appendix D: the forward GEMMs in BF16 for the last 10% of steps.
ARMS["nvfp4_nvidia_lr0.003_sb0.1"] = Arm(
    "recipe=nvfp4_nvidia,lr=0.003",
    sets=(("model.d_ff", D_FF), ("quant.switch_back", 0.1)),
    group="nvfp4_nvidia")
BASELINE = "f32_lr0.003"
SEEDS = 2
STEPS = 200


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
