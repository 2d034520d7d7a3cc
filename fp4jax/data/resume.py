"""The identity check shared by every input source's `set_state`.

Owns: comparing the identity saved with an iterator state (data, tokenizer,
split, shape, seed, process shard) against the current iterator's, so a
resumed run never silently replays or skips examples.
Must not import: jax, grain, tensorflow_datasets, other fp4jax modules.
"""

import json
from typing import Any


def check_identity(saved: Any, now: dict[str, Any]) -> None:
  """Raises ValueError naming every field where `saved` differs from `now`."""
  saved = json.loads(json.dumps(saved))
  now = json.loads(json.dumps(now))
  if saved != now:
    diff = sorted(k for k in set(saved or {}) | set(now)
                  if (saved or {}).get(k) != now.get(k))
    raise ValueError(
        "data state was saved for other data/settings: " + ", ".join(
            f"{k} {(saved or {}).get(k)!r} -> {now.get(k)!r}" for k in diff))


def refuse_resharded(state: Any, source: str, process_count: int) -> None:
  """Raises ValueError if `state` holds another process count's states
  (`fp4jax.data.process_state`), for a source whose position is per
  process and cannot be split differently."""
  if isinstance(state, dict) and "all_processes" in state:
    raise ValueError(
        f"the data position was saved by {len(state['all_processes'])} "
        f"processes, now {process_count}: data.source={source!r} cannot "
        f"split it differently (data.source='files' can); resume on "
        f"{len(state['all_processes'])} processes")
