r"""A run's weights out to Hugging Face, and a Hugging Face LLaMA in.

  python -m fp4jax.export --workdir=runs/demo --out=exported [--step=S]
  python -m fp4jax.main --config=configs/default.py --workdir=runs/ft \
      --config.init_from_hf=path/to/hf_llama \
      --config.data.tokenizer_model=path/to/hf_llama/tokenizer.model ...

Export writes `model.safetensors` (float32, Hugging Face LLaMA names and
layouts), a `config.json` with LlamaConfig fields (GQA heads, rope_theta,
norm eps, tied head) and the run's SentencePiece tokenizer
(`tokenizer.model` plus a `tokenizer_config.json` naming LlamaTokenizer),
so `transformers.LlamaForCausalLM.from_pretrained(out)` loads it, and
`fp4jax.json` (the run and step it came from). The weights are the master
weights: an FP4 run's model is its f32 weights evaluated with its recipe's
quantized forward; exported, it runs unquantized (what
`python -m fp4jax.evaluate --precision=f32` scores). Without --step it is
the newest complete checkpoint that reads (a damaged one, or one a live
run deletes while it is read, is skipped with a warning naming it).

--out is a new folder, an empty one, or an earlier export of the same run
(replaced whole); anything else is refused, as are an empty --out, a
symbolic link, and a folder that is or contains the workdir. The files are
written into a scratch folder export creates beside --out
(`.<name>.*.export-tmp`) and moved into place only when complete; a failed
export removes what it created and nothing else.

Import: `init_from_hf` (a folder with an HF LLaMA config.json and
model.safetensors) starts a fresh run from those weights; the model keys
must describe the same shape (checked before anything compiles).

Exit codes: 0 done, 1 bad input or a failed write (one `error:` line;
--out is left as it was).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from typing import Any

from fp4jax import diskspace
from fp4jax import errtext
from fp4jax import rundir

MARKER_FILE = "fp4jax.json"
# What an export folder holds (hf.WEIGHTS_FILE, hf.CONFIG_FILE, the
# tokenizer files, MARKER_FILE): only such a folder is ever replaced.
EXPORT_FILES = frozenset({"model.safetensors", "config.json",
                          "tokenizer.model", "tokenizer_config.json",
                          MARKER_FILE})
# Room for the JSON files and the file system's own blocks.
_SLACK_BYTES = 1 << 20


class _Parser(argparse.ArgumentParser):
  """argparse with the documented exit code and one `error:` line."""

  def error(self, message):
    print(f"error: {message} (see --help)", file=sys.stderr)
    sys.exit(1)


def _args(argv):
  p = _Parser(
      prog="python -m fp4jax.export",
      description=__doc__.split("\n\n")[0].strip(),
      formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--workdir", required=True, help="the run directory")
  p.add_argument("--out", required=True,
                 help="a new or empty folder, or an earlier export of the "
                      "same run")
  p.add_argument("--step", type=int, default=None,
                 help="checkpoint step (default: the newest)")
  return p.parse_args(argv)


def _earlier_export(out: str, names: list[str]) -> dict[str, Any] | None:
  """The marker of the export in `out` (holding `names`), else None."""
  if MARKER_FILE not in names or not set(names) <= EXPORT_FILES:
    return None
  if not all(os.path.isfile(os.path.join(out, n)) and
             not os.path.islink(os.path.join(out, n)) for n in names):
    return None
  try:
    with open(os.path.join(out, MARKER_FILE)) as f:
      marker = json.load(f)
  except (OSError, ValueError):
    return None
  if not isinstance(marker, dict) or not {"workdir", "step"} <= set(marker):
    return None
  return marker


def check_out(out: str, workdir: str) -> str:
  """What `out` is: "new", "empty" or "earlier" (an export of `workdir`).

  Writes nothing.

  Raises:
    ValueError: one line naming --out and why it is refused.
  """
  if not out.strip():
    raise ValueError("--out is empty (an unset shell variable?); name the "
                     "folder to export into")
  if os.path.islink(out.rstrip(os.sep) or out):
    raise ValueError(f"--out {out!r} is a symbolic link; name the folder "
                     f"itself (export replaces --out, which would replace "
                     f"the link, not what it points to)")
  real_out = os.path.realpath(out)
  real_run = os.path.realpath(workdir)
  if real_run == real_out or real_run.startswith(real_out.rstrip(os.sep)
                                                  + os.sep):
    raise ValueError(f"--out {out!r} is or contains --workdir {workdir!r}; "
                     f"export into a folder of its own")
  ckpts = os.path.join(real_run, "checkpoints")
  if real_out == ckpts or real_out.startswith(ckpts + os.sep):
    raise ValueError(f"--out {out!r} is (in) the run's checkpoints folder, "
                     f"which the run manages; export elsewhere")
  if not os.path.lexists(out):
    rundir.check_creatable(real_out, f"--out {out!r}")
    return "new"
  if not os.path.isdir(out):
    raise ValueError(f"--out {out!r} exists and is not a folder; nothing is "
                     f"overwritten")
  names = sorted(os.listdir(out))
  if not names:
    return "empty"
  marker = _earlier_export(out, names)
  if marker is None:
    shown = ", ".join(names[:3]) + (", ..." if len(names) > 3 else "")
    raise ValueError(f"--out {out!r} is not an empty folder or an earlier "
                     f"export (it holds {shown}); nothing is overwritten: "
                     f"name a new folder")
  if os.path.realpath(str(marker["workdir"])) != real_run:
    raise ValueError(f"--out {out!r} holds the export of another run "
                     f"({marker['workdir']}, step {marker['step']}); nothing "
                     f"is overwritten: name a new folder")
  return "earlier"


def _make_parents(path: str) -> list[str]:
  """Creates the missing folders above `path`; returns them, outermost
  first (so a failed export can remove exactly those again)."""
  missing = []
  parent = os.path.dirname(os.path.abspath(path))
  while not os.path.isdir(parent):
    missing.append(parent)
    parent = os.path.dirname(parent)
  missing.reverse()
  for d in missing:
    os.mkdir(d)
  return missing


def _move_into(src_dir: str, out: str) -> None:
  """Moves the files of `src_dir` into the existing folder `out`, never
  replacing a file there (a hard link fails on an existing name; a file
  system without links gets an existence check before the rename)."""
  moved = []
  try:
    for name in sorted(os.listdir(src_dir)):
      src, dst = os.path.join(src_dir, name), os.path.join(out, name)
      try:
        os.link(src, dst)
        os.unlink(src)
      except FileExistsError:
        raise ValueError(f"--out {out!r}: {name} appeared there during the "
                         f"export; nothing is overwritten") from None
      except OSError:
        if os.path.lexists(dst):
          raise ValueError(f"--out {out!r}: {name} appeared there during "
                           f"the export; nothing is overwritten") from None
        os.rename(src, dst)
      moved.append(dst)
  except BaseException:
    for dst in moved:   # ours: moved in by this call
      os.unlink(dst)
    raise


def _write(folder: str, loaded, workdir: str, tensors, config) -> None:
  """The export's files, into the new folder `folder`."""
  from safetensors import numpy as st  # pylint: disable=import-outside-toplevel

  from fp4jax import hf  # pylint: disable=import-outside-toplevel
  from fp4jax.evaluation import loader  # pylint: disable=import-outside-toplevel

  st.save_file(tensors, os.path.join(folder, hf.WEIGHTS_FILE),
               metadata={"format": "pt"})
  with open(os.path.join(folder, hf.CONFIG_FILE), "w") as f:
    json.dump(config, f, indent=2, sort_keys=True)
  tok = loaded.tokenizer
  if tok is not None:
    shutil.copyfile(loader.tokenizer_path(workdir, loaded.run_config),
                    os.path.join(folder, "tokenizer.model"))
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
      json.dump({"tokenizer_class": "LlamaTokenizer",
                 "add_bos_token": True, "add_eos_token": False,
                 "add_prefix_space": tok.adds_dummy_prefix,
                 "bos_token": tok.piece(tok.bos_id),
                 "eos_token": tok.piece(tok.eos_id),
                 "model_max_length": loaded.model_cfg.max_seq_len}, f,
                indent=2)
  with open(os.path.join(folder, MARKER_FILE), "w") as f:
    json.dump({"workdir": os.path.abspath(workdir), "step": loaded.step,
               "recipe": loaded.recipe}, f, indent=2)


def export(workdir: str, out: str, step: int | None = None
           ) -> tuple[str, int]:
  """Writes the HF folder of `workdir`'s checkpoint to `out`.

  Returns:
    (out, the checkpoint step exported).

  Raises:
    ValueError / FileNotFoundError: one line naming the argument at fault
      (`check_out` says which --out are refused).
    OSError: a write that failed (the caller names it; diskspace.DiskFull
      for a full disk, checked before writing); `out` and its surroundings
      are as they were.
  """
  out = os.path.normpath(out) if out.strip() else out
  check_out(out, workdir)   # before the slow part
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from fp4jax import hf  # pylint: disable=import-outside-toplevel
  from fp4jax.evaluation import loader  # pylint: disable=import-outside-toplevel

  loaded = loader.load(workdir, step, precision="f32", need_tokenizer=False)
  if not hf.is_llama(loaded.model_cfg):
    raise ValueError(f"the Hugging Face export maps LLaMA models; {workdir} "
                     f"holds a {type(loaded.model_cfg).__name__}")
  tensors = hf.to_hf_tensors(nnx.to_pure_dict(loaded.params),
                             loaded.model_cfg)
  tok = loaded.tokenizer
  config = hf.hf_config(loaded.model_cfg,
                        bos_id=tok.bos_id if tok else 1,
                        eos_id=tok.eos_id if tok else 2)
  needed = sum(t.nbytes for t in tensors.values()) + _SLACK_BYTES
  if tok is not None:
    needed += os.path.getsize(loader.tokenizer_path(workdir,
                                                    loaded.run_config))
  kind = check_out(out, workdir)   # again: loading took a while
  parent = os.path.dirname(os.path.abspath(out))
  diskspace.check(parent, needed, "the export")
  created = _make_parents(out)
  # A scratch folder of our own beside --out (same file system, so the
  # final moves are renames); nothing else is ever removed.
  name = os.path.basename(os.path.abspath(out))
  scratch = tempfile.mkdtemp(prefix=f".{name}.", suffix=".export-tmp",
                             dir=parent)
  previous = os.path.join(scratch, "previous")
  try:
    new = os.path.join(scratch, "new")
    os.mkdir(new)
    try:
      _write(new, loaded, workdir, tensors, config)
    except Exception as e:  # safetensors reports a full disk its own way
      diskspace.raise_if_full(e, parent, needed, "the export")
      raise
    # mkdtemp's folder and safetensors' file are private (0700 / 0600);
    # an export is as readable as anything else the user creates.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(new, 0o777 & ~umask)
    for file in os.listdir(new):
      os.chmod(os.path.join(new, file), 0o666 & ~umask)
    if kind == "new":
      os.rename(new, out)
    elif kind == "empty":
      _move_into(new, out)
    else:   # the earlier export of this run: swapped out whole
      os.rename(out, previous)
      try:
        os.rename(new, out)
      except BaseException:
        os.rename(previous, out)
        raise
  except BaseException:
    if not os.path.lexists(previous):
      shutil.rmtree(scratch, ignore_errors=True)   # created by this call
    _remove_dirs(created)
    raise
  if os.path.lexists(previous):
    for file in os.listdir(previous):   # checked: the export's own files
      os.unlink(os.path.join(previous, file))
    os.rmdir(previous)
  shutil.rmtree(scratch, ignore_errors=True)   # created by this call
  return out, loaded.step


def _remove_dirs(created: list[str]) -> None:
  """Removes the folders `_make_parents` created, if still empty."""
  for d in reversed(created):
    try:
      os.rmdir(d)
    except OSError:
      return


def main(argv=None) -> int:
  argv = sys.argv[1:] if argv is None else argv
  a = _args(argv)
  try:
    out, step = export(a.workdir, a.out, a.step)
  except (ValueError, OSError) as e:
    print(f"error: {errtext.one_line(e)}", file=sys.stderr)
    return 1
  print(f"exported step {step} of {a.workdir} to {out}")
  return 0




if __name__ == "__main__":
  sys.exit(main())
