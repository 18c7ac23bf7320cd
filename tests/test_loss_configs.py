"""Every example config in configs/losses/ validates, and runs end to end with a few steps.

The runs swap the built-in teacher preset (trained once, minutes) for a tiny saved teacher and
use the trainer's chunked path, so each loss goes through the same code a real run uses.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdlab.cli import main
from kdlab.config import load_config
from kdlab.losses import available_losses

CONFIGS = Path(__file__).parent.parent / "configs" / "losses"
NAMES = sorted(p.stem for p in CONFIGS.glob("*.yaml"))


def test_every_registered_loss_has_an_example_config() -> None:
    assert set(available_losses()) <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_example_config_runs(name: str, tmp_path: Path, tiny_teacher: Path) -> None:
    path = CONFIGS / f"{name}.yaml"
    config = load_config(path)
    assert config.loss.name == name
    assert config.output_dir == f"runs/{name}"
    run = tmp_path / name
    overrides = {
        "teacher.model": str(tiny_teacher),
        "student.model": "preset:tiny",
        "data.num_examples": 24,
        "train.max_steps": 2,
        "train.batch_size": 6,
        "train.chunked": "true",
        "train.chunk_size": 16,
        "train.progress": "false",
        "eval.enabled": "false",
        "output_dir": str(run),
    }
    args = [item for k, v in overrides.items() for item in ("--set", f"{k}={v}")]
    assert main(["distill", str(path), *args]) == 0
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert (run / "student" / "config.json").is_file()
