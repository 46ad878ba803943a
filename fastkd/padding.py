"""Token id sequences of different lengths as one batch: the one padding rule for the corpus stream
and GLUE (each batch padded to its own longest sequence, never to a fixed width)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def pad_batch(sequences: Sequence[Sequence[int]], pad_id: int,
              token_types: Sequence[Sequence[int]] | None = None) -> dict[str, torch.Tensor]:
    """`input_ids` and `attention_mask` (and `token_type_ids` when `token_types` is given, 0 where padded),
    each (len(sequences), longest), the sequences left-aligned."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    types = None if token_types is None else torch.zeros((len(sequences), width), dtype=torch.long)
    for r, seq in enumerate(sequences):
        input_ids[r, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        attention_mask[r, :len(seq)] = 1
        if types is not None:
            types[r, :len(seq)] = torch.as_tensor(token_types[r], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if types is not None:
        batch["token_type_ids"] = types
    return batch
