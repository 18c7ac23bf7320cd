"""`kdlab losses`, `kdlab eval`, `--help-config`, and the other user-facing paths of the CLI."""

from __future__ import annotations

import json
from pathlib import Path

from conftest import save_tiny_model, write_config
from kdlab.cli import main


def test_losses_lists_every_loss_with_hparams(capsys) -> None:  # noqa: ANN001
    from kdlab.losses import available_losses

    assert main(["losses"]) == 0
    out = capsys.readouterr().out
    for name in available_losses():
        assert f"\n{name} " in "\n" + out
    assert "beta=0.5" in out and "mu=0.5" in out and "alpha=0.1" in out
    atkd = next(line for line in out.splitlines() if line.startswith("atkd "))
    assert "alpha=0.2" in atkd and "labels" in atkd and "couples positions: batch" in atkd
    assert "Revisiting Knowledge Distillation for Autoregressive" in out


def test_help_config_and_no_command(capsys) -> None:  # noqa: ANN001
    assert main(["distill", "--help-config"]) == 0
    out = capsys.readouterr().out
    assert "train.max_steps" in out and "data.overlong" in out
    assert main([]) == 2


def test_eval_saved_models(tmp_path: Path, tiny_teacher: Path, capsys) -> None:  # noqa: ANN001
    student = save_tiny_model(tmp_path / "student", seed=7)
    out = tmp_path / "metrics.json"
    argv = ["eval", "--model", str(student), "--teacher", str(tiny_teacher), "--task", "arith"]
    assert main([*argv, "--num-examples", "8", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert {"accuracy", "perplexity", "top1_agreement", "kl_teacher_student"} <= set(metrics)
    assert {"answer_agreement", "teacher/accuracy"} <= set(metrics)
    assert 0 <= metrics["top1_agreement"] <= 1 and metrics["kl_teacher_student"] > 0
    assert "perplexity" in capsys.readouterr().out
    # the model against itself: perfect fidelity
    same = ["eval", "--model", str(student), "--teacher", str(student), "--task", "arith"]
    assert main([*same, "--num-examples", "8", "--out", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics["top1_agreement"] == 1.0 and abs(metrics["kl_teacher_student"]) < 1e-5


def test_eval_unknown_task_is_a_clear_error(tmp_path: Path, tiny_teacher: Path, capsys) -> None:  # noqa: ANN001
    assert main(["eval", "--model", str(tiny_teacher), "--task", "gsm9k"]) == 2
    err = capsys.readouterr().err
    assert "gsm9k" in err and "arith" in err and "oracle" in err


def test_oracle_run_reports_golden_metrics(tmp_path: Path) -> None:
    teacher = save_tiny_model(tmp_path / "oracle-teacher", task="oracle", seed=3)
    cfg = write_config(
        tmp_path / "run.yaml",
        teacher,
        data={"dataset": "task:oracle", "num_examples": 32},
        loss={"name": "akl"},
    )
    assert main(["distill", str(cfg), "--set", "train.max_steps=2"]) == 0
    metrics = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert metrics["golden_kl"] > 0 and 0 <= metrics["golden_top1"] <= 1


def test_bf16_and_tensorboard(tmp_path: Path, tiny_teacher: Path) -> None:
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_teacher,
        train={"precision": "bf16", "report_to": ["tensorboard"], "grad_accum": 2},
        eval={"enabled": False},
    )
    assert main(["distill", str(cfg), "--set", "train.max_steps=2"]) == 0
    events = list((tmp_path / "run").rglob("events.out.tfevents*"))
    assert events, "tensorboard wrote no event file"
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(r)["loss"] == json.loads(r)["loss"] for r in records)  # not NaN
