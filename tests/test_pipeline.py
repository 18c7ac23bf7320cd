"""End to end: `kdlab distill` on tiny models, resume, and the errors a user can hit."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import save_tiny_model, write_config
from kdlab.cli import main
from kdlab.config import load_config
from kdlab.pipeline import run_distill
from kdlab.train.trainer import RunInterrupted


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_distill_end_to_end(tmp_path: Path, tiny_teacher: Path, capsys) -> None:  # noqa: ANN001
    cfg = write_config(tmp_path / "run.yaml", tiny_teacher, train={"ce_weight": 0.5})
    assert main(["distill", str(cfg), "--set", "train.max_steps=4"]) == 0
    run = tmp_path / "run"
    records = _metrics(run)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert {"loss", "loss/kd", "loss/ce", "lr", "grad_norm", "tokens"} <= set(records[0])
    first = records[0]
    assert first["loss"] == pytest.approx(first["loss/kd"] + 0.5 * first["loss/ce"], rel=1e-5)
    model = AutoModelForCausalLM.from_pretrained(run / "student")
    assert model.config.vocab_size > 0
    metrics = json.loads((run / "eval.json").read_text())
    assert {"accuracy", "perplexity", "top1_agreement", "kl_teacher_student"} <= set(metrics)
    assert (run / "report.md").is_file() and (run / "learning_curve.png").is_file()
    assert load_config(run / "config.yaml").train.max_steps == 4
    assert "student saved" in capsys.readouterr().out


def test_chunked_and_plain_paths_train_identically(tmp_path: Path, tiny_teacher: Path) -> None:
    losses = {}
    for chunked in (False, True):
        cfg = write_config(
            tmp_path / f"c{chunked}.yaml",
            tiny_teacher,
            train={"chunked": chunked, "chunk_size": 7, "ce_weight": 0.3},
            eval={"enabled": False},
            output_dir=str(tmp_path / f"run-{chunked}"),
        )
        run_distill(load_config(cfg))
        losses[chunked] = [r["loss"] for r in _metrics(tmp_path / f"run-{chunked}")]
    assert losses[True] == pytest.approx(losses[False], rel=1e-4)


def test_resume_gives_the_same_result(tmp_path: Path, tiny_teacher: Path) -> None:
    common = {"train": {"max_steps": 6, "grad_accum": 2, "lr_scheduler": "cosine"}}
    straight = write_config(
        tmp_path / "a.yaml",
        tiny_teacher,
        eval={"enabled": False},
        output_dir=str(tmp_path / "a"),
        **common,
    )
    run_distill(load_config(straight))
    resumed = write_config(
        tmp_path / "b.yaml",
        tiny_teacher,
        eval={"enabled": False},
        output_dir=str(tmp_path / "b"),
        **common,
    )
    with pytest.raises(RunInterrupted):
        run_distill(load_config(resumed), stop_after=3)
    assert not (tmp_path / "b" / "student").exists()
    assert main(["distill", str(resumed)]) == 2  # refuses to overwrite without --resume
    assert main(["distill", str(resumed), "--resume"]) == 0
    a, b = _metrics(tmp_path / "a"), _metrics(tmp_path / "b")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], rel=1e-6)
    wa = load_file(str(tmp_path / "a" / "student" / "model.safetensors"))
    wb = load_file(str(tmp_path / "b" / "student" / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0, atol=1e-6)


def test_tokenizer_without_pad_uses_eos(tmp_path: Path, tiny_teacher: Path) -> None:
    from transformers import AutoTokenizer

    path = save_tiny_model(tmp_path / "nopad", seed=5)
    tok = AutoTokenizer.from_pretrained(path)
    tok.pad_token = None
    tok.save_pretrained(path)
    assert AutoTokenizer.from_pretrained(path).pad_token is None
    cfg = write_config(
        tmp_path / "run.yaml", tiny_teacher, student={"model": str(path)}, eval={"enabled": False}
    )
    assert main(["distill", str(cfg), "--set", "train.max_steps=1"]) == 0


def _error(capsys, argv: list[str]) -> str:  # noqa: ANN001
    assert main(argv) == 2
    return capsys.readouterr().err


def test_cli_errors_before_training(tmp_path: Path, tiny_teacher: Path, capsys) -> None:  # noqa: ANN001
    cfg = write_config(tmp_path / "run.yaml", tiny_teacher)
    err = _error(capsys, ["distill", str(cfg), "--set", "loss.name=klx"])
    assert "unknown loss 'klx'" in err and "fkl" in err
    err = _error(capsys, ["distill", str(cfg), "--set", "loss.temprature=2"])
    assert "temprature" in err and "temperature" in err
    err = _error(capsys, ["distill", str(cfg), "--set", "train.batch=4"])
    assert "train.batch" in err and "batch_size" in err
    err = _error(capsys, ["distill", str(cfg), "--set", "train.lr=fast"])
    assert "train.lr" in err and "expected float" in err
    err = _error(capsys, ["distill", str(cfg), "--set", "teacher=null"])
    assert "needs a teacher" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_data_errors(tmp_path: Path, tiny_teacher: Path, capsys) -> None:  # noqa: ANN001
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    cfg = write_config(tmp_path / "run.yaml", tiny_teacher, student={"model": str(tiny_teacher)})
    err = _error(
        capsys,
        ["distill", str(cfg), "--set", f"data.dataset={empty}", "--set", "eval.num_examples=1"],
    )
    assert "empty" in err or "no examples" in err or "records" in err
    long = tmp_path / "long.jsonl"
    rows = [{"prompt": "1+1=", "completion": "2" * 80}] + [
        {"prompt": "1+1=", "completion": "2"}
    ] * 4
    long.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = [
        "distill",
        str(cfg),
        "--set",
        f"data.dataset={long}",
        "--set",
        "eval.num_examples=1",
        "--set",
        "data.max_length=32",
    ]
    err = _error(capsys, args)
    assert "data.max_length=32" in err and "data.overlong" in err
    ok = ["--set", "data.overlong=drop", "--set", f"output_dir={tmp_path / 'dropped'}"]
    assert main([*args, *ok]) == 0
    cols = tmp_path / "cols.jsonl"
    cols.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n")
    err = _error(capsys, ["distill", str(cfg), "--set", f"data.dataset={cols}"])
    assert "prompt_field" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_vocabulary_mismatch_is_a_clear_error(tmp_path: Path, capsys) -> None:  # noqa: ANN001
    other = save_tiny_model(tmp_path / "oracle-model", task="oracle")
    cfg = write_config(tmp_path / "run.yaml", other)
    err = _error(capsys, ["distill", str(cfg)])
    assert "teacher vocab" in err and "student vocab" in err and "share a tokenizer" in err
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_chat_messages_dataset(tmp_path: Path, tiny_teacher: Path) -> None:
    data = tmp_path / "chat.jsonl"
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"{i}+1="},
                {"role": "assistant", "content": str(i + 1)},
            ]
        }
        for i in range(12)
    ]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_teacher,
        student={"model": str(tiny_teacher)},
        data={"dataset": str(data), "num_examples": None},
        eval={"num_examples": 4},
    )
    assert main(["distill", str(cfg), "--set", "train.max_steps=2"]) == 0
    assert (tmp_path / "run" / "student" / "config.json").is_file()
