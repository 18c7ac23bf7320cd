"""Reverse KL: the mode-seeking divergence used by MiniLLM and GKD."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import check_temperature, kl_sum, log_probs, teacher_log_probs
from kdlab.losses.base import register_loss


@register_loss(
    "rkl",
    paper="MiniLLM: Knowledge Distillation of Large Language Models (Gu et al., 2024)",
    sparse_refusal=None,
)
def rkl(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Reverse KL divergence KL(q‖p) per position (mode-seeking: the student picks teacher modes).

    Papers: "MiniLLM: Knowledge Distillation of Large Language Models" (Gu et al., 2024);
    "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes" (GKD,
    Agarwal et al., 2024). Formula: `Σ_v q_v (log q_v − log p_v)`, `p = softmax(z_t/τ)`,
    `q = softmax(z_s/τ)`. Entries the teacher masks with `-inf` while the student gives them mass
    are left out (DistiLLM's convention; the true value there is +inf).

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused.
        temperature: τ > 0.

    Returns:
        `[...]` float32 per-position values.
    """
    check_temperature(temperature)
    log_p = teacher_log_probs(teacher_logits, temperature, "rkl")
    log_q = log_probs(student_logits, temperature)
    return kl_sum(log_q, log_p)
