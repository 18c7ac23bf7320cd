"""Accuracy and fidelity side by side, for a run or for saved models (`kdlab eval`)."""

from __future__ import annotations

from collections.abc import Sequence
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
