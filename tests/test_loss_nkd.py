"""NKD (`nkd`): properties, the divergence form of the non-target part, golden values."""

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

from kdlab.losses import build_loss, loss_info

# --- an independent reference: the official formula, float64 -----------------------------------
# Transcribed from yzd-v/cls_KD `mmcls/distillation/losses/nkd.py` (`NKDLoss.forward`): the
# target part −mean(p_y · log q_y) at temperature 1, the non-target part
# −γ·T²·mean Σ softmax(z_t,≠y / T) · log_softmax(z_s,≠y / T) over the logits without y
# (the mask `scatter_(1, label, 0)`). It returns the cross-entropy form.


def official_nkd(student, teacher, labels, gamma=1.5, temp=1.0):
    logit_s = torch.as_tensor(student, dtype=torch.float64)
    logit_t = torch.as_tensor(teacher, dtype=torch.float64)
    label = torch.as_tensor(labels).view(-1, 1)
    n = logit_s.shape[0]
    s_t = torch.gather(F.log_softmax(logit_s, 1), 1, label)
    t_t = torch.gather(F.softmax(logit_t, 1), 1, label).detach()
    loss_t = -(t_t * s_t).mean()
    mask = torch.ones_like(logit_s).scatter_(1, label, 0).bool()
    log_q = F.log_softmax(logit_s[mask].reshape(n, -1) / temp, 1)
    p = F.softmax(logit_t[mask].reshape(n, -1) / temp, 1)
    loss_non = -gamma * temp**2 * (p * log_q).sum(1).mean()
    return loss_t + loss_non


def non_target_entropy(teacher, labels, temp):
    """Mean over rows of H(p̂): the entropy of the teacher's renormalised non-target softmax."""
    logit_t = torch.as_tensor(teacher, dtype=torch.float64)
    n = logit_t.shape[0]
    mask = torch.ones_like(logit_t).scatter_(1, torch.as_tensor(labels).view(-1, 1), 0).bool()
    p = F.softmax(logit_t[mask].reshape(n, -1) / temp, 1)
    return -(p * p.log()).sum(1).mean()


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
# (gamma, temperature) -> (official cross-entropy form, kdlab's value = official − γτ²·H(p̂)),
# both computed once with the two functions above.
GOLDEN = {
    (1.5, 1.0): (3.6846026778687015, 2.284648812078936),
    (2.0, 3.0): (30.292252029556334, 3.973339585613015),
}


def golden_inputs():
    return (
        torch.tensor(GOLDEN_STUDENT, requires_grad=True),
        torch.tensor(GOLDEN_TEACHER),
        torch.tensor(GOLDEN_LABELS),
    )


@pytest.mark.parametrize(("gamma", "temperature"), sorted(GOLDEN))
def test_golden_constants_match_the_official_reference(gamma, temperature):
    official, ours = GOLDEN[gamma, temperature]
    ref = official_nkd(GOLDEN_STUDENT, GOLDEN_TEACHER, GOLDEN_LABELS, gamma, temperature)
    assert ref.item() == pytest.approx(official, abs=1e-12)
    shift = gamma * temperature**2 * non_target_entropy(GOLDEN_TEACHER, GOLDEN_LABELS, temperature)
    assert (ref - shift).item() == pytest.approx(ours, abs=1e-12)


@pytest.mark.parametrize(("gamma", "temperature"), sorted(GOLDEN))
def test_golden_values(gamma, temperature):
    student, teacher, labels = golden_inputs()
    value = build_loss("nkd", gamma=gamma, temperature=temperature)(student, teacher, labels)
    assert value.item() == pytest.approx(GOLDEN[gamma, temperature][1], rel=1e-6)


@pytest.mark.parametrize(("gamma", "temperature"), [(1.5, 1.0), (2.0, 3.0), (0.5, 0.5)])
def test_differs_from_official_by_non_target_entropy_with_equal_gradients(gamma, temperature):
    student, teacher, labels = make_batch(seed=9, b=2, t=4)
    student = student.detach().reshape(8, -1).requires_grad_()  # [8, V]: all positions count
    teacher, labels = teacher.reshape(8, -1), labels.reshape(8).clamp_min(0)
    ours = build_loss("nkd", gamma=gamma, temperature=temperature)(student, teacher, labels)
    s64 = student.detach().double().requires_grad_()
    official = official_nkd(s64, teacher, labels, gamma, temperature)
    entropy = non_target_entropy(teacher, labels, temperature)
    assert ours.item() == pytest.approx(
        (official - gamma * temperature**2 * entropy).item(), rel=1e-5, abs=1e-6
    )
    assert abs(official.item() - ours.item()) > 0.05  # the entropy is not negligible here
    torch.testing.assert_close(
        grad_of(ours, student).double(), grad_of(official, s64), atol=1e-6, rtol=1e-5
    )


def test_value_at_identical_inputs_is_minus_p_y_log_p_y():
    """The target part −p_y·log q_y has no divergence form: at q = p it is −p_y·log p_y ≥ 0
    (the non-target KL is 0 there)."""
    student, _, labels = make_batch()
    teacher = student.detach().clone()
    values = build_loss("nkd", gamma=1.5, temperature=2.0).per_position(student, teacher, labels)
    p = torch.softmax(teacher.double(), -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(values.double(), -p * p.log(), atol=1e-6, rtol=1e-5)
    assert (values > 0).all()


def test_target_part_ignores_the_temperature():
    """Only the non-target part uses τ; with gamma=0 the temperature changes nothing."""
    student, teacher, labels = make_batch()
    a = build_loss("nkd", gamma=0.0, temperature=1.0).per_position(student, teacher, labels)
    b = build_loss("nkd", gamma=0.0, temperature=4.0).per_position(student, teacher, labels)
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    p = torch.softmax(teacher, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    q = torch.log_softmax(student, -1).gather(-1, labels.clamp_min(0)[..., None])[..., 0]
    torch.testing.assert_close(a, -p * q)


# --- properties ---------------------------------------------------------------------------------


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    check_fully_masked(build_loss("nkd"))


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_invariant_to_adding_a_constant_to_all_logits(temperature):
    check_shift_invariance(build_loss("nkd", temperature=temperature))


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    check_minus_inf_finite(build_loss("nkd"), which)


def test_minus_inf_in_both_equals_dropping_those_entries():
    check_minus_inf_in_both_equals_dropping(build_loss("nkd", temperature=2.0))


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_extreme_logits_give_finite_values_and_gradients(temperature):
    check_extreme_logits(build_loss("nkd", temperature=temperature))


def test_gradient_does_not_reach_the_teacher():
    check_no_teacher_gradient(build_loss("nkd"))


def test_registered_with_methods_md_defaults():
    info = loss_info("nkd")
    assert info["hparams"] == {"gamma": 1.5, "temperature": 1.0}
    assert info["needs_labels"] and "Normalized Loss" in info["paper"]


@pytest.mark.parametrize("hparams", [{"gamma": -0.5}, {"temperature": 0.0}])
def test_out_of_range_hparams_raise_value_error(hparams):
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match=next(iter(hparams))):
        build_loss("nkd", **hparams)(student, teacher, labels)


def test_missing_labels_raise_value_error():
    student, teacher, _ = make_batch()
    with pytest.raises(ValueError, match="needs labels"):
        build_loss("nkd")(student, teacher)
