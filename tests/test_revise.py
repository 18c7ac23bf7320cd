"""Token revision (Warmup-Distill's and SCRG's choice of the corrected position) with a teacher
whose probabilities are known exactly, and a real tiny student decoding greedily."""

from __future__ import annotations

import math
from functools import partial
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from kdlab.models.generation import Sampling, generate
from kdlab.models.tiny import build_preset
from kdlab.regimes.revise import (
    RevisionStats,
    TokenScores,
    first_low_probability,
    largest_kl_disagreement,
    revise,
    score_completions,
)
from kdlab.tasks import get_task

VOCAB, PAD, EOS = 21, 0, 2  # the arith tokenizer
KEY = 2  # the prompt position whose token selects a table of `TableLM`
BUDGET = 6  # max_new_tokens
GREEDY = Sampling(max_new_tokens=BUDGET, temperature=0, batch_size=8)


def prompt(d: int) -> list[int]:
    """`<s><|user|>d+2=<|assistant|>` (7 tokens); `d` selects the teacher's table."""
    return [1, 4, 6 + d, 16, 8, 19, 5]


P = len(prompt(0))
A, B, C = 1, 2, 3  # prompts whose greedy responses by the seed-1 student are 6, 3 (eos), 6 long


class TableLM(nn.Module):
    """A causal LM whose next-token distributions are read from a table: known exactly.

    The distribution at position `t` of a row is `table[row's token at KEY, t]`; every entry
    starts uniform. `set` gives completion token `j` of a prompt (predicted at position
    `P - 1 + j`) chosen probabilities, the remaining mass spread evenly over the other tokens.
    """

    def __init__(self, length: int = 32) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(VOCAB, length, VOCAB), requires_grad=False)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **_: object):  # noqa: ANN201
        keys = input_ids[:, KEY]  # [B]
        return SimpleNamespace(logits=self.table[keys, : input_ids.shape[1]])  # [B, T, V]

    def set(self, d: int, j: int, probs: dict[int, float]) -> None:
        self.table.data[prompt(d)[KEY], P - 1 + j] = distribution(probs).log()

    def agree(self, d: int, tokens: list[int]) -> None:
        """The teacher's argmax is `tokens[j]` at every completion position `j` (p = 0.9)."""
        for j, tok in enumerate(tokens):
            self.set(d, j, {tok: 0.9})


def distribution(probs: dict[int, float]) -> Tensor:
    rest = (1 - sum(probs.values())) / (VOCAB - len(probs))
    row = torch.full((VOCAB,), rest, dtype=torch.float64)
    for tok, p in probs.items():
        row[tok] = p
    return row


@pytest.fixture(scope="module")
def student() -> nn.Module:
    return build_preset("tiny", get_task("arith").build_tokenizer(), seed=1).eval()


def greedy(student: nn.Module, rows: list[list[int]], n: int) -> list[list[int]]:
    sampling = Sampling(max_new_tokens=n, temperature=0)
    return generate(student, rows, pad_id=PAD, eos_id=EOS, sampling=sampling)


def run(student, teacher, prompts, completions, *, rounds, choose=None, **kw):  # noqa: ANN001, ANN201
    choose = choose or partial(first_low_probability, **{"prob_threshold": 0.1, **kw})
    return revise(
        student=student,
        teacher=teacher,
        prompts=prompts,
        completions=completions,
        choose=choose,
        rounds=rounds,
        pad_id=PAD,
        eos_id=EOS,
        sampling=GREEDY,
    )


def other_than(*tokens: int) -> int:
    """A digit token that is none of `tokens` (and not eos)."""
    return next(t for t in range(6, 16) if t not in tokens)


def sampled(student: nn.Module, d: int) -> list[int]:
    c = greedy(student, [prompt(d)], BUDGET)[0]
    assert len(c) == BUDGET and EOS not in c  # the tests below need a full-length response
    return c


# ---------------------------------------------------------------------- first_low_probability


def test_a_low_probability_token_is_replaced_and_the_rest_regenerated(student) -> None:  # noqa: ANN001
    c, k = sampled(student, A), 2
    x = other_than(c[k])
    tail = greedy(student, [prompt(A) + c[:k] + [x]], BUDGET - k - 1)[0]
    expected = c[:k] + [x] + tail
    assert tail != c[k + 1 :]  # the continuation is really regenerated, not kept
    teacher = TableLM()
    teacher.agree(A, expected)  # every other position: the teacher agrees
    teacher.set(A, k, {x: 0.6, c[k]: 0.05})  # p_teacher(c[k]) = 0.05 < 0.1
    one = run(student, teacher, [prompt(A)], [c], rounds=1)
    assert one.completions == [expected] and one.revisions == [1]
    assert one.stats == RevisionStats(
        sequences=1, tokens_checked=6, tokens_revised=1, sequences_changed=1
    )
    # round 2 checks the 3 regenerated tokens (positions 3..5), finds nothing, stops
    four = run(student, teacher, [prompt(A)], [c], rounds=4)
    assert four.completions == [expected]
    assert four.stats == RevisionStats(
        sequences=1, tokens_checked=9, tokens_revised=1, sequences_changed=1
    )


def test_a_token_above_the_threshold_is_kept(student) -> None:  # noqa: ANN001
    c, k = sampled(student, A), 2
    x = other_than(c[k])
    teacher = TableLM()
    teacher.agree(A, c)
    teacher.set(A, k, {x: 0.6, c[k]: 0.2})  # the teacher prefers x but 0.2 >= 0.1
    kept = run(student, teacher, [prompt(A)], [c], rounds=4)
    assert kept.completions == [c] and kept.revisions == [0]
    assert kept.stats == RevisionStats(
        sequences=1, tokens_checked=6, tokens_revised=0, sequences_changed=0
    )
    stricter = run(student, teacher, [prompt(A)], [c], rounds=1, prob_threshold=0.25)
    assert stricter.completions[0][: k + 1] == c[:k] + [x]  # 0.2 < 0.25: revised


def test_the_margin_rule(student) -> None:  # noqa: ANN001
    c, k = sampled(student, A), 2
    x = other_than(c[k])
    with torch.no_grad():
        logits = student(torch.tensor([prompt(A) + c[:k]])).logits[0, -1]  # [V]
    gap = float(logits.log_softmax(-1)[c[k]]) - math.log(0.02)  # log p_s - log p_t, in nats
    assert gap > 0.1
    teacher = TableLM()
    teacher.agree(A, c)
    teacher.set(A, k, {x: 0.6, c[k]: 0.02})
    # p_teacher = 0.02 passes the probability rule at 0.01: only the margin can revise
    never = run(student, teacher, [prompt(A)], [c], rounds=1, prob_threshold=0.01)
    assert never.completions == [c]
    over = run(student, teacher, [prompt(A)], [c], rounds=1, prob_threshold=0.01, margin=gap - 0.05)
    assert over.completions[0][: k + 1] == c[:k] + [x] and over.revisions == [1]
    under = run(
        student, teacher, [prompt(A)], [c], rounds=1, prob_threshold=0.01, margin=gap + 0.05
    )
    assert under.completions == [c] and under.revisions == [0]


def test_rounds_are_bounded_and_each_revises_one_token(student) -> None:  # noqa: ANN001
    """The teacher rejects, in turn, the token after each revision: rounds stop the chain."""
    c = sampled(student, A)
    prefix, k, teacher = c[:1], 1, TableLM()
    teacher.agree(A, c)
    chain, token = [], c[k]
    for j in range(k, k + 3):  # revise at 1, then at 2, then at 3
        chain.append(other_than(token))
        tail = greedy(student, [prompt(A) + prefix + chain], BUDGET - j - 1)[0]
        assert len(tail) == BUDGET - j - 1
        token = tail[0] if tail else -1
    teacher.agree(A, [*prefix, *chain, *tail])  # after the third revision the teacher agrees
    for j, x in enumerate(chain, start=k):
        teacher.set(A, j, {x: 0.6})  # any other token there has p = 0.4 / 20 = 0.02 < 0.1
    results = {r: run(student, teacher, [prompt(A)], [c], rounds=r) for r in (2, 3, 4)}
    assert results[2].completions[0][:3] == [*prefix, *chain[:2]]
    assert results[2].completions[0][3] != chain[2]  # the third rejection needed a third round
    assert results[3].completions == [[*prefix, *chain, *tail]]
    assert [results[r].revisions for r in (2, 3, 4)] == [[2], [3], [3]]
    # checked: round 1 all 6, round 2 from position 2 (4), round 3 from 3 (3), round 4 from 4 (2)
    assert [results[r].stats.tokens_checked for r in (2, 3, 4)] == [10, 13, 15]


def test_an_eos_replacement_ends_the_response(student) -> None:  # noqa: ANN001
    c, k = sampled(student, A), 2
    teacher = TableLM()
    teacher.agree(A, c)
    teacher.set(A, k, {EOS: 0.6, c[k]: 0.01})
    result = run(student, teacher, [prompt(A)], [c], rounds=4)
    assert result.completions == [c[:k] + [EOS]]
    assert result.stats == RevisionStats(
        sequences=1, tokens_checked=6, tokens_revised=1, sequences_changed=1
    )


def test_statistics_of_a_batch_worked_by_hand(student) -> None:  # noqa: ANN001
    """Three responses revised together: one revised mid-way, one kept, one cut to eos."""
    a, c = sampled(student, A), sampled(student, C)
    b = greedy(student, [prompt(B)], BUDGET)[0]
    assert len(b) == 3 and b[-1] == EOS  # a shorter response, ended by eos
    x = other_than(a[2])
    tail = greedy(student, [prompt(A) + a[:2] + [x]], BUDGET - 3)[0]
    teacher = TableLM()
    teacher.agree(A, a[:2] + [x] + tail)
    teacher.set(A, 2, {x: 0.6, a[2]: 0.05})  # response a: revised at 2, regenerated
    teacher.agree(B, b)  # response b: kept
    teacher.agree(C, c)
    teacher.set(C, 0, {EOS: 0.5, c[0]: 0.001})  # response c: its first token becomes eos
    result = run(student, teacher, [prompt(A), prompt(B), prompt(C)], [a, b, c], rounds=3)
    assert result.completions == [a[:2] + [x] + tail, b, [EOS]]
    assert result.revisions == [1, 0, 1]
    # round 1: 6 + 3 + 6 tokens; round 2: a's positions 3..5 only; round 3: nothing open
    assert result.stats == RevisionStats(
        sequences=3, tokens_checked=18, tokens_revised=2, sequences_changed=2
    )


def test_first_low_probability_on_hand_built_scores() -> None:
    scores = TokenScores(
        teacher_logp=torch.log(torch.tensor([0.05, 0.5, 0.02, 0.3])),
        teacher_argmax=torch.tensor([5, 9, 9, 9]),
        student_logp=torch.log(torch.tensor([0.1, 0.5, 0.5, 0.9])),
        kl=torch.zeros(4),
    )
    tokens = [5, 6, 7, 8]  # position 0 agrees with the teacher: never revised, however unlikely
    assert first_low_probability(scores, tokens, 0, prob_threshold=0.1) == (2, 9)
    assert first_low_probability(scores, tokens, 3, prob_threshold=0.1) is None
    # margin: position 3 has log 0.9 - log 0.3 = 1.0986 nats; position 2 has log 25 = 3.22
    assert first_low_probability(scores, tokens, 3, prob_threshold=0.1, margin=1.0) == (3, 9)
    assert first_low_probability(scores, tokens, 3, prob_threshold=0.1, margin=1.2) is None


# ---------------------------------------------------------------------- SCRG's choice


def test_largest_kl_disagreement_on_hand_built_scores() -> None:
    scores = TokenScores(
        teacher_logp=torch.zeros(4),
        teacher_argmax=torch.tensor([5, 9, 9, 8]),
        student_logp=torch.zeros(4),
        kl=torch.tensor([3.0, 0.5, 1.0, 2.5]),  # the largest KLs are where the teacher agrees
    )
    tokens = [5, 6, 7, 8]
    assert largest_kl_disagreement(scores, tokens, 0) == (2, 9)
    assert largest_kl_disagreement(scores, tokens, 3) is None
    assert largest_kl_disagreement(scores, [5, 9, 9, 8], 0) is None


def test_score_completions_and_the_scrg_choice_with_known_models() -> None:
    teacher, student = TableLM(), TableLM()
    comp = [10, 11, 12, 13]
    teacher_rows = [{10: 0.7}, {14: 0.5, 11: 0.3}, {15: 0.5, 12: 0.2}, {13: 0.9}]
    student_rows = [{10: 0.02}, {11: 0.5}, {12: 0.8}, {13: 0.1}]
    for j, (t, s) in enumerate(zip(teacher_rows, student_rows, strict=True)):
        teacher.set(A, j, t)
        student.set(A, j, s)
    (scores,) = score_completions(student, teacher, [prompt(A)], [comp], pad_id=PAD)
    p = [distribution(t) for t in teacher_rows]
    q = [distribution(s) for s in student_rows]
    kl = [float((pj * (pj.log() - qj.log())).sum()) for pj, qj in zip(p, q, strict=True)]
    assert scores.kl.tolist() == pytest.approx(kl, abs=1e-5)
    assert scores.teacher_argmax.tolist() == [10, 14, 15, 13]
    assert scores.teacher_logp.exp().tolist() == pytest.approx([0.7, 0.3, 0.2, 0.9], abs=1e-6)
    assert scores.student_logp.exp().tolist() == pytest.approx([0.02, 0.5, 0.8, 0.1], abs=1e-6)
    assert max(range(4), key=kl.__getitem__) == 0 and kl[2] > kl[1]  # overall vs disagreeing
    assert largest_kl_disagreement(scores, comp, 0) == (2, 15)


def test_scrg_revision_corrects_one_position_per_round(student) -> None:  # noqa: ANN001
    c = sampled(student, A)
    teacher = TableLM()
    teacher.agree(A, c)
    x1, x3 = other_than(c[1]), other_than(c[3])
    teacher.set(A, 1, {x1: 0.5})  # two disagreements; the choice goes by KL
    teacher.set(A, 3, {x3: 0.9})
    with torch.no_grad():
        q = student(torch.tensor([prompt(A) + c])).logits[0, P - 1 : P - 1 + BUDGET]  # [6, V]
    q = q.double().log_softmax(-1)
    kl = {
        j: float((p * (p.log() - q[j])).sum())
        for j, p in ((1, distribution({x1: 0.5})), (3, distribution({x3: 0.9})))
    }
    k = max(kl, key=kl.__getitem__)
    x = {1: x1, 3: x3}[k]
    tail = greedy(student, [prompt(A) + c[:k] + [x]], BUDGET - k - 1)[0]
    one = run(student, teacher, [prompt(A)], [c], rounds=1, choose=largest_kl_disagreement)
    assert one.completions == [c[:k] + [x] + tail]
    assert one.revisions == [1] and one.stats.tokens_revised == 1
    two = run(student, teacher, [prompt(A)], [c], rounds=2, choose=largest_kl_disagreement)
    assert two.revisions == [2] and two.stats.tokens_revised == 2
    assert two.completions[0][: k + 1] == c[:k] + [x]  # round 2 corrects after round 1's token
