"""Tokenised examples -> padded batches with aligned labels.

Batch format used everywhere in kdlab (trainer, teachers, evaluation):

- `input_ids`      `[B, T]` int64, right-padded with the tokenizer's pad id;
- `attention_mask` `[B, T]` int64, 1 on real tokens;
- `labels`         `[B, T]` int64, *already aligned with the logits*: `labels[b, i]` is the token
  that position `i` predicts (`input_ids[b, i + 1]`) when that token counts in the loss, else
  `-100`. So `model(input_ids).logits` `[B, T, V]` and `labels` line up without shifting.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kdlab.losses.reduce import IGNORE_INDEX


@dataclass(frozen=True)
class Encoded:
    """One tokenised example: its ids and, per token, whether predicting it counts in the loss."""

    input_ids: list[int]
    counted: list[bool]  # counted[j]: token j is a target (a completion token, by default)
    prompt_length: int

    def __len__(self) -> int:
        return len(self.input_ids)


def collate(examples: Sequence[Encoded], pad_id: int) -> dict[str, Tensor]:
    """Right-pad a list of encoded examples into the batch format described above."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    length = max(len(e) for e in examples)
    batch = len(examples)
    input_ids = torch.full((batch, length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((batch, length), dtype=torch.long)
    labels = torch.full((batch, length), IGNORE_INDEX, dtype=torch.long)
    for b, e in enumerate(examples):
        n = len(e)
        ids = torch.tensor(e.input_ids, dtype=torch.long)
        input_ids[b, :n] = ids
        attention_mask[b, :n] = 1
        counted = torch.tensor(e.counted[1:], dtype=torch.bool)  # targets of positions 0..n-2
        labels[b, : n - 1] = torch.where(counted, ids[1:], IGNORE_INDEX)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
