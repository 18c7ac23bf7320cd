"""`kdlab compare`: aggregation over seeds, grid expansion, resume, reports."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from kdlab.config import ConfigError
from kdlab.eval.aggregate import ranks, summarise, t_quantile_975


def test_summary_against_hand_computed_values() -> None:
    s = summarise([1.0, 2.0, 3.0, 4.0])
    # mean 2.5; s² = (2.25 + 0.25 + 0.25 + 2.25) / 3 = 5/3; t(0.975, 3) = 3.182 (t table)
    assert s.mean == 2.5 and s.n == 4
    assert s.std == pytest.approx(math.sqrt(5 / 3))
    assert s.ci95 == pytest.approx(3.182 * math.sqrt(5 / 3) / 2)
    two = summarise([0.1, 0.3, float("nan")])  # NaN left out: n = 2, t(0.975, 1) = 12.706
    assert two.n == 2 and two.std == pytest.approx(math.sqrt(0.02))
    assert two.ci95 == pytest.approx(12.706 * math.sqrt(0.02) / math.sqrt(2))
    one = summarise([0.7])
    assert (one.mean, one.std, one.n) == (0.7, 0.0, 1) and math.isnan(one.ci95)
    assert summarise([]).n == 0 and summarise([]).format() == "–"


def test_t_quantiles_beyond_the_table_follow_the_expansion() -> None:
    assert t_quantile_975(30) == 2.042
    # t(0.975, 40) = 2.021 and t(0.975, 120) = 1.980 (t table)
    assert t_quantile_975(40) == pytest.approx(2.021, abs=1e-3)
    assert t_quantile_975(120) == pytest.approx(1.980, abs=1e-3)
    with pytest.raises(ValueError, match="degrees of freedom"):
        t_quantile_975(0)


def test_ranks_share_ties_and_put_nan_last() -> None:
    means = {"a": 0.5, "b": 0.9, "c": 0.5, "d": float("nan")}
    assert ranks(means) == {"b": 1, "a": 2, "c": 2, "d": 4}
    assert ranks({"x": 1.0, "y": 2.0}, higher_is_better=False) == {"x": 1, "y": 2}


def comparison(tmp_path: Path, teacher: Path, **extra: object) -> dict:
    return {
        "base": {
            "teacher": {"model": str(teacher)},
            "student": {"model": "preset:tiny"},
            "data": {"dataset": "task:arith", "num_examples": 24},
            "train": {"max_steps": 2, "batch_size": 6, "progress": False},
            "eval": {"num_examples": 8},
        },
        "methods": {"ce": {"loss.name": "ce"}, "fkl": {"loss.name": "fkl"}},
        "seeds": 2,
        "output_dir": str(tmp_path / "cmp"),
        **extra,
    }


def test_grid_expands_methods_values_and_seeds(tmp_path: Path, tiny_teacher: Path) -> None:
    from kdlab.compare import expand

    entries, out = expand(comparison(tmp_path, tiny_teacher, grid={"train.lr": [1e-3, 3e-3]}))
    assert [e.name for e in entries] == [
        "ce,train.lr=0.001", "ce,train.lr=0.003", "fkl,train.lr=0.001", "fkl,train.lr=0.003"
    ]  # fmt: skip
    last = entries[-1].configs[1]
    assert (last.loss.name, last.train.lr, last.train.seed, last.student.seed) == (
        "fkl",
        3e-3,
        1,
        1,
    )
    assert last.output_dir == str(out / "runs" / "fkl,train.lr=0.003" / "seed1")


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"seed": 3}, "unknown key"),
        ({"grid": {"train.lr": 0.1}}, "non-empty list"),
        ({"methods": {"bad": {"loss.name": "nope"}}}, "entry 'bad', seed 0.*nope"),
        ({"seeds": 0}, "seeds"),
    ],
)
def test_bad_comparisons_are_refused_before_any_run(
    tmp_path: Path, change: dict, message: str
) -> None:
    from kdlab.compare import expand

    with pytest.raises(ConfigError, match=message):
        expand({**comparison(tmp_path, tmp_path / "teacher"), **change})
    assert not (tmp_path / "cmp").exists()


def test_a_rerun_completes_only_missing_runs_and_writes_reports(
    tmp_path: Path, tiny_teacher: Path
) -> None:
    import shutil

    import yaml

    from kdlab.compare import run_comparison

    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(comparison(tmp_path, tiny_teacher)))
    report = run_comparison(path)
    runs = tmp_path / "cmp" / "runs"
    stamps = {p: p.stat().st_mtime_ns for p in runs.glob("*/seed*/metrics.jsonl")}
    assert len(stamps) == 4
    shutil.rmtree(runs / "fkl" / "seed1")  # a run that never finished
    run_comparison(path)
    redone = runs / "fkl" / "seed1" / "metrics.jsonl"
    assert redone.is_file()
    assert all(p.stat().st_mtime_ns == t for p, t in stamps.items() if p != redone)
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    assert {k: len(v) for k, v in results.items()} == {"ce": 2, "fkl": 2}
    text = report.read_text()
    assert "| ce |" in text and "| fkl |" in text and "(#1)" in text
    assert "learning_curves.png" in text and (tmp_path / "cmp" / "learning_curves.png").is_file()
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 2  # curves and accuracy vs fidelity, inline


def test_the_quick_example_is_a_valid_comparison() -> None:
    from conftest import CONFIGS
    from kdlab.compare import load_comparison

    entries, _ = load_comparison(CONFIGS / "compare" / "quick.yaml")
    assert len(entries) >= 3 and all(len(e.configs) == 2 for e in entries)


def test_oracle_curves_give_a_teacher_hacking_section(tmp_path: Path) -> None:
    import yaml

    from conftest import save_tiny_model
    from kdlab.compare import run_comparison
    from kdlab.eval.hacking import detect_teacher_hacking
    from kdlab.train.metrics_log import curve, read_metrics

    teacher = save_tiny_model(tmp_path / "oracle-teacher", task="oracle", seed=5)
    raw = comparison(tmp_path, teacher)
    raw["base"]["data"] = {"dataset": "task:oracle", "num_examples": 12}
    raw["base"]["train"]["max_steps"] = 6
    raw["base"]["eval"] = {"num_examples": 8, "every": 2, "curve_examples": 8}
    raw["methods"] = {"small-data": {"data.num_examples": 6}, "more-data": {}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(raw))
    report = run_comparison(path).read_text()
    assert "## Teacher hacking" in report and "proxy_golden.png" in report
    verdicts = json.loads((tmp_path / "cmp" / "teacher_hacking.json").read_text())
    assert set(verdicts) == {"small-data", "more-data"}
    assert len(verdicts["small-data"]["seeds"]) == 2
    # each seed's verdict is the detector's on that run's logged curves
    records = read_metrics(tmp_path / "cmp" / "runs" / "more-data" / "seed1")
    proxy, golden = (
        curve(records, "eval/train/kl_teacher_student"),
        curve(records, "eval/golden_kl"),
    )
    again = detect_teacher_hacking(
        [s for s, _ in proxy], [v for _, v in proxy], [v for _, v in golden]
    )
    assert verdicts["more-data"]["seeds"][1]["pattern"] == again.pattern
    assert verdicts["more-data"]["seeds"][1]["golden_change"] == pytest.approx(again.golden_change)
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert page.count("data:image/png;base64,") >= 3 and "Teacher hacking" in page


def test_a_base_cache_is_written_once_and_shared(tmp_path: Path, tiny_teacher: Path) -> None:
    import yaml

    from kdlab.compare import run_comparison

    cache = tmp_path / "cmp" / "teacher-cache"
    raw = comparison(tmp_path, tiny_teacher, seeds=1)
    raw["base"]["cache"] = {"path": str(cache), "k": 4}
    raw["methods"] = {"fkl": {}, "fkl@cache": {"teacher": {"cache": str(cache)}}}
    path = tmp_path / "cmp.yaml"
    path.write_text(yaml.safe_dump(raw))
    run_comparison(path)
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["k"] == 4
    stamp = (cache / "meta.json").stat().st_mtime_ns
    results = json.loads((tmp_path / "cmp" / "results.json").read_text())
    cached_run = Path(results["fkl@cache"][0]["dir"])
    assert yaml.safe_load((cached_run / "config.yaml").read_text())["teacher"]["cache"] == str(
        cache
    )
    run_comparison(path)  # a re-run reuses the finished cache
    assert (cache / "meta.json").stat().st_mtime_ns == stamp
    no_teacher = comparison(tmp_path, tiny_teacher)
    no_teacher["base"]["teacher"] = None
    no_teacher["base"]["cache"] = {"path": str(cache)}
    no_teacher["methods"] = {"ce": {"loss.name": "ce"}}
    path.write_text(yaml.safe_dump(no_teacher))
    with pytest.raises(ConfigError, match="base.cache needs base.teacher.model"):
        run_comparison(path)
