"""Evaluation metrics: task accuracy by greedy generation, perplexity, fidelity to the teacher,
and golden (true-distribution) metrics on the `oracle` task.

All functions are pure: they put models in eval mode under `torch.inference_mode` and restore each
model's training mode afterwards. `batches` are in kdlab's batch format (`kdlab.data.collate`):
`labels` are aligned with the logits and `-100` marks positions that do not count. Sums are kept
per batch, never as full-dataset tensors.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers import PreTrainedTokenizerBase

from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.models.generation import Sampling, eval_mode, generate
from kdlab.tasks.base import Task
from kdlab.tasks.oracle import OracleTask

Batch = dict[str, Tensor]
TOP_K = 5  # size of the top-k sets compared by `fidelity`'s `topk_overlap`


def generate_answers(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    batch_size: int = 64,
    add_special_tokens: bool = True,
) -> list[str]:
    """Greedy continuations of `prompts`, decoded without special tokens.

    Prompts are batched by length and left-padded (the tokenizer is not modified); each sequence
    stops at eos (the tokenizer's or any in the model's generation config).

    Args:
        model: a causal LM with `generate`.
        tokenizer: encodes the prompts and decodes the answers.
        prompts: `N` prompt strings.
        max_new_tokens: the most tokens generated per prompt (eos included).
        batch_size: prompts per `generate` call.
        add_special_tokens: encode prompts with the tokenizer's special tokens (bos); pass `False`
            for text that already has them, such as a rendered chat template.

    Returns:
        `N` strings: the new text only, in the order of `prompts`.
    """
    encoded = [tokenizer(p, add_special_tokens=add_special_tokens)["input_ids"] for p in prompts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=0.0, batch_size=batch_size)
    new = generate(model, encoded, pad_id=pad, eos_id=tokenizer.eos_token_id, sampling=sampling)
    return [tokenizer.decode(tokens, skip_special_tokens=True) for tokens in new]


def score_answers(task: Task, examples: Sequence[dict[str, str]], answers: Sequence[str]) -> float:
    """Share of `answers` that `task.score` accepts for the matching examples."""
    _check_lengths(examples, answers)
    return sum(task.score(ex, ans) for ex, ans in zip(examples, answers, strict=True)) / len(
        examples
    )


def task_accuracy(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    task: Task,
    examples: Sequence[dict[str, str]],
    *,
    batch_size: int = 64,
) -> float:
    """Share of `examples` whose greedy answer to the prompt the task scores as correct."""
    prompts = [ex["prompt"] for ex in examples]
    answers = generate_answers(
        model, tokenizer, prompts, max_new_tokens=task.max_new_tokens, batch_size=batch_size
    )
    return score_answers(task, examples, answers)


def answer_agreement(student_answers: Sequence[str], teacher_answers: Sequence[str]) -> float:
    """Share of prompts where the student's generated answer equals the teacher's (stripped)."""
    _check_lengths(student_answers, teacher_answers)
    same = sum(
        s.strip() == t.strip() for s, t in zip(student_answers, teacher_answers, strict=True)
    )
    return same / len(student_answers)


def perplexity(
    model: nn.Module, batches: Iterable[Batch], *, vocab_size: int | None = None
) -> float:
    """`exp` of the mean negative log-likelihood of the labels over counted positions.

    Args:
        model: a causal LM.
        batches: batches with `input_ids`, `attention_mask`, `labels` `[B, T]`.
        vocab_size: keep only the first `vocab_size` logits (drops lm_head padding).
    """
    total, count = 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            logits, labels = _counted_logits(model, batch, vocab_size)  # [N, V], [N]
            total += F.cross_entropy(logits, labels, reduction="sum").item()
            count += labels.numel()
    return float(torch.tensor(total / _nonzero(count)).exp())


def fidelity(
    student: nn.Module,
    teacher: nn.Module | Sequence[Tensor],
    batches: Sequence[Batch],
    *,
    vocab_size: int | None = None,
    top_k: int = TOP_K,
) -> dict[str, float]:
    """How closely the student follows the teacher at counted positions (p teacher, q student).

    Args:
        student: a causal LM.
        teacher: a causal LM over the same tokenizer (it may live on another device or dtype),
            or its `teacher_log_probs` on these `batches`, computed once for repeated use.
        batches: batches with `input_ids`, `attention_mask`, `labels` `[B, T]`.
        vocab_size: logits kept from each model; default the smaller of the two vocabularies
            (drops lm_head padding).
        top_k: size of the top-k sets compared by `topk_overlap` (capped at the vocabulary).

    Returns:
        `top1_agreement`: share of positions where the argmaxes agree; `topk_overlap`: mean
        |top-k(p) ∩ top-k(q)| / k; `kl_teacher_student`: mean token KL(p‖q) and
        `kl_student_teacher`: mean token KL(q‖p), in nats.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if isinstance(teacher, nn.Module):
        teacher = teacher_log_probs(teacher, batches, vocab_size=vocab_size)
    if len(teacher) != len(batches):
        raise ValueError(f"got teacher log-probs for {len(teacher)} batches, not {len(batches)}")
    agree, overlap, kl, rkl, count = 0.0, 0.0, 0.0, 0.0, 0
    with eval_mode(student), torch.inference_mode():
        for batch, t_log_p in zip(batches, teacher, strict=True):
            q_logits, labels = _counted_logits(student, batch, vocab_size)  # [N, Vs]
            width = min(q_logits.shape[-1], t_log_p.shape[-1])
            log_q = _log_probs(q_logits, width)
            log_p = t_log_p.to(q_logits) if width == t_log_p.shape[-1] else None
            if log_p is None:  # a wider teacher head: renormalise over the shared entries
                log_p = t_log_p[..., :width].to(q_logits).log_softmax(-1)
            agree += (log_q.argmax(-1) == log_p.argmax(-1)).sum().item()
            overlap += _topk_overlap(log_p, log_q, min(top_k, width)).sum().item()
            kl += _kl(log_p, log_q).sum().item()
            rkl += _kl(log_q, log_p).sum().item()
            count += labels.numel()
    count = _nonzero(count)
    return {
        "top1_agreement": agree / count,
        "topk_overlap": overlap / count,
        "kl_teacher_student": kl / count,
        "kl_student_teacher": rkl / count,
    }


def teacher_log_probs(
    teacher: nn.Module, batches: Sequence[Batch], *, vocab_size: int | None = None
) -> list[Tensor]:
    """float32 log-probabilities `[N, V]` of the counted positions of each batch.

    A fixed teacher's side of `fidelity`, computed once when students are compared against it
    repeatedly (the evaluation every `eval.every` steps).
    """
    with eval_mode(teacher), torch.inference_mode():
        return [_counted_logits(teacher, batch, vocab_size)[0].log_softmax(-1) for batch in batches]


def golden_metrics(
    model: nn.Module, task: OracleTask, tokenizer: PreTrainedTokenizerBase, batches: Iterable[Batch]
) -> dict[str, float]:
    """Distance of `model` to the oracle language itself at counted positions.

    Args:
        model: a causal LM over `tokenizer` (student or teacher).
        task: the `oracle` task whose HMM generated the data.
        tokenizer: the task's tokenizer; logits are cut to `len(tokenizer)`.
        batches: batches with `input_ids`, `attention_mask`, `labels` `[B, T]`.

    Returns:
        `golden_kl`: mean token KL(p_true‖q) in nats; `golden_top1`: share of positions where the
        model's argmax is the true distribution's argmax.
    """
    agree, kl, count = 0.0, 0.0, 0
    with eval_mode(model), torch.inference_mode():
        for batch in batches:
            logits, labels = _counted_logits(model, batch, len(tokenizer))  # [N, V]
            mask = batch["labels"] != IGNORE_INDEX  # [B, T]
            p_true = task.true_next_token_probs(batch["input_ids"], tokenizer)[mask]  # [N, V]
            log_p, log_q = p_true.to(logits).log(), logits.log_softmax(-1)
            agree += (log_q.argmax(-1) == log_p.argmax(-1)).sum().item()
            kl += _kl(log_p, log_q).sum().item()
            count += labels.numel()
    count = _nonzero(count)
    return {"golden_kl": kl / count, "golden_top1": agree / count}


def golden_kl(
    model: nn.Module, task: OracleTask, tokenizer: PreTrainedTokenizerBase, batches: Iterable[Batch]
) -> float:
    """Mean token KL(p_true‖q) over counted positions, in nats (see `golden_metrics`)."""
    return golden_metrics(model, task, tokenizer, batches)["golden_kl"]


def _counted_logits(
    model: nn.Module, batch: Batch, vocab_size: int | None
) -> tuple[Tensor, Tensor]:
    """float32 logits `[N, V]` and labels `[N]` of the counted positions of `batch`."""
    device = next(model.parameters()).device
    mask = batch["labels"] != IGNORE_INDEX  # [B, T]
    attention_mask = batch.get("attention_mask")
    logits = model(
        input_ids=batch["input_ids"].to(device),
        attention_mask=None if attention_mask is None else attention_mask.to(device),
    ).logits  # [B, T, V]
    logits = logits[mask.to(device)][..., :vocab_size].float()  # [N, V]
    return logits, batch["labels"][mask].to(device)


def _log_probs(logits: Tensor, width: int) -> Tensor:
    return logits[..., :width].log_softmax(-1)


def _topk_overlap(log_p: Tensor, log_q: Tensor, k: int) -> Tensor:
    """Per-row |top-k(p) ∩ top-k(q)| / k `[N]` (ties broken by `torch.topk`)."""
    top_p = log_p.topk(k, dim=-1).indices  # [N, k]
    top_q = log_q.topk(k, dim=-1).indices  # [N, k]
    return (top_p.unsqueeze(-1) == top_q.unsqueeze(-2)).any(-1).sum(-1) / k


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """Per-row KL(p‖q) `[N]` from log-probabilities `[N, V]`; terms with p = 0 count as 0."""
    p = log_p.exp()
    return torch.where(p > 0, p * (log_p - log_q), 0.0).sum(-1)


def _check_lengths(a: Sequence[Any], b: Sequence[Any]) -> None:
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} and {len(b)} items; they must match one to one")
    if not a:
        raise ValueError("nothing to evaluate: the lists are empty")


def _nonzero(count: int) -> int:
    if count == 0:
        raise ValueError("no counted positions (all labels are -100); nothing to evaluate")
    return count
