"""Plackett-Luce Distillation (PLD): a teacher-weighted list-wise ranking loss."""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses._common import check_temperature, teacher_log_probs
from kdlab.losses.base import register_loss
from kdlab.losses.reduce import IGNORE_INDEX

_FLOOR = -1e30  # stands in for a student's -inf logit: exp() of it is exactly 0 in float32


@register_loss(
    "pld",
    paper="PLD: A Choice-Theoretic List-Wise Knowledge Distillation (Bassam, Zhu, Bian, 2025)",
    needs_labels=True,
    sparse_refusal="it ranks the whole vocabulary by the teacher's logits, which a top-k cache "
    "does not hold",
)
def pld(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    *,
    temperature: float = 1.0,
) -> Tensor:
    """Plackett-Luce NLL of the teacher-optimal ranking, each step weighted by the teacher.

    Paper: "PLD: A Choice-Theoretic List-Wise Knowledge Distillation" (Ejafa Bassam, Dawei Zhu,
    Kaigui Bian; arXiv 2506.12542, 2025), Sec. 4 and the reference code in its Appendix C
    (`create_adjusted_ranking`, `plackett_luce_loss`). No public repository is known.

    The ranking π puts the ground-truth token y first, then every other token by descending
    teacher logit. With α = softmax(z_t/τ) read in the order of π (α_k is the teacher's
    probability of the token π_k):

        L = Σ_k α_k [ logsumexp_{l ≥ k} z_s[π_l] − z_s[π_k] ]

    τ softens the teacher's weights only; the student's logits are used as they are. There is no
    separate cross-entropy term: the first step is the cross-entropy on y, weighted by p_y. The
    loss is a negative log-likelihood, so it is not 0 when the student equals the teacher; it is
    ≥ 0 and tends to 0 as the student orders its logits as π with growing margins. It is
    invariant to adding a constant to either model's logits.

    Computation, O(V log V) time and O(V) memory per position: one stable sort of the teacher's
    logits (with y's key raised to +inf) in *ascending* order, so π is read from the end; the
    suffix log-sum-exps of the paper are then a forward `torch.logcumsumexp` (the flipped view
    of the reverse cumulative sum, as in the Appendix C code). The sort over V and the
    `logcumsumexp` (its backward above all) dominate the cost (docs/losses/pld.md).

    Choices the paper leaves open, and differences from its code:
    * τ = 1.0 by default: the paper uses τ = 4 on CIFAR-100 and finds τ = 1 best on ImageNet
      (its Table 6); kdlab is for language models, whose teachers are not softened by default.
    * Ties between teacher logits are broken by vocabulary index (a stable sort; the higher index
      is ranked first), so the value is deterministic; the paper's code uses an unstable sort.
    * A token the student masks with `-inf` would make the likelihood 0 (loss +inf); its own
      step is left out (as kdlab's KL losses leave such entries out) and it adds nothing to the
      other steps' log-sum-exps. Positions with label -100 are computed with y = 0 and then not
      counted.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: `[...]` int64 ground-truth next tokens; -100 marks positions that do not count.
        temperature: τ > 0 of the teacher's weights (4.0 for CIFAR-like classification).

    Returns:
        `[...]` float32 per-position values.
    """
    check_temperature(temperature)
    if labels is None:
        raise ValueError("loss 'pld' needs labels (the ground-truth next tokens)")
    weights = teacher_log_probs(teacher_logits, temperature, "pld").exp()  # [..., V]
    order = teacher_optimal_order(teacher_logits.detach(), labels)  # [..., V], π reversed
    student = student_logits.float()
    finite = torch.isfinite(student)  # [..., V]
    s = torch.where(finite, student, _FLOOR).gather(-1, order)  # [..., V], π_V … π_1
    suffix_lse = torch.logcumsumexp(s, dim=-1)  # logsumexp over the token and all ranked after it
    steps = weights.gather(-1, order) * (suffix_lse - s)
    return torch.where(finite.gather(-1, order), steps, 0.0).sum(-1)


def teacher_optimal_order(teacher_logits: Tensor, labels: Tensor) -> Tensor:
    """π reversed: token indices `[..., V]` by ascending teacher logit, the label last.

    Args:
        teacher_logits: `[..., V]`.
        labels: `[...]`; -100 is read as token 0 (such positions are not counted).
    """
    safe = torch.where(labels == IGNORE_INDEX, torch.zeros_like(labels), labels)
    key = teacher_logits.float().scatter(-1, safe.unsqueeze(-1), torch.inf)  # [..., V]
    return key.argsort(dim=-1, stable=True)
