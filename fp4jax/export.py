r"""A run's weights out to Hugging Face, and a Hugging Face LLaMA in.

  python -m fp4jax.export --workdir=runs/demo --out=exported [--step=S]
  python -m fp4jax.main --config=configs/default.py --workdir=runs/ft \
      --config.init_from_hf=path/to/hf_llama \
      --config.data.tokenizer_model=path/to/hf_llama/tokenizer.model ...

Export writes `model.safetensors` (float32, Hugging Face LLaMA names and
layouts), a `config.json` with LlamaConfig fields (GQA heads, rope_theta,
norm eps, tied head) and the run's SentencePiece tokenizer
(`tokenizer.model` plus a `tokenizer_config.json` naming LlamaTokenizer),
so `transformers.LlamaForCausalLM.from_pretrained(out)` loads it. The
weights are the master weights: an FP4 run's model is its f32 weights
evaluated with its recipe's quantized forward; exported, it runs
unquantized (what `python -m fp4jax.evaluate --precision=f32` scores).

Import: `init_from_hf` (a folder with an HF LLaMA config.json and
model.safetensors) starts a fresh run from those weights; the model keys
must describe the same shape (checked before anything compiles).

Exit codes: 0 done, 1 bad input (one `error:` line; nothing is written
into an existing non-empty --out).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from typing import Any

def _args(argv):
  p = argparse.ArgumentParser(
      prog="python -m fp4jax.export",
      description=__doc__.split("\n\n")[0].strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--out", required=True, help="new or empty output folder")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the newest)")
  return p.parse_args(argv)


def export(workdir: str, out: str, step: int | None = None) -> str:
  """Writes the HF folder of `workdir`'s checkpoint to `out`; returns out.

  Raises:
    ValueError / FileNotFoundError: one line naming the argument at fault.
  """
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise ValueError(f"--out {out!r} exists and is not an empty folder; "
                     f"nothing is overwritten")
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from safetensors import numpy as st  # pylint: disable=import-outside-toplevel

  from fp4jax import hf  # pylint: disable=import-outside-toplevel
  from fp4jax.evaluation import loader  # pylint: disable=import-outside-toplevel

  loaded = loader.load(workdir, step, precision="f32", need_tokenizer=False)
  tensors = hf.to_hf_tensors(nnx.to_pure_dict(loaded.params),
                             loaded.model_cfg)
  tok = loaded.tokenizer
  config = hf.hf_config(loaded.model_cfg,
                        bos_id=tok.bos_id if tok else 1,
                        eos_id=tok.eos_id if tok else 2)
  tmp = out.rstrip("/") + ".tmp"
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  st.save_file(tensors, os.path.join(tmp, hf.WEIGHTS_FILE),
               metadata={"format": "pt"})
  with open(os.path.join(tmp, hf.CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  if tok is not None:
    shutil.copyfile(loader.tokenizer_path(workdir, loaded.run_config),
                    os.path.join(tmp, "tokenizer.model"))
    with open(os.path.join(tmp, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "LlamaTokenizer",
                 "add_bos_token": True, "add_eos_token": False,
                 "add_prefix_space": tok.adds_dummy_prefix,
                 "bos_token": tok.piece(tok.bos_id),
                 "eos_token": tok.piece(tok.eos_id),
                 "model_max_length": loaded.model_cfg.max_seq_len}, f,
                indent=2)
  with open(os.path.join(tmp, "fp4jax.json"), "w") as f:
    json.dump({"workdir": os.path.abspath(workdir), "step": loaded.step,
               "recipe": loaded.recipe}, f, indent=2)
  if os.path.isdir(out):
    os.rmdir(out)   # empty, checked above
  os.replace(tmp, out)
  return out


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  a = _args(argv)
  try:
    out = export(a.workdir, a.out, a.step)
  except (ValueError, FileNotFoundError) as e:
    print(f"error: {str(e).splitlines()[0] if str(e) else repr(e)}",
          file=sys.stderr)
    return 1
  print(f"exported to {out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
