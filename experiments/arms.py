"""Arms of an experiment: named deltas over configs/anchor.py.

An experiment module defines `ARMS` (arm name -> `Arm`), `BASELINE` (the arm
every other is compared with, paired by seed), `SEEDS` and `STEPS` (its
default size), and `get_config(arg)` = `config_for(ARMS, arg)`, so any one
arm also runs by hand:

  python -m fp4jax.main --config=experiments/lr_sweep.py:arm=f32_lr3e-3,seed=1 \
      --workdir=runs/x

Must not import: fp4jax (configs are plain data).
"""

from __future__ import annotations

import ast
from typing import Any, NamedTuple

from configs import anchor
from configs import common


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
  return c


def lr_arms(recipes: dict[str, str], lrs: tuple[float, ...]
            ) -> dict[str, Arm]:
  """{f"{label}_lr{lr:g}": Arm(f"{anchor args},lr={lr}", group=label)}."""
  return {f"{label}_lr{lr:g}": Arm(",".join(filter(None, (args,
                                                           f"lr={lr}"))),
                                   group=label)
          for label, args in recipes.items() for lr in lrs}
