"""OnlineTeacher: a Hugging Face causal LM in this process, in eval mode, without gradients."""

from __future__ import annotations

import torch
from torch import Tensor
from transformers import PreTrainedModel

from kdlab.teachers.base import TEACHERS, TeacherSignal, TeacherSource


@TEACHERS.register("online")
class OnlineTeacher(TeacherSource):
    """Runs the teacher model on each batch under `torch.no_grad()`.

    The teacher may live on another device or dtype than the student; its outputs are moved to
    the batch's device. `vocab` trims padded lm_head rows (see `check_vocabularies`).
    """

    def __init__(self, model: PreTrainedModel, *, vocab: int | None = None) -> None:
        self.model = model.eval().requires_grad_(False)
        self.vocab = vocab

    @property
    def supports_hidden(self) -> bool:
        head = self.model.get_output_embeddings()
        config = self.model.config
        plain = getattr(config, "final_logit_softcapping", None) is None and getattr(
            config, "logit_scale", None
        ) in (None, 1.0)
        return isinstance(head, torch.nn.Linear) and plain

    @torch.no_grad()
    def signal(self, batch: dict[str, Tensor], *, hidden: bool = False) -> TeacherSignal:
        device = next(self.model.parameters()).device
        inputs = {
            "input_ids": batch["input_ids"].to(device),
            "attention_mask": batch["attention_mask"].to(device),
        }
        target = batch["input_ids"].device
        if hidden:
            out = self.model(**inputs, output_hidden_states=True, logits_to_keep=1)
            head = self.model.get_output_embeddings()
            return TeacherSignal(
                hidden=out.hidden_states[-1].to(target),
                weight=self._trim(head.weight).to(target),
                bias=None if head.bias is None else self._trim(head.bias).to(target),
            )
        logits = self.model(**inputs).logits  # [B, T, V]
        return TeacherSignal(logits=self._trim(logits, dim=-1).to(target))

    def _trim(self, tensor: Tensor, dim: int = 0) -> Tensor:
        if self.vocab is None or tensor.shape[dim] == self.vocab:
            return tensor
        return tensor.narrow(dim, 0, self.vocab)
