r"""The anchor run: the question "does this FP4 recipe train as well as f32?".

  python -m fp4jax.main --config=configs/anchor.py:recipe=f32 \
      --workdir=runs/anchor/f32
  python -m fp4jax.main --config=configs/anchor.py:recipe=fp4_paper \
      --workdir=runs/anchor/fp4_paper
  python -m fp4jax.main \
      --config=configs/anchor.py:recipe=fp4_paper,paper_optim=True \
      --workdir=runs/anchor/fp4_paper_full     # the whole paper pipeline

A LLaMA of d_model 256, 4 layers, 4 heads (4 kv heads), SwiGLU 688, RMSNorm,
RoPE and an untied head (7.4M parameters at vocab 8192) on the Gutenberg
books next to the repository: an 8192-piece BPE tokenizer trained on a 5M
character sample of the training split, rows of 256 tokens, 16 rows a
step, 200 steps; AdamW lr 1e-3 (b1 0.9, b2 0.95, wd 0.1, clip 1.0), 30
warmup steps then cosine to 10%; f32 master weights; validation on the same
20 batches of the held-out books at every evaluation.

Args (`:k=v,k=v`):
  recipe: "f32" (no quantization, f32 compute: the baseline of every
    comparison), "bf16" (no quantization, bf16 compute), or any
    `fp4jax.qconfig.RECIPES` name (f32 compute unless `compute=` says
    otherwise, so the arm differs from f32 by the quantization alone).
  seed: init, data order and step keys.
  lr: peak learning rate.
  steps: optimizer steps (the schedule spans them; warmup stays 30 steps).
  compute: "float32" | "bfloat16" (default: bfloat16 for recipe=bf16, else
    float32).
  paper_optim: the rest of the paper's pipeline (RECIPE §6): FP8 E4M3
    weight gradients on the quantized projections and FP8 / FP16 Adam
    moments.
  overrides: a dict of one recipe override, e.g. "{'dge_k': None}" (more
    keys: set `quant.overrides` on the config; the arg string splits at ",").
  size: "anchor" (above) or "small": d_model 128, 2 layers, SwiGLU 352
    (a multiple of 32, so MXFP4 / NVFP4 blocks tile it), rows of 128
    tokens (2.3M parameters, ~5x cheaper a step on a CPU) for the sweeps
    that reproduce the paper's ablation figures.
"""

import os

from configs import common
from configs import default

# <repo>/configs/anchor.py -> <repo>/../shared/data/corpus
_CORPUS = os.path.normpath(os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
    "shared", "data", "corpus"))
WARMUP_STEPS = 30


def get_config(arg: str | None = None):
  """Anchor config; see the module docstring for the args."""
  a = common.parse_arg(arg, recipe="f32", seed=0, lr=1e-3, steps=200,
                       compute="", paper_optim=False, overrides={},
                       size="anchor")
  if a.size not in ("anchor", "small"):
    raise ValueError(f"anchor size must be 'anchor' or 'small', got "
                     f"{a.size!r}")
  c = default.get_config()
  c.seed = a.seed
  c.num_steps = a.steps
  c.log_every = 10
  c.eval_every = 100
  c.eval_steps = 20
  c.checkpoint_every = 100
  c.keep_checkpoints = 1

  c.model.size = "demo"
  c.model.d_model, c.model.n_layers, c.model.d_ff = 256, 4, 688
  c.model.n_heads, c.model.n_kv_heads = 4, 4
  c.model.max_seq_len = 256
  c.model.tie_embeddings = False
  plain = a.recipe in ("f32", "bf16")
  c.model.compute_dtype = a.compute or (
      "bfloat16" if a.recipe == "bf16" else "float32")
  c.quant.recipe = "bf16" if plain else a.recipe
  c.quant.overrides = dict(a.overrides)

  c.optim.lr = a.lr
  c.optim.b1, c.optim.b2, c.optim.weight_decay = 0.9, 0.95, 0.1
  c.optim.clip_norm = 1.0
  c.optim.warmup_frac = min(WARMUP_STEPS / a.steps, 0.5)
  c.optim.min_lr_frac = 0.1
  c.optim.master = "fp32"
  if a.paper_optim:
    c.optim.moments = "paper"
    c.optim.grad_fp8 = True

  c.data.source = "text_files"
  c.data.train_files = (os.path.join(_CORPUS, "gutenberg_en_train.txt"),)
  c.data.val_files = (os.path.join(_CORPUS, "gutenberg_en_val.txt"),)
  c.data.vocab_size = 8192
  c.data.tokenizer_train_chars = 5_000_000
  c.data.seq_len = 256
  c.data.global_batch = 16
  c.data.segment_ids = True
  if a.size == "small":
    c.model.d_model, c.model.n_layers, c.model.d_ff = 128, 2, 352
    c.data.seq_len = 128
  return c
