r"""The paper's runs (RECIPE.md §7): LLaMA-2 1.3B / 7B / 13B, FP4 vs BF16.

  python -m fp4jax.plan --config=configs/paper.py:size=1.3b,nodes=4
  python -m fp4jax.main \
      --config=configs/paper.py:size=1.3b,recipe=fp4_paper,nodes=4,corpus='/data/dclm/*.jsonl.zst',tokenizer=/models/llama2/tokenizer.model \
      --workdir=runs/paper-1.3b-fp4

Args (`file.py:k=v,...`):
  size: 1.3b | 7b | 13b (fp4jax.sizes; 1.3b is RECIPE §7's guess).
  recipe: fp4_paper (the FP4 arm) | bf16 (its baseline twin).
  nodes, gpus_per_node: the cluster; the mesh is data x fsdp over all of
    them (fsdp = the GPUs of a node for 7b / 13b, whose states do not fit
    one GPU; 1 for 1.3b).
  tokens: training tokens (paper: 100e9; the ablations: 10e9 at batch=256).
  batch: sequences per step (paper: 2048, ~4M tokens; ablations: 256).
  corpus: the training shards, streamed (data.source="files"): a glob of
    .jsonl.zst / .jsonl.gz / .jsonl / .parquet / .arrow / .txt /
    .array_record shards, local or any fsspec URL (gs://, s3:// with their
    plugin), or a directory made by `python -m fp4jax.data.prepare`
    (docs/cluster.md, "Data"); empty = set data.train_files yourself.
  val: the val shards (a glob, e.g. one DCLM shard left out of `corpus`);
    empty = hold out data.val_fraction (1%) of the corpus's documents.
  tokenizer: the LLaMA-2 SentencePiece model (32000 pieces).
  device_memory_gb: GPU memory to plan for (80: H100 / A100-80GB).

The paper's settings: sequence 2048, AdamW lr 3e-4 (b1 0.9, b2 0.95, eps
1e-8, weight decay 0.1, clip 1.0), 5% warmup, cosine to 10%, steps =
tokens / (batch x 2048). The FP4 arm adds what the paper's recipe
specifies beyond the GEMMs: FP8 weight gradients, FP8 gradient
communication and the FP8 / FP16 Adam moments (RECIPE §6). The BF16 twin
differs exactly there: f32 moments and gradients, f32 communication, and
no quantized GEMM. Both keep f32 master weights (RECIPE §6: fp4jax's
default). optim.grad_accum and model.remat are the smallest that fit
device_memory_gb by `fp4jax.plan`'s analytic model: the same batch, and
so the same optimisation, on any cluster size the batch divides.
"""

from configs import common
from configs import default

SEQ_LEN = 2048
VOCAB = 32000          # the LLaMA-2 tokenizer
SIZES = ("1.3b", "7b", "13b")
RECIPES = ("fp4_paper", "bf16")


def get_config(arg: str | None = None):
  a = common.parse_arg(arg, size="1.3b", recipe="fp4_paper", nodes=4,
                       gpus_per_node=8, tokens=100e9, batch=2048, corpus="",
                       val="", tokenizer="", device_memory_gb=80.0)
  if a.size not in SIZES:
    raise ValueError(f"paper.py: size must be one of {SIZES}, got "
                     f"{a.size!r}")
  if a.recipe not in RECIPES:
    raise ValueError(f"paper.py: recipe must be one of {RECIPES}, got "
                     f"{a.recipe!r}")
  for key in ("nodes", "gpus_per_node", "batch"):
    if not isinstance(a[key], int) or a[key] < 1:
      raise ValueError(f"paper.py: {key} must be a positive int, got "
                       f"{a[key]!r}")
  c = default.get_config()
  c.model.size = a.size
  c.model.vocab_size = VOCAB
  c.model.max_seq_len = SEQ_LEN
  c.quant.recipe = a.recipe
  c.data.seq_len = SEQ_LEN
  c.data.global_batch = a.batch
  c.data.vocab_size = VOCAB
  c.data.source = "files"
  c.data.train_files = (a.corpus,) if a.corpus else ()
  c.data.val_files = (a.val,) if a.val else ()
  c.data.tokenizer_model = a.tokenizer
  c.num_steps = max(1, round(a.tokens / (a.batch * SEQ_LEN)))
  c.log_every = 10
  c.eval_every = 1000
  c.checkpoint_every = 500
  c.checkpoint_every_minutes = 30.0   # bounded loss on a preemption
  o = c.optim
  o.lr, o.warmup_frac, o.min_lr_frac = 3e-4, 0.05, 0.1
  o.b1, o.b2, o.eps, o.weight_decay, o.clip_norm = 0.9, 0.95, 1e-8, 0.1, 1.0
  fp4 = a.recipe == "fp4_paper"
  o.moments = "paper" if fp4 else "fp32"
  o.grad_fp8 = fp4
  c.comm.grad_dtype = "float8_e4m3fn" if fp4 else "float32"
  devices = a.nodes * a.gpus_per_node
  fsdp = 1 if a.size == "1.3b" else min(a.gpus_per_node, devices)
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = devices // fsdp, fsdp, 1
  c.mesh.device_memory_gb = float(a.device_memory_gb)
  # The smallest microbatch count / remat policy that fits, planned for
  # GPUs (imported here, so reading this file's constants needs no jax).
  from fp4jax import plan  # pylint: disable=g-import-not-at-top
  plan.fit_in_place(c, platform="gpu")
  return c
