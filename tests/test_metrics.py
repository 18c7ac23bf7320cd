"""Evaluation metrics on tiny models and on fake models with known outputs."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from kdlab.data.collate import Encoded, collate
from kdlab.eval import (
    answer_agreement,
    fidelity,
    generate_answers,
    golden_kl,
    golden_metrics,
    perplexity,
    score_answers,
    task_accuracy,
)
from kdlab.eval.metrics import teacher_log_probs
from kdlab.models import build_preset
from kdlab.tasks import ArithTask, OracleTask


def _batches(tokenizer, examples, batch_size=4) -> list[dict[str, Tensor]]:
    """Completion-only batches: bos + prompt + completion + eos, completion and eos counted."""
    encoded = []
    for ex in examples:
        prompt = tokenizer(ex["prompt"])["input_ids"]
        rest = tokenizer(ex["completion"], add_special_tokens=False)["input_ids"]
        ids = prompt + rest + [tokenizer.eos_token_id]
        encoded.append(Encoded(ids, [False] * len(prompt) + [True] * (len(rest) + 1), len(prompt)))
    pad = tokenizer.pad_token_id
    return [collate(encoded[i : i + batch_size], pad) for i in range(0, len(encoded), batch_size)]


class _FixedLogits(nn.Module):
    """A fake causal LM whose logits are `fn(input_ids)`."""

    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None) -> SimpleNamespace:
        return SimpleNamespace(logits=self.fn(input_ids))


class _OracleModel(_FixedLogits):
    """Outputs the log of the oracle's true next-token distribution; greedy `generate` on it."""

    def __init__(self, task: OracleTask, tokenizer) -> None:
        super().__init__(lambda ids: task.true_next_token_probs(ids, tokenizer).log())

    def generate(self, input_ids, attention_mask, generation_config) -> Tensor:
        pad, eos, rows = generation_config.pad_token_id, generation_config.eos_token_id, []
        for ids, mask in zip(input_ids, attention_mask, strict=True):
            seq = ids[mask.bool()].tolist()
            new: list[int] = []
            while len(new) < generation_config.max_new_tokens and not set(new[-1:]) & set(eos):
                new.append(int(self(torch.tensor([seq + new])).logits[0, -1].argmax()))
            rows.append(ids.tolist() + new)
        width = max(len(r) for r in rows)
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


@pytest.fixture(scope="module")
def arith():
    task = ArithTask()
    tok = task.build_tokenizer()
    return task, tok, _batches(tok, task.make_examples(12, seed=0, split="test"))


def test_fidelity_of_a_model_with_itself(arith):
    _, tok, batches = arith
    model = build_preset("tiny", tok)
    result = fidelity(model, model, batches)
    assert result["top1_agreement"] == 1.0
    assert abs(result["kl_teacher_student"]) < 1e-6
    assert model.training  # training mode restored


def test_fidelity_slices_padded_lm_head(arith):
    _, tok, batches = arith
    model = build_preset("tiny", tok).eval()
    padded = _FixedLogits(
        lambda ids: torch.cat([model(ids).logits, torch.zeros(*ids.shape, 11)], -1)
    )
    result = fidelity(padded, model, batches)
    assert result["top1_agreement"] == 1.0 and abs(result["kl_teacher_student"]) < 1e-6
    # the padded model as the teacher, its log-probs computed once: renormalised over shared ids
    once = teacher_log_probs(padded, batches)
    wider = fidelity(model, once, batches)
    assert wider["top1_agreement"] == 1.0 and abs(wider["kl_student_teacher"]) < 1e-6
    other = fidelity(build_preset("tiny", tok, seed=1), model, batches)
    assert other["kl_teacher_student"] > 0 and other["top1_agreement"] < 1


def test_fidelity_topk_overlap_and_both_kl_directions_by_hand(arith):
    """Fixed distributions over 4 tokens, the same at every position.

    p (teacher) = [0.4, 0.3, 0.2, 0.1], q (student) = [0.1, 0.2, 0.3, 0.4]:
    top-2(p) = {0, 1}, top-2(q) = {3, 2} -> overlap 0; top-3: {0,1,2} ∩ {3,2,1} = 2 -> 2/3.
    KL(p‖q) = Σ p log(p/q) = 0.4 ln 4 + 0.3 ln 1.5 + 0.2 ln(2/3) + 0.1 ln(1/4) = 0.45656;
    KL(q‖p) is the same by the symmetry of this pair (q is p reversed).
    """
    _, tok, batches = arith
    p = torch.tensor([0.4, 0.3, 0.2, 0.1])
    q = torch.tensor([0.1, 0.2, 0.3, 0.4])
    teacher = _FixedLogits(lambda ids: p.log().expand(*ids.shape, 4))
    student = _FixedLogits(lambda ids: q.log().expand(*ids.shape, 4))
    by_hand = 0.4 * math.log(4) + 0.3 * math.log(1.5) + 0.2 * math.log(2 / 3) + 0.1 * math.log(0.25)
    two = fidelity(student, teacher, batches, top_k=2)
    assert two["topk_overlap"] == 0.0 and two["top1_agreement"] == 0.0
    assert two["kl_teacher_student"] == pytest.approx(by_hand, rel=1e-5)
    assert two["kl_student_teacher"] == pytest.approx(by_hand, rel=1e-5)
    assert fidelity(student, teacher, batches, top_k=3)["topk_overlap"] == pytest.approx(2 / 3)
    # k larger than the vocabulary compares whole vocabularies
    assert fidelity(student, teacher, batches, top_k=50)["topk_overlap"] == 1.0
    # the directions differ for an asymmetric pair: KL(q‖p) with q = uniform
    uniform = _FixedLogits(lambda ids: torch.zeros(*ids.shape, 4))
    r = fidelity(uniform, teacher, batches)
    assert r["kl_student_teacher"] == pytest.approx(float((0.25 * (0.25 / p).log()).sum()))
    assert r["kl_teacher_student"] == pytest.approx(float((p * (p / 0.25).log()).sum()))
    with pytest.raises(ValueError, match="top_k"):
        fidelity(student, teacher, batches, top_k=0)


def test_perplexity_of_uniform_model_is_vocab_size(arith):
    _, tok, batches = arith
    uniform = _FixedLogits(lambda ids: torch.zeros(*ids.shape, len(tok)))
    assert perplexity(uniform, batches) == pytest.approx(len(tok), rel=1e-5)
    assert 1 < perplexity(build_preset("tiny", tok), batches) < 10 * len(tok)


def test_perplexity_rejects_fully_masked_batches(arith):
    _, tok, batches = arith
    masked = [{**batches[0], "labels": torch.full_like(batches[0]["labels"], -100)}]
    with pytest.raises(ValueError, match="no counted positions"):
        perplexity(build_preset("tiny", tok), masked)


def test_golden_kl_is_zero_for_the_true_distribution():
    task = OracleTask()
    tok = task.build_tokenizer()
    batches = _batches(tok, task.make_examples(8, seed=0, split="test"))
    exact = golden_metrics(_OracleModel(task, tok), task, tok, batches)
    assert abs(exact["golden_kl"]) < 1e-5 and exact["golden_top1"] == 1.0
    random_kl = golden_kl(build_preset("tiny", tok), task, tok, batches)
    assert random_kl > 0.1


def test_task_accuracy_of_the_oracle_itself_is_one():
    task = OracleTask(seq_length=8)
    tok = task.build_tokenizer()
    examples = task.make_examples(5, seed=0)
    assert task_accuracy(_OracleModel(task, tok), tok, task, examples, batch_size=2) == 1.0


def test_generate_answers_left_padding_matches_one_by_one():
    task = ArithTask(digits=3)
    tok = task.build_tokenizer()
    # a large init gives well-separated logits, so greedy choices have no near-ties
    model = build_preset("tiny", tok, initializer_range=0.5)
    prompts = ["1+2=", "37+45=", "5-99=", "123-4=", "7="]
    batched = generate_answers(model, tok, prompts, max_new_tokens=6, batch_size=4)
    single = [generate_answers(model, tok, [p], max_new_tokens=6)[0] for p in prompts]
    assert batched == single
    assert all(isinstance(a, str) and len(a) <= 6 for a in batched)
    assert tok.padding_side == "right" and model.training


def test_generate_answers_stops_at_eos():
    tok = ArithTask().build_tokenizer()
    model = build_preset("tiny", tok)
    head = nn.Linear(model.config.hidden_size, len(tok), bias=True)
    nn.init.zeros_(head.weight)
    model.lm_head = head
    with torch.no_grad():
        head.bias.copy_(torch.nn.functional.one_hot(torch.tensor(tok.eos_token_id), len(tok)))
    assert generate_answers(model, tok, ["1+1=", "22+3="], max_new_tokens=5) == ["", ""]
    with torch.no_grad():
        head.bias.copy_(
            torch.nn.functional.one_hot(torch.tensor(tok.convert_tokens_to_ids("7")), len(tok))
        )
    assert generate_answers(model, tok, ["1+1="], max_new_tokens=5) == ["77777"]


def test_scores_and_agreement():
    task = ArithTask()
    examples = [{"prompt": "1+2=", "completion": "3"}, {"prompt": "2+2=", "completion": "4"}]
    assert score_answers(task, examples, ["3", "5"]) == 0.5
    assert answer_agreement(["3", "5 "], ["3", "5"]) == 1.0
    assert answer_agreement(["3", "4"], ["3", "5"]) == 0.5
    with pytest.raises(ValueError, match="match"):
        answer_agreement(["1"], [])
    assert math.isclose(score_answers(task, examples[:1], ["3"]), 1.0)
