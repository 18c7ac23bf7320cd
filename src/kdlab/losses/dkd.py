"""Decoupled KD (DKD): target-class and non-target-class KL, weighted apart, with a warm-up.

Paper: "Decoupled Knowledge Distillation" (Borui Zhao, Quan Cui, Renjie Song, Yiyu Qiu, Jiajun
Liang; CVPR 2022). Official code: megvii-research/mdistiller, `mdistiller/distillers/DKD.py`
(`dkd_loss`, `DKD.forward_train`; defaults in `mdistiller/engine/cfg.py`: ALPHA=1.0, BETA=8.0,
T=4.0, WARMUP=20).

With `p = softmax(z_t/τ)`, `q = softmax(z_s/τ)` and the ground-truth token y:

    TCKD = τ² · KL([p_y, 1−p_y] ‖ [q_y, 1−q_y])              (target vs. the rest, binary)
    NCKD = τ² · KL(p̂ ‖ q̂)   p̂, q̂ = softmax over the tokens ≠ y (renormalised non-target)
    DKD  = min(s / warmup, 1) · (α · TCKD + β · NCKD)

`decoupled_kl` and `split_kl` (TCKD and NCKD per position, without τ²) are shared with `atkd`.

Differences from the official code, and gaps it leaves for language models:

* Warm-up unit: mdistiller multiplies by `min(epoch / warmup, 1)` with epochs counted from 1. A
  language-model run is often shorter than one epoch, so kdlab counts optimiser steps instead:
  the step being computed has `s = 1 + steps finished` (a fresh loss has factor `1/warmup`, as
  mdistiller's first epoch). `warmup=0` means factor 1 from the start (mdistiller would divide by
  zero). The count lives in a buffer, so checkpoints and resume keep it; `on_step` updates it.
* Reduction: mdistiller sums the KL over the batch and divides by the batch size (a mean over
  samples); kdlab takes the mean over counted positions (a position is a sample).
* Non-target masking: mdistiller subtracts 1000 from the target logit before the softmax, which
  leaves y in the non-target distribution when logits exceed ~1000·τ in magnitude; kdlab leaves y
  out exactly. mdistiller takes `torch.log` of the binary student probabilities (−inf when
  `q_y` underflows); kdlab computes them in log space (finite).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kdlab.losses._common import TargetSplit, check_temperature, kl_sum, target_split
from kdlab.losses.base import LOSSES, KDLoss


def decoupled_kl(
    student_logits: Tensor, teacher_logits: Tensor, labels: Tensor, temperature: float = 1.0
) -> tuple[Tensor, Tensor]:
    """TCKD and NCKD per position (no τ²): `KL([p_y, 1−p_y] ‖ [q_y, 1−q_y])` and `KL(p̂ ‖ q̂)`.

    Args:
        student_logits: `[..., V]`; gradient flows here.
        teacher_logits: `[..., V]`; detached here.
        labels: `[...]` int64 ground-truth tokens (`-100` positions get finite values).
        temperature: τ > 0 for both softmaxes.

    Returns:
        `(tckd, nckd)`, each `[...]` float32.
    """
    p = target_split(teacher_logits.detach(), labels, temperature)
    return split_kl(p, target_split(student_logits, labels, temperature))


def split_kl(p: TargetSplit, q: TargetSplit) -> tuple[Tensor, Tensor]:
    """TCKD and NCKD `[...]` from the teacher's and the student's `target_split`."""
    binary_p = torch.stack([p.log_target, p.log_rest], dim=-1)  # [..., 2]
    binary_q = torch.stack([q.log_target, q.log_rest], dim=-1)
    return kl_sum(binary_p, binary_q), kl_sum(p.log_non_target, q.log_non_target)


def check_labels(labels: Tensor | None, loss: str) -> Tensor:
    if labels is None:
        raise ValueError(f"loss {loss!r} needs labels (the ground-truth next tokens)")
    return labels


class DKDLoss(KDLoss):
    """Decoupled KD: `min(s/warmup, 1)·(α·τ²·TCKD + β·τ²·NCKD)` per position, s = step number.

    TCKD = KL([p_y, 1−p_y] ‖ [q_y, 1−q_y]) on the target-vs-rest split, NCKD = KL(p̂ ‖ q̂) on the
    renormalised non-target distributions, both at temperature τ (Zhao et al., CVPR 2022;
    megvii-research/mdistiller `distillers/DKD.py`). The warm-up counts optimiser steps: the step
    being computed has s = 1 + steps finished; `warmup=0` means no warm-up. Terms `tckd` and
    `nckd` (τ²·TCKD, τ²·NCKD, before α, β and the warm-up) are logged with weight 0. Defaults are
    mdistiller's CIFAR-100 ones; for language models use alpha=1, beta=0.5, temperature=1. See the
    module docstring for every difference from the official code.

    Hyperparameters: alpha ≥ 0 (TCKD weight), beta ≥ 0 (NCKD weight), temperature τ > 0,
    warmup ≥ 0 (optimiser steps, an integer).
    """

    name = "dkd"
    paper = "Decoupled Knowledge Distillation (Zhao et al., CVPR 2022)"
    needs_labels = True
    sparse_refusal = None
    defaults = {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        for key in ("alpha", "beta"):
            if not self.hparams[key] >= 0:
                raise ValueError(f"{key} must be >= 0, got {self.hparams[key]!r}")
        check_temperature(self.hparams["temperature"])
        warmup = self.hparams["warmup"]
        if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
            raise ValueError(f"warmup must be an integer >= 0 (optimiser steps), got {warmup!r}")
        self.register_buffer("steps_done", torch.zeros((), dtype=torch.int64))

    def warmup_factor(self) -> Tensor:
        """`min((1 + steps finished) / warmup, 1)` as a float32 scalar (1 when `warmup=0`)."""
        warmup = self.hparams["warmup"]
        if warmup == 0:
            return torch.ones((), device=self.steps_done.device)
        return ((self.steps_done + 1).float() / warmup).clamp(max=1.0)

    def per_position_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        if teacher_logits is None:
            raise ValueError("loss 'dkd' needs the teacher's logits")
        tau = self.hparams["temperature"]
        tckd, nckd = decoupled_kl(student_logits, teacher_logits, check_labels(labels, "dkd"), tau)
        tckd, nckd = tckd * tau**2, nckd * tau**2  # [...]
        factor = self.warmup_factor().to(tckd.device)
        value = factor * (self.hparams["alpha"] * tckd + self.hparams["beta"] * nckd)
        return {self.name: value, "tckd": tckd, "nckd": nckd}

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0, "tckd": 0.0, "nckd": 0.0}

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        """The weighted DKD value per position `[...]` (the warm-up factor included)."""
        return self.per_position_terms(student_logits, teacher_logits, labels)[self.name]

    def on_step(
        self,
        step: int,
        total_steps: int,
        loss_value: float,
        terms: Mapping[str, float] | None = None,
    ) -> None:
        """Record `step` optimiser steps finished: the next forward uses `(step + 1) / warmup`."""
        self.steps_done.fill_(int(step))

    def log_values(self) -> dict[str, float]:
        """`dkd/warmup_factor`: the factor the next forward uses (logged after `on_step`)."""
        return {"dkd/warmup_factor": float(self.warmup_factor())}


LOSSES.add("dkd", DKDLoss)
