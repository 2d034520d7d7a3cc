"""The batch layout every packed text source shares.

Owns: turning rows of packed tokens (seq_len + 1 each) and their document
numbers into the model's batch: the shift into inputs / targets, the loss
mask and segment_ids.

Must not import: anything but numpy.
"""

import numpy as np


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
