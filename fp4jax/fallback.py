"""Fallbacks, said once: where the program asked for cannot serve and an
equivalent, slower one runs instead (a kernel that does not take a shape,
a GEMM form the device lacks).

Owns: `once(what, why)`, one warning per distinct (what, why) in a process,
and `seen()`, what was said (for tests and run summaries). A fallback is
decided at trace time, so a retraced step does not repeat it.

Must not import: any fp4jax module (every layer may fall back).
"""

from __future__ import annotations

from absl import logging

_SEEN: dict[tuple[str, str], None] = {}


def once(what: str, why: str) -> None:
  """Logs "fallback: <what>: <why>" the first time this pair occurs."""
  key = (what, why)
  if key in _SEEN:
    return
  _SEEN[key] = None
  logging.warning("fallback: %s: %s", what, why)


def seen() -> tuple[tuple[str, str], ...]:
  """The (what, why) pairs logged so far, in order."""
  return tuple(_SEEN)
