"""Every example config in configs/regimes/ runs end to end (tiny models, 2 steps, chunked)."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from conftest import run_example_config
from kdlab.regimes import REGIMES

REGIME_CONFIGS = sorted((Path(__file__).parents[1] / "configs" / "regimes").glob("*.yaml"))

# options that would make a smoke run long: a shorter warm-up stage, a shorter generation
FAST = {
    "warmup_distill": {"regime.warm_steps": 2},
}


def test_every_regime_has_an_example_config_and_a_page() -> None:
    names = {p.stem for p in REGIME_CONFIGS}
    assert set(REGIMES.names()) <= names, set(REGIMES.names()) - names
    docs = Path(__file__).parents[1] / "docs" / "regimes"
    missing = [n for n in REGIMES.names() if not (docs / f"{n}.md").is_file()]
    assert not missing, f"no docs/regimes/<name>.md for {missing}"


@pytest.mark.parametrize("path", REGIME_CONFIGS, ids=lambda p: p.stem)
def test_example_config_runs(path: Path, tiny_teacher: Path, tmp_path: Path) -> None:
    name = yaml.safe_load(path.read_text())["regime"]["name"]
    assert name == path.stem, "an example config is named after its regime"
    extra = {"regime.generation.max_new_tokens": 6, **FAST.get(name, {})}
    records = run_example_config(path, tiny_teacher, tmp_path / "run", extra=extra)
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] == r["loss"] for r in records)  # finite, not NaN
    assert (tmp_path / "run" / "student" / "config.json").is_file()
