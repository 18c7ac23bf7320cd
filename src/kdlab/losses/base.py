"""The loss base class, the registry, `build_loss` and `available_losses`.

A loss is a pure function that maps `(student_logits, teacher_logits, labels)` to per-position
values; `register_loss` wraps it into a `KDLoss` module whose call reduces those values with the
one reduction helper. Stateful methods subclass `KDLoss` directly and override `on_step`.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

from torch import Tensor, nn

from kdlab.losses.reduce import reduce_positions
from kdlab.registry import Registry

LOSSES: Registry[type[KDLoss]] = Registry("loss")


class KDLoss(nn.Module):
    """Base of every registered loss.

    Subclasses set `name`, `paper`, `needs_labels`, `defaults` (hyperparameter -> default) and
    implement `per_position`. Calling the module returns the mean over counted positions.
    """

    name: ClassVar[str] = ""
    paper: ClassVar[str] = ""
    needs_labels: ClassVar[bool] = False
    needs_teacher: ClassVar[bool] = True
    # False for losses that couple positions (batch statistics, transport plans): the chunked
    # helper refuses them unless they implement their own chunking
    position_wise: ClassVar[bool] = True
    defaults: ClassVar[dict[str, Any]] = {}

    def __init__(self, **hparams: Any) -> None:
        super().__init__()
        unknown = sorted(set(hparams) - set(self.defaults))
        if unknown:
            valid = ", ".join(f"{k} (default {v!r})" for k, v in self.defaults.items()) or "none"
            raise ValueError(
                f"unknown hyperparameter(s) {', '.join(unknown)} for loss {self.name!r}; "
                f"valid: {valid}"
            )
        self.hparams: dict[str, Any] = {**self.defaults, **hparams}

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        """Per-position values `[...]` for logits `[..., V]`; finite at every position."""
        raise NotImplementedError

    def per_position_terms(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        """Named, unweighted per-position terms; `term_weights` says how they sum to the loss."""
        return {self.name: self.per_position(student_logits, teacher_logits, labels)}

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0}

    def check_inputs(self, teacher_logits: Tensor | None, labels: Tensor | None) -> None:
        if self.needs_labels and labels is None:
            raise ValueError(f"loss {self.name!r} needs labels (the ground-truth next tokens)")
        if self.needs_teacher and teacher_logits is None:
            raise ValueError(f"loss {self.name!r} needs the teacher's logits")

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """Scalar loss: mean over counted positions (or sum / `num_items_in_batch`)."""
        self.check_inputs(teacher_logits, labels)
        values = self.per_position(student_logits, teacher_logits, labels)
        return reduce_positions(values, labels, num_items_in_batch=num_items_in_batch)

    def forward_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None = None,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total (with gradient) and each named term, reduced and detached."""
        self.check_inputs(teacher_logits, labels)
        terms = self.per_position_terms(student_logits, teacher_logits, labels)
        reduced = {
            k: reduce_positions(v, labels, num_items_in_batch=num_items_in_batch)
            for k, v in terms.items()
        }
        weights = self.term_weights()
        total = sum(weights[k] * v for k, v in reduced.items())
        return total, {k: v.detach() for k, v in reduced.items()}

    def on_step(self, step: int, total_steps: int, loss_value: float) -> None:
        """Called by the trainer after every optimiser step; stateless losses ignore it."""

    def log_values(self) -> dict[str, float]:
        """Extra scalars to log each step (e.g. TAID's `taid/t`)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


class WeightedSum(KDLoss):
    """`Σ w_i · loss_i`, e.g. `kd_weight·KD + ce_weight·CE`; each term is logged by its key."""

    name = "weighted_sum"

    def __init__(self, terms: Mapping[str, tuple[KDLoss, float]]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict({k: loss for k, (loss, _) in terms.items()})
        self.weights = {k: float(w) for k, (_, w) in terms.items()}

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return any(loss.needs_labels for loss in self.losses.values())

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return any(loss.needs_teacher for loss in self.losses.values())

    @property
    def position_wise(self) -> bool:  # type: ignore[override]
        return all(loss.position_wise for loss in self.losses.values())

    def check_inputs(self, teacher_logits: Tensor | None, labels: Tensor | None) -> None:
        for loss in self.losses.values():
            loss.check_inputs(teacher_logits, labels)

    def per_position_terms(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        return {
            k: loss.per_position(student_logits, teacher_logits, labels)
            for k, loss in self.losses.items()
        }

    def term_weights(self) -> dict[str, float]:
        return dict(self.weights)

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        terms = self.per_position_terms(student_logits, teacher_logits, labels)
        return sum(self.weights[k] * v for k, v in terms.items())

    def on_step(self, step: int, total_steps: int, loss_value: float) -> None:
        for loss in self.losses.values():
            loss.on_step(step, total_steps, loss_value)

    def log_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for loss in self.losses.values():
            out.update(loss.log_values())
        return out


def register_loss(
    name: str, *, paper: str, needs_labels: bool = False, needs_teacher: bool = True
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a pure per-position function as a loss.

    The function's keyword-only parameters are the loss's hyperparameters, with their defaults:

        @register_loss("fkl", paper="Hinton et al. 2015")
        def fkl(student_logits, teacher_logits, labels=None, *, temperature=1.0) -> Tensor: ...
    """

    def decorator(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        params = inspect.signature(fn).parameters.values()
        defaults = {p.name: p.default for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}

        def per_position(self, student_logits, teacher_logits, labels):  # noqa: ANN001
            return fn(student_logits, teacher_logits, labels, **self.hparams)

        cls = type(
            f"{name.title()}Loss",
            (KDLoss,),
            {
                "name": name,
                "paper": paper,
                "needs_labels": needs_labels,
                "needs_teacher": needs_teacher,
                "defaults": defaults,
                "per_position": per_position,
                "__doc__": fn.__doc__,
                "function": staticmethod(fn),
            },
        )
        LOSSES.add(name, cls)
        return fn

    return decorator


def build_loss(name: str, **hparams: Any) -> KDLoss:
    """Build a registered loss by name; an unknown name or hyperparameter is a `ValueError`.

    Example:
        >>> loss_fn = build_loss("jsd", beta=0.3)
        >>> value = loss_fn(student_logits, teacher_logits, labels)  # scalar
    """
    return LOSSES.get(name)(**hparams)


def available_losses() -> list[str]:
    """Names of every registered loss, sorted."""
    return LOSSES.names()


def loss_info(name: str) -> dict[str, Any]:
    """Hyperparameters (with defaults), paper and label needs of a registered loss."""
    cls = LOSSES.get(name)
    doc = (cls.__doc__ or "").strip().splitlines()
    return {
        "name": name,
        "hparams": dict(cls.defaults),
        "paper": cls.paper,
        "needs_labels": cls.needs_labels,
        "needs_teacher": cls.needs_teacher,
        "summary": doc[0] if doc else "",
    }
