"""The regime interface: a regime produces the micro-batches each optimiser step sees.

A regime decides where training sequences come from: the dataset's completions (`off_policy`),
the student's own samples (`on_policy`, `adaptive`, `scrg`), the teacher's (`seq_kd`), or a revised
data set after a warm-up (`warmup_distill`). The trainer only calls `micro_batches(step)`,
`after_step(step)` and the state methods; it never knows which regime it runs.
"""

from __future__ import annotations

import dataclasses
import random
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from torch import Tensor, nn

from kdlab.data.collate import Encoded, collate
from kdlab.models.generation import Sampling
from kdlab.registry import Registry

REGIMES: Registry[type[Regime]] = Registry("regime")

REGIME_DIR = "regime"  # inside the run folder: a regime's generated data and stage results


@dataclass(frozen=True)
class NoOptions:
    """A regime without options of its own."""


def _no_barrier() -> None:
    return None


@dataclass(frozen=True)
class RegimeContext:
    """What a regime may use: the data, how this process batches it, and the run's models.

    Args:
        dataset: the encoded training set.
        pad_id: padding id of the tokenizer.
        batch_size: examples per micro-batch per process.
        grad_accum: micro-batches per optimiser step.
        seed: the run's seed (data order, sampling).
        rank: this process's index; world_size: the number of processes.
        eos_id: the tokenizer's eos id (generation stops there).
        student: the student being trained (unwrapped: the same parameters the optimiser updates).
        teacher: the teacher model, when one is in memory.
        vocab: logits compared between teacher and student (trims a padded lm_head).
        output_dir: the run folder; a regime keeps its files under `output_dir / "regime"`.
        eval_dataset: held-out encoded examples (validation for `adaptive`).
        sampling: how generating regimes sample (the config's `regime.generation`).
        options: the regime's own options (an instance of its `Options` dataclass).
        barrier: waits for every process (a no-op on one process).
        extras: what a regime's stages need beyond this (e.g. the accelerator and train spec for
            Warmup-Distill's warm-up training); set by the pipeline.
    """

    dataset: Sequence[Encoded]
    pad_id: int
    batch_size: int
    grad_accum: int
    seed: int
    rank: int = 0
    world_size: int = 1
    eos_id: int | None = None
    student: nn.Module | None = None
    teacher: nn.Module | None = None
    vocab: int | None = None
    output_dir: Path | None = None
    eval_dataset: Sequence[Encoded] = ()
    sampling: Sampling = Sampling()
    options: Any = NoOptions()
    barrier: Callable[[], None] = _no_barrier
    extras: dict[str, Any] = field(default_factory=dict)

    @property
    def regime_dir(self) -> Path:
        if self.output_dir is None:
            raise ValueError("this regime writes files: its context needs an output_dir")
        return Path(self.output_dir) / REGIME_DIR

    def require(self, what: str, regime: str) -> Any:
        """`self.<what>`, or a clear error naming the regime that needs it."""
        value = getattr(self, what)
        if value is None:
            raise ValueError(f"regime {regime!r} needs a {what} model; none was given")
        return value


class Regime(ABC):
    """Where training sequences come from.

    Lifecycle: `prepare(resume=...)` once before training (expensive, resumable work such as
    generating a data set); then, per optimiser step, `micro_batches(step)` before and
    `after_step(step)` after. `state_dict()` is saved in every checkpoint and given back to
    `load_state_dict` on resume, so a resumed run sees the batches an uninterrupted one would.

    Subclasses set `Options` to a frozen dataclass of their options (fields with `metadata["help"]`
    and defaults); the config validates `regime.<option>` against it before any work starts.
    """

    Options: ClassVar[type] = NoOptions
    needs_teacher_model: ClassVar[bool] = False  # generation or scoring with the teacher itself
    supports_vllm: ClassVar[bool] = False  # generates with a fixed-weight model through vLLM
    trains_on_dataset: ClassVar[bool] = False  # every batch is dataset examples as they are

    def __init__(self, context: RegimeContext) -> None:
        self.context = context
        self.options = context.options

    def prepare(self, *, resume: bool = False) -> None:  # noqa: B027  (optional hook)
        """Work before the first step (generation, warm-up); skips what a previous run finished."""

    @abstractmethod
    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """The `grad_accum` micro-batches of optimiser step `step` for this process."""

    def after_step(self, step: int) -> dict[str, float]:
        """Called after optimiser step `step` (1-based count of finished steps); returns values
        to log under `regime/<name>`."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        """JSON-able state saved in checkpoints (e.g. a replay buffer); each process's own."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:  # noqa: B027
        """Restore what `state_dict` returned."""

    # ------------------------------------------------------------------ helpers for subclasses

    def collate(self, examples: Sequence[Encoded]) -> dict[str, Tensor]:
        return collate(examples, self.context.pad_id)

    def step_rng(self, step: int, salt: int = 0) -> random.Random:
        """A random stream that depends only on (seed, step, salt): equal on every process."""
        return random.Random(f"{self.context.seed}:{step}:{salt}")

    def sample_seed(self, step: int, micro: int) -> int:
        """A generation seed for (step, micro-batch, process)."""
        c = self.context
        return (c.seed * 1_000_003 + step) * 1_009 + micro * 101 + c.rank


def option(default: Any, help: str) -> Any:  # noqa: A002  (the field's help text)
    """A regime option: a dataclass field with a default and a help string."""
    return field(default=default, metadata={"help": help})


def describe_options(options_cls: type) -> list[tuple[str, Any, str]]:
    """(name, default, help) of every option of a regime, for `kdlab regimes` and the docs."""
    fields = dataclasses.fields(options_cls)
    return [(f.name, f.default, f.metadata.get("help", "")) for f in fields]


def with_completion(example: Encoded, completion: Sequence[int]) -> Encoded:
    """`example`'s prompt followed by `completion`; only the completion's tokens count."""
    prompt = example.input_ids[: example.prompt_length]
    return Encoded(
        input_ids=[*prompt, *completion],
        counted=[False] * len(prompt) + [True] * len(completion),
        prompt_length=len(prompt),
    )


def prompt_of(example: Encoded) -> list[int]:
    return list(example.input_ids[: example.prompt_length])


def completion_of(example: Encoded) -> list[int]:
    return list(example.input_ids[example.prompt_length :])
