"""Warmup-Distill: the teacher revises the student's own responses, the student warms up on them,
then ordinary KD runs from the warmed-up student.

Sun, Liu, Meng, Chen, Xu, Zhou, "Warmup-Distill: Bridge the Distribution Mismatch between Teacher
and Student before Knowledge Distillation" (arXiv 2502.11766). There is no public code:
docs/regimes/warmup_distill.md says what the paper states and every choice kdlab made. Three
stages, each writing its result under `<run>/regime/` and skipped when a previous run finished it:

1. revise: the student samples a response to each training prompt; the teacher scores every
   token; the first token it rejects (`first_low_probability`: teacher probability below
   `prob_threshold`, or, with `margin` set, the student more confident than the teacher by more
   than `margin` nats; only where the teacher prefers another token) becomes the teacher's argmax
   and the student regenerates the rest; at most `max_revisions` rounds per response.
   Records: `revised.part<rank>.jsonl`; statistics: `revised.done.json`.
2. warm up: a copy of the student trains `warm_steps` steps on the revised responses
   (cross-entropy; or with `objective: preference` a DPO loss that prefers each revised response
   over its original). Its weights go to `warmup/student.safetensors` and into the student.
3. distill: off-policy KD on the dataset's own completions, from the warmed-up student, with the
   run's loss: the batches of this class (inherited from `OffPolicy`), trained by the run's
   trainer.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from kdlab.data.collate import Encoded
from kdlab.losses import KDLoss, WeightedSum, build_loss
from kdlab.losses._common import log_probs
from kdlab.losses.reduce import IGNORE_INDEX
from kdlab.models.generation import generate
from kdlab.regimes.base import (
    REGIMES,
    RegimeContext,
    option,
    prompt_of,
    with_completion,
)
from kdlab.regimes.off_policy import OffPolicy
from kdlab.regimes.on_policy import check_generation_fits
from kdlab.regimes.revise import RevisionStats, first_low_probability, revise
from kdlab.regimes.store import Record, RecordStore, fill_store

logger = logging.getLogger("kdlab")

STORE = "revised"  # stage 1: revised.part<rank>.jsonl + revised.done.json
WARMUP_DIR = "warmup"  # stage 2: the warm-up's trainer folder
WARM_WEIGHTS = "student.safetensors"  # stage 2's result
WARM_DONE = "done.json"  # stage 2's done marker


@dataclass(frozen=True)
class WarmupDistillOptions:
    """Warmup-Distill's options; docs/regimes/warmup_distill.md gives each default's reason."""

    prob_threshold: float = option(
        0.1,
        "revise a generated token when the teacher gives it less than this probability and "
        "prefers another token (0: only the margin rule)",
    )
    margin: float | None = option(
        None,
        "also revise a token when log p_student - log p_teacher of it exceeds this many nats "
        "(null: off)",
    )
    max_revisions: int = option(
        4, "revision rounds per response (each replaces one token and regenerates the rest)"
    )
    max_prompts: int | None = option(
        None, "revise and warm up on the first N training prompts only (null: all)"
    )
    warm_steps: int = option(100, "optimiser steps of the warm-up on the revised responses")
    warm_lr: float | None = option(None, "learning rate of the warm-up (null: train.lr)")
    objective: Literal["ce", "preference"] = option(
        "ce",
        "warm-up loss: ce on the revised responses, or preference (DPO: each revised response "
        "preferred over the student's original)",
    )
    preference_beta: float = option(0.1, "DPO's beta (objective: preference)")

    def __post_init__(self) -> None:
        if not 0 <= self.prob_threshold <= 1:
            raise ValueError(f"prob_threshold must be in [0, 1], got {self.prob_threshold}")
        if self.margin is not None and self.margin < 0:
            raise ValueError(f"margin must be >= 0 nats (or null: off), got {self.margin}")
        if self.prob_threshold == 0 and self.margin is None:
            raise ValueError("prob_threshold is 0 and margin is off: no token could be revised")
        if self.max_revisions < 1:
            raise ValueError(f"max_revisions must be >= 1, got {self.max_revisions}")
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ValueError(f"max_prompts must be >= 1 (or null: all), got {self.max_prompts}")
        if self.warm_steps < 1:
            raise ValueError(f"warm_steps must be >= 1, got {self.warm_steps}")
        if self.warm_lr is not None and self.warm_lr <= 0:
            raise ValueError(f"warm_lr must be > 0 (or null: train.lr), got {self.warm_lr}")
        if self.objective not in ("ce", "preference"):
            raise ValueError(f"objective must be 'ce' or 'preference', got {self.objective!r}")
        if self.preference_beta <= 0:
            raise ValueError(f"preference_beta must be > 0, got {self.preference_beta}")


@REGIMES.register("warmup_distill")
class WarmupDistill(OffPolicy):
    """Revise the student's responses with the teacher, warm up on them, then off-policy KD.

    `prepare` runs stages 1 and 2 (each skipped when its done marker exists); the batches of
    stage 3 are `OffPolicy`'s over the original training set.
    """

    trains_on_dataset = False

    Options = WarmupDistillOptions
    needs_teacher_model = True

    def __init__(self, context: RegimeContext) -> None:
        super().__init__(context)
        context.require("student", "warmup_distill")
        context.require("teacher", "warmup_distill")
        check_generation_fits(context, context.extras.get("max_length"))
        self.store = RecordStore(context.regime_dir, STORE, rank=context.rank)
        self.warm_dir = context.regime_dir / WARMUP_DIR

    @property
    def is_main(self) -> bool:
        return self.context.rank == 0

    def prepare(self, *, resume: bool = False) -> None:
        """Stages 1 and 2; whatever a previous run finished (its done marker) is not redone.

        The markers decide, not `resume`: the pipeline already refuses a folder holding a
        `regime/` without `--resume`, so a marker seen here belongs to this run.
        """
        if self.store.is_done():
            logger.info("warmup_distill: stage 1 already done; skipping")
            self._warn_if_options_changed()
        else:
            self.revise_responses()
        stats = self.store.summary()
        logger.info(
            "warmup_distill: %d of %d tokens checked were revised; %d of %d responses changed",
            stats["tokens_revised"],
            stats["tokens_checked"],
            stats["sequences_changed"],
            stats["sequences"],
        )
        if (self.warm_dir / WARM_DONE).is_file():
            logger.info("warmup_distill: stage 2 already done; skipping")
        else:
            self.warm_up()
        load_weights(self.context.student, self.warm_dir / WARM_WEIGHTS)

    # ------------------------------------------------------------------ stage 1: revise

    @property
    def num_prompts(self) -> int:
        n, cap = len(self.context.dataset), self.options.max_prompts
        return n if cap is None else min(cap, n)

    def revise_responses(self) -> None:
        """Stage 1: sample, revise and store a response per prompt; then the statistics."""
        c = self.context
        config = c.extras.get("config")
        mine = [i for i in range(self.num_prompts) if i % c.world_size == c.rank]
        fill_store(
            self.store,
            mine,
            self._revise_chunk,
            chunk=c.sampling.batch_size,
            desc="warmup_distill: revise",
            progress=self.is_main and (config is None or config.train.progress),
        )
        c.barrier()
        if self.is_main:
            self.store.finish(self._summary())
        c.barrier()

    def _revise_chunk(self, indices: list[int]) -> list[Record]:
        c, o = self.context, self.options
        prompts = [prompt_of(c.dataset[i]) for i in indices]
        seed = c.seed * 1_000_003 + indices[0]  # the chunk's first example: stable on resume
        originals = generate(
            c.student, prompts, pad_id=c.pad_id, eos_id=c.eos_id, sampling=c.sampling, seed=seed
        )
        result = revise(
            student=c.student,
            teacher=c.teacher,
            prompts=prompts,
            completions=originals,
            choose=partial(first_low_probability, prob_threshold=o.prob_threshold, margin=o.margin),
            rounds=o.max_revisions,
            pad_id=c.pad_id,
            eos_id=c.eos_id,
            sampling=c.sampling,
            seed=seed + 7919,
            vocab=c.vocab,
        )
        return [
            {"index": i, "original": orig, "revised": new, "revisions": n, "checked": k}
            for i, orig, new, n, k in zip(
                indices,
                originals,
                result.completions,
                result.revisions,
                result.checked,
                strict=True,
            )
        ]

    def _summary(self) -> dict[str, Any]:
        records = self.store.load()
        missing = sorted(set(range(self.num_prompts)) - set(records))
        if missing:
            raise RuntimeError(
                f"warmup_distill: revised responses of {len(missing)} prompts are missing from "
                f"{self.store.directory} (first: {missing[:5]}); rerun with --resume"
            )
        stats = RevisionStats(
            sequences=self.num_prompts,
            tokens_checked=sum(r["checked"] for r in records.values()),
            tokens_revised=sum(r["revisions"] for r in records.values()),
            sequences_changed=sum(r["revised"] != r["original"] for r in records.values()),
        )
        return {**stats.as_dict(), "options": self._revision_options()}

    def _revision_options(self) -> dict[str, Any]:
        o = self.options
        return {
            "prob_threshold": o.prob_threshold,
            "margin": o.margin,
            "max_revisions": o.max_revisions,
            "max_prompts": o.max_prompts,
        }

    def _warn_if_options_changed(self) -> None:
        done_with = self.store.summary().get("options", {})
        if done_with != self._revision_options():
            logger.warning(
                "warmup_distill: stage 1 was done with %s, the config now says %s; the stored "
                "revisions are used (start a new run to revise again)",
                done_with,
                self._revision_options(),
            )

    # ------------------------------------------------------------------ stage 2: warm up

    def warm_up(self) -> None:
        """Stage 2: train a copy of the student on the revised responses; save its weights."""
        from accelerate import Accelerator

        from kdlab.teachers import OnlineTeacher
        from kdlab.train.checkpoint import CHECKPOINTS, latest_checkpoint
        from kdlab.train.trainer import Trainer

        c, o = self.context, self.options
        config = c.extras.get("config")
        if config is None:
            raise ValueError("warmup_distill's warm-up needs the run config in context.extras")
        records = self.store.load()
        objective, regime = self._warm_regime(records)
        spec = dataclasses.replace(
            config.train,
            max_steps=o.warm_steps,
            lr=o.warm_lr if o.warm_lr is not None else config.train.lr,
            warmup_steps=min(config.train.warmup_steps, o.warm_steps),
            report_to=[],
            chunked=False if objective == "preference" else config.train.chunked,
        )
        logger.info("warmup_distill: stage 2, %d warm-up steps (%s)", o.warm_steps, objective)
        self.warm_dir.mkdir(parents=True, exist_ok=True)
        warm = copy.deepcopy(c.student)  # trained here; the original is the DPO reference
        with restoring(c.student) as reference:  # OnlineTeacher freezes the reference
            loss: KDLoss = build_loss("ce")
            teacher = None
            if objective == "preference":
                loss = PreferenceLoss(beta=o.preference_beta)
                teacher = OnlineTeacher(reference, vocab=c.vocab)
            # a second Accelerator shares the run's process state but has no trackers, so the
            # warm-up's steps are not logged as the run's (they go to warmup/metrics.jsonl)
            accelerator = Accelerator()
            trainer = Trainer(
                student=warm,
                teacher=teacher,
                loss_fn=WeightedSum({objective: (loss, 1.0)}),
                regime=regime,
                spec=spec,
                output_dir=self.warm_dir,
                accelerator=accelerator,
                vocab=c.vocab,
            )
            result = trainer.train(resume=latest_checkpoint(self.warm_dir) is not None)
        c.barrier()
        if self.is_main:
            save_weights(accelerator.unwrap_model(trainer.model), self.warm_dir / WARM_WEIGHTS)
            done = {"objective": objective, "steps": result.steps, "final_loss": result.final_loss}
            write_json(self.warm_dir / WARM_DONE, done)
            shutil.rmtree(self.warm_dir / CHECKPOINTS, ignore_errors=True)  # the result is saved
        c.barrier()
        del trainer, warm
        accelerator.free_memory()  # the copy and its optimiser state, before stage 3

    def _warm_regime(self, records: dict[int, Record]) -> tuple[str, OffPolicy]:
        """The warm-up's objective (preference falls back to ce without pairs) and batches."""
        c = self.context
        indices = sorted(records)
        if self.options.objective == "preference":
            pairs = [
                (
                    with_completion(c.dataset[i], records[i]["revised"]),
                    with_completion(c.dataset[i], records[i]["original"]),
                )
                for i in indices
                if records[i]["revised"] != records[i]["original"]
            ]
            if pairs:
                per_micro = max(1, c.batch_size // 2)  # rows per micro-batch as in the run
                return "preference", PairBatches(self._warm_context(pairs, per_micro))
            logger.warning(
                "warmup_distill: no response was revised, so there are no preference pairs; "
                "warming up with ce on the responses instead"
            )
        revised = [with_completion(c.dataset[i], records[i]["revised"]) for i in indices]
        return "ce", OffPolicy(self._warm_context(revised, c.batch_size))

    def _warm_context(
        self, dataset: Sequence[Encoded] | Sequence[tuple[Encoded, Encoded]], batch_size: int
    ) -> RegimeContext:
        c = self.context
        return RegimeContext(
            dataset=dataset,  # type: ignore[arg-type]  (pairs for PairBatches)
            pad_id=c.pad_id,
            batch_size=batch_size,
            grad_accum=c.grad_accum,
            seed=c.seed,
            rank=c.rank,
            world_size=c.world_size,
            eos_id=c.eos_id,
        )


class PairBatches(OffPolicy):
    """Batches of (chosen, rejected) pairs, flattened to rows `[c0, r0, c1, r1, ...]`."""

    trains_on_dataset = False

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        out = []
        for m in range(self.context.grad_accum):
            pairs: Any = self.examples(step, m)
            out.append(self.collate([row for pair in pairs for row in pair]))
        return out


# ---------------------------------------------------------------------- the preference loss


def dpo_pair_losses(
    policy_logits: Tensor, reference_logits: Tensor, labels: Tensor, *, beta: float
) -> Tensor:
    """DPO's loss of each (chosen, rejected) pair of rows.

    Rafailov et al., "Direct Preference Optimization: Your Language Model is Secretly a Reward
    Model" (NeurIPS 2023): with sequence log-probabilities summed over the counted tokens,
    `loss = -log sigmoid(beta * [(log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l))])`.

    Args:
        policy_logits: `[B, T, V]` of the model being trained; rows `2k` (chosen) and `2k + 1`
            (rejected) form pair `k`.
        reference_logits: `[B, T, V]` of the frozen reference model (no gradient).
        labels: `[B, T]` aligned next tokens; `-100` marks positions that do not count.
        beta: the strength of the implicit KL penalty towards the reference.

    Returns:
        `[B / 2]` pair losses; `log 2` for every pair while the policy equals the reference.
    """
    if labels.shape[0] % 2:
        raise ValueError(
            f"preference batches hold (chosen, rejected) row pairs; got {labels.shape[0]} rows"
        )
    mask = labels != IGNORE_INDEX  # [B, T]
    index = labels.masked_fill(~mask, 0).unsqueeze(-1)  # [B, T, 1]
    policy = log_probs(policy_logits).gather(-1, index).squeeze(-1)  # [B, T]
    reference = log_probs(reference_logits.detach()).gather(-1, index).squeeze(-1)
    ratio = torch.where(mask, policy - reference, 0.0).sum(-1)  # [B]
    return -F.logsigmoid(beta * (ratio[0::2] - ratio[1::2]))  # [B / 2]


class PreferenceLoss(KDLoss):
    """DPO over (chosen, rejected) row pairs, as per-position values (not a registered loss).

    Every counted position of both rows of a pair carries that pair's loss, so the trainer's
    reduction (sum over counted positions / counted positions of the step) gives the mean of the
    pair losses weighted by each pair's counted tokens: `log 2` at the first warm-up step, the
    scale of DPO's own logs. The reference model is given to the trainer as the teacher.
    """

    name = "preference"
    paper = 'Rafailov et al., "Direct Preference Optimization" (NeurIPS 2023)'
    needs_labels = True
    needs_teacher = True
    coupling = "sequence"  # a value depends on every position of its pair
    defaults = {"beta": 0.1}

    def per_position(
        self, student_logits: Tensor, teacher_logits: Tensor | None, labels: Tensor | None
    ) -> Tensor:
        assert teacher_logits is not None and labels is not None  # check_inputs ran
        pairs = dpo_pair_losses(student_logits, teacher_logits, labels, beta=self.hparams["beta"])
        rows = pairs.repeat_interleave(2)  # [B]
        return rows.unsqueeze(-1).expand(labels.shape)  # [B, T]


# ---------------------------------------------------------------------- files and models


@contextmanager
def restoring(model: nn.Module) -> Iterator[nn.Module]:
    """`model` for the block; its train/eval mode and `requires_grad` flags are restored after."""
    training = model.training
    flags = [p.requires_grad for p in model.parameters()]
    try:
        yield model
    finally:
        model.train(training)
        for p, flag in zip(model.parameters(), flags, strict=True):
            p.requires_grad_(flag)


def save_weights(model: nn.Module, path: Path) -> None:
    """Write `model`'s weights as safetensors, atomically (tied weights stored once)."""
    from safetensors.torch import save_model

    tmp = path.with_name(path.name + ".tmp")
    save_model(model, str(tmp))
    tmp.replace(path)


def load_weights(model: nn.Module, path: Path) -> None:
    """Load weights written by `save_weights` into `model`, in place."""
    from safetensors.torch import load_model

    load_model(model, str(path))


def write_json(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2))
    tmp.replace(path)
