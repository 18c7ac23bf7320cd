"""The TeacherSource interface: what the trainer asks of a teacher, whatever it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from kdlab.registry import Registry

TEACHERS: Registry[type[TeacherSource]] = Registry("teacher source")


@dataclass(frozen=True)
class TeacherSignal:
    """The teacher's view of a batch, in one of two forms.

    - dense: `logits` `[B, T, V]`, aligned with the batch's labels;
    - hidden: `hidden` `[B, T, H]` final hidden states plus the lm_head `weight` `[V, H]` (and
      `bias`), for the chunked loss that never builds full logits.
    """

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None


class TeacherSource(ABC):
    """A source of teacher signals: a model in this process, or (later) an offline cache."""

    @property
    @abstractmethod
    def supports_hidden(self) -> bool:
        """Whether `signal(..., hidden=True)` can return hidden states + lm_head."""

    @abstractmethod
    def signal(self, batch: dict[str, Tensor], *, hidden: bool = False) -> TeacherSignal:
        """The teacher's signal for a batch (no gradient ever flows into the teacher)."""
