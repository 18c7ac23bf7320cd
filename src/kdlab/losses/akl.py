"""Adaptive KL (AKL): forward and reverse KL weighted by where the student's error lies."""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses._common import check_unit_interval, kl_sum, log_probs, teacher_log_probs
from kdlab.losses.base import register_loss


@register_loss(
    "akl",
    paper="Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language "
    "Models (Wu et al., 2024)",
    sparse_refusal=None,
)
def akl(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    mu: float = 0.5,
) -> Tensor:
    """Adaptive KL per position: `g_h/(g_h+g_t)·KL(p‖q) + g_t/(g_h+g_t)·KL(q‖p)`.

    Paper: "Rethinking Kullback-Leibler Divergence in Knowledge Distillation for Large Language
    Models" (Wu et al., 2024); official code: wutaiqiang/LLM_KD_AKL `AKL.py`.
    Per position, sort the teacher's probabilities `p` in descending order. The *head* is the
    tokens whose inclusive cumulative teacher mass is ≤ μ, plus the top-1 token always; the *tail*
    is the rest. `g_h = Σ_head |p − q|` and `g_t = Σ_tail |p − q|`, with `q` detached (the weights
    carry no gradient). Forward KL fits the head, reverse KL the tail, so the larger gap gets the
    larger weight. Where `g_h + g_t = 0` (student equals teacher) the weights are ½ and ½.

    Differences from the official code: it replaces `-inf` logits by 0 before the softmax that
    computes the weights (giving masked entries probability mass); kdlab keeps them at probability
    0. It divides by `g_h + g_t` unguarded (NaN at equality); kdlab guards it as said above.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused.
        mu: head mass threshold μ in [0, 1].

    Returns:
        `[...]` float32 per-position values.
    """
    check_unit_interval("mu", mu)
    log_p = teacher_log_probs(teacher_logits, 1.0, "akl")
    log_q = log_probs(student_logits)
    w_head, w_tail = _head_tail_weights(log_p, log_q.detach(), mu)
    return w_head * kl_sum(log_p, log_q) + w_tail * kl_sum(log_q, log_p)


@torch.no_grad()
def _head_tail_weights(log_p: Tensor, log_q: Tensor, mu: float) -> tuple[Tensor, Tensor]:
    """`(g_h/(g_h+g_t), g_t/(g_h+g_t))`, each `[...]`, from `[..., V]` log-probabilities."""
    p_sorted, order = log_p.exp().sort(dim=-1, descending=True)  # [..., V]
    gap = (p_sorted - log_q.exp().gather(-1, order)).abs()  # [..., V], in the sorted order
    head = p_sorted.cumsum(-1) <= mu
    head[..., 0] = True  # the top-1 token is always head
    g_head = torch.where(head, gap, torch.zeros_like(gap)).sum(-1)
    g_all = gap.sum(-1)
    w_head = torch.where(g_all > 0, g_head / g_all.clamp_min(torch.finfo(g_all.dtype).tiny), 0.5)
    return w_head, 1.0 - w_head
