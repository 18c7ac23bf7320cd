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
    if bool(keep.all()):  # the trainer passes counted rows only: no copy
        flat = student_logits.reshape(-1, student_logits.shape[-1])
        ids, t_log = (
            teacher.ids.reshape(flat.shape[0], -1),
            teacher.log_probs.reshape(len(flat), -1),
        )
        target = labels.reshape(-1)
    else:
        flat, ids, t_log, target = (
            student_logits[keep],
            teacher.ids[keep],
            teacher.log_probs[keep],
            labels[keep],
        )
    in_slots = ids == target[:, None]  # [M, S]
    listed = in_slots.any(-1)  # [M]
    student = BucketLogProbs.apply(flat.float(), ids, target, listed)  # [M, S + 2]
    bucket = torch.where(listed, in_slots.int().argmax(-1), ids.shape[-1])
    return student, t_log.float().detach(), bucket


class BucketLogProbs(torch.autograd.Function):
    """The student's `S + 2` bucket log-probabilities, in one pass over `[M, V]` each way.

    Forward: `e = exp(z − max)`, its row sums, the picked entries; the tail is the total minus
    the picked mass (recomputed exactly from the masked row where that difference is under 1e-3
    of the total, so cancellation never costs more than ~1e-4 relative). The ids' and the label's
    log-probabilities come straight from the logits (`z − max − log total`), exact even where
    `exp` underflows. Backward, in closed form, for bucket log-probs `b` with upstream `g`:
    `∂/∂z_u = g_slot(u) + e_u·(g_tail/tail·[u in the tail] − Σg/total)`.
    """

    @staticmethod
    def forward(ctx, z: Tensor, ids: Tensor, target: Tensor, listed: Tensor) -> Tensor:  # noqa: ANN001
        top = z.max(dim=-1, keepdim=True).values.clamp_min(LOG_ZERO)  # [M, 1], finite
        e = torch.exp(z - top)  # [M, V]
        total = e.sum(-1)  # [M]
        index = torch.cat([ids, target[:, None]], dim=-1)  # [M, S + 1]
        inside = e.gather(-1, index)  # [M, S + 1]
        inside[:, -1] = inside[:, -1].masked_fill(listed, 0.0)  # the label counted once
        tail = total - inside.sum(-1)  # [M]
        close = tail < 1e-3 * total
        if bool(close.any()):
            rows = e[close].scatter(-1, index[close], 0.0)
            tail[close] = rows.sum(-1)
        tail = tail.clamp_min(0.0)
        log_total = total.log()[:, None] + top  # [M, 1]
        picked = z.gather(-1, index) - log_total  # [M, S + 1]
        picked[:, -1] = picked[:, -1].masked_fill(listed, float("-inf"))
        out = torch.cat([picked, (tail.log() + top[:, 0] - log_total[:, 0])[:, None]], dim=-1)
        ctx.save_for_backward(e, total, tail, ids, target, listed)
        return out

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None, None, None]:  # noqa: ANN001
        e, total, tail, ids, target, listed = ctx.saved_tensors
        g_slots, g_label, g_tail = grad[:, :-2], grad[:, -2], grad[:, -1]
        # an empty bucket (a listed label's, an empty tail) is a constant -inf: no gradient
        g_label = g_label.masked_fill(listed, 0.0)
        g_tail = g_tail.masked_fill(tail <= 0, 0.0)
        per_total = g_slots.sum(-1) + g_label + g_tail  # Σ g over the buckets that exist
        per_tail = g_tail / tail.clamp_min(torch.finfo(tail.dtype).tiny)  # [M]
        out = e * (per_tail - per_total / total)[:, None]  # every token as if in the tail
        softmax_part = -(per_total / total)[:, None]
        label_grad = e.gather(-1, target[:, None]) * softmax_part + g_label[:, None]
        out.scatter_(-1, target[:, None], label_grad)  # then the slots (a listed label's too)
        out.scatter_(-1, ids, e.gather(-1, ids) * softmax_part + g_slots)
        return out, None, None, None


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
