"""Any registered loss from hidden states and lm_head weights, over token chunks.

The plain path materialises `[N, V]` logits of both models (and several float32 copies of them
inside the loss) for all N positions at once; at V = 128k that is gigabytes per thousand tokens.
`chunked_loss` projects `chunk_size` positions at a time, runs the loss's own per-position math on
that chunk, and computes the chunk's gradient with respect to the student's hidden states, weight
and bias right away (in the forward), so at most one chunk of logits is alive at any time. The
backward only scales the stored gradients by the incoming gradient. This is the pattern of
Liger-Kernel's `chunked_loss/fused_linear_distillation.py`, written for kdlab's `KDLoss` API.

Losses that couple positions (`KDLoss.coupling`) stay exact: `"sequence"` losses get chunks of
whole sequences (the hidden states keep their `[..., T, H]` shape), `"group"` losses get the
counted positions only, in chunks of whole groups, and `"batch"` losses get a first pass over the
teacher's chunks that collects their batch statistics before the loss is computed. A loss with
learnable parameters (e.g. `dac_kl`'s sub-network) gets their gradients too.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch
from torch import Tensor

from kdlab.losses.base import KDLoss
from kdlab.losses.reduce import counted_mask, normaliser

# torch.mm / torch.addmm with `out_dtype` (bf16/fp16 inputs, fp32 output) exist on CUDA only.
_HAS_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def chunked_loss(
    loss_fn: KDLoss,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor | None,
    *,
    student_bias: Tensor | None = None,
    teacher_bias: Tensor | None = None,
    chunk_size: int = 1024,
    num_items_in_batch: int | Tensor | None = None,
    return_terms: bool = False,
    compiled: bool | None = None,
) -> Tensor | tuple[Tensor, dict[str, Tensor]]:
    """`loss_fn(student_hidden @ Ws.T, teacher_hidden @ Wt.T, labels)` without full logits.

    Value and gradients equal the plain call (same masking and normalisation: the sum over counted
    positions divided by `num_items_in_batch`, or by the count of counted positions clamped to
    >= 1). Only the student gets gradients: its hidden states, weight and bias, through an
    `autograd.Function` that takes them as inputs, so a `Parameter` (also a DDP-wrapped model's
    `lm_head.weight`) accumulates `.grad` the ordinary way. Teacher tensors are never
    differentiated. The loss math runs in float32 on each chunk; bf16/fp16 inputs are projected
    with float32 output where the device supports it (CUDA), else upcast after the projection.

    Args:
        loss_fn: any position-wise `KDLoss` (a registered loss or a `WeightedSum`).
        student_hidden: `[N, Hs]` (or `[..., Hs]`, flattened) final hidden states of the student.
        student_weight: `[V, Hs]` the student's lm_head weight.
        teacher_hidden: `[N, Ht]` (or `[..., Ht]`) of the teacher; `None` for losses that do not
            use the teacher (e.g. `ce`).
        teacher_weight: `[V, Ht]` the teacher's lm_head weight; `None` with `teacher_hidden`.
        labels: `[N]` (or `[...]`) int64 targets, `-100` = not counted; `None`: all positions count.
        student_bias: optional `[V]` bias of the student's lm_head.
        teacher_bias: optional `[V]` bias of the teacher's lm_head.
        chunk_size: positions per chunk; memory is O(chunk_size · V) plus one float32 copy of the
            student weight's gradient.
        num_items_in_batch: counted positions in the whole optimiser step (gradient accumulation);
            see `reduce_positions`.
        return_terms: also return each named term's reduced value (detached), as
            `KDLoss.forward_terms` does.
        compiled: run each chunk's loss math and its gradient through `torch.compile`, which
            fuses the dozen elementwise passes of the eager math into a few kernels (faster and
            leaner; the first call compiles, for tens of seconds). `None`: on for CUDA tensors
            when Triton is installed, off elsewhere.

    Returns:
        The scalar loss, or `(loss, {term: value})` with `return_terms=True`.
    """
    s_hidden, t_hidden, flat_labels, seq_len = _check_and_flatten(
        loss_fn, student_hidden, student_weight, teacher_hidden, teacher_weight, labels, chunk_size
    )
    mask = counted_mask(flat_labels, s_hidden.shape[:1], s_hidden.device)  # [N]
    denom = normaliser(mask, num_items_in_batch, dtype=torch.float32)
    if loss_fn.coupling == "group":  # only counted positions, in whole groups
        keep = mask
        s_hidden, mask = s_hidden[keep], mask[keep]
        t_hidden = None if t_hidden is None else t_hidden[keep.to(t_hidden.device)]
        flat_labels = None if flat_labels is None else flat_labels[keep]
        chunk_size = max(1, chunk_size // loss_fn.group_size) * loss_fn.group_size
    elif seq_len is not None:  # whole sequences
        chunk_size = max(1, chunk_size // seq_len) * seq_len
    names = list(loss_fn.term_weights())
    params = [p for p in loss_fn.parameters() if p.requires_grad]
    total, *values = _ChunkedLossFunction.apply(
        _Options(
            loss_fn,
            names,
            chunk_size,
            seq_len,
            len(params),
            _use_compile(compiled, s_hidden, params),
        ),
        s_hidden,
        student_weight,
        student_bias,
        t_hidden,
        teacher_weight,
        teacher_bias,
        flat_labels,
        mask,
        denom,
        *params,
    )
    if not return_terms:
        return total
    return total, dict(zip(names, values, strict=True))


class _Options(NamedTuple):
    loss_fn: KDLoss
    names: list[str]
    chunk_size: int
    seq_len: int | None  # chunks are whole sequences of this length ("sequence" coupling)
    num_params: int  # learnable parameters of the loss, appended to the Function's inputs
    compiled: bool


def _use_compile(compiled: bool | None, hidden: Tensor, params: list[Tensor]) -> bool:
    if params:  # parameter gradients are taken with plain autograd, eagerly
        return False
    return _auto_compile(hidden.device) if compiled is None else compiled


def _check_and_flatten(
    loss_fn: KDLoss,
    student_hidden: Tensor,
    student_weight: Tensor,
    teacher_hidden: Tensor | None,
    teacher_weight: Tensor | None,
    labels: Tensor | None,
    chunk_size: int,
) -> tuple[Tensor, Tensor | None, Tensor | None, int | None]:
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    loss_fn.check_inputs(teacher_hidden, labels)
    if (teacher_hidden is None) != (teacher_weight is None):
        raise ValueError("pass teacher_hidden and teacher_weight together (or neither)")
    vocab, h_s = student_weight.shape
    seq_len = None
    if loss_fn.coupling == "sequence":
        if student_hidden.dim() < 3:
            raise ValueError(
                f"loss {loss_fn.name!r} couples the positions of a sequence: pass hidden states "
                f"[batch, T, H] (and labels [batch, T]), got shape {tuple(student_hidden.shape)}"
            )
        seq_len = student_hidden.shape[-2]
    if student_hidden.shape[-1] != h_s:
        raise ValueError(
            f"student hidden size {student_hidden.shape[-1]} != student lm_head input size {h_s}"
        )
    s_hidden = student_hidden.reshape(-1, h_s)  # [N, Hs]
    t_hidden = None
    if teacher_hidden is not None and teacher_weight is not None:
        if teacher_weight.shape[0] != vocab:
            raise ValueError(
                f"teacher vocab {teacher_weight.shape[0]} != student vocab {vocab}; the two "
                "models must share a tokenizer (pad the smaller lm_head of the same tokenizer)"
            )
        t_hidden = teacher_hidden.reshape(-1, teacher_weight.shape[1])  # [N, Ht]
        if t_hidden.shape[0] != s_hidden.shape[0]:
            raise ValueError(
                f"teacher has {t_hidden.shape[0]} positions, student {s_hidden.shape[0]}"
            )
    flat_labels = None if labels is None else labels.reshape(-1)
    if flat_labels is not None and flat_labels.shape[0] != s_hidden.shape[0]:
        raise ValueError(
            f"labels have {flat_labels.shape[0]} positions, hidden states {s_hidden.shape[0]}"
        )
    return s_hidden, t_hidden, flat_labels, seq_len


def _compute_dtype(hidden: Tensor, weight: Tensor) -> torch.dtype:
    """The projection's dtype: autocast's when it is on (as the lm_head would run), else both's."""
    device_type = hidden.device.type
    try:
        if torch.is_autocast_enabled(device_type):
            return torch.get_autocast_dtype(device_type)
    except (TypeError, AttributeError):  # torch < 2.4: no per-device autocast query
        pass
    return torch.promote_types(hidden.dtype, weight.dtype)


def _project(hidden: Tensor, weight: Tensor, bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """`hidden @ weight.T + bias` computed in `dtype`, returned as float32 `[n, V]` logits."""
    hidden, weight = hidden.to(dtype), weight.to(dtype)
    if dtype == torch.float32:
        logits = hidden @ weight.t()
    elif hidden.is_cuda and _HAS_OUT_DTYPE:
        logits = torch.mm(hidden, weight.t(), out_dtype=torch.float32)
    else:
        logits = (hidden @ weight.t()).float()
    if bias is not None:
        logits += bias.float()
    return logits


def _addmm_fp32(acc: Tensor, a: Tensor, b: Tensor) -> None:
    """`acc += a @ b` into a float32 `acc`, without rounding `a @ b` to the inputs' dtype."""
    if a.dtype == torch.float32:
        acc.addmm_(a, b)
    elif a.is_cuda and _HAS_OUT_DTYPE:
        torch.addmm(acc, a, b, out_dtype=torch.float32, out=acc)
    else:
        acc.addmm_(a.float(), b.float())


class _ChunkedLossFunction(torch.autograd.Function):
    """Forward: loop over chunks, computing loss terms and student gradients. Backward: scale."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        opts: _Options,
        s_hidden: Tensor,  # [N, Hs]
        s_weight: Tensor,  # [V, Hs]
        s_bias: Tensor | None,  # [V]
        t_hidden: Tensor | None,  # [N, Ht]
        t_weight: Tensor | None,  # [V, Ht]
        t_bias: Tensor | None,  # [V]
        labels: Tensor | None,  # [N]
        mask: Tensor,  # [N] bool
        denom: Tensor,  # scalar float32
        *params: Tensor,  # the loss's learnable parameters
    ) -> tuple[Tensor, ...]:
        student = (s_hidden, s_weight, s_bias)
        teacher = None if t_hidden is None else (t_hidden, t_weight, t_bias)
        # read autocast's dtype first, then turn autocast off: the casts below are explicit
        dtypes = (_compute_dtype(s_hidden, s_weight), _teacher_dtype(teacher))
        needs_grad = ctx.needs_input_grad[1:4]
        with torch.autocast(s_hidden.device.type, enabled=False):
            summary = _batch_summary(opts, teacher, labels, mask, dtypes[1], s_hidden.device)
            sums, grads = _run_chunks(
                opts, student, teacher, labels, mask, denom, summary, params, needs_grad, dtypes
            )
        ctx.save_for_backward(*grads)
        ctx.num_params = len(params)
        weights = opts.loss_fn.term_weights()
        values = [sums[i] / denom for i in range(len(opts.names))]
        total = torch.zeros((), dtype=torch.float32, device=s_hidden.device)
        for name, value in zip(opts.names, values, strict=True):
            total = total + weights[name] * value
        ctx.mark_non_differentiable(*values)
        return (total, *values)

    @staticmethod
    def backward(ctx: Any, grad_total: Tensor, *_: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        scale = grad_total.float()
        grads = [None if g is None else (g * scale).to(g.dtype) for g in ctx.saved_tensors]
        student, params = grads[:3], grads[3:]
        return (None, *student, *(None,) * 6, *params)


def _teacher_dtype(teacher: tuple[Tensor, Tensor, Tensor | None] | None) -> torch.dtype | None:
    return None if teacher is None else _compute_dtype(teacher[0], teacher[1])


def _chunks(opts: _Options, n: int) -> list[slice]:
    return [slice(start, start + opts.chunk_size) for start in range(0, n, opts.chunk_size)]


def _shaped(opts: _Options, logits: Tensor, labels: Tensor | None) -> tuple[Tensor, Tensor | None]:
    """Chunk rows as the loss expects them: `[b, T, V]` for a `"sequence"` loss, else `[n, V]`."""
    if opts.seq_len is None:
        return logits, labels
    t = opts.seq_len
    return logits.view(-1, t, logits.shape[-1]), None if labels is None else labels.view(-1, t)


def _batch_summary(
    opts: _Options,
    teacher: tuple[Tensor, Tensor, Tensor | None] | None,
    labels: Tensor | None,
    mask: Tensor,
    t_dtype: torch.dtype | None,
    device: torch.device,
) -> dict[str, Tensor] | None:
    """Pass 1 of a `"batch"` loss: its statistics over every counted position, summarised."""
    if opts.loss_fn.coupling != "batch":
        return None
    parts: dict[str, list[Tensor]] = {}
    t_hidden, t_weight, t_bias = teacher if teacher is not None else (None, None, None)
    n = mask.shape[0]
    for sl in _chunks(opts, n):
        t_logits = None
        if t_hidden is not None:
            t_logits = _project(t_hidden[sl], t_weight, t_bias, t_dtype).to(device)
        chunk_labels = None if labels is None else labels[sl]
        for k, v in opts.loss_fn.batch_statistics(t_logits, chunk_labels).items():
            parts.setdefault(k, []).append(v.reshape(-1)[mask[sl]])
    return opts.loss_fn.summarise({k: torch.cat(v) for k, v in parts.items()})


def _run_chunks(
    opts: _Options,
    student: tuple[Tensor, Tensor, Tensor | None],
    teacher: tuple[Tensor, Tensor, Tensor | None] | None,
    labels: Tensor | None,
    mask: Tensor,
    denom: Tensor,
    summary: dict[str, Tensor] | None,
    params: tuple[Tensor, ...],
    needs_grad: tuple[bool, bool, bool],
    dtypes: tuple[torch.dtype, torch.dtype | None],
) -> tuple[Tensor, tuple[Tensor | None, ...]]:
    """The chunk loop: per-term masked sums `[terms]` and the gradients (unscaled).

    Gradients are of `Σ_k w_k · sum_k / denom`: the student's hidden states, weight and bias,
    then the loss's parameters; the weight's, bias's and parameters' accumulate in float32.
    """
    s_hidden, s_weight, s_bias = student
    dtype, t_dtype = dtypes
    device = s_hidden.device
    need_h, need_w, need_b = needs_grad
    need_any = need_h or need_w or need_b or bool(params)
    grad_h = torch.empty(s_hidden.shape, dtype=dtype, device=device) if need_h else None
    grad_w = torch.zeros(s_weight.shape, dtype=torch.float32, device=device) if need_w else None
    grad_b = torch.zeros(s_weight.shape[0], dtype=torch.float32, device=device) if need_b else None
    grad_p = [torch.zeros_like(p, dtype=torch.float32) for p in params]
    w_compute = s_weight.to(dtype)  # no copy unless hidden and weight dtypes differ
    step = _chunk_step(opts.compiled) if not params else _value_and_grad_autograd
    sums = torch.zeros(len(opts.names), dtype=torch.float32, device=device)
    for sl in _chunks(opts, s_hidden.shape[0]):
        h = s_hidden[sl].to(dtype)  # [n, Hs]
        t_logits = None
        if teacher is not None:
            t_hidden, t_weight, t_bias = teacher
            t_logits = _project(t_hidden[sl], t_weight, t_bias, t_dtype).to(device)  # [n, V]
        s_logits = _project(h, w_compute, s_bias, dtype)  # [n, V] float32
        chunk_labels = None if labels is None else labels[sl]
        chunk = _Chunk(s_logits, t_logits, chunk_labels, mask[sl], denom, summary)
        chunk_sums, grad_logits, chunk_grad_p = step(opts, chunk, dtype, need_any, params)
        sums += chunk_sums
        del t_logits, s_logits, chunk
        for acc, g in zip(grad_p, chunk_grad_p, strict=True):
            acc += g
        if grad_h is not None:
            torch.mm(grad_logits, w_compute, out=grad_h[sl])
        if grad_w is not None:
            _addmm_fp32(grad_w, grad_logits.t(), h)
        if grad_b is not None:
            grad_b += grad_logits.sum(0, dtype=torch.float32)
        del grad_logits
    grads = (
        None if grad_h is None else grad_h.to(s_hidden.dtype),
        None if grad_w is None else grad_w.to(s_weight.dtype),
        None if grad_b is None or s_bias is None else grad_b.to(s_bias.dtype),
        *(g.to(p.dtype) for g, p in zip(grad_p, params, strict=True)),
    )
    return sums, grads


class _Chunk(NamedTuple):
    s_logits: Tensor  # [n, V] float32
    t_logits: Tensor | None  # [n, V] float32
    labels: Tensor | None  # [n]
    mask: Tensor  # [n] bool
    denom: Tensor  # scalar
    summary: dict[str, Tensor] | None


def _total_and_sums(opts: _Options, chunk: _Chunk, s_logits: Tensor) -> tuple[Tensor, Tensor]:
    """`Σ_k w_k sum_k / denom` and the masked per-term sums `[terms]` of one chunk."""
    weights = opts.loss_fn.term_weights()
    logits, labels = _shaped(opts, s_logits, chunk.labels)
    t_logits = None if chunk.t_logits is None else _shaped(opts, chunk.t_logits, None)[0]
    terms = opts.loss_fn.per_position_terms(logits, t_logits, labels, summary=chunk.summary)
    sums = torch.stack(
        [torch.where(chunk.mask, terms[k].reshape(-1).float(), 0.0).sum() for k in opts.names]
    )
    total = sum(weights[k] * sums[i] for i, k in enumerate(opts.names)) / chunk.denom
    return total, sums


def _value_and_grad(
    opts: _Options, chunk: _Chunk, grad_dtype: torch.dtype, need_grad: bool, params: tuple = ()
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """One chunk: masked per-term sums `[terms]` and `d(Σ_k w_k sum_k / denom) / d s_logits`."""
    if not need_grad:
        return _total_and_sums(opts, chunk, chunk.s_logits)[1], None, []
    grad, (_, sums) = torch.func.grad_and_value(
        lambda z: _total_and_sums(opts, chunk, z), has_aux=True
    )(chunk.s_logits)
    return sums.detach(), grad.to(grad_dtype), []


def _value_and_grad_autograd(
    opts: _Options, chunk: _Chunk, grad_dtype: torch.dtype, need_grad: bool, params: tuple
) -> tuple[Tensor, Tensor | None, list[Tensor]]:
    """`_value_and_grad` that also differentiates the loss's own parameters (plain autograd)."""
    with torch.enable_grad():
        s_logits = chunk.s_logits.detach().requires_grad_()
        total, sums = _total_and_sums(opts, chunk, s_logits)
        grads = torch.autograd.grad(total, [s_logits, *params], allow_unused=True)
    grad_p = [
        torch.zeros_like(p) if g is None else g for g, p in zip(grads[1:], params, strict=True)
    ]
    return sums.detach(), grads[0].to(grad_dtype), grad_p


_compiled_value_and_grad: Any = None


def _chunk_step(compiled: bool) -> Any:
    """`_value_and_grad`, through `torch.compile` when asked (one fused kernel set per loss)."""
    global _compiled_value_and_grad
    if not compiled:
        return _value_and_grad
    if _compiled_value_and_grad is None:
        _compiled_value_and_grad = torch.compile(_value_and_grad)
    return _compiled_value_and_grad


def _auto_compile(device: torch.device) -> bool:
    """Compile the per-chunk math by default on CUDA when Triton is there; eager elsewhere."""
    if device.type != "cuda":
        return False
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True
