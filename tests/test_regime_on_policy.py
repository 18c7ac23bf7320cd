"""The `on_policy` regime (GKD's λ): when steps use student samples and what those batches hold."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

import kdlab.regimes.on_policy  # noqa: F401  (registers on_policy)
from conftest import CONFIGS, run_example_config, write_config
from kdlab.cli import main
from kdlab.config import from_dict, load_config
from kdlab.data.collate import Encoded
from kdlab.data.datasets import encode_dataset, load_splits
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.models.generation import Sampling, generate
from kdlab.models.loading import ensure_pad_token
from kdlab.models.tiny import build_preset
from kdlab.pipeline import run_distill
from kdlab.regimes import REGIMES, RegimeContext
from kdlab.regimes.on_policy import OnPolicyOptions
from kdlab.tasks import get_task
from kdlab.train.trainer import RunInterrupted

PAD, EOS = 0, 2  # the arith tokenizer's ids


@pytest.fixture(scope="module")
def dataset() -> list[Encoded]:
    config = from_dict({"data": {"dataset": "task:arith", "num_examples": 20}})
    tokenizer = ensure_pad_token(get_task("arith").build_tokenizer(), "arith")
    return encode_dataset(tokenizer, load_splits(config.data, 4).train, config.data)


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return build_preset("tiny", get_task("arith").build_tokenizer(), seed=0)


def context(
    dataset: list[Encoded], student: nn.Module, lmbda: float, seed: int = 3, **kw: Any
) -> RegimeContext:
    return RegimeContext(
        dataset=dataset,
        pad_id=PAD,
        batch_size=4,
        grad_accum=2,
        seed=seed,
        eos_id=EOS,
        student=student,
        sampling=Sampling(max_new_tokens=6, temperature=1.0),
        options=OnPolicyOptions(lmbda=lmbda),
        extras={"max_length": 64},
        **kw,
    )


def same_batches(a: list[dict], b: list[dict]) -> bool:
    return len(a) == len(b) and all(
        x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)
        for x, y in zip(a, b, strict=True)
    )


def test_lmbda_zero_gives_exactly_the_off_policy_batches(
    dataset: list[Encoded], student: nn.Module
) -> None:
    ctx = context(dataset, student, lmbda=0.0)
    on, off = REGIMES.get("on_policy")(ctx), REGIMES.get("off_policy")(ctx)
    for step in range(6):  # 6 steps x 2 micro-batches x 4 = 48 examples: crosses epochs
        assert same_batches(on.micro_batches(step), off.micro_batches(step))
        assert on.after_step(step + 1) == {"student_generated": 0.0}


def test_lmbda_one_trains_on_the_students_samples(
    dataset: list[Encoded], student: nn.Module
) -> None:
    ctx = context(dataset, student, lmbda=1.0)
    on, off = REGIMES.get("on_policy")(ctx), REGIMES.get("off_policy")(ctx)
    seeds = set()
    for step in range(3):
        for m, batch in enumerate(on.micro_batches(step)):
            examples = off.examples(step, m)
            prompts = [e.input_ids[: e.prompt_length] for e in examples]
            seed = on.sample_seed(step, m)
            seeds.add(seed)
            samples = generate(
                student, prompts, pad_id=PAD, eos_id=EOS, sampling=ctx.sampling, seed=seed
            )
            for b, (prompt, sample) in enumerate(zip(prompts, samples, strict=True)):
                n = len(prompt) + len(sample)
                assert batch["input_ids"][b, : len(prompt)].tolist() == prompt
                assert batch["input_ids"][b, len(prompt) : n].tolist() == sample
                assert batch["attention_mask"][b].sum() == n
                labels = batch["labels"][b]
                assert labels[labels != IGNORE_INDEX].tolist() == sample  # counted = the sample
            dataset_completions = [e.input_ids[e.prompt_length :] for e in examples]
            assert samples != dataset_completions
        assert on.after_step(step + 1) == {"student_generated": 1.0}
    assert len(seeds) == 6  # every (step, micro-batch) samples with its own seed


def test_samples_come_from_the_current_student(dataset: list[Encoded]) -> None:
    """On-policy means the live student: changing its weights changes the next samples."""
    model = build_preset("tiny", get_task("arith").build_tokenizer(), seed=4)
    regime = REGIMES.get("on_policy")(context(dataset, model, lmbda=1.0))
    before = regime.micro_batches(0)
    assert same_batches(regime.micro_batches(0), before)  # rebuilt identically (resume)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a much sharper student
    assert not same_batches(regime.micro_batches(0), before)


def test_the_coin_is_per_step_deterministic_and_lands_near_lmbda(
    dataset: list[Encoded], student: nn.Module
) -> None:
    def coins(seed: int, lmbda: float) -> list[bool]:
        regime = REGIMES.get("on_policy")(context(dataset, student, lmbda, seed=seed))
        return [regime.use_student(step) for step in range(400)]

    first = coins(3, 0.3)
    assert coins(3, 0.3) == first  # a fresh regime (a resumed run, another process) agrees
    assert coins(4, 0.3) != first
    assert sum(first) / 400 == pytest.approx(0.3, abs=0.07)  # binomial sd ~0.023
    assert sum(coins(3, 0.8)) / 400 == pytest.approx(0.8, abs=0.07)
    # rank does not enter the coin: every process of a step makes the same choice
    other_rank = REGIMES.get("on_policy")(context(dataset, student, 0.3, rank=1, world_size=2))
    assert [other_rank.use_student(s) for s in range(400)] == first


def test_mixed_steps_follow_the_coin(dataset: list[Encoded], student: nn.Module) -> None:
    ctx = context(dataset, student, lmbda=0.5)
    on, off = REGIMES.get("on_policy")(ctx), REGIMES.get("off_policy")(ctx)
    seen = set()
    for step in range(8):
        coin = on.use_student(step)
        seen.add(coin)
        assert same_batches(on.micro_batches(step), off.micro_batches(step)) is not coin
        assert on.after_step(step + 1) == {"student_generated": float(coin)}
    assert seen == {True, False}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_example_config_end_to_end(tmp_path: Path, tiny_teacher: Path, student: nn.Module) -> None:
    config = CONFIGS / "regimes" / "on_policy.yaml"
    records = run_example_config(config, tiny_teacher, tmp_path / "run", max_steps=4)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    flags = [r["regime/student_generated"] for r in records]
    # the logged flag is the step's coin (train.seed of the run, lmbda 0.5 of the example)
    run = load_config(tmp_path / "run" / "config.yaml")
    assert run.regime.options == {"lmbda": 0.5}
    ctx = RegimeContext(
        [], PAD, 1, 1, seed=run.train.seed, student=student, options=OnPolicyOptions(lmbda=0.5)
    )
    regime = REGIMES.get("on_policy")(ctx)
    assert flags == [float(regime.use_student(r["step"] - 1)) for r in records]
    assert all(r["loss"] == r["loss"] for r in records)  # no NaN
    assert (tmp_path / "run" / "student" / "config.json").is_file()


def _config(tmp_path: Path, teacher: Path, name: str, **sections: Any) -> Path:
    return write_config(
        tmp_path / f"{name}.yaml",
        teacher,
        regime={"name": "on_policy", "lmbda": 0.5, "generation": {"max_new_tokens": 6}},
        train={"max_steps": 6, "batch_size": 4, "seed": 1},
        eval={"enabled": False},
        output_dir=str(tmp_path / name),
        **sections,
    )


def test_resume_equals_an_uninterrupted_run(tmp_path: Path, tiny_teacher: Path) -> None:
    run_distill(load_config(_config(tmp_path, tiny_teacher, "straight")))
    stopped = load_config(_config(tmp_path, tiny_teacher, "stopped"))
    with pytest.raises(RunInterrupted):
        run_distill(stopped, stop_after=3)
    assert len(_metrics(tmp_path / "stopped")) == 3
    run_distill(stopped, resume=True)
    a, b = _metrics(tmp_path / "straight"), _metrics(tmp_path / "stopped")
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    flags = [r["regime/student_generated"] for r in a]
    assert 1.0 in flags[3:] and 0.0 in flags  # student samples after the resume point
    assert [r["regime/student_generated"] for r in b] == flags
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5)


def _cli_error(capsys: pytest.CaptureFixture[str], cfg: Path, *sets: str) -> str:
    args = [item for s in sets for item in ("--set", s)]
    assert main(["distill", str(cfg), *args]) == 2
    return capsys.readouterr().err


def test_config_errors_name_the_field(
    tmp_path: Path, tiny_teacher: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = _config(tmp_path, tiny_teacher, "bad")
    err = _cli_error(capsys, cfg, "regime.lmbda=2")
    assert "lmbda" in err and "[0, 1]" in err and "2" in err
    err = _cli_error(capsys, cfg, "regime.lambda=0.5")
    assert "regime.lambda" in err and "lmbda" in err
    err = _cli_error(capsys, cfg, "regime.generation.temprature=0.5")
    assert "temprature" in err and "temperature" in err
    assert not (tmp_path / "bad").exists()  # refused before the run folder is made


def test_generation_longer_than_max_length_fails_before_training(
    tmp_path: Path,
    tiny_teacher: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    cfg = _config(tmp_path, tiny_teacher, "long")
    err = _cli_error(capsys, cfg, "data.max_length=24", "regime.generation.max_new_tokens=20")
    assert "max_new_tokens=20" in err and "data.max_length=24" in err
    assert "longest prompt" in err
    assert not (tmp_path / "long" / "metrics.jsonl").exists()
    assert not (tmp_path / "long" / "checkpoints").exists()
