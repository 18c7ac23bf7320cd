"""The same `kdlab distill` under `accelerate launch --multi_gpu --num_processes 2` on CPU.

Without GPUs accelerate's launcher needs `--multi_gpu` to start torchrun (its `--cpu` path wants
MPI); kdlab then runs DDP over gloo on the CPU.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from conftest import write_config


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


def _launch_two(config: Path) -> subprocess.CompletedProcess:
    """`accelerate launch --multi_gpu --num_processes 2 -m kdlab distill CONFIG` on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "-m",
        "kdlab",
        "distill",
        str(config),
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path: Path, tiny_teacher: Path) -> None:
    """2 processes x batch 4 see the same global batch as 1 process x batch 8: same losses.

    The two-process run also uses the chunked loss (lm_head gradients through DDP), the
    one-process run the plain logits path.
    """
    common = {"eval": {"enabled": False}}
    two = write_config(
        tmp_path / "two.yaml",
        tiny_teacher,
        # the chunked loss under DDP must match the plain loss of one process
        train={"batch_size": 4, "max_steps": 3, "progress": False, "chunked": True},
        output_dir=str(tmp_path / "two"),
        **common,
    )
    proc = _launch_two(two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "student" / "config.json").is_file()
    one = write_config(
        tmp_path / "one.yaml",
        tiny_teacher,
        train={"batch_size": 8, "max_steps": 3, "progress": False},
        output_dir=str(tmp_path / "one"),
        **common,
    )
    from kdlab.config import load_config
    from kdlab.pipeline import run_distill

    run_distill(load_config(one))
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)


@pytest.mark.slow
def test_generating_regime_keeps_each_process_state(tmp_path: Path, tiny_teacher: Path) -> None:
    """`adaptive` under two processes: the student samples on every process (generation under
    DDP), each process fills its own replay buffer, and the checkpoint keeps both buffers."""
    config = write_config(
        tmp_path / "adaptive.yaml",
        tiny_teacher,
        regime={"name": "adaptive", "init_threshold": 1.0, "generation": {"max_new_tokens": 5}},
        train={"batch_size": 4, "max_steps": 2, "progress": False},
        eval={"enabled": False, "num_examples": 8},
        output_dir=str(tmp_path / "run"),
    )
    proc = _launch_two(config)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (checkpoint,) = (tmp_path / "run" / "checkpoints").iterdir()
    states = json.loads((checkpoint / "trainer_state.json").read_text())["regime"]
    assert len(states) == 2  # one state per process
    buffers = [state["buffer"] for state in states]
    assert all(len(b) == 2 * 4 for b in buffers)  # two fresh steps of 4 samples each
    assert buffers[0] != buffers[1]  # each process sampled for its own prompts
    records = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(r)["regime/source"] for r in records] == [1.0, 1.0]  # fresh samples


@pytest.mark.slow
def test_two_processes_train_from_a_cache_like_one(tmp_path: Path, tiny_teacher: Path) -> None:
    """Each process finds its own batch rows in the cache: same losses as one process."""
    from kdlab.config import from_dict, load_config
    from kdlab.pipeline import run_cache_teacher, run_distill

    cache = tmp_path / "cache"
    run_cache_teacher(
        from_dict(
            {
                "teacher": {"model": str(tiny_teacher)},
                "data": {"dataset": "task:arith", "num_examples": 64},
                "cache": {"path": str(cache), "k": 4},
            }
        )
    )
    runs = {}
    for name, batch in (("two", 4), ("one", 8)):
        runs[name] = write_config(
            tmp_path / f"{name}.yaml",
            None,
            train={"batch_size": batch, "max_steps": 3, "progress": False},
            output_dir=str(tmp_path / name),
            eval={"enabled": False},
        )
        raw = yaml.safe_load(runs[name].read_text())
        runs[name].write_text(yaml.safe_dump({**raw, "teacher": {"cache": str(cache)}}))
    proc = _launch_two(runs["two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_distill(load_config(runs["one"]))
    assert _losses(tmp_path / "two") == pytest.approx(_losses(tmp_path / "one"), rel=1e-4)
