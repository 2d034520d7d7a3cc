"""The batch layout every packed text source shares.

Owns: the splits and row / batch sizes a packing source accepts
(`check_layout`), and turning rows of packed tokens (seq_len + 1 each) and
their document numbers into the model's batch: the shift into inputs /
targets, the loss mask and segment_ids.

Must not import: anything but numpy.
"""

import numpy as np

SPLITS = ("train", "val")


def check_layout(split: str, seq_len: int, batch: int) -> None:
  """Raises ValueError (one line, naming the data.* key) for an unknown
  split, seq_len < 1 or fewer than one row per process."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  if seq_len < 1:
    raise ValueError(f"data.seq_len must be >= 1, got {seq_len}")
  if batch < 1:
    raise ValueError(f"data.global_batch must give >= 1 row per process, "
                     f"got {batch}")


def finish_batch(tokens: np.ndarray, seg: np.ndarray, segment_ids: bool
                 ) -> dict[str, np.ndarray]:
  """The batch of packed rows.

  Args:
    tokens: int32 [b, T + 1], each row a run of the packed stream.
    seg: int32 [b, T + 1], the documents of each row numbered 1, 2, ...
      (the one continued from the previous row is 1).
    segment_ids: return `seg` as segment_ids (attention stays inside a
      document); else all ones.

  Returns:
    inputs = tokens[:, :-1], targets = tokens[:, 1:]: int32 [b, T];
    mask: float32 [b, T], 0 where the target is the BOS of a document that
      starts inside the row (the previous document's EOS cannot predict
      which document follows), else 1, in both modes;
    segment_ids: int32 [b, T].
  """
  b, width = tokens.shape
  mask = (seg[:, 1:] == seg[:, :-1]).astype(np.float32)
  ids = (np.ascontiguousarray(seg[:, :-1]) if segment_ids
         else np.ones((b, width - 1), np.int32))
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": mask,
          "segment_ids": ids}
