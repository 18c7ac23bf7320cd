"""The TeacherSource interface: what the trainer asks of a teacher, whatever it is."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

from torch import Tensor

from kdlab.losses.sparse import SparseTeacher
from kdlab.registry import Registry

TEACHERS: Registry[type[TeacherSource]] = Registry("teacher source")


@dataclass(frozen=True)
class TeacherSignal:
    """The teacher's view of a batch, in one of three forms.

    - dense: `logits` `[B, T, V]`, aligned with the batch's labels;
    - hidden: `hidden` `[B, T, H]` final hidden states plus the lm_head `weight` `[V, H]` (and
      `bias`), for the chunked loss that never builds full logits;
    - sparse: a `SparseTeacher` (a few ids per position, from an offline cache).
    """

    logits: Tensor | None = None
    hidden: Tensor | None = None
    weight: Tensor | None = None
    bias: Tensor | None = None
    sparse: SparseTeacher | None = None

    @property
    def for_loss(self) -> Tensor | SparseTeacher | None:
        """What a loss takes as its teacher argument: the sparse signal or the dense logits."""
        return self.sparse if self.sparse is not None else self.logits


class TeacherSource(ABC):
    """A source of teacher signals: a model in this process, or an offline cache."""

    @property
    @abstractmethod
    def supports_hidden(self) -> bool:
        """Whether `signal(..., hidden=True)` can return hidden states + lm_head."""

    @abstractmethod
    def signal(self, batch: dict[str, Tensor], *, hidden: bool = False) -> TeacherSignal:
        """The teacher's signal for a batch (no gradient ever flows into the teacher)."""
