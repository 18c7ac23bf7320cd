"""`kdlab demo --quick` end to end (trains the quick teacher into the test cache)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from kdlab.cli import main


@pytest.mark.slow
def test_quick_demo(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    out = tmp_path / "demo"
    assert main(["demo", "--quick", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "teacher" in printed and "ce (SFT only)" in printed
    results = json.loads((out / "results.json").read_text())
    assert set(results["students"]) == {"ce", "fkl", "rkl", "fkl@cache"}
    cached = results["students"]["fkl@cache"][0]
    assert 0 <= cached["top1_agreement"] <= 1  # fidelity measured against the teacher model
    assert json.loads((out / "teacher-cache" / "meta.json").read_text())["k"] == 8
    report = (out / "report.md").read_text()
    assert "accuracy_vs_fidelity.png" in report and "learning_curves.png" in report
    assert (out / "accuracy_vs_fidelity.png").stat().st_size > 1000
    assert (out / "learning_curves.png").stat().st_size > 1000
    # the teacher is clearly ahead of the SFT-only student: the point of the demo
    sft = results["students"]["ce"][0]["accuracy"]
    assert results["teacher"]["accuracy"] > sft + 0.1


def test_every_full_demo_method_is_a_valid_config(tmp_path: Path) -> None:
    from kdlab.demo import FULL, parse_method, student_config

    assert "warmup_distill+fkl" in FULL.methods and "on_policy+jsd" in FULL.methods
    for method in FULL.methods:
        config = student_config(FULL, method, 0, tmp_path, "some/teacher")
        regime, loss = parse_method(method)
        assert (config.regime.name, config.loss.name) == (regime, loss)
        assert config.output_dir.endswith(f"{method}-seed0")
        cached = method.endswith("@cache")
        assert (config.teacher.cache is not None) == cached
        assert (config.teacher.model is None) == cached
