"""Losses that couple positions, and losses with parameters, on the plain and chunked paths.

Toy losses here exercise each `KDLoss.coupling` kind and the learnable-parameter path of
`chunked_loss`, independently of any paper's method: the chunked value and gradients must equal
the plain call's at every chunk size, including chunk sizes that cut groups and sequences.
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from kdlab.losses import KDLoss, WeightedSum, build_loss, chunked_loss
from kdlab.losses._common import kl_sum, log_probs

ATOL, RTOL = 1e-5, 5e-4
B, T, HS, HT, V = 3, 7, 16, 12, 40


class BatchMedian(KDLoss):
    """FKL doubled at positions whose teacher top-1 probability is below the batch median."""

    name = "toy_batch"
    coupling = "batch"

    def batch_statistics(self, teacher_logits, labels):  # noqa: ANN001, ANN201
        return {"top1": teacher_logits.softmax(-1).amax(-1)}

    def summarise(self, statistics):  # noqa: ANN001, ANN201
        return {
            "median": statistics["top1"].median(),
            "count": statistics["top1"].new_tensor(len(statistics["top1"])),
        }

    def per_position_terms(self, student_logits, teacher_logits, labels, *, summary=None):  # noqa: ANN001, ANN201
        log_p, log_q = log_probs(teacher_logits), log_probs(student_logits)
        hard = log_p.exp().amax(-1) < summary["median"]
        scale = (1.0 + hard.float()) * summary["count"] / 10
        return {self.name: scale * kl_sum(log_p, log_q)}


class Groups(KDLoss):
    """Each counted row against the mean teacher distribution of its group of 3 rows."""

    name = "toy_group"
    coupling = "group"

    @property
    def group_size(self) -> int:
        return 3

    def per_position_terms(self, student_logits, teacher_logits, labels, *, summary=None):  # noqa: ANN001, ANN201
        p = teacher_logits.softmax(-1)  # [M, V]
        groups = torch.split(p, self.group_size)
        targets = torch.cat([g.mean(0, keepdim=True).expand_as(g) for g in groups])
        return {self.name: kl_sum(targets.log(), log_probs(student_logits))}


class Adjacent(KDLoss):
    """FKL plus the overlap of each position's student distribution with the previous one."""

    name = "toy_sequence"
    coupling = "sequence"

    def per_position_terms(self, student_logits, teacher_logits, labels, *, summary=None):  # noqa: ANN001, ANN201
        log_q = log_probs(student_logits)  # [b, T, V]
        value = kl_sum(log_probs(teacher_logits), log_q)
        overlap = (log_q[..., 1:, :].exp() * log_q[..., :-1, :].exp()).sum(-1)  # [b, T-1]
        return {self.name: torch.cat([value[..., :1], value[..., 1:] + overlap], dim=-1)}


class LearnedTemperature(KDLoss):
    """FKL with a learnable student temperature and a zero-weight diagnostic term."""

    name = "toy_param"

    def __init__(self) -> None:
        super().__init__()
        self.log_tau = nn.Parameter(torch.tensor(0.3))

    def per_position_terms(self, student_logits, teacher_logits, labels, *, summary=None):  # noqa: ANN001, ANN201
        log_q = torch.log_softmax(student_logits / self.log_tau.exp(), -1)
        diag = log_q.detach().exp().amax(-1)
        return {self.name: kl_sum(log_probs(teacher_logits), log_q), "top1": diag}

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0, "top1": 0.0}


def make(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "s_hidden": torch.randn(B, T, HS, generator=g).requires_grad_(),
        "s_weight": nn.Parameter(torch.randn(V, HS, generator=g) * 0.5),
        "t_hidden": torch.randn(B, T, HT, generator=g),
        "t_weight": torch.randn(V, HT, generator=g) * 0.5,
        "labels": torch.randint(0, V, (B, T), generator=g),
    }
    x["labels"][0, :2] = -100
    x["labels"][2, 4] = -100
    return x


def check_parity(loss_fn: KDLoss, x: dict, chunk_size: int, flatten: bool) -> None:
    s_logits = x["s_hidden"] @ x["s_weight"].t()
    t_logits = x["t_hidden"] @ x["t_weight"].t()
    ref, ref_terms = loss_fn.forward_terms(s_logits, t_logits, x["labels"])
    shape = (-1,) if flatten else (B, T)
    out, terms = chunked_loss(
        loss_fn,
        x["s_hidden"].reshape(*shape, HS),
        x["s_weight"],
        x["t_hidden"].reshape(*shape, HT),
        x["t_weight"],
        x["labels"].reshape(shape),
        chunk_size=chunk_size,
        return_terms=True,
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], atol=ATOL, rtol=RTOL)
    params = [x["s_hidden"], x["s_weight"], *loss_fn.parameters()]
    for g, g_ref in zip(
        torch.autograd.grad(out, params), torch.autograd.grad(ref, params), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 9, 100])
@pytest.mark.parametrize(
    ("loss_fn", "flatten"),
    [
        (BatchMedian(), True),
        (Groups(), True),
        (Adjacent(), False),
        (LearnedTemperature(), True),
        (WeightedSum({"kd": (BatchMedian(), 0.6), "ce": (build_loss("ce"), 0.4)}), True),
        (WeightedSum({"kd": (Adjacent(), 0.6), "ce": (build_loss("ce"), 0.4)}), False),
        (WeightedSum({"kd": (Groups(), 0.6), "ce": (build_loss("ce"), 0.4)}), True),
    ],
    ids=["batch", "group", "sequence", "param", "batch+ce", "sequence+ce", "group+ce"],
)
def test_coupled_losses_are_exact_at_every_chunk_size(loss_fn, flatten, chunk_size):
    check_parity(loss_fn, make(), chunk_size, flatten)


def test_batch_loss_uses_the_whole_batch_median_not_the_chunk_median():
    x = make(seed=3)
    loss_fn = BatchMedian()
    s_logits = (x["s_hidden"] @ x["s_weight"].t()).reshape(-1, V)
    t_logits = (x["t_hidden"] @ x["t_weight"].t()).reshape(-1, V)
    labels = x["labels"].reshape(-1)
    whole = loss_fn(s_logits, t_logits, labels)
    halves = loss_fn(s_logits[:10], t_logits[:10], labels[:10]) * (labels[:10] != -100).sum()
    halves = (
        halves + loss_fn(s_logits[10:], t_logits[10:], labels[10:]) * (labels[10:] != -100).sum()
    )
    assert not torch.allclose(whole, halves / (labels != -100).sum())  # the median matters
    check_parity(loss_fn, x, chunk_size=4, flatten=True)


def test_group_loss_sees_only_counted_rows_in_order():
    seen: list[Tensor] = []

    class Spy(Groups):
        def per_position_terms(self, student_logits, teacher_logits, labels, *, summary=None):  # noqa: ANN001, ANN201
            seen.append(labels.clone())
            return super().per_position_terms(student_logits, teacher_logits, labels)

    x = make()
    Spy()(x["s_hidden"] @ x["s_weight"].t(), x["t_hidden"] @ x["t_weight"].t(), x["labels"])
    counted = x["labels"][x["labels"] != -100]
    assert torch.equal(seen[0], counted)


def test_sequence_loss_needs_batch_time_hidden_states():
    x = make()
    with pytest.raises(ValueError, match=r"\[batch, T, H\]"):
        chunked_loss(
            Adjacent(),
            x["s_hidden"].reshape(-1, HS),
            x["s_weight"],
            x["t_hidden"].reshape(-1, HT),
            x["t_weight"],
            x["labels"].reshape(-1),
        )


def test_weighted_sum_refuses_two_different_couplings():
    with pytest.raises(ValueError, match="different couplings"):
        WeightedSum({"a": (Adjacent(), 1.0), "b": (Groups(), 1.0)})


def test_weighted_sum_routes_each_part_its_own_value_and_terms_on_step():
    calls = []

    class Recorder(LearnedTemperature):
        def on_step(self, step, total_steps, loss_value, terms=None):  # noqa: ANN001, ANN201
            calls.append((step, total_steps, loss_value, dict(terms or {})))

    loss_fn = WeightedSum({"kd": (Recorder(), 0.5), "ce": (build_loss("ce"), 0.5)})
    assert loss_fn.term_weights() == {"kd": 0.5, "kd/top1": 0.0, "ce": 0.5}
    loss_fn.on_step(3, 10, 9.0, {"kd": 1.25, "kd/top1": 0.75, "ce": 2.0})
    assert calls == [(3, 10, 1.25, {"toy_param": 1.25, "top1": 0.75})]
