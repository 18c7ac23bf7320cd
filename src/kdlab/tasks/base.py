"""The Task interface: make data, evaluate a model. Nothing else."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, ClassVar

from transformers import PreTrainedTokenizerFast

from kdlab.registry import Registry

TASKS: Registry[type[Task]] = Registry("task")


class Task(ABC):
    """A built-in task: a generator of `prompt`/`completion` examples and a scorer of answers.

    Built-in tasks bring their own small tokenizer (an HF `PreTrainedTokenizerFast`, saved and
    loaded like any other) so that models built for them run the same code path as hub models.
    """

    name: ClassVar[str]
    max_new_tokens: int = 16  # tasks set it per instance (it depends on their knobs)

    @abstractmethod
    def build_tokenizer(self) -> PreTrainedTokenizerFast:
        """A fresh tokenizer for this task's text (bos, eos, pad, unk set; a chat template)."""

    @abstractmethod
    def make_examples(self, n: int, *, seed: int, split: str = "train") -> list[dict[str, str]]:
        """`n` examples `{"prompt": ..., "completion": ...}`; splits are disjoint where possible."""

    def score(self, example: dict[str, str], generated: str) -> bool:
        """Exact match of the generated text (stripped) against the reference completion."""
        return generated.strip() == example["completion"].strip()


def get_task(name: str, **kwargs: Any) -> Task:
    return TASKS.get(name)(**kwargs)
