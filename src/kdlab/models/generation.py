"""Batched generation shared by every regime and by evaluation.

One function, `generate`, samples continuations of token-id prompts from a Hugging Face causal LM
through `model.generate` (KV cache on by default), with temperature / top-p / `max_new_tokens`,
stopping each row at its first eos, prompts left-padded. Sampling draws from a forked RNG seeded
by the caller, so a regime can rebuild the same batch on resume and the global RNG (which drives
dropout and data order) is left untouched.

An optional vLLM backend (`VLLMGenerator`) serves models whose weights do not change during the
run (the teacher in `seq_kd`, the starting student in Warmup-Distill's first stage) when vLLM is
installed and a GPU is present; nothing in kdlab needs it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm
from transformers import GenerationConfig

logger = logging.getLogger("kdlab")


@dataclass(frozen=True)
class Sampling:
    """How continuations are drawn (the config's `regime.generation`)."""

    max_new_tokens: int = field(
        default=64, metadata={"help": "the most tokens generated per prompt (eos included)"}
    )
    temperature: float = field(
        default=1.0, metadata={"help": "softmax temperature of sampling; 0 means greedy decoding"}
    )
    top_p: float = field(default=1.0, metadata={"help": "nucleus sampling mass (1.0: off)"})
    batch_size: int = field(default=64, metadata={"help": "prompts per generate call"})
    use_cache: bool = field(
        default=True, metadata={"help": "reuse past keys/values (KV cache); off only to measure"}
    )
    backend: str = field(
        default="auto",
        metadata={
            "help": "hf, vllm, or auto (vllm for fixed models when installed and a GPU is present)"
        },
    )

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0: greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.backend not in ("auto", "hf", "vllm"):
            raise ValueError(f"backend must be one of auto, hf, vllm; got {self.backend!r}")


@contextmanager
def eval_mode(*models: nn.Module) -> Iterator[None]:
    """Put `models` in eval mode for the block; restore each one's training mode after."""
    was_training = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        yield
    finally:
        for m, training in zip(models, was_training, strict=True):
            m.train(training)


@contextmanager
def plain_generation_config(model: nn.Module) -> Iterator[None]:
    """Hide the model's own `generation_config` for the block.

    transformers fills every setting a `GenerationConfig` leaves unset from the model's
    `generation_config`; a hub model's repetition penalty, n-gram ban or `min_new_tokens` would then
    change kdlab's samples, which must come from the model's plain distribution.
    """
    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT
    holders = [m for m in dict.fromkeys([model, base]) if hasattr(m, "generation_config")]
    saved = [m.generation_config for m in holders]
    for m in holders:
        m.generation_config = GenerationConfig()
    try:
        yield
    finally:
        for m, config in zip(holders, saved, strict=True):
            m.generation_config = config


def left_pad(rows: Sequence[Sequence[int]], pad_id: int) -> tuple[Tensor, Tensor]:
    """`input_ids`, `attention_mask` `[b, T]`, each row right-aligned after `pad_id` padding."""
    length = max(len(r) for r in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for b, row in enumerate(rows):
        if row:
            input_ids[b, -len(row) :] = torch.tensor(list(row), dtype=torch.long)
            attention_mask[b, -len(row) :] = 1
    return input_ids, attention_mask


def eos_ids(model: nn.Module, eos_id: int | Sequence[int] | None) -> list[int]:
    """The given eos id(s) plus any eos in the model's generation config, without duplicates."""
    eos: list[int] = []
    config = getattr(model, "generation_config", None)
    for source in (eos_id, getattr(config, "eos_token_id", None)):
        if isinstance(source, int):
            eos.append(source)
        elif source is not None:
            eos.extend(int(e) for e in source)
    return list(dict.fromkeys(eos))


def generation_config(sampling: Sampling, *, eos: list[int], pad_id: int) -> GenerationConfig:
    """A complete `GenerationConfig` (nothing inherited from the model's own defaults)."""
    greedy = sampling.temperature == 0
    return GenerationConfig(
        max_new_tokens=sampling.max_new_tokens,
        do_sample=not greedy,
        temperature=None if greedy else sampling.temperature,
        top_p=None if greedy else sampling.top_p,
        top_k=None if greedy else 0,  # transformers samples from the top 50 unless told not to
        num_beams=1,
        eos_token_id=eos or None,
        pad_token_id=pad_id,
        use_cache=sampling.use_cache,
    )


def cut_at_eos(tokens: Sequence[int], eos: Sequence[int]) -> list[int]:
    """`tokens` up to and including the first eos (all of them when there is none)."""
    out = []
    for tok in tokens:
        out.append(int(tok))
        if tok in eos:
            break
    return out


def generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    pad_id: int,
    eos_id: int | Sequence[int] | None,
    sampling: Sampling = Sampling(),
    seed: int = 0,
    progress: bool = False,
    desc: str = "generate",
) -> list[list[int]]:
    """Continuations of token-id `prompts` sampled from `model`.

    Prompts are grouped by length (less padding), left-padded, and generated `batch_size` at a
    time; each continuation ends at its first eos (kept) or after `max_new_tokens`.

    Args:
        model: a causal LM with `generate` (unwrapped from DDP/FSDP).
        prompts: `N` token-id lists (each non-empty).
        pad_id: id used for left padding (masked out).
        eos_id: the tokenizer's eos id(s); eos ids of the model's generation config are added.
        sampling: temperature, top-p, length, batch size, KV cache.
        seed: seeds a forked RNG: the same seed, model and prompts give the same continuations.
        progress: show a progress bar over prompts.
        desc: the progress bar's label.

    Returns:
        `N` lists of new token ids, in the order of `prompts`.
    """
    if any(len(p) == 0 for p in prompts):
        raise ValueError("cannot generate from an empty prompt; every prompt needs a token")
    eos = eos_ids(model, eos_id)
    config = generation_config(sampling, eos=eos, pad_id=pad_id)
    device = next(model.parameters()).device
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    out: list[list[int]] = [[] for _ in prompts]
    bar = tqdm(total=len(prompts), desc=desc, unit="seq", disable=not progress, leave=False)
    devices = [device] if device.type == "cuda" else []
    with (
        eval_mode(model),
        plain_generation_config(model),
        torch.inference_mode(),
        torch.random.fork_rng(devices=devices),
    ):
        torch.manual_seed(seed)
        for start in range(0, len(order), sampling.batch_size):
            rows = order[start : start + sampling.batch_size]
            input_ids, attention_mask = left_pad([prompts[i] for i in rows], pad_id)
            sequences = model.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=config,
            )  # [b, T + new]
            for i, new in zip(rows, sequences[:, input_ids.shape[1] :].tolist(), strict=True):
                out[i] = cut_at_eos(new, eos)
            bar.update(len(rows))
    bar.close()
    return out


# ---------------------------------------------------------------------------- optional vLLM


def vllm_available() -> bool:
    """vLLM is installed and a CUDA GPU is present."""
    if not torch.cuda.is_available():
        return False
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


class VLLMGenerator:
    """Generation through vLLM for a model whose weights stay fixed (a path or hub id).

    The same contract as `generate` (token ids in, new token ids out, cut at eos). vLLM keeps the
    whole model on the GPU next to the training models: `gpu_memory_utilization` bounds its share.
    """

    def __init__(self, model_path: str, *, gpu_memory_utilization: float = 0.3, **kw: Any) -> None:
        from vllm import LLM

        self.llm = LLM(
            model=model_path,
            gpu_memory_utilization=gpu_memory_utilization,
            enable_prefix_caching=True,
            **kw,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        *,
        eos_id: int | Sequence[int] | None,
        sampling: Sampling = Sampling(),
        seed: int = 0,
    ) -> list[list[int]]:
        from vllm import SamplingParams, TokensPrompt

        eos = [eos_id] if isinstance(eos_id, int) else list(eos_id or [])
        params = SamplingParams(
            n=1,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            max_tokens=sampling.max_new_tokens,
            stop_token_ids=eos or None,
            seed=seed,
        )
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        results = self.llm.generate(requests, params, use_tqdm=False)
        return [cut_at_eos(r.outputs[0].token_ids, eos) for r in results]
