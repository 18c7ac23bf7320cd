"""The seq_kd regime: teacher completions generated once, stored, trained on, reused on resume."""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

import kdlab.regimes.seq_kd as seq_kd_module  # registers "seq_kd"
from conftest import CONFIGS, run_example_config, write_config
from kdlab.cli import main
from kdlab.config import ConfigError, DataSpec, from_dict, load_config
from kdlab.data.datasets import encode_dataset
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.models.generation import Sampling, generate
from kdlab.models.tiny import build_preset
from kdlab.pipeline import run_distill
from kdlab.regimes import REGIMES, RegimeContext
from kdlab.regimes.base import prompt_of
from kdlab.tasks import get_task
from kdlab.train.trainer import RunInterrupted

MAX_NEW = 6


@pytest.fixture(scope="module")
def teacher(tiny_teacher: Path) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(tiny_teacher).eval()


def _data(n: int, seed: int = 1234) -> tuple[list, int, int]:
    task = get_task("arith")
    tokenizer = task.build_tokenizer()
    spec = DataSpec(seed=seed)
    encoded = encode_dataset(tokenizer, task.make_examples(n, seed=seed), spec)
    return encoded, tokenizer.pad_token_id, tokenizer.eos_token_id


def _regime(teacher, out: Path, dataset, pad_id, eos_id, *, ranks=(0, 1), barrier=None, **kw):  # noqa: ANN001, ANN202
    """A seq_kd regime on a tiny teacher; `ranks` = (rank, world_size); `kw`: its options."""
    sampling = Sampling(max_new_tokens=MAX_NEW, batch_size=4, backend=kw.pop("backend", "hf"))
    options = seq_kd_module.SeqKDOptions(**kw)
    ctx = RegimeContext(
        rank=ranks[0],
        world_size=ranks[1],
        barrier=barrier or (lambda: None),
        dataset=dataset,
        pad_id=pad_id,
        eos_id=eos_id,
        batch_size=3,
        grad_accum=2,
        seed=0,
        teacher=teacher,
        output_dir=out,
        sampling=sampling,
        options=options,
    )
    return REGIMES.get("seq_kd")(ctx)


def _greedy(teacher, prompts, pad_id, eos_id) -> list[list[int]]:  # noqa: ANN001
    sampling = Sampling(max_new_tokens=MAX_NEW, temperature=0.0, batch_size=len(prompts))
    return generate(teacher, prompts, pad_id=pad_id, eos_id=eos_id, sampling=sampling)


def test_batches_hold_exactly_the_teachers_greedy_completions(teacher, tmp_path: Path) -> None:  # noqa: ANN001
    dataset, pad_id, eos_id = _data(10)
    regime = _regime(teacher, tmp_path, dataset, pad_id, eos_id)
    regime.prepare()
    # the reference: the teacher decoding each prompt greedily, all in one call
    prompts = [prompt_of(e) for e in dataset]
    expected = {
        tuple(p): c for p, c in zip(prompts, _greedy(teacher, prompts, pad_id, eos_id), strict=True)
    }
    differs = 0
    for step in range(3):
        for batch in regime.micro_batches(step):
            for ids, labels in zip(batch["input_ids"], batch["labels"], strict=True):
                counted = (labels != IGNORE_INDEX).nonzero().flatten()
                prompt = ids[: int(counted[0]) + 1].tolist()  # position i predicts token i + 1
                assert labels[counted].tolist() == expected[tuple(prompt)]
                dataset_completion = next(
                    e.input_ids[e.prompt_length :] for e in dataset if prompt_of(e) == prompt
                )
                differs += labels[counted].tolist() != dataset_completion
    assert differs > 0  # the dataset's completions were replaced
    summary = json.loads((tmp_path / "regime" / "teacher_completions.done.json").read_text())
    lengths = [len(c) for c in expected.values()]
    assert summary["sequences"] == 10 and summary["tokens"] == sum(lengths)
    assert summary["mean_length"] == pytest.approx(sum(lengths) / 10)
    ended = sum(c[-1] == eos_id for c in expected.values())
    assert summary["eos_share"] == pytest.approx(ended / 10)


def test_two_processes_split_the_prompts_and_share_the_store(teacher, tmp_path: Path) -> None:  # noqa: ANN001
    """Two ranks as two threads with a real barrier: each generates its half, rank 0 finishes."""
    dataset, pad_id, eos_id = _data(10)
    barrier = threading.Barrier(2, timeout=120)
    regimes = []
    for rank in (0, 1):
        out = tmp_path / "two"
        regimes.append(
            _regime(teacher, out, dataset, pad_id, eos_id, ranks=(rank, 2), barrier=barrier.wait)
        )
    errors: list[BaseException] = []

    def prepare(regime) -> None:  # noqa: ANN001
        try:
            regime.prepare()
        except BaseException as err:  # noqa: BLE001  (re-raised below)
            errors.append(err)
            barrier.abort()

    threads = [threading.Thread(target=prepare, args=(r,)) for r in regimes]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    store = tmp_path / "two" / "regime"
    for rank in (0, 1):
        lines = (store / f"teacher_completions.part{rank}.jsonl").read_text().splitlines()
        assert sorted(json.loads(x)["index"] for x in lines) == list(range(rank, 10, 2))
    assert json.loads((store / "teacher_completions.done.json").read_text())["sequences"] == 10
    single = _regime(teacher, tmp_path / "one", dataset, pad_id, eos_id)
    single.prepare()
    assert regimes[0].train_set == regimes[1].train_set == single.train_set


def test_a_killed_generation_resumes_with_the_missing_prompts(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    dataset, pad_id, eos_id = _data(10)
    generated: list[int] = []

    def dying(model, prompts, **kw):  # noqa: ANN001, ANN202
        if generated:  # the second chunk: the process is killed
            raise KeyboardInterrupt
        generated.append(len(prompts))
        return generate(model, prompts, **kw)

    monkeypatch.setattr(seq_kd_module, "generate", dying)
    with pytest.raises(KeyboardInterrupt):
        _regime(teacher, tmp_path, dataset, pad_id, eos_id).prepare()
    assert generated == [4]  # one chunk of generation.batch_size prompts was saved
    assert not (tmp_path / "regime" / "teacher_completions.done.json").exists()

    counted: list[int] = []

    def counting(model, prompts, **kw):  # noqa: ANN001, ANN202
        counted.append(len(prompts))
        return generate(model, prompts, **kw)

    monkeypatch.setattr(seq_kd_module, "generate", counting)
    regime = _regime(teacher, tmp_path, dataset, pad_id, eos_id)
    regime.prepare(resume=True)
    assert sum(counted) == 6  # only the prompts the killed run had not finished
    reference = _greedy(teacher, [prompt_of(e) for e in dataset], pad_id, eos_id)
    assert [e.input_ids[e.prompt_length :] for e in regime.train_set] == reference


def test_changed_data_is_refused_on_resume(teacher, tmp_path: Path) -> None:  # noqa: ANN001
    dataset, pad_id, eos_id = _data(6)
    _regime(teacher, tmp_path, dataset, pad_id, eos_id).prepare()
    other, _, _ = _data(6, seed=99)
    with pytest.raises(ValueError, match="training data changed"):
        _regime(teacher, tmp_path, other, pad_id, eos_id).prepare(resume=True)


def test_sampling_instead_of_greedy_uses_the_generation_settings(teacher, tmp_path: Path) -> None:  # noqa: ANN001
    dataset, pad_id, eos_id = _data(8)
    greedy = _regime(teacher, tmp_path / "g", dataset, pad_id, eos_id)
    sampled = _regime(teacher, tmp_path / "s", dataset, pad_id, eos_id, greedy=False)
    assert greedy.sampling.temperature == 0.0 and sampled.sampling.temperature == 1.0
    greedy.prepare()
    sampled.prepare()
    g = [e.input_ids for e in greedy.train_set]
    s = [e.input_ids for e in sampled.train_set]
    assert g != s  # a random tiny teacher's samples differ from its argmax path
    stored = json.loads((tmp_path / "s" / "regime" / "teacher_completions.done.json").read_text())
    assert stored["settings"]["greedy"] is False and stored["settings"]["temperature"] == 1.0


def test_backend_choice_and_a_clear_error_without_vllm(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    resolve = seq_kd_module.resolve_backend
    monkeypatch.setattr(seq_kd_module, "vllm_available", lambda: False)
    assert resolve(Sampling(backend="auto"), teacher, 1) == "hf"
    assert resolve(Sampling(backend="hf"), teacher, 1) == "hf"
    with pytest.raises(ValueError, match="needs vLLM installed"):
        resolve(Sampling(backend="vllm"), teacher, 1)
    monkeypatch.setattr(seq_kd_module, "vllm_available", lambda: True)
    assert resolve(Sampling(backend="auto"), teacher, 1) == "vllm"
    assert resolve(Sampling(backend="auto"), teacher, 2) == "hf"  # one vLLM engine per run only
    in_memory = build_preset("tiny", get_task("arith").build_tokenizer())  # no checkpoint path
    assert resolve(Sampling(backend="auto"), in_memory, 1) == "hf"
    with pytest.raises(ValueError, match="built in memory"):
        resolve(Sampling(backend="vllm"), in_memory, 1)


def test_the_vllm_path_is_built_from_the_teachers_folder(
    teacher, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:  # noqa: ANN001
    """No vLLM here: a stand-in records how the regime drives `VLLMGenerator`."""
    made: list[tuple[str, dict]] = []

    class FakeVLLM:
        def __init__(self, path: str, **kw) -> None:  # noqa: ANN003
            made.append((path, kw))

        def generate(self, prompts, *, eos_id, sampling, seed):  # noqa: ANN001, ANN202
            assert sampling.temperature == 0.0 and eos_id  # greedy, with the eos ids
            return [[7, len(p)] for p in prompts]

    monkeypatch.setattr(seq_kd_module, "vllm_available", lambda: True)
    monkeypatch.setattr(seq_kd_module, "VLLMGenerator", FakeVLLM)
    monkeypatch.setattr(seq_kd_module, "generate", None)  # the HF path must not run
    dataset, pad_id, eos_id = _data(5)
    regime = _regime(teacher, tmp_path, dataset, pad_id, eos_id, backend="auto")
    regime.prepare()
    assert [path for path, _ in made] == [teacher.name_or_path]
    assert made[0][1] == {"dtype": "float32"}
    assert [e.input_ids[e.prompt_length :] for e in regime.train_set] == [
        [7, e.prompt_length] for e in dataset
    ]


def test_options_are_validated() -> None:
    assert from_dict({"regime": {"name": "seq_kd", "greedy": False}}).regime.options == {
        "greedy": False
    }
    with pytest.raises(ConfigError, match="regime.greedy"):
        from_dict({"regime": {"name": "seq_kd", "greedy": 2}})
    with pytest.raises(ConfigError, match="regime.beam"):
        from_dict({"regime": {"name": "seq_kd", "beam": 4}})


def test_resumed_run_reuses_the_stored_completions(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # noqa: ANN001
    regime = {"name": "seq_kd", "generation": {"max_new_tokens": MAX_NEW, "backend": "hf"}}
    cfg = write_config(
        tmp_path / "run.yaml",
        tiny_teacher,
        regime=regime,
        data={"num_examples": 16},
        train={"max_steps": 4, "batch_size": 4},
        eval={"enabled": False},
    )
    with pytest.raises(RunInterrupted):
        run_distill(load_config(cfg), stop_after=2)
    store = tmp_path / "run" / "regime"
    files = {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.iterdir()}
    assert set(files) == {"teacher_completions.part0.jsonl", "teacher_completions.done.json"}
    calls: list[int] = []
    monkeypatch.setattr(seq_kd_module, "generate", lambda *a, **k: calls.append(1))
    assert main(["distill", str(cfg), "--resume"]) == 0
    assert calls == []  # nothing regenerated
    assert {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in store.iterdir()} == files
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    # a fresh run of this config in a used folder is refused (the regime/ folder is there)
    capsys.readouterr()
    assert main(["distill", str(cfg)]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_vllm_backend_without_vllm_fails_before_generating(
    tmp_path: Path, tiny_teacher: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:  # noqa: ANN001
    monkeypatch.setattr(seq_kd_module, "vllm_available", lambda: False)
    regime = {"name": "seq_kd", "generation": {"max_new_tokens": MAX_NEW, "backend": "vllm"}}
    cfg = write_config(tmp_path / "run.yaml", tiny_teacher, regime=regime, eval={"enabled": False})
    assert main(["distill", str(cfg)]) == 2
    assert "needs vLLM installed" in capsys.readouterr().err
    assert not (tmp_path / "run" / "regime").exists()


def test_example_config_runs(tmp_path: Path, tiny_teacher: Path) -> None:
    records = run_example_config(CONFIGS / "regimes" / "seq_kd.yaml", tiny_teacher, tmp_path / "r")
    assert [r["step"] for r in records] == [1, 2]
    assert all(r["loss"] == r["loss"] and r["tokens"] > 0 for r in records)
    done = json.loads((tmp_path / "r" / "regime" / "teacher_completions.done.json").read_text())
    assert done["sequences"] == 24 and done["settings"]["greedy"] is True


def test_needs_the_teacher_model() -> None:
    dataset, pad_id, eos_id = _data(3)
    ctx = RegimeContext(dataset, pad_id, 2, 1, seed=0, output_dir=Path("unused"))
    with pytest.raises(ValueError, match="needs a teacher model"):
        REGIMES.get("seq_kd")(dataclasses.replace(ctx, options=seq_kd_module.SeqKDOptions()))
