"""Warmup-Distill end to end on tiny models: the three stages, their files, resume, the options."""

from __future__ import annotations

import json
import logging
import math
from functools import partial
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import kdlab.regimes.warmup_distill as wd  # registers the regime
from conftest import write_config
from kdlab.cli import main
from kdlab.config import load_config
from kdlab.data.collate import Encoded
from kdlab.models.generation import Sampling, generate
from kdlab.models.tiny import build_preset
from kdlab.pipeline import run_distill
from kdlab.regimes import REGIMES, RegimeContext
from kdlab.regimes.revise import RevisionStats, first_low_probability, revise
from kdlab.tasks import get_task
from kdlab.train.trainer import RunInterrupted

MAX_NEW = 6
MAX_REVISIONS = 2
N = 12


def _config(
    tmp_path: Path, teacher: Path, name: str, *, train: dict | None = None, **regime
) -> Path:  # noqa: ANN003
    return write_config(
        tmp_path / f"{name}.yaml",
        teacher,
        data={"num_examples": N},
        regime={
            "name": "warmup_distill",
            "warm_steps": 2,
            "max_revisions": MAX_REVISIONS,
            "generation": {"max_new_tokens": MAX_NEW, "batch_size": 12},
            **regime,
        },
        train={"max_steps": 2, "batch_size": 6, **(train or {})},
        eval={"enabled": False},
        output_dir=str(tmp_path / name),
    )


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


class Calls:
    """Counts the calls of the two stage methods (wrapping the real ones)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.counts = {"revise_responses": 0, "warm_up": 0}
        for name in self.counts:
            real = getattr(wd.WarmupDistill, name)

            def counted(regime, _real=real, _name=name) -> None:  # noqa: ANN001
                self.counts[_name] += 1
                _real(regime)

            monkeypatch.setattr(wd.WarmupDistill, name, counted)

    def take(self) -> dict[str, int]:
        out = dict(self.counts)
        self.counts.update(dict.fromkeys(self.counts, 0))
        return out


def _initial_student() -> dict[str, torch.Tensor]:
    model = build_preset("tiny", get_task("arith").build_tokenizer(), seed=0)
    return {k: v.detach() for k, v in model.state_dict().items()}


def test_three_stages_and_a_resume_in_stage_three(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # noqa: ANN001
    # stage 3 at lr 0: the final student is exactly the student stage 3 started from
    cfg = _config(tmp_path, tiny_teacher, "run", train={"lr": 0.0}, warm_lr=1e-2)
    calls = Calls(monkeypatch)
    with pytest.raises(RunInterrupted):
        run_distill(load_config(cfg), stop_after=1)
    assert calls.take() == {"revise_responses": 1, "warm_up": 1}
    regime = tmp_path / "run" / "regime"

    # stage 1: one record per prompt; the statistics are those of the records
    records = _lines(regime / "revised.part0.jsonl")
    summary = json.loads((regime / "revised.done.json").read_text())
    assert sorted(r["index"] for r in records) == list(range(N)) and summary["sequences"] == N
    assert summary["tokens_revised"] == sum(r["revisions"] for r in records) > 0
    assert summary["sequences_changed"] == sum(r["revised"] != r["original"] for r in records)
    for r in records:
        assert r["revisions"] <= MAX_REVISIONS and len(r["revised"]) <= MAX_NEW
        assert (r["revisions"] == 0) == (r["revised"] == r["original"])
    # round 1 checks every original token; each later round at most a whole response
    least = sum(len(r["original"]) for r in records)
    most = sum(len(r["original"]) + r["revisions"] * MAX_NEW for r in records)
    assert least < summary["tokens_checked"] <= most

    # stage 2: two warm-up steps on the revised responses changed the weights
    assert json.loads((regime / "warmup" / "done.json").read_text())["steps"] == 2
    assert [r["step"] for r in _lines(regime / "warmup" / "metrics.jsonl")] == [1, 2]
    assert not (regime / "warmup" / "checkpoints").exists()  # removed once the result is saved
    warmed = load_file(str(regime / "warmup" / "student.safetensors"))
    initial = _initial_student()
    assert any(not torch.equal(warmed[k], initial[k]) for k in initial)

    # resumed in stage 3: stages 1 and 2 are not repeated
    marker = regime / "revised.done.json"
    stamps = [marker.stat().st_mtime_ns, (regime / "warmup" / "done.json").stat().st_mtime_ns]
    caplog.set_level(logging.INFO, logger="kdlab")
    run_distill(load_config(cfg), resume=True)
    assert calls.take() == {"revise_responses": 0, "warm_up": 0}
    assert "stage 1 already done; skipping" in caplog.text
    assert "stage 2 already done; skipping" in caplog.text
    assert stamps[0] == marker.stat().st_mtime_ns
    assert stamps[1] == (regime / "warmup" / "done.json").stat().st_mtime_ns
    assert [r["step"] for r in _lines(tmp_path / "run" / "metrics.jsonl")] == [1, 2]
    final = load_file(str(tmp_path / "run" / "student" / "model.safetensors"))
    for key in initial:  # stage 3 started from the warmed-up student
        torch.testing.assert_close(final[key], warmed[key], rtol=0, atol=0)


def test_interrupted_after_stage_one_resumes_at_stage_two_with_preference(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:  # noqa: ANN001
    cfg = _config(tmp_path, tiny_teacher, "run", max_prompts=8, objective="preference")

    def killed(regime) -> None:  # noqa: ANN001
        raise RuntimeError("killed in stage 2")

    real_warm_up = wd.WarmupDistill.warm_up
    monkeypatch.setattr(wd.WarmupDistill, "warm_up", killed)
    with pytest.raises(RuntimeError, match="killed"):
        run_distill(load_config(cfg))
    regime = tmp_path / "run" / "regime"
    assert json.loads((regime / "revised.done.json").read_text())["sequences"] == 8
    assert not (regime / "warmup" / "done.json").exists()
    monkeypatch.setattr(wd.WarmupDistill, "warm_up", real_warm_up)
    calls = Calls(monkeypatch)
    caplog.set_level(logging.INFO, logger="kdlab")
    run_distill(load_config(cfg), resume=True)
    assert calls.take() == {"revise_responses": 0, "warm_up": 1}
    assert "stage 1 already done; skipping" in caplog.text
    assert (tmp_path / "run" / "student" / "model.safetensors").is_file()

    # the preference objective: DPO pairs (revised over original) against the starting student
    warm = regime / "warmup"
    assert json.loads((warm / "done.json").read_text())["objective"] == "preference"
    first = _lines(warm / "metrics.jsonl")[0]
    # step 1: the policy is the reference, every pair's loss is -log sigmoid(0) = log 2
    assert first["loss/preference"] == pytest.approx(math.log(2), abs=1e-6)
    warmed = load_file(str(warm / "student.safetensors"))
    initial = _initial_student()
    assert any(not torch.equal(warmed[k], initial[k]) for k in initial)
    # the student (the reference during the warm-up) is trainable again in stage 3
    assert _lines(tmp_path / "run" / "metrics.jsonl")[0]["grad_norm"] > 0


def test_stage_one_statistics_sum_the_chunks_and_a_lost_chunk_is_redone(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Greedy decoding: the records and totals equal `revise` run chunk by chunk by hand."""
    tokenizer = get_task("arith").build_tokenizer()
    student = build_preset("tiny", tokenizer, seed=0)
    teacher = build_preset("tiny", tokenizer, seed=123)
    prompts = [[1, 4, 6 + d % 10, 16, 6 + d // 10, 19, 5] for d in range(10)]
    sampling = Sampling(max_new_tokens=MAX_NEW, temperature=0, batch_size=4)
    context = RegimeContext(
        dataset=[Encoded(p, [False] * len(p), len(p)) for p in prompts],
        pad_id=0,
        batch_size=2,
        grad_accum=1,
        seed=0,
        eos_id=2,
        student=student,
        teacher=teacher,
        output_dir=tmp_path,
        sampling=sampling,
        options=wd.WarmupDistillOptions(max_revisions=MAX_REVISIONS),
    )
    regime = REGIMES.get("warmup_distill")(context)
    regime.revise_responses()
    expected, totals = {}, RevisionStats()
    for chunk in ([0, 1, 2, 3], [4, 5, 6, 7], [8, 9]):  # fill_store's chunks of 4
        rows = [prompts[i] for i in chunk]
        originals = generate(student, rows, pad_id=0, eos_id=2, sampling=sampling)
        result = revise(
            student=student,
            teacher=teacher,
            prompts=rows,
            completions=originals,
            choose=partial(first_low_probability, prob_threshold=0.1),
            rounds=MAX_REVISIONS,
            pad_id=0,
            eos_id=2,
            sampling=sampling,
        )
        totals.add(result.stats)
        for i, orig, new in zip(chunk, originals, result.completions, strict=True):
            expected[i] = (orig, new)
    records = regime.store.load()
    assert {i: (r["original"], r["revised"]) for i, r in records.items()} == expected
    summary = regime.store.summary()
    assert {k: summary[k] for k in totals.as_dict()} == totals.as_dict()
    assert totals.tokens_revised > 0

    # a run killed after the first chunk: only the two missing chunks are generated again
    part = tmp_path / "regime" / "revised.part0.jsonl"
    part.write_text("".join(part.read_text().splitlines(keepends=True)[:4]) + '{"index": 4, "ori')
    regime.store.marker.unlink()
    chunks = []
    real = wd.WarmupDistill._revise_chunk
    monkeypatch.setattr(
        wd.WarmupDistill, "_revise_chunk", lambda self, b: chunks.append(b) or real(self, b)
    )
    REGIMES.get("warmup_distill")(context).revise_responses()
    assert chunks == [[4, 5, 6, 7], [8, 9]]
    assert regime.store.summary() == summary


def test_dpo_pair_losses_against_the_formula() -> None:
    """DPO (Rafailov et al. 2023, eq. 7) by hand on two pairs with different token counts."""
    torch.manual_seed(0)
    policy = torch.randn(4, 3, 5)  # [B=4 rows = 2 pairs, T, V]
    reference = torch.randn(4, 3, 5)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100], [0, 4, 4], [2, 2, -100]])
    beta = 0.5

    def seq_logp(logits: torch.Tensor, row: int) -> float:
        lp = logits[row].double().log_softmax(-1)
        return sum(float(lp[t, y]) for t, y in enumerate(labels[row].tolist()) if y != -100)

    expected = []
    for w, lose in ((0, 1), (2, 3)):
        margin = (seq_logp(policy, w) - seq_logp(reference, w)) - (
            seq_logp(policy, lose) - seq_logp(reference, lose)
        )
        expected.append(math.log1p(math.exp(-beta * margin)))  # -log sigmoid(beta * margin)
    got = wd.dpo_pair_losses(policy, reference, labels, beta=beta)
    assert got.tolist() == pytest.approx(expected, abs=1e-5)
    # the reduction: each pair's loss on its counted positions (3 and 5), over all 8 positions
    value = wd.PreferenceLoss(beta=beta)(policy, reference, labels)
    assert float(value) == pytest.approx((3 * expected[0] + 5 * expected[1]) / 8, abs=1e-5)
    with pytest.raises(ValueError, match="pairs"):
        wd.dpo_pair_losses(policy[:3], reference[:3], labels[:3], beta=beta)


@pytest.mark.parametrize(
    ("override", "field"),
    [
        ("regime.prob_threshold=1.5", "prob_threshold"),
        ("regime.margin=-1", "margin"),
        ("regime.max_revisions=0", "max_revisions"),
        ("regime.warm_steps=0", "warm_steps"),
        ("regime.objective=dpo", "objective"),
        ("regime.preference_beta=0", "preference_beta"),
        ("regime.prob_threshold=0", "margin is off"),
        ("regime.warmup=3", "regime.warmup"),
    ],
)
def test_bad_options_are_config_errors(
    tmp_path: Path, tiny_teacher: Path, capsys, override: str, field: str
) -> None:  # noqa: ANN001
    cfg = _config(tmp_path, tiny_teacher, "bad")
    assert main(["distill", str(cfg), "--set", override]) == 2
    err = capsys.readouterr().err
    assert "config error" in err and field in err
    assert not (tmp_path / "bad").exists()  # nothing ran
