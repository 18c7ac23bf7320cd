"""The loss base class, the registry, `build_loss` and `available_losses`.

A loss is a pure function that maps `(student_logits, teacher_logits, labels)` to per-position
values; `register_loss` wraps it into a `KDLoss` module whose call reduces those values with the
one reduction helper. Stateful methods subclass `KDLoss` directly and override `on_step`.

Most losses are *position-wise*: a position's value depends on that position's logits only. Some
methods couple positions, and say how through `coupling`, so that the plain path and the chunked
path (`kdlab.losses.chunked`) compute the same thing:

* `"position"`: nothing is coupled; chunks may cut anywhere.
* `"sequence"`: a position's value depends on other positions of its sequence (span products,
  co-activation graphs); `per_position_terms` gets `[..., T, V]` logits with `[..., T]` labels and
  handles masked positions itself; chunks are whole sequences.
* `"group"`: positions are coupled in groups of `group_size` consecutive *counted* positions (a
  transport plan between positions); `per_position_terms` gets `[M, V]` rows that all count, the
  base class drops the other positions first; chunks are whole groups.
* `"batch"`: a position's value depends on a statistic of all counted positions of the call (a
  batch median). The loss computes per-position statistics from the teacher alone
  (`batch_statistics`), summarises them over the counted positions (`summarise`) and receives the
  summary in `per_position_terms(..., summary=...)`; the chunked path runs a first pass over the
  teacher's chunks to collect the statistics, so the value is exact at any chunk size.

A teacher may also be sparse (`SparseTeacher`: a few ids per position from an offline cache).
A loss that works on bucketed distributions sets `sparse_refusal = None`; the base class then
turns the call into `S + 2` buckets (`kdlab.losses.sparse`) and runs the loss on them. Any other
loss names, in `sparse_refusal`, why it needs the full distribution, and `check_sparse` raises.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from kdlab.losses.reduce import counted_mask, reduce_positions
from kdlab.losses.sparse import SparseTeacher, to_buckets
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
    coupling: ClassVar[str] = "position"  # "position" | "sequence" | "group" | "batch"
    defaults: ClassVar[dict[str, Any]] = {}
    # None: works from a sparse teacher's buckets; otherwise why it needs the full distribution
    sparse_refusal: ClassVar[str | None] = "it has not been adapted to sparse teachers"
    # whether a random-sampling cache (unbiased weights, zero tail) is a sound teacher for it
    sampled_teacher_ok: ClassVar[bool] = False

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
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Named, unweighted per-position terms; `term_weights` says how they sum to the loss.

        `summary` is `summarise`'s result for `coupling == "batch"` losses, else `None`.
        """
        return {self.name: self.per_position(student_logits, teacher_logits, labels)}

    def term_weights(self) -> dict[str, float]:
        return {self.name: 1.0}

    @property
    def group_size(self) -> int:
        """Counted positions coupled together (`coupling == "group"` only)."""
        raise NotImplementedError(f"loss {self.name!r} does not couple positions in groups")

    def batch_statistics(
        self, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        """Pass 1 of a `"batch"` loss: per-position statistics `[...]`, from the teacher only."""
        return {}

    def summarise(self, statistics: dict[str, Tensor]) -> dict[str, Tensor]:
        """The batch summary from `batch_statistics` of the counted positions (each `[M]`)."""
        return {}

    def terms(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        """Per-position terms `[...]` of a whole batch, whatever the coupling (the plain path)."""
        if self.coupling == "group":
            return self._group_terms(student_logits, teacher_logits, labels)
        summary = None
        if self.coupling == "batch":
            mask = counted_mask(labels, student_logits.shape[:-1], student_logits.device)
            with torch.no_grad():
                stats = self.batch_statistics(teacher_logits, labels)
                summary = self.summarise({k: v[mask] for k, v in stats.items()})
        return self.per_position_terms(student_logits, teacher_logits, labels, summary=summary)

    def _group_terms(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        """Drop the uncounted positions, compute on `[M, V]`, scatter back to `[...]`."""
        mask = counted_mask(labels, student_logits.shape[:-1], student_logits.device)
        rows = self.per_position_terms(
            student_logits[mask],
            None if teacher_logits is None else teacher_logits[mask],
            None if labels is None else labels[mask],
        )
        out = {}
        for k, v in rows.items():
            full = torch.zeros(mask.shape, dtype=v.dtype, device=v.device)
            out[k] = full.masked_scatter(mask, v)
        return out

    def check_inputs(self, teacher_logits: Tensor | None, labels: Tensor | None) -> None:
        if self.needs_labels and labels is None:
            raise ValueError(f"loss {self.name!r} needs labels (the ground-truth next tokens)")
        if self.needs_teacher and teacher_logits is None:
            raise ValueError(f"loss {self.name!r} needs the teacher's logits")

    def check_sampled(self) -> None:
        """Raise a `ValueError` when this loss cannot train from a random-sampling cache."""
        if not self.sampled_teacher_ok:
            raise ValueError(
                f"loss {self.name!r} cannot train from a random-sampling cache: the sampled "
                "weights are unbiased estimates of the teacher's probabilities, which makes the "
                "forward-KL (and cross-entropy) gradient unbiased, but this loss is not linear in "
                "them (and reverse-KL terms ignore every token that was not drawn); use loss fkl, "
                "or a top_k cache (cache.mode: top_k)"
            )

    def check_sparse(self) -> None:
        """Raise a `ValueError` saying why, when this loss cannot use a sparse teacher."""
        reason = self.sparse_refusal
        if reason is not None:
            raise ValueError(
                f"loss {self.name!r} cannot train from a sparse (cached top-k) teacher: {reason}; "
                "use an online teacher (teacher.model), or a loss that supports caches "
                "(`kdlab losses` marks them)"
            )

    def forward(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | SparseTeacher | None = None,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> Tensor:
        """Scalar loss: mean over counted positions (or sum / `num_items_in_batch`).

        `teacher_logits` may be a `SparseTeacher`: the loss then runs on its buckets.
        """
        return self.forward_terms(
            student_logits, teacher_logits, labels, num_items_in_batch=num_items_in_batch
        )[0]

    def forward_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | SparseTeacher | None = None,
        labels: Tensor | None = None,
        *,
        num_items_in_batch: int | Tensor | None = None,
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """The weighted total (with gradient) and each named term, reduced and detached."""
        if isinstance(teacher_logits, SparseTeacher):
            self.check_sparse()
            student_logits, teacher_logits, labels = to_buckets(
                student_logits, teacher_logits, labels
            )
        self.check_inputs(teacher_logits, labels)
        terms = self.terms(student_logits, teacher_logits, labels)
        reduced = {
            k: reduce_positions(v, labels, num_items_in_batch=num_items_in_batch)
            for k, v in terms.items()
        }
        weights = self.term_weights()
        total = sum(weights[k] * v for k, v in reduced.items())
        return total, {k: v.detach() for k, v in reduced.items()}

    def on_step(
        self,
        step: int,
        total_steps: int,
        loss_value: float,
        terms: Mapping[str, float] | None = None,
    ) -> None:
        """Called by the trainer after every optimiser step; stateless losses ignore it.

        Args:
            step: optimiser steps finished so far (1 after the first step).
            total_steps: the run's `max_steps`.
            loss_value: this loss's value on the step (mean over the step's counted positions).
            terms: the value of each of this loss's named terms on the step (`forward_terms`).
        """

    def log_values(self) -> dict[str, float]:
        """Extra scalars to log each step (e.g. TAID's `taid/t`)."""
        return {}

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())


class WeightedSum(KDLoss):
    """`Σ w_i · loss_i`, e.g. `kd_weight·KD + ce_weight·CE`; each term is logged by its key.

    A part with several named terms (e.g. a diagnostic term of weight 0) contributes its main term
    (the one named after the loss) under its key and the others under `"<key>/<term>"`.
    """

    name = "weighted_sum"

    def __init__(self, terms: Mapping[str, tuple[KDLoss, float]]) -> None:
        super().__init__()
        self.losses = nn.ModuleDict({k: loss for k, (loss, _) in terms.items()})
        self.weights = {k: float(w) for k, (_, w) in terms.items()}
        kinds = {loss.coupling for loss in self.losses.values()} - {"position"}
        if len(kinds) > 1:
            raise ValueError(
                f"cannot combine losses with different couplings ({', '.join(sorted(kinds))}) "
                "in one weighted sum"
            )
        self._coupling = kinds.pop() if kinds else "position"

    @property
    def needs_labels(self) -> bool:  # type: ignore[override]
        return any(loss.needs_labels for loss in self.losses.values())

    @property
    def needs_teacher(self) -> bool:  # type: ignore[override]
        return any(loss.needs_teacher for loss in self.losses.values())

    @property
    def coupling(self) -> str:  # type: ignore[override]
        return self._coupling

    @property
    def sparse_refusal(self) -> str | None:  # type: ignore[override]
        return next((p.sparse_refusal for p in self.losses.values() if p.sparse_refusal), None)

    def check_sparse(self) -> None:
        for loss in self.losses.values():
            loss.check_sparse()

    def check_sampled(self) -> None:
        for loss in self.losses.values():
            loss.check_sampled()

    @property
    def group_size(self) -> int:
        return next(p.group_size for p in self.losses.values() if p.coupling == "group")

    def check_inputs(self, teacher_logits: Tensor | None, labels: Tensor | None) -> None:
        for loss in self.losses.values():
            loss.check_inputs(teacher_logits, labels)

    def batch_statistics(
        self, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> dict[str, Tensor]:
        out = {}
        for k, loss in self.losses.items():
            stats = loss.batch_statistics(teacher_logits, labels)
            out.update({f"{k}/{name}": v for name, v in stats.items()})
        return out

    def summarise(self, statistics: dict[str, Tensor]) -> dict[str, Tensor]:
        out = {}
        for k, loss in self.losses.items():
            own = _strip(statistics, k)
            if own:
                out.update({f"{k}/{name}": v for name, v in loss.summarise(own).items()})
        return out

    def per_position_terms(
        self,
        student_logits: Tensor,
        teacher_logits: Tensor | None,
        labels: Tensor | None,
        *,
        summary: dict[str, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        out = {}
        for k, loss in self.losses.items():
            own = _strip(summary or {}, k) or None
            terms = loss.per_position_terms(student_logits, teacher_logits, labels, summary=own)
            out.update({_term_key(k, loss, name): v for name, v in terms.items()})
        return out

    def term_weights(self) -> dict[str, float]:
        return {
            _term_key(k, loss, name): self.weights[k] * w
            for k, loss in self.losses.items()
            for name, w in loss.term_weights().items()
        }

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        terms = self.terms(student_logits, teacher_logits, labels)
        weights = self.term_weights()
        return sum(weights[k] * v for k, v in terms.items())

    def on_step(
        self,
        step: int,
        total_steps: int,
        loss_value: float,
        terms: Mapping[str, float] | None = None,
    ) -> None:
        """Each part sees its own value and terms, not the weighted total."""
        terms = terms or {}
        for k, loss in self.losses.items():
            own = {
                name: terms[key]
                for name in loss.term_weights()
                if (key := _term_key(k, loss, name)) in terms
            }
            loss.on_step(step, total_steps, terms.get(k, loss_value), own)

    def log_values(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for loss in self.losses.values():
            out.update(loss.log_values())
        return out


def _term_key(key: str, loss: KDLoss, term: str) -> str:
    return key if term == loss.name else f"{key}/{term}"


def _strip(values: Mapping[str, Tensor], key: str) -> dict[str, Tensor]:
    prefix = f"{key}/"
    return {k[len(prefix) :]: v for k, v in values.items() if k.startswith(prefix)}


def register_loss(
    name: str,
    *,
    paper: str,
    needs_labels: bool = False,
    needs_teacher: bool = True,
    sparse_refusal: str | None = KDLoss.sparse_refusal,
    sampled_teacher_ok: bool = False,
) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Register a pure per-position function as a loss.

    `sparse_refusal=None` says the loss works from a sparse teacher's buckets (see
    `kdlab.losses.sparse`); otherwise it is the reason it cannot. `sampled_teacher_ok=True`
    says a random-sampling cache's unbiased weights give it an unbiased gradient.

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
                "sparse_refusal": sparse_refusal,
                "sampled_teacher_ok": sampled_teacher_ok,
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
        "coupling": cls.coupling,
        "sparse": cls.sparse_refusal is None,
        "sampled": cls.sampled_teacher_ok,
        "summary": doc[0] if doc else "",
    }
