"""`span`: span-level correlation consistency (Multi-Granularity Semantic Revision, Liu et al.).

No official code exists, so the golden values come from an independent loop-based reference of
the formula kdlab reads from the paper (Eq. 10: element-wise products of adjacent probability
vectors inside spans, matched under a squared L2 distance; spans = fixed-length pieces of each
run of counted positions, kdlab's parser-free stand-in for the paper's chunker).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlab.losses import WeightedSum, build_loss, chunked_loss, loss_info
from kdlab.losses.span import span_pairs

ATOL, RTOL = 1e-5, 5e-4  # fp32 parity, as tests/test_losses_coupling.py
DEFAULTS = {"span_length": 4, "span_weight": 1.0, "kl_weight": 1.0, "temperature": 1.0}


def make_batch(seed: int = 0, b: int = 2, t: int = 9, v: int = 7, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g) * scale).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g) * scale
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, :2] = -100
    labels[-1, 5] = -100
    return student, teacher, labels


def grad_of(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


# --- registry and hyperparameters ------------------------------------------------------------


def test_registered_as_a_sequence_loss_with_documented_defaults():
    info = loss_info("span")
    assert info["hparams"] == DEFAULTS
    assert "Multi-Granularity Semantic Revision" in info["paper"]
    assert not info["needs_labels"]
    assert build_loss("span").coupling == "sequence"


def test_term_weights_follow_the_hyperparameters():
    assert build_loss("span").term_weights() == {"span": 1.0, "fkl": 1.0}
    assert build_loss("span", span_weight=2.0, kl_weight=0.5).term_weights() == {
        "span": 2.0,
        "fkl": 0.5,
    }
    student, teacher, labels = make_batch()
    only_span = build_loss("span", kl_weight=0.0)
    assert only_span.term_weights() == {"span": 1.0}
    assert set(only_span.forward_terms(student, teacher, labels)[1]) == {"span"}


@pytest.mark.parametrize(
    ("hparams", "match"),
    [
        ({"span_length": 1}, "span_length"),
        ({"span_length": 0}, "span_length"),
        ({"span_length": 2.5}, "span_length"),
        ({"span_length": True}, "span_length"),
        ({"span_weight": -1.0}, "span_weight"),
        ({"kl_weight": float("inf")}, "kl_weight"),
        ({"span_weight": 0.0, "kl_weight": 0.0}, "both 0"),
        ({"temperature": 0.0}, "temperature"),
    ],
)
def test_out_of_range_hparams_raise_value_error(hparams, match):
    with pytest.raises(ValueError, match=match):
        build_loss("span", **hparams)


# --- properties -----------------------------------------------------------------------------


@pytest.mark.parametrize("hparams", [{}, {"span_length": 2, "temperature": 2.0}])
def test_zero_value_and_zero_gradient_at_identical_inputs(hparams):
    student, _, labels = make_batch()
    value, terms = build_loss("span", **hparams).forward_terms(
        student, student.detach().clone(), labels
    )
    assert abs(value.item()) < 1e-6 and abs(terms["span"].item()) < 1e-9
    grad = grad_of(value, student)
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


def test_not_zero_when_the_student_differs():
    student, teacher, labels = make_batch()
    terms = build_loss("span").forward_terms(student, teacher, labels)[1]
    assert terms["span"].item() > 1e-4 and terms["fkl"].item() > 1e-2


def test_invariant_to_adding_a_constant_per_position():
    student, teacher, labels = make_batch()
    loss_fn = build_loss("span", span_length=3)
    shift_s = torch.randn(*labels.shape, 1) * 10  # a different constant per position
    shift_t = torch.randn(*labels.shape, 1) * 10
    base = loss_fn.per_position_terms(student, teacher, labels)
    shifted = loss_fn.per_position_terms(student + shift_s, teacher + shift_t, labels)
    for k in base:
        torch.testing.assert_close(shifted[k], base[k], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("kl_weight", [1.0, 0.0])
def test_fully_masked_batch_gives_exact_zero_and_zero_gradient(kl_weight):
    student, teacher, labels = make_batch()
    labels = torch.full_like(labels, -100)
    value = build_loss("span", kl_weight=kl_weight)(student, teacher, labels)
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


@pytest.mark.parametrize("which", ["student", "teacher", "both"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    student, teacher, labels = make_batch()
    student, teacher = student.detach().clone(), teacher.clone()
    if which in ("student", "both"):
        student[..., :2] = float("-inf")
    if which in ("teacher", "both"):
        teacher[..., 1:3] = float("-inf")
    student.requires_grad_()
    loss_fn = build_loss("span", span_length=3)
    terms = loss_fn.per_position_terms(student, teacher, labels)
    assert all(torch.isfinite(v).all() for v in terms.values())
    grad = grad_of(loss_fn(student, teacher, labels), student)
    assert torch.isfinite(grad).all()


def test_extreme_logits_give_finite_values_and_gradients():
    student, teacher, labels = make_batch()
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = build_loss("span", span_length=3)
    terms = loss_fn.per_position_terms(student, teacher, labels)
    assert all(torch.isfinite(v).all() for v in terms.values())
    grad = grad_of(loss_fn(student, teacher, labels), student)
    assert torch.isfinite(grad).all()


def test_gradient_does_not_reach_the_teacher():
    student, teacher, labels = make_batch()
    teacher.requires_grad_()
    build_loss("span")(student, teacher, labels).backward()
    assert teacher.grad is None and student.grad is not None


def test_terms_are_float32_per_position_for_bf16_inputs():
    student, teacher, labels = make_batch()
    terms = build_loss("span").per_position_terms(student.bfloat16(), teacher.bfloat16(), labels)
    for v in terms.values():
        assert v.shape == labels.shape and v.dtype == torch.float32


def test_one_sequence_without_batch_dim_equals_a_batch_of_one():
    student, teacher, labels = make_batch()
    loss_fn = build_loss("span", span_length=3)
    single = loss_fn(student[1], teacher[1], labels[1])
    batched = loss_fn(student[1:], teacher[1:], labels[1:])
    torch.testing.assert_close(single, batched)


def test_no_labels_counts_every_position():
    student, teacher, labels = make_batch()
    loss_fn = build_loss("span", span_length=3)
    all_counted = torch.zeros_like(labels)
    torch.testing.assert_close(
        loss_fn(student, teacher, None), loss_fn(student, teacher, all_counted)
    )


def test_num_items_in_batch_makes_split_sequences_sum_to_the_whole_batch():
    student, teacher, labels = make_batch(b=3)
    loss_fn = build_loss("span", span_length=3)
    n = (labels != -100).sum()
    whole = loss_fn(student, teacher, labels)
    parts = loss_fn(student[:1], teacher[:1], labels[:1], num_items_in_batch=n) + loss_fn(
        student[1:], teacher[1:], labels[1:], num_items_in_batch=n
    )
    torch.testing.assert_close(parts, whole)


# --- which adjacent pairs count --------------------------------------------------------------

# Runs of counted positions: [2, 3, 4, 5] and [7, 8, 9]. With span_length=3 the spans are
# {2, 3, 4}, {5}, {7, 8, 9}: pairs (2,3), (3,4), (7,8), (8,9). (4,5) is cut by the span
# boundary, (1,2), (5,6) and (6,7) by the masked positions; position 5 is in no pair.
CUT_LABELS = torch.tensor([[-100, -100, 3, 1, 4, 1, -100, 5, 9, 2]])
CUT_PAIRS = [2, 3, 7, 8]


def test_span_pairs_cut_at_masked_positions_and_span_boundaries():
    pairs = span_pairs(CUT_LABELS, CUT_LABELS.shape, CUT_LABELS.device, 3)
    assert pairs[0].nonzero().flatten().tolist() == CUT_PAIRS
    # span_length 2: spans {2,3}, {4,5}, {7,8}, {9}
    pairs = span_pairs(CUT_LABELS, CUT_LABELS.shape, CUT_LABELS.device, 2)
    assert pairs[0].nonzero().flatten().tolist() == [2, 4, 7]
    # a span at least as long as the sequence: each run of counted positions is one span
    pairs = span_pairs(CUT_LABELS, CUT_LABELS.shape, CUT_LABELS.device, 10)
    assert pairs[0].nonzero().flatten().tolist() == [2, 3, 4, 7, 8]
    # spans restart at each run: a new run opens a new span whatever the previous run's length
    labels = torch.tensor([[1, 1, 1, -100, 1, 1, 1, 1, 1]])
    pairs = span_pairs(labels, labels.shape, labels.device, 3)
    assert pairs[0].nonzero().flatten().tolist() == [0, 1, 4, 5, 7]
    # without labels every position counts: one run from position 0
    pairs = span_pairs(None, torch.Size([1, 7]), labels.device, 3)
    assert pairs[0].nonzero().flatten().tolist() == [0, 1, 3, 4]


def test_span_term_is_nonzero_exactly_at_the_documented_pairs():
    student, teacher, _ = make_batch(b=1, t=10)
    terms = build_loss("span", span_length=3).per_position_terms(student, teacher, CUT_LABELS)
    assert (terms["span"][0] != 0).nonzero().flatten().tolist() == CUT_PAIRS


def test_only_positions_inside_pairs_get_a_span_gradient():
    student, teacher, _ = make_batch(b=1, t=10)
    loss_fn = build_loss("span", span_length=3, kl_weight=0.0)
    grad = grad_of(loss_fn(student, teacher, CUT_LABELS), student)
    in_pairs = sorted({t for p in CUT_PAIRS for t in (p, p + 1)})  # [2, 3, 4, 7, 8, 9]
    assert (grad[0].abs().sum(-1) > 0).nonzero().flatten().tolist() == in_pairs


def test_pair_value_is_the_squared_distance_of_adjacent_products():
    student, teacher, _ = make_batch(b=1, t=10)
    terms = build_loss("span", span_length=3).per_position_terms(student, teacher, CUT_LABELS)
    p, q = teacher.double().softmax(-1)[0], student.detach().double().softmax(-1)[0]
    for t in CUT_PAIRS:
        expected = ((p[t] * p[t + 1] - q[t] * q[t + 1]) ** 2).sum()
        assert terms["span"][0, t].item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-9)


# --- golden values ---------------------------------------------------------------------------

# Two sequences (T = 6, V = 4). Counted runs: sequence 0 -> [1..5]; sequence 1 -> [0, 1], [3..5].
GOLDEN_STUDENT = [
    [[2.0, 0.1, -1.0, 0.5], [1.5, 0.3, -0.2, 0.0], [0.2, 2.2, 0.1, -0.5], [0.0, 1.8, 0.4, -1.2],
     [-0.3, 0.2, 1.9, 0.6], [1.1, -0.4, 0.3, 0.9]],
    [[0.4, -1.1, 2.3, 0.0], [0.6, -0.8, 1.7, 0.2], [3.0, 0.0, 0.0, 0.0], [-0.9, 0.5, 0.1, 1.6],
     [-1.4, 0.7, 0.0, 2.1], [0.3, 0.3, -0.6, 1.0]],
]  # fmt: skip
GOLDEN_TEACHER = [
    [[2.5, -0.5, -1.5, 0.0], [2.0, 0.0, -0.5, -0.3], [-0.2, 2.8, 0.0, -1.0], [0.3, 2.4, -0.1, -0.8],
     [-0.8, 0.0, 2.6, 0.2], [0.7, 0.1, -0.2, 1.5]],
    [[0.0, -0.6, 2.9, -0.4], [0.2, -1.0, 2.4, 0.5], [0.0, 0.0, 3.0, 0.0], [-1.2, 0.9, -0.3, 2.0],
     [-0.7, 0.2, 0.4, 2.6], [0.8, -0.1, -0.9, 1.3]],
]  # fmt: skip
GOLDEN_LABELS = [[-100, 1, 2, 0, 3, 1], [2, 0, -100, 1, 1, 3]]
GOLDEN_HPARAMS = {
    "defaults": {},
    "short spans, T=2": {
        "span_length": 2,
        "span_weight": 2.0,
        "kl_weight": 0.5,
        "temperature": 2.0,
    },
}
# Computed once with `_reference` below (no official code exists: the formula is the paper's
# Eq. 10 as kdlab reads it, see src/kdlab/losses/span.py): each term's mean per counted position.
GOLDEN = {
    "defaults": {"span": 0.011051796025557082, "fkl": 0.06399190339775077},
    "short spans, T=2": {"span": 0.0014266698873956637, "fkl": 0.02355319265007544},
}


def _softmax(z: list[float], tau: float) -> list[float]:
    m = max(z)
    e = [math.exp((x - m) / tau) for x in z]
    return [x / sum(e) for x in e]


def _spans(labels: list[int], span_length: int) -> list[list[int]]:
    """Runs of counted positions, each cut into pieces of `span_length` (lists of positions)."""
    spans, run = [], []
    for t, y in enumerate([*labels, -100]):
        if y != -100:
            run.append(t)
        elif run:
            spans += [run[i : i + span_length] for i in range(0, len(run), span_length)]
            run = []
    return spans


def _reference(span_length=4, span_weight=1.0, kl_weight=1.0, temperature=1.0) -> dict:
    """Plain-float loops: Σ over spans and adjacent pairs of Σ_v (p p' − q q')², and Σ KL."""
    span_sum = kl_total = 0.0
    count = 0
    for s_seq, t_seq, labels in zip(GOLDEN_STUDENT, GOLDEN_TEACHER, GOLDEN_LABELS, strict=True):
        p = [_softmax(z, temperature) for z in t_seq]
        q = [_softmax(z, temperature) for z in s_seq]
        for t, y in enumerate(labels):
            if y != -100:
                count += 1
                kl_total += sum(
                    a * (math.log(a) - math.log(b)) for a, b in zip(p[t], q[t], strict=True)
                )
        for span in _spans(labels, span_length):
            for a, b in zip(span[:-1], span[1:], strict=True):
                span_sum += sum((p[a][v] * p[b][v] - q[a][v] * q[b][v]) ** 2 for v in range(4))
    return {"span": span_sum / count, "fkl": kl_total / count}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_constants_match_the_independent_reference(case):
    ref = _reference(**GOLDEN_HPARAMS[case])
    for k, v in GOLDEN[case].items():
        assert ref[k] == pytest.approx(v, abs=1e-12)


def test_golden_reference_spans_are_the_documented_ones():
    assert _spans(GOLDEN_LABELS[0], 4) == [[1, 2, 3, 4], [5]]
    assert _spans(GOLDEN_LABELS[1], 2) == [[0, 1], [3, 4], [5]]


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_golden_values(case):
    hparams = GOLDEN_HPARAMS[case]
    loss_fn = build_loss("span", **hparams)
    student, teacher = torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER)
    total, terms = loss_fn.forward_terms(student, teacher, torch.tensor(GOLDEN_LABELS))
    for k, v in GOLDEN[case].items():
        assert terms[k].item() == pytest.approx(v, rel=1e-5, abs=1e-8)
    weights = {**DEFAULTS, **hparams}
    expected = weights["span_weight"] * GOLDEN[case]["span"]
    expected += weights["kl_weight"] * GOLDEN[case]["fkl"]
    assert total.item() == pytest.approx(expected, rel=1e-5)


# --- chunked path: whole sequences from [B, T, H] hidden states -------------------------------

B, T, HS, HT, V = 3, 7, 16, 12, 40


def make_hidden(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    x = {
        "s_hidden": torch.randn(B, T, HS, generator=g).requires_grad_(),
        "s_weight": nn.Parameter(torch.randn(V, HS, generator=g) * 0.5),
        "t_hidden": torch.randn(B, T, HT, generator=g),
        "t_weight": torch.randn(V, HT, generator=g) * 0.5,
        "labels": torch.randint(0, V, (B, T), generator=g),
    }
    x["labels"][0, :2] = -100  # a prompt
    x["labels"][2, 4] = -100  # a gap inside a sequence
    return x


def check_parity(loss_fn, x: dict, chunk_size: int, labels=..., **kw) -> None:
    labels = x["labels"] if labels is ... else labels
    s_logits = x["s_hidden"] @ x["s_weight"].t()  # [B, T, V]
    t_logits = x["t_hidden"] @ x["t_weight"].t()
    ref, ref_terms = loss_fn.forward_terms(s_logits, t_logits, labels, **kw)
    out, terms = chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        labels,
        chunk_size=chunk_size,
        return_terms=True,
        **kw,
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert set(terms) == set(ref_terms)
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], atol=ATOL, rtol=RTOL)
    params = [x["s_hidden"], x["s_weight"]]
    for g, g_ref in zip(
        torch.autograd.grad(out, params), torch.autograd.grad(ref, params), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)


LOSS_VARIANTS = {
    "defaults": lambda: build_loss("span"),
    "span only, L=2, T=2": lambda: build_loss(
        "span", span_length=2, kl_weight=0.0, span_weight=50.0, temperature=2.0
    ),
    "span+ce": lambda: WeightedSum(
        {"kd": (build_loss("span", span_length=3), 0.6), "ce": (build_loss("ce"), 0.4)}
    ),
}


@pytest.mark.parametrize("chunk_size", [1, 4, 5, 9, 100])  # none is a multiple of T = 7
@pytest.mark.parametrize("variant", sorted(LOSS_VARIANTS))
def test_chunked_matches_plain_at_every_chunk_size(variant, chunk_size):
    check_parity(LOSS_VARIANTS[variant](), make_hidden(), chunk_size)


def test_chunked_matches_plain_with_num_items_in_batch_and_without_labels():
    x = make_hidden(seed=1)
    check_parity(build_loss("span", span_length=3), x, 10, num_items_in_batch=40)
    check_parity(build_loss("span", span_length=3), x, 10, labels=None)


def test_chunked_needs_batch_time_hidden_states():
    x = make_hidden()
    with pytest.raises(ValueError, match=r"\[batch, T, H\]"):
        chunked_loss(
            build_loss("span"),
            x["s_hidden"].reshape(-1, HS),
            x["s_weight"],
            x["t_hidden"].reshape(-1, HT),
            x["t_weight"],
            x["labels"].reshape(-1),
        )
