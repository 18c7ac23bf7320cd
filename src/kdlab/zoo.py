"""Trained teachers for the built-in tasks, trained once and cached in the user's cache folder.

`preset:teacher` in a config means "the trained teacher of this config's built-in task". The
first use trains it (a plain SFT run of kdlab's own trainer, with a progress bar) into
`$KDLAB_CACHE/teachers/<task>-<recipe>-<hash>/student`; later uses load it from there.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from pathlib import Path
from typing import Any

logger = logging.getLogger("kdlab")

# Recipes: (student preset of the teacher, training steps, batch size, learning rate, examples)
TEACHER_RECIPES: dict[str, dict[str, Any]] = {
    "standard": {
        "preset": "base",
        "max_steps": 1200,
        "batch_size": 64,
        "lr": 3e-3,
        "examples": 20000,
    },
    "quick": {"preset": "base", "max_steps": 500, "batch_size": 64, "lr": 3e-3, "examples": 20000},
}


def cache_root() -> Path:
    """`$KDLAB_CACHE`, else `$XDG_CACHE_HOME/kdlab`, else `~/.cache/kdlab`."""
    if os.environ.get("KDLAB_CACHE"):
        return Path(os.environ["KDLAB_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "kdlab"


def teacher_dir(task: str, task_args: dict[str, Any], recipe: str) -> Path:
    if recipe not in TEACHER_RECIPES:
        raise ValueError(f"unknown teacher recipe {recipe!r}; valid: {', '.join(TEACHER_RECIPES)}")
    key = json.dumps([task, task_args, TEACHER_RECIPES[recipe]], sort_keys=True)
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_root() / "teachers" / f"{task}-{recipe}-{digest}"


def ensure_teacher(
    task: str, task_args: dict[str, Any] | None = None, recipe: str = "standard"
) -> Path:
    """Path of the trained teacher for a built-in task (trains and caches it on first use)."""
    from kdlab.config import from_dict
    from kdlab.pipeline import run_distill

    task_args = dict(task_args or {})
    final = teacher_dir(task, task_args, recipe)
    model_dir = final / "student"
    if (model_dir / "config.json").is_file():
        return model_dir
    r = TEACHER_RECIPES[recipe]
    work = final.with_name(final.name + ".partial")
    logger.info("training the %s teacher for task %r once (cached in %s)", recipe, task, final)
    config = from_dict(
        {
            "student": {"model": f"preset:{r['preset']}"},
            "data": {
                "dataset": f"task:{task}",
                "task_args": task_args,
                "num_examples": r["examples"],
            },
            "loss": {"name": "ce"},
            "train": {
                "max_steps": r["max_steps"],
                "batch_size": r["batch_size"],
                "lr": r["lr"],
                "warmup_steps": r["max_steps"] // 20,
                "lr_scheduler": "cosine",
                "save_every": max(r["max_steps"] // 4, 1),
                "log_every": max(r["max_steps"] // 10, 1),
            },
            "eval": {"enabled": True, "num_examples": 200},
            "output_dir": str(work),
        }
    )
    run_distill(config, resume=True)
    shutil.rmtree(final, ignore_errors=True)
    work.rename(final)
    return model_dir
