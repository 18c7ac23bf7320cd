"""Shared by the benchmark scripts: random Llama models, their special ids, the machine's name."""

from __future__ import annotations

import platform
from pathlib import Path

import torch
from torch import nn

PAD, BOS, EOS = 0, 1, 2  # the arith tokenizer's ids; the synthetic configs use the same
FIRST_TOKEN = 3  # random tokens are drawn from [FIRST_TOKEN, vocab): no special tokens


def random_llama(shape: dict[str, int], *, vocab: int, seed: int, max_len: int) -> nn.Module:
    """A randomly initialised Llama of `shape` (hidden size, layers, ...), the same per seed."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        vocab_size=vocab,
        max_position_embeddings=max_len,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=False,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def device_name(device: str = "cpu") -> str:
    """The GPU's name, or the CPU model from /proc/cpuinfo (for the results' header)."""
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()
