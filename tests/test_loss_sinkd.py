"""SinKD (`sinkd`): properties, golden values from the official code, groups, chunked parity."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlab.losses import WeightedSum, build_loss, chunked_loss, loss_info

V = 11
ATOL, RTOL = 1e-5, 5e-4  # fp32 chunked parity, as tests/test_losses_chunked.py


def make_rows(seed: int = 0, n: int = 9, v: int = V, scale: float = 2.0):
    """Student/teacher logits `[n, v]` and labels `[n]` with two uncounted positions."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(n, v, generator=g) * scale).requires_grad_()
    teacher = torch.randn(n, v, generator=g) * scale
    labels = torch.randint(0, v, (n,), generator=g)
    labels[1] = labels[6] = -100
    return student, teacher, labels


def grad_of(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def terms(loss_fn, student, teacher, labels=None) -> torch.Tensor:
    """Per-position values `[...]` through the base class (uncounted rows dropped, groups)."""
    return loss_fn.terms(student, teacher, labels)["sinkd"]


# --- registry and hyperparameters ----------------------------------------------------------


def test_registered_with_methods_md_defaults():
    info = loss_info("sinkd")
    assert info["hparams"] == {
        "temperature": 2.0,
        "epsilon": 0.1,
        "iters": 20,
        "weight": 0.001,
        "group_size": 64,
    }
    assert "Sinkhorn" in info["paper"] and not info["needs_labels"]
    loss_fn = build_loss("sinkd", group_size=8)
    assert loss_fn.coupling == "group" and loss_fn.group_size == 8


@pytest.mark.parametrize(
    "hparams",
    [
        {"temperature": 0.0},
        {"epsilon": 0.0},
        {"epsilon": -0.1},
        {"epsilon": math.inf},
        {"iters": 0},
        {"iters": 2.5},
        {"weight": -1.0},
        {"group_size": 0},
        {"group_size": 8.0},
    ],
)
def test_out_of_range_hparams_raise_value_error(hparams):
    with pytest.raises(ValueError, match=next(iter(hparams))):
        build_loss("sinkd", **hparams)


# --- properties -----------------------------------------------------------------------------


def test_per_position_shape_and_float32():
    student, teacher, labels = make_rows()
    values = terms(build_loss("sinkd"), student.bfloat16(), teacher.bfloat16(), labels)
    assert values.shape == labels.shape and values.dtype == torch.float32
    assert (values[labels == -100] == 0).all() and (values[labels != -100] > 0).all()


def test_identical_inputs_give_the_official_nonzero_value_below_a_perturbed_input():
    """Not 0 at identity: the entropic plan puts mass on off-diagonal pairs, whose cost is > 0.

    At identity the value equals the official formula, is below the value at a perturbed student,
    and tends to 0 as ε → 0 (the plan becomes the identity permutation, of cost 0)."""
    _, teacher, _ = make_rows(seed=1)
    loss_fn = build_loss("sinkd")
    at_identity = loss_fn(teacher.clone(), teacher)
    official = sum(_official_sinkd(teacher.tolist(), teacher.tolist())) / len(teacher)
    assert at_identity.item() == pytest.approx(official, rel=1e-4)
    assert at_identity.item() > 0
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        perturbed = teacher + torch.randn(teacher.shape, generator=g)
        assert loss_fn(perturbed, teacher) > at_identity
    sharp = build_loss("sinkd", epsilon=0.01)(teacher.clone(), teacher)
    assert sharp.item() < 1e-6 * at_identity.item()


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    student, teacher, labels = make_rows()
    labels = torch.full_like(labels, -100)
    value = build_loss("sinkd")(student, teacher, labels)
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_invariant_to_adding_a_constant_to_all_logits():
    student, teacher, labels = make_rows()
    loss_fn = build_loss("sinkd", group_size=4)
    shift_s = torch.randn(*labels.shape, 1) * 10  # a different constant per position
    shift_t = torch.randn(*labels.shape, 1) * 10
    base = terms(loss_fn, student, teacher, labels)
    shifted = terms(loss_fn, student + shift_s, teacher + shift_t, labels)
    torch.testing.assert_close(shifted, base, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    student, teacher, labels = make_rows(seed=3)
    student, teacher = student.detach().clone(), teacher.clone()
    if which in ("same", "different", "student"):
        student[:, [2, 5, 7]] = -math.inf
    if which in ("same", "teacher"):
        teacher[:, [2, 5, 7]] = -math.inf
    if which == "different":
        teacher[:, [2, 5, 9]] = -math.inf
    student.requires_grad_()
    loss_fn = build_loss("sinkd", group_size=4)
    values = terms(loss_fn, student, teacher, labels)
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad_of(value, student)).all()


def test_extreme_logits_give_finite_values_and_gradients():
    student, teacher, labels = make_rows(seed=4, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = build_loss("sinkd", group_size=4)
    values = terms(loss_fn, student, teacher, labels)
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()
    assert torch.isfinite(grad_of(loss_fn(student, teacher, labels), student)).all()


def test_gradient_does_not_reach_the_teacher():
    student, teacher, labels = make_rows()
    teacher = teacher.clone().requires_grad_()
    build_loss("sinkd")(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_log_domain_stays_finite_where_the_official_normalisation_underflows():
    """ε = 0.01 with peaked distributions: exp(−W/ε) underflows to 0 in float32 for whole rows,
    and the official `x / x.sum()` gives NaN; kdlab's log-domain iteration gives the float64
    value of the official formula."""
    student, teacher, _ = make_rows(seed=5, n=8, scale=10.0)
    s, t = student.detach().double(), teacher.double()
    official32 = _official_sinkhorn_torch(s.float(), t.float(), epsilon=0.01)
    official64 = _official_sinkhorn_torch(s, t, epsilon=0.01)
    assert torch.isnan(official32)
    ours = build_loss("sinkd", epsilon=0.01)(student, teacher)
    assert ours.item() == pytest.approx(official64.item(), rel=1e-4)  # one group: mean = official
    assert torch.isfinite(grad_of(ours, student)).all()


def _official_sinkhorn_torch(s: torch.Tensor, t: torch.Tensor, epsilon: float) -> torch.Tensor:
    """2018cx/SinKD loss.py `Sinkhorn.forward` on one batch, written with torch (any dtype)."""
    p_s, p_t = torch.softmax(s / 2.0, dim=1), torch.softmax(t / 2.0, dim=1)
    cost = torch.cdist(p_s, p_t, p=1)
    plan = torch.exp(-cost / epsilon)
    for _ in range(20):
        plan = plan / plan.sum(dim=1, keepdim=True)
        plan = plan / plan.sum(dim=0, keepdim=True)
    return 0.001 * (plan * cost).sum()


# --- groups -----------------------------------------------------------------------------------


def test_groups_are_independent_and_made_of_counted_positions_only():
    """The O(N²) cost bound: changing a row of another group leaves this group's values alone."""
    student, teacher, _ = make_rows(seed=6, n=10)
    loss_fn = build_loss("sinkd", group_size=4)  # groups: rows 0-3, 4-7, 8-9
    base = terms(loss_fn, student, teacher)
    other = student.detach().clone()
    other[5] += torch.linspace(-3.0, 3.0, V)  # a row of the second group
    changed = terms(loss_fn, other, teacher)
    torch.testing.assert_close(changed[:4], base[:4], atol=0, rtol=0)
    torch.testing.assert_close(changed[8:], base[8:], atol=0, rtol=0)
    assert not torch.allclose(changed[4:8], base[4:8])
    # an uncounted position in between does not shift the groups of the counted ones
    padded_s = torch.cat([student[:2], torch.randn(1, V), student[2:]])
    padded_t = torch.cat([teacher[:2], torch.randn(1, V), teacher[2:]])
    labels = torch.zeros(11, dtype=torch.long)
    labels[2] = -100
    padded = terms(loss_fn, padded_s, padded_t, labels)
    assert padded[2].item() == 0.0
    torch.testing.assert_close(padded[labels != -100], base, atol=1e-7, rtol=1e-6)


def test_mean_over_a_group_is_the_official_value_and_groups_combine_by_size():
    student, teacher, _ = make_rows(seed=7, n=7)
    s, t = student.tolist(), teacher.tolist()
    values = terms(build_loss("sinkd", group_size=4), student, teacher)  # groups of 4 and 3
    first, last = _official_sinkd(s[:4], t[:4]), _official_sinkd(s[4:], t[4:])
    assert values[:4].mean().item() == pytest.approx(_official_total(s[:4], t[:4]), rel=1e-4)
    assert values[4:].mean().item() == pytest.approx(_official_total(s[4:], t[4:]), rel=1e-4)
    torch.testing.assert_close(values[:4], torch.tensor(first), atol=1e-9, rtol=1e-4)
    torch.testing.assert_close(values[4:], torch.tensor(last), atol=1e-9, rtol=1e-4)
    whole = build_loss("sinkd", group_size=4)(student, teacher).item()
    expected = (4 * _official_total(s[:4], t[:4]) + 3 * _official_total(s[4:], t[4:])) / 7
    assert whole == pytest.approx(expected, rel=1e-4)


# --- golden values ----------------------------------------------------------------------------
# Reference: a plain-Python transcription of 2018cx/SinKD loss.py, class `Sinkhorn` (commit
# eb4b3da): softmax(y/T) with T = 2 on both models, W = cdist(p_s, p_t, p=1), K = exp(-W/0.1),
# 20 rounds of `x / x.sum(dim=1)` then `x / x.sum(dim=0)`, value = 0.001 * sum(P * W).
# `_official_sinkd` also returns the per-column split `0.001 * G * sum_i P_ij W_ij` that kdlab
# reports per position (its mean over the group is the official value). GOLDEN holds kdlab's
# mean over the five rows: one group (default group_size), or groups of 3 and 2 rows.

GOLDEN_STUDENT = [
    [1.0, 0.5, -1.0, 0.0, 0.3, -0.7],
    [0.2, 2.5, -0.3, 1.1, -0.4, 0.6],
    [-1.2, 0.0, 0.8, 0.4, 1.5, -0.2],
    [0.7, -0.6, 0.1, 2.0, -1.1, 0.3],
    [0.0, 0.9, 1.3, -0.5, 0.2, -1.4],
]
GOLDEN_TEACHER = [
    [2.0, 0.0, -0.5, -1.0, 0.5, -2.0],
    [0.3, 0.2, 0.1, 0.0, -0.1, -0.2],
    [-0.8, 0.4, 1.6, 0.2, 0.9, -0.6],
    [1.1, -0.2, -0.4, 1.7, -0.9, 0.0],
    [0.5, 1.2, 0.6, -0.3, -0.7, -1.0],
]
GOLDEN = {5: 0.0016660751980103485, 3: 0.0008768428229737515}  # group_size -> mean over the rows


def _softmax(z: list[float], temperature: float = 2.0) -> list[float]:
    m = max(z)
    e = [math.exp((x - m) / temperature) for x in z]
    return [x / sum(e) for x in e]


def _official_plan(student: list[list[float]], teacher: list[list[float]]):
    p_s = [_softmax(z) for z in student]
    p_t = [_softmax(z) for z in teacher]
    cost = [[sum(abs(a - b) for a, b in zip(x, y, strict=True)) for y in p_t] for x in p_s]
    plan = [[math.exp(-c / 0.1) for c in row] for row in cost]
    for _ in range(20):
        plan = [[x / sum(row) for x in row] for row in plan]  # dim=1: each row sums to 1
        cols = [sum(row[j] for row in plan) for j in range(len(plan[0]))]
        plan = [[x / cols[j] for j, x in enumerate(row)] for row in plan]  # dim=0
    return plan, cost


def _official_total(student: list[list[float]], teacher: list[list[float]]) -> float:
    plan, cost = _official_plan(student, teacher)
    pairs = zip(plan, cost, strict=True)
    return 0.001 * sum(p * c for pr, cr in pairs for p, c in zip(pr, cr, strict=True))


def _official_sinkd(student: list[list[float]], teacher: list[list[float]]) -> list[float]:
    """Per-position split `0.001 · G · Σ_i P_ij W_ij` of the official value (sum = G · value)."""
    plan, cost = _official_plan(student, teacher)
    n = len(plan)
    return [0.001 * n * sum(plan[i][j] * cost[i][j] for i in range(n)) for j in range(n)]


def _reference_mean(group_size: int) -> float:
    values: list[float] = []
    for start in range(0, len(GOLDEN_STUDENT), group_size):
        sl = slice(start, start + group_size)
        values += _official_sinkd(GOLDEN_STUDENT[sl], GOLDEN_TEACHER[sl])
    return sum(values) / len(values)


@pytest.mark.parametrize("group_size", sorted(GOLDEN))
def test_golden_constants_match_the_independent_reference(group_size):
    assert _reference_mean(group_size) == pytest.approx(GOLDEN[group_size], abs=1e-15)


@pytest.mark.parametrize("group_size", sorted(GOLDEN))
def test_golden_values(group_size):
    student, teacher = torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER)
    value = build_loss("sinkd", group_size=group_size)(student, teacher)
    assert value.item() == pytest.approx(GOLDEN[group_size], rel=1e-5)


def test_golden_one_group_is_the_official_batch_value_over_the_batch_size():
    official = _official_total(GOLDEN_STUDENT, GOLDEN_TEACHER)  # the official scalar
    assert GOLDEN[5] == pytest.approx(official, rel=1e-12)


def test_gradient_matches_the_official_formula_through_plan_and_cost():
    student = torch.tensor(GOLDEN_STUDENT, dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor(GOLDEN_TEACHER, dtype=torch.float64)
    official = _official_sinkhorn_torch(student, teacher, epsilon=0.1)  # nothing detached
    ours_in = student.detach().float().requires_grad_()
    ours = build_loss("sinkd")(ours_in, teacher.float())
    assert ours.item() == pytest.approx(official.item(), rel=1e-5)
    torch.testing.assert_close(
        grad_of(ours, ours_in).double(), grad_of(official, student), atol=1e-8, rtol=1e-3
    )


# --- chunked path: groups that span chunk boundaries ----------------------------------------

N, HS, HT, VC = 37, 16, 12, 50


def make_hidden(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "s_hidden": torch.randn(N, HS, generator=g).requires_grad_(),
        "s_weight": nn.Parameter(torch.randn(VC, HS, generator=g) * 0.5),
        "t_hidden": torch.randn(N, HT, generator=g),
        "t_weight": torch.randn(VC, HT, generator=g) * 0.5,
        "labels": torch.randint(0, VC, (N,), generator=g),
    }
    x["labels"][::4] = -100
    return x


SINKD_4 = build_loss("sinkd", group_size=4)  # 27 counted rows: 6 groups of 4 and one of 3
WITH_CE = WeightedSum({"kd": (SINKD_4, 0.7), "ce": (build_loss("ce"), 0.3)})


@pytest.mark.parametrize("num_items", [None, 61])
@pytest.mark.parametrize("chunk_size", [1, 5, 8, 9, 1024])
@pytest.mark.parametrize("loss_fn", [SINKD_4, WITH_CE], ids=["sinkd", "sinkd+ce"])
def test_chunked_matches_plain_when_groups_are_smaller_than_the_batch(
    loss_fn, chunk_size, num_items
):
    x = make_hidden()
    s_logits, t_logits = x["s_hidden"] @ x["s_weight"].t(), x["t_hidden"] @ x["t_weight"].t()
    ref = loss_fn(s_logits, t_logits, x["labels"], num_items_in_batch=num_items)
    out = chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        x["labels"],
        chunk_size=chunk_size,
        num_items_in_batch=num_items,
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    params = [x["s_hidden"], x["s_weight"]]
    for g, g_ref in zip(
        torch.autograd.grad(out, params), torch.autograd.grad(ref, params), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)
