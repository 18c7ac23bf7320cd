"""TAID (`taid`): properties, golden values from the official formula, and the adaptive schedule.

The chunked-vs-plain parity of values and gradients runs in tests/test_losses_chunked.py.
"""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import run_example_config
from kdlab.losses import WeightedSum, build_loss, chunked_loss, loss_info

V = 11


def make_batch(seed: int = 0, b: int = 2, t: int = 5, v: int = V, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g) * scale).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g) * scale
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 0] = labels[1, 3] = -100
    return student, teacher, labels


def grad_of(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, x, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def taid_at(t: float, **hparams) -> torch.nn.Module:
    loss_fn = build_loss("taid", **hparams)
    loss_fn.t.fill_(t)
    return loss_fn


# --- registry and state ----------------------------------------------------------------------


def test_registered_with_methods_md_defaults():
    info = loss_info("taid")
    assert info["hparams"] == {"t_start": 0.4, "t_end": 1.0, "alpha": 5e-4, "beta": 0.99}
    assert "TAID" in info["paper"] and not info["needs_labels"]


def test_fresh_loss_starts_at_t_start_and_logs_t():
    loss_fn = build_loss("taid", t_start=0.25)
    assert loss_fn.t.item() == 0.25
    assert loss_fn.log_values() == {"taid/t": 0.25}
    assert loss_fn.term_weights() == {"taid": 1.0, "ce": 0.0}
    assert set(loss_fn.state_dict()) == {"t", "momentum", "prev_loss", "has_prev"}


@pytest.mark.parametrize(
    "hparams",
    [
        {"t_start": -0.1},
        {"t_start": 0.8, "t_end": 0.5},
        {"t_end": 1.5},
        {"alpha": -1e-4},
        {"beta": 1.0},
        {"beta": -0.1},
    ],
)
def test_out_of_range_hparams_raise_value_error(hparams):
    with pytest.raises(ValueError, match=next(iter(hparams))):
        build_loss("taid", **hparams)


# --- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("t", [0.0, 0.4, 0.9, 1.0])
def test_zero_at_identical_inputs_at_any_t(t):
    student, _, labels = make_batch()
    terms = taid_at(t).per_position_terms(student, student.detach().clone(), labels)
    torch.testing.assert_close(terms["taid"], torch.zeros_like(terms["taid"]), atol=1e-6, rtol=0)


def test_at_t_one_it_is_forward_kl():
    student, teacher, labels = make_batch(seed=1)
    ours = taid_at(1.0)(student, teacher, labels)
    ref = build_loss("fkl")(student, teacher, labels)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad_of(ours, student), grad_of(ref, student))


def test_at_t_zero_the_target_is_the_student_itself():
    student, teacher, labels = make_batch(seed=2)
    value = taid_at(0.0)(student, teacher, labels)
    assert value.item() == pytest.approx(0.0, abs=1e-6)


def test_invariant_to_adding_a_constant_to_all_logits():
    student, teacher, labels = make_batch()
    loss_fn = taid_at(0.6)
    base = loss_fn.per_position_terms(student, teacher, labels)
    shifted = loss_fn.per_position_terms(
        student + torch.randn(*labels.shape, 1) * 10,
        teacher + torch.randn(*labels.shape, 1) * 10,
        labels,
    )
    for k in base:
        torch.testing.assert_close(shifted[k], base[k], atol=2e-5, rtol=1e-4)


def test_fully_masked_batch_gives_exact_zero_and_zero_gradient():
    student, teacher, labels = make_batch()
    value = build_loss("taid")(student, teacher, torch.full_like(labels, -100))
    grad = grad_of(value, student)
    assert value.item() == 0.0
    assert torch.equal(grad, torch.zeros_like(grad))


def masked_logits(which: str):
    student, teacher, labels = make_batch(seed=3)
    student, teacher = student.detach().clone(), teacher.clone()
    if which in ("same", "different", "student"):
        student[..., [2, 5, 7]] = -math.inf
    if which in ("same", "teacher"):
        teacher[..., [2, 5, 7]] = -math.inf
    if which == "different":
        teacher[..., [2, 5, 9]] = -math.inf
    return student.requires_grad_(), teacher, labels


@pytest.mark.parametrize("t", [0.4, 1.0])
@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which, t):
    student, teacher, labels = masked_logits(which)
    loss_fn = taid_at(t)
    terms = loss_fn.per_position_terms(student, teacher, labels)
    for v in terms.values():
        assert torch.isfinite(v).all()
    assert torch.isfinite(grad_of(terms["taid"].sum(), student)).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value) and torch.isfinite(grad_of(value, student)).all()


def test_minus_inf_in_both_equals_dropping_those_entries():
    student, teacher, labels = masked_logits("same")
    keep = torch.isfinite(teacher[0, 0])
    loss_fn = taid_at(0.7)
    full = loss_fn.per_position_terms(student, teacher, labels)
    kept = loss_fn.per_position_terms(student[..., keep], teacher[..., keep], labels)
    for k in full:
        torch.testing.assert_close(full[k], kept[k], atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("t", [0.4, 1.0])
def test_extreme_logits_give_finite_values_and_gradients(t):
    student, teacher, labels = make_batch(seed=4, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = taid_at(t)
    values = loss_fn.per_position_terms(student, teacher, labels)["taid"]
    assert torch.isfinite(values).all()
    assert torch.isfinite(grad_of(loss_fn(student, teacher, labels), student)).all()


def test_gradient_does_not_reach_the_teacher():
    student, teacher, labels = make_batch()
    teacher = teacher.clone().requires_grad_()
    taid_at(0.5)(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_ce_term_is_detached():
    student, teacher, labels = make_batch()
    terms = build_loss("taid").per_position_terms(student, teacher, labels)
    assert terms["taid"].requires_grad and not terms["ce"].requires_grad


@pytest.mark.parametrize("t", [0.4, 0.8])
def test_gradient_equals_the_official_cross_entropy_form(t):
    """Official `compute_loss`: −Σ softmax((1−t)·z_s.detach() + t·z_t) · log_softmax(z_s)."""
    student, teacher, labels = make_batch(seed=5)
    ours = taid_at(t)(student, teacher, labels)
    z_s = student.double()
    p_t = torch.softmax((1 - t) * z_s.detach() + t * teacher.double(), -1)
    ce = -(p_t * torch.log_softmax(z_s, -1)).sum(-1)
    mask = labels != -100
    official = ce[mask].mean()
    torch.testing.assert_close(grad_of(ours, student), grad_of(official, student).float())
    entropy = -(p_t * p_t.log()).sum(-1)[mask].mean()  # the value differs by H(p_t)
    assert ours.item() == pytest.approx((official - entropy).item(), abs=1e-6)


# --- golden values: the official formula in plain Python floats --------------------------------
# Reference transcribed from SakanaAI/TAID src/distil_losses/taid.py, `TAID.compute_loss`:
# p_t = softmax((1 − t)·z_s + t·z_t) (logit space, student detached), value = −Σ p_t log q (the
# official `forward_kl` with `teacher_probs=p_t`), averaged over positions. kdlab's main term is
# that value minus H(p_t); its "ce" term is the official value itself.

GOLDEN_STUDENT = [[1.0, 0.5, -1.0, 0.0, 0.3, -0.7], [0.2, 2.5, -0.3, 1.1, -0.4, 0.6]]
GOLDEN_TEACHER = [[2.0, 0.0, -0.5, -1.0, 0.5, -2.0], [0.3, 0.2, 0.1, 0.0, -0.1, -0.2]]
GOLDEN = {  # t -> (official cross-entropy value, KL(p_t ‖ q))
    0.4: (1.55930101734568, 0.06589565370496),
    0.7: (1.69680517617139, 0.20209117122394),
}


def _log_softmax(z: list[float]) -> list[float]:
    m = max(z)
    lse = m + math.log(sum(math.exp(x - m) for x in z))
    return [x - lse for x in z]


def _reference(t: float) -> tuple[float, float]:
    ces, kls = [], []
    for z_s, z_t in zip(GOLDEN_STUDENT, GOLDEN_TEACHER, strict=True):
        log_pt = _log_softmax([(1 - t) * s + t * u for s, u in zip(z_s, z_t, strict=True)])
        log_q = _log_softmax(z_s)
        ce = -sum(math.exp(a) * b for a, b in zip(log_pt, log_q, strict=True))
        entropy = -sum(math.exp(a) * a for a in log_pt)
        ces.append(ce)
        kls.append(ce - entropy)
    return sum(ces) / len(ces), sum(kls) / len(kls)


@pytest.mark.parametrize("t", sorted(GOLDEN))
def test_golden_constants_match_the_reference(t):
    ce, kl = _reference(t)
    assert ce == pytest.approx(GOLDEN[t][0], abs=1e-12)
    assert kl == pytest.approx(GOLDEN[t][1], abs=1e-12)


@pytest.mark.parametrize("t", sorted(GOLDEN))
def test_golden_values(t):
    loss_fn = build_loss("taid") if t == 0.4 else taid_at(t)  # 0.4 = a fresh loss's t_start
    value, terms = loss_fn.forward_terms(torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER))
    assert terms["ce"].item() == pytest.approx(GOLDEN[t][0], abs=2e-6)
    assert terms["taid"].item() == pytest.approx(GOLDEN[t][1], abs=2e-6)
    assert value.item() == pytest.approx(GOLDEN[t][1], abs=2e-6)


# --- the adaptive schedule ----------------------------------------------------------------------


def _official_update(state: dict, loss: float, step: int, total: int, hp: dict) -> None:
    """`TAID.update_t` of SakanaAI/TAID transcribed in floats (`step` as kdlab passes it)."""
    if math.isinf(state["prev"]):
        state["prev"] = loss
        return
    rel = (state["prev"] - loss) / (state["prev"] + 1e-15)
    state["m"] = hp["beta"] * state["m"] + (1 - hp["beta"]) * rel
    delta = hp["alpha"] * (1 / (1 + math.exp(-state["m"]))) * (1 - state["t"])
    target = hp["t_start"] + (hp["t_end"] - hp["t_start"]) * step / total
    state["t"] = min(hp["t_end"], max(target, state["t"] + delta))
    state["prev"] = loss


def run_schedule(loss_fn, losses: list[float], total: int) -> list[float]:
    ts = []
    for step, value in enumerate(losses, start=1):
        loss_fn.on_step(step, total, 123.0, {"taid": 0.0, "ce": value})
        ts.append(loss_fn.t.item())
    return ts


def linear_target(step: int, total: int, t_start: float = 0.4, t_end: float = 1.0) -> float:
    return t_start + (t_end - t_start) * step / total


DECREASING = [3.0 * 0.97**k for k in range(60)]
NOISY_INCREASING = [
    1.0 + 0.02 * k + 0.3 * math.sin(1.7 * k) * (-1) ** k for k in range(60)
]  # rises overall, with large up-and-down swings


def test_first_call_only_records_the_loss():
    loss_fn = build_loss("taid")
    loss_fn.on_step(1, 10, 9.0, {"taid": 0.1, "ce": 2.5})
    assert loss_fn.t.item() == pytest.approx(0.4)
    assert loss_fn.momentum.item() == 0.0
    assert loss_fn.prev_loss.item() == 2.5 and bool(loss_fn.has_prev)
    loss_fn.on_step(2, 10, 9.0, {"taid": 0.1, "ce": 2.0})
    assert loss_fn.t.item() > 0.4  # the second call moves t
    assert loss_fn.momentum.item() == pytest.approx(0.01 * (2.5 - 2.0) / 2.5)


@pytest.mark.parametrize("losses", [DECREASING, NOISY_INCREASING], ids=["decreasing", "noisy"])
@pytest.mark.parametrize("alpha", [5e-4, 0.05])
def test_t_rises_monotonically_and_never_below_the_linear_target(losses, alpha):
    total = 80  # the run is cut before its end: t has not reached t_end yet
    ts = run_schedule(build_loss("taid", alpha=alpha), losses, total)
    assert all(b >= a for a, b in zip(ts, ts[1:], strict=False))
    assert ts[-1] > ts[0]
    for step, t in enumerate(ts[1:], start=2):  # the first call only records the loss
        assert linear_target(step, total) - 1e-6 <= t <= 1.0
    assert ts[-1] < 1.0


def test_a_falling_loss_moves_t_ahead_of_a_rising_one():
    total = 80
    fast = run_schedule(build_loss("taid", alpha=0.05), DECREASING, total)
    slow = run_schedule(build_loss("taid", alpha=0.05), NOISY_INCREASING, total)
    assert fast[-1] > slow[-1] > linear_target(len(slow), total) - 1e-6
    assert fast[-1] > linear_target(len(fast), total) + 0.01  # ahead of the floor


def test_t_reaches_t_end_at_the_last_step():
    ts = run_schedule(build_loss("taid"), DECREASING[:20], total=20)
    assert ts[-1] == pytest.approx(1.0)


@pytest.mark.parametrize("losses", [DECREASING, NOISY_INCREASING], ids=["decreasing", "noisy"])
def test_schedule_matches_the_official_update(losses):
    hp = {"t_start": 0.4, "t_end": 1.0, "alpha": 0.05, "beta": 0.9}
    ts = run_schedule(build_loss("taid", **hp), losses, total=80)
    state = {"t": hp["t_start"], "m": 0.0, "prev": math.inf}
    ref = []
    for step, value in enumerate(losses, start=1):
        _official_update(state, value, step, 80, hp)
        ref.append(state["t"])
    assert ts == pytest.approx(ref, abs=1e-6)


def test_on_step_reads_the_ce_term_and_falls_back_to_the_loss_value():
    with_terms, without = build_loss("taid", alpha=0.1), build_loss("taid", alpha=0.1)
    for step, (ce, total_loss) in enumerate([(2.0, 0.5), (1.0, 0.5)], start=1):
        with_terms.on_step(step, 100, total_loss, {"taid": 0.3, "ce": ce})
        without.on_step(step, 100, ce)
    assert with_terms.prev_loss.item() == without.prev_loss.item() == 1.0
    assert with_terms.t.item() == without.t.item() > 0.4 + 0.6 * 2 / 100


def test_weighted_sum_routes_the_ce_term_to_taid():
    taid = build_loss("taid", alpha=0.1)
    loss_fn = WeightedSum({"kd": (taid, 0.5), "ce": (build_loss("ce"), 0.5)})
    assert loss_fn.term_weights() == {"kd": 0.5, "kd/ce": 0.0, "ce": 0.5}
    loss_fn.on_step(1, 100, 9.0, {"kd": 0.2, "kd/ce": 2.0, "ce": 7.0})
    loss_fn.on_step(2, 100, 9.0, {"kd": 0.2, "kd/ce": 1.5, "ce": 7.0})
    assert taid.prev_loss.item() == 1.5
    assert loss_fn.log_values() == {"taid/t": taid.t.item()}


def test_non_finite_loss_does_not_poison_the_momentum():
    loss_fn = build_loss("taid", alpha=0.1)
    loss_fn.on_step(1, 10, 2.0)
    loss_fn.on_step(2, 10, math.nan)
    assert math.isfinite(loss_fn.t.item()) and loss_fn.momentum.item() == 0.0
    assert loss_fn.t.item() == pytest.approx(linear_target(2, 10))
    loss_fn.on_step(3, 10, 1.0)
    assert math.isfinite(loss_fn.momentum.item()) and loss_fn.prev_loss.item() == 1.0


def test_state_dict_round_trip_continues_the_schedule(tmp_path):
    first = build_loss("taid", alpha=0.05)
    run_schedule(first, DECREASING[:10], total=80)
    path = tmp_path / "loss.safetensors"
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(path))
    second = build_loss("taid", alpha=0.05)
    second.load_state_dict(load_file(str(path)))
    for k, v in first.state_dict().items():
        assert torch.equal(second.state_dict()[k], v), k
    student, teacher, labels = make_batch()
    torch.testing.assert_close(second(student, teacher, labels), first(student, teacher, labels))
    for step, value in enumerate(DECREASING[10:20], start=11):
        first.on_step(step, 80, value)
        second.on_step(step, 80, value)
        assert second.t.item() == first.t.item()


@pytest.mark.slow
@pytest.mark.skipif(
    not any(shutil.which(c) for c in ("c++", "g++", "clang++")),
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_chunk_math_follows_t_without_recompiling():
    """The chunked path compiles the loss math on CUDA by default; t is a tensor, not a constant."""
    from torch._dynamo.utils import counters

    g = torch.Generator().manual_seed(0)
    s_hidden = torch.randn(37, 16, generator=g).requires_grad_()
    s_weight = torch.randn(50, 16, generator=g) * 0.5
    t_hidden, t_weight = torch.randn(37, 12, generator=g), torch.randn(50, 12, generator=g) * 0.5
    labels = torch.randint(0, 50, (37,), generator=g)
    labels[::4] = -100
    loss_fn = build_loss("taid")
    graphs = None
    for t in (0.4, 0.55, 0.9):
        loss_fn.t.fill_(t)
        args = (loss_fn, s_hidden, s_weight, t_hidden, t_weight, labels)
        out = chunked_loss(*args, chunk_size=16, compiled=True)
        ref = loss_fn(s_hidden @ s_weight.t(), t_hidden @ t_weight.t(), labels)
        torch.testing.assert_close(out, ref, atol=1e-5, rtol=5e-4)
        torch.testing.assert_close(grad_of(out, s_hidden), grad_of(ref, s_hidden))
        graphs = graphs if graphs is not None else counters["stats"]["unique_graphs"]
        assert counters["stats"]["unique_graphs"] == graphs  # a new t: no new graph


# --- end to end ---------------------------------------------------------------------------------


def test_distill_logs_t_and_updates_it_from_the_ce_term(tmp_path: Path, tiny_teacher: Path):
    config = Path(__file__).parent.parent / "configs" / "losses" / "taid.yaml"
    run = tmp_path / "run"
    records = run_example_config(config, tiny_teacher, run, max_steps=3)
    assert [r["taid/t"] for r in records][0] == pytest.approx(0.4)  # first step only records
    assert all(math.isfinite(r["loss/kd/ce"]) for r in records)
    assert records[1]["taid/t"] >= linear_target(2, 3) - 1e-6
    state = load_file(str(run / "loss_state.safetensors"))
    assert state["losses.kd.t"].item() == pytest.approx(records[-1]["taid/t"])
    assert state["losses.kd.prev_loss"].item() == pytest.approx(records[-1]["loss/kd/ce"], rel=1e-5)
