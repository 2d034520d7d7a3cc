r"""Every configuration key, with its default; experiments are small deltas.

  python -m fp4jax.main --config=configs/default.py --workdir=runs/125m

`model.*` (less `size`) maps onto `fp4jax.llama.LlamaConfig` fields (0 =
take the value from the size table) and `optim.*` onto
`fp4jax.optim.OptimConfig`. Library code never reads a key missing here.
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
  """The default run: the 125m model in bf16 on synthetic tokens."""
  c = ml_collections.ConfigDict()
  c.seed = 0                  # base PRNG seed: init, step and data keys
  c.prng_impl = "auto"  # rbg on GPU (init compiles in s, not min), else threefry2x32
  c.num_steps = 20_000        # optimizer steps; also the LR schedule length
  c.log_every = 50            # steps between log lines / metrics records
  c.eval_every = 1_000        # steps between validation passes (0 = at end)
  c.eval_steps = 20           # batches per validation pass (0 = none)
  c.checkpoint_every = 1_000  # steps between checkpoints (+ end, SIGTERM)
  c.checkpoint_every_minutes = 0.0  # also save this often (0 = off)
  c.profile_steps = ""        # "START,END": trace steps START+1..END
  c.keep_checkpoints = 3      # most recent checkpoints kept on disk
  c.telemetry_every = 0       # steps between per-layer quant stats; 0 = off
  c.skip_nonfinite = False    # NaN/inf loss or grad: skip+count, else stop
  c.max_skipped_fraction = 0.1  # skipped share above this: run ends exit 4
  c.init_from_hf = ""         # HF LLaMA folder a fresh run starts from

  c.model = ml_collections.ConfigDict()
  c.model.size = "125m"       # key of fp4jax.sizes.SIZES (tiny ... 13b)
  c.model.vocab_size = 0      # V; 0 = the data pipeline's vocabulary
  c.model.d_model = 0         # D; 0 = from size
  c.model.n_layers = 0        # decoder blocks; 0 = from size
  c.model.n_heads = 0         # query heads, divide d_model; 0 = from size
  c.model.n_kv_heads = 0      # kv heads, divide n_heads; 0 = from size
  c.model.d_ff = 0            # SwiGLU hidden width; 0 = from size
  c.model.max_seq_len = 0     # longest accepted sequence; 0 = from size
  c.model.rope_theta = 0.0    # RoPE base; 0 = from size (10000)
  c.model.norm_eps = 0.0      # RMSNorm epsilon; 0 = from size (1e-5)
  c.model.tie_embeddings = False     # embedding doubles as LM head
  c.model.compute_dtype = "bfloat16"  # activations and matmul operands
  c.model.param_dtype = "float32"     # dtype parameters are created in
  c.model.attention = "auto"  # cudnn on GPU w/o segment_ids, else xla | xla | cudnn
  c.model.remat = "none"      # saved for the backward: none|full|dots|dots_no_batch|quantized
  c.model.scan_layers = False  # decoder stack as one lax.scan (compile time)

  c.quant = ml_collections.ConfigDict()
  c.quant.recipe = "bf16"     # fp4jax.qconfig.RECIPES name (fp4_paper, ...)
  c.quant.overrides = {}      # get_recipe overrides, "{'occ_alpha': 0.97}"
  c.quant.rules = ()          # ((regex, recipe|"none"), ...); () = RECIPE §5
  c.quant.switch_back = 0.0   # last share of the steps run in BF16 (0 = off)
  c.quant.switch_back_mode = "forward"  # forward (fwd GEMMs BF16) | all
  c.quant.bf16_tail = placeholder(float)  # last share of blocks kept BF16; unset = the recipe's own

  # How the quantized GEMMs run (fp4jax.qconfig.Execution): the same numbers
  # (up to f32 summation order, or as accumulation says), other programs.
  c.gemm = ml_collections.ConfigDict()
  c.gemm.impl = "auto"        # auto (reference on CPU, fast on GPU)|reference|fast|fp8|xla|pallas
  c.gemm.accumulation = "fp32"  # FP8 GEMMs on GPU: fp32 (exact) | fast
  c.gemm.sparse_impl = "auto"   # OCC compensation: auto | gemm | ell

  c.optim = ml_collections.ConfigDict()
  c.optim.lr = 3e-4           # peak learning rate (paper: 3e-4)
  c.optim.warmup_frac = 0.05  # share of num_steps in linear warmup
  c.optim.min_lr_frac = 0.1   # cosine decays to this fraction of lr
  c.optim.b1 = 0.9            # Adam beta1
  c.optim.b2 = 0.95           # Adam beta2
  c.optim.eps = 1e-8          # Adam epsilon
  c.optim.weight_decay = 0.1  # decoupled weight decay
  c.optim.clip_norm = 1.0     # global gradient-norm clip
  c.optim.moments = "fp32"    # Adam m, v storage: fp32 | paper | bf16
  c.optim.master = "fp32"     # master weights: fp32 | bf16 | fp16
  c.optim.grad_fp8 = False    # quantized projections' grads to FP8 E4M3
  c.optim.proj_lr_scale = 1.0  # LR factor of the block projection kernels
  c.optim.grad_accum = 1      # microbatches per step (gradient accumulation)

  c.distributed = ml_collections.ConfigDict()   # see fp4jax/distributed.py
  c.distributed.coordinator_address = ""  # process 0's host:port; "" = auto
  c.distributed.num_processes = 0     # processes in the run; 0 = auto / 1
  c.distributed.process_id = -1       # this process's index; -1 = auto
  c.distributed.local_device_ids = ""  # e.g. "0,1"; "" = all visible
  c.distributed.timeout_s = 120       # wait for the coordinator at most

  c.comm = ml_collections.ConfigDict()   # see fp4jax/comm.py
  c.comm.grad_dtype = "float32"  # what the gradient all-reduce moves (fp8 ok)

  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = -1            # data-parallel size; -1 = devices left over
  c.mesh.fsdp = 1             # parameter-sharding (ZeRO-3) size
  c.mesh.tensor = 1           # tensor-parallel size
  c.mesh.device_memory_gb = 0.0  # plan must fit this per device (0 = unchecked)

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"  # key of fp4jax.data.SOURCES
  c.data.train_files = ()     # text sources: training files or globs
  c.data.val_files = ()       # text sources: val files; () = val_fraction
  c.data.val_fraction = 0.01  # share of training text held out for val
  c.data.tfds_name = ""       # tfds source: dataset name
  c.data.tfds_data_dir = ""   # tfds source: data dir; "" = tfds default
  c.data.vocab_size = 32000   # synthetic ids / tokenizer vocab to train
  c.data.tokenizer_model = ""  # sentencepiece model; "" = train in workdir
  c.data.seq_len = 1024       # T, tokens per row
  c.data.global_batch = 256   # rows per step, all processes together
  c.data.segment_ids = False  # pack documents, no attention across them
  c.data.on_decode_error = "replace"  # non-UTF-8 bytes: replace|ignore|strict
  c.data.shuffle_seed = -1    # data order / stream seed; -1 = seed
  c.data.doc_separator = "<|endoftext|>"  # .txt: line ending a document
  c.data.text_key = "text"    # .jsonl field / tfds feature with the text
  c.data.tokenizer_train_chars = 10_000_000  # BPE training sample bound
  c.data.stdlib_max_file_bytes = 262_144  # stdlib source: skip larger files
  # files source (sharded corpora, streamed; fp4jax/data/files.py):
  c.data.mixture = ()         # ("NAME:WEIGHT:GLOBS", ...) instead of train_files
  c.data.workers = -1         # tokenizer processes; -1 = cores - 1 (<= 8)
  c.data.max_bad_records = 0  # bad records skipped before one is an error
  return c
