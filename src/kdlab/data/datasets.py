"""Loading records (built-in task, local file, hub dataset) and encoding them for training.

Records are `{"prompt": str, "completion": str}` or `{"messages": [{"role", "content"}, ...]}`
(chat format: the tokenizer's chat template renders them; the last message is the completion).
Every problem a user can fix (empty data, missing columns, an example longer than `max_length`)
is raised here, before any model is loaded.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from kdlab.config import DataSpec
from kdlab.data.collate import Encoded

logger = logging.getLogger(__name__)

_FILE_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}
DEFAULT_TASK_EXAMPLES = 2000


class DataError(ValueError):
    """A problem with the training data, raised before training starts."""


@dataclass(frozen=True)
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]


def task_name(spec: DataSpec) -> str | None:
    """`task:arith` -> `arith`; `None` for files and hub datasets."""
    return spec.dataset.split(":", 1)[1] if spec.dataset.startswith("task:") else None


def load_splits(spec: DataSpec, eval_examples: int) -> Splits:
    """Training and evaluation records for a data spec."""
    name = task_name(spec)
    if name is not None:
        from kdlab.tasks import get_task

        task = get_task(name, **spec.task_args)
        n = spec.num_examples or DEFAULT_TASK_EXAMPLES
        train = task.make_examples(n, seed=spec.seed, split="train")
        held_out = task.make_examples(eval_examples, seed=spec.seed + 1, split="test")
        return _checked(Splits(train, held_out), spec)
    records = _load_records(spec, spec.split)
    if spec.eval_split is not None:
        held_out = _load_records(spec, spec.eval_split)[:eval_examples]
    else:
        if len(records) <= eval_examples:
            raise DataError(
                f"dataset {spec.dataset!r} has {len(records)} records, not enough to hold out "
                f"eval.num_examples={eval_examples} for evaluation; set data.eval_split or a "
                "smaller eval.num_examples"
            )
        records, held_out = records[:-eval_examples], records[-eval_examples:]
    if spec.num_examples is not None:
        records = records[: spec.num_examples]
    return _checked(Splits(records, held_out), spec)


def _checked(splits: Splits, spec: DataSpec) -> Splits:
    if not splits.train:
        raise DataError(f"dataset {spec.dataset!r} (split {spec.split!r}) has no examples")
    return splits


def _load_records(spec: DataSpec, split: str) -> list[dict[str, Any]]:
    import datasets

    path = Path(spec.dataset)
    if path.suffix in _FILE_FORMATS:
        if not path.is_file():
            raise DataError(f"data file {spec.dataset!r} not found")
        if path.stat().st_size == 0 or (path.suffix != ".parquet" and not path.read_text().strip()):
            raise DataError(f"data file {spec.dataset!r} is empty: it has no examples")
        ds = datasets.load_dataset(
            _FILE_FORMATS[path.suffix], data_files={split: str(path)}, split=split
        )
    elif path.exists():
        ds = datasets.load_dataset(str(path), split=split)
    else:
        ds = datasets.load_dataset(spec.dataset, split=split)
    records = ds.to_list()
    if records:
        _check_columns(records[0], spec)
    return records


def _check_columns(record: dict[str, Any], spec: DataSpec) -> None:
    if spec.messages_field in record:
        return
    missing = [c for c in (spec.prompt_field, spec.completion_field) if c not in record]
    if missing:
        raise DataError(
            f"dataset {spec.dataset!r} has columns {sorted(record)}; kdlab needs "
            f"{spec.prompt_field!r}/{spec.completion_field!r} or {spec.messages_field!r} "
            "(rename them with data.prompt_field / data.completion_field / data.messages_field)"
        )


def encode_record(
    tokenizer: PreTrainedTokenizerBase, record: dict[str, Any], spec: DataSpec
) -> tuple[list[int], int]:
    """Token ids of one record and the length of its prompt part."""
    if spec.messages_field in record and record[spec.messages_field]:
        return _encode_chat(tokenizer, record[spec.messages_field])
    prompt = tokenizer(record[spec.prompt_field], add_special_tokens=True)["input_ids"]
    completion = tokenizer(record[spec.completion_field], add_special_tokens=False)["input_ids"]
    eos = tokenizer.eos_token_id
    if eos is not None and (not completion or completion[-1] != eos):
        completion = [*completion, eos]
    return [*prompt, *completion], len(prompt)


def _encode_chat(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[list[int], int]:
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(
            "the dataset has chat `messages` but the tokenizer has no chat template; use a chat "
            "model's tokenizer or prompt/completion columns"
        )
    if messages[-1].get("role") != "assistant":
        raise DataError("chat examples must end with an assistant message (the completion)")
    prompt = _as_ids(tokenizer.apply_chat_template(messages[:-1], add_generation_prompt=True))
    full = _as_ids(tokenizer.apply_chat_template(messages))
    if full[: len(prompt)] != prompt:
        raise DataError(
            "the chat template renders the conversation so that the prompt is not a prefix of "
            "the full text; kdlab cannot tell which tokens are the completion"
        )
    return full, len(prompt)


def _as_ids(rendered: Any) -> list[int]:
    # transformers >= 5 may return a BatchEncoding from apply_chat_template
    if hasattr(rendered, "keys") and "input_ids" in rendered:
        rendered = rendered["input_ids"]
    return list(rendered)


def encode_dataset(
    tokenizer: PreTrainedTokenizerBase, records: Sequence[dict[str, Any]], spec: DataSpec
) -> list[Encoded]:
    """Encode records; apply `data.overlong` to examples over `data.max_length` tokens."""
    encoded, too_long = [], []
    for i, record in enumerate(records):
        ids, prompt_length = encode_record(tokenizer, record, spec)
        if len(ids) > spec.max_length:
            too_long.append((i, len(ids)))
            if spec.overlong == "drop":
                continue
            if spec.overlong == "truncate":
                if prompt_length >= spec.max_length:
                    continue  # nothing of the completion would remain
                ids = ids[: spec.max_length]
        counted = [j >= prompt_length or not spec.completion_only for j in range(len(ids))]
        encoded.append(Encoded(ids, counted, prompt_length))
    _report_overlong(too_long, spec, len(records))
    if not encoded:
        raise DataError(f"no usable examples in {spec.dataset!r} after applying data.overlong")
    if not any(any(e.counted[1:]) for e in encoded):
        raise DataError(f"no example of {spec.dataset!r} has a completion token to train on")
    return encoded


def _report_overlong(too_long: list[tuple[int, int]], spec: DataSpec, total: int) -> None:
    if not too_long:
        return
    longest = max(n for _, n in too_long)
    if spec.overlong == "error":
        first = ", ".join(f"#{i} ({n} tokens)" for i, n in too_long[:3])
        raise DataError(
            f"{len(too_long)} of {total} examples are longer than data.max_length="
            f"{spec.max_length} tokens (e.g. {first}; longest {longest}); raise data.max_length "
            "or set data.overlong=truncate (cut the completion) or data.overlong=drop"
        )
    logger.warning(
        "%d of %d examples exceed data.max_length=%d (longest %d): %s",
        len(too_long),
        total,
        spec.max_length,
        longest,
        "truncated" if spec.overlong == "truncate" else "dropped",
    )
