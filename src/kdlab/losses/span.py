"""Span-level correlation consistency: the span loss of Multi-Granularity Semantic Revision.

Paper: "Multi-Granularity Semantic Revision for Large Language Model Distillation" (Xiaoyu Liu,
Yun Zhang, Wei Li, Simiao Li, Xudong Huang, Hanting Chen, Yehui Tang, Jie Hu, Zhiwei Xiong, Yunhe
Wang; 2024, arXiv 2407.10068). No official code is public. kdlab's formula follows the paper's
abstract and public reviews that describe its Eq. 10 (the full text could not be consulted), and
fills the gaps left open, each named below. The same paper's token-level DAC-KL loss (`dac_kl`)
and its SCRG regime are separate.

The paper splits a sequence into spans (phrases from an off-the-shelf chunker), takes the
element-wise (Hadamard) product of the probability vectors of each two adjacent positions inside a
span as their "probability correlation", and asks the student's correlations to equal the
teacher's under an L2 distance. Its overall objective is `L_SFT + L_DAC-KL + L_span`, all weights 1.

Formula (kdlab): with `p_t = softmax(z_t^T / τ)`, `q_t = softmax(z_t^S / τ)` (`[V]` each), a pair
`(t, t+1)` of adjacent positions counts when both positions are counted and lie in the same span;
its value sits at position `t`:

    d_t  = Σ_v (p_t[v]·p_{t+1}[v] − q_t[v]·q_{t+1}[v])²        (0 where (t, t+1) is no pair)
    loss = mean over counted positions t of  span_weight·d_t + kl_weight·KL(p_t‖q_t)

Where kdlab fills gaps or differs from the paper:

* Spans: the paper uses an external phrase/sentence chunker on the text (it cites Kiss & Strunk
  2006). kdlab needs no parser and no text: each contiguous run of counted positions is cut into
  consecutive spans of `span_length` tokens, starting at the run's first position (the last span
  of a run may be shorter). A `span_length` at least the sequence length makes every run one span.
* Distance: the paper says L2; kdlab uses the squared Euclidean distance summed over the
  vocabulary (smooth at 0, so the gradient is exactly 0 at the optimum).
* Normalisation: the paper does not say; kdlab divides the sum over pairs by the number of counted
  positions (as every kdlab loss), so `num_items_in_batch` and gradient accumulation work as usual.
* Token-level term: the paper pairs the span term with DAC-KL. A run config holds one KD loss, so
  `span` carries its own token-level forward KL (`kl_weight`, default 1 as in the paper's sum);
  `kl_weight=0` leaves the span term alone, e.g. to add it to `dac_kl` in a `WeightedSum`.
* Temperature: the paper gives none for this term; kdlab offers `temperature` (default 1, no τ²).

The product is element-wise, not an outer product: never `[V, V]`, memory O(b·T·V).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from kdlab.losses._common import check_temperature, kl_sum, log_probs, teacher_log_probs
from kdlab.losses.base import LOSSES, KDLoss
from kdlab.losses.reduce import counted_mask

PAPER = (
    "Multi-Granularity Semantic Revision for Large Language Model Distillation (Liu et al., 2024)"
)


def span_pairs(
    labels: Tensor | None, shape: torch.Size, device: torch.device, span_length: int
) -> Tensor:
    """Which adjacent pairs `(t, t+1)` count: both positions counted and in the same span.

    Spans: each contiguous run of counted positions is cut into consecutive pieces of
    `span_length` positions, starting at the run's first position.

    Args:
        labels: `[..., T]` int64, `-100` = not counted; `None`: every position counts.
        shape: the positions' shape `[..., T]` (used when `labels` is `None`).
        device: where to build the mask.
        span_length: positions per span (>= 2).

    Returns:
        `[..., T]` bool, True at `t` when `(t, t+1)` is a pair (always False at `t = T-1`).
    """
    mask = counted_mask(labels, shape, device)  # [..., T]
    idx = torch.arange(mask.shape[-1], device=device)  # [T]
    prev = torch.cat([torch.zeros_like(mask[..., :1]), mask[..., :-1]], dim=-1)
    run_start = torch.where(mask & ~prev, idx, 0).cummax(dim=-1).values  # [..., T]
    offset = idx - run_start  # position inside its run of counted positions
    same_span = offset[..., 1:] % span_length != 0  # t+1 does not open a new span
    pairs = mask[..., :-1] & mask[..., 1:] & same_span  # [..., T-1]
    return torch.cat([pairs, torch.zeros_like(mask[..., :1])], dim=-1)


def correlation_distance(log_p: Tensor, log_q: Tensor, pairs: Tensor) -> Tensor:
    """`Σ_v (p_t p_{t+1} − q_t q_{t+1})²` at each pair's first position `t`, else 0.

    Args:
        log_p, log_q: `[..., T, V]` float32 log-probabilities of teacher and student.
        pairs: `[..., T]` bool from `span_pairs`.

    Returns:
        `[..., T]` float32, finite everywhere.
    """
    p, q = log_p.exp(), log_q.exp()
    r_p = p[..., :-1, :] * p[..., 1:, :]  # [..., T-1, V] teacher correlations
    r_q = q[..., :-1, :] * q[..., 1:, :]  # [..., T-1, V] student correlations
    dist = (r_p - r_q).square().sum(-1)  # [..., T-1]
    dist = torch.cat([dist, dist.new_zeros(*dist.shape[:-1], 1)], dim=-1)[..., : pairs.shape[-1]]
    return torch.where(pairs, dist, torch.zeros_like(dist))


def span_correlation(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None = None,
    *,
    span_length: int = 4,
    temperature: float = 1.0,
) -> Tensor:
    """The span term alone, per position `[..., T]` (see the module docstring).

    Args:
        student_logits: `[..., T, V]`; gradient flows here.
        teacher_logits: `[..., T, V]`; detached.
        labels: `[..., T]`; `-100` positions belong to no pair.
        span_length: positions per span (>= 2).
        temperature: τ > 0.
    """
    _check(span_length=span_length, span_weight=1.0, kl_weight=0.0, temperature=temperature)
    log_p = teacher_log_probs(teacher_logits, temperature, "span")
    log_q = log_probs(student_logits, temperature)
    pairs = span_pairs(labels, student_logits.shape[:-1], student_logits.device, span_length)
    return correlation_distance(log_p, log_q, pairs)


class SpanLoss(KDLoss):
    """Span-level correlation consistency (+ token forward KL): Σ_v (p_t p_{t+1} − q_t q_{t+1})².

    Paper: "Multi-Granularity Semantic Revision for Large Language Model Distillation" (Liu et
    al., 2024; no official code). Within fixed-length spans of counted positions, the student's
    element-wise products of adjacent probability vectors match the teacher's (squared L2), plus
    `kl_weight`·KL(p‖q) per position. Terms: `span` (weight `span_weight`) and `fkl` (weight
    `kl_weight`, left out when 0). Hyperparameters: `span_length` (4), `span_weight` (1.0),
    `kl_weight` (1.0), `temperature` (1.0). Module docstring: the formula and every gap filled.
    """

    name = "span"
    paper = PAPER
    sparse_refusal = (
        "its correlations multiply the distributions of adjacent positions token by token"
        ", and each position's buckets hold different tokens"
    )
    coupling = "sequence"
    defaults: ClassVar[dict[str, Any]] = {
        "span_length": 4,
        "span_weight": 1.0,
        "kl_weight": 1.0,
        "temperature": 1.0,
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        _check(**self.hparams)

    def per_position_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """`{"span": [..., T], "fkl": [..., T]}` from `[..., T, V]` logits and `[..., T]` labels."""
        hp = self.hparams
        log_p = teacher_log_probs(teacher_logits, hp["temperature"], self.name)  # [..., T, V]
        log_q = log_probs(student_logits, hp["temperature"])  # [..., T, V]
        shape, device = student_logits.shape[:-1], student_logits.device
        pairs = span_pairs(labels, shape, device, hp["span_length"])  # [..., T]
        terms = {self.name: correlation_distance(log_p, log_q, pairs)}
        if hp["kl_weight"] > 0:
            terms["fkl"] = kl_sum(log_p, log_q)
        return terms

    def term_weights(self) -> dict[str, float]:
        weights = {self.name: float(self.hparams["span_weight"])}
        if self.hparams["kl_weight"] > 0:
            weights["fkl"] = float(self.hparams["kl_weight"])
        return weights

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        """The weighted sum of the terms, `[..., T]`."""
        terms = self.per_position_terms(student_logits, teacher_logits, labels)
        weights = self.term_weights()
        return sum(weights[k] * v for k, v in terms.items())


def _check(*, span_length: Any, span_weight: float, kl_weight: float, temperature: float) -> None:
    if isinstance(span_length, bool) or not isinstance(span_length, int) or span_length < 2:
        raise ValueError(
            f"span_length must be an integer >= 2 (a span of 1 token has no adjacent pair), "
            f"got {span_length!r}"
        )
    for name, value in (("span_weight", span_weight), ("kl_weight", kl_weight)):
        if not 0.0 <= value < float("inf"):
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if span_weight == 0 and kl_weight == 0:
        raise ValueError("span_weight and kl_weight are both 0: the loss would be identically 0")
    check_temperature(temperature)


LOSSES.add("span", SpanLoss)
