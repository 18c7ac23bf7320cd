"""The offline teacher cache: files, fingerprints, writing (resumable) and reading (checked).

A cache is a folder:

    plan.json                  what is being written (settings + fingerprints); written first
    shard-00000.safetensors    codes [P, bytes] uint8, counts [E], keys [E], examples [E] int64
    shard-00000.json           the shard's sha256, examples and positions; written after it
    ...
    meta.json                  the finished cache (plan + shards + num_positions); written last

Each shard holds `shard_examples` consecutive dataset examples. Shards and their JSON files are
written to a temporary name and renamed into place, so a killed writer leaves either a finished
shard or nothing; a second run with the same plan keeps the finished shards and redoes the rest.
Every file is safetensors or JSON, never pickle.

Per counted position (`labels != -100`, the positions the loss uses) a row of `Codec` bytes holds
the stored token ids, their log-probabilities, the ground-truth token's log-probability when it is
not among them, and the log of the remaining mass (see `kdlab.losses.sparse`). Rows are found by a
key hashed from an example's token ids and labels, so any batch of dataset examples, in any order
and padding, finds its rows.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.data.collate import Encoded, collate
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.teachers.codec import Codec, fitting_value_bits

logger = logging.getLogger("kdlab")

FORMAT = "kdlab-teacher-cache/1"
META, PLAN = "meta.json", "plan.json"
ROWS_PER_CHUNK = 1024  # positions whose full-vocabulary rows are processed together
TRAILING = 2  # values per row after the k ids: the ground-truth token's, the tail's
BUDGET_BYTES_PER_ENTRY = 2.5  # `cache.value_bits: auto` keeps a row within this ...
MIN_AUTO_BITS = 6  # ... but never below 6 bits (error <= 0.13 nats): small k may pass it


def auto_value_bits(vocab: int, k: int, log_floor: float = 16.0) -> int:
    """`cache.value_bits: auto`: the most bits (<= 8) within 2.5 bytes per entry, at least 6."""
    fitting = fitting_value_bits(vocab, k, BUDGET_BYTES_PER_ENTRY, log_floor, trailing=TRAILING)
    return max(MIN_AUTO_BITS, fitting)


class CacheError(ValueError):
    """A cache that is missing, corrupt, or does not fit the run; the message names the fix."""


# ---------------------------------------------------------------------------- fingerprints


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """sha256 of the token -> id table and the special tokens."""
    table = sorted(tokenizer.get_vocab().items())
    special = sorted((k, str(v)) for k, v in tokenizer.special_tokens_map.items())
    return _sha256(json.dumps([table, special], ensure_ascii=False).encode())


def dataset_fingerprint(examples: Sequence[Encoded]) -> str:
    """sha256 of every example's token ids and counted-token mask, in order."""
    digest = hashlib.sha256()
    for e in examples:
        digest.update(torch.tensor(e.input_ids, dtype=torch.int32).numpy().tobytes())
        digest.update(torch.tensor(e.counted, dtype=torch.bool).numpy().tobytes())
    return digest.hexdigest()


def example_key(input_ids: Tensor, labels: Tensor) -> int:
    """A 63-bit key of one unpadded row (`[n]` ids and their aligned labels)."""
    data = input_ids.to(torch.int32).cpu().numpy().tobytes()
    data += labels.to(torch.int32).cpu().numpy().tobytes()
    return int.from_bytes(hashlib.blake2b(data, digest_size=8).digest(), "little") >> 1


def batch_keys(batch: dict[str, Tensor]) -> list[int]:
    """`example_key` of every row of a right-padded batch."""
    lengths = batch["attention_mask"].sum(-1).tolist()
    return [
        example_key(batch["input_ids"][b, :n], batch["labels"][b, :n])
        for b, n in enumerate(lengths)
    ]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


# ---------------------------------------------------------------------------- the teacher's rows


@dataclass(frozen=True)
class SparseRows:
    """The sparse signal of M counted positions: ids `[M, S]`, log-probs `[M, S + 2]`."""

    ids: Tensor
    log_probs: Tensor


def top_k_rows(logits: Tensor, labels: Tensor, k: int) -> SparseRows:
    """The k most likely tokens, the ground truth's own bucket, and the tail mass.

    Args:
        logits: `[M, V]` teacher logits of M counted positions.
        labels: `[M]` their ground-truth tokens.
        k: entries per position (≤ V).
    """
    log_p = torch.log_softmax(logits.float(), dim=-1)  # [M, V]
    values, ids = log_p.topk(k, dim=-1)  # [M, k]
    target = labels.unsqueeze(-1)
    listed = (ids == target).any(-1)
    label = log_p.gather(-1, target).squeeze(-1).masked_fill(listed, float("-inf"))
    rest = log_p.scatter(-1, ids, float("-inf")).scatter(-1, target, float("-inf"))
    tail = torch.logsumexp(rest, dim=-1)  # -inf when nothing remains
    return SparseRows(ids, torch.cat([values, label[:, None], tail[:, None]], dim=-1))


def sampled_rows(logits: Tensor, labels: Tensor, k: int, generator: torch.Generator) -> SparseRows:
    """Random-sampling KD (Anshumann et al., ACL 2025): k draws, importance-weighted.

    The ground-truth token keeps its exact probability p_y in its own bucket; k tokens are drawn
    with replacement from the teacher's distribution over the *other* tokens, and a token drawn c
    times stores weight (1 − p_y)·c/k. Every token's expected stored weight is its probability,
    so the forward-KL gradient is unbiased (the paper draws from the full distribution; taking
    the ground truth apart keeps the estimate unbiased, lowers its variance, and lets
    target/non-target losses see p_y). The tail stores no mass. Unused slots hold tokens never
    drawn, with weight 0.
    """
    probs = torch.softmax(logits.float(), dim=-1)  # [M, V]
    target = labels.unsqueeze(-1)
    p_label = probs.gather(-1, target).squeeze(-1)  # [M]
    others = probs.scatter(-1, target, 0.0)
    empty = others.sum(-1) <= 0  # all mass on the label: draw anything, weight 0 below
    draws = torch.multinomial(
        torch.where(empty[:, None], torch.ones_like(others), others),
        k,
        replacement=True,
        generator=generator,
    )  # [M, k]
    counts = torch.zeros_like(probs).scatter_add_(
        -1, draws, torch.ones_like(draws, dtype=probs.dtype)
    )
    counts = counts.masked_fill(empty[:, None], 0.0)
    # drawn tokens first (count >= 1), then undrawn fillers by probability; never the label
    order = (counts + others * 0.5).scatter(-1, target, -1.0)
    ids = order.topk(k, dim=-1).indices  # [M, k]
    weight = counts.gather(-1, ids) * ((1 - p_label) / k)[:, None]
    values = torch.where(weight > 0, weight.log(), float("-inf"))
    # with k >= V - 1 the label is one of the fillers: its exact value goes in its slot
    is_label = ids == target
    values = torch.where(is_label, p_label.log()[:, None], values)
    label = p_label.log().masked_fill(is_label.any(-1), float("-inf"))
    tail = torch.full_like(p_label, float("-inf"))
    return SparseRows(ids, torch.cat([values, label[:, None], tail[:, None]], dim=-1))


# ---------------------------------------------------------------------------- writing


@dataclass(frozen=True)
class CachePlan:
    """Everything that decides a cache's content; a resumed writer must find the same."""

    teacher: str
    teacher_revision: str | None
    teacher_dtype: str
    tokenizer: str
    dataset: str
    num_examples: int
    max_length: int
    vocab: int
    k: int
    mode: str
    seed: int
    shard_examples: int
    codec: dict[str, Any]
    data: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **self.__dict__}


def write_cache(
    model: PreTrainedModel,
    examples: Sequence[Encoded],
    plan: CachePlan,
    out: Path,
    *,
    pad_id: int,
    batch_size: int = 16,
    stop_after_shards: int | None = None,
) -> dict[str, Any]:
    """Run the teacher over `examples` and write (or finish) the cache in `out`.

    Returns the finished `meta.json` content. A folder holding another plan is refused; a folder
    holding this plan keeps its finished shards. `stop_after_shards` stops after writing that
    many shards in this call (tests use it to simulate a killed writer).
    """
    out.mkdir(parents=True, exist_ok=True)
    _claim_folder(out, plan)
    codec = Codec.from_dict(plan.codec)
    shards = [
        range(start, min(start + plan.shard_examples, len(examples)))
        for start in range(0, len(examples), plan.shard_examples)
    ]
    done = {i: d for i in range(len(shards)) if (d := _finished_shard(out, i)) is not None}
    total = sum(_positions(examples[j]) for j in range(len(examples)))
    finished = sum(d["positions"] for d in done.values())
    device = next(model.parameters()).device
    written = 0
    with tqdm(total=total, initial=finished, unit="pos", unit_scale=True, desc="cache") as bar:
        for i, shard in enumerate(shards):
            if i in done:
                continue
            if stop_after_shards is not None and written >= stop_after_shards:
                raise KeyboardInterrupt(f"stopped after {written} shard(s) (stop_after_shards)")
            rows = _shard_rows(model, examples, shard, plan, codec, pad_id, batch_size, device, bar)
            done[i] = _save_shard(out, i, shard, rows)
            written += 1
    meta = {
        **plan.to_dict(),
        "num_positions": sum(d["positions"] for d in done.values()),
        "bytes_per_position": codec.bytes_per_position,
        "bytes_per_entry": codec.bytes_per_position / plan.k,
        "max_log_error": codec.max_log_error,
        "shards": [done[i] for i in range(len(shards))],
        "kdlab_version": _version(),
    }
    _atomic_write(out / META, json.dumps(meta, indent=2).encode())
    return meta


def _claim_folder(out: Path, plan: CachePlan) -> None:
    wanted = plan.to_dict()
    plan_file = out / PLAN
    if plan_file.is_file():
        held = json.loads(plan_file.read_text())
        if held != wanted:
            diff = sorted(k for k in set(held) | set(wanted) if held.get(k) != wanted.get(k))
            raise CacheError(
                f"{out} holds a cache written with other settings ({', '.join(diff)} differ); "
                "choose another cache.path or delete the folder"
            )
        logger.info("resuming the teacher cache in %s", out)
        return
    if any(out.iterdir()):
        raise CacheError(f"{out} is not empty and holds no teacher cache; choose another path")
    _atomic_write(plan_file, json.dumps(wanted, indent=2).encode())


def _positions(example: Encoded) -> int:
    return sum(example.counted[1:])


def _shard_rows(
    model: PreTrainedModel,
    examples: Sequence[Encoded],
    shard: range,
    plan: CachePlan,
    codec: Codec,
    pad_id: int,
    batch_size: int,
    device: torch.device,
    bar: tqdm,
) -> dict[str, Tensor]:
    generator = torch.Generator(device=device).manual_seed(plan.seed * 1_000_003 + shard.start)
    codes, counts, keys = [], [], []
    for start in range(shard.start, shard.stop, batch_size):
        batch = collate(examples[start : min(start + batch_size, shard.stop)], pad_id)
        keys.extend(batch_keys(batch))
        counts.extend((batch["labels"] != IGNORE_INDEX).sum(-1).tolist())
        rows = _teacher_rows(model, batch, plan, generator, device)
        codes.append(codec.encode(rows.ids.cpu(), rows.log_probs.cpu()))
        bar.update(rows.ids.shape[0])
    return {
        "codes": torch.cat(codes),
        "counts": torch.tensor(counts, dtype=torch.int64),
        "keys": torch.tensor(keys, dtype=torch.int64),
        "examples": torch.arange(shard.start, shard.stop, dtype=torch.int64),
    }


@torch.no_grad()
def _teacher_rows(
    model: PreTrainedModel,
    batch: dict[str, Tensor],
    plan: CachePlan,
    generator: torch.Generator,
    device: torch.device,
) -> SparseRows:
    inputs = {k: batch[k].to(device) for k in ("input_ids", "attention_mask")}
    labels = batch["labels"].to(device)
    keep = labels != IGNORE_INDEX
    logits = model(**inputs).logits[..., : plan.vocab][keep]  # [M, V]
    targets = labels[keep]
    parts = []
    for start in range(0, logits.shape[0], ROWS_PER_CHUNK):  # a few [rows, V] temporaries each
        chunk = slice(start, start + ROWS_PER_CHUNK)
        if plan.mode == "sample":
            parts.append(sampled_rows(logits[chunk], targets[chunk], plan.k, generator))
        else:
            parts.append(top_k_rows(logits[chunk], targets[chunk], plan.k))
    ids = torch.cat([r.ids for r in parts]) if parts else logits.new_zeros((0, plan.k)).long()
    values = torch.cat([r.log_probs for r in parts]) if parts else logits.new_zeros((0, plan.k + 2))
    return SparseRows(ids, values)


def _save_shard(out: Path, index: int, shard: range, rows: dict[str, Tensor]) -> dict[str, Any]:
    path = out / f"shard-{index:05d}.safetensors"
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in rows.items()}, str(tmp), metadata={"format": FORMAT})
    _fsync(tmp)
    os.replace(tmp, path)
    record = {
        "file": path.name,
        "sha256": file_sha256(path),
        "examples": [shard.start, shard.stop],
        "positions": int(rows["codes"].shape[0]),
    }
    _atomic_write(_shard_json(out, index), json.dumps(record).encode())
    return record


def _shard_json(out: Path, index: int) -> Path:
    return out / f"shard-{index:05d}.json"


def _finished_shard(out: Path, index: int) -> dict[str, Any] | None:
    """A shard's record when the shard and its JSON are both in place and agree, else None."""
    record_file = _shard_json(out, index)
    if not record_file.is_file():
        return None
    record = json.loads(record_file.read_text())
    path = out / record["file"]
    if not path.is_file() or file_sha256(path) != record["sha256"]:
        logger.warning("teacher cache shard %s is incomplete or corrupt; rewriting it", path)
        return None
    return record


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    _fsync(tmp)
    os.replace(tmp, path)


def _fsync(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _version() -> str:
    from kdlab import __version__

    return __version__


# ---------------------------------------------------------------------------- reading


class TeacherCache:
    """A finished cache opened for reading: checksums verified, rows found by example key."""

    def __init__(self, path: str | Path, *, verify: bool = True) -> None:
        self.path = Path(path)
        meta_file = self.path / META
        if not meta_file.is_file():
            hint = (
                "it is unfinished; run `kdlab cache-teacher` again with the same config to "
                "finish it"
                if (self.path / PLAN).is_file()
                else "run `kdlab cache-teacher CONFIG` to write one"
            )
            raise CacheError(f"no finished teacher cache in {self.path} ({META} missing): {hint}")
        self.meta: dict[str, Any] = json.loads(meta_file.read_text())
        if self.meta.get("format") != FORMAT:
            raise CacheError(
                f"{meta_file} has format {self.meta.get('format')!r}; this kdlab reads {FORMAT}"
            )
        self.codec = Codec.from_dict(self.meta["codec"])
        if verify:
            self.verify()
        self._files = [
            safe_open(str(self.path / s["file"]), framework="pt") for s in self.meta["shards"]
        ]
        self._index = self._build_index()

    @property
    def k(self) -> int:
        return int(self.meta["k"])

    @property
    def vocab(self) -> int:
        return int(self.meta["vocab"])

    def verify(self) -> None:
        """Compare every shard's sha256 with `meta.json`; a mismatch names the shard."""
        for shard in self.meta["shards"]:
            path = self.path / shard["file"]
            if not path.is_file():
                raise CacheError(f"teacher cache shard {path} is missing; rewrite the cache")
            if file_sha256(path) != shard["sha256"]:
                raise CacheError(
                    f"teacher cache shard {path} is corrupt (sha256 differs from {META}); delete "
                    f"{path} and {path.with_suffix('.json')} and run `kdlab cache-teacher` again "
                    "to rewrite it"
                )

    def _build_index(self) -> dict[int, tuple[int, int, int]]:
        index: dict[int, tuple[int, int, int]] = {}
        for s, f in enumerate(self._files):
            counts = f.get_tensor("counts").tolist()
            starts = [0, *torch.tensor(counts).cumsum(0).tolist()[:-1]] if counts else []
            for key, start, count in zip(
                f.get_tensor("keys").tolist(), starts, counts, strict=True
            ):
                index.setdefault(key, (s, start, count))
        return index

    def rows(self, keys: Sequence[int]) -> Iterator[Tensor]:
        """The encoded rows `[n_i, bytes]` of each example key (KeyError when absent)."""
        for key in keys:
            shard, start, count = self._index[key]
            yield self._files[shard].get_slice("codes")[start : start + count]

    def count(self, key: int) -> int:
        return self._index[key][2]

    def __contains__(self, key: int) -> bool:
        return key in self._index
