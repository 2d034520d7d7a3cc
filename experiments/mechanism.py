r"""Why does DGE make FP4 beat f32? Arms that isolate each candidate cause.

  python -m experiments.run mechanism

On the anchor run at lr 1e-3 (paired with f32 by seed):
- `fp4_paper` vs `fp4_paper_ste`: the effect of DGE inside the FP4 recipe.
- `dge_only`: exact f32 GEMMs, but the weight gradient carries DGE's factor
  f'(W sw) on the E2M1 grid W would be quantized to. If this beats f32 as
  fp4_paper does, the gain is an optimisation effect of DGE, not of FP4.
- `f32_proj_lr0.69`: f32 with the block projections' LR scaled by 0.69, the
  mean shrink DGE's factor gives Adam's step if it were uncorrelated in time
  (E[f'] / sqrt(E[f'^2]) over a weight uniform in its interval, k=5, cap 3).
  If this matches dge_only, DGE acts as a per-group LR cut.
- `f32_lr3e-3_proj_lr0.69`: the same per-group cut at lr 3e-3, where
  fp4_paper's lead over f32 grows (lr_sweep).
- `f32_noclip` vs `dge_only_noclip`: the same pair without gradient-norm
  clipping. DGE's factor (mean ~0.59) shrinks the projections' share of the
  global norm, so under clipping it also changes how hard the embedding and
  head gradients are clipped in the first ~35 steps (norm > 1). If the gap
  survives without clipping, clipping is not the cause.
- `fp4_paper_full`: the whole paper pipeline (FP8 weight gradients on the
  projections, FP8/FP16 Adam moments).
"""

from experiments import arms as arms_lib

Arm = arms_lib.Arm
ARMS = {
    "f32": Arm("recipe=f32"),
    "fp4_paper": Arm("recipe=fp4_paper"),
    "fp4_paper_ste": Arm("recipe=fp4_paper,overrides={'dge_k': None}"),
    "dge_only": Arm("recipe=dge_only"),
    "f32_proj_lr0.69": Arm("recipe=f32", sets=(("optim.proj_lr_scale", 0.69),)),
    "f32_lr3e-3_proj_lr0.69": Arm("recipe=f32,lr=0.003",
                                  sets=(("optim.proj_lr_scale", 0.69),)),
    "f32_noclip": Arm("recipe=f32", sets=(("optim.clip_norm", 1e9),)),
    "dge_only_noclip": Arm("recipe=dge_only",
                           sets=(("optim.clip_norm", 1e9),)),
    "fp4_paper_full": Arm("recipe=fp4_paper,paper_optim=True"),
}
BASELINE = "f32"
SEEDS = 3
STEPS = 200


def get_config(arg=None):
  return arms_lib.config_for(ARMS, arg, STEPS)
