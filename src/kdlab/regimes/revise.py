"""Token-level revision of generated completions by the teacher, shared by Warmup-Distill and SCRG.

The teacher scores every token of a completion; a *chooser* picks at most one position per
sequence and the teacher's token to put there; the student regenerates the rest of the completion
from the corrected prefix; this repeats for a number of rounds. The two choosers:

- `first_low_probability` (Warmup-Distill): the first token the teacher finds unlikely
  (probability below a threshold, or the student more confident than the teacher by a margin);
- `largest_kl_disagreement` (SCRG): among tokens that differ from the teacher's argmax, the one
  where KL(teacher || student) is largest.

Both only pick positions where the teacher's argmax differs from the token there: replacing a
token by itself would change nothing.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.models.generation import Sampling, eos_ids, eval_mode, generate


@dataclass(frozen=True)
class TokenScores:
    """Per-token view of one completion of length `L` by both models.

    Attributes:
        teacher_logp: `[L]` log p_teacher(token_t | prefix).
        teacher_argmax: `[L]` the teacher's most likely token at t.
        student_logp: `[L]` log p_student(token_t | prefix).
        kl: `[L]` KL(p_teacher || p_student) of the next-token distributions at t, in nats.
    """

    teacher_logp: Tensor
    teacher_argmax: Tensor
    student_logp: Tensor
    kl: Tensor


Choice = tuple[int, int]  # (position in the completion, the teacher's token for it)
Chooser = Callable[[TokenScores, Sequence[int], int], Choice | None]


def first_low_probability(
    scores: TokenScores,
    tokens: Sequence[int],
    start: int,
    *,
    prob_threshold: float,
    margin: float | None = None,
) -> Choice | None:
    """Warmup-Distill's check: the first position `t >= start` whose token the teacher rejects.

    A token is rejected when the teacher's argmax is another token and either
    `p_teacher(token) < prob_threshold`, or (`margin` set) the student is more confident in it than
    the teacher by more than `margin` nats: `log p_student(token) - log p_teacher(token) > margin`.
    """
    log_threshold = math.log(prob_threshold) if prob_threshold > 0 else -math.inf
    for t in range(start, len(tokens)):
        teacher_token = int(scores.teacher_argmax[t])
        if teacher_token == tokens[t]:
            continue
        low = float(scores.teacher_logp[t]) < log_threshold
        gap = float(scores.student_logp[t] - scores.teacher_logp[t])
        over = margin is not None and gap > margin
        if low or over:
            return t, teacher_token
    return None


def largest_kl_disagreement(
    scores: TokenScores, tokens: Sequence[int], start: int
) -> Choice | None:
    """SCRG's choice: among `t >= start` with token != teacher argmax, the largest token KL."""
    best: Choice | None = None
    best_kl = -math.inf
    for t in range(start, len(tokens)):
        teacher_token = int(scores.teacher_argmax[t])
        if teacher_token != tokens[t] and float(scores.kl[t]) > best_kl:
            best, best_kl = (t, teacher_token), float(scores.kl[t])
    return best


@torch.no_grad()
def score_completions(
    student: nn.Module,
    teacher: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    *,
    pad_id: int,
    vocab: int | None = None,
    batch_size: int = 32,
) -> list[TokenScores]:
    """`TokenScores` of every completion (each non-empty) after its prompt, in batches."""
    out: list[TokenScores] = []
    with eval_mode(student, teacher):
        for start in range(0, len(prompts), batch_size):
            rows = range(start, min(start + batch_size, len(prompts)))
            sequences = [[*prompts[i], *completions[i]] for i in rows]
            t_logits = _next_token_logits(teacher, sequences, pad_id, vocab)  # [b, T, V]
            s_logits = _next_token_logits(student, sequences, pad_id, vocab).to(t_logits.device)
            for b, i in enumerate(rows):
                first = len(prompts[i]) - 1  # position predicting the first completion token
                span = slice(first, first + len(completions[i]))
                out.append(_scores(s_logits[b, span], t_logits[b, span], completions[i]))
    return out


def _next_token_logits(
    model: nn.Module, sequences: list[list[int]], pad_id: int, vocab: int | None
) -> Tensor:
    device = next(model.parameters()).device
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for b, seq in enumerate(sequences):
        ids[b, : len(seq)] = torch.tensor(seq)
        mask[b, : len(seq)] = 1
    logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
    return logits if vocab is None else logits[..., :vocab]  # stays on the model's device


def _scores(student_logits: Tensor, teacher_logits: Tensor, tokens: Sequence[int]) -> TokenScores:
    """Per-token scores of one completion; only the `[L]` results leave the device."""
    s_logp = F.log_softmax(student_logits.float(), dim=-1)  # [L, V]
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    index = torch.tensor(list(tokens), device=t_logp.device).unsqueeze(-1)
    kl = torch.where(t_logp.isfinite(), t_logp.exp() * (t_logp - s_logp), 0.0).sum(-1)
    return TokenScores(
        teacher_logp=t_logp.gather(-1, index).squeeze(-1).cpu(),
        teacher_argmax=t_logp.argmax(-1).cpu(),
        student_logp=s_logp.gather(-1, index).squeeze(-1).cpu(),
        kl=kl.cpu(),
    )


@dataclass
class RevisionStats:
    """What a revision pass did.

    Attributes:
        sequences: completions given to the pass.
        tokens_checked: completion tokens the teacher scored, summed over rounds (a token that
            survives into the next round is scored again there).
        tokens_revised: tokens replaced by the teacher's choice.
        sequences_changed: completions that differ from what they were before the pass.
    """

    sequences: int = 0
    tokens_checked: int = 0
    tokens_revised: int = 0
    sequences_changed: int = 0

    def add(self, other: RevisionStats) -> None:
        for f in dataclasses.fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def as_dict(self) -> dict[str, int]:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class Revised:
    completions: list[list[int]]
    revisions: list[int]  # tokens replaced per sequence
    checked: list[int]  # tokens the teacher scored per sequence, summed over rounds
    stats: RevisionStats


def revise(
    *,
    student: nn.Module,
    teacher: nn.Module,
    prompts: Sequence[Sequence[int]],
    completions: Sequence[Sequence[int]],
    choose: Chooser,
    rounds: int,
    pad_id: int,
    eos_id: int | Sequence[int] | None,
    sampling: Sampling,
    seed: int = 0,
    vocab: int | None = None,
) -> Revised:
    """Revise `completions` for up to `rounds` rounds of score -> choose -> regenerate.

    In each round the teacher (with the student, for the margin and KL) scores every still-open
    completion from its `start` (the position after its last revision); `choose` picks at most one
    position; the completion is cut there, the teacher's token appended, and the student
    regenerates the rest (unless the new token is eos or the `max_new_tokens` budget is used up).
    A completion with no choice in a round is final.

    Args:
        student: generates the continuations (and gives its own token probabilities).
        teacher: scores the tokens.
        prompts / completions: `N` token-id lists each; completions without eos are fine.
        choose: `first_low_probability`, `largest_kl_disagreement` or any `Chooser`.
        rounds: the most revisions per completion.
        pad_id, eos_id: the tokenizer's ids.
        sampling: how the student regenerates; `max_new_tokens` bounds the whole completion.
        seed: seeds the regeneration of each round (round r uses `seed + r`).
        vocab: logits compared (trims a padded lm_head).

    Returns:
        The revised completions, revisions per sequence, and `RevisionStats`.
    """
    eos = set(eos_ids(student, eos_id))
    comps = [list(c) for c in completions]
    starts = [0] * len(comps)
    revisions = [0] * len(comps)
    checked = [0] * len(comps)
    stats = RevisionStats(sequences=len(comps))
    open_rows = [i for i, c in enumerate(comps) if c]
    for r in range(rounds):
        if not open_rows:
            break
        scores = score_completions(
            student,
            teacher,
            [prompts[i] for i in open_rows],
            [comps[i] for i in open_rows],
            pad_id=pad_id,
            vocab=vocab,
            batch_size=sampling.batch_size,
        )
        revised_rows = []
        for i, sc in zip(open_rows, scores, strict=True):
            checked[i] += len(comps[i]) - starts[i]
            choice = choose(sc, comps[i], starts[i])
            if choice is None:
                continue
            pos, token = choice
            comps[i] = [*comps[i][:pos], token]
            starts[i] = pos + 1
            revisions[i] += 1
            revised_rows.append(i)
        stats.tokens_revised += len(revised_rows)
        _regenerate(student, prompts, comps, revised_rows, eos, pad_id, sampling, seed + r)
        open_rows = [i for i in revised_rows if starts[i] < len(comps[i])]
    stats.tokens_checked = sum(checked)
    stats.sequences_changed = sum(
        new != list(old) for new, old in zip(comps, completions, strict=True)
    )
    return Revised(comps, revisions, checked, stats)


def _regenerate(
    student: nn.Module,
    prompts: Sequence[Sequence[int]],
    comps: list[list[int]],
    rows: list[int],
    eos: set[int],
    pad_id: int,
    sampling: Sampling,
    seed: int,
) -> None:
    """Extend `comps[i]` for `i in rows` with the student's continuation, in place."""
    budget = sampling.max_new_tokens
    rows = [i for i in rows if comps[i][-1] not in eos and len(comps[i]) < budget]
    if not rows:
        return
    longest = budget - min(len(comps[i]) for i in rows)
    continuations = generate(
        student,
        [[*prompts[i], *comps[i]] for i in rows],
        pad_id=pad_id,
        eos_id=sorted(eos),
        sampling=dataclasses.replace(sampling, max_new_tokens=longest),
        seed=seed,
    )
    for i, cont in zip(rows, continuations, strict=True):
        comps[i].extend(cont[: budget - len(comps[i])])
