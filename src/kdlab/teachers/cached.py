"""CachedTeacher: the teacher's sparse signal read from an offline cache; no model in memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

from kdlab.data.collate import Encoded
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.losses.sparse import SparseTeacher
from kdlab.teachers.base import TEACHERS, TeacherSignal, TeacherSource
from kdlab.teachers.cache import CacheError, TeacherCache, batch_keys, dataset_fingerprint


@TEACHERS.register("cache")
class CachedTeacher(TeacherSource):
    """Serves `kdlab cache-teacher`'s rows for batches of the cached dataset's examples.

    The trainer uses it exactly like `OnlineTeacher`: `signal(batch)` returns a `SparseTeacher`
    aligned with the batch (the losses bucket it, see `kdlab.losses.sparse`). Rows are found by
    each example's content key, so any order, grouping and padding of the dataset works.
    """

    def __init__(self, cache: TeacherCache) -> None:
        self.cache = cache

    @property
    def supports_hidden(self) -> bool:
        return False

    def signal(self, batch: dict[str, Tensor], *, hidden: bool = False) -> TeacherSignal:
        labels = batch["labels"]
        keep = (labels != IGNORE_INDEX).cpu()
        keys = batch_keys({k: batch[k].cpu() for k in ("input_ids", "attention_mask", "labels")})
        self._check_rows(keys, keep.sum(-1).tolist())
        ids, log_probs = self.cache.codec.decode(torch.cat(list(self.cache.rows(keys))))
        slots = self.cache.k
        full_ids = torch.arange(slots).expand(*labels.shape, slots).clone()  # [B, T, S]
        full_log = torch.full((*labels.shape, slots + 2), float("-inf"))  # [B, T, S + 2]
        full_log[..., -1] = 0.0  # uncounted positions: all mass in the tail (never used)
        full_ids[keep], full_log[keep] = ids, log_probs
        device = labels.device
        return TeacherSignal(sparse=SparseTeacher(full_ids.to(device), full_log.to(device)))

    def _check_rows(self, keys: Sequence[int], counted: Sequence[int]) -> None:
        for row, (key, n) in enumerate(zip(keys, counted, strict=True)):
            if key not in self.cache:
                raise CacheError(
                    f"batch row {row} is not in the teacher cache {self.cache.path}: a cache "
                    "holds the dataset's own sequences (regime off_policy, the same data "
                    "settings as `kdlab cache-teacher`)"
                )
            if self.cache.count(key) != n:  # only a hash collision could get here
                raise CacheError(f"batch row {row} has {n} counted tokens, the cache another count")


def check_cache_fits(
    cache: TeacherCache,
    *,
    tokenizer_fingerprint: str,
    dataset: Sequence[Encoded],
    max_length: int,
    k: int | None,
) -> None:
    """Refuse a cache made for another tokenizer, dataset, max length or k.

    Raises:
        CacheError: naming what differs and how to fix it.
    """
    meta = cache.meta
    fix = "write a cache for this run with `kdlab cache-teacher` (same data and tokenizer)"
    if meta["tokenizer"] != tokenizer_fingerprint:
        raise CacheError(
            f"teacher cache {cache.path} was made with another tokenizer than the student's; {fix}"
        )
    if meta["max_length"] != max_length:
        raise CacheError(
            f"teacher cache {cache.path} was made with data.max_length={meta['max_length']}, the "
            f"run has {max_length}; set data.max_length={meta['max_length']} or {fix}"
        )
    if meta["dataset"] != dataset_fingerprint(dataset):
        raise CacheError(
            f"teacher cache {cache.path} holds another dataset ({meta['num_examples']} examples, "
            f"fingerprint {meta['dataset'][:12]}) than the run's training data ({len(dataset)} "
            f"examples); use the same data settings as the cache, or {fix}"
        )
    if k is not None and k != cache.k:
        raise CacheError(
            f"teacher cache {cache.path} holds k={cache.k} entries per position, the run expects "
            f"teacher.k={k}; set teacher.k={cache.k} or {fix} with cache.k={k}"
        )


def check_cache_vocab(cache: TeacherCache, vocab: int) -> None:
    """Refuse a student whose lm_head cannot score every cached token id."""
    if vocab < cache.vocab:
        raise CacheError(
            f"teacher cache {cache.path} has a vocabulary of {cache.vocab} tokens, the student's "
            f"lm_head only {vocab}; the two must share a tokenizer"
        )
