"""Accuracy and fidelity side by side, for a run or for saved models (`kdlab eval`)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.data.collate import Encoded, collate
from kdlab.eval import metrics


def _batches(encoded: Sequence[Encoded], pad_id: int, batch_size: int) -> list[dict]:
    return [
        collate(encoded[i : i + batch_size], pad_id) for i in range(0, len(encoded), batch_size)
    ]


def evaluate_models(
    *,
    student: PreTrainedModel,
    teacher: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    task: str | None,
    task_args: dict[str, Any] | None,
    records: Sequence[dict[str, Any]],
    encoded: Sequence[Encoded],
    batch_size: int = 64,
    with_teacher: bool = False,
) -> dict[str, float]:
    """Generalization (accuracy, perplexity, golden KL) and fidelity (agreement, KL to teacher).

    Keys: `accuracy` (built-in tasks), `perplexity`, `golden_kl` (oracle), `top1_agreement`,
    `kl_teacher_student` and `answer_agreement` (with a teacher), and `teacher/<metric>` for the
    teacher's own accuracy, perplexity and golden KL when `with_teacher`.
    """
    batches = _batches(encoded, tokenizer.pad_token_id, batch_size)
    task_obj = None
    if task is not None:
        from kdlab.tasks import get_task

        task_obj = get_task(task, **(task_args or {}))
    out = _model_metrics(student, tokenizer, task_obj, records, batches, batch_size)
    if teacher is None:
        return out
    out.update(metrics.fidelity(student, teacher, batches))
    if task_obj is not None:
        prompts = [r["prompt"] for r in records]
        n = task_obj.max_new_tokens
        s = metrics.generate_answers(
            student, tokenizer, prompts, max_new_tokens=n, batch_size=batch_size
        )
        t = metrics.generate_answers(
            teacher, tokenizer, prompts, max_new_tokens=n, batch_size=batch_size
        )
        out["answer_agreement"] = metrics.answer_agreement(s, t)
    if with_teacher:
        t_metrics = _model_metrics(teacher, tokenizer, task_obj, records, batches, batch_size)
        out.update({f"teacher/{k}": v for k, v in t_metrics.items()})
    return out


def _model_metrics(model, tokenizer, task, records, batches, batch_size) -> dict[str, float]:  # noqa: ANN001
    out: dict[str, float] = {}
    if task is not None and records and "prompt" in records[0]:
        out["accuracy"] = metrics.task_accuracy(
            model, tokenizer, task, list(records), batch_size=batch_size
        )
    out["perplexity"] = metrics.perplexity(model, batches)
    if hasattr(task, "true_next_token_probs"):
        out.update(metrics.golden_metrics(model, task, tokenizer, batches))
    return out


def curve_evaluator(
    *,
    teacher: PreTrainedModel | None,
    tokenizer: PreTrainedTokenizerBase,
    task: str | None,
    task_args: dict[str, Any] | None,
    eval_encoded: Sequence[Encoded],
    train_encoded: Sequence[Encoded],
    num_examples: int,
    batch_size: int,
) -> Callable[[PreTrainedModel], dict[str, float]]:
    """The cheap evaluation run every `eval.every` steps (no generation), for curves.

    On the first `num_examples` held-out examples: `perplexity`, and with a teacher model the
    proxy distance `kl_teacher_student` (with `kl_student_teacher`, `top1_agreement`), and on
    `oracle` the golden distance `golden_kl`; on the first `num_examples` training examples,
    `train/kl_teacher_student` (the proxy where the optimiser sees it).
    """
    pad = tokenizer.pad_token_id
    held_out = _batches(eval_encoded[:num_examples], pad, batch_size)
    seen: list[dict] = []
    # the teacher is fixed: its side of every comparison is computed once
    t_held_out = t_seen = None
    if teacher is not None:
        seen = _batches(train_encoded[:num_examples], pad, batch_size)
        t_held_out = metrics.teacher_log_probs(teacher, held_out)
        t_seen = metrics.teacher_log_probs(teacher, seen)
    oracle = None
    if task is not None:
        from kdlab.tasks import get_task

        task_obj = get_task(task, **(task_args or {}))
        oracle = task_obj if hasattr(task_obj, "true_next_token_probs") else None

    def evaluate(student: PreTrainedModel) -> dict[str, float]:
        out = {"perplexity": metrics.perplexity(student, held_out)}
        if oracle is not None:
            out["golden_kl"] = metrics.golden_metrics(student, oracle, tokenizer, held_out)[
                "golden_kl"
            ]
        if t_held_out is not None:
            fid = metrics.fidelity(student, t_held_out, held_out)
            out.update({k: fid[k] for k in ("kl_teacher_student", "kl_student_teacher")})
            out["top1_agreement"] = fid["top1_agreement"]
            train_fid = metrics.fidelity(student, t_seen, seen)
            out["train/kl_teacher_student"] = train_fid["kl_teacher_student"]
        return out

    return evaluate


def evaluate_saved(
    *,
    model: str,
    teacher: str | None,
    task: str,
    num_examples: int = 200,
    batch_size: int = 64,
    seed: int = 1235,
    task_args: dict[str, Any] | None = None,
) -> dict[str, float]:
    """`kdlab eval`: load saved models (path or hub id) and evaluate them on a built-in task."""
    from kdlab.config import ConfigError, DataSpec, ModelSpec
    from kdlab.data.datasets import encode_dataset
    from kdlab.models.loading import check_vocabularies, load_model, load_tokenizer
    from kdlab.tasks import get_task

    try:  # an unknown task is reported before any model is loaded
        task_obj = get_task(task, **(task_args or {}))
    except ValueError as err:
        raise ConfigError(f"--task: {err}") from err
    spec = ModelSpec(model=model)
    tokenizer = load_tokenizer(spec)
    student = load_model(spec, role="model")
    teacher_model = None
    if teacher is not None:
        t_spec = ModelSpec(model=teacher)
        teacher_model = load_model(t_spec, role="teacher")
        check_vocabularies(teacher_model, load_tokenizer(t_spec), student, tokenizer)
    records = task_obj.make_examples(num_examples, seed=seed, split="test")
    data_spec = DataSpec(dataset=f"task:{task}", max_length=1 << 20)
    encoded = encode_dataset(tokenizer, records, data_spec)
    with torch.no_grad():
        return evaluate_models(
            student=student,
            teacher=teacher_model,
            tokenizer=tokenizer,
            task=task,
            task_args=task_args,
            records=records,
            encoded=encoded,
            batch_size=batch_size,
            with_teacher=teacher is not None,
        )
