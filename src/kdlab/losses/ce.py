"""Hard-label cross-entropy: the supervised fine-tuning baseline (not a distillation term)."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import log_probs
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
    teacher is ignored (it may be `None`). Positions labelled `-100` get the finite value at token
    0 (the reduction drops them). A ground-truth token that the student masks with `-inf` gives a
    huge but finite value (`−LOG_ZERO`) and no gradient.

    Args:
        student_logits: `[..., V]`.
        teacher_logits: ignored.
        labels: `[...]` int64 ground-truth tokens; `-100` marks positions that do not count.

    Returns:
        `[...]` float32 per-position values.
    """
    if labels is None:
        raise ValueError("loss 'ce' needs labels (the ground-truth next tokens)")
    index = labels.masked_fill(labels == IGNORE_INDEX, 0).clamp_min(0).unsqueeze(-1)
    return -log_probs(student_logits).gather(-1, index).squeeze(-1)
