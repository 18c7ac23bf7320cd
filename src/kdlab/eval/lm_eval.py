"""A saved model on lm-evaluation-harness tasks (`kdlab eval --lm-eval`), through lm-eval's HFLM.

lm-eval is an optional dependency (`pip install "kdlab[lm-eval]"`), imported inside the functions.
The model and tokenizer are loaded by kdlab's own loading code and handed to `HFLM` as objects,
so `kdlab eval` sees the model exactly as a run does (pad token included).
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from kdlab.config import ConfigError

INSTALL_HINT = 'pip install "kdlab[lm-eval]"'


def run_lm_eval(
    model: str,
    tasks: Sequence[str],
    *,
    include_path: str | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    device: str | None = None,
    output: str | None = None,
) -> dict[str, dict[str, float]]:
    """Evaluate a saved model (local folder or hub id) on lm-eval tasks.

    Task names are checked before the model is loaded. When every task is a plain task found in
    `include_path`, lm-eval's built-in task index (about 15k YAML files, seconds to build) is not
    read; groups, tags and built-in tasks need it.

    Args:
        model: folder written by `save_pretrained`, or a hub id.
        tasks: lm-eval task, group or tag names, e.g. `["hellaswag", "arc_easy"]`.
        include_path: folder of extra task YAMLs (lm-eval's `--include_path`).
        num_fewshot: few-shot examples per prompt; `None` keeps each task's default.
        limit: at most this many examples per task (for quick checks; scores are then partial).
        batch_size: requests per forward pass.
        device: `cuda`, `cpu`, ...; default CUDA when available, else CPU.
        output: JSON file the returned metrics are written to.

    Returns:
        `{task: {metric: value}}` with plain floats, groups included. lm-eval's `"acc,none"` keys
        are normalised: the default filter `none` is dropped (`acc`, `acc_stderr`), any other is
        kept after a slash (`exact_match/strict-match`); non-numeric entries (`"N/A"` stderrs,
        aliases) are left out.
    """
    lm_eval = _import_lm_eval()
    manager = _task_manager(tasks, include_path)
    from lm_eval.models.huggingface import HFLM

    from kdlab.config import ModelSpec
    from kdlab.models.loading import load_model, load_tokenizer

    spec = ModelSpec(model=model)
    tokenizer = load_tokenizer(spec)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    student = load_model(spec, role="model").to(device)
    lm = HFLM(pretrained=student, tokenizer=tokenizer, batch_size=batch_size)
    results = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    metrics = {task: _numeric(values) for task, values in results["results"].items()}
    if output is not None:
        Path(output).write_text(json.dumps(metrics, indent=2))
    return metrics


def _import_lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError as err:
        raise ConfigError(
            f"lm-evaluation-harness is not installed ({err}); install it with: {INSTALL_HINT}"
        ) from err
    return lm_eval


def _task_manager(tasks: Sequence[str], include_path: str | None) -> Any:
    """An lm-eval `TaskManager` that knows every name in `tasks`; a clear error otherwise."""
    from lm_eval.tasks import TaskManager

    if not tasks:
        raise ConfigError("no lm-eval task given (e.g. --lm-eval hellaswag,arc_easy)")
    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"lm-eval include path {include_path!r} is not a folder")
        local = TaskManager(include_path=include_path, include_defaults=False)
        if set(tasks) <= set(local.all_subtasks):
            return local
    manager = TaskManager(include_path=include_path)
    unknown = [name for name in tasks if name not in manager.all_tasks]
    if unknown:
        raise ConfigError(_unknown_message(unknown, manager.all_tasks, include_path))
    return manager


def _unknown_message(unknown: list[str], known: list[str], include_path: str | None) -> str:
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3)
        hints.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    where = f"lm-eval's tasks or {include_path}" if include_path else "lm-eval's tasks"
    return (
        f"unknown lm-eval task {'; '.join(hints)}: not among {where}. `lm-eval ls tasks` lists "
        "the built-in ones; put your own task YAMLs in a folder and pass it as --lm-eval-include "
        "(a YAML that does not parse is skipped by lm-eval, so its task is unknown too)"
    )


def _numeric(values: dict[str, Any]) -> dict[str, float]:
    """lm-eval's `{"acc,none": 0.5, "alias": ...}` -> `{"acc": 0.5}` (see `run_lm_eval`)."""
    out = {}
    for key, value in values.items():
        metric, sep, filter_name = key.partition(",")
        if not sep or isinstance(value, bool) or not isinstance(value, int | float):
            continue
        out[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
    return out
