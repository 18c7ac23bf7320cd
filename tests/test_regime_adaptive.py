"""The adaptive regime (DistiLLM): threshold rule, source choice, replay buffer, exact resume.

Golden values below follow the rule of the official code, jongwooko/distillm `finetune.py`:
`samp_threshold = φ·(1 − global_step/total_iters)` (or `φ·0.5`, `φ·global_step/total_iters`);
fresh if `r < samp_threshold or (r < φ and len(buffer) < capacity)`, replay if `r < φ`, else
the dataset; after a validation, `φ = min(φ + 0.1, 1)` and `prev = curr` when
`curr >= prev + loss_eps`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import kdlab.regimes.adaptive as adaptive_module  # registers "adaptive"
from conftest import CONFIGS, run_example_config, write_config
from kdlab.config import ConfigError, DataSpec, from_dict, load_config
from kdlab.data.collate import Encoded
from kdlab.data.datasets import encode_dataset
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.models.generation import Sampling
from kdlab.models.tiny import build_preset
from kdlab.pipeline import run_distill
from kdlab.regimes import REGIMES, RegimeContext
from kdlab.regimes.adaptive import (
    SOURCE_DATASET,
    SOURCE_FRESH,
    SOURCE_REPLAY,
    AdaptiveOptions,
    choose_source,
    fresh_threshold,
    update_threshold,
    validation_loss,
)
from kdlab.tasks import get_task
from kdlab.train.trainer import RunInterrupted


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _context(student, dataset, eval_dataset, *, max_steps=10, batch_size=4, grad_accum=1, **kw):  # noqa: ANN001, ANN003, ANN202
    task_tok = get_task("arith").build_tokenizer()
    return RegimeContext(
        dataset=dataset,
        pad_id=task_tok.pad_token_id,
        eos_id=task_tok.eos_token_id,
        batch_size=batch_size,
        grad_accum=grad_accum,
        seed=3,
        student=student,
        eval_dataset=eval_dataset,
        sampling=Sampling(max_new_tokens=5, batch_size=8),
        options=AdaptiveOptions(**kw),
        extras={"config": SimpleNamespace(train=SimpleNamespace(max_steps=max_steps))},
    )


def _arith(n: int, split: str = "train") -> list[Encoded]:
    task = get_task("arith")
    return encode_dataset(
        task.build_tokenizer(), task.make_examples(n, seed=5, split=split), DataSpec()
    )


# ---------------------------------------------------------------------------- the pure rules


def test_fresh_threshold_schedules() -> None:
    # φ = 0.5, total 10 steps (golden values from the official formulas)
    assert fresh_threshold(0.5, 1, 10, "decreasing") == pytest.approx(0.45)
    assert fresh_threshold(0.5, 10, 10, "decreasing") == pytest.approx(0.0)
    assert fresh_threshold(0.5, 3, 10, "constant") == pytest.approx(0.25)
    assert fresh_threshold(0.5, 4, 10, "increasing") == pytest.approx(0.2)
    assert fresh_threshold(0.0, 1, 10, "decreasing") == 0.0


@pytest.mark.parametrize(
    ("r", "phi", "fresh", "size", "expected"),
    [
        (0.10, 0.5, 0.2, 8, SOURCE_FRESH),  # r < samp_threshold: fresh even with a full buffer
        (0.30, 0.5, 0.2, 8, SOURCE_REPLAY),  # samp <= r < φ, buffer full: replay
        (0.30, 0.5, 0.2, 7, SOURCE_FRESH),  # samp <= r < φ, buffer not full: fresh
        (0.60, 0.5, 0.2, 0, SOURCE_DATASET),  # r >= φ: dataset, whatever the buffer
        (0.50, 0.5, 0.2, 8, SOURCE_DATASET),  # r = φ is not below φ
        (0.00, 0.0, 0.0, 0, SOURCE_DATASET),  # φ = 0: always the dataset
        (0.99, 1.0, 0.0, 8, SOURCE_REPLAY),  # φ = 1 and a full buffer: never the dataset
    ],
)
def test_choose_source(r: float, phi: float, fresh: float, size: int, expected: int) -> None:
    assert choose_source(r, phi, fresh, size, capacity=8) == expected


def test_update_threshold_rule() -> None:
    # binary-exact numbers, so `>=` at equality is tested exactly
    assert update_threshold(0.0, 2.0, 2.25, 0.5) == (0.0, 2.0)  # a rise below eps: nothing
    assert update_threshold(0.0, 2.0, 2.5, 0.5) == (0.1, 2.5)  # a rise of exactly eps: up
    assert update_threshold(0.3, 2.0, 1.0, 0.5) == (0.3, 2.0)  # a fall: prev stays
    assert update_threshold(0.95, 2.0, 3.0, 0.5) == (1.0, 3.0)  # capped at 1


def test_threshold_follows_a_sequence_of_validation_losses(monkeypatch: pytest.MonkeyPatch) -> None:
    losses = iter([2.0, 1.9, 2.05, 2.15, 2.1, 2.3, 2.5, 2.7])  # before training, then steps 2..14
    seen: list[int] = []

    def fake(model, examples, **kw) -> float:  # noqa: ANN001, ANN003
        seen.append(len(examples))
        return next(losses)

    monkeypatch.setattr(adaptive_module, "validation_loss", fake)
    data = [Encoded([1, 2, 3], [False, True, True], 1)] * 8
    ctx = _context(torch.nn.Linear(1, 1), data, data[:5], eval_every=2, val_examples=3)
    regime = REGIMES.get("adaptive")(ctx)
    regime.prepare()
    logs = [regime.after_step(step) for step in range(1, 15)]
    assert [("val_loss" in v) for v in logs] == [step % 2 == 0 for step in range(1, 15)]
    assert [v["val_loss"] for v in logs if "val_loss" in v] == [1.9, 2.05, 2.15, 2.1, 2.3, 2.5, 2.7]
    # by hand from the rule, eps 0.1, prev starting at 2.0:
    # 1.9 no | 2.05 no | 2.15 >= 2.1 up (prev 2.15) | 2.1 no | 2.3 >= 2.25 up (prev 2.3)
    # | 2.5 >= 2.4 up (prev 2.5) | 2.7 >= 2.6 up (prev 2.7)
    thresholds = [v["threshold"] for v in logs if "val_loss" in v]
    assert thresholds == pytest.approx([0.0, 0.0, 0.1, 0.1, 0.2, 0.3, 0.4])
    assert regime.prev_val_loss == 2.7
    assert seen == [3] * 8  # val_examples of the 5 held-out examples, every time


def test_epoch_interval_and_option_checks() -> None:
    data = [Encoded([1, 2], [False, True], 1)] * 50
    regime = REGIMES.get("adaptive")(_context(torch.nn.Linear(1, 1), data, data, grad_accum=2))
    assert regime.eval_interval == 50 // (4 * 2)
    with pytest.raises(ValueError, match="capacity"):
        REGIMES.get("adaptive")(_context(torch.nn.Linear(1, 1), data, data, capacity=3))
    with pytest.raises(ValueError, match="held-out"):
        REGIMES.get("adaptive")(_context(torch.nn.Linear(1, 1), data, ()))
    with pytest.raises(ConfigError, match="init_threshold"):
        from_dict({"regime": {"name": "adaptive", "init_threshold": 1.5}})
    with pytest.raises(ConfigError, match="regime.replay_ratio"):
        from_dict({"regime": {"name": "adaptive", "replay_ratio": "sometimes"}})
    options = from_dict({"regime": {"name": "adaptive", "eval_every": 5}}).regime.options
    assert options == {"eval_every": 5}


# ---------------------------------------------------------------------------- with a tiny student


def test_validation_loss_is_the_token_mean_cross_entropy() -> None:
    student = build_preset("tiny", get_task("arith").build_tokenizer(), seed=0)
    examples = _arith(5, "test")
    value = validation_loss(student, examples, pad_id=0, batch_size=2)
    # independent: one example at a time, per-token NLL from log_softmax, summed then divided
    nll, count = 0.0, 0
    for e in examples:
        ids = torch.tensor([e.input_ids])
        logp = torch.log_softmax(student(input_ids=ids).logits[0].detach().float(), -1)  # [T, V]
        for i in range(len(e) - 1):
            if e.counted[i + 1]:
                nll -= float(logp[i, e.input_ids[i + 1]])
                count += 1
    assert value == pytest.approx(nll / count, rel=1e-5)


def test_buffer_fills_with_student_samples_then_replays() -> None:
    tokenizer = get_task("arith").build_tokenizer()
    student = build_preset("tiny", tokenizer, seed=0)
    data, held_out = _arith(12), _arith(4, "test")
    ctx = _context(
        student,
        data,
        held_out,
        max_steps=100,
        init_threshold=1.0,
        capacity=8,
        eval_every=100,
        replay_ratio="increasing",
    )
    regime = REGIMES.get("adaptive")(ctx)
    regime.prepare()
    completions = {tuple(e.input_ids[e.prompt_length :]) for e in data}
    sources, sizes = [], []
    for step in range(6):
        (batch,) = regime.micro_batches(step)
        sources.append(regime.last_source)
        sizes.append(regime.after_step(step + 1)["buffer"])
        rows = [
            (ids[: int(m.sum())].tolist(), labels)
            for ids, m, labels in zip(
                batch["input_ids"], batch["attention_mask"], batch["labels"], strict=True
            )
        ]
        buffered = [e.input_ids for e in regime.buffer]
        for ids, labels in rows:
            assert ids in buffered  # fresh rows were pushed; replayed rows come from the buffer
            counted = labels[labels != IGNORE_INDEX].tolist()
            assert 0 < len(counted) <= 5 and tuple(counted) not in completions
    # φ = 1: fresh until the buffer holds 8, then replay unless r < φ·step/100 (fresh again),
    # r drawn from (seed 3, step) as `Regime.step_rng` documents
    draws = [random.Random(f"3:{step}:0").random() for step in range(6)]
    expected = [SOURCE_FRESH] * 2 + [
        SOURCE_FRESH if draws[s] < (s + 1) / 100 else SOURCE_REPLAY for s in range(2, 6)
    ]
    assert sources == expected and SOURCE_REPLAY in sources
    assert sizes == [4.0, 8.0, 8.0, 8.0, 8.0, 8.0]
    state = json.loads(json.dumps(regime.state_dict()))  # JSON-able
    again = REGIMES.get("adaptive")(ctx)
    again.load_state_dict(state)
    assert list(again.buffer) == list(regime.buffer)
    assert again.threshold == regime.threshold and again.prev_val_loss == regime.prev_val_loss


def test_resume_continues_identically(tmp_path: Path, tiny_teacher: Path) -> None:
    regime = {
        "name": "adaptive",
        "init_threshold": 0.5,
        "loss_eps": -1.0,  # every validation raises φ: the threshold moves during the run
        "capacity": 8,
        "eval_every": 2,
        "val_examples": 8,
        "generation": {"max_new_tokens": 6},
    }
    runs = {}
    for name in ("straight", "resumed"):
        cfg = write_config(
            tmp_path / f"{name}.yaml",
            tiny_teacher,
            regime=regime,
            data={"num_examples": 24},
            train={"max_steps": 8, "batch_size": 4, "seed": 2},
            eval={"enabled": False, "num_examples": 8},
            output_dir=str(tmp_path / name),
        )
        if name == "resumed":
            with pytest.raises(RunInterrupted):
                run_distill(load_config(cfg), stop_after=3)  # mid-interval, φ already raised
            run_distill(load_config(cfg), resume=True)
        else:
            run_distill(load_config(cfg))
        runs[name] = _metrics(tmp_path / name)
    a, b = runs["straight"], runs["resumed"]
    assert [r["step"] for r in b] == list(range(1, 9))
    assert {r["regime/source"] for r in a} == {SOURCE_DATASET, SOURCE_FRESH, SOURCE_REPLAY}
    thresholds = [r["regime/threshold"] for r in a]
    assert thresholds == pytest.approx([0.5, 0.6, 0.6, 0.7, 0.7, 0.8, 0.8, 0.9])
    for key in ("regime/threshold", "regime/source", "regime/buffer"):
        assert [r[key] for r in b] == [r[key] for r in a], key
    assert [r["loss"] for r in b] == pytest.approx([r["loss"] for r in a], abs=1e-5)
    val_a = [r["regime/val_loss"] for r in a if "regime/val_loss" in r]
    val_b = [r["regime/val_loss"] for r in b if "regime/val_loss" in r]
    assert len(val_a) == 4 and val_b == pytest.approx(val_a, abs=1e-5)


def test_example_config_runs(tmp_path: Path, tiny_teacher: Path) -> None:
    records = run_example_config(
        CONFIGS / "regimes" / "adaptive.yaml", tiny_teacher, tmp_path / "r"
    )
    assert [r["step"] for r in records] == [1, 2]
    # 24 examples of batch 6: an epoch is 4 steps, so no validation yet; φ stays at 0
    assert all(r["regime/threshold"] == 0.0 and r["regime/source"] == 0 for r in records)
    assert not any("regime/val_loss" in r for r in records)
