"""Loading teacher and student from a hub id or local path, and the vocabulary check."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from kdlab.config import ModelSpec

logger = logging.getLogger(__name__)

PRESET_PREFIX = "preset:"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelError(ValueError):
    """A problem with the teacher or student that the user can fix in the config."""


def is_preset(spec: ModelSpec) -> bool:
    return spec.model.startswith(PRESET_PREFIX)


def load_tokenizer(spec: ModelSpec) -> PreTrainedTokenizerBase:
    """The tokenizer of a hub id or local path, with a pad token guaranteed.

    A tokenizer without a pad token gets its eos token as pad (padding is masked out everywhere,
    so the choice does not change any loss); without eos either, loading fails with a clear error.
    """
    source = spec.tokenizer or spec.model
    tokenizer = AutoTokenizer.from_pretrained(
        source, revision=spec.revision, trust_remote_code=spec.trust_remote_code
    )
    return ensure_pad_token(tokenizer, source)


def ensure_pad_token(tokenizer: PreTrainedTokenizerBase, source: str) -> PreTrainedTokenizerBase:
    if tokenizer.pad_token_id is not None:
        return tokenizer
    if tokenizer.eos_token is None:
        raise ModelError(
            f"tokenizer {source!r} has neither a pad nor an eos token; add a pad token to it "
            "(tokenizer.add_special_tokens({'pad_token': ...}) and save it) and point "
            "`tokenizer:` at the result"
        )
    logger.info(
        "tokenizer %s has no pad token; using eos %r for padding", source, tokenizer.eos_token
    )
    tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(spec: ModelSpec, *, role: str) -> PreTrainedModel:
    """An `AutoModelForCausalLM` from a hub id or local path (presets are built elsewhere)."""
    path = Path(spec.model)
    if spec.model.startswith((".", "/")) and not path.exists():
        raise ModelError(f"{role}.model: local path {spec.model!r} does not exist")
    model = AutoModelForCausalLM.from_pretrained(
        spec.model,
        revision=spec.revision,
        dtype=_DTYPES[spec.dtype],
        trust_remote_code=spec.trust_remote_code,
    )
    return model


def vocab_size(model: PreTrainedModel) -> int:
    """Rows of the output embedding (may exceed len(tokenizer) when padded)."""
    return model.get_output_embeddings().weight.shape[0]


def check_vocabularies(
    teacher: PreTrainedModel,
    teacher_tokenizer: PreTrainedTokenizerBase,
    student: PreTrainedModel,
    student_tokenizer: PreTrainedTokenizerBase,
) -> int:
    """Ensure teacher and student share a vocabulary; return the number of logits to compare.

    The two tokenizers must be identical (same token -> id table). The lm_heads may differ in
    size when one is padded beyond the tokenizer (common for hub models): then both are compared
    on the first `len(tokenizer)` entries, the padding rows being unused ids.
    """
    t_size, s_size = vocab_size(teacher), vocab_size(student)
    if teacher_tokenizer.get_vocab() != student_tokenizer.get_vocab():
        raise ModelError(
            f"teacher vocab {len(teacher_tokenizer)} tokens (lm_head {t_size}) and student vocab "
            f"{len(student_tokenizer)} tokens (lm_head {s_size}) differ; the two models must "
            "share a tokenizer (see docs/models.md)"
        )
    n = len(student_tokenizer)
    if t_size < n or s_size < n:
        raise ModelError(
            f"an lm_head is smaller than the tokenizer ({len(student_tokenizer)} tokens): teacher "
            f"lm_head {t_size}, student lm_head {s_size}; resize the model's embeddings"
        )
    if t_size != s_size:
        logger.warning(
            "teacher lm_head has %d rows and student %d; the same tokenizer has %d tokens, so "
            "the extra rows are padding and logits are compared on the first %d",
            t_size,
            s_size,
            n,
            n,
        )
    return n if t_size != s_size else t_size
