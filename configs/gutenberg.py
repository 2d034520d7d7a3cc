r"""The demo model on real English prose: 70 Project Gutenberg books.

  python -m fp4jax.main --config=configs/gutenberg.py --workdir=runs/gb
  python -m fp4jax.main --config=configs/gutenberg.py:recipe=bf16 \
      --workdir=runs/gb_bf16
  python -m fp4jax.main --config=configs/gutenberg.py \
      --config.data.train_files=/data/books.txt --config.data.val_files=...

Reads ../shared/data/corpus/gutenberg_en_{train,val}.txt next to the
repository (64 training books, 6 held-out books; a `<|endoftext|>` line ends
each book), trains a 4096-piece BPE tokenizer into the workdir on the first
start, and trains the demo LLaMA (demo.py's steps, batch and row length) on
packed rows with per-document attention.
"""

import os

from configs import common
from configs import demo

# <repo>/configs/gutenberg.py -> <repo>/../shared/data/corpus
_CORPUS = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.pardir,
    "shared", "data", "corpus")


def get_config(arg: str | None = None):
  """Gutenberg config; arg: "recipe=NAME" (default fp4_paper)."""
  a = common.parse_arg(arg, recipe="fp4_paper")
  c = demo.get_config(f"recipe={a.recipe}")
  c.data.source = "text_files"
  c.data.train_files = (os.path.normpath(
      os.path.join(_CORPUS, "gutenberg_en_train.txt")),)
  c.data.val_files = (os.path.normpath(
      os.path.join(_CORPUS, "gutenberg_en_val.txt")),)
  c.data.vocab_size = 4096     # the demo size's own vocabulary
  c.data.segment_ids = True    # books never share attention
  return c
