"""kdlab's losses: one module per method, registered on import.

>>> from kdlab.losses import build_loss, available_losses
>>> loss_fn = build_loss("jsd", beta=0.3)
>>> value = loss_fn(student_logits, teacher_logits, labels)  # scalar
"""

from kdlab.losses import akl, ce, fkl, jsd, rkl, skl, srkl, tvd  # noqa: F401  (registration)
from kdlab.losses.base import KDLoss, WeightedSum, available_losses, build_loss, loss_info
from kdlab.losses.chunked import chunked_loss
from kdlab.losses.reduce import reduce_positions

__all__ = [
    "KDLoss",
    "WeightedSum",
    "available_losses",
    "build_loss",
    "chunked_loss",
    "loss_info",
    "reduce_positions",
]
