"""The one place where per-position loss values become a scalar."""

from __future__ import annotations

import torch
from torch import Tensor

IGNORE_INDEX = -100


def counted_mask(labels: Tensor | None, shape: torch.Size, device: torch.device) -> Tensor:
    """Boolean mask of the counted positions: `labels != -100`, or all of them without labels."""
    if labels is None:
        return torch.ones(shape, dtype=torch.bool, device=device)
    if labels.shape != shape:
        raise ValueError(
            f"labels shape {tuple(labels.shape)} does not match the logits' positions "
            f"{tuple(shape)}; "
            "labels must be aligned with the logits (position i predicts labels[..., i])"
        )
    return labels != IGNORE_INDEX


def reduce_positions(
    values: Tensor,
    labels: Tensor | None = None,
    *,
    num_items_in_batch: int | Tensor | None = None,
) -> Tensor:
    """Sum the per-position `values` over counted positions and normalise.

    Args:
        values: `[...]` per-position loss values (finite wherever they count).
        labels: `[...]` int64 targets; `-100` marks positions that do not count. `None`: all count.
        num_items_in_batch: the number of counted positions in the whole optimiser step (all
            gradient-accumulation micro-batches and all processes). When given, the result is
            `sum / num_items_in_batch`, so summing the micro-batch results gives the mean over the
            step: gradient-accumulation-correct (TRL's `num_items_in_batch`). When `None`, the mean
            over this call's counted positions (count clamped to >= 1: a fully masked batch is 0).

    Returns:
        A scalar tensor. Masked positions contribute neither value nor gradient.
    """
    mask = counted_mask(labels, values.shape, values.device)
    total = torch.where(mask, values, torch.zeros_like(values)).sum()
    return total / normaliser(mask, num_items_in_batch, dtype=total.dtype)


def normaliser(
    mask: Tensor, num_items_in_batch: int | Tensor | None = None, *, dtype: torch.dtype
) -> Tensor:
    """The denominator of `reduce_positions`: `num_items_in_batch`, or the count of `mask`, >= 1.

    Shared with the chunked path so both normalise identically.
    """
    if num_items_in_batch is None:
        return mask.sum().clamp_min(1).to(dtype)
    if isinstance(num_items_in_batch, Tensor):
        return num_items_in_batch.to(device=mask.device, dtype=dtype).clamp_min(1)
    return torch.tensor(max(float(num_items_in_batch), 1.0), dtype=dtype, device=mask.device)
