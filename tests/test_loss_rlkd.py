"""RLKD: properties, the pure-PyTorch soft rank, the per-position union, and golden values."""

from __future__ import annotations

import math

import pytest
import torch

from kdlab.losses import build_loss, loss_info
from kdlab.losses.rlkd import masked_pearson, soft_rank, topk_rank_term, union_topk

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


# --- registry and hyperparameters -----------------------------------------------------------


def test_registered_with_methods_md_defaults():
    info = loss_info("rlkd")
    assert info["hparams"] == {
        "k": 5,
        "base": "fkl",
        "magnification": 2.0,
        "regularization_strength": 1.0,
    }
    assert info["needs_labels"] is False
    assert "Multi-Modal Distribution Alignment" in info["paper"]


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        ({"k": 0}, "k must be"),
        ({"k": 2.5}, "k must be"),
        ({"magnification": 0.0}, "magnification"),
        ({"regularization_strength": -1.0}, "regularization_strength"),
    ],
)
def test_out_of_range_hparams_raise_value_error(hparams, match):
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match=match):
        build_loss("rlkd", **hparams)(student, teacher, labels)


def test_unknown_base_lists_the_four_divergences():
    student, teacher, labels = make_batch()
    with pytest.raises(ValueError, match="base must be one of fkl, rkl, jsd, tvd, got 'kl'"):
        build_loss("rlkd", base="kl")(student, teacher, labels)


# --- properties -----------------------------------------------------------------------------


def test_zero_at_identical_inputs():
    """ρ = 1 (identical soft ranks) and the base divergence is 0, so the loss is 0."""
    student, _, labels = make_batch()
    loss_fn = build_loss("rlkd")
    values = loss_fn.per_position(student, student.detach().clone(), labels)
    torch.testing.assert_close(values, torch.zeros_like(values), atol=1e-6, rtol=0)
    rank = topk_rank_term(student, student.detach(), 5, 1.0)
    torch.testing.assert_close(rank, torch.zeros_like(rank), atol=1e-6, rtol=0)
    assert loss_fn.per_position(student, student.detach() * 2.0, labels).min() > 1e-3


def test_invariant_to_adding_a_constant_to_all_logits():
    student, teacher, labels = make_batch()
    loss_fn = build_loss("rlkd")
    shift_s = torch.randn(*labels.shape, 1) * 10
    shift_t = torch.randn(*labels.shape, 1) * 10
    base = loss_fn.per_position(student, teacher, labels)
    shifted = loss_fn.per_position(student + shift_s, teacher + shift_t, labels)
    torch.testing.assert_close(shifted, base, atol=2e-5, rtol=1e-4)


def test_per_position_shape_and_float32_for_bf16_inputs():
    student, teacher, labels = make_batch()
    values = build_loss("rlkd").per_position(student.bfloat16(), teacher.bfloat16(), labels)
    assert values.shape == labels.shape and values.dtype == torch.float32
    assert torch.isfinite(values).all()


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    student, teacher, labels = make_batch()
    value = build_loss("rlkd")(student, teacher, torch.full_like(labels, -100))
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    student, teacher, labels = make_batch(seed=3)
    student, teacher = student.detach().clone(), teacher.clone()
    cols_s = {"same": [2, 5, 7], "different": [2, 5, 7], "student": [2, 5, 7], "teacher": []}
    cols_t = {"same": [2, 5, 7], "different": [2, 5, 9], "student": [], "teacher": [2, 5, 7]}
    student[..., cols_s[which]] = -math.inf
    teacher[..., cols_t[which]] = -math.inf
    student.requires_grad_()
    loss_fn = build_loss("rlkd", k=6)  # k=6 of 8 finite entries: -inf enters the union
    values = loss_fn.per_position(student, teacher, labels)
    grad = grad_of(values.sum(), student)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    assert (grad[..., cols_s[which]] == 0).all()


def test_extreme_logits_give_finite_values_and_gradients():
    student, teacher, labels = make_batch(seed=4, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = build_loss("rlkd")
    values = loss_fn.per_position(student, teacher, labels)
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(loss_fn(student, teacher, labels), student)).all()


def test_gradient_does_not_reach_the_teacher():
    student, teacher, labels = make_batch()
    teacher = teacher.clone().requires_grad_()
    build_loss("rlkd")(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_base_divergences_are_kdlabs_registered_losses_divided_by_magnification():
    student, teacher, labels = make_batch(seed=5)
    rank = topk_rank_term(student, teacher, 5, 1.0)
    for base in ("fkl", "rkl", "jsd", "tvd"):
        for magnification in (2.0, 0.5):
            loss_fn = build_loss("rlkd", base=base, magnification=magnification)
            got = loss_fn.per_position(student, teacher, labels)
            divergence = build_loss(base).per_position(student, teacher, labels)
            torch.testing.assert_close(got, rank + divergence / magnification)


def test_constant_rank_vector_drops_the_rank_term_at_that_position_only():
    """All-equal student logits: the correlation is undefined (the official code gets NaN and
    drops the rank term for the whole batch); kdlab drops it at that position only."""
    student, teacher, labels = make_batch(seed=6)
    student = student.detach().clone()
    student[0, 1] = 0.7
    student.requires_grad_()
    rank = topk_rank_term(student, teacher, 5, 1.0)
    assert rank[0, 1].item() == 0.0
    assert (rank.flatten()[torch.arange(rank.numel()) != 1] > 0).all()
    assert torch.isfinite(grad_of(rank.sum(), student)).all()


# --- soft rank (Blondel et al. 2020, l2; torchsort.soft_rank's definition) -------------------


def test_soft_rank_is_the_hard_rank_for_well_separated_values_and_small_strength():
    g = torch.Generator().manual_seed(0)
    values = torch.randperm(9, generator=g).double().view(1, 9) * 3.0 - 10.0
    ranks = soft_rank(values, regularization_strength=0.1)
    hard = values.argsort(-1).argsort(-1).double() + 1.0  # 1 = smallest, as torchsort
    torch.testing.assert_close(ranks, hard, atol=1e-12, rtol=0)


def test_soft_rank_hand_computed_isotonic_example():
    """values (0, 0.5, 3.0, 2.8), strength 1: s = (3.0, 2.8, 0.5, 0), w = (4, 3, 2, 1),
    s − w = (−1.0, −0.2, −1.5, −1.0). Decreasing isotonic regression pools the first two
    (−0.6, −0.6) and the last two (−1.25, −1.25); s − that = (3.6, 3.4, 1.75, 1.25), which
    un-sorted gives (1.25, 1.75, 3.6, 3.4)."""
    values = torch.tensor([[0.0, 0.5, 3.0, 2.8]], dtype=torch.float64)
    expected = torch.tensor([[1.25, 1.75, 3.6, 3.4]], dtype=torch.float64)
    torch.testing.assert_close(soft_rank(values), expected, atol=1e-12, rtol=0)


def test_soft_rank_of_the_valid_entries_ignores_the_others():
    g = torch.Generator().manual_seed(1)
    values = torch.randn(3, 7, generator=g, dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0, 1, 0, 1, 1], [1] * 7, [0, 1, 1, 0, 0, 0, 1]], dtype=torch.bool)
    ranks = soft_rank(values, valid)
    for row in range(3):
        kept = soft_rank(values[row][valid[row]].view(1, -1))[0]
        torch.testing.assert_close(ranks[row][valid[row]], kept, atol=1e-12, rtol=0)
        assert (ranks[row][~valid[row]] == 0).all()
        n = int(valid[row].sum())
        assert ranks[row].sum().item() == pytest.approx(n * (n + 1) / 2, abs=1e-9)


def test_soft_rank_matches_a_pool_adjacent_violators_reference():
    g = torch.Generator().manual_seed(2)
    values = torch.randn(20, 8, generator=g, dtype=torch.float64) * 1.5
    for strength in (0.3, 1.0, 4.0):
        ranks = soft_rank(values, regularization_strength=strength)
        for row in range(values.shape[0]):
            ref = _ref_soft_rank(values[row].tolist(), strength)
            assert ranks[row].tolist() == pytest.approx(ref, abs=1e-10)


def test_soft_rank_gradcheck():
    g = torch.Generator().manual_seed(3)
    values = (torch.randn(3, 6, generator=g, dtype=torch.float64) * 1.5).requires_grad_()
    valid = torch.tensor([[1] * 6, [1, 0, 1, 1, 0, 1], [0, 1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda x: soft_rank(x, valid), (values,))
    assert torch.autograd.gradcheck(lambda x: soft_rank(x, regularization_strength=0.5), (values,))


def test_soft_rank_jacobian_is_identity_minus_the_block_averages():
    """In the hand-computed example the blocks are {3.0, 2.8} and {0.5, 0}: d rank / d value =
    I − (block average), as torchsort's `Isotonic.vjp` (1/size on each block) gives."""
    values = torch.tensor([0.0, 0.5, 3.0, 2.8], dtype=torch.float64)
    jac = torch.autograd.functional.jacobian(lambda x: soft_rank(x.view(1, 4))[0], values)
    half = torch.full((2, 2), 0.5, dtype=torch.float64)
    expected = torch.eye(4, dtype=torch.float64) - torch.block_diag(half, half)
    torch.testing.assert_close(jac, expected, atol=1e-12, rtol=0)


def test_soft_rank_minus_inf_is_ranked_last_with_ties_pooled_and_no_gradient():
    values = torch.tensor([[-math.inf, 4.0, -math.inf, 0.0]], dtype=torch.float64)
    values.requires_grad_()
    ranks = soft_rank(values, regularization_strength=0.01)
    torch.testing.assert_close(ranks.detach(), torch.tensor([[1.5, 4.0, 1.5, 3.0]]).double())
    grad = grad_of((ranks * torch.arange(4.0).double()).sum(), values)
    assert torch.isfinite(grad).all() and grad[0, 0] == 0 and grad[0, 2] == 0


def test_masked_pearson_matches_the_formula_and_flags_constant_rows():
    a = torch.tensor([[1.0, 2.0, 9.0, 3.0], [1.0, 1.0, 5.0, 1.0]], dtype=torch.float64)
    b = torch.tensor([[2.0, 1.0, 0.0, 7.0], [3.0, 1.0, 8.0, 2.0]], dtype=torch.float64)
    valid = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 1]], dtype=torch.bool)
    rho, defined = masked_pearson(a, b, valid)
    x, y = [1.0, 2.0, 3.0], [2.0, 1.0, 7.0]
    mx, my = sum(x) / 3, sum(y) / 3
    num = sum((u - mx) * (v - my) for u, v in zip(x, y, strict=True))
    den = math.sqrt(sum((u - mx) ** 2 for u in x) * sum((v - my) ** 2 for v in y))
    assert rho[0].item() == pytest.approx(num / den, abs=1e-12)
    assert defined.tolist() == [True, False] and rho[1].item() == 0.0


# --- the per-position union -----------------------------------------------------------------


def test_union_is_taken_per_position_without_duplicates():
    teacher = torch.tensor([[5.0, 4.0, 3.0, 0.0, 0.1, 0.2], [5.0, 4.0, 3.0, 0.0, 0.1, 0.2]])
    student = torch.tensor([[3.5, 4.5, 3.0, 0.0, 0.1, 0.2], [0.0, 0.1, 0.2, 5.0, 4.0, 3.0]])
    index, valid = union_topk(student, teacher, 3)
    assert index.shape == (2, 6)
    assert valid.sum(-1).tolist() == [3, 6]  # coinciding top-3: 3 entries, not 6
    assert sorted(index[0][valid[0]].tolist()) == [0, 1, 2]
    assert sorted(index[1][valid[1]].tolist()) == [0, 1, 2, 3, 4, 5]
    # the first position's rank term is the correlation over its three entries only
    s3, t3 = student[:1, :3].double(), teacher[:1, :3].double()
    rho, _ = masked_pearson(soft_rank(s3), soft_rank(t3), torch.ones(1, 3, dtype=torch.bool))
    rank = topk_rank_term(student, teacher, 3, 1.0)
    assert rank[0].item() == pytest.approx(1.0 - rho.item(), abs=1e-6)
    assert rank[0].item() > 0.01


def test_k_larger_than_the_vocabulary_uses_the_whole_vocabulary():
    student, teacher, labels = make_batch(v=4)
    values = build_loss("rlkd", k=10).per_position(student, teacher, labels)
    ref = build_loss("rlkd", k=4).per_position(student, teacher, labels)
    torch.testing.assert_close(values, ref)


# --- golden values --------------------------------------------------------------------------
# The reference below transcribes the official code (Pty72/RLKD, sft/kd_sft.py:
# `topk_spearman_loss` and `distill_loss`, with distill_obj="kl") in plain Python floats, one
# position at a time (for one position the official `torch.unique(..., dim=-1)` is exactly the
# union): topk of both models' logits, union, torchsort's l2 soft rank of the *logits* (written
# here independently as a pool-adjacent-violators loop, following torchsort/ops.py `SoftRank` and
# `isotonic_l2`), centre and normalise, dot product = ρ; KL(p‖q) on softmax with the official
# `+1e-10` inside the logs; value = (1 − ρ) + KL / magnification. The constants in GOLDEN were
# computed once with this reference (see the test that checks them) and are fixed.

GOLDEN_STUDENT = [
    [1.0, 2.2, 0.8, 0.1, -0.3, -1.2, 0.5, -0.7],
    [0.7, 1.9, 1.1, -0.6, 0.2, 1.4, -0.9, 0.3],
    [1.3, -0.2, 2.0, -0.8, 0.1, 1.7, 0.6, -1.4],
]
GOLDEN_TEACHER = [
    [2.0, 1.5, 1.0, -0.5, 0.3, -1.0, 0.0, -2.0],  # top-3 coincides with the student's
    [0.1, -0.4, 1.7, 0.9, -1.3, 0.6, 2.4, -0.2],  # top-3 overlaps in one token
    [-1.1, 0.4, 0.0, 2.1, 1.6, -0.3, 0.8, 1.2],  # top-3 disjoint from the student's
]
GOLDEN_HPARAMS = {
    "k3": {"k": 3, "magnification": 2.0, "regularization_strength": 1.0},
    "default": {"k": 5, "magnification": 2.0, "regularization_strength": 1.0},
    "k3_sharp": {"k": 3, "magnification": 4.0, "regularization_strength": 0.25},
}
GOLDEN: dict[str, float] = {
    "k3": 2.00434865677921,
    "default": 1.75611880086403,
    "k3_sharp": 1.63574191486618,
}


def _ref_isotonic_decreasing(y: list[float]) -> list[float]:
    """Pool adjacent violators for argmin ‖x − y‖² s.t. x_1 ≥ x_2 ≥ … (plain floats)."""
    blocks: list[list[float]] = []  # [sum, count]
    for value in y:
        blocks.append([value, 1.0])
        while len(blocks) > 1 and blocks[-2][0] / blocks[-2][1] < blocks[-1][0] / blocks[-1][1]:
            total, count = blocks.pop()
            blocks[-1][0] += total
            blocks[-1][1] += count
    out: list[float] = []
    for total, count in blocks:
        out += [total / count] * int(count)
    return out


def _ref_soft_rank(values: list[float], strength: float) -> list[float]:
    n = len(values)
    theta = [v / strength for v in values]
    perm = sorted(range(n), key=lambda i: -theta[i])
    s = [theta[i] for i in perm]
    dual = _ref_isotonic_decreasing([s[i] - (n - i) for i in range(n)])
    ranks = [0.0] * n
    for i, j in enumerate(perm):
        ranks[j] = s[i] - dual[i]
    return ranks


def _ref_normalised(x: list[float]) -> list[float]:
    mean = sum(x) / len(x)
    centred = [v - mean for v in x]
    norm = math.sqrt(sum(v * v for v in centred))
    return [v / norm for v in centred]


def _ref_softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def _ref_position(s: list[float], t: list[float], k: int, mag: float, strength: float) -> float:
    top_t = sorted(range(len(t)), key=lambda i: -t[i])[:k]
    top_s = sorted(range(len(s)), key=lambda i: -s[i])[:k]
    union = sorted(set(top_t) | set(top_s))
    rank_s = _ref_normalised(_ref_soft_rank([s[i] for i in union], strength))
    rank_t = _ref_normalised(_ref_soft_rank([t[i] for i in union], strength))
    rho = sum(a * b for a, b in zip(rank_s, rank_t, strict=True))
    p, q = _ref_softmax(t), _ref_softmax(s)
    kl = sum(x * (math.log(x + 1e-10) - math.log(y + 1e-10)) for x, y in zip(p, q, strict=True))
    return (1.0 - rho) + kl / mag


def _reference_values(key: str) -> list[float]:
    hp = GOLDEN_HPARAMS[key]
    args = (hp["k"], hp["magnification"], hp["regularization_strength"])
    return [_ref_position(s, t, *args) for s, t in zip(GOLDEN_STUDENT, GOLDEN_TEACHER, strict=True)]


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_constants_match_the_reference(key):
    values = _reference_values(key)
    assert sum(values) / len(values) == pytest.approx(GOLDEN[key], abs=1e-12)


@pytest.mark.parametrize("key", sorted(GOLDEN))
def test_golden_values(key):
    student, teacher = torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER)
    loss_fn = build_loss("rlkd", **GOLDEN_HPARAMS[key])
    assert loss_fn(student, teacher).item() == pytest.approx(GOLDEN[key], abs=2e-6)
    per_position = loss_fn.per_position(student, teacher, None).tolist()
    assert per_position == pytest.approx(_reference_values(key), abs=2e-6)


def test_golden_input_has_union_sizes_k_between_and_2k():
    _, valid = union_topk(torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER), 3)
    assert valid.sum(-1).tolist() == [3, 5, 6]
