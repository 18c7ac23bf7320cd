"""`arith`: integer arithmetic with exact-match answers, scored by greedy generation.

A prompt is `"37+45="`, its completion `"82"`. With `scratchpad=True` the completion first works
through the second operand place by place and ends with the answer after the last `;`:
`"37+40=77;77+5=82;82"`. Only that final answer is scored, as on GSM8K-style benchmarks.
"""

from __future__ import annotations

import hashlib
import random

from transformers import PreTrainedTokenizerFast

from kdlab.tasks.base import TASKS, Task
from kdlab.tasks.tokenizer import build_char_tokenizer

ALPHABET = "0123456789+-*=;"
OPS = "+-*"
SPLITS = ("train", "validation", "test")


def _apply(a: int, op: str, b: int) -> int:
    return a + b if op == "+" else a - b if op == "-" else a * b


def _place_parts(b: int) -> list[int]:
    """`b` split into its non-zero place values, largest first: 405 -> [400, 5]; 0 -> [0]."""
    parts = [int(d) * 10**i for i, d in enumerate(reversed(str(b))) if d != "0"]
    return list(reversed(parts)) or [0]


def scratchpad(a: int, op: str, b: int) -> str:
    """The worked steps for `a op b`, ending with `;answer`. `*` sums its partial products."""
    if op == "*":
        parts = _place_parts(b)
        steps = [f"{a}*{p}={a * p}" for p in parts]
        total = a * parts[0]
        for p in parts[1:]:
            steps.append(f"{total}+{a * p}={total + a * p}")
            total += a * p
    else:
        steps, total = [], a
        for p in _place_parts(b):
            steps.append(f"{total}{op}{p}={_apply(total, op, p)}")
            total = _apply(total, op, p)
    return ";".join([*steps, str(total)])


def final_answer(text: str) -> str:
    """The answer in a completion: the text after the last `;` (all of it without a scratchpad)."""
    return text.strip().rsplit(";", 1)[-1].strip()


def _unit_interval(key: str) -> float:
    """A stable hash of `key` in [0, 1): the same on every machine and Python process."""
    digest = hashlib.blake2b(key.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


@TASKS.register("arith")
class ArithTask(Task):
    """Integer arithmetic `a op b` with operands drawn uniformly from `[0, 10**digits)`.

    Splits are disjoint: each problem (operands sorted for `+` and `*`, so `3+5` and `5+3` are the
    same problem) goes to `train`, `validation` or `test` by a stable hash of its text.

    Args:
        digits: operand digits; the main difficulty knob (2-digit `+` has 5,050 distinct problems).
        ops: the operators to draw from, a subset of `"+-*"`.
        scratchpad: write worked steps before the answer (see the module docstring).
        validation_fraction: share of problems held out for `validation`.
        test_fraction: share of problems held out for `test`.
    """

    name = "arith"

    def __init__(
        self,
        digits: int = 2,
        ops: str = "+",
        scratchpad: bool = False,
        validation_fraction: float = 0.1,
        test_fraction: float = 0.1,
    ) -> None:
        if digits < 1:
            raise ValueError(f"digits must be >= 1, got {digits}")
        if not ops or any(op not in OPS for op in ops):
            raise ValueError(f"ops must be a non-empty subset of {OPS!r}, got {ops!r}")
        if min(validation_fraction, test_fraction) <= 0 or validation_fraction + test_fraction >= 1:
            raise ValueError("validation_fraction and test_fraction must be > 0 and sum to < 1")
        self.digits, self.ops, self.scratchpad = digits, "".join(dict.fromkeys(ops)), scratchpad
        self._bounds = (1 - validation_fraction - test_fraction, 1 - test_fraction)
        self.max_new_tokens = self._longest_completion() + 1  # + eos

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        return build_char_tokenizer(ALPHABET)

    def example(self, a: int, op: str, b: int) -> dict[str, str]:
        """The example for one problem, e.g. `(37, "+", 45)` -> `{"prompt": "37+45=", ...}`."""
        answer = scratchpad(a, op, b) if self.scratchpad else str(_apply(a, op, b))
        return {"prompt": f"{a}{op}{b}=", "completion": answer}

    def split_of(self, a: int, op: str, b: int) -> str:
        """The split that problem `a op b` belongs to."""
        if op in "+*":
            a, b = min(a, b), max(a, b)
        u = _unit_interval(f"{a}{op}{b}")
        return SPLITS[(u >= self._bounds[0]) + (u >= self._bounds[1])]

    def make_examples(self, n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
        """`n` problems of `split`, drawn uniformly with replacement; deterministic given `seed`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        rng = random.Random(f"arith:{seed}:{split}")
        examples, high = [], 10**self.digits - 1
        for _ in range(max(1000, 1000 * n)):
            if len(examples) == n:
                return examples
            a, op, b = rng.randint(0, high), rng.choice(self.ops), rng.randint(0, high)
            if self.split_of(a, op, b) == split:
                examples.append(self.example(a, op, b))
        raise ValueError(
            f"split {split!r} has too few problems; raise digits or the split's fraction"
        )

    def score(self, example: dict[str, str], generated: str) -> bool:
        """Exact match of the final answer (the text after the last `;`)."""
        return final_answer(generated) == final_answer(example["completion"])

    def _longest_completion(self) -> int:
        """Characters in the longest completion (extreme operands bound every step's length)."""
        high = 10**self.digits - 1
        values = {0, 1, 10 ** (self.digits - 1), high}
        return max(
            len(self.example(a, op, b)["completion"])
            for a in values
            for b in values
            for op in self.ops
        )
