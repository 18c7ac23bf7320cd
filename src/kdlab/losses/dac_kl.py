"""DAC-KL: KL on the teacher's high-density region, whose bounds a small network learns.

Paper: "Multi-Granularity Semantic Revision for Large Language Model Distillation" (Liu, Zhang,
Li, Li, Huang, Chen, Tang, Hu, Xiong, Wang; 2024, arXiv 2407.10068), the token-level
"distribution adaptive clipping KL" loss. There is no public code, and the paper's method section
was not available to us. What is fixed (the paper's abstract and METHODS.md): a learnable
sub-network (an MLP) predicts, per position, lower and upper quantile bounds of the teacher's
sorted probability mass; the KL divergence is taken on the clipped high-density region,
renormalised, so the student is not pulled toward the teacher's long tail; the network learns
with the student. Everything more specific below is kdlab's choice (docs/losses/dac_kl.md
repeats each one).

kdlab's DAC-KL, per position (`p = softmax(z_t)` detached, `q = softmax(z_s)`):

1. *The mass axis.* Sort `p` in descending order; token k occupies the interval
   `[s_k, e_k]` of cumulative teacher mass (`s_k` = mass of the tokens before it,
   `e_k = s_k + p_k`). The bounds `0 < l < u < 1` are quantiles on this axis.
2. *The network.* Input: the `num_probs` largest teacher probabilities and the `num_probs`
   largest student probabilities, each sorted descending (zero-padded when V is smaller), detached:
   a fixed-size summary for any vocabulary. An MLP `2m → hidden → 3` (tanh) gives three logits
   whose softmax is the mass split `(l, u − l, 1 − u)` (head trimmed, kept, tail trimmed), so
   `0 < l < u < 1` always. The output layer starts at zero weights with biases that give
   `(init_lower, init_upper)` at every position.
3. *The soft region.* Hard clipping has no gradient in `l, u`; kdlab uses linear ramps of width
   `g = gate_width` on the mass axis:
   `w_k = clamp((u + g − s_k)/g, 0, 1) · clamp((e_k − l + g)/g, 0, 1)`.
   A token is kept whole when it overlaps `[l, u]`, dropped when it lies more than `g` outside,
   and partly kept in between, which is where `l` and `u` get their gradient (at most `1/g` per
   unit of mass: bounded, unlike the ratio `q/p` of a boundary token that an exact fractional
   clip would give). With `l ≤ 0` and `u ≥ 1` every token is kept and the region KL is exactly
   the forward KL. The region is never empty (the token under `l` touches `[l, u]`).
4. *The region KL*, renormalised on the region (the clipped teacher and student distributions
   each sum to 1): `P = Σ w p`, `Q = Σ w q`,
   `D = KL(w p / P ‖ w q / Q) = Σ (w p / P) log(p / q) − log P + log Q`.
   `D = 0` when `q = p`, for any region. Entries that the student masks (`-inf`) are left out of
   the region, as `kl_sum` does.
5. *Against collapse.* A one-token region gives `D = 0` whatever the student does, so a network
   that only minimises `D` learns to clip everything but the top token; the description of the
   paper available to us names no remedy. kdlab prices the clipped mass: the term
   `"clip"` = `−log(P_gate) · KL(p ‖ q)`, with `P_gate = Σ w p` the teacher mass kept and the full
   KL detached, weighted by `coverage_weight` (λ). It gives the student no gradient (it depends on
   the student only through the detached KL), is 0 when the student equals the teacher, and scales
   with the current mismatch, so the network clips mass only where that lowers `D` by more than
   `λ · KL · (relative mass lost)`: where the student's mismatch sits in the tail. The log makes
   clipping a spread-out teacher down to one token prohibitively costly; a one-token region wins
   over the full one (`D ≈ KL`) only where the top token holds more than about `e^(−1/λ)` of the
   teacher's mass (0.61 at the default λ = 2), where the teacher's dense area *is* one token.
   The zero-weight term `"kept"` reports `P_gate` (the teacher mass kept, for logging).

Value: `D + coverage_weight · clip`, both 0 at identical inputs. Terms: `"dac_kl"` (weight 1),
`"clip"` (weight `coverage_weight`) and `"kept"` (weight 0). The network's parameters are
`nn.Parameter`s of the loss: the trainer optimises them with the student, the chunked path
differentiates them, and they are saved in checkpoints and in `<run>/loss_state.safetensors`.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn

from kdlab.losses._common import LOG_ZERO, kl_sum, log_probs, teacher_log_probs
from kdlab.losses.base import LOSSES, KDLoss


class DACKLLoss(KDLoss):
    """DAC-KL per position: KL on the teacher's learned high-density region, renormalised.

    Paper: "Multi-Granularity Semantic Revision for Large Language Model Distillation" (Liu et
    al., 2024, arXiv 2407.10068); no public code. An MLP predicts per position lower/upper quantile
    bounds `l < u` of the teacher's descending cumulative mass; tokens overlapping `[l, u]` form
    the region (soft edges of width `gate_width`) and the loss is `KL(p|region ‖ q|region)` plus
    `coverage_weight · (−log kept teacher mass) · KL(p‖q)` (detached KL) against collapse. See
    the module docstring for every choice the paper leaves open.

    Hyperparameters:
        hidden: hidden width of the MLP (32).
        num_probs: sorted probabilities of each model fed to the MLP (16).
        gate_width: width of the soft region edges, in teacher mass (0.05).
        init_lower: lower bound `l` at initialisation, in (0, init_upper) (0.01).
        init_upper: upper bound `u` at initialisation, in (init_lower, 1) (0.9).
        coverage_weight: λ, the price of clipped teacher mass (`−log` of the mass kept), in
            units of the full KL (2.0).
    """

    name = "dac_kl"
    paper = (
        "Multi-Granularity Semantic Revision for Large Language Model Distillation "
        "(Liu et al., 2024)"
    )
    sparse_refusal = "its network reads the teacher's sorted full-vocabulary probabilities"
    defaults = {
        "hidden": 32,
        "num_probs": 16,
        "gate_width": 0.05,
        "init_lower": 0.01,
        "init_upper": 0.9,
        "coverage_weight": 2.0,
    }

    def __init__(self, **hparams: Any) -> None:
        super().__init__(**hparams)
        hp = self.hparams
        _check_hparams(**hp)
        self.bounds_net = _bounds_network(
            hp["num_probs"], hp["hidden"], hp["init_lower"], hp["init_upper"]
        )

    def per_position_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        log_p = teacher_log_probs(teacher_logits, 1.0, "dac_kl")  # [..., V]
        log_q = log_probs(student_logits)  # [..., V]
        lower, upper = self.bounds(log_p, log_q.detach())  # [...] each
        log_p_sorted, order = log_p.sort(dim=-1, descending=True)  # [..., V]
        log_q_sorted = log_q.gather(-1, order)
        gate = region_gate(log_p_sorted.exp(), lower, upper, self.hparams["gate_width"])
        kept = (gate * log_p_sorted.exp()).sum(-1)  # [...] teacher mass in the region, > 0
        log_kept = kept.clamp_min(torch.finfo(kept.dtype).tiny).log()
        return {
            self.name: region_kl(log_p_sorted, log_q_sorted, gate),
            "clip": -log_kept * kl_sum(log_p, log_q.detach()),
            "kept": kept.detach(),
        }

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0, "clip": float(self.hparams["coverage_weight"]), "kept": 0.0}

    def bounds(self, log_p: Tensor, log_q: Tensor) -> tuple[Tensor, Tensor]:
        """The network's `(l, u)` `[...]` from detached `[..., V]` log-probabilities."""
        m = self.hparams["num_probs"]
        features = torch.cat([_top_probs(log_p, m), _top_probs(log_q, m)], dim=-1)  # [..., 2m]
        weight = self.bounds_net[0].weight
        with torch.autocast(features.device.type, enabled=False):  # the MLP runs in float32
            split = self.bounds_net(features.to(weight.dtype)).float().softmax(-1)  # [..., 3]
        return split[..., 0], split[..., 0] + split[..., 1]


def region_gate(p_sorted: Tensor, lower: Tensor, upper: Tensor, width: float) -> Tensor:
    """Soft membership `[..., V]` of each sorted token in the mass window `[lower, upper]`.

    Args:
        p_sorted: `[..., V]` teacher probabilities in descending order.
        lower, upper: `[...]` quantile bounds on the cumulative mass axis.
        width: ramp width `g`: 1 for tokens touching the window, 0 beyond `g` outside it.
    """
    end = p_sorted.cumsum(-1)  # [..., V] e_k: mass up to and including token k
    start = end - p_sorted  # [..., V] s_k: mass before token k
    keep_tail = ((upper.unsqueeze(-1) + width - start) / width).clamp(0.0, 1.0)
    keep_head = ((end - lower.unsqueeze(-1) + width) / width).clamp(0.0, 1.0)
    return keep_tail * keep_head


def region_kl(log_p: Tensor, log_q: Tensor, gate: Tensor) -> Tensor:
    """`KL(g·p / Σ g·p ‖ g·q / Σ g·q)` per position `[...]` from `[..., V]` inputs.

    `= Σ (g p / P) (log p − log q) − log P + log Q` with `P = Σ g p`, `Q = Σ g q`. Entries the
    student masks (`log_q == LOG_ZERO`) are left out of the region; an empty region gives 0.
    """
    gate = torch.where(log_q > LOG_ZERO, gate, torch.zeros_like(gate))
    p_kept = gate * log_p.exp()  # [..., V]
    mass_p = p_kept.sum(-1)  # [...]
    mass_q = (gate * log_q.exp()).sum(-1)
    tiny = torch.finfo(mass_p.dtype).tiny
    safe_p, safe_q = mass_p.clamp_min(tiny), mass_q.clamp_min(tiny)
    ratio = (p_kept / safe_p.unsqueeze(-1)) * (log_p - log_q)
    value = ratio.sum(-1) - safe_p.log() + safe_q.log()
    return torch.where(mass_p > 0, value, torch.zeros_like(value))


def _top_probs(log_probs_: Tensor, m: int) -> Tensor:
    """The `m` largest probabilities `[..., m]`, descending, zero-padded when V < m."""
    k = min(m, log_probs_.shape[-1])
    top = log_probs_.topk(k, dim=-1).values.exp()
    if k < m:
        top = torch.nn.functional.pad(top, (0, m - k))
    return top


def _bounds_network(m: int, hidden: int, init_lower: float, init_upper: float) -> nn.Sequential:
    """`2m → hidden → 3` MLP; the output layer starts at 0 with biases giving the initial bounds.

    The hidden layer is initialised from a fixed private generator (seed 0), so building the loss
    neither consumes nor depends on the global random state.
    """
    skip = torch.nn.utils.skip_init  # no default initialisation: it would draw from the global RNG
    net = nn.Sequential(skip(nn.Linear, 2 * m, hidden), nn.Tanh(), skip(nn.Linear, hidden, 3))
    gen = torch.Generator().manual_seed(0)
    bound = 1.0 / math.sqrt(2 * m)
    with torch.no_grad():
        net[0].weight.uniform_(-bound, bound, generator=gen)
        net[0].bias.uniform_(-bound, bound, generator=gen)
        net[2].weight.zero_()
        split = [init_lower, init_upper - init_lower, 1.0 - init_upper]
        net[2].bias.copy_(torch.tensor(split).log())
    return net


def _check_hparams(
    *,
    hidden: int,
    num_probs: int,
    gate_width: float,
    init_lower: float,
    init_upper: float,
    coverage_weight: float,
) -> None:
    for name, value in (("hidden", hidden), ("num_probs", num_probs)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not gate_width > 0:
        raise ValueError(f"gate_width must be > 0, got {gate_width!r}")
    if not 0.0 < init_lower < init_upper < 1.0:
        raise ValueError(
            "init_lower and init_upper must satisfy 0 < init_lower < init_upper < 1, got "
            f"init_lower={init_lower!r}, init_upper={init_upper!r}"
        )
    if not coverage_weight >= 0:
        raise ValueError(f"coverage_weight must be >= 0, got {coverage_weight!r}")


LOSSES.add("dac_kl", DACKLLoss)
