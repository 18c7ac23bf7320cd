"""Generalised Jensen-Shannon divergence, exactly as TRL's GKD trainer defines it."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import (
    check_temperature,
    check_unit_interval,
    kl_sum,
    log_mixture,
    log_probs,
    teacher_log_probs,
)
from kdlab.losses.base import register_loss


@register_loss(
    "jsd",
    paper="On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes "
    "(GKD, Agarwal et al., 2024)",
    sparse_refusal=None,
)
def jsd(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
) -> Tensor:
    """Generalised JSD per position: `β·KL(p‖m) + (1−β)·KL(q‖m)`, `m = β p + (1−β) q`.

    Paper: "On-Policy Distillation of Language Models: Learning from Self-Generated Mistakes"
    (GKD, Agarwal et al., 2024), Eq. 1. Reference code: TRL's `GKDTrainer.generalized_jsd_loss`
    (huggingface/trl, `trl/experimental/gkd/gkd_trainer.py`), which kdlab matches including its
    endpoints: `beta=0` is exactly KL(p‖q) (forward KL) and `beta=1` exactly KL(q‖p) (reverse
    KL) — not the continuous limit of the formula, which is 0 at both ends.
    `p = softmax(z_t/τ)`, `q = softmax(z_s/τ)`; the gradient flows through `m`.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused.
        beta: mixture weight of the teacher, in [0, 1].
        temperature: τ > 0.

    Returns:
        `[...]` float32 per-position values.
    """
    check_unit_interval("beta", beta)
    check_temperature(temperature)
    log_p = teacher_log_probs(teacher_logits, temperature, "jsd")
    log_q = log_probs(student_logits, temperature)
    if beta == 0.0:
        return kl_sum(log_p, log_q)
    if beta == 1.0:
        return kl_sum(log_q, log_p)
    log_m = log_mixture(log_p, log_q, beta)
    return beta * kl_sum(log_p, log_m) + (1.0 - beta) * kl_sum(log_q, log_m)
