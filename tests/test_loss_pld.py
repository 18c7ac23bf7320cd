"""PLD (Plackett-Luce Distillation): properties, the teacher-optimal ranking and golden values."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses import build_loss, loss_info
from kdlab.losses.pld import teacher_optimal_order

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


# --- reference: the paper's formula, one step k at a time, in plain Python floats ------------
# "PLD: A Choice-Theoretic List-Wise Knowledge Distillation" (Bassam, Zhu, Bian, 2025), Sec. 4.2
# and Appendix C: π = (y, then the other tokens by descending teacher logit), α_k = softmax(t/τ)
# at π_k, L = Σ_k α_k [log Σ_{l ≥ k} exp(s[π_l]) − s[π_k]]. Ties between teacher logits are
# broken as kdlab documents (the higher vocabulary index first); a step whose token the student
# masks with -inf is left out (kdlab's documented choice; the true value there is +inf).


def _ref_pld(s: list[float], t: list[float], y: int, temperature: float = 1.0) -> float:
    others = sorted((i for i in range(len(t)) if i != y), key=lambda i: (-t[i], -i))
    pi = [y, *others]
    m = max(x / temperature for x in t)
    e = [math.exp(x / temperature - m) for x in t]
    alpha = [x / sum(e) for x in e]
    total = 0.0
    for k in range(len(pi)):
        if s[pi[k]] == -math.inf:
            continue
        rest = [s[pi[l]] for l in range(k, len(pi))]  # noqa: E741
        top = max(rest)
        lse = top + math.log(sum(math.exp(x - top) for x in rest))
        total += alpha[pi[k]] * (lse - s[pi[k]])
    return total


# --- registry and hyperparameters -----------------------------------------------------------


def test_registered_with_the_lm_default_temperature():
    """METHODS.md: τ = 4.0 for CIFAR-like classification, 1.0 for language models (kdlab's)."""
    info = loss_info("pld")
    assert info["hparams"] == {"temperature": 1.0}
    assert info["needs_labels"] is True
    assert "PLD" in info["paper"]


def test_bad_temperature_and_missing_labels_raise_value_error():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match="temperature"):
        build_loss("pld", temperature=0.0)(student, teacher, labels)
    with pytest.raises(ValueError, match="needs labels"):
        build_loss("pld")(student, teacher)


# --- properties -----------------------------------------------------------------------------


def test_not_zero_at_identical_inputs_but_the_plackett_luce_nll():
    """PLD is a (weighted) negative log-likelihood of one ranking, not a divergence: at
    student == teacher it is the teacher's own weighted PL NLL of π, > 0 (and the reference's)."""
    student, _, labels = make_batch(seed=1)
    teacher = student.detach().clone()
    values = build_loss("pld").per_position(student, teacher, labels)
    assert (values > 0.1).all()
    for b, t in ((0, 1), (1, 2)):
        ref = _ref_pld(teacher[b, t].tolist(), teacher[b, t].tolist(), int(labels[b, t]))
        assert values[b, t].item() == pytest.approx(ref, rel=1e-5)


def test_tends_to_zero_when_the_student_orders_pi_with_growing_margins():
    _, teacher, labels = make_batch(seed=2)
    order = teacher_optimal_order(teacher, labels)  # ascending: π read from the end
    ramp = torch.zeros_like(teacher).scatter(-1, order, torch.arange(V).float().expand_as(order))
    loss_fn = build_loss("pld")
    values = [loss_fn(margin * ramp, teacher, labels).item() for margin in (0.5, 1.0, 3.0, 30.0)]
    assert values == sorted(values, reverse=True) and values[0] > 0.1
    assert values[-1] < 1e-6
    # and the reversed order is far worse
    assert loss_fn(-3.0 * ramp, teacher, labels).item() > 10.0


def test_nonnegative():
    for seed in range(3):
        student, teacher, labels = make_batch(seed=seed, scale=4.0)
        assert (build_loss("pld").per_position(student, teacher, labels) >= 0).all()


def test_first_step_alone_is_cross_entropy():
    """α = (1, 0, …, 0) gives the standard cross-entropy (paper, Sec. 4.2): a teacher whose
    argmax is y, at a tiny temperature."""
    student, teacher, labels = make_batch(seed=3)
    labels = teacher.argmax(-1)
    teacher = teacher + 5.0 * torch.nn.functional.one_hot(labels, V)  # a clear margin
    values = build_loss("pld", temperature=1e-3).per_position(student, teacher, labels)
    ce = torch.nn.functional.cross_entropy(
        student.reshape(-1, V), labels.reshape(-1), reduction="none"
    ).view_as(values)
    torch.testing.assert_close(values, ce, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grad_of(values.sum(), student), grad_of(ce.sum(), student))


def test_label_is_ranked_first_even_when_the_teacher_ranks_it_last():
    teacher = torch.tensor([[3.0, -2.0, 1.0, 0.5]])
    labels = torch.tensor([1])
    assert teacher_optimal_order(teacher, labels).tolist() == [[3, 2, 0, 1]]
    student = torch.tensor([[0.2, 1.0, -0.3, 0.4]])
    value = build_loss("pld").per_position(student, teacher, labels)
    ref = _ref_pld(student[0].tolist(), teacher[0].tolist(), 1)
    assert value.item() == pytest.approx(ref, abs=1e-6)


def test_ties_in_the_teacher_are_broken_by_index_deterministically():
    teacher = torch.tensor([[1.0, 2.0, 1.0, 2.0, 0.0, 1.0]])
    labels = torch.tensor([4])
    assert teacher_optimal_order(teacher, labels).tolist() == [[0, 2, 5, 1, 3, 4]]
    student = torch.tensor([[0.3, -0.1, 0.9, 0.2, 0.0, -0.5]])
    value = build_loss("pld").per_position(student, teacher, labels)
    ref = _ref_pld(student[0].tolist(), teacher[0].tolist(), 4)
    assert value.item() == pytest.approx(ref, abs=1e-6)


def test_invariant_to_adding_a_constant_to_all_logits():
    student, teacher, labels = make_batch()
    loss_fn = build_loss("pld", temperature=2.0)
    shift_s = torch.randn(*labels.shape, 1) * 10
    shift_t = torch.randn(*labels.shape, 1) * 10
    base = loss_fn.per_position(student, teacher, labels)
    shifted = loss_fn.per_position(student + shift_s, teacher + shift_t, labels)
    torch.testing.assert_close(shifted, base, atol=2e-5, rtol=1e-4)


def test_temperature_softens_the_teacher_weights_only():
    student, teacher, labels = make_batch(seed=4)
    values = build_loss("pld", temperature=4.0).per_position(student, teacher, labels)
    ref = _ref_pld(student[1, 1].tolist(), teacher[1, 1].tolist(), int(labels[1, 1]), 4.0)
    assert values[1, 1].item() == pytest.approx(ref, rel=1e-5)
    plain = build_loss("pld").per_position(student, teacher, labels)
    assert not torch.allclose(values, plain)


def test_per_position_shape_and_float32_for_bf16_inputs():
    student, teacher, labels = make_batch()
    values = build_loss("pld").per_position(student.bfloat16(), teacher.bfloat16(), labels)
    assert values.shape == labels.shape and values.dtype == torch.float32
    assert torch.isfinite(values).all()


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    student, teacher, labels = make_batch()
    value = build_loss("pld")(student, teacher, torch.full_like(labels, -100))
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def masked_logits(which: str):
    student, teacher, labels = make_batch(seed=5)
    student, teacher = student.detach().clone(), teacher.clone()
    labels = labels.masked_fill(labels != -100, 0)  # the ground truth stays unmasked
    cols_s = {"same": [2, 5, 7], "different": [2, 5, 7], "student": [2, 5, 7], "teacher": []}
    cols_t = {"same": [2, 5, 7], "different": [2, 5, 9], "student": [], "teacher": [2, 5, 7]}
    student[..., cols_s[which]] = -math.inf
    teacher[..., cols_t[which]] = -math.inf
    return student.requires_grad_(), teacher, labels


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    student, teacher, labels = masked_logits(which)
    loss_fn = build_loss("pld")
    values = loss_fn.per_position(student, teacher, labels)  # masked positions too
    grad = grad_of(values.sum(), student)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad_of(value, student)).all()


def test_minus_inf_in_both_equals_dropping_those_entries():
    student, teacher, labels = masked_logits("same")
    keep = torch.ones(V, dtype=torch.bool)
    keep[[2, 5, 7]] = False
    loss_fn = build_loss("pld")
    full = loss_fn.per_position(student, teacher, labels)
    kept = loss_fn.per_position(student[..., keep], teacher[..., keep], labels)  # label 0 kept
    torch.testing.assert_close(full, kept, atol=1e-6, rtol=1e-5)


def test_a_student_minus_inf_token_leaves_out_its_own_step_only():
    """The teacher gives the masked tokens mass: their steps would be +inf; they are left out,
    and they add nothing to the other steps' log-sum-exps."""
    student, teacher, labels = masked_logits("student")
    values = build_loss("pld").per_position(student, teacher, labels)
    assert values.max() < 50
    for b, t in ((0, 1), (1, 4)):
        ref = _ref_pld(student[b, t].tolist(), teacher[b, t].tolist(), int(labels[b, t]))
        assert values[b, t].item() == pytest.approx(ref, rel=1e-5)


def test_extreme_logits_give_finite_values_and_gradients():
    student, teacher, labels = make_batch(seed=6, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = build_loss("pld")
    values = loss_fn.per_position(student, teacher, labels)
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()
    assert torch.isfinite(grad_of(loss_fn(student, teacher, labels), student)).all()


def test_gradient_does_not_reach_the_teacher():
    student, teacher, labels = make_batch()
    teacher = teacher.clone().requires_grad_()
    build_loss("pld")(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_large_vocabulary_matches_a_direct_computation():
    """A 32k vocabulary: one sort and one logcumsumexp per position, against the formula
    computed with an explicit permutation and a reverse cumulative sum in float64."""
    g = torch.Generator().manual_seed(7)
    student = torch.randn(3, 32_000, generator=g) * 3
    teacher = torch.randn(3, 32_000, generator=g) * 3
    labels = torch.tensor([5, 31_999, 12_345])
    values = build_loss("pld").per_position(student, teacher, labels)
    for row in range(3):
        y = int(labels[row])
        t = teacher[row].double()
        others = torch.cat([torch.arange(y), torch.arange(y + 1, 32_000)])
        pi = torch.cat([torch.tensor([y]), others[t[others].argsort(descending=True)]])
        s = student[row].double()[pi]
        suffix = torch.logcumsumexp(s.flip(0), 0).flip(0)
        ref = (t.softmax(0)[pi] * (suffix - s)).sum().item()
        assert values[row].item() == pytest.approx(ref, rel=1e-5)


# --- golden values --------------------------------------------------------------------------
# Constants computed once with `_ref_pld` above (the paper's Sec. 4.2 formula / Appendix C code,
# looped over k in plain Python floats) on the fixed input below, and then fixed.

GOLDEN_STUDENT = [
    [1.0, 0.5, -1.0, 0.0, 0.3, -0.7],
    [0.2, 2.5, -0.3, 1.1, -0.4, 0.6],
    [-0.5, 0.4, 1.8, -1.2, 0.9, 0.1],
]
GOLDEN_TEACHER = [
    [2.0, 0.0, -0.5, -1.0, 0.5, -2.0],
    [0.3, 0.2, 0.1, 0.0, -0.1, -0.2],
    [1.5, -0.3, 0.7, 2.2, -1.0, 0.4],
]
GOLDEN_LABELS = [0, 3, 4]  # y = teacher argmax; y mid-ranked; y ranked last by the teacher
GOLDEN = {1.0: 1.63535229355033, 4.0: 1.31718603759645}


def _reference_mean(temperature: float) -> float:
    rows = zip(GOLDEN_STUDENT, GOLDEN_TEACHER, GOLDEN_LABELS, strict=True)
    values = [_ref_pld(s, t, y, temperature) for s, t, y in rows]
    return sum(values) / len(values)


@pytest.mark.parametrize("temperature", sorted(GOLDEN))
def test_golden_constants_match_the_reference(temperature):
    assert _reference_mean(temperature) == pytest.approx(GOLDEN[temperature], abs=1e-12)


@pytest.mark.parametrize("temperature", sorted(GOLDEN))
def test_golden_values(temperature):
    student, teacher = torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER)
    labels = torch.tensor(GOLDEN_LABELS)
    value = build_loss("pld", temperature=temperature)(student, teacher, labels)
    assert value.item() == pytest.approx(GOLDEN[temperature], abs=2e-6)
