"""Skew reverse KL divergence (DistiLLM): reverse KL against a teacher-heavy mixture."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import (
    check_skew,
    kl_sum,
    log_mixture,
    log_probs,
    teacher_log_probs,
)
from kdlab.losses.base import register_loss


@register_loss(
    "srkl",
    paper="DistiLLM: Towards Streamlined Distillation for Large Language Models (Ko et al., 2024)",
    sparse_refusal=None,
)
def srkl(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
) -> Tensor:
    """Skew reverse KL per position: `KL(q ‖ (1−α) p + α q)`.

    Paper: "DistiLLM: Towards Streamlined Distillation for Large Language Models" (Ko et al.,
    2024). Official code: jongwooko/distillm `distillm/losses.py` (`skewed_reverse_kl`,
    `lam=0.1`), which returns this same divergence. `p = softmax(z_t)`, `q = softmax(z_s)` (no
    temperature, as in the official code); the gradient flows through both `q` and the mixture.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused.
        alpha: skew α in [0, 1); α=0 is plain reverse KL (α=1 would make the loss 0).

    Returns:
        `[...]` float32 per-position values.
    """
    check_skew(alpha)
    log_p = teacher_log_probs(teacher_logits, 1.0, "srkl")
    log_q = log_probs(student_logits)
    if alpha == 0.0:
        return kl_sum(log_q, log_p)
    return kl_sum(log_q, log_mixture(log_q, log_p, alpha))
