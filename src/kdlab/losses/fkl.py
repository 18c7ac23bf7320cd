"""Forward KL: the classic soft-label distillation loss."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import check_temperature, kl_sum, log_probs, teacher_log_probs
from kdlab.losses.base import register_loss


@register_loss(
    "fkl",
    paper="Distilling the Knowledge in a Neural Network (Hinton et al., 2015)",
    sparse_refusal=None,
    sampled_teacher_ok=True,
)
def fkl(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Forward KL divergence KL(p‖q) per position (mean-seeking: the student covers the teacher).

    Paper: "Distilling the Knowledge in a Neural Network" (Hinton, Vinyals, Dean, 2015).
    Formula: `Σ_v p_v (log p_v − log q_v)` with `p = softmax(z_t/τ)`, `q = softmax(z_s/τ)`.
    No τ² factor (as TRL and DistiLLM for language models). Vocabulary entries that the student
    masks with `-inf` while the teacher gives them mass are left out (DistiLLM's convention).

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused (accepted for the common signature).
        temperature: τ > 0.

    Returns:
        `[...]` float32 per-position values.
    """
    check_temperature(temperature)
    log_p = teacher_log_probs(teacher_logits, temperature, "fkl")
    log_q = log_probs(student_logits, temperature)
    return kl_sum(log_p, log_q)
