"""Skew KL divergence (DistiLLM): forward KL against a student-skewed mixture."""

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
    "skl",
    paper="DistiLLM: Towards Streamlined Distillation for Large Language Models (Ko et al., 2024)",
    sparse_refusal=None,
)
def skl(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    alpha: float = 0.1,
) -> Tensor:
    """Skew forward KL per position: `KL(p ‖ α p + (1−α) q)`.

    Paper: "DistiLLM: Towards Streamlined Distillation for Large Language Models" (Ko et al.,
    2024). Official code: jongwooko/distillm `distillm/losses.py` (`skewed_forward_kl`, `lam=0.1`).
    `p = softmax(z_t)`, `q = softmax(z_s)` (no temperature, as in the official code). The gradient
    flows through the mixture (it is not detached). The official code returns the cross-entropy
    form `−Σ p log(α p + (1−α) q)`; kdlab returns the divergence, which has the same gradient and
    differs by the teacher entropy H(p), so it is 0 when the student equals the teacher.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused.
        alpha: skew α in [0, 1); α=0 is plain forward KL (α=1 would make the loss 0).

    Returns:
        `[...]` float32 per-position values.
    """
    check_skew(alpha)
    log_p = teacher_log_probs(teacher_logits, 1.0, "skl")
    log_q = log_probs(student_logits)
    if alpha == 0.0:
        return kl_sum(log_p, log_q)
    return kl_sum(log_p, log_mixture(log_p, log_q, alpha))
