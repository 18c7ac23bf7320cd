"""SCRG: sequence correction and re-generation of the student's samples.

From Liu et al., "Multi-Granularity Semantic Revision for Large Language Model Distillation"
(arXiv 2407.10068; docs/regimes/scrg.md says what kdlab chose where the paper is not at hand).
The student samples a completion; among positions where its token differs from the teacher's
argmax, the one with the largest token-level KL(teacher || student) gets the teacher's token; the
student regenerates from that corrected prefix. `corrections` rounds per sequence (default 1);
training uses the result. With `lmbda < 1` the other steps use the dataset's completions, as
`on_policy`.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlab.regimes.base import REGIMES, RegimeContext, option
from kdlab.regimes.on_policy import StudentSampling
from kdlab.regimes.revise import RevisionStats, largest_kl_disagreement, revise


@dataclass(frozen=True)
class SCRGOptions:
    corrections: int = option(1, "corrected positions per sequence (each followed by regeneration)")
    lmbda: float = option(1.0, "probability that a step uses corrected student samples")

    def __post_init__(self) -> None:
        if self.corrections < 1:
            raise ValueError(f"corrections must be >= 1, got {self.corrections}")
        if not 0 <= self.lmbda <= 1:
            raise ValueError(f"lmbda must be in [0, 1], got {self.lmbda}")


@REGIMES.register("scrg")
class SCRG(StudentSampling):
    """Student samples, corrected at the largest-KL disagreement by the teacher, regenerated."""

    Options = SCRGOptions
    needs_teacher_model = True

    def __init__(self, context: RegimeContext) -> None:
        super().__init__(context)
        context.require("teacher", "scrg")
        self.last_stats = RevisionStats()

    def transform(
        self, prompts: list[list[int]], completions: list[list[int]], seed: int
    ) -> list[list[int]]:
        c = self.context
        result = revise(
            student=c.student,
            teacher=c.teacher,
            prompts=prompts,
            completions=completions,
            choose=largest_kl_disagreement,
            rounds=self.options.corrections,
            pad_id=c.pad_id,
            eos_id=c.eos_id,
            sampling=c.sampling,
            seed=seed + 7919,
            vocab=c.vocab,
        )
        self.last_stats.add(result.stats)
        return result.completions

    def after_step(self, step: int) -> dict[str, float]:
        values = super().after_step(step)
        values["tokens_corrected"] = float(self.last_stats.tokens_revised)
        self.last_stats = RevisionStats()
        return values
