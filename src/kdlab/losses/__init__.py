"""kdlab's losses: one module per method, registered on import.

Every module in this package whose name does not start with `_` (and is not one of the helpers
below) is imported here, so adding a loss is one file: `losses/<name>.py` with a function decorated
by `register_loss` (or a `KDLoss` subclass added to `LOSSES`).

>>> from kdlab.losses import build_loss, available_losses
>>> loss_fn = build_loss("jsd", beta=0.3)
>>> value = loss_fn(student_logits, teacher_logits, labels)  # scalar
"""

import importlib
import pkgutil

from kdlab.losses.base import (
    LOSSES,
    KDLoss,
    WeightedSum,
    available_losses,
    build_loss,
    loss_info,
    register_loss,
)
from kdlab.losses.chunked import chunked_loss
from kdlab.losses.reduce import reduce_positions

_HELPERS = {"base", "chunked", "reduce"}

for _module in pkgutil.iter_modules(__path__):
    if not _module.name.startswith("_") and _module.name not in _HELPERS:
        importlib.import_module(f"{__name__}.{_module.name}")

__all__ = [
    "LOSSES",
    "KDLoss",
    "WeightedSum",
    "available_losses",
    "build_loss",
    "chunked_loss",
    "loss_info",
    "register_loss",
    "reduce_positions",
]
