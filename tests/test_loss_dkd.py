"""DKD (`dkd`): properties, the step warm-up and its state, golden values."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
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
from safetensors.torch import load_file, save_file

from kdlab.losses import WeightedSum, build_loss, loss_info

# No warm-up, for the properties that do not concern it.
PLAIN = {"warmup": 0}

# --- an independent reference: the official formula, float64 -----------------------------------
# Transcribed from megvii-research/mdistiller `mdistiller/distillers/DKD.py` (`dkd_loss`,
# `_get_gt_mask`, `cat_mask`, and `DKD.forward_train`'s `min(epoch / warmup, 1)`): binary
# [target, rest] probabilities at temperature T, the non-target part by subtracting 1000 from the
# target logit before the softmax, KL sums times T² divided by the batch size.


def official_dkd(
    student, teacher, labels, alpha=1.0, beta=8.0, temperature=4.0, epoch=1, warmup=20
):
    s = torch.as_tensor(student, dtype=torch.float64)
    t = torch.as_tensor(teacher, dtype=torch.float64)
    target = torch.as_tensor(labels)
    gt = torch.zeros_like(s).scatter_(1, target[:, None], 1).bool()

    def cat_mask(probs):
        return torch.cat([(probs * gt).sum(1, keepdim=True), (probs * ~gt).sum(1, keepdim=True)], 1)

    bin_s = cat_mask(F.softmax(s / temperature, 1))
    bin_t = cat_mask(F.softmax(t / temperature, 1))
    n = target.shape[0]
    tckd = F.kl_div(torch.log(bin_s), bin_t, reduction="sum") * temperature**2 / n
    p_non = F.softmax(t / temperature - 1000.0 * gt, 1)
    log_q_non = F.log_softmax(s / temperature - 1000.0 * gt, 1)
    nckd = F.kl_div(log_q_non, p_non, reduction="sum") * temperature**2 / n
    return min(epoch / warmup, 1.0) * (alpha * tckd + beta * nckd)


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
GOLDEN_LABELS = [5, 0, 1, 4, 3, 2, 0]
# Computed once with `official_dkd` above; kdlab's hyperparameters and steps finished beside.
GOLDEN = {
    # mdistiller defaults at epoch 5 of a 20-epoch warm-up = kdlab after 4 optimiser steps
    "defaults_epoch5": (
        {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "epoch": 5, "warmup": 20},
        {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20},
        4,
        3.860923595949664,
    ),
    "defaults_warm": (
        {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "epoch": 20, "warmup": 20},
        {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20},
        19,
        15.443694383798656,
    ),
    # the language-model setting (METHODS.md): alpha=1, beta=0.5, τ=1, no warm-up
    "lm_setting": (
        {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "epoch": 20, "warmup": 20},
        {"alpha": 1.0, "beta": 0.5, "temperature": 1.0, "warmup": 0},
        0,
        0.8641957709513189,
    ),
}


def golden_inputs():
    return (
        torch.tensor(GOLDEN_STUDENT, requires_grad=True),
        torch.tensor(GOLDEN_TEACHER),
        torch.tensor(GOLDEN_LABELS),
    )


def after_steps(loss_fn, k: int, total: int = 100):
    for step in range(1, k + 1):
        loss_fn.on_step(step, total, 1.0)
    return loss_fn


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_constants_match_the_official_reference(case):
    official, _, _, value = GOLDEN[case]
    ref = official_dkd(GOLDEN_STUDENT, GOLDEN_TEACHER, GOLDEN_LABELS, **official)
    assert ref.item() == pytest.approx(value, abs=1e-12)


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_values(case):
    _, hparams, steps, value = GOLDEN[case]
    loss_fn = after_steps(build_loss("dkd", **hparams), steps)
    student, teacher, labels = golden_inputs()
    assert loss_fn(student, teacher, labels).item() == pytest.approx(value, rel=1e-6)


def test_gradient_matches_the_official_reference():
    student, teacher, labels = golden_inputs()
    ours = grad_of(build_loss("dkd", warmup=0)(student, teacher, labels), student)
    s64 = student.detach().double().requires_grad_()
    ref = grad_of(official_dkd(s64, GOLDEN_TEACHER, GOLDEN_LABELS, epoch=20), s64)
    torch.testing.assert_close(ours.double(), ref, atol=1e-6, rtol=1e-5)


def test_mean_over_counted_positions_is_the_per_sample_mean_of_the_counted_rows():
    student, teacher, labels = golden_inputs()
    labels = labels.clone()
    labels[[1, 4]] = -100
    keep = labels != -100
    ours = build_loss("dkd", warmup=0)(student, teacher, labels)
    ref = official_dkd(student.detach()[keep], teacher[keep], labels[keep], epoch=20)
    assert ours.item() == pytest.approx(ref.item(), rel=1e-6)


def test_terms_are_tckd_and_nckd_times_temperature_squared():
    student, teacher, labels = make_batch()
    loss_fn = after_steps(build_loss("dkd", alpha=0.7, beta=3.0, temperature=2.0, warmup=10), 3)
    total, terms = loss_fn.forward_terms(student, teacher, labels)
    assert loss_fn.term_weights() == {"dkd": 1.0, "tckd": 0.0, "nckd": 0.0}
    torch.testing.assert_close(total, 0.4 * (0.7 * terms["tckd"] + 3.0 * terms["nckd"]))
    keep = labels != -100
    s, t = student.detach()[keep], teacher[keep]
    tckd = official_dkd(s, t, labels[keep], 1.0, 0.0, 2.0, epoch=1, warmup=1)
    nckd = official_dkd(s, t, labels[keep], 0.0, 1.0, 2.0, epoch=1, warmup=1)
    assert terms["tckd"].item() == pytest.approx(tckd.item(), rel=1e-5)
    assert terms["nckd"].item() == pytest.approx(nckd.item(), rel=1e-5)


# --- the warm-up --------------------------------------------------------------------------------


def test_warmup_factor_sequence():
    loss_fn = build_loss("dkd")  # warmup = 20
    assert loss_fn.warmup_factor().item() == pytest.approx(1 / 20)
    for k in range(1, 25):
        loss_fn.on_step(k, 100, 1.0)
        assert loss_fn.warmup_factor().item() == pytest.approx(min((k + 1) / 20, 1.0))
        assert loss_fn.log_values() == {"dkd/warmup_factor": pytest.approx(min((k + 1) / 20, 1))}


def test_warmup_zero_means_factor_one_from_the_start():
    loss_fn = build_loss("dkd", alpha=1.0, beta=8.0, temperature=4.0, warmup=0)
    assert loss_fn.warmup_factor().item() == 1.0
    assert loss_fn.log_values() == {"dkd/warmup_factor": 1.0}


@pytest.mark.parametrize("steps", [0, 3, 7, 30])
def test_value_and_gradient_scale_by_the_warmup_factor(steps):
    student, teacher, labels = make_batch()
    full = build_loss("dkd", warmup=0)(student, teacher, labels)
    loss_fn = after_steps(build_loss("dkd", warmup=8), steps)
    value = loss_fn(student, teacher, labels)
    factor = min((steps + 1) / 8, 1.0)
    torch.testing.assert_close(value, factor * full)
    torch.testing.assert_close(grad_of(value, student), factor * grad_of(full, student))


def test_state_dict_round_trip_restores_the_factor(tmp_path):
    trained = after_steps(build_loss("dkd", warmup=10), 4)
    path = tmp_path / "loss.safetensors"
    save_file({k: v.contiguous() for k, v in trained.state_dict().items()}, str(path))
    fresh = build_loss("dkd", warmup=10)
    assert fresh.warmup_factor().item() == pytest.approx(0.1)
    fresh.load_state_dict(load_file(str(path)))
    assert fresh.warmup_factor().item() == pytest.approx(0.5)
    student, teacher, labels = make_batch()
    torch.testing.assert_close(
        fresh(student, teacher, labels), trained(student, teacher, labels), atol=0, rtol=0
    )


def test_weighted_sum_routes_on_step_and_logs_the_factor():
    loss_fn = WeightedSum({"kd": (build_loss("dkd", warmup=4), 0.5), "ce": (build_loss("ce"), 0.5)})
    assert loss_fn.log_values() == {"dkd/warmup_factor": 0.25}
    loss_fn.on_step(1, 10, 2.0, {"kd": 1.0, "kd/tckd": 0.1, "kd/nckd": 0.2, "ce": 3.0})
    assert loss_fn.log_values() == {"dkd/warmup_factor": 0.5}


# --- properties ---------------------------------------------------------------------------------


def test_zero_at_identical_inputs():
    student, _, labels = make_batch()
    values = build_loss("dkd").per_position(student, student.detach().clone(), labels)
    torch.testing.assert_close(values, torch.zeros_like(values), atol=1e-5, rtol=0)


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    check_fully_masked(build_loss("dkd"))


def test_invariant_to_adding_a_constant_to_all_logits():
    check_shift_invariance(build_loss("dkd", **PLAIN))


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    check_minus_inf_finite(build_loss("dkd", **PLAIN), which)


def test_minus_inf_in_both_equals_dropping_those_entries():
    check_minus_inf_in_both_equals_dropping(build_loss("dkd", **PLAIN))


def test_extreme_logits_give_finite_values_and_gradients():
    check_extreme_logits(build_loss("dkd", **PLAIN))
    check_extreme_logits(build_loss("dkd", temperature=1.0, **PLAIN))


def test_extreme_logits_leave_the_target_out_of_the_non_target_part():
    """mdistiller's −1000 mask fails once logits exceed ~1000·τ; kdlab drops y exactly."""
    student = torch.tensor([[1e4, 0.0, 1.0, 2.0]])
    teacher = torch.tensor([[1e4, 2.0, 1.0, 0.0]])
    labels = torch.tensor([0])
    _, terms = build_loss("dkd", temperature=1.0, **PLAIN).forward_terms(student, teacher, labels)
    p, q = teacher[0, 1:].softmax(-1), student[0, 1:].softmax(-1)
    assert terms["nckd"].item() == pytest.approx((p * (p / q).log()).sum().item(), rel=1e-5)


def test_gradient_does_not_reach_the_teacher():
    check_no_teacher_gradient(build_loss("dkd", **PLAIN))


def test_registered_with_methods_md_defaults():
    info = loss_info("dkd")
    assert info["hparams"] == {"alpha": 1.0, "beta": 8.0, "temperature": 4.0, "warmup": 20}
    assert info["needs_labels"] and "Decoupled" in info["paper"]


@pytest.mark.parametrize(
    "hparams",
    [
        {"alpha": -1.0},
        {"beta": -0.5},
        {"temperature": 0.0},
        {"warmup": -1},
        {"warmup": 2.5},
        {"warmup": True},
    ],
)
def test_out_of_range_hparams_raise_value_error(hparams):
    with pytest.raises(ValueError, match=next(iter(hparams))):
        build_loss("dkd", **hparams)


def test_missing_labels_raise_value_error():
    student, teacher, _ = make_batch()
    with pytest.raises(ValueError, match="needs labels"):
        build_loss("dkd")(student, teacher)
