"""Property checks shared by tests/test_loss_atkd.py, test_loss_dkd.py and test_loss_nkd.py.

Each check builds its own small batch and asserts one property of a built loss; the test files
call them explicitly, so every property a method has is visible in its own test file.
"""

from __future__ import annotations

import math

import torch

from kdlab.losses import KDLoss

V = 11


def make_batch(seed: int = 0, b: int = 2, t: int = 5, v: int = V, scale: float = 2.0):
    """Student/teacher logits `[b, t, v]` and labels `[b, t]` with some -100 positions."""
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g) * scale).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g) * scale
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 0] = labels[1, 3] = -100
    return student, teacher, labels


def grad_of(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def check_fully_masked(loss_fn: KDLoss) -> None:
    student, teacher, labels = make_batch()
    labels = torch.full_like(labels, -100)
    value = loss_fn(student, teacher, labels)
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def check_shift_invariance(loss_fn: KDLoss) -> None:
    """Adding a (different) constant to all logits of each position changes nothing."""
    student, teacher, labels = make_batch()
    shift_s = torch.randn(*labels.shape, 1) * 10
    shift_t = torch.randn(*labels.shape, 1) * 10
    base = loss_fn.per_position(student, teacher, labels)
    shifted = loss_fn.per_position(student + shift_s, teacher + shift_t, labels)
    torch.testing.assert_close(shifted, base, atol=2e-5, rtol=1e-4)


def masked_logits(which: str):
    """`-inf` vocabulary entries in both models (same or different ones) or in one model only;
    the ground-truth token (0) stays unmasked."""
    student, teacher, labels = make_batch(seed=3)
    student, teacher = student.detach().clone(), teacher.clone()
    labels = labels.masked_fill(labels != -100, 0)
    mask_s = torch.zeros(V, dtype=torch.bool)
    mask_t = torch.zeros(V, dtype=torch.bool)
    if which in ("same", "different", "student"):
        mask_s[[2, 5, 7]] = True
    if which in ("same", "teacher"):
        mask_t[[2, 5, 7]] = True
    if which == "different":
        mask_t[[2, 5, 9]] = True
    student[..., mask_s] = -math.inf
    teacher[..., mask_t] = -math.inf
    return student.requires_grad_(), teacher, labels


def check_minus_inf_finite(loss_fn: KDLoss, which: str) -> None:
    student, teacher, labels = masked_logits(which)
    values = loss_fn.per_position(student, teacher, labels)  # every position, masked ones too
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad_of(value, student)).all()


def check_minus_inf_in_both_equals_dropping(loss_fn: KDLoss) -> None:
    """Entries that both models mask carry no mass: the loss is the one on the other entries."""
    student, teacher, labels = masked_logits("same")
    keep = torch.isfinite(student[0, 0].detach()) & torch.isfinite(teacher[0, 0])
    full = loss_fn.per_position(student, teacher, labels)
    kept = loss_fn.per_position(student[..., keep], teacher[..., keep], labels)  # y = 0 stays 0
    torch.testing.assert_close(full, kept, atol=1e-6, rtol=1e-5)


def check_extreme_logits(loss_fn: KDLoss) -> None:
    student, teacher, labels = make_batch(seed=4, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    values = loss_fn.per_position(student, teacher, labels)
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()
    assert torch.isfinite(grad_of(loss_fn(student, teacher, labels), student)).all()


def check_no_teacher_gradient(loss_fn: KDLoss) -> None:
    student, teacher, labels = make_batch()
    teacher = teacher.clone().requires_grad_()
    loss_fn(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0
