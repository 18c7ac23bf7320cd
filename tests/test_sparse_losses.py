"""Losses from a sparse (cached) teacher: buckets, exactness at k = V, refusals."""

from __future__ import annotations

import pytest
import torch

from kdlab.losses import LOSSES, build_loss, loss_info
from kdlab.losses.sparse import SparseTeacher, to_buckets

B, T, V = 2, 5, 11
SPARSE = [n for n in LOSSES.names() if loss_info(n)["sparse"]]
DENSE_ONLY = [n for n in LOSSES.names() if not loss_info(n)["sparse"]]
ISSUE_LIST = "fkl rkl jsd tvd skl srkl akl atkd taid rlkd dkd nkd".split()


def inputs(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(B, T, V, generator=g) * 2
    teacher = torch.randn(B, T, V, generator=g) * 2
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[0, :2] = -100
    return student, teacher, labels


def every_token(teacher: torch.Tensor) -> SparseTeacher:
    """The dense teacher as a sparse one that stores all V tokens (empty label and tail)."""
    ids = torch.arange(V).expand(*teacher.shape[:-1], V)
    empty = torch.full((*teacher.shape[:-1], 2), float("-inf"))
    return SparseTeacher(ids, torch.cat([torch.log_softmax(teacher, -1), empty], -1))


def test_the_issue_losses_all_accept_sparse_teachers() -> None:
    assert set(ISSUE_LIST) <= set(SPARSE)
    assert {"pld", "sinkd", "gld", "span", "dac_kl"} <= set(DENSE_ONLY)


@pytest.mark.parametrize("name", SPARSE)
def test_storing_every_token_gives_the_dense_value_and_gradient(name: str) -> None:
    student, teacher, labels = inputs()
    dense_in = student.clone().requires_grad_()
    sparse_in = student.clone().requires_grad_()
    dense = build_loss(name)(dense_in, teacher, labels)
    sparse = build_loss(name)(sparse_in, every_token(teacher), labels)
    dense.backward()
    sparse.backward()
    assert torch.allclose(sparse, dense, rtol=1e-5, atol=1e-6)
    assert torch.allclose(sparse_in.grad, dense_in.grad, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("name", DENSE_ONLY)
def test_losses_that_need_the_full_distribution_refuse(name: str) -> None:
    student, teacher, labels = inputs()
    with pytest.raises(ValueError, match="cannot train from a sparse"):
        build_loss(name)(student, every_token(teacher), labels)


def test_buckets_by_hand() -> None:
    """Top-2 + label + tail: bucket sums of both distributions, computed independently."""
    student, teacher, labels = inputs(1)
    labels[:] = 7
    p = torch.softmax(teacher, -1)
    ids = p.topk(2, -1).indices
    ids = torch.where(ids == 7, (ids + 1) % V, ids)  # keep the label out of the slots
    ids[..., 1] = torch.where(ids[..., 1] == ids[..., 0], (ids[..., 0] + 2) % V, ids[..., 1])
    assert not (ids == 7).any() and not (ids[..., 0] == ids[..., 1]).any()

    def buckets(probs: torch.Tensor) -> torch.Tensor:
        slots = probs.gather(-1, ids)
        label = probs[..., 7:8]
        return torch.cat([slots, label, 1 - slots.sum(-1, keepdim=True) - label], -1)

    sparse = SparseTeacher(ids, buckets(p).log())
    s_b, t_b, b_labels = to_buckets(student, sparse, labels)
    assert torch.allclose(s_b.exp(), buckets(torch.softmax(student, -1)).reshape(-1, 4), atol=1e-6)
    assert torch.equal(b_labels, torch.full((B * T,), 2))  # the label's own bucket
    expected = (t_b.exp() * (t_b - s_b)).sum(-1).mean()
    assert torch.allclose(build_loss("fkl")(student, sparse, labels), expected, atol=1e-6)


def test_a_label_among_the_slots_uses_its_slot() -> None:
    student, teacher, labels = inputs(2)
    top = torch.softmax(teacher, -1).topk(3, -1)
    labels = top.indices[..., 1].clone()
    tail = torch.log1p(-top.values.sum(-1, keepdim=True))
    empty = torch.full_like(tail, float("-inf"))
    sparse = SparseTeacher(top.indices, torch.cat([top.values.log(), empty, tail], -1))
    _, _, b_labels = to_buckets(student, sparse, labels)
    assert torch.equal(b_labels, torch.ones(B * T, dtype=torch.long))
    ce_sparse = build_loss("ce")(student, sparse, labels)
    assert torch.allclose(ce_sparse, build_loss("ce")(student, None, labels), atol=1e-6)


def test_sparse_teacher_errors_name_the_problem() -> None:
    student, teacher, labels = inputs()
    sparse = every_token(teacher)
    with pytest.raises(ValueError, match="needs labels"):
        build_loss("fkl")(student, sparse, None)
    with pytest.raises(ValueError, match="vocabulary has 10"):
        build_loss("fkl")(student[..., :10], sparse, labels)
    with pytest.raises(ValueError, match="S \\+ 2"):
        build_loss("fkl")(student, SparseTeacher(sparse.ids, sparse.log_probs[..., :-1]), labels)


def test_fully_masked_sparse_batch_is_zero_with_zero_gradient() -> None:
    student, teacher, labels = inputs()
    student.requires_grad_()
    value = build_loss("atkd")(student, every_token(teacher), torch.full_like(labels, -100))
    value.backward()
    assert float(value.detach()) == 0.0 and torch.count_nonzero(student.grad) == 0


@pytest.mark.parametrize("name", ISSUE_LIST)
def test_masked_and_extreme_student_logits_stay_finite(name: str) -> None:
    student, teacher, labels = inputs(3)
    student[..., 0] = float("-inf")  # a masked vocabulary entry
    student[0, 2, 1] = 1e4
    student[1, 3, 2] = -1e4
    sparse = SparseTeacher(*_top(teacher, 3))
    student.requires_grad_()
    value = build_loss(name)(student, sparse, labels.clamp_min(1).masked_fill(labels < 0, -100))
    value.backward()
    assert torch.isfinite(value) and torch.isfinite(student.grad).all()


def _top(teacher: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    log_p = torch.log_softmax(teacher, -1)
    values, ids = log_p.topk(k, -1)
    rest = log_p.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return ids, torch.cat([values, log_p.gather(-1, ids[..., :1]) * 0 - 30.0, rest], -1)


def _reference_buckets(z, ids, target, listed):  # noqa: ANN001, ANN202
    """Plain autograd in float64: log-softmax, gathered, the tail by a masked log-sum-exp."""
    log_q = torch.log_softmax(z, -1)
    index = torch.cat([ids, target[:, None]], -1)
    picked = log_q.gather(-1, index).clone()
    picked[:, -1] = picked[:, -1].masked_fill(listed, float("-inf"))
    mask = torch.zeros_like(z, dtype=torch.bool).scatter(-1, index, True)
    rest = torch.logsumexp(log_q.masked_fill(mask, float("-inf")), -1, keepdim=True)
    return torch.cat([picked, rest], -1)


@pytest.mark.parametrize("trial", range(12))
def test_fused_bucket_sums_match_plain_autograd(trial: int) -> None:
    from kdlab.losses.sparse import BucketLogProbs

    g = torch.Generator().manual_seed(trial)
    m, vocab = 6, 5 + 3 * trial
    slots = [1, vocab, vocab - 1, 3][trial % 4]  # one id, every token, all but one, a few
    z = torch.randn(m, vocab, generator=g, dtype=torch.float64) * (1 + trial)
    z[0, 0] = float("-inf")  # a masked vocabulary entry
    z[1, 1] = 60.0  # a near one-hot row: the tail nearly cancels
    ids = torch.stack([torch.randperm(vocab, generator=g)[:slots] for _ in range(m)])
    target = torch.randint(0, vocab, (m,), generator=g)
    target[2] = ids[2, 0]  # one label among the ids
    listed = (ids == target[:, None]).any(-1)
    upstream = torch.randn(m, slots + 2, generator=g, dtype=torch.float64)
    plain, fused = z.clone().requires_grad_(), z.clone().requires_grad_()
    want = _reference_buckets(plain, ids, target, listed)
    got = BucketLogProbs.apply(fused, ids, target, listed)
    finite = torch.isfinite(want)
    assert torch.equal(finite, torch.isfinite(got))
    assert torch.allclose(got[finite], want[finite], atol=1e-9)
    weights = torch.where(finite, upstream, 0.0)
    (want.masked_fill(~finite, 0) * weights).sum().backward()
    (got.masked_fill(~finite, 0) * weights).sum().backward()
    assert torch.allclose(fused.grad, plain.grad.nan_to_num(0.0), atol=1e-8)
