"""GLD (`gld`): properties, GW checks against brute force, golden values, chunked parity."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from torch import nn

from kdlab.losses import WeightedSum, build_loss, chunked_loss, loss_info

B, T, V = 2, 5, 11
ATOL, RTOL = 1e-5, 5e-4  # fp32 chunked parity, as tests/test_losses_chunked.py


def make_batch(seed: int = 0, b: int = B, t: int = T, v: int = V, scale: float = 2.0):
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


def values_of(student, teacher, labels=None, **hparams) -> torch.Tensor:
    return build_loss("gld", **hparams).terms(student, teacher, labels)["gld"]


# --- registry and hyperparameters ----------------------------------------------------------


def test_registered_with_methods_md_defaults():
    info = loss_info("gld")
    assert info["hparams"] == {"k": 32}
    assert "InfiGFusion" in info["paper"] and not info["needs_labels"]
    assert build_loss("gld").coupling == "sequence"


@pytest.mark.parametrize("k", [0, -3, 2.5, True])
def test_out_of_range_k_raises_value_error(k):
    with pytest.raises(ValueError, match="k must be"):
        build_loss("gld", k=k)


def test_logits_without_a_time_dimension_are_refused():
    with pytest.raises(ValueError, match=r"\[\.\.\., T, V\]"):
        build_loss("gld")(torch.randn(V), torch.randn(V))


# --- properties -----------------------------------------------------------------------------


def test_per_position_shape_float32_and_one_value_per_sequence():
    student, teacher, labels = make_batch()
    values = values_of(student.bfloat16(), teacher.bfloat16(), labels, k=3)
    assert values.shape == labels.shape and values.dtype == torch.float32
    assert (values[labels == -100] == 0).all()
    for row, counted in zip(values, labels != -100, strict=True):
        assert torch.unique(row[counted]).numel() == 1 and row[counted][0] > 0


def test_zero_at_identical_inputs():
    student, _, labels = make_batch()
    values = values_of(student, student.detach().clone(), labels, k=3)
    assert torch.equal(values, torch.zeros_like(values))


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    student, teacher, labels = make_batch()
    labels = torch.full_like(labels, -100)
    value = build_loss("gld")(student, teacher, labels)
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def test_masked_positions_do_not_enter_the_graphs():
    student, teacher, labels = make_batch()
    base = values_of(student, teacher, labels, k=3)
    student2, teacher2 = student.detach().clone(), teacher.clone()
    student2[labels == -100] = torch.randn(2, V) * 5
    teacher2[labels == -100] = torch.randn(2, V) * 5
    torch.testing.assert_close(values_of(student2, teacher2, labels, k=3), base, atol=0, rtol=0)
    grad = grad_of(build_loss("gld", k=3)(student, teacher, labels), student)
    assert (grad[labels == -100] == 0).all() and (grad[labels != -100] != 0).any()


def test_invariant_to_adding_a_constant_to_all_logits():
    student, teacher, labels = make_batch()
    shift_s = torch.randn(*labels.shape, 1) * 10  # a different constant per position
    shift_t = torch.randn(*labels.shape, 1) * 10
    base = values_of(student, teacher, labels, k=3)
    shifted = values_of(student + shift_s, teacher + shift_t, labels, k=3)
    torch.testing.assert_close(shifted, base, atol=1e-7, rtol=1e-4)


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    student, teacher, labels = make_batch(seed=3)
    student, teacher = student.detach().clone(), teacher.clone()
    if which in ("same", "different", "student"):
        student[..., [2, 5, 7]] = -math.inf
    if which in ("same", "teacher"):
        teacher[..., [2, 5, 7]] = -math.inf
    if which == "different":
        teacher[..., [2, 5, 9]] = -math.inf
    student.requires_grad_()
    loss_fn = build_loss("gld", k=10)  # more channels than the finite ones: zeros get picked
    values = loss_fn.terms(student, teacher, labels)["gld"]
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad_of(value, student)).all()


def test_extreme_logits_give_finite_values_and_gradients():
    student, teacher, labels = make_batch(seed=4, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = build_loss("gld", k=3)
    values = loss_fn.terms(student, teacher, labels)["gld"]
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(values.sum(), student)).all()
    assert torch.isfinite(grad_of(loss_fn(student, teacher, labels), student)).all()


def test_gradient_does_not_reach_the_teacher():
    student, teacher, labels = make_batch()
    teacher = teacher.clone().requires_grad_()
    build_loss("gld", k=3)(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()
    assert student.grad.abs().sum() > 0


def test_sequences_are_independent_and_weighted_by_counted_length():
    student, teacher, labels = make_batch(b=3)
    per_seq = [
        values_of(student[i : i + 1], teacher[i : i + 1], labels[i : i + 1], k=3) for i in range(3)
    ]
    torch.testing.assert_close(values_of(student, teacher, labels, k=3), torch.cat(per_seq))
    counts = (labels != -100).sum(-1).float()
    seq_values = torch.stack([v[0][lab != -100][0] for v, lab in zip(per_seq, labels, strict=True)])
    mean = build_loss("gld", k=3)(student, teacher, labels)
    torch.testing.assert_close(mean, (counts * seq_values).sum() / counts.sum())


def test_k_larger_than_the_vocabulary_keeps_every_channel():
    student, teacher, labels = make_batch()
    torch.testing.assert_close(
        values_of(student, teacher, labels, k=V), values_of(student, teacher, labels, k=10 * V)
    )


# --- reference: the graphs built explicitly, GW by brute force --------------------------------
# Plain Python, independent of kdlab's code. `_graph` builds the co-activation graph of one
# sequence as the paper describes it (outer products of each position's top-k vector, summed over
# positions; kdlab takes the mean and uses softmax probabilities, see gld's docstring) as a dense
# V x V matrix; `_gld_reference` sorts the row sums (node strengths) of both graphs and sums the
# squared differences of equal ranks. `_gw_permutations` is the exact Gromov-Wasserstein cost
# over node permutations (square loss, counting measure) on a given node set.


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def _graph(logits: list[list[float]], k: int) -> list[list[float]]:
    size = len(logits[0])
    graph = [[0.0] * size for _ in range(size)]
    for z in logits:
        p = _softmax(z)
        keep = sorted(range(size), key=lambda i: -p[i])[:k]
        x = [p[i] if i in keep else 0.0 for i in range(size)]
        for i in range(size):
            for j in range(size):
                graph[i][j] += x[i] * x[j] / len(logits)
    return graph


def _gld_reference(a: list[list[float]], b: list[list[float]]) -> float:
    sa = sorted((sum(row) for row in a), reverse=True)
    sb = sorted((sum(row) for row in b), reverse=True)
    return sum((x - y) ** 2 for x, y in zip(sa, sb, strict=True))


def _gw_permutations(a: list[list[float]], b: list[list[float]], nodes: list[int]) -> float:
    best = math.inf
    for perm in itertools.permutations(nodes):
        sigma = dict(zip(nodes, perm, strict=True))
        cost = sum((a[i][k] - b[sigma[i]][sigma[k]]) ** 2 for i in nodes for k in nodes)
        best = min(best, cost)
    return best


def _support(*graphs: list[list[float]]) -> list[int]:
    return [i for i in range(len(graphs[0])) if any(g[i][i] > 0 for g in graphs)]


def _gld_value(student: list[list[float]], teacher: list[list[float]], k: int) -> float:
    s, t = torch.tensor([student]), torch.tensor([teacher])
    return values_of(s, t, None, k=k)[0, 0].item()


def test_isomorphic_graphs_give_zero_like_exact_gw():
    """Student = teacher with the vocabulary channels permuted: isomorphic graphs, GW = 0."""
    g = torch.Generator().manual_seed(8)
    teacher = (torch.randn(4, 6, generator=g) * 2).tolist()
    perm = [3, 0, 5, 1, 4, 2]
    student = [[z[perm[i]] for i in range(6)] for z in teacher]
    a, b = _graph(student, 2), _graph(teacher, 2)
    assert _gw_permutations(a, b, _support(a, b)) == pytest.approx(0.0, abs=1e-15)
    assert _gld_reference(a, b) == pytest.approx(0.0, abs=1e-15)
    assert _gld_value(student, teacher, k=2) == pytest.approx(0.0, abs=1e-9)
    assert _gld_value(student, teacher, k=2) != _gld_value(teacher[::-1], teacher, k=2)


def test_constant_graphs_are_where_the_sorting_approximation_is_exact():
    """Two tied top channels per position: each graph is constant (a·J, b·J) on the same two
    nodes; there GLD / n equals exact GW (n = 2) — the Jensen step of the bound is tight."""
    teacher = [[1.5, 1.5, 0.0, -1.0, 0.2], [2.5, 2.5, 0.3, 0.0, -0.4]]
    student = [[0.5, 0.5, 0.2, 0.1, 0.0], [1.0, 1.0, 0.4, -0.2, 0.1]]
    a, b = _graph(student, 2), _graph(teacher, 2)
    nodes = _support(a, b)
    assert nodes == [0, 1]
    exact = _gw_permutations(a, b, nodes)
    assert exact > 1e-3
    assert _gld_reference(a, b) / len(nodes) == pytest.approx(exact, rel=1e-12)
    assert _gld_value(student, teacher, k=2) / len(nodes) == pytest.approx(exact, rel=1e-5)


def test_elsewhere_the_approximation_is_a_strict_lower_bound_of_exact_gw():
    """Random graphs: GLD / n < GW over node permutations, and GLD / n³ <= the uniform-measure
    GW cost of any coupling (here random doubly-stochastic ones) — not exact, but a bound."""
    g = torch.Generator().manual_seed(9)
    teacher = (torch.randn(3, 5, generator=g) * 2).tolist()
    student = (torch.randn(3, 5, generator=g) * 2).tolist()
    a, b = _graph(student, 3), _graph(teacher, 3)
    nodes = list(range(5))
    approx = _gld_reference(a, b)
    assert approx / 5 < 0.9 * _gw_permutations(a, b, nodes)
    assert _gld_value(student, teacher, k=3) == pytest.approx(approx, rel=1e-5)
    for _ in range(20):
        plan = torch.rand(5, 5, generator=g, dtype=torch.float64)
        for _ in range(200):  # Sinkhorn scaling to uniform marginals 1/5
            plan = plan / plan.sum(1, keepdim=True) / 5
            plan = plan / plan.sum(0, keepdim=True) / 5
        cost = sum(
            (a[i][k] - b[j][m]) ** 2 * plan[i, j].item() * plan[k, m].item()
            for i, j, k, m in itertools.product(nodes, repeat=4)
        )
        assert approx / 5**3 <= cost + 1e-12


# --- golden values ----------------------------------------------------------------------------
# Two sequences of four positions over six channels, k = 3, one masked position in the second
# sequence. The constant is the mean over counted positions of `_gld_reference` on `_graph`
# (each sequence's value given to each of its counted positions), computed once.

GOLDEN_STUDENT = [
    [
        [1.0, 0.5, -1.0, 0.0, 0.3, -0.7],
        [0.2, 2.5, -0.3, 1.1, -0.4, 0.6],
        [-1.2, 0.0, 0.8, 0.4, 1.5, -0.2],
        [0.7, -0.6, 0.1, 2.0, -1.1, 0.3],
    ],
    [
        [0.0, 0.9, 1.3, -0.5, 0.2, -1.4],
        [1.4, -0.3, 0.6, 0.9, -0.8, 0.1],
        [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # masked: must not matter
        [-0.4, 1.8, 0.2, -1.0, 0.7, 0.5],
    ],
]
GOLDEN_TEACHER = [
    [
        [2.0, 0.0, -0.5, -1.0, 0.5, -2.0],
        [0.3, 0.2, 0.1, 0.0, -0.1, -0.2],
        [-0.8, 0.4, 1.6, 0.2, 0.9, -0.6],
        [1.1, -0.2, -0.4, 1.7, -0.9, 0.0],
    ],
    [
        [0.5, 1.2, 0.6, -0.3, -0.7, -1.0],
        [0.9, 0.1, -0.2, 1.5, -1.3, 0.4],
        [-5.0, 0.0, 5.0, 0.0, 0.0, 0.0],  # masked
        [-1.1, 0.3, 1.0, -0.6, 2.2, 0.8],
    ],
]
GOLDEN_LABELS = [[1, 2, 3, 4], [0, 5, -100, 2]]
GOLDEN = 0.008512592391409267


def _reference_mean() -> float:
    total, count = 0.0, 0
    for s, t, labels in zip(GOLDEN_STUDENT, GOLDEN_TEACHER, GOLDEN_LABELS, strict=True):
        keep = [i for i, y in enumerate(labels) if y != -100]
        value = _gld_reference(_graph([s[i] for i in keep], 3), _graph([t[i] for i in keep], 3))
        total, count = total + value * len(keep), count + len(keep)
    return total / count


def test_golden_constant_matches_the_independent_reference():
    assert _reference_mean() == pytest.approx(GOLDEN, abs=1e-15)


def test_golden_value():
    student, teacher = torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER)
    value = build_loss("gld", k=3)(student, teacher, torch.tensor(GOLDEN_LABELS))
    assert value.item() == pytest.approx(GOLDEN, rel=1e-5)


# --- chunked path: whole sequences, chunk sizes that are not multiples of T ------------------

BC, TC, HS, HT, VC = 3, 7, 16, 12, 40


def make_hidden(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "s_hidden": torch.randn(BC, TC, HS, generator=g).requires_grad_(),
        "s_weight": nn.Parameter(torch.randn(VC, HS, generator=g) * 0.5),
        "t_hidden": torch.randn(BC, TC, HT, generator=g),
        "t_weight": torch.randn(VC, HT, generator=g) * 0.5,
        "labels": torch.randint(0, VC, (BC, TC), generator=g),
    }
    x["labels"][0, :2] = -100
    x["labels"][2, 4] = -100
    return x


def check_parity(loss_fn, x, chunk_size: int, num_items: int | None = None) -> None:
    s_logits = x["s_hidden"] @ x["s_weight"].t()
    t_logits = x["t_hidden"] @ x["t_weight"].t()
    ref, ref_terms = loss_fn.forward_terms(
        s_logits, t_logits, x["labels"], num_items_in_batch=num_items
    )
    out, out_terms = chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        x["labels"],
        chunk_size=chunk_size,
        num_items_in_batch=num_items,
        return_terms=True,
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for key in ref_terms:
        torch.testing.assert_close(out_terms[key], ref_terms[key], atol=ATOL, rtol=RTOL)
    params = [x["s_hidden"], x["s_weight"]]
    for g, g_ref in zip(
        torch.autograd.grad(out, params), torch.autograd.grad(ref, params), strict=True
    ):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("num_items", [None, 25])
@pytest.mark.parametrize("chunk_size", [1, 4, 5, 9, 100])
def test_chunked_matches_plain_at_every_chunk_size(chunk_size, num_items):
    check_parity(build_loss("gld", k=4), make_hidden(), chunk_size, num_items)


@pytest.mark.parametrize("chunk_size", [5, 9])
def test_chunked_matches_plain_in_a_weighted_sum_with_ce(chunk_size):
    loss_fn = WeightedSum({"gld": (build_loss("gld"), 0.5), "ce": (build_loss("ce"), 0.5)})
    check_parity(loss_fn, make_hidden(seed=1), chunk_size)
