"""TAID: KL to a teacher interpolated with the (detached) student, with an adaptive schedule.

Paper: "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in
Language Models" (Shing, Misaki, Bao, Yokoi, Akiba; ICLR 2025). Official code: SakanaAI/TAID,
`src/distil_losses/taid.py` (class `TAID`: `compute_loss` and `update_t`).

Per position, the target is the intermediate distribution

    p_t = softmax((1 − t) · stopgrad(z_s) + t · z_t)

(an interpolation in logit space), and the loss is `KL(p_t ‖ q)` with `q = softmax(z_s)`. The
interpolation parameter `t` starts at `t_start` and moves towards `t_end` after every optimiser
step (`on_step`), never slower than the linear schedule and faster while the loss keeps falling:

    rel     = (prev − cur) / (prev + 1e-15)        # relative decrease of the loss
    m       ← β · m + (1 − β) · rel                # momentum, m starts at 0
    target  = t_start + (t_end − t_start) · step / total_steps
    t       ← min(t_end, max(target, t + α · sigmoid(m) · (1 − t)))

The first call only records `prev` and leaves `t` unchanged (the official `update_t` returns
early while its `prev_loss` is still `inf`). `cur` is the step's cross-entropy `−Σ p_t log q`
(averaged over the counted positions), the value the official code passes to `update_t`; kdlab
returns it as the zero-weight diagnostic term `"ce"` and reads it back in `on_step`.

Differences from the official code:

* The official loss returns the cross-entropy `−Σ p_t log q`; kdlab returns the divergence
  `KL(p_t ‖ q) = −Σ p_t log q − H(p_t)`. `p_t` carries no gradient, so the gradients are identical
  and the value is 0 when the student equals the teacher (at any t).
* The official code updates `t` inside every forward call (once per micro-batch under gradient
  accumulation), with Lightning's `global_step` (optimiser steps finished *before* the loss was
  computed) as `step`. kdlab updates once per optimiser step, on the step's mean cross-entropy,
  with `step` = optimiser steps finished *including* this one (the paper's and METHODS.md's
  `step / total`): the linear floor runs one step ahead of the official code's.
* Hyperparameter checks follow kdlab's contract (`0 ≤ t_start ≤ t_end ≤ 1`, `alpha ≥ 0`,
  `0 ≤ beta < 1`) instead of the official asserts (`t_start < 1`, `t_end > 0`, `alpha ≤ 1`).
* A non-finite step loss (a NaN from a diverged step) does not enter the momentum: `t` only
  follows the linear floor on that step. The official code would propagate the NaN.
* Logits of `-inf` (masked vocabulary entries) are handled in log-probability space, so
  `(1 − t) · (−inf)` at `t = 1` cannot make a NaN; entries the student masks are left out of the
  sums, as the official `forward_kl` does with its `inf_mask`.

`t` is kept as a tensor buffer and used as a tensor in the math, so a compiled chunk step (CUDA)
does not recompile when `t` changes; the state (`t`, `momentum`, `prev_loss`, `has_prev`) lives
in buffers, so checkpoints and `--resume` continue the schedule exactly.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from kdlab.losses._common import LOG_ZERO, kl_sum, log_probs, teacher_log_probs
from kdlab.losses.base import LOSSES, KDLoss


class TAIDLoss(KDLoss):
    """TAID per position: `KL(p_t ‖ q)`, `p_t = softmax((1−t)·stopgrad(z_s) + t·z_t)`.

    Paper: "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in
    Language Models" (Shing et al., ICLR 2025); official code SakanaAI/TAID
    `src/distil_losses/taid.py`. See the module docstring for the adaptive update of `t` and the
    differences from the official code.

    Hyperparameters:
        t_start: initial interpolation weight of the teacher (0.4).
        t_end: final weight (1.0: the plain teacher).
        alpha: step size α of the adaptive increase (5e-4).
        beta: momentum β of the relative loss decrease (0.99).

    Terms: `"taid"` (the KL, weight 1) and `"ce"` (the cross-entropy `−Σ p_t log q`, detached,
    weight 0: the value the adaptive update reads). `log_values()` gives `{"taid/t": t}`.
    """

    name = "taid"
    paper = (
        "TAID: Temporally Adaptive Interpolated Distillation for Efficient Knowledge Transfer in "
        "Language Models (Shing et al., ICLR 2025)"
    )
    sparse_refusal = None
    defaults = {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99}

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        _check_hparams(**self.hparams)
        self.register_buffer("t", torch.tensor(float(self.hparams["t_start"])))
        self.register_buffer("momentum", torch.zeros(()))
        self.register_buffer("prev_loss", torch.zeros(()))
        self.register_buffer("has_prev", torch.zeros((), dtype=torch.bool))

    def per_position_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        log_q = log_probs(student_logits)  # [..., V], gradient flows
        log_pt = interpolated_log_probs(
            log_q.detach(), teacher_log_probs(teacher_logits, 1.0, "taid"), self.t
        )
        return {self.name: kl_sum(log_pt, log_q), "ce": _cross_entropy(log_pt, log_q.detach())}

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0, "ce": 0.0}

    def on_step(
        self,
        step: int,
        total_steps: int,
        loss_value: float,
        terms: Mapping[str, float] | None = None,
    ) -> None:
        """Adaptive update of `t` from the step's cross-entropy (see the module docstring)."""
        cur = float((terms or {}).get("ce", loss_value))
        hp = self.hparams
        t = float(self.t)
        target = hp["t_start"] + (hp["t_end"] - hp["t_start"]) * min(
            step / max(total_steps, 1), 1.0
        )
        if not math.isfinite(cur):
            self.t.fill_(min(hp["t_end"], max(target, t)))
            return
        if not bool(self.has_prev):  # the first call only records the loss
            self._record(cur)
            return
        prev = float(self.prev_loss)
        rel = (prev - cur) / (prev + 1e-15)
        m = hp["beta"] * float(self.momentum) + (1.0 - hp["beta"]) * rel
        delta = hp["alpha"] * _sigmoid(m) * (1.0 - t)
        self.momentum.fill_(m)
        self.t.fill_(min(hp["t_end"], max(target, t + delta)))
        self._record(cur)

    def _record(self, loss: float) -> None:
        self.prev_loss.fill_(loss)
        self.has_prev.fill_(True)

    def log_values(self) -> dict[str, float]:
        return {"taid/t": float(self.t)}


def interpolated_log_probs(log_q: Tensor, log_p: Tensor, t: Tensor | float) -> Tensor:
    """`log softmax((1 − t)·z_s + t·z_t)` from log-probabilities `[..., V]`, clamped at `LOG_ZERO`.

    Log-probabilities differ from logits by a per-position constant, which the softmax removes, so
    interpolating them gives the same distribution; being clamped (finite), they also keep
    `(1 − t)·(−inf)` from becoming NaN at `t = 1`.
    """
    mixed = (1.0 - t) * log_q + t * log_p  # [..., V]
    return torch.log_softmax(mixed, dim=-1).clamp_min(LOG_ZERO)


def _cross_entropy(log_pt: Tensor, log_q: Tensor) -> Tensor:
    """`−Σ p_t log q` `[...]`, leaving out entries the student masks (as the official code)."""
    terms = log_pt.exp() * log_q
    return -torch.where(log_q > LOG_ZERO, terms, torch.zeros_like(terms)).sum(-1)


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))


def _check_hparams(*, t_start: float, t_end: float, alpha: float, beta: float) -> None:
    if not 0.0 <= t_start <= t_end <= 1.0:
        raise ValueError(
            f"t_start and t_end must satisfy 0 <= t_start <= t_end <= 1, got t_start={t_start!r}, "
            f"t_end={t_end!r}"
        )
    if not alpha >= 0.0:
        raise ValueError(f"alpha must be >= 0, got {alpha!r}")
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"beta must be in [0, 1), got {beta!r}")


LOSSES.add("taid", TAIDLoss)
