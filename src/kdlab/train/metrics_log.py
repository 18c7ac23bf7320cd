"""Step metrics to `metrics.jsonl`, the console and (when asked) accelerate's trackers."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger("kdlab")

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """Appends one JSON line per logged step; on resume, drops lines after the resumed step."""

    def __init__(self, output_dir: Path, *, enabled: bool = True) -> None:
        self.path = output_dir / METRICS_FILE
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        if not self.enabled or not self.path.is_file():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")


def read_metrics(output_dir: Path) -> list[dict[str, Any]]:
    path = Path(output_dir) / METRICS_FILE
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def curve(records: list[dict[str, Any]], key: str) -> list[tuple[int, float]]:
    """`(step, value)` of the records that hold `key` (evaluations are logged every few steps,
    and step 0 holds only the evaluation before training)."""
    return [(r["step"], r[key]) for r in records if key in r]


def format_record(record: dict[str, Any]) -> str:
    parts = [f"step {record['step']}"]
    for key, value in record.items():
        if key == "step":
            continue
        parts.append(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}")
    return " | ".join(parts)
