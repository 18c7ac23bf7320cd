"""Adaptive off-policy KD (DistiLLM): a replay buffer of student samples, used more as the
validation loss stalls.

Ko, Kim, Chen, Yun, "DistiLLM: Towards Streamlined Distillation for Large Language Models"
(ICML 2024); official code github.com/jongwooko/distillm (`finetune.py`: `finetune`, `evaluate`;
`distillm/buffer.py`: `ReplayBuffer`). The rule, as the official code runs it:

- A threshold φ starts at `init_threshold` (0.0). The student's cross-entropy on validation
  examples is measured before training (`prev`) and every `eval_every` steps (`curr`); when
  `curr >= prev + loss_eps` (0.1), φ ← min(φ + 0.1, 1) and prev ← curr (prev changes only then).
- Each step draws r ~ U(0, 1) and the fresh-sample threshold `s = φ · (1 − step / total)`
  (`replay_ratio: decreasing`; `constant`: φ · 0.5; `increasing`: φ · step / total), `step` the
  1-based step being trained. If `r < s`, or `r < φ` while the buffer holds fewer than `capacity`
  (1000) sequences, the student samples fresh completions for the step's prompts, they are pushed
  into the buffer and trained on (source 1); else if `r < φ` the step trains on a uniform sample
  of the buffer without replacement (source 2); else on the dataset's completions (source 0).

So with the default φ = 0 a run is off-policy until the validation loss rises by `loss_eps`;
each rise moves a tenth of the steps to student samples, most of them replayed.

Open choices and their defaults:

- r is drawn once per optimiser step from (seed, step) (`step_rng`): every process makes the same
  choice and a resumed run the same draws. The official code draws per micro-batch with NumPy's
  global RNG; the two coincide for `grad_accum = 1`.
- `eval_every` (default 0 = once per epoch of the training data, `len(data) // (batch_size ·
  world_size · grad_accum)` steps, as the official scripts' `--eval-interval -1`).
- Validation (`val_examples`, default 256, from the run's held-out set `eval_dataset`): the
  token-weighted mean cross-entropy of the student on their completions, in eval mode. Every
  process computes it on the same examples with the same weights, so no communication is needed.
  The official code averages per-batch means over 1000 dev examples; 256 bounds the cost of a
  forward-only pass while keeping the measurement stable enough for a 0.1-nat rule.
- The buffer keeps token ids, counted flags and prompt lengths; `state_dict` saves φ, prev and the
  buffer (JSON), so a resumed run continues exactly. Under several processes each process keeps
  its own buffer (its own samples); the trainer gathers every process's state into the
  checkpoint and gives each process its own back on resume (the first process's when the number
  of processes changed). Replay draws are seeded per process.
"""

from __future__ import annotations

import math
import random
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.data.collate import Encoded, collate
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.models.generation import eval_mode
from kdlab.regimes.base import REGIMES, RegimeContext, option
from kdlab.regimes.on_policy import StudentSampling

SOURCE_DATASET, SOURCE_FRESH, SOURCE_REPLAY = 0, 1, 2
THRESHOLD_STEP = 0.1  # the official code's fixed increment of φ
SCHEDULES = ("decreasing", "constant", "increasing")


@dataclass(frozen=True)
class AdaptiveOptions:
    init_threshold: float = option(
        0.0, "φ at the start: the share of steps on student samples (official default 0)"
    )
    loss_eps: float = option(
        0.1, "raise φ by 0.1 when the validation loss rises by at least this much (nats)"
    )
    capacity: int = option(
        1000, "sequences the replay buffer holds per process (oldest dropped first)"
    )
    replay_ratio: Literal["decreasing", "constant", "increasing"] = option(
        "decreasing",
        "share of φ spent on fresh samples once the buffer is full: φ·(1 − step/total), "
        "φ·0.5, or φ·step/total",
    )
    eval_every: int = option(
        0, "validation interval in optimiser steps; 0: once per epoch of the training data"
    )
    val_examples: int = option(256, "held-out examples the validation loss is measured on")

    def __post_init__(self) -> None:
        if not 0 <= self.init_threshold <= 1:
            raise ValueError(f"init_threshold must be in [0, 1], got {self.init_threshold}")
        if not math.isfinite(self.loss_eps):
            raise ValueError(f"loss_eps must be a finite number, got {self.loss_eps}")
        if self.capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {self.capacity}")
        if self.replay_ratio not in SCHEDULES:
            raise ValueError(f"replay_ratio must be one of {', '.join(SCHEDULES)}")
        if self.eval_every < 0:
            raise ValueError(f"eval_every must be >= 0 (0: once per epoch), got {self.eval_every}")
        if self.val_examples < 1:
            raise ValueError(f"val_examples must be >= 1, got {self.val_examples}")


def fresh_threshold(threshold: float, step: int, total_steps: int, schedule: str) -> float:
    """The official `samp_threshold`: below it a step samples fresh even with a full buffer.

    `step` is the 1-based step being trained (the official `global_step`).
    """
    if schedule == "constant":
        return threshold * 0.5
    if schedule == "increasing":
        return threshold * step / total_steps
    return threshold * (1 - step / total_steps)


def choose_source(r: float, threshold: float, fresh: float, buffer_size: int, capacity: int) -> int:
    """Where a step's sequences come from, for a draw `r` ~ U(0, 1) (the official branches)."""
    if r < fresh or (r < threshold and buffer_size < capacity):
        return SOURCE_FRESH
    if r < threshold:
        return SOURCE_REPLAY
    return SOURCE_DATASET


def update_threshold(
    threshold: float, prev: float, curr: float, loss_eps: float
) -> tuple[float, float]:
    """(φ, prev) after a validation loss `curr`: φ + 0.1 (at most 1) and prev ← curr on a rise."""
    if curr >= prev + loss_eps:
        # rounded so that repeated +0.1 reads 0.8, not 0.7999999999999999, in logs and state
        return min(round(threshold + THRESHOLD_STEP, 12), 1.0), curr
    return threshold, prev


@torch.no_grad()
def validation_loss(
    model: nn.Module,
    examples: Sequence[Encoded],
    *,
    pad_id: int,
    vocab: int | None = None,
    batch_size: int = 16,
) -> float:
    """The model's mean cross-entropy (nats per counted token) on `examples`, in eval mode.

    Args:
        model: a causal LM (the unwrapped student).
        examples: encoded examples; their counted tokens (the completions) are scored.
        pad_id: padding id for batching (padded positions do not count).
        vocab: logits compared (trims a padded lm_head); `None`: all.
        batch_size: examples per forward pass.

    Returns:
        The sum of `-log p(token)` over every counted token divided by their number, so the value
        does not depend on `batch_size`.
    """
    device = next(model.parameters()).device
    total, count = 0.0, 0
    with eval_mode(model):
        for start in range(0, len(examples), batch_size):
            batch = collate(examples[start : start + batch_size], pad_id)
            logits = model(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
            ).logits  # [B, T, V]
            if vocab is not None:
                logits = logits[..., :vocab]
            labels = batch["labels"].to(device)  # [B, T]
            keep = labels != IGNORE_INDEX
            # only counted positions are upcast: [N, V] in float32, not [B, T, V]
            nll = F.cross_entropy(logits[keep].float(), labels[keep], reduction="sum")
            total += float(nll)
            count += int(keep.sum())
    if count == 0:
        raise ValueError("the validation examples have no counted (completion) tokens")
    return total / count


def encode_entry(example: Encoded) -> list[Any]:
    """A buffer entry as JSON: [input ids, counted flags as 0/1, prompt length]."""
    return [list(example.input_ids), [int(x) for x in example.counted], example.prompt_length]


def decode_entry(entry: Sequence[Any]) -> Encoded:
    ids, counted, prompt_length = entry
    return Encoded(list(ids), [bool(x) for x in counted], int(prompt_length))


@REGIMES.register("adaptive")
class Adaptive(StudentSampling):
    """DistiLLM: replayed student samples, used on more steps each time validation loss rises."""

    Options = AdaptiveOptions

    def __init__(self, context: RegimeContext) -> None:
        super().__init__(context)
        o = self.options
        if not context.eval_dataset:
            raise ValueError(
                "regime 'adaptive' measures a validation loss on the held-out examples, but "
                "there are none; set eval.num_examples >= 1"
            )
        if o.capacity < context.batch_size:
            raise ValueError(
                f"regime.capacity={o.capacity} is smaller than train.batch_size="
                f"{context.batch_size}: a replayed batch is drawn without replacement from the "
                "buffer; raise capacity"
            )
        self.total_steps = self._total_steps()
        self.threshold = o.init_threshold
        self.prev_val_loss: float | None = None
        self.buffer: deque[Encoded] = deque(maxlen=o.capacity)
        self.last_source = SOURCE_DATASET

    def _total_steps(self) -> int:
        config = self.context.extras.get("config")
        steps = getattr(getattr(config, "train", None), "max_steps", None)
        if not isinstance(steps, int) or steps < 1:
            raise ValueError(
                "regime 'adaptive' schedules by the run's length: its context needs "
                "extras['config'] with train.max_steps"
            )
        return steps

    @property
    def eval_interval(self) -> int:
        """Optimiser steps between validations (`eval_every`, or one epoch when 0)."""
        if self.options.eval_every:
            return self.options.eval_every
        c = self.context
        return max(1, len(c.dataset) // (c.batch_size * c.world_size * c.grad_accum))

    def validate(self) -> float:
        """The student's validation loss on the first `val_examples` held-out examples, in
        batches of `eval.batch_size` (the run's knob for full-logit passes)."""
        c = self.context
        examples = list(c.eval_dataset[: self.options.val_examples])
        config = c.extras.get("config")
        batch_size = getattr(getattr(config, "eval", None), "batch_size", None) or c.batch_size
        return validation_loss(
            c.student, examples, pad_id=c.pad_id, vocab=c.vocab, batch_size=batch_size
        )

    def prepare(self, *, resume: bool = False) -> None:
        """Measure the starting validation loss (a resumed run's checkpoint overrides it)."""
        self.prev_val_loss = self.validate()

    # ------------------------------------------------------------------ per step

    def source(self, step: int) -> int:
        """The source of 0-based step `step` (the same on every process and on resume)."""
        fresh = fresh_threshold(
            self.threshold, step + 1, self.total_steps, self.options.replay_ratio
        )
        r = self.step_rng(step).random()
        return choose_source(r, self.threshold, fresh, len(self.buffer), self.options.capacity)

    def _replayed(self, step: int, micro: int) -> list[Encoded]:
        c = self.context
        rng = random.Random(f"{c.seed}:{step}:replay:{micro}:{c.rank}")
        return rng.sample(list(self.buffer), k=c.batch_size)

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        self.last_source = self.source(step)
        batches = []
        for m in range(self.context.grad_accum):
            if self.last_source == SOURCE_REPLAY:
                examples = self._replayed(step, m)
            else:
                examples = self.examples(step, m)
            if self.last_source == SOURCE_FRESH:
                examples = self.student_examples(examples, self.sample_seed(step, m))
                self.buffer.extend(examples)
            batches.append(self.collate(examples))
        return batches

    def after_step(self, step: int) -> dict[str, float]:
        values = {"source": float(self.last_source)}
        if step % self.eval_interval == 0:
            if self.prev_val_loss is None:
                raise RuntimeError("adaptive: call prepare() before training")
            curr = self.validate()
            self.threshold, self.prev_val_loss = update_threshold(
                self.threshold, self.prev_val_loss, curr, self.options.loss_eps
            )
            values["val_loss"] = curr
        values["threshold"] = self.threshold
        values["buffer"] = float(len(self.buffer))
        return values

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {
            "threshold": self.threshold,
            "prev_val_loss": self.prev_val_loss,
            "buffer": [encode_entry(e) for e in self.buffer],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.threshold = float(state["threshold"])
        prev = state["prev_val_loss"]
        self.prev_val_loss = None if prev is None else float(prev)
        self.buffer = deque(
            (decode_entry(e) for e in state["buffer"]), maxlen=self.options.capacity
        )
