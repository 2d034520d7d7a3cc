"""Model sizes, by name: `SIZES[name]` holds `fp4jax.llama.LlamaConfig` kwargs.

The table lives in `fp4jax.sizes` so library code and the GPU benchmark can
use it without the config tree; this module re-exports it for configs.

  size  layers  d_model  heads  kv  d_ff   vocab  params (untied)
  tiny       2       64      4   2    128    256  ~0.11M (tests)
  demo       4      256      4   2    512   4096  ~4.46M (CPU demos)
  125m      12      768     12  12   2048  32000  ~134M
  350m      24     1024     16  16   2816  32000  ~374M
  1.3b      24     2048     16  16   5632  32000  ~1.36B
  7b        32     4096     32  32  11008  32000  ~6.74B (LLaMA-2 7B)
  13b       40     5120     40  40  13824  32000  ~13.0B (LLaMA-2 13B)

`fp4jax.sizes.param_count(cfg)` gives exact counts; `get_config(size,
**overrides)` builds the LlamaConfig.
"""

from fp4jax.sizes import SIZES, get_config, param_count

__all__ = ["SIZES", "get_config", "param_count"]
