"""Hard-label cross-entropy: the supervised fine-tuning baseline (not a distillation term)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses._common import LOG_ZERO
from kdlab.losses.base import register_loss
from kdlab.losses.reduce import IGNORE_INDEX


@register_loss(
    "ce",
    paper="— (supervised fine-tuning baseline)",
    needs_labels=True,
    needs_teacher=False,
    sparse_refusal=None,
    sampled_teacher_ok=True,
)
def ce(
    student_logits: Tensor,
    teacher_logits: Tensor | None = None,
    labels: Tensor | None = None,
) -> Tensor:
    """Cross-entropy of the ground-truth next token per position: `−log q_y`.

    No paper: the SFT baseline, usually combined with a KD term through `WeightedSum`. The
    teacher is ignored (it may be `None`). Positions labelled `-100` get 0 (the reduction drops
    them). A ground-truth token that the student masks with `-inf` gives a huge but finite value
    (`−LOG_ZERO`) and no gradient. Computed by PyTorch's fused `cross_entropy` (one pass over the
    logits each way; the clamped log-softmax of the other losses would copy them).

    Args:
        student_logits: `[..., V]`.
        teacher_logits: ignored.
        labels: `[...]` int64 ground-truth tokens; `-100` marks positions that do not count.

    Returns:
        `[...]` float32 per-position values.
    """
    if labels is None:
        raise ValueError("loss 'ce' needs labels (the ground-truth next tokens)")
    z = student_logits.float()
    flat = z.reshape(-1, z.shape[-1])  # [N, V]
    value = F.cross_entropy(flat, labels.reshape(-1), reduction="none", ignore_index=IGNORE_INDEX)
    index = labels.masked_fill(labels == IGNORE_INDEX, 0).clamp_min(0).unsqueeze(-1)
    masked = z.gather(-1, index).squeeze(-1) == float("-inf")  # the target cannot be produced
    return torch.where(masked, -LOG_ZERO, value.view(labels.shape))
