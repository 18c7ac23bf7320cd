"""Shared generation (`kdlab.models.generation`): batching, eos, seeds, greedy, KV cache, vLLM."""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

import pytest
import torch
from torch import nn

from kdlab.models import generation as gen
from kdlab.models.generation import (
    Sampling,
    VLLMGenerator,
    cut_at_eos,
    eos_ids,
    generate,
    left_pad,
    vllm_available,
)
from kdlab.models.tiny import build_preset
from kdlab.tasks import get_task

PAD, EOS = 0, 2  # the arith tokenizer's ids

# prompts of different lengths, so a batch needs left padding (1 = bos)
PROMPTS = [
    [1, 7, 16, 8, 19],
    [1, 9],
    [1, 12, 12, 17, 6, 19, 5],
    [1, 4, 15],
    [1, 10, 18, 11, 19, 7, 8, 9, 19],
    [1, 13],
    [1, 6, 16],
]


@pytest.fixture(scope="module")
def model() -> nn.Module:
    """A random tiny Llama; a larger init spread keeps greedy argmaxes far from ties."""
    tokenizer = get_task("arith").build_tokenizer()
    return build_preset("tiny", tokenizer, seed=0, initializer_range=0.3)


@pytest.fixture(scope="module")
def flat_model() -> nn.Module:
    """The default init: near-uniform next-token distributions, so sampling varies a lot."""
    return build_preset("tiny", get_task("arith").build_tokenizer(), seed=1)


def argmax_loop(model: nn.Module, prompt: Sequence[int], steps: int, eos: Sequence[int]) -> list:
    """Greedy decoding written out: full forward pass, argmax of the last position, append."""
    ids, out = list(prompt), []
    model.eval()
    with torch.no_grad():
        for _ in range(steps):
            logits = model(input_ids=torch.tensor([ids])).logits  # [1, T, V]
            token = int(logits[0, -1].argmax())
            out.append(token)
            ids.append(token)
            if token in eos:
                break
    return out


def greedy(max_new_tokens: int = 10, **kw: object) -> Sampling:
    return Sampling(max_new_tokens=max_new_tokens, temperature=0.0, **kw)


def test_temperature_zero_equals_a_manual_argmax_loop(model: nn.Module) -> None:
    got = generate(model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=greedy(10))
    assert got == [argmax_loop(model, p, 10, [EOS]) for p in PROMPTS]


def test_left_padded_batches_equal_one_prompt_at_a_time(model: nn.Module) -> None:
    one_by_one = [
        generate(model, [p], pad_id=PAD, eos_id=EOS, sampling=greedy(12))[0] for p in PROMPTS
    ]
    for batch_size in (len(PROMPTS), 3):  # one padded batch; several, grouped by length
        batched = generate(
            model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=greedy(12, batch_size=batch_size)
        )
        assert batched == one_by_one
    ids, mask = left_pad([[5, 6], [7]], PAD)
    assert ids.tolist() == [[5, 6], [PAD, 7]] and mask.tolist() == [[1, 1], [0, 1]]


def test_without_kv_cache_greedy_output_is_the_same(model: nn.Module) -> None:
    cached = generate(model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=greedy(12))
    plain = generate(model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=greedy(12, use_cache=False))
    assert plain == cached


def test_a_tiny_top_p_is_greedy(flat_model: nn.Module) -> None:
    nucleus = Sampling(max_new_tokens=10, temperature=1.0, top_p=1e-6)
    sampled = generate(flat_model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=nucleus, seed=3)
    assert sampled == generate(flat_model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=greedy(10))


def _continuation_with_a_fresh_token(model: nn.Module) -> tuple[list[int], list[int], int]:
    """A prompt, its 12-token greedy continuation (no eos), and a position k >= 2 holding a
    token that does not occur before k: using that token as eos must cut right after k."""
    for prompt in PROMPTS:
        tokens = argmax_loop(model, prompt, 12, eos=[])
        for k in range(2, len(tokens)):
            if tokens[k] not in tokens[:k] and EOS not in tokens[: k + 1]:
                return prompt, tokens, k
    raise AssertionError("no continuation with a fresh token; change the prompts")


def test_continuations_stop_right_after_the_first_eos(model: nn.Module) -> None:
    prompt, tokens, k = _continuation_with_a_fresh_token(model)
    stop = tokens[k]
    got = generate(model, [prompt], pad_id=PAD, eos_id=stop, sampling=greedy(12))[0]
    assert got == tokens[: k + 1]  # eos kept, nothing after it
    # the model's generation config's eos stops it too, without being passed
    model.generation_config.eos_token_id = stop
    try:
        assert generate(model, [prompt], pad_id=PAD, eos_id=None, sampling=greedy(12))[0] == got
    finally:
        model.generation_config.eos_token_id = EOS


def test_sampled_continuations_respect_eos_and_max_new_tokens(flat_model: nn.Module) -> None:
    prompts = PROMPTS * 4
    sampling = Sampling(max_new_tokens=9, temperature=1.0)
    out = generate(flat_model, prompts, pad_id=PAD, eos_id=EOS, sampling=sampling, seed=0)
    assert len(out) == len(prompts)
    assert all(1 <= len(c) <= 9 for c in out)
    assert all(EOS not in c[:-1] for c in out)  # an eos can only be the last token
    stopped = [c for c in out if c[-1] == EOS]
    assert any(len(c) < 9 for c in stopped)  # some row really stopped early at eos
    assert any(len(c) == 9 and EOS not in c for c in out)  # some row ran to the budget


def test_same_seed_same_samples_other_seed_other_samples(flat_model: nn.Module) -> None:
    sampling = Sampling(max_new_tokens=8, temperature=1.0)

    def draw(seed: int) -> list[list[int]]:
        return generate(flat_model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=sampling, seed=seed)

    first = draw(11)
    torch.manual_seed(999)  # the global RNG does not matter, only `seed`
    assert draw(11) == first
    assert draw(12) != first


def test_generate_leaves_the_global_rng_and_training_mode_alone(flat_model: nn.Module) -> None:
    flat_model.train()
    torch.manual_seed(5)
    before = torch.get_rng_state()
    generate(flat_model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=Sampling(max_new_tokens=6))
    assert torch.equal(torch.get_rng_state(), before)
    assert flat_model.training


def test_the_models_own_generation_settings_do_not_leak_in(model: nn.Module) -> None:
    """A hub model's `generation_config` may carry a repetition penalty or an n-gram ban (e.g.
    Qwen2.5-Instruct's repetition_penalty=1.05); kdlab's samples must come from the model's plain
    distribution, so greedy decoding stays the argmax loop."""
    plain = generate(model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=greedy(12))
    assert any(len(set(c)) < len(c) for c in plain)  # some continuation repeats a token
    config = model.generation_config
    config.repetition_penalty, config.no_repeat_ngram_size = 5.0, 1
    try:
        got = generate(model, PROMPTS, pad_id=PAD, eos_id=EOS, sampling=greedy(12))
    finally:
        config.repetition_penalty, config.no_repeat_ngram_size = None, None
    assert got == plain


def test_empty_prompt_is_a_clear_error(model: nn.Module) -> None:
    with pytest.raises(ValueError, match="empty prompt"):
        generate(model, [[1, 5], []], pad_id=PAD, eos_id=EOS)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"batch_size": 0}, "batch_size"),
        ({"backend": "tgi"}, "backend"),
    ],
)
def test_sampling_validation(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError, match=needle):
        Sampling(**kwargs)


def test_cut_at_eos() -> None:
    assert cut_at_eos([5, 6, 2, 7, 2], [2]) == [5, 6, 2]
    assert cut_at_eos([5, 9, 6, 2], [2, 9]) == [5, 9]
    assert cut_at_eos([5, 6, 7], [2]) == [5, 6, 7]
    assert cut_at_eos([2, 5], [2]) == [2]
    assert cut_at_eos([], [2]) == []


def test_eos_ids_merges_the_model_generation_config() -> None:
    holder = types.SimpleNamespace(generation_config=types.SimpleNamespace(eos_token_id=[2, 7]))
    assert eos_ids(holder, 9) == [9, 2, 7]
    assert eos_ids(holder, [7, 3]) == [7, 3, 2]  # no duplicates, given ids first
    assert eos_ids(holder, None) == [2, 7]
    holder.generation_config.eos_token_id = 4
    assert eos_ids(holder, 4) == [4]
    assert eos_ids(nn.Linear(1, 1), 5) == [5]  # a module without a generation config


# ---------------------------------------------------------------------------- optional vLLM


def test_vllm_is_unavailable_without_a_gpu_or_without_vllm(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert vllm_available() is False  # never imports vllm without a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    assert vllm_available() is False
    monkeypatch.setitem(sys.modules, "vllm", types.ModuleType("vllm"))
    assert vllm_available() is True


def test_vllm_generator_maps_the_sampling_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """`VLLMGenerator` against a stand-in `vllm` module: what it asks vLLM for and what it returns
    (vLLM itself is never needed by the tests)."""
    calls: dict = {}

    class LLM:
        def __init__(self, **kw: object) -> None:
            calls["llm"] = kw

        def generate(self, requests: list, params: object, use_tqdm: bool) -> list:
            calls["requests"], calls["params"] = requests, params
            outputs = [[5, 6, 2, 9], [7, 7, 7]]  # vLLM may return tokens after a stop id
            return [
                types.SimpleNamespace(outputs=[types.SimpleNamespace(token_ids=o)]) for o in outputs
            ]

    fake = types.ModuleType("vllm")
    fake.LLM = LLM
    fake.SamplingParams = lambda **kw: kw
    fake.TokensPrompt = lambda prompt_token_ids: {"prompt_token_ids": prompt_token_ids}
    monkeypatch.setitem(sys.modules, "vllm", fake)
    generator = VLLMGenerator("some/model", gpu_memory_utilization=0.25)
    sampling = Sampling(max_new_tokens=7, temperature=0.5, top_p=0.9)
    out = generator.generate([(1, 4), [1, 5, 6]], eos_id=2, sampling=sampling, seed=3)
    assert out == [[5, 6, 2], [7, 7, 7]]
    assert calls["llm"]["model"] == "some/model"
    assert calls["llm"]["gpu_memory_utilization"] == 0.25
    assert calls["requests"] == [{"prompt_token_ids": [1, 4]}, {"prompt_token_ids": [1, 5, 6]}]
    params = calls["params"]
    assert (params["temperature"], params["top_p"], params["max_tokens"]) == (0.5, 0.9, 7)
    assert params["stop_token_ids"] == [2] and params["seed"] == 3 and params["n"] == 1


def test_module_documents_every_sampling_field() -> None:
    import dataclasses

    for f in dataclasses.fields(gen.Sampling):
        assert f.metadata.get("help"), f.name
