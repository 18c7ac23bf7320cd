"""Resumable storage for data a regime generates before training (seq_kd, Warmup-Distill).

Records are JSON lines `{"index": i, ...}` (one per training example), appended per process to
`<dir>/<name>.part<rank>.jsonl` and flushed to disk after every generation batch, so a killed run
loses at most the batch in flight: on restart only the missing indices are generated. A torn last
line (the process died mid-write) is ignored. When every process is done, the main process writes
`<name>.done.json` (statistics included) atomically; a finished store is never generated again.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("kdlab")

Record = dict[str, Any]


class RecordStore:
    """Per-example records of one generation job, resumable across runs and process counts.

    Args:
        directory: where the files live (created on first write).
        name: the job's name (file prefix), e.g. `teacher_completions`.
        rank: this process's index; each process appends to its own part file.
    """

    def __init__(self, directory: Path, name: str, *, rank: int = 0) -> None:
        self.directory = Path(directory)
        self.name = name
        self.rank = rank

    @property
    def marker(self) -> Path:
        return self.directory / f"{self.name}.done.json"

    def is_done(self) -> bool:
        return self.marker.is_file()

    def summary(self) -> dict[str, Any]:
        """What `finish` recorded (statistics); `{}` while unfinished."""
        return json.loads(self.marker.read_text()) if self.is_done() else {}

    def load(self) -> dict[int, Record]:
        """Every complete record of every process, by example index."""
        records: dict[int, Record] = {}
        for part in sorted(self.directory.glob(f"{self.name}.part*.jsonl")):
            for line in part.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:  # a torn last line from a killed writer
                    continue
                records[int(record["index"])] = record
        return records

    def append(self, records: Sequence[Record]) -> None:
        """Append records to this process's part file and flush them to disk."""
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.directory / f"{self.name}.part{self.rank}.jsonl"
        with path.open("a") as f:
            if f.tell() > 0 and not _ends_with_newline(path):
                f.write("\n")  # never glue a new record onto a torn line
            for record in records:
                f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the job done (main process, after every process finished its part)."""
        tmp = self.marker.with_suffix(".tmp")
        tmp.write_text(json.dumps(summary, indent=2))
        tmp.replace(self.marker)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def fill_store(
    store: RecordStore,
    indices: Sequence[int],
    make: Callable[[list[int]], list[Record]],
    *,
    chunk: int,
    desc: str,
    progress: bool = True,
) -> None:
    """Generate the records of `indices` that `store` lacks, `chunk` at a time, saving each chunk.

    `make(batch)` returns one record (with `"index"`) per index of `batch`.
    """
    have = store.load()
    missing = [i for i in indices if i not in have]
    if len(missing) < len(indices):
        logger.info(
            "%s: %d of %d already done; resuming", desc, len(indices) - len(missing), len(indices)
        )
    bar = tqdm(
        total=len(indices),
        initial=len(indices) - len(missing),
        desc=desc,
        unit="seq",
        disable=not progress,
    )
    for start in range(0, len(missing), chunk):
        batch = missing[start : start + chunk]
        store.append(make(batch))
        bar.update(len(batch))
    bar.close()
