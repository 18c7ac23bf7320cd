"""ATKD (`atkd`): properties, the batch median, chunked exactness and golden values."""

from __future__ import annotations

import pytest
import torch
from kd_props import (
    check_extreme_logits,
    check_fully_masked,
    check_minus_inf_finite,
    check_minus_inf_in_both_equals_dropping,
    check_no_teacher_gradient,
    check_shift_invariance,
    grad_of,
    make_batch,
)
from torch import nn

from kdlab.losses import WeightedSum, build_loss, chunked_loss, loss_info
from kdlab.losses.atkd import TIE_RTOL, split_counts
from kdlab.losses.dkd import decoupled_kl

ATOL, RTOL = 1e-5, 5e-4

# --- an independent reference: the official formula, float64 -----------------------------------
# Transcribed from WHU-ZQH/ATKD `distill/distill_trainer.py` (`DistillTrainer.atkd` and
# `get_tckd_nckd`) for rows that are already aligned (no shift): the teacher's non-target mass
# `pnt_tea` splits the counted positions at its `torch.median` (easy: strictly below), TCKD is
# the KL of the binary [target, rest] probabilities, NCKD the KL of the softmaxes over the logits
# without the target, each group's sums divided by its own count of counted positions.


def official_atkd(student, teacher, labels, alpha=0.2, temperature=1.0, median=torch.median):
    s = torch.as_tensor(student, dtype=torch.float64)
    t = torch.as_tensor(teacher, dtype=torch.float64)
    labels = torch.as_tensor(labels)
    pad = labels == -100
    gt = torch.zeros_like(s, dtype=torch.bool).scatter_(1, labels.clamp_min(0)[:, None], True)

    def binary(probs):
        return torch.stack([(probs * gt).sum(1), (probs * ~gt).sum(1)], 1)

    bin_s = binary(torch.softmax(s / temperature, 1))
    bin_t = binary(torch.softmax(t / temperature, 1))
    pnt_tea = bin_t[:, 1]
    easy = pnt_tea < median(pnt_tea[~pad])

    def group(selected):
        keep = selected & ~pad
        n = int(keep.sum())
        tckd = (bin_t[keep] * (bin_t[keep].log() - bin_s[keep].log())).sum() / n
        z_s = s[keep][~gt[keep]].view(n, -1) / temperature
        z_t = t[keep][~gt[keep]].view(n, -1) / temperature
        p = torch.softmax(z_t, 1)
        nckd = (p * (p.log() - torch.log_softmax(z_s, 1))).sum() / n
        return tckd, nckd

    _, easy_nckd = group(easy)
    hard_tckd, hard_nckd = group(~easy)
    return alpha * easy_nckd + (1 - alpha) * (hard_tckd + hard_nckd)


# Seven positions (one not counted, so six count: an even count), six tokens.
GOLDEN_STUDENT = [
    [-0.8, 1.5, -0.5, 0.2, -0.3, -2.2],
    [0.2, -0.8, -0.4, -0.8, 4.3, -0.9],
    [2.0, 0.5, -2.0, 0.0, 0.4, 2.4],
    [-2.5, -2.4, -0.2, -1.6, 2.0, 1.0],
    [-0.6, 0.9, -1.7, -0.2, -1.0, -1.2],
    [-2.1, -0.5, 0.0, -0.9, 0.1, -1.0],
    [0.3, 1.5, 0.2, -1.0, 2.0, -0.2],
]
GOLDEN_TEACHER = [
    [2.6, -0.9, -3.2, -0.4, 0.8, 1.6],
    [-2.9, 1.1, 2.7, -2.2, 2.0, -0.5],
    [-0.2, 0.2, -1.8, -3.4, -1.4, 0.2],
    [1.8, 1.8, 0.2, -4.7, 1.7, -0.3],
    [2.1, 1.3, -2.5, -3.6, 2.0, -2.0],
    [-0.5, 1.9, -0.2, 1.1, -1.9, 4.1],
    [1.5, 0.8, 1.3, -0.7, 3.0, -0.1],
]
GOLDEN_LABELS = [5, 0, -100, 4, 3, 2, 0]
# (alpha, temperature) -> value, computed once with `official_atkd` above.
GOLDEN = {
    (0.2, 1.0): 1.4649378060145368,
    (0.5, 2.0): 0.5718381311679122,
}


def golden_inputs():
    return (
        torch.tensor(GOLDEN_STUDENT, requires_grad=True),
        torch.tensor(GOLDEN_TEACHER),
        torch.tensor(GOLDEN_LABELS),
    )


@pytest.mark.parametrize(("alpha", "temperature"), sorted(GOLDEN))
def test_golden_constants_match_the_official_reference(alpha, temperature):
    ref = official_atkd(GOLDEN_STUDENT, GOLDEN_TEACHER, GOLDEN_LABELS, alpha, temperature)
    assert ref.item() == pytest.approx(GOLDEN[alpha, temperature], abs=1e-12)


@pytest.mark.parametrize(("alpha", "temperature"), sorted(GOLDEN))
def test_golden_values(alpha, temperature):
    student, teacher, labels = golden_inputs()
    value = build_loss("atkd", alpha=alpha, temperature=temperature)(student, teacher, labels)
    assert value.item() == pytest.approx(GOLDEN[alpha, temperature], abs=2e-6)


def test_gradient_matches_the_official_reference():
    student, teacher, labels = golden_inputs()
    ours = grad_of(build_loss("atkd")(student, teacher, labels), student)
    s64 = student.detach().double().requires_grad_()
    ref = grad_of(official_atkd(s64, GOLDEN_TEACHER, GOLDEN_LABELS), s64)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)


def test_median_is_the_lower_middle_value_of_the_counted_positions():
    """Six counted positions: torch.median takes the 3rd smallest u, so 2 are easy (the
    average of the middle two would make 3 easy and give another value)."""
    _, teacher, labels = golden_inputs()
    loss_fn = build_loss("atkd")
    u = loss_fn.batch_statistics(teacher, labels)["uncertainty"]
    counted = sorted(u[labels != -100].tolist())
    summary = loss_fn.summarise({"uncertainty": u[labels != -100]})
    assert summary["median"].item() == counted[2]
    assert summary["easy"].item() == 2 and summary["hard"].item() == 4
    midpoint = official_atkd(
        GOLDEN_STUDENT, GOLDEN_TEACHER, GOLDEN_LABELS, median=lambda x: x.quantile(0.5)
    )
    assert abs(midpoint.item() - GOLDEN[0.2, 1.0]) > 1e-3


def test_uncertainty_is_one_minus_teacher_target_probability_at_the_temperature():
    _, teacher, labels = golden_inputs()
    u = build_loss("atkd", temperature=2.0).batch_statistics(teacher, labels)["uncertainty"]
    p = torch.softmax(teacher.double() / 2.0, -1)
    expected = 1 - p.gather(-1, labels.clamp_min(0)[:, None]).squeeze(-1)
    torch.testing.assert_close(u.double(), expected, atol=1e-6, rtol=1e-6)


def test_value_is_the_group_means_of_decoupled_kl():
    """Mean of the per-position values = α·mean_easy(NCKD) + (1−α)·mean_hard(TCKD + NCKD)."""
    student, teacher, labels = make_batch(seed=5, b=3, t=6)
    loss_fn = build_loss("atkd", alpha=0.3)
    tckd, nckd = decoupled_kl(student, teacher, labels)
    u = loss_fn.batch_statistics(teacher, labels)["uncertainty"]
    counted = labels != -100
    easy = (u < u[counted].median()) & counted
    hard = ~easy & counted
    expected = 0.3 * nckd[easy].mean() + 0.7 * (tckd + nckd)[hard].mean()
    torch.testing.assert_close(loss_fn(student, teacher, labels), expected, atol=1e-6, rtol=1e-6)


# --- properties ---------------------------------------------------------------------------------


def test_zero_at_identical_inputs():
    student, _, labels = make_batch()
    values = build_loss("atkd").per_position(student, student.detach().clone(), labels)
    torch.testing.assert_close(values, torch.zeros_like(values), atol=1e-6, rtol=0)


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    check_fully_masked(build_loss("atkd"))


def test_invariant_to_adding_a_constant_to_all_logits():
    check_shift_invariance(build_loss("atkd"))


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    check_minus_inf_finite(build_loss("atkd"), which)


def test_minus_inf_in_both_equals_dropping_those_entries():
    check_minus_inf_in_both_equals_dropping(build_loss("atkd"))


def test_extreme_logits_give_finite_values_and_gradients():
    check_extreme_logits(build_loss("atkd"))


def test_gradient_does_not_reach_the_teacher():
    check_no_teacher_gradient(build_loss("atkd"))


def test_registered_with_methods_md_defaults():
    info = loss_info("atkd")
    assert info["hparams"] == {"alpha": 0.2, "temperature": 1.0}
    assert info["needs_labels"] and "Autoregressive" in info["paper"]
    assert build_loss("atkd").coupling == "batch"


@pytest.mark.parametrize(
    "hparams", [{"alpha": 1.5}, {"alpha": -0.1}, {"temperature": 0.0}, {"temperature": -2.0}]
)
def test_out_of_range_hparams_raise_value_error(hparams):
    with pytest.raises(ValueError, match=next(iter(hparams))):
        build_loss("atkd", **hparams)


def test_missing_labels_raise_value_error():
    student, teacher, _ = make_batch()
    with pytest.raises(ValueError, match="needs labels"):
        build_loss("atkd")(student, teacher)


# --- empty groups and ties ----------------------------------------------------------------------


def test_empty_easy_group_contributes_zero_not_nan():
    """All counted positions have the same u: none is below the median (the official code
    gives NaN here); the value is (1−α)·mean(TCKD + NCKD) over all of them."""
    student, teacher, labels = make_batch(seed=6)
    teacher = teacher[:1, :1].expand_as(teacher).clone()  # one teacher row everywhere
    labels = labels.masked_fill(labels != -100, 3)
    value = build_loss("atkd", alpha=0.2)(student, teacher, labels)
    tckd, nckd = decoupled_kl(student, teacher, labels)
    counted = labels != -100
    torch.testing.assert_close(value, 0.8 * (tckd + nckd)[counted].mean())
    assert torch.isfinite(grad_of(value, student)).all()


def test_single_counted_position():
    student, teacher, labels = make_batch(seed=7)
    labels = torch.full_like(labels, -100)
    labels[1, 2] = 4
    value = build_loss("atkd", alpha=0.2)(student, teacher, labels)
    tckd, nckd = decoupled_kl(student, teacher, labels)
    torch.testing.assert_close(value, 0.8 * (tckd + nckd)[1, 2])


def test_near_ties_below_the_median_count_as_hard():
    """Group sizes and the per-position split use one threshold, median·(1 − TIE_RTOL)."""
    u = torch.tensor([0.1, 0.5 * (1 - TIE_RTOL / 10), 0.5, 0.9, 0.3])
    summary = split_counts(u)
    assert summary["median"].item() == pytest.approx(0.5 * (1 - TIE_RTOL / 10))
    assert summary["easy"].item() == 2  # 0.1 and 0.3; the near-tie and the median are hard
    assert summary["count"].item() == 5 and summary["hard"].item() == 3
    assert split_counts(torch.tensor([]))["count"].item() == 0


# --- the batch median: chunked, micro-batches ---------------------------------------------------

N, HS, HT, VC = 23, 8, 6, 13


def hidden_inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "s_hidden": torch.randn(N, HS, generator=g).requires_grad_(),
        "s_weight": nn.Parameter(torch.randn(VC, HS, generator=g) * 0.7),
        "t_hidden": torch.randn(N, HT, generator=g),
        "t_weight": torch.randn(VC, HT, generator=g) * 0.7,
        "labels": torch.randint(0, VC, (N,), generator=g),
    }
    x["labels"][[0, 6, 13]] = -100
    return x


def logits_of(x):
    return x["s_hidden"] @ x["s_weight"].t(), x["t_hidden"] @ x["t_weight"].t()


@pytest.mark.parametrize("chunk_size", [4, 5, 7, 16])
def test_chunked_uses_the_whole_batch_median(chunk_size):
    x = hidden_inputs()
    loss_fn = build_loss("atkd")
    s_logits, t_logits = logits_of(x)
    plain = loss_fn(s_logits, t_logits, x["labels"])
    out = chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        x["labels"],
        chunk_size=chunk_size,
    )
    ref = official_atkd(s_logits.detach(), t_logits, x["labels"])
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=RTOL)
    assert out.item() == pytest.approx(ref.item(), abs=2e-6)
    params = [x["s_hidden"], x["s_weight"]]
    for g, g_ref in zip(
        torch.autograd.grad(out, params), torch.autograd.grad(plain, params), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)
    # a median taken per chunk would give another value on this input
    labels = x["labels"]
    per_chunk = (
        sum(
            loss_fn(s_logits[sl], t_logits[sl], labels[sl]) * (labels[sl] != -100).sum()
            for sl in (slice(i, i + chunk_size) for i in range(0, N, chunk_size))
        )
        / (labels != -100).sum()
    )
    assert abs(per_chunk.item() - plain.item()) > 1e-3


def test_chunked_with_ce_in_a_weighted_sum():
    x = hidden_inputs(seed=1)
    loss_fn = WeightedSum({"kd": (build_loss("atkd"), 0.7), "ce": (build_loss("ce"), 0.3)})
    s_logits, t_logits = logits_of(x)
    plain, plain_terms = loss_fn.forward_terms(s_logits, t_logits, x["labels"])
    out, terms = chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        x["labels"],
        chunk_size=6,
        return_terms=True,
    )
    torch.testing.assert_close(out, plain, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(terms["kd"], plain_terms["kd"], atol=ATOL, rtol=RTOL)


def test_micro_batches_with_num_items_give_the_token_weighted_atkd_of_each():
    """Each forward call (micro-batch) has its own median; with `num_items_in_batch` the step
    sums M_m·ATKD_m / Σ M_m, which differs from one ATKD over the whole step's positions."""
    student, teacher, labels = make_batch(seed=8, b=4, t=6)
    loss_fn = build_loss("atkd")
    parts = (slice(0, 1), slice(1, 4))
    total = int((labels != -100).sum())
    summed = sum(
        loss_fn(student[sl], teacher[sl], labels[sl], num_items_in_batch=total) for sl in parts
    )
    weighted = (
        sum(
            loss_fn(student[sl], teacher[sl], labels[sl]) * (labels[sl] != -100).sum()
            for sl in parts
        )
        / total
    )
    torch.testing.assert_close(summed, weighted, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_of(summed, student), grad_of(weighted, student))
    assert abs(summed.item() - loss_fn(student, teacher, labels).item()) > 1e-3
