"""Adaptive teaching KD (ATKD): DKD's two parts, weighted apart on easy and hard positions.

Paper: "Revisiting Knowledge Distillation for Autoregressive Language Models" (Qihuang Zhong,
Liang Ding, Li Shen, Juhua Liu, Bo Du, Dacheng Tao; ACL 2024). Official code: WHU-ZQH/ATKD,
`distill/distill_trainer.py` (`DistillTrainer.atkd`, `get_tckd_nckd`; `alpha` defaults to 0.2 in
`distill/train.py`).

Per counted position, with `p = softmax(z_t/τ)`, `q = softmax(z_s/τ)` and the ground-truth token
y: the teacher's uncertainty `u = 1 − p_y`; TCKD = KL([p_y, 1−p_y] ‖ [q_y, 1−q_y]); NCKD =
KL(p̂ ‖ q̂) over the vocabulary without y, both renormalised (`dkd.split_kl`). Positions with
`u` strictly below the median of `u` over the counted positions of the call (`torch.median`: the
lower middle value for an even count) are *easy*, the rest *hard*:

    ATKD = α · mean_easy(NCKD) + (1 − α) · mean_hard(TCKD + NCKD)

each mean over its own group. No τ² factor.

The median couples the positions of a call (`coupling = "batch"`): `batch_statistics` gives `u`
per position from the teacher, `summarise` the median and the group sizes over the counted
positions, and `per_position_terms` turns them into per-position values whose mean over the
counted positions is ATKD: easy position `α·NCKD·M/n_easy`, hard position
`(1−α)·(TCKD+NCKD)·M/n_hard`, M = counted positions. The chunked path collects `u` over all chunks
first, so the median is the whole call's at any chunk size.

Scope of the median (as in the official code, where each `training_step` computes its own):
one forward call, i.e. one gradient-accumulation micro-batch on one process. It is not shared
across micro-batches or processes. With `num_items_in_batch` (the step's token count) the
result is `M·ATKD_call / num_items_in_batch`, so the optimiser step sees the token-weighted
combination `Σ_m M_m·ATKD_m / Σ_m M_m` of the per-micro-batch (per-process) ATKD values; the
official code, through the HF Trainer, weights micro-batches equally instead.

Differences from the official code:

* An empty group contributes 0 (the official code divides 0 by 0 and gives NaN), e.g. when all
  counted positions have the same `u`, or a single position counts.
* Ties at the median: positions within a relative 1e-4 below the median count as hard, like the
  median itself. The statistics pass and the loss pass compute `u` separately (in the chunked
  path the loss pass may run through fused `torch.compile` kernels), and a last-bit difference
  must not move the median position into the easy group. Only near-ties are affected.
* One temperature for both models (the official code has a student and a teacher temperature,
  both fixed at 1.0); `u` is computed at that temperature, as the official `pnt_tea`.
* Not implemented: the official `setting="reverse"` (roles of the models swapped) and
  `use_pnt` (off by default there). TCKD's binary probabilities are computed in log space
  (the official `torch.log` gives −inf when `q_y` underflows).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from kdlab.losses._common import check_temperature, check_unit_interval, target_split
from kdlab.losses.base import LOSSES, KDLoss
from kdlab.losses.dkd import check_labels, split_kl
from kdlab.losses.reduce import counted_mask

TIE_RTOL = 1e-4  # u within this relative distance below the median counts as hard (a tie)


def teacher_uncertainty(teacher_logits: Tensor, labels: Tensor, temperature: float) -> Tensor:
    """`u = 1 − p_y` per position `[...]`, from the detached teacher at temperature τ."""
    return target_split(teacher_logits.detach(), labels, temperature).log_rest.exp()


def split_counts(uncertainty: Tensor) -> dict[str, Tensor]:
    """Median of `u` `[M]` (lower middle), the easy threshold and the group sizes, as float32."""
    u = uncertainty.float()
    median = u.median() if u.numel() else u.new_zeros(())
    threshold = median * (1.0 - TIE_RTOL)
    n_easy = (u < threshold).sum().float()
    count = u.new_tensor(float(u.numel()))
    return {
        "median": median,
        "threshold": threshold,
        "count": count,
        "easy": n_easy,
        "hard": count - n_easy,
    }


def atkd_values(
    student_logits: Tensor,
    teacher_logits: Tensor,
    labels: Tensor,
    summary: dict[str, Tensor],
    *,
    alpha: float,
    temperature: float,
) -> Tensor:
    """Per-position values `[...]` whose mean over the counted positions is ATKD.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached.
        labels: `[...]` int64 ground-truth tokens, `-100` = not counted.
        summary: `split_counts` of the counted positions' `u` (the whole call's).
        alpha: weight of the easy positions' NCKD.
        temperature: τ for both softmaxes (and `u`).
    """
    p = target_split(teacher_logits.detach(), labels, temperature)
    tckd, nckd = split_kl(p, target_split(student_logits, labels, temperature))  # [...]
    easy = p.log_rest.exp() < summary["threshold"]  # the same ops as `teacher_uncertainty`
    count = summary["count"]
    w_easy = alpha * count / summary["easy"].clamp_min(1.0)
    w_hard = (1.0 - alpha) * count / summary["hard"].clamp_min(1.0)
    return torch.where(easy, w_easy * nckd, w_hard * (tckd + nckd))


class ATKDLoss(KDLoss):
    """Adaptive teaching KD: `α·mean_easy(NCKD) + (1−α)·mean_hard(TCKD + NCKD)`.

    Easy positions: teacher uncertainty `u = 1 − p_y` strictly below the median of `u` over the
    call's counted positions (lower middle for an even count; near-ties within a relative 1e-4
    count as hard); the rest are hard. TCKD =
    KL([p_y, 1−p_y] ‖ [q_y, 1−q_y]), NCKD = KL over the renormalised non-target distributions;
    no τ² factor. Zhong et al., ACL 2024; official code WHU-ZQH/ATKD
    `distill/distill_trainer.py`. The median is per forward call (micro-batch, process); with
    `num_items_in_batch` the step combines the micro-batches' ATKD values weighted by their
    token counts. An empty group contributes 0 (official: NaN). See the module docstring for the
    other differences from the official code.

    Hyperparameters: alpha in [0, 1], temperature τ > 0.
    """

    name = "atkd"
    paper = (
        "Revisiting Knowledge Distillation for Autoregressive Language Models "
        "(Zhong et al., ACL 2024)"
    )
    needs_labels = True
    sparse_refusal = None
    coupling = "batch"
    defaults = {"alpha": 0.2, "temperature": 1.0}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        check_unit_interval("alpha", self.hparams["alpha"])
        check_temperature(self.hparams["temperature"])

    def batch_statistics(
        self, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        if teacher_logits is None:
            raise ValueError("loss 'atkd' needs the teacher's logits")
        labels = check_labels(labels, "atkd")
        u = teacher_uncertainty(teacher_logits, labels, self.hparams["temperature"])
        return {"uncertainty": u}

    def summarise(self, statistics: dict[str, Tensor]) -> dict[str, Tensor]:
        return split_counts(statistics["uncertainty"])

    def per_position_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """`summary`: the whole call's; `None` summarises these positions (a lone call)."""
        if teacher_logits is None:
            raise ValueError("loss 'atkd' needs the teacher's logits")
        labels = check_labels(labels, "atkd")
        if summary is None:
            mask = counted_mask(labels, student_logits.shape[:-1], student_logits.device)
            summary = self.summarise(
                {k: v[mask] for k, v in self.batch_statistics(teacher_logits, labels).items()}
            )
        values = atkd_values(student_logits, teacher_logits, labels, summary, **self.hparams)
        return {self.name: values}

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        """Per-position values `[...]` of this call, with this call's own median."""
        return self.terms(student_logits, teacher_logits, labels)[self.name]


LOSSES.add("atkd", ATKDLoss)
