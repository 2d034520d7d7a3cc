"""Helpers shared by config files: parsing the `--config=file.py:arg` string.

Must not import: anything from fp4jax (configs are plain data).
"""

import ast
from typing import Any

import ml_collections


def parse_arg(arg: str | None, **defaults: Any) -> ml_collections.ConfigDict:
  """Parses "k1=v1,k2=v2" (values as Python literals) over `defaults`.

  A bare "k" means k=True, so `demo.py:smoke` turns the smoke switch on.

  Args:
    arg: the text after ":" in --config=file.py:arg, or None.
    **defaults: every accepted key with its default value.

  Returns:
    A locked ConfigDict with the defaults updated from `arg`.

  Raises:
    ValueError: a key not in `defaults`.
  """
  out = dict(defaults)
  for item in filter(None, (arg or "").split(",")):
    key, sep, text = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; expected one of "
                       f"{sorted(defaults)}")
    if not sep:
      out[key] = True
      continue
    try:
      out[key] = ast.literal_eval(text)
    except (SyntaxError, ValueError):
      out[key] = text  # a bare string such as fp4_paper
  cfg = ml_collections.ConfigDict(out)
  cfg.lock()
  return cfg
