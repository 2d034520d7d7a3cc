"""Arms of an experiment: named deltas over configs/anchor.py.

An experiment module defines `ARMS` (arm name -> `Arm`), `BASELINE` (the arm
every other is compared with, paired by seed), `SEEDS` and `STEPS` (its
default size), and `get_config(arg)` = `config_for(ARMS, arg)`, so any one
arm also runs by hand:

  python -m fp4jax.main --config=experiments/lr_sweep.py:arm=f32_lr3e-3,seed=1 \
      --workdir=runs/x

The arms train on the Gutenberg books of configs/anchor.py, by default the
corpus/ folder of the shared data folder next to the repository;
FP4JAX_CORPUS=DIR (what `experiments.run --corpus DIR` sets) names another
folder holding the same file names, for a run by hand too.

Must not import: fp4jax (configs are plain data).
"""

from __future__ import annotations

import ast
import os
from typing import Any, NamedTuple

from configs import anchor
from configs import common

# Names the folder holding the corpus files (gutenberg_en_train.txt,
# gutenberg_en_val.txt) when it is not the shared data folder's corpus/.
CORPUS_ENV = "FP4JAX_CORPUS"
# sha256 of the shared data folder's corpus files, as its README publishes
# them: the content the committed results were trained on, so reports find
# those runs on a machine that lacks the files.
SHARED_CORPUS = {
    "gutenberg_en_train.txt":
        "ef0354d9c306d149de8c7f4944d6b59f6d7ea4945124d042ca2977134e05d067",
    "gutenberg_en_val.txt":
        "4529bac1d0ab373c8a9c804c876293aa1412ac1607b3f84ed6ad232b82b4505d",
}


class Arm(NamedTuple):
  """One arm.

  Attributes:
    anchor: configs/anchor.py args, e.g. "recipe=fp4_paper,lr=3e-3".
    sets: ((dotted config key, value), ...) applied after the anchor args.
    group: what the arm varies besides its knob (e.g. its recipe), for
      "best LR per group" tables; "" = the arm's own name.
  """
  anchor: str
  sets: tuple[tuple[str, Any], ...] = ()
  group: str = ""

  def arg(self, key: str, default: Any = None) -> Any:
    """The value of one anchor arg ("lr") or `default`."""
    for item in filter(None, self.anchor.split(",")):
      k, _, v = item.partition("=")
      if k.strip() == key:
        try:
          return ast.literal_eval(v)
        except (SyntaxError, ValueError):
          return v
    return default


def config_for(arms: dict[str, Arm], arg: str | None, steps: int):
  """The ConfigDict of `arm=NAME,seed=S[,steps=N]` (default: the first arm,
  seed 0, the experiment's `steps`)."""
  a = common.parse_arg(arg, arm=next(iter(arms)), seed=0, steps=steps)
  if a.arm not in arms:
    raise ValueError(f"unknown arm {a.arm!r}; expected one of {list(arms)}")
  spec = arms[a.arm]
  c = anchor.get_config(",".join(filter(None, (
      spec.anchor, f"seed={a.seed}", f"steps={a.steps}"))))
  for key, value in spec.sets:
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  if os.environ.get(CORPUS_ENV):
    point_corpus(c, os.environ[CORPUS_ENV])
  return c


def point_corpus(config, folder: str) -> None:
  """Points the config's data files at the same names in `folder`."""
  for key in ("train_files", "val_files"):
    config.data[key] = tuple(
        os.path.join(os.path.abspath(folder), os.path.basename(p))
        for p in config.data[key])


def lr_arms(recipes: dict[str, str], lrs: tuple[float, ...]
            ) -> dict[str, Arm]:
  """{f"{label}_lr{lr:g}": Arm(f"{anchor args},lr={lr}", group=label)}."""
  return {f"{label}_lr{lr:g}": Arm(",".join(filter(None, (args,
                                                           f"lr={lr}"))),
                                   group=label)
          for label, args in recipes.items() for lr in lrs}
