"""Evaluation every `eval.every` steps: proxy, golden and perplexity curves in metrics.jsonl."""

from __future__ import annotations

from pathlib import Path

import pytest

from conftest import save_tiny_model, write_config


@pytest.fixture(scope="module")
def oracle_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_model(tmp_path_factory.mktemp("oracle") / "teacher", task="oracle", seed=7)


def _oracle_config(tmp_path: Path, teacher: Path, **train: object) -> Path:
    return write_config(
        tmp_path / "run.yaml",
        teacher,
        data={"dataset": "task:oracle", "num_examples": 16},
        train={"max_steps": 4, "batch_size": 8, "save_every": 2, **train},
        eval={"num_examples": 12, "batch_size": 6, "every": 2, "curve_examples": 10},
    )


def test_curves_are_logged_and_match_an_independent_evaluation(
    tmp_path: Path, oracle_teacher: Path
) -> None:
    from kdlab.config import ModelSpec, load_config
    from kdlab.data.collate import collate
    from kdlab.eval.metrics import fidelity, golden_metrics, perplexity
    from kdlab.models.loading import load_model
    from kdlab.pipeline import load_everything, run_distill
    from kdlab.tasks import OracleTask
    from kdlab.train.metrics_log import curve, read_metrics

    config = load_config(_oracle_config(tmp_path, oracle_teacher))
    summary = run_distill(config)
    records = read_metrics(summary.output_dir)
    for key in ("golden_kl", "kl_teacher_student", "train/kl_teacher_student", "perplexity"):
        assert [s for s, _ in curve(records, f"eval/{key}")] == [0, 2, 4]
    assert "loss" not in records[0]  # step 0 holds only the evaluation before training
    # the last curve point is the saved student's distance, computed here independently
    loaded = load_everything(config)
    tok = loaded.tokenizer
    pad = tok.pad_token_id
    held_out = [collate(loaded.eval_encoded[0:6], pad), collate(loaded.eval_encoded[6:10], pad)]
    student = load_model(ModelSpec(model=str(summary.output_dir / "student")), role="model")
    last = records[-1]
    golden = golden_metrics(student, OracleTask(), tok, held_out)["golden_kl"]
    assert last["eval/golden_kl"] == pytest.approx(golden, rel=1e-4)
    proxy = fidelity(student, loaded.teacher, held_out)["kl_teacher_student"]
    assert last["eval/kl_teacher_student"] == pytest.approx(proxy, rel=1e-4)
    assert last["eval/perplexity"] == pytest.approx(perplexity(student, held_out), rel=1e-4)
    train = [collate(loaded.train[0:6], pad), collate(loaded.train[6:10], pad)]
    train_proxy = fidelity(student, loaded.teacher, train)["kl_teacher_student"]
    assert last["eval/train/kl_teacher_student"] == pytest.approx(train_proxy, rel=1e-4)
    first = records[0]
    assert first["eval/train/kl_teacher_student"] > last["eval/train/kl_teacher_student"]


def test_a_resumed_run_keeps_one_curve_point_per_step(tmp_path: Path, oracle_teacher: Path) -> None:
    from kdlab.config import load_config
    from kdlab.pipeline import run_distill
    from kdlab.train.metrics_log import curve, read_metrics
    from kdlab.train.trainer import RunInterrupted

    config = load_config(_oracle_config(tmp_path, oracle_teacher))
    with pytest.raises(RunInterrupted):
        run_distill(config, stop_after=2)
    run_distill(config, resume=True)
    steps = [s for s, _ in curve(read_metrics(Path(config.output_dir)), "eval/golden_kl")]
    assert steps == [0, 2, 4]


def test_curve_settings_are_checked(tmp_path: Path, oracle_teacher: Path) -> None:
    from kdlab.config import ConfigError, load_config

    path = _oracle_config(tmp_path, oracle_teacher)
    path.write_text(path.read_text().replace("  every: 2", "  every: -1"))
    with pytest.raises(ConfigError, match="eval.every"):
        load_config(path)


def test_evaluating_during_training_does_not_change_training(
    tmp_path: Path, oracle_teacher: Path
) -> None:
    from dataclasses import replace

    from kdlab.config import load_config
    from kdlab.pipeline import run_distill
    from kdlab.train.metrics_log import curve, read_metrics

    config = load_config(_oracle_config(tmp_path, oracle_teacher))
    plain = replace(config, eval=replace(config.eval, every=0), output_dir=str(tmp_path / "plain"))
    with_curves = run_distill(config).output_dir
    without = run_distill(plain).output_dir
    losses = curve(read_metrics(with_curves), "loss")
    assert losses == curve(read_metrics(without), "loss") and len(losses) == 4
    assert not any(k.startswith("eval/") for r in read_metrics(without) for k in r)
