"""Sparse teachers: a few token ids per position with their log-probabilities, plus buckets.

An offline teacher cache (`kdlab cache-teacher`) keeps, per counted position, `S` token ids with
the teacher's log-probabilities, the teacher's log-probability of the ground-truth token when it
is not among them, and the log of the remaining ("tail") mass. Losses see such a teacher through
*buckets*: the vocabulary is split into `S + 2` parts per position,

    [ the S ids ... | the ground-truth token (when not among the ids) | every other token ]

and both distributions are summed over each part. The teacher's parts come from the cache; the
student's are exact: its full-vocabulary log-softmax gathered at the ids and the label, and a
log-sum-exp over everything else. Any loss that is a function of two categorical distributions
then runs unchanged on the `S + 2` buckets (DistillKit's "symmetric" treatment of the tail); the
ground-truth token keeps a bucket of its own so that target/non-target methods (DKD, NKD, ATKD)
and the hard-label cross-entropy see its exact probability.

What the buckets change is written on each loss's docs page; in short: the tail counts as one
token, and a loss's `temperature` acts on the buckets (`softmax(log b / τ)`): ratios between
stored ids are those of the full tempered distribution, but the tail is tempered as one token,
which changes the normaliser. With every token stored (S = V) the buckets are the vocabulary
itself and every loss is exact.

A random-sampling cache (Anshumann et al., ACL 2025) stores sampled ids with importance weights
and a tail of zero mass; the student's other tokens still get gradient through the tail bucket,
which is what makes the forward-KL gradient unbiased (losses declare `sampled_teacher_ok`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from kdlab.losses._common import LOG_ZERO
from kdlab.losses.reduce import IGNORE_INDEX


@dataclass(frozen=True)
class SparseTeacher:
    """A sparse teacher signal for a batch.

    Attributes:
        ids: `[..., S]` int64 token ids, distinct per position.
        log_probs: `[..., S + 2]` float32: the ids' log-probabilities, then the ground-truth
            token's (−inf when it is among the ids), then the tail's; −inf is probability 0.
            They need not sum to exactly 1 (quantised values): losses renormalise.
    """

    ids: Tensor
    log_probs: Tensor

    @property
    def slots(self) -> int:
        return self.ids.shape[-1]

    def __getitem__(self, index: Tensor) -> SparseTeacher:
        return SparseTeacher(self.ids[index], self.log_probs[index])


def to_buckets(
    student_logits: Tensor, teacher: SparseTeacher, labels: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """The counted positions of a batch, as `S + 2` bucket log-probabilities of both models.

    Args:
        student_logits: `[..., V]`; gradient flows through the buckets to every logit.
        teacher: ids `[..., S]`, log_probs `[..., S + 2]`, aligned with `student_logits`.
        labels: `[...]` int64 ground-truth tokens, `-100` where a position does not count.

    Returns:
        `(student [M, S + 2], teacher [M, S + 2], labels [M])` for the M counted positions:
        log-probabilities (the student's sum to 1; −inf for empty buckets, which the losses
        treat as masked vocabulary entries) and each label's bucket (its slot, or S when it is
        not among the ids).

    Raises:
        ValueError: when the shapes do not line up or an id is outside the student's vocabulary.
    """
    _check_shapes(student_logits, teacher, labels)
    keep = labels != IGNORE_INDEX
    ids, t_log, target = teacher.ids[keep], teacher.log_probs[keep].float(), labels[keep]
    z = student_logits[keep].float()  # [M, V]
    in_slots = ids == target[:, None]  # [M, S]
    listed = in_slots.any(-1)  # [M]
    index = torch.cat([ids, target[:, None]], dim=-1)  # [M, S + 1]: the ids, then the label
    # log-sum-exps instead of a full log-softmax: two passes over [M, V], one masked copy
    total = torch.logsumexp(z, dim=-1, keepdim=True)  # [M, 1]
    rest = torch.logsumexp(z.scatter(-1, index, LOG_ZERO), dim=-1, keepdim=True)
    picked = z.gather(-1, index)  # [M, S + 1]
    rest = rest.masked_fill(rest <= LOG_ZERO / 2, float("-inf"))  # nothing left: no tail
    student = torch.cat([picked, rest], dim=-1) - total  # [M, S + 2]
    # a bucket the student cannot reach is -inf, as a masked logit: losses handle it as such
    student[:, -2] = student[:, -2].masked_fill(listed, float("-inf"))  # the label has a slot
    bucket = torch.where(listed, in_slots.int().argmax(-1), ids.shape[-1])
    return student, t_log.detach(), bucket


def _check_shapes(student_logits: Tensor, teacher: SparseTeacher, labels: Tensor | None) -> None:
    if labels is None:
        raise ValueError(
            "a sparse (cached) teacher needs labels: the ground-truth token has its own bucket"
        )
    lead = tuple(student_logits.shape[:-1])
    if tuple(teacher.ids.shape[:-1]) != lead or tuple(labels.shape) != lead:
        raise ValueError(
            f"sparse teacher ids {tuple(teacher.ids.shape)} and labels {tuple(labels.shape)} do "
            f"not line up with student logits {tuple(student_logits.shape)}"
        )
    if teacher.log_probs.shape[-1] != teacher.ids.shape[-1] + 2:
        raise ValueError(
            f"sparse teacher log_probs need S + 2 = {teacher.ids.shape[-1] + 2} values per "
            f"position (ids, ground truth, tail), got {teacher.log_probs.shape[-1]}"
        )
    vocab = student_logits.shape[-1]
    if teacher.ids.numel() and int(teacher.ids.max()) >= vocab:
        raise ValueError(
            f"sparse teacher has token id {int(teacher.ids.max())} but the student's vocabulary "
            f"has {vocab} entries; the cache was made for another vocabulary"
        )
