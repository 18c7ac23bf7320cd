"""The chunked path (hidden states + lm_head weights) against the plain path (full logits)."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from kdlab.losses import KDLoss, WeightedSum, available_losses, build_loss, chunked_loss

ATOL, RTOL = 1e-5, 5e-4  # fp32, as Liger-Kernel's chunked-loss tests
N, HS, HT, V = 37, 16, 12, 50


def make_inputs(n: int = N, seed: int = 0, bias: bool = False, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = {
        "s_hidden": torch.randn(n, HS, generator=g).to(dtype).requires_grad_(),
        "s_weight": nn.Parameter((torch.randn(V, HS, generator=g) * 0.5).to(dtype)),
        "t_hidden": torch.randn(n, HT, generator=g).to(dtype),
        "t_weight": (torch.randn(V, HT, generator=g) * 0.5).to(dtype),
        "labels": torch.randint(0, V, (n,), generator=g),
    }
    x["labels"][::4] = -100
    if bias:
        x["s_bias"] = nn.Parameter(torch.randn(V, generator=g).to(dtype))
        x["t_bias"] = torch.randn(V, generator=g).to(dtype)
    return x


def losses() -> dict[str, KDLoss]:
    """Every registered loss that takes flat `[N, H]` positions (a `"sequence"` loss needs
    `[B, T, H]`; its own test file checks its parity), plus two combinations."""
    out: dict[str, KDLoss] = {name: build_loss(name) for name in available_losses()}
    out = {name: loss for name, loss in out.items() if loss.coupling != "sequence"}
    out["kd+ce"] = WeightedSum({"kd": (build_loss("fkl"), 0.7), "ce": (build_loss("ce"), 0.3)})
    out["jsd(0.3, T=2)"] = build_loss("jsd", beta=0.3, temperature=2.0)
    return out


LOSSES = losses()


def plain(loss_fn, x, labels, **kw):
    s_logits = x["s_hidden"] @ x["s_weight"].t()
    t_logits = x["t_hidden"] @ x["t_weight"].t()
    if "s_bias" in x:
        s_logits = s_logits + x["s_bias"]
        t_logits = t_logits + x["t_bias"]
    return loss_fn.forward_terms(s_logits, t_logits, labels, **kw)


def chunked(loss_fn, x, labels, **kw):
    return chunked_loss(
        loss_fn,
        x["s_hidden"],
        x["s_weight"],
        x["t_hidden"],
        x["t_weight"],
        labels,
        student_bias=x.get("s_bias"),
        teacher_bias=x.get("t_bias"),
        return_terms=True,
        **kw,
    )


def student_grads(value, x):
    params = [x["s_hidden"], x["s_weight"]] + ([x["s_bias"]] if "s_bias" in x else [])
    return torch.autograd.grad(value, params)


def assert_parity(loss_fn, x, labels, **kw):
    ref, ref_terms = plain(loss_fn, x, labels, num_items_in_batch=kw.get("num_items_in_batch"))
    out, terms = chunked(loss_fn, x, labels, **kw)
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)
    assert terms.keys() == ref_terms.keys()
    for k in terms:
        torch.testing.assert_close(terms[k], ref_terms[k], atol=ATOL, rtol=RTOL)
        assert not terms[k].requires_grad
    for g, g_ref in zip(student_grads(out, x), student_grads(ref, x), strict=True):
        torch.testing.assert_close(g, g_ref, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("chunk_size", [8, 16, 1024])
@pytest.mark.parametrize("name", sorted(LOSSES))
def test_chunked_matches_plain(name, chunk_size):
    x = make_inputs()
    assert_parity(LOSSES[name], x, x["labels"], chunk_size=chunk_size)


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_chunked_matches_plain_with_num_items_in_batch_and_bias(name):
    x = make_inputs(bias=True, seed=1)
    assert_parity(LOSSES[name], x, x["labels"], chunk_size=10, num_items_in_batch=61)


@pytest.mark.parametrize("name", [n for n in sorted(LOSSES) if not LOSSES[n].needs_labels])
def test_chunked_without_labels_counts_every_position(name):
    x = make_inputs(seed=2)
    assert_parity(LOSSES[name], x, None, chunk_size=9)


def test_chunked_accepts_batch_and_time_dims():
    x = make_inputs(n=24)
    loss_fn = LOSSES["kd+ce"]
    ref = chunked_loss(
        loss_fn, x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"], x["labels"]
    )
    out = chunked_loss(
        loss_fn,
        x["s_hidden"].view(4, 6, HS),
        x["s_weight"],
        x["t_hidden"].view(4, 6, HT),
        x["t_weight"],
        x["labels"].view(4, 6),
        chunk_size=5,
    )
    torch.testing.assert_close(out, ref)


def test_ce_needs_no_teacher():
    x = make_inputs()
    ref = build_loss("ce")(x["s_hidden"] @ x["s_weight"].t(), None, x["labels"])
    out = chunked_loss(build_loss("ce"), x["s_hidden"], x["s_weight"], None, None, x["labels"])
    torch.testing.assert_close(out, ref, atol=ATOL, rtol=RTOL)


def test_fully_masked_and_empty_batches_give_zero_and_zero_grads():
    x = make_inputs()
    masked = torch.full_like(x["labels"], -100)
    for labels, n in ((masked, N), (None, 0)):
        y = make_inputs(n=n)
        out = chunked_loss(
            LOSSES["kd+ce"] if labels is not None else LOSSES["fkl"],
            y["s_hidden"],
            y["s_weight"],
            y["t_hidden"],
            y["t_weight"],
            labels,
            chunk_size=8,
        )
        assert out.item() == 0.0
        for g in student_grads(out, y):
            assert torch.equal(g, torch.zeros_like(g))


def test_weight_parameter_accumulates_grad_and_backward_scales():
    x = make_inputs()
    out = chunked_loss(
        LOSSES["fkl"], x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"], x["labels"]
    )
    (3.0 * out).backward()
    ref, _ = plain(LOSSES["fkl"], x, x["labels"])
    g_h, g_w = student_grads(ref, x)
    torch.testing.assert_close(x["s_weight"].grad, 3.0 * g_w, atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(x["s_hidden"].grad, 3.0 * g_h, atol=ATOL, rtol=RTOL)
    out2 = chunked_loss(
        LOSSES["fkl"], x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"], x["labels"]
    )
    out2.backward()  # accumulates like any parameter
    torch.testing.assert_close(x["s_weight"].grad, 4.0 * g_w, atol=ATOL, rtol=RTOL)


class TinyLM(nn.Module):
    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Embedding(V, hidden), nn.Linear(hidden, hidden), nn.Tanh())
        self.lm_head = nn.Linear(hidden, V, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.body(ids)  # hidden states [B, T, H]


def _model_grads(model, ids, teacher_h, teacher_w, labels, use_chunked: bool):
    model.zero_grad()
    hidden = model(ids)
    inner = model.module if hasattr(model, "module") else model
    if use_chunked:
        out = chunked_loss(
            LOSSES["kd+ce"],
            hidden,
            inner.lm_head.weight,
            teacher_h,
            teacher_w,
            labels,
            chunk_size=7,
        )
    else:
        out = LOSSES["kd+ce"](inner.lm_head(hidden), teacher_h @ teacher_w.t(), labels)
    out.backward()
    return {k: p.grad.clone() for k, p in inner.named_parameters()}


def test_gradients_reach_every_model_parameter_like_the_plain_path():
    torch.manual_seed(0)
    model = TinyLM(HS)
    ids = torch.randint(0, V, (3, 8))
    labels = torch.randint(0, V, (3, 8))
    labels[:, :2] = -100
    t_h, t_w = torch.randn(3, 8, HT), torch.randn(V, HT)
    ref = _model_grads(model, ids, t_h, t_w, labels, use_chunked=False)
    got = _model_grads(model, ids, t_h, t_w, labels, use_chunked=True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL)


def _ddp_gradients_match(pg_file: str, done_file: str) -> None:
    """In a fresh process: chunked gradients through a DDP-wrapped model equal the plain ones."""
    import os

    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{pg_file}", rank=0, world_size=1)
    torch.manual_seed(0)
    model = TinyLM(HS)
    ids = torch.randint(0, V, (2, 6))
    labels = torch.randint(0, V, (2, 6))
    t_h, t_w = torch.randn(2, 6, HT), torch.randn(V, HT)
    ref = _model_grads(model, ids, t_h, t_w, labels, use_chunked=False)
    ddp = DDP(model)
    for _ in range(2):  # a second step fails if DDP missed a gradient in the first
        got = _model_grads(ddp, ids, t_h, t_w, labels, use_chunked=True)
    for k in ref:
        torch.testing.assert_close(got[k], ref[k], atol=ATOL, rtol=RTOL)
    with open(done_file, "w") as f:
        f.write("ok")
    # leave without running gloo's destructors, which can block on thread joins at teardown
    os._exit(0)


def test_ddp_wrapped_lm_head_weight(tmp_path):
    """Runs in its own process (spawned), so a stuck gloo teardown cannot hold up the suite."""
    import multiprocessing

    dist = pytest.importorskip("torch.distributed")
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    done = tmp_path / "done"
    proc = multiprocessing.get_context("spawn").Process(
        target=_ddp_gradients_match, args=(str(tmp_path / "pg"), str(done))
    )
    proc.start()
    proc.join(timeout=300)
    if proc.is_alive():
        proc.kill()
        pytest.fail("the DDP gradient check did not finish within 300 s")
    assert proc.exitcode == 0 and done.read_text() == "ok"


def test_bf16_inputs_run_and_stay_close_to_fp32():
    x32 = make_inputs(seed=5)
    x16 = make_inputs(seed=5, dtype=torch.bfloat16)
    ref, _ = chunked(LOSSES["kd+ce"], x32, x32["labels"], chunk_size=8)
    out, _ = chunked(LOSSES["kd+ce"], x16, x16["labels"], chunk_size=8)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=2e-2)
    g_h, g_w = student_grads(out, x16)
    assert g_h.dtype == g_w.dtype == torch.bfloat16
    assert torch.isfinite(g_h.float()).all() and torch.isfinite(g_w.float()).all()


def test_autocast_projects_in_the_autocast_dtype_and_keeps_param_dtypes():
    x = make_inputs(seed=6)
    ref, _ = chunked(LOSSES["fkl"], x, x["labels"], chunk_size=8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = chunked(LOSSES["fkl"], x, x["labels"], chunk_size=8)
    torch.testing.assert_close(out, ref, atol=5e-2, rtol=2e-2)
    assert out.dtype == torch.float32 and out.item() != ref.item()  # bf16 projection
    g_h, g_w = student_grads(out, x)
    assert g_h.dtype == g_w.dtype == torch.float32


def test_no_grad_call_returns_the_value():
    x = make_inputs()
    ref, _ = plain(LOSSES["rkl"], x, x["labels"])
    with torch.no_grad():
        out = chunked_loss(
            LOSSES["rkl"], x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"], x["labels"]
        )
    assert not out.requires_grad
    torch.testing.assert_close(out, ref.detach(), atol=ATOL, rtol=RTOL)


def test_clear_errors():
    x = make_inputs()
    args = (x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"], x["labels"])
    with pytest.raises(ValueError, match="vocab"):
        chunked_loss(LOSSES["fkl"], *args[:3], torch.randn(V + 1, HT), x["labels"])
    with pytest.raises(ValueError, match="needs labels"):
        chunked_loss(LOSSES["ce"], *args[:4], None)
    with pytest.raises(ValueError, match="teacher"):
        chunked_loss(LOSSES["fkl"], x["s_hidden"], x["s_weight"], None, None, x["labels"])
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_loss(LOSSES["fkl"], *args, chunk_size=0)

    with pytest.raises(ValueError, match=r"\[batch, T, H\]"):
        chunked_loss(_SequenceCoupled(), *args)


class _SequenceCoupled(KDLoss):
    name = "sequence_coupled"
    coupling = "sequence"


HAS_CXX = any(shutil.which(c) for c in ("c++", "g++", "clang++"))
COMPILE_DEVICES = [
    pytest.param(
        "cpu",
        marks=[
            pytest.mark.slow,
            pytest.mark.skipif(not HAS_CXX, reason="torch.compile on CPU needs a C++ compiler"),
        ],
    ),
    pytest.param(
        "cuda",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize("device", COMPILE_DEVICES)
@pytest.mark.parametrize("name", ["fkl", "kd+ce", "akl"])
def test_compiled_chunk_math_matches_plain(name, device):
    x = {k: v.detach().to(device).requires_grad_(v.requires_grad) for k, v in make_inputs().items()}
    assert_parity(LOSSES[name], x, x["labels"], chunk_size=16, compiled=True)
