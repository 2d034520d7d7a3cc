r"""python -m fp4jax.main --config=configs/demo.py --workdir=DIR [--config.k=v]

A misspelt override names the valid keys; bad settings print one line and
exit 1 (--traceback: full stack). Must not import fp4jax modules but train.
"""

import logging as std_logging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from fp4jax import train

_CONFIG = config_flags.DEFINE_config_file("config", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory.",
                               required=True)
_TRACEBACK = flags.DEFINE_bool("traceback", False, "Full stack on errors.")


def _unknown_key(argv: list[str]) -> str | None:
  """One line naming the first --config.a.b that the config file lacks."""
  spec = next((a[9:] for a in argv if a.startswith("--config=")), "")
  path, _, arg = spec.partition(":")
  load = config_flags.config_flags._LoadConfigModule  # pylint: disable=W0212
  node = cfg = load("config", path).get_config(*([arg] if arg else []))
  for key in (a[9:].split("=")[0] for a in argv if a.startswith("--config.")):
    node, parts = cfg, key.split(".")
    for i, part in enumerate(parts):
      if not hasattr(node, "keys") or part not in node:
        valid = sorted(node.keys()) if hasattr(node, "keys") else []
        where = ".".join(parts[:i]) or "config"
        return f"unknown config key {key!r}; valid keys in {where}: {valid}"
      node = node[part]
  return None


def _parse_flags(argv: list[str]) -> list[str]:
  try:
    return app.parse_flags_with_usage(argv)
  except (KeyError, AttributeError) as e:  # config_flags on an unknown key
    sys.exit(f"error: {_unknown_key(argv) or e}")


def main(_) -> None:
  # INFO lines from fp4jax only; libraries (orbax, jax) speak at WARNING+.
  logging.get_absl_handler().addFilter(
      lambda r: r.levelno >= std_logging.WARNING or r.pathname.startswith(
          os.path.dirname(train.__file__)))
  try:
    try:
      jax.config.update("jax_default_prng_impl", _CONFIG.value.prng_impl)
    except ValueError as e:
      raise ValueError(f"config.prng_impl: {e}") from None
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except (ValueError, train.NonFiniteError) as e:
    if _TRACEBACK.value:
      raise
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=_parse_flags)
