"""Hugging Face LLaMA <-> fp4jax: parameter names, layouts and config.

Owns: the mapping between `llama.Llama`'s parameters and the tensors of
`transformers.LlamaForCausalLM` (safetensors names), and between
`LlamaConfig` and a Hugging Face `config.json` (LlamaConfig fields).

The two models compute the same function, so no weight is permuted:
fp4jax's RoPE rotates the dim pairs (i, i + K/2) as HF's `rotate_half`
does, query head h reads kv head h // (H / G) as HF's `repeat_kv`, and
both RMSNorms multiply the f32-normalised input by the scale. Projection
kernels are stored [in, out] here (x @ W) and [out, in] in HF (x @ W^T).
Plain numpy throughout: no torch needed to convert.

Must not import: ml_collections, torch, transformers, or fp4jax modules
right of `llama`.
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from fp4jax import llama

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"

# fp4jax block path -> HF module path, per layer; all are [in, out] kernels.
_LAYER_KERNELS = (
    ("attn.q_proj", "self_attn.q_proj"), ("attn.k_proj", "self_attn.k_proj"),
    ("attn.v_proj", "self_attn.v_proj"), ("attn.o_proj", "self_attn.o_proj"),
    ("mlp.gate_proj", "mlp.gate_proj"), ("mlp.up_proj", "mlp.up_proj"),
    ("mlp.down_proj", "mlp.down_proj"))
_LAYER_NORMS = (("attn_norm", "input_layernorm"),
                ("mlp_norm", "post_attention_layernorm"))


def is_llama(cfg: Any) -> bool:
  """Whether `cfg` is a model this mapping covers (the llama family)."""
  return isinstance(cfg, llama.LlamaConfig)


def to_hf_tensors(params: dict[str, Any], cfg: llama.LlamaConfig
                  ) -> dict[str, np.ndarray]:
  """HF safetensors dict of a pure-dict fp4jax param tree.

  Args:
    params: `nnx.to_pure_dict` of the model's parameters (arrays of any
      float dtype; written in float32).
    cfg: the model's config.

  Returns:
    {HF tensor name: float32 array}, kernels transposed to [out, in]. The
    layers may be stacked (`llama.stack_layers`) or one entry each.
  """
  f32 = lambda a: np.asarray(a, np.float32)   # noqa: E731
  params = llama.unstack_layers(params)   # stacked (scanned layers) or not
  out = {"model.embed_tokens.weight": f32(params["embed"]),
         "model.norm.weight": f32(params["final_norm"]["scale"])}
  for i in range(cfg.n_layers):
    layer = params["layers"][i]
    for ours, theirs in _LAYER_KERNELS:
      block, proj = ours.split(".")
      out[f"model.layers.{i}.{theirs}.weight"] = np.ascontiguousarray(
          f32(layer[block][proj]["kernel"]).T)
    for ours, theirs in _LAYER_NORMS:
      out[f"model.layers.{i}.{theirs}.weight"] = f32(layer[ours]["scale"])
  if not cfg.tie_embeddings:
    out["lm_head.weight"] = np.ascontiguousarray(
        f32(params["lm_head"]["kernel"]).T)
  return out


def from_hf_tensors(tensors: dict[str, np.ndarray], cfg: llama.LlamaConfig
                    ) -> dict[str, Any]:
  """fp4jax pure-dict param tree (float32) of HF LLaMA tensors, in cfg's
  layer layout (stacked when cfg.scan_layers).

  Raises:
    ValueError: one line naming a tensor that is missing or misshapen.
  """
  def take(name, shape):
    if name not in tensors:
      raise ValueError(f"HF checkpoint has no tensor {name!r}")
    a = np.asarray(tensors[name], np.float32)
    if a.shape != shape:
      raise ValueError(f"HF tensor {name!r} has shape {a.shape}, expected "
                       f"{shape} for this config")
    return a

  d, kd = cfg.d_model, cfg.head_dim
  shapes = {"attn.q_proj": (cfg.n_heads * kd, d),
            "attn.k_proj": (cfg.n_kv_heads * kd, d),
            "attn.v_proj": (cfg.n_kv_heads * kd, d),
            "attn.o_proj": (d, cfg.n_heads * kd),
            "mlp.gate_proj": (cfg.d_ff, d), "mlp.up_proj": (cfg.d_ff, d),
            "mlp.down_proj": (d, cfg.d_ff)}
  params: dict[str, Any] = {
      "embed": take("model.embed_tokens.weight", (cfg.vocab_size, d)),
      "final_norm": {"scale": take("model.norm.weight", (d,))},
      "layers": {}}
  for i in range(cfg.n_layers):
    layer: dict[str, Any] = {"attn": {}, "mlp": {}}
    for ours, theirs in _LAYER_KERNELS:
      block, proj = ours.split(".")
      w = take(f"model.layers.{i}.{theirs}.weight", shapes[ours])
      layer[block][proj] = {"kernel": np.ascontiguousarray(w.T)}
    for ours, theirs in _LAYER_NORMS:
      layer[ours] = {"scale": take(f"model.layers.{i}.{theirs}.weight",
                                   (d,))}
    params["layers"][i] = layer
  if not cfg.tie_embeddings:
    params["lm_head"] = {"kernel": np.ascontiguousarray(
        take("lm_head.weight", (cfg.vocab_size, d)).T)}
  return llama.stack_layers(params) if cfg.scan_layers else params


def hf_config(cfg: llama.LlamaConfig, *, bos_id: int, eos_id: int
              ) -> dict[str, Any]:
  """A Hugging Face LlamaConfig dict (config.json) of `cfg`."""
  return {
      "architectures": ["LlamaForCausalLM"], "model_type": "llama",
      "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
      "intermediate_size": cfg.d_ff, "num_hidden_layers": cfg.n_layers,
      "num_attention_heads": cfg.n_heads,
      "num_key_value_heads": cfg.n_kv_heads, "head_dim": cfg.head_dim,
      "max_position_embeddings": cfg.max_seq_len,
      "rope_theta": cfg.rope_theta, "rms_norm_eps": cfg.norm_eps,
      "tie_word_embeddings": cfg.tie_embeddings, "hidden_act": "silu",
      "attention_bias": False, "mlp_bias": False, "bos_token_id": bos_id,
      "eos_token_id": eos_id, "torch_dtype": "float32",
  }


def llama_config(hf: dict[str, Any], **overrides: Any) -> llama.LlamaConfig:
  """The fp4jax LlamaConfig of a Hugging Face config.json dict.

  Raises:
    ValueError: one line naming an HF field fp4jax does not support
      (biases, non-default RoPE scaling, another activation).
  """
  if hf.get("model_type", "llama") != "llama":
    raise ValueError(f"HF config model_type={hf.get('model_type')!r}; only "
                     f"'llama' converts")
  for key, ok in (("hidden_act", "silu"), ("attention_bias", False),
                  ("mlp_bias", False), ("rope_scaling", None)):
    if hf.get(key, ok) != ok:
      raise ValueError(f"HF config {key}={hf[key]!r} is not supported "
                       f"(fp4jax: {ok!r})")
  n_heads = hf["num_attention_heads"]
  head_dim = hf.get("head_dim") or hf["hidden_size"] // n_heads
  if head_dim * n_heads != hf["hidden_size"]:
    raise ValueError(f"HF config head_dim={head_dim} x num_attention_heads="
                     f"{n_heads} != hidden_size={hf['hidden_size']}")
  rope = hf.get("rope_theta")
  if rope is None:   # transformers 5 keeps it under rope_parameters
    rope = (hf.get("rope_parameters") or {}).get("rope_theta", 10000.0)
  fields = dict(
      vocab_size=hf["vocab_size"], d_model=hf["hidden_size"],
      n_layers=hf["num_hidden_layers"], n_heads=n_heads,
      n_kv_heads=hf.get("num_key_value_heads") or n_heads,
      d_ff=hf["intermediate_size"],
      max_seq_len=hf.get("max_position_embeddings", 2048),
      rope_theta=float(rope), norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
      tie_embeddings=bool(hf.get("tie_word_embeddings", False)))
  return llama.LlamaConfig(**{**fields, **overrides})


def read_folder(folder: str, key: str = "init_from_hf"
                ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """(config.json dict, {name: numpy array}) of an HF LLaMA folder.

  Raises:
    FileNotFoundError: naming `key` and the missing file.
  """
  for name in (CONFIG_FILE, WEIGHTS_FILE):
    if not os.path.isfile(os.path.join(folder, name)):
      raise FileNotFoundError(f"{key}: no {name} in {folder!r} (an HF LLaMA "
                              f"folder saved with safetensors)")
  with open(os.path.join(folder, CONFIG_FILE)) as f:
    config = json.load(f)
  from safetensors import numpy as st  # pylint: disable=import-outside-toplevel
  return config, st.load_file(os.path.join(folder, WEIGHTS_FILE))


# LlamaConfig fields an imported checkpoint must match (the rest, compute
# dtype, attention, max_seq_len, are the run's choice).
SHAPE_FIELDS = ("vocab_size", "d_model", "n_layers", "n_heads", "n_kv_heads",
                "d_ff", "rope_theta", "norm_eps", "tie_embeddings")


def check_matches(hf_cfg: dict[str, Any], cfg: llama.LlamaConfig,
                  key: str = "init_from_hf") -> None:
  """One-line ValueError naming the model.* key that differs from hf_cfg."""
  theirs = llama_config(hf_cfg, max_seq_len=cfg.max_seq_len)
  for field in SHAPE_FIELDS:
    a, b = getattr(cfg, field), getattr(theirs, field)
    if a != b:
      raise ValueError(f"{key}: the checkpoint has {field}={b!r}, the run's "
                       f"model {field}={a!r}; set model.{field}={b!r}")
