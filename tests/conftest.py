"""Shared fixtures: a private kdlab cache, tiny saved models, config helpers."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

torch.set_num_threads(2)


@pytest.fixture(autouse=True, scope="session")
def _private_cache(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Never touch the user's ~/.cache/kdlab from tests."""
    mp = pytest.MonkeyPatch()
    mp.setenv("KDLAB_CACHE", str(tmp_path_factory.mktemp("kdlab-cache")))
    mp.setenv("TOKENIZERS_PARALLELISM", "false")
    yield
    mp.undo()


def save_tiny_model(path: Path, task: str = "arith", preset: str = "tiny", seed: int = 0) -> Path:
    """A random tiny Llama + the task's tokenizer, saved like any hub model."""
    from kdlab.models.tiny import build_preset
    from kdlab.tasks import get_task

    tokenizer = get_task(task).build_tokenizer()
    model = build_preset(preset, tokenizer, seed=seed)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("teacher") / "model", seed=123)


def write_config(path: Path, teacher: Path | None, **sections: Any) -> Path:
    """A small arith run config; `sections` override whole sections."""
    raw: dict[str, Any] = {
        "teacher": {"model": str(teacher)} if teacher else None,
        "student": {"model": "preset:tiny"},
        "data": {"dataset": "task:arith", "num_examples": 64},
        "loss": {"name": "fkl"},
        "train": {"max_steps": 3, "batch_size": 8, "lr": 1e-3, "progress": False},
        "eval": {"num_examples": 16, "batch_size": 16},
        "output_dir": str(path.parent / "run"),
    }
    for key, value in sections.items():
        raw[key] = {**raw[key], **value} if isinstance(raw.get(key), dict) else value
    path.write_text(yaml.safe_dump(raw))
    return path


CONFIGS = Path(__file__).parent.parent / "configs"


def run_example_config(
    config: Path,
    teacher: Path,
    out: Path,
    max_steps: int = 2,
    extra: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run an example config through `kdlab distill` with a tiny teacher, chunked; its metrics.

    `extra` adds `--set` overrides (e.g. a regime's option that would make the run long).
    """
    import json

    from kdlab.cli import main

    overrides = {
        "teacher.model": str(teacher),
        "student.model": "preset:tiny",
        "data.num_examples": 24,
        "train.max_steps": max_steps,
        "train.batch_size": 6,
        "train.chunked": "true",
        "train.chunk_size": 16,
        "train.progress": "false",
        "eval.enabled": "false",
        "output_dir": str(out),
        **(extra or {}),
    }
    args = [item for k, v in overrides.items() for item in ("--set", f"{k}={v}")]
    assert main(["distill", str(config), *args]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
