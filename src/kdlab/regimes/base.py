"""The regime interface: a regime produces the micro-batches each optimiser step sees."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor

from kdlab.data.collate import Encoded
from kdlab.registry import Registry

REGIMES: Registry[type[Regime]] = Registry("regime")


@dataclass(frozen=True)
class RegimeContext:
    """What a regime may use: the encoded training set and how this process batches it."""

    dataset: Sequence[Encoded]
    pad_id: int
    batch_size: int  # per process, per micro-batch
    grad_accum: int
    seed: int
    rank: int = 0
    world_size: int = 1


class Regime(ABC):
    """Where training sequences come from. The trainer only calls `micro_batches(step)`.

    A regime must be a pure function of `(context, step)` plus its own saved state, so that a
    resumed run sees exactly the batches an uninterrupted one would.
    """

    def __init__(self, context: RegimeContext) -> None:
        self.context = context

    @abstractmethod
    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        """The `grad_accum` micro-batches of optimiser step `step` for this process."""
