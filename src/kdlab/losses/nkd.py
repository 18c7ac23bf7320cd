"""Normalized KD (NKD): the teacher's target probability as a soft label, plus non-target KL.

Paper: "From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with
Normalized Loss and Customized Soft Labels" (Zhendong Yang, Ailing Zeng, Zhe Li, Tianke Zhang,
Chun Yuan, Yu Li; ICCV 2023). Official code: yzd-v/cls_KD, `mmcls/distillation/losses/nkd.py`
(`NKDLoss`; also `mmcls/models/dis_losses/nkd.py`), defaults `temp=1.0`, `gamma=1.5`.
"""

from __future__ import annotations

from torch import Tensor

from kdlab.losses._common import check_temperature, kl_sum, target_split
from kdlab.losses.base import register_loss


@register_loss(
    "nkd",
    paper="From Knowledge Distillation to Self-Knowledge Distillation: A Unified Approach with "
    "Normalized Loss and Customized Soft Labels (Yang et al., ICCV 2023)",
    needs_labels=True,
    sparse_refusal=None,
)
def nkd(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    gamma: float = 1.5,
    temperature: float = 1.0,
) -> Tensor:
    """Normalized KD per position: `−p_y·log q_y + γ·τ²·KL(p̂_τ ‖ q̂_τ)`.

    Paper: Yang et al., ICCV 2023 ("From Knowledge Distillation to Self-Knowledge Distillation:
    A Unified Approach with Normalized Loss and Customized Soft Labels"); official code
    yzd-v/cls_KD `mmcls/distillation/losses/nkd.py`. The target part uses τ = 1 always:
    `p_y = softmax(z_t)_y` (detached) weights the student's log-probability of the ground truth.
    The non-target part compares the renormalised distributions over the tokens ≠ y,
    `p̂_τ = softmax(z_t,≠y / τ)` and `q̂_τ = softmax(z_s,≠y / τ)`, scaled by γ·τ².

    Differences from the official code: it returns the cross-entropy form
    `−γτ² Σ_{v≠y} p̂_τ log q̂_τ` for the non-target part; kdlab returns the divergence
    `γτ²·KL(p̂_τ ‖ q̂_τ)`, which has the same gradient and is smaller by `γτ²·H(p̂_τ)`. The target
    part `−p_y log q_y` has no divergence form and stays, so the value at identical inputs is
    `−p_y log p_y` per position, not 0. Official reduction: mean over the batch; kdlab: mean over
    counted positions. The official code also accepts soft (one-hot/mixup) labels through an
    argmax; kdlab takes token ids. One stored revision of the official file builds the
    non-target mask with `scatter_(1, label, 1)`, which keeps y among the "non-target" classes;
    kdlab follows the paper and the other revisions (`scatter_(1, label, 0)`): y is left out.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: `[...]` int64 ground-truth tokens; `-100` marks positions that do not count.
        gamma: weight γ ≥ 0 of the non-target part.
        temperature: τ > 0 of the non-target part.

    Returns:
        `[...]` float32 per-position values.
    """
    if not gamma >= 0:
        raise ValueError(f"gamma must be >= 0, got {gamma!r}")
    check_temperature(temperature)
    if labels is None:
        raise ValueError("loss 'nkd' needs labels (the ground-truth next tokens)")
    if teacher_logits is None:
        raise ValueError("loss 'nkd' needs teacher logits; got teacher_logits=None")
    p = target_split(teacher_logits.detach(), labels)  # τ = 1 for the target part
    q = target_split(student_logits, labels)
    loss_target = -p.log_target.exp() * q.log_target  # [...]
    if temperature != 1.0:
        p = target_split(teacher_logits.detach(), labels, temperature)
        q = target_split(student_logits, labels, temperature)
    loss_non = gamma * temperature**2 * kl_sum(p.log_non_target, q.log_non_target)  # [...]
    return loss_target + loss_non
