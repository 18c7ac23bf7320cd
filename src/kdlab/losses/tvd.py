"""Total variation distance between the teacher's and the student's next-token distributions."""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import check_temperature, log_probs, teacher_log_probs
from kdlab.losses.base import register_loss


@register_loss(
    "tvd",
    paper="DistiLLM: Towards Streamlined Distillation for Large Language Models (Ko et al., 2024)",
    sparse_refusal=None,
)
def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Total variation distance per position: `½ Σ_v |p_v − q_v|`, a bounded metric in [0, 1].

    Paper: "DistiLLM: Towards Streamlined Distillation for Large Language Models" (Ko et al.,
    2024), which compares it as a baseline; official code: jongwooko/distillm
    `distillm/losses.py` (`tv_distance`). `p = softmax(z_t/τ)`, `q = softmax(z_s/τ)`.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused.
        temperature: τ > 0.

    Returns:
        `[...]` float32 per-position values.
    """
    check_temperature(temperature)
    p = teacher_log_probs(teacher_logits, temperature, "tvd").exp()
    q = log_probs(student_logits, temperature).exp()
    return 0.5 * (p - q).abs().sum(-1)
