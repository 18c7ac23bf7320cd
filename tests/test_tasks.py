"""Built-in tasks: the tokenizer, `arith`, `oracle` (splits, true probabilities); tiny models."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from transformers import AutoTokenizer

from kdlab.models import PRESETS, build_preset, build_tiny_model
from kdlab.tasks import TASKS, ArithTask, OracleTask, build_char_tokenizer, get_task
from kdlab.tasks.arith import final_answer

# --- tokenizer ------------------------------------------------------------------------------------


def test_tokenizer_round_trips_text_and_adds_only_bos():
    tok = build_char_tokenizer("ab c\n01")
    text = "ab c\n10 a"
    ids = tok(text)["input_ids"]
    assert ids[0] == tok.bos_token_id and tok.eos_token_id not in ids
    assert len(ids) == len(text) + 1
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert tok(text, add_special_tokens=False)["input_ids"] == ids[1:]
    assert tok("x", add_special_tokens=False)["input_ids"] == [tok.unk_token_id]
    assert [tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id] == [0, 1, 2, 3]


def test_chat_template_renders_and_tokenizes():
    tok = ArithTask().build_tokenizer()
    chat = [{"role": "user", "content": "3+4="}, {"role": "assistant", "content": "7"}]
    assert tok.apply_chat_template(chat, tokenize=False) == "<s><|user|>3+4=<|assistant|>7</s>"
    prompt = tok.apply_chat_template(chat[:1], tokenize=False, add_generation_prompt=True)
    assert prompt == "<s><|user|>3+4=<|assistant|>"
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]
    assert tok.unk_token_id not in ids
    assert tok.decode(ids, skip_special_tokens=True) == "3+4="


def test_tokenizer_save_load_round_trip(tmp_path):
    tok = OracleTask().build_tokenizer()
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded.get_vocab() == tok.get_vocab() and len(loaded) == len(tok)
    assert loaded.all_special_tokens == tok.all_special_tokens
    for attr in ["bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "chat_template"]:
        assert getattr(loaded, attr) == getattr(tok, attr)
    text = "abcpz"
    assert loaded(text)["input_ids"] == tok(text)["input_ids"]
    assert loaded.decode(tok(text)["input_ids"]) == tok.decode(tok(text)["input_ids"])


# --- arith ----------------------------------------------------------------------------------------


def test_arith_examples_and_registry():
    assert set(TASKS.names()) >= {"arith", "oracle"}
    task = get_task("arith", digits=2, ops="+")
    examples = task.make_examples(50, seed=0)
    assert len(examples) == 50
    for ex in examples:
        a, b = ex["prompt"].rstrip("=").split("+")
        assert ex["completion"] == str(int(a) + int(b)) and ex["prompt"].endswith("=")
    assert examples == task.make_examples(50, seed=0)
    assert examples != task.make_examples(50, seed=1)
    tok = task.build_tokenizer()
    assert len(tok) <= 24
    assert (
        tok.unk_token_id
        not in tok("".join(e["prompt"] + e["completion"] for e in examples))["input_ids"]
    )


def test_arith_splits_are_disjoint():
    task = ArithTask(digits=2, ops="+-")

    def key(prompt: str) -> tuple[int, str, int]:
        op = "+" if "+" in prompt else "-"
        a, b = (int(x) for x in prompt.rstrip("=").split(op))
        return (min(a, b), op, max(a, b)) if op == "+" else (a, op, b)

    splits = {s: task.make_examples(2000, seed=3, split=s) for s in ["train", "validation", "test"]}
    keys = {s: {key(e["prompt"]) for e in ex} for s, ex in splits.items()}
    assert not keys["train"] & keys["test"]
    assert not keys["train"] & keys["validation"]
    assert not keys["validation"] & keys["test"]
    problems = list(itertools.product(range(100), "+-", range(100)))
    counts = {s: sum(task.split_of(*p) == s for p in problems) for s in splits}
    assert 0.75 < counts["train"] / len(problems) < 0.85  # default 80/10/10


@pytest.mark.parametrize("scratchpad", [False, True])
@pytest.mark.parametrize("digits", [1, 2])
def test_arith_max_new_tokens_covers_every_problem(digits, scratchpad):
    task = ArithTask(digits=digits, ops="+-*", scratchpad=scratchpad)
    tok = task.build_tokenizer()
    longest = max(
        len(task.example(a, op, b)["completion"])
        for a, op, b in itertools.product(range(10**digits), "+-*", range(10**digits))
    )
    assert task.max_new_tokens == longest + 1
    completion = task.example(10**digits - 1, "*", 10**digits - 1)["completion"]
    assert len(tok(completion, add_special_tokens=False)["input_ids"]) == len(completion)


def test_arith_scratchpad_steps_are_correct_and_score_uses_final_answer():
    task = ArithTask(digits=3, ops="+-*", scratchpad=True)
    for ex in task.make_examples(100, seed=0):
        *steps, answer = ex["completion"].split(";")
        assert answer == str(eval(ex["prompt"].rstrip("=")))  # noqa: S307 (digits and + - * only)
        for step in steps:
            lhs, rhs = step.split("=")
            assert str(eval(lhs)) == rhs  # noqa: S307
        assert task.score(ex, answer) and task.score(ex, ex["completion"])
        assert not task.score(ex, answer + "1")
    assert ArithTask().score({"prompt": "1+2=", "completion": "3"}, " 3 ")
    assert final_answer("1+2=3;3") == "3"


def test_arith_rejects_bad_arguments():
    with pytest.raises(ValueError, match="valid splits"):
        ArithTask().make_examples(1, seed=0, split="dev")
    with pytest.raises(ValueError, match="ops"):
        ArithTask(ops="/")
    with pytest.raises(ValueError, match="unknown task"):
        get_task("nope")


# --- oracle ---------------------------------------------------------------------------------------


def test_oracle_examples():
    task = OracleTask()
    examples = task.make_examples(20, seed=0, split="test")
    for ex in examples:
        assert len(ex["prompt"]) == task.prompt_length
        assert len(ex["prompt"] + ex["completion"]) == task.seq_length
        assert set(ex["prompt"] + ex["completion"]) <= set(task.symbols)
    assert examples == task.make_examples(20, seed=0, split="test")
    assert examples != task.make_examples(20, seed=0, split="train")
    assert task.max_new_tokens == task.seq_length - task.prompt_length + 1


def _brute_force_next_probs(task: OracleTask, prefix: tuple[int, ...]) -> np.ndarray:
    """P(next symbol | prefix) by summing the joint over every hidden-state path."""

    def joint(seq: tuple[int, ...]) -> float:
        if not seq:
            return 1.0
        total = 0.0
        for path in itertools.product(range(task.initial.size), repeat=len(seq)):
            p = task.initial[path[0]]
            for t in range(len(seq)):
                p *= task.emission[path[t], seq[t]]
                p *= task.transition[path[t], path[t + 1]] if t + 1 < len(seq) else 1.0
            total += p
        return total

    symbols = range(len(task.symbols))
    return np.array([joint((*prefix, x)) for x in symbols]) / joint(prefix)


def test_oracle_true_probs_match_brute_force():
    task = OracleTask(num_states=3, num_symbols=3, seq_length=4, prompt_length=1, concentration=0.5)
    tok = task.build_tokenizer()
    sym_ids = tok.convert_tokens_to_ids(list(task.symbols))
    seqs = list(itertools.product(range(3), repeat=4))
    input_ids = torch.tensor(
        [[tok.bos_token_id, *(sym_ids[x] for x in s), tok.eos_token_id] for s in seqs]
    )
    probs = task.true_next_token_probs(input_ids, tok)  # [81, 6, V]
    assert probs.shape == (81, 6, len(tok))
    torch.testing.assert_close(probs.sum(-1), torch.ones(81, 6))
    for row, seq in enumerate(seqs[::7]):
        for i in range(4):
            expected = _brute_force_next_probs(task, seq[:i])
            got = probs[row * 7, i, sym_ids].double().numpy()
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-7)
    assert torch.all(probs[:, 4, tok.eos_token_id] == 1)  # after seq_length symbols: eos
    assert torch.all(probs[:, 5, tok.pad_token_id] == 1)  # after eos: not part of the language


def test_oracle_true_probs_without_bos_and_with_padding():
    task = OracleTask()
    tok = task.build_tokenizer()
    seq = task.make_examples(1, seed=0)[0]
    text = seq["prompt"] + seq["completion"]
    with_bos = torch.tensor([tok(text)["input_ids"]])
    no_bos = torch.tensor([tok(text, add_special_tokens=False)["input_ids"]])
    torch.testing.assert_close(
        task.true_next_token_probs(no_bos, tok), task.true_next_token_probs(with_bos, tok)[:, 1:]
    )
    padded = torch.tensor([[*with_bos[0, :5].tolist(), tok.eos_token_id, tok.pad_token_id]])
    probs = task.true_next_token_probs(padded, tok)[0]
    torch.testing.assert_close(probs.sum(-1), torch.ones(7))
    assert probs[5, tok.pad_token_id] == 1 and probs[6, tok.pad_token_id] == 1
    special = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, tok.unk_token_id]
    assert torch.all(probs[:5, special] == 0)
    beyond_vocab = torch.tensor([[tok.bos_token_id, len(tok) + 3]])  # e.g. a padded lm_head's id
    assert task.true_next_token_probs(beyond_vocab, tok)[0, 1, tok.pad_token_id] == 1


def test_oracle_greedy_continuation_follows_true_argmax():
    task = OracleTask()
    tok = task.build_tokenizer()
    ex = task.make_examples(1, seed=4)[0]
    greedy = task.greedy_continuation(ex["prompt"])
    assert len(greedy) == task.seq_length - task.prompt_length
    ids = torch.tensor([tok(ex["prompt"] + greedy)["input_ids"]])
    argmax = task.true_next_token_probs(ids, tok)[0].argmax(-1)  # [T]
    assert argmax[task.prompt_length : -1].tolist() == ids[0, task.prompt_length + 1 :].tolist()
    assert task.score(ex, greedy) and not task.score(ex, greedy[::-1] + "x")


# --- models ---------------------------------------------------------------------------------------


def test_tiny_model_is_deterministic_and_keeps_global_rng():
    tok = ArithTask().build_tokenizer()
    state = torch.get_rng_state()
    a, b = build_preset("tiny", tok, seed=1), build_preset("tiny", tok, seed=1)
    assert torch.equal(torch.get_rng_state(), state)
    assert all(
        torch.equal(x, y)
        for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True)
    )
    c = build_preset("tiny", tok, seed=2)
    assert not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert a.config.vocab_size == len(tok) and a.config.pad_token_id == tok.pad_token_id
    assert a.config.eos_token_id == tok.eos_token_id and a.config.bos_token_id == tok.bos_token_id
    assert a.config.num_hidden_layers == PRESETS["tiny"]["num_layers"]


def test_tiny_model_options_and_preset_errors():
    tok = ArithTask().build_tokenizer()
    model = build_tiny_model(
        tok,
        hidden_size=16,
        num_layers=1,
        num_heads=2,
        intermediate_size=32,
        tie_word_embeddings=True,
    )
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert build_preset("small", tok, num_layers=1).config.num_hidden_layers == 1
    with pytest.raises(ValueError, match="valid presets: tiny, small, base"):
        build_preset("huge", tok)
    with pytest.raises(ValueError, match="divisible"):
        build_tiny_model(tok, hidden_size=30, num_layers=1, num_heads=4, intermediate_size=8)
