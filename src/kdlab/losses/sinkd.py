"""SinKD: Sinkhorn distance between the student's and the teacher's distributions, batch-wise.

Paper: "Sinkhorn Distance Minimization for Knowledge Distillation" (Cui, Qin, Gao, Zhang, Xu, Wu,
Li, Sun, Zhou, Li; LREC-COLING 2024, arXiv 2402.17110). Official code: 2018cx/SinKD, `loss.py`,
class `Sinkhorn` (`sinkhorn_normalized`, `sinkhorn_loss`, `forward`).

Unlike a token-level divergence, SinKD compares the two models across positions: the rows of the
cost matrix are the student's distributions at the positions of a batch, its columns the teacher's,
and an entropic transport plan between the two sets weights the costs. kdlab bounds the O(N²·V)
cost by solving the transport problem within consecutive sub-batches (`group_size`) of the counted
positions (`coupling = "group"`).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from kdlab.losses._common import check_temperature
from kdlab.losses.base import LOSSES, KDLoss

PAPER = "Sinkhorn Distance Minimization for Knowledge Distillation (Cui et al., 2024)"


def sinkd(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    temperature: float = 2.0,
    epsilon: float = 0.1,
    iters: int = 20,
    weight: float = 0.001,
    group_size: int = 64,
) -> Tensor:
    """SinKD per position for `[M, V]` rows that all count, transport solved per group of rows.

    Paper: "Sinkhorn Distance Minimization for Knowledge Distillation" (Cui et al., 2024); official
    code 2018cx/SinKD `loss.py`, class `Sinkhorn`. For one group of G rows (the official code's
    batch), with `p_s = softmax(z_s/τ)` and `p_t = softmax(z_t/τ)` (τ on both models):

        W_ij = ‖p_s,i − p_t,j‖₁                       # [G, G]: student row i, teacher row j
        K    = exp(−W / ε)
        P    = `iters` × (rows of K normalised to sum 1, then columns to sum 1)
        official value = weight · Σ_ij P_ij W_ij      # a sum over the group, not a mean

    Nothing is detached: the gradient flows through P and W, as in the official code. After the
    last (column) normalisation every column of P sums to 1, so the official value is the sum of
    the G column costs `c_j = Σ_i P_ij W_ij`. kdlab returns `weight · G · c_j` at teacher position
    j, so that the mean over a group's positions is the official value for that group; over several
    groups (the last one may be shorter, of size G' < G, and then sums G' columns), the mean over
    all counted positions is the size-weighted mean of the groups' official values.

    Differences from the official code (values are otherwise the same):
    * the normalisation runs in the log domain (`log P −= logsumexp` over rows, then columns),
      which equals the official `x / x.sum()` steps in exact arithmetic but cannot underflow: with
      ε = 0.1, `exp(−W/ε) ≥ exp(−20)` is fine in float32, but for ε ≲ 0.01 the official kernel
      underflows to rows of zeros and its normalisation returns NaN;
    * the official code runs the transport over the whole batch of N sequences (classification:
      one row per example); kdlab, where rows are LM positions, solves it per group of
      `group_size` consecutive counted positions (a hyperparameter the paper does not have);
    * the official `forward` hard-codes τ = 2 (`self.T = 2`) whatever is passed; kdlab exposes it.

    Args:
        student_logits: `[M, V]`; gradient flows here.
        teacher_logits: `[M, V]`; detached.
        labels: unused (the base class has already dropped the uncounted rows).
        temperature: τ > 0, applied to both models.
        epsilon: entropic regularisation ε > 0.
        iters: Sinkhorn rounds (each = row then column normalisation), >= 1.
        weight: the official loss scale (0.001).
        group_size: rows per transport problem, >= 1.

    Returns:
        `[M]` float32 per-position values.
    """
    check_sinkd_hparams(temperature, epsilon, iters, weight, group_size)
    if teacher_logits is None:
        raise ValueError("loss 'sinkd' needs teacher logits; got teacher_logits=None")
    p_s = torch.softmax(student_logits.float() / temperature, dim=-1)  # [M, V]
    p_t = torch.softmax(teacher_logits.detach().float() / temperature, dim=-1)  # [M, V]
    if p_s.shape[0] == 0:  # no counted row: an empty result that stays on the autograd graph
        return p_s.sum(-1)
    groups = zip(p_s.split(group_size), p_t.split(group_size), strict=True)
    return weight * torch.cat([_column_costs(s, t, epsilon, iters) for s, t in groups])


def _column_costs(p_s: Tensor, p_t: Tensor, epsilon: float, iters: int) -> Tensor:
    """`G · Σ_i P_ij W_ij` for each teacher row j of one group: `[G]` from `[G, V]` rows."""
    cost = torch.cdist(p_s, p_t, p=1)  # [G, G] L1 distances, no [G, G, V] intermediate
    plan = _sinkhorn_plan(cost, epsilon, iters)  # [G, G], columns sum to 1
    return cost.shape[0] * (plan * cost).sum(dim=0)


def _sinkhorn_plan(cost: Tensor, epsilon: float, iters: int) -> Tensor:
    """The official alternating row/column normalisation of `exp(−cost/ε)`, in the log domain."""
    log_plan = -cost / epsilon  # [G, G]
    for _ in range(iters):
        log_plan = log_plan - torch.logsumexp(log_plan, dim=1, keepdim=True)  # rows sum to 1
        log_plan = log_plan - torch.logsumexp(log_plan, dim=0, keepdim=True)  # columns sum to 1
    return log_plan.exp()


def check_sinkd_hparams(
    temperature: float, epsilon: float, iters: int, weight: float, group_size: int
) -> None:
    check_temperature(temperature)
    if not (epsilon > 0 and math.isfinite(epsilon)):
        raise ValueError(f"epsilon must be a finite number > 0, got {epsilon!r}")
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 1:
        raise ValueError(f"iters must be an integer >= 1, got {iters!r}")
    if not (weight >= 0 and math.isfinite(weight)):
        raise ValueError(f"weight must be a finite number >= 0, got {weight!r}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be an integer >= 1, got {group_size!r}")


class SinKDLoss(KDLoss):
    """SinKD: Sinkhorn transport cost between student and teacher distributions across positions.

    See `sinkd` for the formula, the per-position attribution and the differences from the
    official code. Positions are coupled in groups of `group_size` consecutive counted positions.
    """

    name = "sinkd"
    paper = PAPER
    sparse_refusal = (
        "its transport plan compares positions along one shared vocabulary axis"
        ", and each position's buckets hold different tokens"
    )
    coupling = "group"
    defaults = {"temperature": 2.0, "epsilon": 0.1, "iters": 20, "weight": 0.001, "group_size": 64}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        check_sinkd_hparams(**self.hparams)

    @property
    def group_size(self) -> int:
        return self.hparams["group_size"]

    def per_position_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        return {self.name: sinkd(student_logits, teacher_logits, labels, **self.hparams)}


LOSSES.add("sinkd", SinKDLoss)
