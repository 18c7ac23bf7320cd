"""The tiny-model factory: small Llama models for the built-in tasks, tests and the demo.

They are ordinary `LlamaForCausalLM`s, so training, `save_pretrained` and loading go through the
same code path as hub models.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerBase

# Parameter counts are for the 21-token `arith` vocabulary (untied embeddings).
PRESETS: dict[str, dict[str, int]] = {
    # ~22k parameters: unit tests.
    "tiny": {"hidden_size": 32, "num_layers": 2, "num_heads": 4, "intermediate_size": 64},
    # ~0.13M parameters: a student.
    "small": {"hidden_size": 64, "num_layers": 2, "num_heads": 4, "intermediate_size": 256},
    # ~1.05M parameters: a teacher.
    "base": {"hidden_size": 128, "num_layers": 4, "num_heads": 4, "intermediate_size": 512},
}


def build_tiny_model(
    tokenizer: PreTrainedTokenizerBase,
    *,
    hidden_size: int,
    num_layers: int,
    num_heads: int,
    intermediate_size: int,
    max_position_embeddings: int = 128,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    **config_kwargs: Any,
) -> LlamaForCausalLM:
    """A randomly initialised Llama for `tokenizer`, the same for the same arguments and seed.

    The global torch RNG is left as it was: initialisation draws from a forked, seeded RNG.

    Args:
        tokenizer: gives the vocabulary size (`len(tokenizer)`) and the bos/eos/pad ids.
        hidden_size: model width; must be divisible by `num_heads`.
        num_layers: decoder layers.
        num_heads: attention heads (no grouped-query attention: as many key/value heads).
        intermediate_size: width of the MLP.
        max_position_embeddings: longest sequence the model is meant for.
        seed: initialisation seed.
        tie_word_embeddings: share the input embedding and the lm_head.
        **config_kwargs: any other `LlamaConfig` field (e.g. `initializer_range`).

    Returns:
        A `LlamaForCausalLM` in training mode, on CPU, in float32.
    """
    if hidden_size % num_heads:
        raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        intermediate_size=intermediate_size,
        max_position_embeddings=max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
        **config_kwargs,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def build_preset(
    name: str, tokenizer: PreTrainedTokenizerBase, seed: int = 0, **overrides: Any
) -> LlamaForCausalLM:
    """`build_tiny_model` with the sizes of preset `name` (`tiny`, `small`, `base`).

    Args:
        name: a key of `PRESETS`.
        tokenizer: see `build_tiny_model`.
        seed: initialisation seed.
        **overrides: arguments of `build_tiny_model` that replace the preset's.
    """
    if name not in PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid presets: {', '.join(PRESETS)}")
    return build_tiny_model(tokenizer, **{**PRESETS[name], "seed": seed, **overrides})
