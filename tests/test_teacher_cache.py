"""The offline teacher cache: writing, reading, resuming, checksums, mismatches, training."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conftest import CONFIGS
from kdlab.config import ConfigError, from_dict
from kdlab.data.collate import collate
from kdlab.pipeline import load_everything, run_cache_teacher, run_distill
from kdlab.teachers.cache import CacheError, TeacherCache, sampled_rows, top_k_rows
from kdlab.teachers.cached import CachedTeacher

VOCAB = 21  # the arith tokenizer: 6 special tokens + 15 characters


def cache_config(teacher: Path, out: Path, **cache: object) -> dict:
    return {
        "teacher": {"model": str(teacher)},
        "data": {"dataset": "task:arith", "num_examples": 24},
        "cache": {"path": str(out), "k": 4, "shard_examples": 10, "batch_size": 4, **cache},
        "eval": {"num_examples": 8},
    }


def student_config(cache: Path, out: Path, **sections: dict) -> dict:
    raw = {
        "teacher": {"cache": str(cache)},
        "student": {"model": "preset:tiny"},
        "data": {"dataset": "task:arith", "num_examples": 24},
        "loss": {"name": "fkl"},
        "train": {"max_steps": 2, "batch_size": 6, "lr": 1e-3, "progress": False},
        "eval": {"enabled": False, "num_examples": 8},
        "output_dir": str(out),
    }
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


@pytest.fixture(scope="module")
def cache_k4(tiny_teacher: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "k4"
    run_cache_teacher(from_dict(cache_config(tiny_teacher, out)))
    return out


def teacher_log_probs(teacher: Path, batch: dict) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(teacher).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return torch.log_softmax(logits.float(), -1)


def first_batch(config: dict) -> dict:
    loaded = load_everything(from_dict(config))
    return collate(loaded.train[:5], loaded.tokenizer.pad_token_id), loaded


# ---------------------------------------------------------------------------- rows


def test_top_k_rows_keep_the_top_tokens_the_label_and_the_tail() -> None:
    torch.manual_seed(0)
    logits = torch.randn(50, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (50,))
    rows = top_k_rows(logits, labels, k=4)
    log_p = torch.log_softmax(logits, -1)
    assert torch.equal(rows.ids, log_p.topk(4, -1).indices)
    assert torch.allclose(rows.log_probs[:, :4], log_p.gather(-1, rows.ids))
    listed = (rows.ids == labels[:, None]).any(-1)
    label_value = log_p.gather(-1, labels[:, None]).squeeze(-1)
    assert torch.all(rows.log_probs[listed, 4] == float("-inf"))
    assert torch.allclose(rows.log_probs[~listed, 4], label_value[~listed])
    # the S + 2 buckets hold all the mass
    assert torch.allclose(rows.log_probs.logsumexp(-1), torch.zeros(50), atol=1e-5)


def test_sampled_rows_are_unbiased_and_keep_the_label_exact() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, VOCAB) * 2
    labels = torch.tensor([3])
    probs = torch.softmax(logits, -1)[0]
    generator = torch.Generator().manual_seed(0)
    trials = 4000
    estimate = torch.zeros(VOCAB)
    for _ in range(trials):
        rows = sampled_rows(logits, labels, k=4, generator=generator)
        weights = rows.log_probs[0].exp()
        assert math.isclose(float(weights[4]), float(probs[3]), rel_tol=1e-6)  # exact label
        assert float(weights[5]) == 0.0  # no tail mass
        assert math.isclose(float(weights.sum()), 1.0, rel_tol=1e-5)
        estimate.index_add_(0, rows.ids[0], weights[:4])
    estimate = estimate / trials
    estimate[3] += probs[3]  # the label's exact bucket
    # each weight is (1 - p_y)/k per draw: standard error <= sqrt(p (1 - p_y) / (k · trials))
    stderr = (probs * (1 - probs[3]) / (4 * trials)).sqrt()
    assert torch.all((estimate - probs).abs() <= 5 * stderr + 1e-6), estimate - probs


def test_sampled_rows_with_every_token_keep_the_label_in_its_slot() -> None:
    torch.manual_seed(1)
    logits = torch.randn(5, VOCAB)
    labels = torch.randint(0, VOCAB, (5,))
    rows = sampled_rows(logits, labels, k=VOCAB, generator=torch.Generator().manual_seed(0))
    probs = torch.softmax(logits, -1)
    slot = rows.ids == labels[:, None]
    assert torch.equal(slot.sum(-1), torch.ones(5, dtype=torch.long))  # the label is a filler
    assert torch.allclose(
        rows.log_probs[:, :VOCAB][slot].exp(), probs.gather(-1, labels[:, None])[:, 0]
    )
    assert torch.all(rows.log_probs[:, VOCAB] == float("-inf"))  # no separate label bucket
    assert torch.allclose(rows.log_probs.exp().sum(-1), torch.ones(5), atol=1e-5)


# ---------------------------------------------------------------------------- write and read


def test_round_trip_matches_the_teacher_within_the_quantisation_bound(
    cache_k4: Path, tiny_teacher: Path, tmp_path: Path
) -> None:
    meta = json.loads((cache_k4 / "meta.json").read_text())
    assert meta["k"] == 4 and meta["vocab"] == VOCAB and meta["mode"] == "top_k"
    assert meta["num_positions"] == sum(s["positions"] for s in meta["shards"]) > 0
    assert len(meta["shards"]) == 3  # 24 examples, 10 per shard
    batch, _ = first_batch(student_config(cache_k4, tmp_path / "run"))
    signal = CachedTeacher(TeacherCache(cache_k4)).signal(batch).sparse
    log_p = teacher_log_probs(tiny_teacher, batch)
    keep = batch["labels"] != -100
    ids, stored = signal.ids[keep], signal.log_probs[keep]
    truth = log_p[keep]
    bound = TeacherCache(cache_k4).codec.max_log_error + 1e-6
    assert torch.equal(ids.sort(-1).values, truth.topk(4, -1).indices.sort(-1).values)
    assert torch.all((stored[:, :4] - truth.gather(-1, ids)).abs() <= bound)
    exact = top_k_rows(truth, batch["labels"][keep], 4)  # log-probs in, same top-k out
    assert torch.all((stored[:, 5] - exact.log_probs[:, 5]).abs() <= bound)


def test_run_from_cache_equals_online_teacher_when_every_token_is_stored(
    tiny_teacher: Path, tmp_path: Path
) -> None:
    cache = tmp_path / "full"
    run_cache_teacher(from_dict(cache_config(tiny_teacher, cache, k=64, value_bits=8)))
    assert json.loads((cache / "meta.json").read_text())["k"] == VOCAB  # k capped at V
    cached = student_config(cache, tmp_path / "cached", train={"max_steps": 3})
    online = {**cached, "teacher": {"model": str(tiny_teacher)}, "output_dir": str(tmp_path / "o")}
    losses = {}
    for name, config in (("cached", cached), ("online", online)):
        run_distill(from_dict(config))
        records = (Path(config["output_dir"]) / "metrics.jsonl").read_text().splitlines()
        losses[name] = [json.loads(r)["loss"] for r in records]
    # KL(p̂‖q) − KL(p‖q) with |log p̂ − log p| <= 2ε after renormalisation: at most
    # 2ε + (e^{2ε} − 1)·Σ p |log p/q|; the values here are ~0.05 nats, ε = 0.031
    eps = TeacherCache(cache).codec.max_log_error
    for a, b in zip(losses["cached"], losses["online"], strict=True):
        assert abs(a - b) <= 2 * eps * (1 + 2 * b), (losses["cached"], losses["online"])
    assert losses["cached"] != losses["online"]  # the quantised run is not the same run


def test_a_killed_writer_resumes_keeping_finished_shards(
    tiny_teacher: Path, cache_k4: Path, tmp_path: Path
) -> None:
    out = tmp_path / "partial"
    config = from_dict(cache_config(tiny_teacher, out))
    with pytest.raises(KeyboardInterrupt):
        run_cache_teacher(config, stop_after_shards=1)
    assert not (out / "meta.json").exists()
    first = out / "shard-00000.safetensors"
    assert first.is_file() and (out / "shard-00000.json").is_file()
    (out / "shard-00001.safetensors").write_bytes(b"half a shard")  # killed mid-write
    stamp = first.stat().st_mtime_ns
    meta = run_cache_teacher(config)
    assert first.stat().st_mtime_ns == stamp  # kept, not rewritten
    reference = json.loads((cache_k4 / "meta.json").read_text())
    assert [s["sha256"] for s in meta["shards"]] == [s["sha256"] for s in reference["shards"]]
    TeacherCache(out)  # verifies every checksum


def test_a_finished_cache_is_reused_only_for_the_same_settings(
    tiny_teacher: Path, cache_k4: Path
) -> None:
    stamp = (cache_k4 / "meta.json").stat().st_mtime_ns
    assert run_cache_teacher(from_dict(cache_config(tiny_teacher, cache_k4)))["k"] == 4
    assert (cache_k4 / "meta.json").stat().st_mtime_ns == stamp  # nothing rewritten
    with pytest.raises(CacheError, match="finished teacher cache.*mode"):
        run_cache_teacher(from_dict(cache_config(tiny_teacher, cache_k4, mode="sample")))


def test_a_folder_with_another_plan_is_refused(tiny_teacher: Path, cache_k4: Path) -> None:
    (cache_k4 / "meta.json").rename(cache_k4 / "meta.json.bak")
    try:
        with pytest.raises(CacheError, match="other settings.*k"):
            run_cache_teacher(from_dict(cache_config(tiny_teacher, cache_k4, k=5)))
    finally:
        (cache_k4 / "meta.json.bak").rename(cache_k4 / "meta.json")


def test_a_corrupt_shard_is_named(cache_k4: Path, tmp_path: Path) -> None:
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(cache_k4, copy)
    shard = copy / "shard-00001.safetensors"
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match="shard-00001.safetensors is corrupt"):
        TeacherCache(copy)
    config = from_dict(student_config(copy, tmp_path / "run"))
    with pytest.raises(CacheError, match="shard-00001"):
        run_distill(config)
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_an_unfinished_cache_is_refused_with_the_fix(tmp_path: Path) -> None:
    (tmp_path / "plan.json").write_text("{}")
    with pytest.raises(CacheError, match="unfinished.*cache-teacher"):
        TeacherCache(tmp_path)


# ---------------------------------------------------------------------------- mismatches


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"data": {"dataset": "task:oracle"}}, "another tokenizer"),
        ({"data": {"num_examples": 30}}, "another dataset"),
        ({"data": {"max_length": 200}}, "max_length=256"),
        ({"teacher": {"k": 8}}, "k=4"),
    ],
    ids=["tokenizer", "dataset", "max_length", "k"],
)
def test_a_cache_that_does_not_fit_the_run_is_refused_before_training(
    cache_k4: Path, tmp_path: Path, change: dict, message: str
) -> None:
    config = from_dict(student_config(cache_k4, tmp_path / "run", **change))
    with pytest.raises(CacheError, match=message):
        run_distill(config)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_a_student_vocabulary_smaller_than_the_cache_is_refused(cache_k4: Path) -> None:
    from kdlab.teachers.cached import check_cache_vocab

    with pytest.raises(CacheError, match="vocabulary of 21 tokens.*only 20"):
        check_cache_vocab(TeacherCache(cache_k4), 20)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"loss": {"name": "pld"}}, "pld.*ranks the whole vocabulary"),
        ({"loss": {"name": "sinkd"}}, "sinkd.*cannot train from a sparse"),
        ({"regime": {"name": "on_policy"}}, "on_policy.*not in the dataset"),
        ({"teacher": {"model": "preset:teacher"}}, "exactly one of teacher.model"),
    ],
    ids=["pld", "sinkd", "on_policy", "model-and-cache"],
)
def test_what_cannot_use_a_cache_is_refused_at_configuration(
    tmp_path: Path, change: dict, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        from_dict(student_config(tmp_path / "cache", tmp_path / "run", **change))


# ---------------------------------------------------------------------------- end to end


def test_sample_mode_cache_trains(tiny_teacher: Path, tmp_path: Path) -> None:
    cache = tmp_path / "sampled"
    meta = run_cache_teacher(from_dict(cache_config(tiny_teacher, cache, mode="sample")))
    assert meta["mode"] == "sample"
    summary = run_distill(from_dict(student_config(cache, tmp_path / "run")))
    assert summary.steps == 2 and math.isfinite(summary.final_loss)
    # reverse KL would ignore every undrawn token (their teacher weight is 0): refused early
    refused = from_dict(student_config(cache, tmp_path / "rkl", loss={"name": "rkl"}))
    with pytest.raises(ConfigError, match="rkl.*random-sampling cache"):
        run_distill(refused)
    assert not (tmp_path / "rkl" / "metrics.jsonl").exists()


def test_example_cache_configs_run(tiny_teacher: Path, tmp_path: Path) -> None:
    from kdlab.cli import main

    cache = tmp_path / "cache"
    small = ["--set", "data.num_examples=24", "--set", f"cache.path={cache}"]
    assert main(["cache-teacher", str(CONFIGS / "cache" / "arith.yaml"),
                 "--set", f"teacher.model={tiny_teacher}", *small]) == 0  # fmt: skip
    meta = json.loads((cache / "meta.json").read_text())
    assert meta["k"] == 8 and meta["num_positions"] > 0
    assert meta["bytes_per_entry"] <= 2.5
    student = [
        "--set", f"teacher.cache={cache}", "--set", "student.model=preset:tiny",
        "--set", "data.num_examples=24", "--set", "train.max_steps=2",
        "--set", "train.batch_size=6", "--set", "eval.enabled=false",
        "--set", "train.progress=false", "--set", f"output_dir={tmp_path / 'run'}",
    ]  # fmt: skip
    assert main(["distill", str(CONFIGS / "cache" / "arith-student.yaml"), *student]) == 0
    assert (tmp_path / "run" / "student" / "config.json").is_file()


def test_auto_value_bits_meet_the_budget_at_k64_and_keep_six_bits_at_least() -> None:
    from kdlab.teachers.cache import TRAILING, auto_value_bits
    from kdlab.teachers.codec import Codec

    for vocab, bits in ((32000, 8), (128256, 6), (151936, 6)):
        assert auto_value_bits(vocab, 64) == bits
        assert Codec(vocab, 64, bits, trailing=TRAILING).bytes_per_position <= 160
        if bits < 8:  # one bit more would not fit
            assert Codec(vocab, 64, bits + 1, trailing=TRAILING).bytes_per_position > 160
    # at k = 8 nothing of 6 bits or more fits 2.5 bytes per entry: precision wins
    assert auto_value_bits(151936, 8) == 6
