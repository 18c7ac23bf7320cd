"""`oracle`: a synthetic language from a known hidden Markov model, so the true next-token
distribution of any prefix is computable (the forward algorithm). It is the ground truth for the
"golden" metrics of teacher hacking (Tiapkin et al., "On Teacher Hacking in Language Model
Distillation", 2025): how far a model is from the language itself, not from its teacher.

Every sequence has exactly `seq_length` symbols (`'a'`, `'b'`, ...) and then ends (eos). An
example's prompt is its first `prompt_length` symbols, its completion the rest.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

from kdlab.tasks.base import TASKS, Task
from kdlab.tasks.tokenizer import build_char_tokenizer

SPLITS = ("train", "validation", "test")


@TASKS.register("oracle")
class OracleTask(Task):
    """Sequences sampled from a fixed random HMM.

    The HMM's initial, transition and emission distributions are Dirichlet(`concentration`) draws
    seeded by `hmm_seed`; a small concentration makes them peaked, so the language has structure to
    learn but is far from deterministic. A floor of `1e-4` (then renormalised) keeps every sequence
    possible, so conditioning on any prefix of symbols is well defined.

    Splits are independent sample streams of the same language; a sequence may occur in two splits
    (rare at the default length), which is fine: the oracle's metrics compare distributions.

    Exact match of a sampled completion means little here. `score` instead asks whether the
    generated continuation equals the oracle's own greedy continuation of the prompt. That is
    coarse (greedy paths fall into a few loops, so prompts pass or fail together); the metrics
    that matter for this task are the golden ones (`kdlab.eval.golden_metrics`).

    Args:
        num_states: hidden states of the HMM.
        num_symbols: symbols (single letters from `'a'`), at most 26.
        seq_length: symbols per sequence.
        prompt_length: symbols in the prompt; the rest is the completion.
        concentration: Dirichlet concentration of every HMM distribution.
        hmm_seed: the seed that fixes the language.
    """

    name = "oracle"

    def __init__(
        self,
        num_states: int = 16,
        num_symbols: int = 16,
        seq_length: int = 24,
        prompt_length: int = 2,
        concentration: float = 0.05,
        hmm_seed: int = 0,
    ) -> None:
        if not 1 <= num_symbols <= 26 or num_states < 1:
            raise ValueError("need 1 <= num_symbols <= 26 and num_states >= 1")
        if not 0 < prompt_length < seq_length:
            raise ValueError(
                f"need 0 < prompt_length < seq_length, got {prompt_length}, {seq_length}"
            )
        self.symbols = "".join(chr(ord("a") + k) for k in range(num_symbols))
        self.seq_length, self.prompt_length = seq_length, prompt_length
        self.max_new_tokens = seq_length - prompt_length + 1  # + eos
        rng = np.random.default_rng(hmm_seed)
        self.initial = _peaked(rng, concentration, 1, num_states)[0]  # [S]
        self.transition = _peaked(rng, concentration, num_states, num_states)  # [S, S]
        self.emission = _peaked(rng, concentration, num_states, num_symbols)  # [S, K]

    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        return build_char_tokenizer(self.symbols)

    def make_examples(self, n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
        """`n` sequences sampled from the HMM, deterministic given `seed` and `split`."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(SPLITS)}")
        seqs = self.sample(n, np.random.default_rng([seed, SPLITS.index(split)]))
        k = self.prompt_length
        return [{"prompt": s[:k], "completion": s[k:]} for s in seqs]

    def sample(self, n: int, rng: np.random.Generator) -> list[str]:
        """`n` sequences of `seq_length` symbols drawn from the HMM."""
        states = _draw(rng, np.broadcast_to(self.initial, (n, self.initial.size)))  # [n]
        columns = []
        for _ in range(self.seq_length):
            columns.append(_draw(rng, self.emission[states]))
            states = _draw(rng, self.transition[states])
        codes = np.stack(columns, axis=1) if n else np.zeros((0, self.seq_length), dtype=int)
        return ["".join(self.symbols[k] for k in row) for row in codes]

    def score(self, example: dict[str, str], generated: str) -> bool:
        """Whether `generated` is the oracle's greedy continuation of the example's prompt."""
        return generated.strip() == self.greedy_continuation(example["prompt"])

    def greedy_continuation(self, prompt: str) -> str:
        """The continuation that takes the oracle's most likely next symbol at every step."""
        codes = [self.symbols.index(c) for c in prompt]
        belief = torch.from_numpy(self.initial)[None]  # [1, S]
        for k in codes:
            belief = self._observe(belief, torch.tensor([k]))
        out = []
        for _ in range(self.seq_length - len(codes)):
            k = int((belief @ torch.from_numpy(self.emission)).argmax())
            out.append(self.symbols[k])
            belief = self._observe(belief, torch.tensor([k]))
        return "".join(out)

    def true_next_token_probs(
        self, input_ids: Tensor, tokenizer: PreTrainedTokenizerBase
    ) -> Tensor:
        """The true distribution of token `i + 1` given tokens `0..i`, for every position `i`.

        A leading bos is the start of the sequence (it may also be absent). After `seq_length`
        symbols the next token is eos with probability 1. Symbols get probability 0 there and
        special tokens get 0 elsewhere. Positions at or after anything that is not a symbol or the
        leading bos (eos, pad, ...) have no next token in the language; their row is one-hot on pad
        so every row is a distribution, but such positions are never counted in a loss or metric.

        Args:
            input_ids: `[B, T]` int64 ids of `tokenizer` (the tokenizer of this task).
            tokenizer: gives the ids of the symbols, bos, eos and pad, and `V = len(tokenizer)`.

        Returns:
            `[B, T, V]` float32 probabilities on `input_ids.device`; each row sums to 1.
        """
        device, (batch, length) = input_ids.device, input_ids.shape
        symbol_ids = torch.tensor(
            tokenizer.convert_tokens_to_ids(list(self.symbols)), device=device
        )
        table = max(len(tokenizer), int(input_ids.max()) + 1 if input_ids.numel() else 0)
        code_of = torch.full((table,), -1, dtype=torch.long, device=device)  # id -> symbol index
        code_of[symbol_ids] = torch.arange(len(self.symbols), device=device)
        emission = torch.from_numpy(self.emission).to(device)
        belief = torch.from_numpy(self.initial).to(device).expand(batch, -1)  # [B, S]
        count = torch.zeros(batch, dtype=torch.long, device=device)  # symbols seen
        ended = torch.zeros(batch, dtype=torch.bool, device=device)
        probs = torch.zeros(batch, length, len(tokenizer), dtype=torch.float64, device=device)
        for i in range(length):
            token = input_ids[:, i]
            code = code_of[token]
            is_symbol = code >= 0
            ended |= ~is_symbol & ~((token == tokenizer.bos_token_id) & (count == 0))
            belief = torch.where(
                is_symbol[:, None], self._observe(belief, code.clamp_min(0)), belief
            )
            count += is_symbol.long()
            probs[:, i, symbol_ids] = belief @ emission  # [B, K]
            done = ended | (count >= self.seq_length)
            probs[done, i] = 0.0
            probs[done & ~ended, i, tokenizer.eos_token_id] = 1.0
            probs[ended, i, tokenizer.pad_token_id] = 1.0
        return probs.float()

    def _observe(self, belief: Tensor, code: Tensor) -> Tensor:
        """Forward step: belief over the state emitting the next symbol, after seeing `code`.

        Args:
            belief: `[B, S]` distribution over the state that emits the next symbol.
            code: `[B]` the symbol (index into `symbols`) that it emitted.

        Returns:
            `[B, S]` the belief for the symbol after it.
        """
        emission = torch.from_numpy(self.emission).to(belief.device)
        transition = torch.from_numpy(self.transition).to(belief.device)
        posterior = belief * emission[:, code].T  # [B, S]
        posterior = posterior / posterior.sum(-1, keepdim=True)
        return posterior @ transition


def _peaked(rng: np.random.Generator, concentration: float, rows: int, cols: int) -> np.ndarray:
    """`[rows, cols]` Dirichlet(`concentration`) rows, floored at 1e-4 and renormalised."""
    probs = rng.dirichlet(np.full(cols, concentration), size=rows) + 1e-4
    return probs / probs.sum(-1, keepdims=True)


def _draw(rng: np.random.Generator, probs: np.ndarray) -> np.ndarray:
    """One categorical draw per row of `probs` `[n, C]` -> `[n]`."""
    u = rng.random((probs.shape[0], 1))
    return np.minimum((probs.cumsum(-1) < u).sum(-1), probs.shape[1] - 1)
