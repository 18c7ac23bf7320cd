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

from conftest import write_config


def _losses(run: Path) -> list[float]:
    return [json.loads(x)["loss"] for x in (run / "metrics.jsonl").read_text().splitlines()]


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
        str(two),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
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
