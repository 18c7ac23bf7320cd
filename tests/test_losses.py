"""Properties, parity and golden values of the token-level losses (METHODS.md's first table)."""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from kd_props import V, grad_of, make_batch

from kdlab.losses import KDLoss, available_losses, build_loss, loss_info, reduce_positions

TOKEN_LEVEL = {
    "ce": {},
    "fkl": {"temperature": 1.0},
    "rkl": {"temperature": 1.0},
    "jsd": {"beta": 0.5, "temperature": 1.0},
    "tvd": {"temperature": 1.0},
    "skl": {"alpha": 0.1},
    "srkl": {"alpha": 0.1},
    "akl": {"mu": 0.5},
}
# The property tests below hold for the token-level losses; each paper's loss has its own test
# file (tests/test_loss_<name>.py) with the properties that hold for it.
ALL = list(TOKEN_LEVEL)
# `ce` is not a divergence between the two models: it is not 0 when student == teacher.
DIVERGENCES = [name for name in ALL if name != "ce"]


# --- registry -------------------------------------------------------------------------------


def test_token_level_losses_are_registered_with_methods_md_defaults():
    for name, hparams in TOKEN_LEVEL.items():
        assert name in ALL
        info = loss_info(name)
        assert info["hparams"] == hparams, name
        assert info["paper"]
        assert info["needs_labels"] == (name == "ce")


@pytest.mark.parametrize("name", available_losses())
def test_build_returns_a_kdloss_whose_docstring_names_the_formula(name):
    loss_fn = build_loss(name)
    assert isinstance(loss_fn, KDLoss)
    assert loss_fn.name == name and len((type(loss_fn).__doc__ or "").strip()) > 40


def test_unknown_name_raises_value_error_listing_valid_names():
    with pytest.raises(ValueError, match="valid choices: .*fkl.*jsd"):
        build_loss("not_a_loss")


@pytest.mark.parametrize("name", available_losses())
def test_unknown_hparam_raises_value_error_listing_valid_ones(name):
    with pytest.raises(ValueError, match="unknown hyperparameter") as err:
        build_loss(name, not_an_hparam=1.0)
    for hp in loss_info(name)["hparams"]:
        assert hp in str(err.value)


@pytest.mark.parametrize(
    ("name", "hparams"),
    [
        ("fkl", {"temperature": 0.0}),
        ("rkl", {"temperature": -1.0}),
        ("tvd", {"temperature": 0.0}),
        ("jsd", {"beta": 1.5}),
        ("jsd", {"beta": -0.1}),
        ("skl", {"alpha": 1.0}),
        ("srkl", {"alpha": -0.5}),
        ("akl", {"mu": 1.2}),
    ],
)
def test_out_of_range_hparams_raise_value_error(name, hparams):
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match=next(iter(hparams))):
        build_loss(name, **hparams)(student, teacher, labels)


# --- properties -----------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL)
def test_per_position_shape_and_float32(name):
    student, teacher, labels = make_batch()
    values = build_loss(name).per_position(student.bfloat16(), teacher.bfloat16(), labels)
    assert values.shape == labels.shape and values.dtype == torch.float32


@pytest.mark.parametrize("name", DIVERGENCES)
def test_zero_at_identical_inputs(name):
    student, _, labels = make_batch()
    values = build_loss(name).per_position(student, student.detach().clone(), labels)
    torch.testing.assert_close(values, torch.zeros_like(values), atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", ALL)
def test_invariant_to_adding_a_constant_to_all_logits(name):
    student, teacher, labels = make_batch()
    loss_fn = build_loss(name)
    shift_s = torch.randn(*labels.shape, 1) * 10  # a different constant per position
    shift_t = torch.randn(*labels.shape, 1) * 10
    base = loss_fn.per_position(student, teacher, labels)
    shifted = loss_fn.per_position(student + shift_s, teacher + shift_t, labels)
    torch.testing.assert_close(shifted, base, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ALL)
def test_fully_masked_batch_gives_exact_zero_and_zero_gradient(name):
    student, teacher, labels = make_batch()
    labels = torch.full_like(labels, -100)
    value = build_loss(name)(student, teacher, labels)
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def masked_logits(which: str):
    """Logits with some vocabulary entries `-inf`: the same ones in both models, different ones,
    or in one model only."""
    student, teacher, labels = make_batch(seed=3)
    student, teacher = student.detach().clone(), teacher.clone()
    labels = labels.masked_fill(labels != -100, 0)  # the ground truth stays unmasked
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


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
@pytest.mark.parametrize("name", ALL)
def test_minus_inf_logits_give_finite_values_and_gradients(name, which):
    student, teacher, labels = masked_logits(which)
    loss_fn = build_loss(name)
    values = loss_fn.per_position(student, teacher, labels)  # every position, masked ones too
    grad = grad_of(values.sum(), student)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad_of(value, student)).all()


@pytest.mark.parametrize("name", ALL)
def test_minus_inf_in_both_equals_dropping_those_entries(name):
    """Entries that both models mask carry no mass: the loss is the one on the other entries."""
    student, teacher, labels = masked_logits("same")
    keep = torch.isfinite(student[0, 0].detach()) & torch.isfinite(teacher[0, 0])
    loss_fn = build_loss(name)
    full = loss_fn.per_position(student, teacher, labels)
    index = torch.cumsum(keep.long(), 0) - 1  # new position of each kept token
    kept_labels = labels.masked_fill(labels != -100, int(index[0]))
    kept = loss_fn.per_position(student[..., keep], teacher[..., keep], kept_labels)
    torch.testing.assert_close(full, kept, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("name", ALL)
def test_extreme_logits_give_finite_values_and_gradients(name):
    student, teacher, labels = make_batch(seed=4, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = build_loss(name)
    values = loss_fn.per_position(student, teacher, labels)
    grad = grad_of(loss_fn(student, teacher, labels), student)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()


@pytest.mark.parametrize("name", ALL)
def test_gradient_does_not_reach_the_teacher(name):
    student, teacher, labels = make_batch()
    teacher = teacher.clone().requires_grad_()
    build_loss(name)(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


@pytest.mark.parametrize("name", ALL)
def test_num_items_in_batch_makes_accumulation_match_one_big_batch(name):
    """Two micro-batches normalised by the step's count sum to the big batch's mean."""
    student, teacher, labels = make_batch(b=4, t=6)
    loss_fn = build_loss(name)
    big = loss_fn(student, teacher, labels)
    big_grad = grad_of(big, student)
    count = int((labels != -100).sum())
    parts = [
        loss_fn(student[sl], teacher[sl], labels[sl], num_items_in_batch=count)
        for sl in (slice(0, 1), slice(1, 4))
    ]
    total = parts[0] + parts[1]
    torch.testing.assert_close(total, big, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_of(total, student), big_grad, atol=1e-7, rtol=1e-5)
    tensor_count = loss_fn(student, teacher, labels, num_items_in_batch=torch.tensor(count))
    torch.testing.assert_close(tensor_count, big, atol=1e-6, rtol=1e-6)


def test_reduce_positions_ignores_masked_values_and_their_gradient():
    values = torch.tensor([1.0, 2.0, 3.0, 4.0], requires_grad=True)
    labels = torch.tensor([5, -100, 7, -100])
    out = reduce_positions(values, labels)
    assert out.item() == pytest.approx(2.0)
    out.backward()
    assert values.grad.tolist() == [0.5, 0.0, 0.5, 0.0]
    assert reduce_positions(values, labels, num_items_in_batch=4).item() == pytest.approx(1.0)
    assert reduce_positions(values, torch.full_like(labels, -100)).item() == 0.0


# --- jsd: endpoints and TRL parity ----------------------------------------------------------


@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_jsd_endpoints_are_forward_and_reverse_kl(temperature):
    student, teacher, labels = make_batch()
    for beta, other in ((0.0, "fkl"), (1.0, "rkl")):
        jsd = build_loss("jsd", beta=beta, temperature=temperature)(student, teacher, labels)
        ref = build_loss(other, temperature=temperature)(student, teacher, labels)
        torch.testing.assert_close(jsd, ref, atol=0, rtol=0)
        torch.testing.assert_close(grad_of(jsd, student), grad_of(ref, student), atol=0, rtol=0)


@pytest.fixture(scope="module")
def trl_generalized_jsd():
    gkd = pytest.importorskip("trl.experimental.gkd")
    return gkd.GKDTrainer.generalized_jsd_loss


@pytest.mark.parametrize("temperature", [1.0, 0.7])
@pytest.mark.parametrize("beta", [0.0, 0.3, 0.5, 1.0])
def test_jsd_matches_trl_generalized_jsd_loss(trl_generalized_jsd, beta, temperature):
    student, teacher, labels = make_batch(seed=7, b=3, t=6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = trl_generalized_jsd(student, teacher, labels, beta=beta, temperature=temperature)
    ours = build_loss("jsd", beta=beta, temperature=temperature)(student, teacher, labels)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_of(ours, student), grad_of(ref, student), atol=1e-7, rtol=1e-4)
    count = int((labels != -100).sum()) + 5
    ref_n = trl_generalized_jsd(student, teacher, labels, beta=beta, num_items_in_batch=count)
    ours_n = build_loss("jsd", beta=beta)(student, teacher, labels, num_items_in_batch=count)
    torch.testing.assert_close(ours_n, ref_n, atol=1e-6, rtol=1e-5)


# --- golden values --------------------------------------------------------------------------
# Two positions, six tokens. The references below are written from the formulas, in plain
# Python floats, independently of kdlab's tensor code: skl and srkl from DistiLLM's paper and
# official code (jongwooko/distillm, distillm/losses.py: skewed_forward_kl / skewed_reverse_kl),
# tvd from its definition (same file, tv_distance), akl from the AKL paper and its official code
# (wutaiqiang/LLM_KD_AKL, AKL.py: sort teacher probs, cumsum > mu is tail, top-1 always head).
# The constants in GOLDEN were computed once with these references (see the test that checks
# them) and are fixed, so a change in either side shows up.

GOLDEN_STUDENT = [[1.0, 0.5, -1.0, 0.0, 0.3, -0.7], [0.2, 2.5, -0.3, 1.1, -0.4, 0.6]]
GOLDEN_TEACHER = [[2.0, 0.0, -0.5, -1.0, 0.5, -2.0], [0.3, 0.2, 0.1, 0.0, -0.1, -0.2]]
GOLDEN = {
    "skl": 0.30502038323555,
    "srkl": 0.31139014666785,
    "tvd": 0.36979118614249,
    "akl": 0.39994684929862,
}


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def _kl(a: list[float], b: list[float]) -> float:
    return sum(x * math.log(x / y) for x, y in zip(a, b, strict=True) if x > 0)


def _ref_skl(p, q, alpha=0.1):
    # official returns -Σ p log(mix); the divergence subtracts H(p): Σ p log p - Σ p log(mix)
    mix = [alpha * x + (1 - alpha) * y for x, y in zip(p, q, strict=True)]
    return _kl(p, mix)


def _ref_srkl(p, q, alpha=0.1):
    mix = [(1 - alpha) * x + alpha * y for x, y in zip(p, q, strict=True)]
    return _kl(q, mix)


def _ref_tvd(p, q):
    return 0.5 * sum(abs(x - y) for x, y in zip(p, q, strict=True))


def _ref_akl(p, q, mu=0.5):
    order = sorted(range(len(p)), key=lambda i: -p[i])
    cum, g_head, g_tail = 0.0, 0.0, 0.0
    for rank, i in enumerate(order):
        cum += p[i]
        if rank == 0 or cum <= mu:
            g_head += abs(p[i] - q[i])
        else:
            g_tail += abs(p[i] - q[i])
    w_head = g_head / (g_head + g_tail)
    return w_head * _kl(p, q) + (1 - w_head) * _kl(q, p)


REFERENCES = {"skl": _ref_skl, "srkl": _ref_srkl, "tvd": _ref_tvd, "akl": _ref_akl}


def _reference_mean(name: str) -> float:
    pairs = zip(GOLDEN_TEACHER, GOLDEN_STUDENT, strict=True)
    values = [REFERENCES[name](_softmax(t), _softmax(s)) for t, s in pairs]
    return sum(values) / len(values)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_constants_match_the_independent_reference(name):
    assert _reference_mean(name) == pytest.approx(GOLDEN[name], abs=1e-12)


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_values(name):
    student = torch.tensor(GOLDEN_STUDENT)
    teacher = torch.tensor(GOLDEN_TEACHER)
    assert build_loss(name)(student, teacher).item() == pytest.approx(GOLDEN[name], abs=2e-6)


def test_golden_akl_uses_both_head_rules():
    """Position 0: top-1 mass > mu (head = top-1 only); position 1: head = the top two."""
    p0 = _softmax(GOLDEN_TEACHER[0])
    p1 = sorted(_softmax(GOLDEN_TEACHER[1]), reverse=True)
    assert max(p0) > 0.5
    assert p1[0] + p1[1] <= 0.5 < p1[0] + p1[1] + p1[2]


def test_skl_differs_from_official_cross_entropy_form_by_teacher_entropy():
    student = torch.tensor(GOLDEN_STUDENT, requires_grad=True)
    teacher = torch.tensor(GOLDEN_TEACHER)
    p, q = teacher.softmax(-1), student.softmax(-1)
    official = -(p * torch.log(0.1 * p + 0.9 * q)).sum(-1).mean()  # DistiLLM's returned value
    entropy = -(p * p.log()).sum(-1).mean()
    ours = build_loss("skl")(student, teacher)
    torch.testing.assert_close(ours, official - entropy)
    torch.testing.assert_close(grad_of(ours, student), grad_of(official, student))
