"""Every example config in configs/losses/ validates, and runs end to end with a few steps.

The runs swap the built-in teacher preset (trained once, minutes) for a tiny saved teacher and
use the trainer's chunked path, so each loss goes through the same code a real run uses.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from conftest import run_example_config
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
    records = run_example_config(path, tiny_teacher, tmp_path / name)
    assert [r["step"] for r in records] == [1, 2]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in records)
    assert (tmp_path / name / "student" / "config.json").is_file()
