"""Evaluation: accuracy, perplexity, fidelity to the teacher and golden metrics."""

from kdlab.eval.metrics import (
    answer_agreement,
    eval_mode,
    fidelity,
    generate_answers,
    golden_kl,
    golden_metrics,
    perplexity,
    score_answers,
    task_accuracy,
)

__all__ = [
    "answer_agreement",
    "eval_mode",
    "fidelity",
    "generate_answers",
    "golden_kl",
    "golden_metrics",
    "perplexity",
    "score_answers",
    "task_accuracy",
]
