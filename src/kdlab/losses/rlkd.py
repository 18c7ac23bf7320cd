"""RLKD: a differentiable top-k rank-correlation term added to a token-level divergence.

Paper: "Enhancing Knowledge Distillation of Large Language Models through Efficient Multi-Modal
Distribution Alignment" (Tianyu Peng, Jiajun Zhang; arXiv 2409.12545, COLING 2025). Official
code: Pty72/RLKD, `sft/kd_sft.py` and `pretrain/kd_pretrain.py` (`topk_spearman_loss`,
`distill_loss`).

The rank term is a Spearman correlation made differentiable with soft ranks: Blondel et al.,
"Fast Differentiable Sorting and Ranking" (ICML 2020), l2 regularisation, which the official
code takes from the `torchsort` package. kdlab computes the same soft ranks in plain PyTorch
(`soft_rank` below), with no compiled extension.
"""

from __future__ import annotations

import torch
from torch import Tensor

from kdlab.losses.base import LOSSES, register_loss

BASES = ("fkl", "rkl", "jsd", "tvd")
_FLOOR = 1e9  # soft-rank inputs more than this below the row's top are treated as -inf


@register_loss(
    "rlkd",
    paper="Enhancing Knowledge Distillation of Large Language Models through Efficient "
    "Multi-Modal Distribution Alignment (RLKD, Peng and Zhang, COLING 2025)",
    sparse_refusal=None,
)
def rlkd(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    k: int = 5,
    base: str = "fkl",
    magnification: float = 2.0,
    regularization_strength: float = 1.0,
) -> Tensor:
    """Ranking loss + divergence per position: `(1 − ρ) + base(p, q) / magnification`.

    Per position, the indices are the union of the teacher's and the student's top-k logits;
    ρ is the Pearson correlation of the *soft ranks* (Blondel et al. 2020, l2, strength
    `regularization_strength`) of the teacher's and the student's **logits** at those indices,
    i.e. a differentiable Spearman correlation; `base` is one of kdlab's registered divergences
    (`fkl`, `rkl`, `jsd`, `tvd`, each at its defaults, τ = 1). The mean over counted positions is
    the official `(1 − mean ρ) + mean(base) / magnification`.

    Official code: Pty72/RLKD `sft/kd_sft.py` (`topk_spearman_loss`, `distill_loss`; k = 5 there,
    15 in `pretrain/kd_pretrain.py` for pre-training data; `ranking_loss_magnification` = 2).
    The official `distill_obj` names `kl`, `rkl`, `js`, `tvd` are kdlab's `fkl`, `rkl`, `jsd`
    (β = 0.5, as the official 0.5/0.5 mixture), `tvd`.

    Differences from the official code:
    * Union: the official code calls `torch.unique(cat(top_t, top_s), dim=-1)` on the whole
      `[positions, 2k]` batch, which removes only index *columns* equal in every row: with one
      position this is the exact union, with several a token in both top-k lists usually stays
      twice in its row (and ranks twice). kdlab takes the union per position exactly (between k
      and 2k entries), with masks, so a duplicate never counts twice.
    * A position whose soft ranks are all equal (all its union logits tie) has no defined
      correlation: the official code gets NaN and then drops the rank term for the whole batch
      (`if torch.isnan(rank_loss)`); kdlab drops it (rank term 0) at that position only.
    * The base divergences are kdlab's (log-softmax clamped, no `+1e-10` inside the logs).
    * `-inf` logits (masked vocabulary) are ranked last, tied with each other, and get no
      gradient; the official soft rank would give NaN there.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: unused (accepted for the common signature).
        k: top-k of each model, >= 1 (`ranking_range` in the official code).
        base: the divergence added to the rank term: `fkl`, `rkl`, `jsd` or `tvd`.
        magnification: > 0; the divergence is divided by it (`ranking_loss_magnification`).
        regularization_strength: > 0; the soft rank's l2 strength (torchsort's
            `regularization_strength`, 1.0 in the official call); small values give hard ranks.

    Returns:
        `[...]` float32 per-position values.
    """
    divergence = _check_hparams(k, base, magnification, regularization_strength)
    if teacher_logits is None:
        raise ValueError("loss 'rlkd' needs teacher logits; got teacher_logits=None")
    teacher = teacher_logits.detach()
    rank_term = topk_rank_term(student_logits, teacher, k, regularization_strength)
    return rank_term + divergence(student_logits, teacher, labels) / magnification


def _check_hparams(k: int, base: str, magnification: float, strength: float):  # noqa: ANN202
    """Validate the hyperparameters; return the base divergence's per-position function."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if base not in BASES:
        raise ValueError(f"base must be one of {', '.join(BASES)}, got {base!r}")
    if not magnification > 0:
        raise ValueError(f"magnification must be > 0, got {magnification!r}")
    if not strength > 0:
        raise ValueError(f"regularization_strength must be > 0, got {strength!r}")
    return LOSSES.get(base).function


def topk_rank_term(student: Tensor, teacher: Tensor, k: int, strength: float) -> Tensor:
    """`1 − ρ` per position (0 where ρ is undefined), float32 `[...]`, from `[..., V]` logits."""
    index, valid = union_topk(student.detach(), teacher, k)  # [..., n], n = 2·min(k, V)
    # float64: the isotonic solver's interval sums stay exact even with -inf floored to -1e9
    s_rank = soft_rank(student.double().gather(-1, index), valid, regularization_strength=strength)
    t_rank = soft_rank(teacher.double().gather(-1, index), valid, regularization_strength=strength)
    rho, defined = masked_pearson(s_rank, t_rank, valid)
    return torch.where(defined, 1.0 - rho, torch.zeros_like(rho)).float()


def union_topk(student: Tensor, teacher: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Per position, the union of both models' top-k indices.

    Returns:
        `index` `[..., 2k']` (k' = min(k, V)), sorted, with duplicates still in place, and
        `valid` `[..., 2k']` bool, True on the first copy of each index: `valid.sum(-1)` is the
        union's size, between k' and 2k'.
    """
    k = min(k, student.shape[-1])
    both = torch.cat([teacher.topk(k, dim=-1).indices, student.topk(k, dim=-1).indices], -1)
    index = both.sort(dim=-1).values
    valid = torch.ones_like(index, dtype=torch.bool)
    valid[..., 1:] = index[..., 1:] != index[..., :-1]
    return index, valid


def soft_rank(
    values: Tensor, valid: Tensor | None = None, *, regularization_strength: float = 1.0
) -> Tensor:
    """Differentiable ranks (1 = smallest) of the valid entries of each row, l2-regularised.

    Blondel et al. 2020, "Fast Differentiable Sorting and Ranking": the projection of
    `values / strength` onto the permutahedron of `(n, n−1, …, 1)`, with n the row's number of
    valid entries. Sort θ descending (`s`), solve the decreasing isotonic regression of
    `s − w`, take `s − solution` and undo the sort. This is `torchsort.soft_rank(values,
    regularization="l2", regularization_strength=strength)` on the valid entries. As the strength
    goes to 0 it tends to the hard rank; it is invariant to adding a constant to a row.

    Args:
        values: `[..., n]` in any floating dtype (rlkd passes float64); `-inf` entries are
            ranked last (tied) and get no gradient.
        valid: `[..., n]` bool; the entries to rank (others are ignored and returned as 0).
        regularization_strength: > 0.

    Returns:
        `[..., n]` soft ranks, in the dtype of `values`; 0 at invalid entries.
    """
    if valid is None:
        valid = torch.ones_like(values, dtype=torch.bool)
    theta = _shifted(values / regularization_strength, valid)  # [..., n], max 0, >= -_FLOOR
    key = torch.where(valid, theta, torch.full_like(theta, -torch.inf))
    order = key.argsort(dim=-1, descending=True, stable=True)  # valid entries first
    s = theta.gather(-1, order)  # [..., n], descending on the valid prefix
    n_valid = valid.sum(-1, keepdim=True)  # [..., 1]
    position = torch.arange(values.shape[-1], device=values.device)
    w = (n_valid - position).to(values.dtype)  # (n_v, n_v−1, …, 1, then unused)
    primal = s - _isotonic_decreasing(s - w, n_valid)
    ranks = torch.zeros_like(primal).scatter(-1, order, primal)  # undo the sort
    return torch.where(valid, ranks, torch.zeros_like(ranks))


def _shifted(theta: Tensor, valid: Tensor) -> Tensor:
    """`theta` minus its row's (detached) finite maximum, floored at `-_FLOOR` (so -inf is too)."""
    finite = valid & torch.isfinite(theta)
    top = torch.where(finite, theta, torch.full_like(theta, -torch.inf)).amax(-1, keepdim=True)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top)).detach()
    return (theta - top).clamp_min(-_FLOOR)


def _isotonic_decreasing(y: Tensor, n_valid: Tensor) -> Tensor:
    """`argmin_x ‖x − y‖²` s.t. `x_1 ≥ … ≥ x_m` over each row's first m = `n_valid` entries.

    Closed form for small n: `x_i = min_{j ≤ i} max_{l ≥ i} mean(y_j..y_l)` (l < m), from
    `[..., n, n]` interval means. Autograd through the chosen interval gives the Jacobian of
    the pool-adjacent-violators solution (block averages). Entries from m on are returned as 0.
    """
    n = y.shape[-1]
    cum = torch.cat([torch.zeros_like(y[..., :1]), y.cumsum(-1)], -1)  # [..., n+1]
    sums = cum[..., None, 1:] - cum[..., :-1, None]  # [..., j, l] = y_j + … + y_l
    j = torch.arange(n, device=y.device)[:, None]
    l = torch.arange(n, device=y.device)[None, :]  # noqa: E741
    means = sums / (l - j + 1).clamp_min(1).to(y.dtype)
    usable = (l >= j) & (l < n_valid[..., None])  # [..., n, n]
    means = torch.where(usable, means, torch.full_like(means, -torch.inf))
    upper = means.flip(-1).cummax(-1).values.flip(-1)  # [..., j, i] = max_{l ≥ i} means[j, l]
    upper = torch.where(j <= l, upper, torch.full_like(upper, torch.inf))  # keep j ≤ i
    x = upper.amin(-2)  # [..., n]
    inside = torch.arange(n, device=y.device) < n_valid
    return torch.where(inside, x, torch.zeros_like(x))


def masked_pearson(a: Tensor, b: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    """Pearson correlation of `a` and `b` `[..., n]` over the valid entries of each row.

    Returns:
        `rho` `[...]` and `defined` `[...]` bool (False where either row is constant; rho is 0
        there, with zero gradient).
    """
    m = valid.to(a.dtype)
    count = m.sum(-1, keepdim=True).clamp_min(1)
    a = (a - (a * m).sum(-1, keepdim=True) / count) * m
    b = (b - (b * m).sum(-1, keepdim=True) / count) * m
    norms = (a * a).sum(-1) * (b * b).sum(-1)
    defined = norms > torch.finfo(norms.dtype).tiny
    safe = torch.where(defined, norms, torch.ones_like(norms))
    rho = (a * b).sum(-1) / safe.sqrt()
    return torch.where(defined, rho, torch.zeros_like(rho)), defined
