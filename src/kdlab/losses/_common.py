"""Numerics shared by the token-level losses: safe log-probabilities and a safe KL sum.

Every loss computes in float32 whatever the input dtype, and must give finite values and
gradients for `-inf` logits (a masked vocabulary entry) and for logits of ±1e4, at every position.
Two tricks make that hold:

* `log_probs` clamps the float32 log-softmax at `LOG_ZERO` (the most negative float32), so a
  probability of exactly 0 has a finite log and `0 · log 0` evaluates to `0 · finite = 0`. Only a
  `-inf` logit can reach `LOG_ZERO`: finite logits give log-probabilities many orders of magnitude
  above it, so the clamp never changes a value or a gradient there.
* `kl_sum` leaves out the vocabulary entries where the reference distribution is exactly 0 (a
  `-inf` logit) — DistiLLM's official code does the same with `masked_fill(inf_mask, 0)`. There
  the true divergence is +inf; leaving the entry out keeps the value finite and interpretable, and
  the gradient of the remaining entries is the same either way (a `-inf` logit cannot move).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

LOG_ZERO = torch.finfo(torch.float32).min


def log_probs(logits: Tensor, temperature: float = 1.0) -> Tensor:
    """`log_softmax(logits / temperature)` in float32, with `-inf` clamped to `LOG_ZERO`.

    Args:
        logits: `[..., V]` in any floating dtype.
        temperature: softmax temperature τ > 0.

    Returns:
        `[..., V]` float32 log-probabilities, all finite.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    return torch.log_softmax(z, dim=-1).clamp_min(LOG_ZERO)


def teacher_log_probs(teacher_logits: Tensor | None, temperature: float, loss: str) -> Tensor:
    """`log_probs` of the teacher, detached: no gradient ever reaches the teacher."""
    if teacher_logits is None:
        raise ValueError(f"loss {loss!r} needs teacher logits; got teacher_logits=None")
    return log_probs(teacher_logits.detach(), temperature)


def kl_sum(log_a: Tensor, log_b: Tensor) -> Tensor:
    """`KL(a‖b) = Σ_v a (log a − log b)` over the last dim, from clamped log-probabilities.

    Entries where `b` is exactly 0 (`log_b == LOG_ZERO`) are left out (see the module docstring);
    entries where `a` is 0 contribute `0 · finite = 0`.

    Args:
        log_a, log_b: `[..., V]` float32 log-probabilities from `log_probs` (or a mixture of them).

    Returns:
        `[...]` per-position KL, finite.
    """
    terms = log_a.exp() * (log_a - log_b)
    return torch.where(log_b > LOG_ZERO, terms, torch.zeros_like(terms)).sum(-1)


def log_mixture(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """`log(w·a + (1−w)·b)` from log-probabilities, for 0 < w < 1, computed stably (logaddexp).

    Gradient flows through both inputs (nothing is detached here).
    """
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def check_temperature(temperature: float) -> None:
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature!r}")


def check_unit_interval(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")


def check_skew(alpha: float) -> None:
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"alpha must be in [0, 1) (alpha=1 makes the loss identically 0), got {alpha!r}"
        )


class TargetSplit(NamedTuple):
    """A distribution split at the ground-truth token y (see `target_split`)."""

    log_target: Tensor  # [...] log p_y
    log_rest: Tensor  # [...] log(1 − p_y): the non-target mass
    log_non_target: Tensor  # [..., V] log p̂: non-target distribution renormalised; y at LOG_ZERO


def target_split(logits: Tensor, labels: Tensor, temperature: float = 1.0) -> TargetSplit:
    """Split `softmax(logits / τ)` at the ground-truth token (DKD, ATKD, NKD's target/non-target).

    `log(1 − p_y)` is a log-sum-exp over the other tokens (exact also when p_y ≈ 1), and `p̂` is a
    softmax over the logits without y (as the official codes' `masked_select`), so it is as exact as
    `log_probs`. Added to the shared helpers because `dkd`, `atkd` and `nkd` all use it.

    Args:
        logits: `[..., V]` in any floating dtype (detach a teacher's before calling).
        labels: `[...]` int64 ground-truth tokens; `-100` positions use token 0 (finite values,
            which the reduction drops).
        temperature: softmax temperature τ > 0.

    Returns:
        A `TargetSplit` of float32 tensors, all finite.
    """
    z = logits.float()
    if temperature != 1.0:
        z = z / temperature
    index = labels.masked_fill(labels < 0, 0).unsqueeze(-1)  # [..., 1]
    is_target = torch.zeros_like(z, dtype=torch.bool).scatter_(-1, index, True)  # [..., V]
    log_p = torch.log_softmax(z, dim=-1).clamp_min(LOG_ZERO)
    log_target = log_p.gather(-1, index).squeeze(-1)
    log_rest = torch.logsumexp(log_p.masked_fill(is_target, LOG_ZERO), dim=-1).clamp_min(LOG_ZERO)
    log_hat = torch.log_softmax(z.masked_fill(is_target, LOG_ZERO), dim=-1).clamp_min(LOG_ZERO)
    return TargetSplit(log_target, log_rest, log_hat.masked_fill(is_target, LOG_ZERO))
