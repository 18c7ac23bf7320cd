"""DAC-KL (`dac_kl`): properties, golden values, the learnable bounds on both paths, end to end.

The generic chunked parity of values and student gradients runs in tests/test_losses_chunked.py;
the parity of the network's parameter gradients is checked here.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from conftest import run_example_config
from kdlab.losses import build_loss, chunked_loss, loss_info
from kdlab.losses._common import kl_sum, log_probs
from kdlab.losses.dac_kl import region_gate, region_kl

V = 11
ATOL, RTOL = 1e-5, 5e-4


def make_batch(seed: int = 0, b: int = 2, t: int = 5, v: int = V, scale: float = 2.0):
    g = torch.Generator().manual_seed(seed)
    student = (torch.randn(b, t, v, generator=g) * scale).requires_grad_()
    teacher = torch.randn(b, t, v, generator=g) * scale
    labels = torch.randint(0, v, (b, t), generator=g)
    labels[0, 0] = labels[1, 3] = -100
    return student, teacher, labels


def grad_of(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    (g,) = torch.autograd.grad(value, x, allow_unused=True, retain_graph=True)
    return torch.zeros_like(x) if g is None else g


def perturbed(seed: int = 0, **hparams) -> nn.Module:
    """A loss whose network has random weights everywhere (the fresh output layer is zero), so
    the bounds vary per position and every parameter gets a gradient."""
    loss_fn = build_loss("dac_kl", **hparams)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in loss_fn.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.5)
    return loss_fn


def param_grads(value: torch.Tensor, loss_fn: nn.Module) -> list[torch.Tensor]:
    return list(torch.autograd.grad(value, list(loss_fn.parameters()), retain_graph=True))


# --- registry, construction, validation --------------------------------------------------------


def test_registered_with_documented_defaults():
    info = loss_info("dac_kl")
    assert info["hparams"] == {
        "hidden": 32,
        "num_probs": 16,
        "gate_width": 0.05,
        "init_lower": 0.01,
        "init_upper": 0.9,
        "coverage_weight": 2.0,
    }
    assert "Multi-Granularity Semantic Revision" in info["paper"]
    loss_fn = build_loss("dac_kl", coverage_weight=0.5)
    assert loss_fn.term_weights() == {"dac_kl": 1.0, "clip": 0.5, "kept": 0.0}


def test_fresh_network_gives_the_initial_bounds_everywhere():
    student, teacher, _ = make_batch()
    loss_fn = build_loss("dac_kl", init_lower=0.05, init_upper=0.8)
    lower, upper = loss_fn.bounds(log_probs(teacher), log_probs(student.detach()))
    torch.testing.assert_close(lower, torch.full_like(lower, 0.05))
    torch.testing.assert_close(upper, torch.full_like(upper, 0.8))


def test_building_is_deterministic_and_leaves_the_global_rng_alone():
    state = torch.get_rng_state()
    a, b = build_loss("dac_kl"), build_loss("dac_kl")
    assert torch.equal(torch.get_rng_state(), state)
    for (k, x), y in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(x, y), k


@pytest.mark.parametrize(
    "hparams",
    [
        {"hidden": 0},
        {"num_probs": 2.5},
        {"gate_width": 0.0},
        {"init_lower": 0.0},
        {"init_lower": 0.95},
        {"init_upper": 1.0},
        {"coverage_weight": -1.0},
    ],
)
def test_out_of_range_hparams_raise_value_error(hparams):
    with pytest.raises(ValueError, match=next(iter(hparams))):
        build_loss("dac_kl", **hparams)


# --- the region ---------------------------------------------------------------------------------


def test_region_gate_keeps_tokens_touching_the_window_with_linear_edges():
    p = torch.tensor([0.5, 0.3, 0.1, 0.05, 0.05])  # starts 0, .5, .8, .9, .95; ends .5, .8, ...
    gate = region_gate(p, torch.tensor(0.0), torch.tensor(0.6), 0.05)
    assert gate.tolist() == pytest.approx([1, 1, 0, 0, 0])
    gate = region_gate(p, torch.tensor(0.0), torch.tensor(0.88), 0.05)
    assert gate.tolist() == pytest.approx([1, 1, 1, 0.6, 0], abs=1e-6)  # token 4 starts 0.02 past u
    gate = region_gate(p, torch.tensor(0.52), torch.tensor(0.6), 0.05)
    assert gate.tolist() == pytest.approx([0.6, 1, 0, 0, 0], abs=1e-6)  # token 1 ends 0.02 before l


def test_full_window_is_exactly_forward_kl():
    student, teacher, labels = make_batch(seed=1)
    log_p, log_q = log_probs(teacher), log_probs(student)
    p_sorted, order = log_p.sort(-1, descending=True)
    gate = region_gate(p_sorted.exp(), torch.zeros(labels.shape), torch.ones(labels.shape), 0.05)
    assert torch.equal(gate, torch.ones_like(gate))
    ours = region_kl(p_sorted, log_q.gather(-1, order), gate)
    ref = kl_sum(log_p, log_q)
    torch.testing.assert_close(ours, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(grad_of(ours.sum(), student), grad_of(ref.sum(), student))


def test_region_kl_is_the_kl_of_the_renormalised_restrictions():
    student, teacher, _ = make_batch(seed=2)
    log_p, log_q = log_probs(teacher), log_probs(student)
    gate = (torch.rand(log_p.shape, generator=torch.Generator().manual_seed(0)) > 0.4).float()
    gate[..., 0] = 1.0
    p = gate * log_p.exp()
    q = gate * log_q.exp()
    p, q = p / p.sum(-1, keepdim=True), q / q.sum(-1, keepdim=True)
    ref = torch.where(p > 0, p * (p / q).log(), 0.0).sum(-1)
    torch.testing.assert_close(region_kl(log_p, log_q, gate), ref, atol=1e-6, rtol=1e-5)


# --- properties -------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [None, 0, 1])
def test_zero_at_identical_inputs(seed):
    student, _, labels = make_batch()
    loss_fn = build_loss("dac_kl") if seed is None else perturbed(seed)
    terms = loss_fn.per_position_terms(student, student.detach().clone(), labels)
    for k in ("dac_kl", "clip"):
        torch.testing.assert_close(terms[k], torch.zeros_like(terms[k]), atol=1e-6, rtol=0)
    assert (terms["kept"] > 0).all()
    assert loss_fn(student, student.detach().clone(), labels).item() == pytest.approx(0, abs=1e-6)


def test_invariant_to_adding_a_constant_to_all_logits():
    student, teacher, labels = make_batch()
    loss_fn = perturbed()
    base = loss_fn.per_position_terms(student, teacher, labels)
    shifted = loss_fn.per_position_terms(
        student + torch.randn(*labels.shape, 1) * 10,
        teacher + torch.randn(*labels.shape, 1) * 10,
        labels,
    )
    for k in base:
        torch.testing.assert_close(shifted[k], base[k], atol=2e-5, rtol=1e-4)


def test_fully_masked_batch_gives_exact_zero_and_zero_gradients():
    student, teacher, labels = make_batch()
    loss_fn = perturbed()
    value = loss_fn(student, teacher, torch.full_like(labels, -100))
    assert value.item() == 0.0
    for g in [grad_of(value, student), *param_grads(value, loss_fn)]:
        assert torch.equal(g, torch.zeros_like(g))


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


@pytest.mark.parametrize("which", ["same", "different", "student", "teacher"])
def test_minus_inf_logits_give_finite_values_and_gradients(which):
    student, teacher, labels = masked_logits(which)
    loss_fn = perturbed()
    terms = loss_fn.per_position_terms(student, teacher, labels)
    for v in terms.values():
        assert torch.isfinite(v).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value)
    for g in [grad_of(value, student), *param_grads(value, loss_fn)]:
        assert torch.isfinite(g).all()
    assert torch.isfinite(grad_of(terms["dac_kl"].sum(), student)).all()


def test_minus_inf_in_both_equals_dropping_those_entries():
    student, teacher, labels = masked_logits("same")
    keep = torch.isfinite(teacher[0, 0])
    loss_fn = perturbed(num_probs=12)  # more features than the 8 kept entries: zero padding
    full = loss_fn.per_position_terms(student, teacher, labels)
    kept = loss_fn.per_position_terms(student[..., keep], teacher[..., keep], labels)
    for k in full:
        torch.testing.assert_close(full[k], kept[k], atol=1e-6, rtol=1e-5)


def test_extreme_logits_give_finite_values_and_gradients():
    student, teacher, labels = make_batch(seed=4, scale=1.0)
    student = (student.detach().sign() * 1e4).requires_grad_()
    teacher = -teacher.sign() * 1e4
    loss_fn = perturbed()
    for v in loss_fn.per_position_terms(student, teacher, labels).values():
        assert torch.isfinite(v).all()
    value = loss_fn(student, teacher, labels)
    assert torch.isfinite(value)
    for g in [grad_of(value, student), *param_grads(value, loss_fn)]:
        assert torch.isfinite(g).all()


def test_gradient_does_not_reach_the_teacher():
    student, teacher, labels = make_batch()
    teacher = teacher.clone().requires_grad_()
    perturbed()(student, teacher, labels).backward()
    assert teacher.grad is None
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_only_the_region_kl_moves_the_student_the_clip_term_moves_the_network():
    student, teacher, labels = make_batch(seed=6)
    loss_fn = perturbed()
    total, _ = loss_fn.forward_terms(student, teacher, labels)
    region = build_loss("dac_kl", coverage_weight=0.0)
    region.load_state_dict(loss_fn.state_dict())
    region_only = region(student, teacher, labels)
    torch.testing.assert_close(grad_of(total, student), grad_of(region_only, student))
    clip_grads = [
        a - b
        for a, b in zip(param_grads(total, loss_fn), param_grads(region_only, region), strict=True)
    ]
    assert any(g.abs().sum() > 0 for g in clip_grads)


# --- golden values ------------------------------------------------------------------------------
# No official code exists. The reference below transcribes kdlab's documented DAC-KL (module
# docstring of kdlab/losses/dac_kl.py, steps 1-5; the paper's quantile-clipped, renormalised KL)
# in plain Python floats, at the fresh network's bounds (l, u) = (init_lower, init_upper), which
# the network gives at every position (its output layer starts at zero). Position 0 has its last
# two teacher tokens clipped by u; position 1 (a flat teacher) keeps everything at the defaults;
# the second setting trims the head of position 1 and clips with partial gates.

GOLDEN_STUDENT = [[1.0, 0.5, -1.0, 0.0, 0.3, -0.7], [0.2, 2.5, -0.3, 1.1, -0.4, 0.6]]
GOLDEN_TEACHER = [[2.0, 0.0, -0.5, -1.0, 0.5, -2.0], [0.3, 0.2, 0.1, 0.0, -0.1, -0.2]]
GOLDEN_SETTINGS = {
    "defaults": {},
    "narrow": {"init_lower": 0.3, "init_upper": 0.7, "gate_width": 0.2, "coverage_weight": 0.5},
}
GOLDEN = {  # setting -> (mean region KL, mean clip term, total value)
    "defaults": (0.34413346846716, 0.00561526976236, 0.35536400799189),
    "narrow": (0.35551900721051, 0.08859424917475, 0.39981613179789),
}


def _softmax(z: list[float]) -> list[float]:
    m = max(z)
    e = [math.exp(x - m) for x in z]
    return [x / sum(e) for x in e]


def _reference_position(p, q, lower, upper, width):
    order = sorted(range(len(p)), key=lambda i: -p[i])
    start, gates = 0.0, []
    for i in order:
        end = start + p[i]
        tail = min(1.0, max(0.0, (upper + width - start) / width))
        head = min(1.0, max(0.0, (end - lower + width) / width))
        gates.append((i, tail * head))
        start = end
    mass_p = sum(g * p[i] for i, g in gates)
    mass_q = sum(g * q[i] for i, g in gates)
    region = sum(
        (g * p[i] / mass_p) * math.log((p[i] / mass_p) / (q[i] / mass_q)) for i, g in gates if g
    )
    full = sum(x * math.log(x / y) for x, y in zip(p, q, strict=True))
    return region, -math.log(mass_p) * full, [g for _, g in gates]


def _reference(setting: str) -> tuple[float, float, float]:
    hp = {**build_loss("dac_kl").hparams, **GOLDEN_SETTINGS[setting]}
    regions, clips = [], []
    for z_s, z_t in zip(GOLDEN_STUDENT, GOLDEN_TEACHER, strict=True):
        region, clip, _ = _reference_position(
            _softmax(z_t), _softmax(z_s), hp["init_lower"], hp["init_upper"], hp["gate_width"]
        )
        regions.append(region)
        clips.append(clip)
    region, clip = sum(regions) / 2, sum(clips) / 2
    return region, clip, region + hp["coverage_weight"] * clip


@pytest.mark.parametrize("setting", sorted(GOLDEN))
def test_golden_constants_match_the_reference(setting):
    assert _reference(setting) == pytest.approx(GOLDEN[setting], abs=1e-12)


@pytest.mark.parametrize("setting", sorted(GOLDEN))
def test_golden_values(setting):
    loss_fn = build_loss("dac_kl", **GOLDEN_SETTINGS[setting])
    value, terms = loss_fn.forward_terms(torch.tensor(GOLDEN_STUDENT), torch.tensor(GOLDEN_TEACHER))
    region, clip, total = GOLDEN[setting]
    assert terms["dac_kl"].item() == pytest.approx(region, abs=2e-6)
    assert terms["clip"].item() == pytest.approx(clip, abs=2e-6)
    assert value.item() == pytest.approx(total, abs=2e-6)


def test_golden_inputs_exercise_clipping_head_trimming_and_partial_gates():
    p0, p1 = (_softmax(z) for z in GOLDEN_TEACHER)
    q0, q1 = (_softmax(z) for z in GOLDEN_STUDENT)
    gates0 = _reference_position(p0, q0, 0.01, 0.9, 0.05)[2]
    gates1 = _reference_position(p1, q1, 0.01, 0.9, 0.05)[2]
    assert gates0[-2:] == [0.0, 0.0] and gates1 == [1.0] * 6
    narrow = _reference_position(p1, q1, 0.3, 0.7, 0.2)[2]
    assert 0 < narrow[0] < 1  # the top token of the flat teacher is partly trimmed
    assert any(0 < g < 1 for g in _reference_position(p0, q0, 0.3, 0.7, 0.2)[2])


# --- the learnable bounds -----------------------------------------------------------------------

B, T, HS, HT, VC = 3, 7, 16, 12, 40


def make_hidden(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = {
        "s_hidden": torch.randn(B * T, HS, generator=g).requires_grad_(),
        "s_weight": nn.Parameter(torch.randn(VC, HS, generator=g) * 0.5),
        "t_hidden": torch.randn(B * T, HT, generator=g),
        "t_weight": torch.randn(VC, HT, generator=g) * 0.5,
        "labels": torch.randint(0, VC, (B * T,), generator=g),
    }
    x["labels"][:3] = -100
    x["labels"][12] = -100
    return x


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh", "perturbed"])
def test_parameters_get_gradients_on_the_plain_and_chunked_paths(fresh):
    x = make_hidden()
    loss_fn = build_loss("dac_kl") if fresh else perturbed(1)
    s_logits, t_logits = x["s_hidden"] @ x["s_weight"].t(), x["t_hidden"] @ x["t_weight"].t()
    plain = param_grads(loss_fn(s_logits, t_logits, x["labels"]), loss_fn)
    out = chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        x["labels"],
        chunk_size=8,
    )
    chunked = param_grads(out, loss_fn)
    for grads in (plain, chunked):
        assert all(torch.isfinite(g).all() for g in grads)
        if fresh:  # the zero output layer: only it gets a gradient on the first step
            assert grads[2].abs().sum() > 0 and grads[3].abs().sum() > 0
        else:
            assert all(g.abs().sum() > 0 for g in grads)


@pytest.mark.parametrize("chunk_size", [1, 5, 16, 100])
def test_chunked_parameter_gradients_equal_the_plain_ones(chunk_size):
    x = make_hidden(seed=2)
    loss_fn = perturbed(2)
    s_logits, t_logits = x["s_hidden"] @ x["s_weight"].t(), x["t_hidden"] @ x["t_weight"].t()
    ref, ref_terms = loss_fn.forward_terms(s_logits, t_logits, x["labels"])
    out, terms = chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        x["labels"],
        chunk_size=chunk_size,
        return_terms=True,
    )
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    for k in ref_terms:
        torch.testing.assert_close(terms[k], ref_terms[k], atol=ATOL, rtol=RTOL)
    inputs = [x["s_hidden"], x["s_weight"], *loss_fn.parameters()]
    got = torch.autograd.grad(out, inputs)
    want = torch.autograd.grad(ref, inputs)
    for g, g_ref in zip(got, want, strict=True):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)


def test_optimiser_steps_change_the_network_and_its_bounds():
    student, teacher, labels = make_batch(seed=7)
    student = student.detach()
    loss_fn = build_loss("dac_kl")
    before = {k: v.clone() for k, v in loss_fn.state_dict().items()}
    log_p, log_q = log_probs(teacher), log_probs(student)
    bounds_before = loss_fn.bounds(log_p, log_q)
    opt = torch.optim.AdamW(loss_fn.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        loss_fn(student, teacher, labels).backward()
        opt.step()
    for k, v in loss_fn.state_dict().items():
        assert not torch.equal(v, before[k]), (
            k
        )  # every parameter moved (the first layer from step 2)
    for new, old in zip(loss_fn.bounds(log_p, log_q), bounds_before, strict=True):
        assert not torch.allclose(new, old)


def train_network(loss_fn, student, teacher, steps: int = 200) -> torch.Tensor:
    """Optimise the network alone (the student is fixed); return the teacher mass kept."""
    opt = torch.optim.Adam(loss_fn.parameters(), lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss_fn(student, teacher).backward()
        opt.step()
    with torch.no_grad():
        return loss_fn.per_position_terms(student, teacher, None)["kept"]


def test_the_network_clips_the_mismatched_tail_and_the_price_prevents_collapse():
    """The student matches the teacher's top-5 tokens and is wrong on the rest."""
    g = torch.Generator().manual_seed(0)
    teacher = torch.randn(64, 50, generator=g) * 2.5
    noise = torch.randn(64, 50, generator=g) * 3
    noise.scatter_(-1, teacher.topk(5, -1).indices, 0.0)
    student = teacher + noise
    top1 = teacher.softmax(-1).amax(-1)
    top5 = teacher.softmax(-1).topk(5, -1).values.sum(-1)
    initial = build_loss("dac_kl").per_position_terms(student, teacher, None)["kept"]
    kept = train_network(build_loss("dac_kl"), student, teacher)
    assert kept.mean() < initial.mean() - 0.05  # it clipped more of the tail than at the start
    assert kept.mean() > 0.9 * top5.mean()  # ... down to about the matched head, not below
    collapsed = train_network(build_loss("dac_kl", coverage_weight=0.0), student, teacher)
    assert collapsed.mean() < 0.7 * kept.mean()  # without the price: towards the top token
    assert collapsed.mean() < top1.mean() + 0.1


def test_state_dict_round_trip(tmp_path):
    student, teacher, labels = make_batch()
    first = perturbed(3)
    path = tmp_path / "loss.safetensors"
    save_file({k: v.contiguous() for k, v in first.state_dict().items()}, str(path))
    second = build_loss("dac_kl")
    second.load_state_dict(load_file(str(path)))
    for k, v in first.state_dict().items():
        assert torch.equal(second.state_dict()[k], v), k
    torch.testing.assert_close(second(student, teacher, labels), first(student, teacher, labels))


# --- end to end ---------------------------------------------------------------------------------


def test_distill_trains_the_network_and_saves_it(tmp_path: Path, tiny_teacher: Path):
    config = Path(__file__).parent.parent / "configs" / "losses" / "dac_kl.yaml"
    run = tmp_path / "run"
    records = run_example_config(config, tiny_teacher, run, max_steps=2)
    assert all(math.isfinite(r["loss/kd/clip"]) and 0 < r["loss/kd/kept"] <= 1 for r in records)
    state = load_file(str(run / "loss_state.safetensors"))
    fresh = build_loss("dac_kl").state_dict()
    assert set(state) == {f"losses.kd.{k}" for k in fresh}
    assert not torch.equal(state["losses.kd.bounds_net.2.weight"], fresh["bounds_net.2.weight"])
