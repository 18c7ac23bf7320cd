"""`kdlab demo`: the embedded default, end to end on the built-in `arith` task.

1. A teacher is trained on `arith` once and cached (see `kdlab.zoo`).
2. A much smaller student is distilled from it with several methods and seeds, on a small data
   set; `ce` is the SFT-only baseline (no teacher).
3. Every student and the teacher are evaluated; the leaderboard (mean ± std, 95% interval and
   rank over seeds), `report.md` with plots and a self-contained `report.html` are written to
   `--out` by `kdlab compare`'s machinery (`kdlab.compare.write_reports`).

A method `<loss>@cache` trains from an offline teacher cache (top-`DEMO_CACHE_K` of the 21-token
vocabulary, written once into `--out/teacher-cache`) instead of the teacher in memory; its
fidelity metrics are measured against the teacher model after training.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kdlab.compare import leaderboard, leaderboard_text, table_cells, write_reports
from kdlab.config import RunConfig, from_dict

logger = logging.getLogger("kdlab")


@dataclass(frozen=True)
class DemoPlan:
    name: str
    teacher_recipe: str
    methods: tuple[str, ...]
    seeds: int
    student: dict[str, Any]
    train: dict[str, Any]
    data: dict[str, Any]
    eval_examples: int


FULL = DemoPlan(
    name="full",
    teacher_recipe="standard",
    methods=(
        "ce",
        "fkl",
        "rkl",
        "jsd",
        "skl",
        "akl",
        "atkd",
        "rlkd",
        "taid",
        "warmup_distill+fkl",
        "on_policy+jsd",
        "fkl@cache",
    ),
    seeds=3,
    student={"model": "preset:small"},
    train={"max_steps": 450, "batch_size": 32, "lr": 3e-3, "warmup_steps": 20},
    data={"dataset": "task:arith", "num_examples": 500},
    eval_examples=200,
)
QUICK = DemoPlan(
    name="quick",
    teacher_recipe="quick",
    methods=("ce", "fkl", "rkl", "fkl@cache"),
    seeds=1,
    student={"model": "preset:small"},
    train={"max_steps": 60, "batch_size": 32, "lr": 3e-3, "warmup_steps": 5},
    data={"dataset": "task:arith", "num_examples": 600},
    eval_examples=100,
)

# Regime settings of the demo's `regime+loss` methods. Arith answers are at most 4 tokens + eos;
# the warm-up is a short cross-entropy phase on the revised answers before the 450 KD steps.
DEMO_GENERATION = {"max_new_tokens": 8, "temperature": 1.0}
DEMO_REGIME_OPTIONS: dict[str, dict[str, Any]] = {
    "warmup_distill": {"warm_steps": 100},
    "on_policy": {"lmbda": 0.5},
}


DEMO_CACHE_K = 8
CACHE_SUFFIX = "@cache"


def parse_method(method: str) -> tuple[str, str]:
    """`"on_policy+jsd"` -> (`on_policy`, `jsd`); a bare loss name runs off-policy."""
    regime, _, loss = method.removesuffix(CACHE_SUFFIX).rpartition("+")
    return regime or "off_policy", loss


def cache_config(plan: DemoPlan, out: Path, teacher: str) -> RunConfig:
    """The demo's `kdlab cache-teacher` run: the training data, top-`DEMO_CACHE_K`."""
    return from_dict(
        {
            "teacher": {"model": teacher},
            "data": plan.data,
            "cache": {"path": str(out / "teacher-cache"), "k": DEMO_CACHE_K},
            "eval": {"num_examples": plan.eval_examples},
        }
    )


def student_config(plan: DemoPlan, method: str, seed: int, out: Path, teacher: str) -> RunConfig:
    regime, loss = parse_method(method)
    regime_section: dict[str, Any] = {"name": regime}
    if regime != "off_policy":
        regime_section.update(DEMO_REGIME_OPTIONS.get(regime, {}), generation=DEMO_GENERATION)
    cached = method.endswith(CACHE_SUFFIX)
    return from_dict(
        {
            "teacher": {"cache": str(out / "teacher-cache")} if cached else {"model": teacher},
            "student": {**plan.student, "seed": seed},
            "data": plan.data,
            "loss": {"name": loss},
            "regime": regime_section,
            "train": {**plan.train, "seed": seed, "log_every": plan.train["max_steps"]},
            "eval": {"num_examples": plan.eval_examples, "batch_size": 100},
            "output_dir": str(out / f"runs-{plan.name}" / f"{method}-seed{seed}"),
        }
    )


def run_demo(
    out: str | Path = "kdlab-demo", *, quick: bool = False, seeds: int | None = None
) -> Path:
    """Run the demo; returns the path of `report.md`."""
    from kdlab.eval.evaluate import evaluate_saved
    from kdlab.pipeline import run_cache_teacher, run_distill
    from kdlab.zoo import ensure_teacher

    plan = QUICK if quick else FULL
    n_seeds = seeds or plan.seeds
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    teacher = ensure_teacher("arith", {}, plan.teacher_recipe)
    teacher_metrics = evaluate_saved(
        model=str(teacher), teacher=None, task="arith", num_examples=plan.eval_examples
    )
    logger.info("teacher accuracy %.3f", teacher_metrics["accuracy"])
    if any(m.endswith(CACHE_SUFFIX) for m in plan.methods):
        run_cache_teacher(cache_config(plan, out, str(teacher)))
    results: dict[str, list[dict[str, Any]]] = {}
    for method in plan.methods:
        for seed in range(n_seeds):
            config = student_config(plan, method, seed, out, str(teacher))
            logger.info("student %s, seed %d", method, seed)
            # resume=True: a re-run of the demo reuses finished students, completes partial ones
            summary = run_distill(config, resume=True)
            metrics = summary.eval
            if method.endswith(CACHE_SUFFIX):
                metrics = fidelity_after_cache(Path(config.output_dir), str(teacher), plan)
            results.setdefault(method, []).append({"dir": config.output_dir, **metrics})
    elapsed = time.perf_counter() - began
    (out / "results.json").write_text(
        json.dumps({"teacher": teacher_metrics, "students": results}, indent=2)
    )
    table = leaderboard(results)
    report = write_reports(
        out,
        table,
        results,
        title="kdlab demo",
        preamble=demo_preamble(plan, n_seeds, elapsed),
        reference=teacher_metrics,
        labels=LABELS,
    )
    print(leaderboard_text(*table_cells(table, reference=teacher_metrics, labels=LABELS)))
    print(f"\nreport: {report} (and report.html)")
    return report


def fidelity_after_cache(run: Path, teacher: str, plan: DemoPlan) -> dict[str, Any]:
    """A cached run has no teacher in memory: evaluate its saved student against the teacher.

    The held-out problems are the run's own (`data.seed + 1`, the test split); the result is
    kept in the run folder, so a re-run of the demo does not evaluate again.
    """
    from kdlab.eval.evaluate import evaluate_saved

    path = run / "eval_with_teacher.json"
    if not path.is_file():
        metrics = evaluate_saved(
            model=str(run / "student"),
            teacher=teacher,
            task="arith",
            num_examples=plan.eval_examples,
            batch_size=100,
        )
        path.write_text(json.dumps(metrics, indent=2))
    return json.loads(path.read_text())


LABELS = {"ce": "ce (SFT only)"}


def demo_preamble(plan: DemoPlan, n_seeds: int, elapsed: float) -> str:
    return (
        "Task `arith` (integer arithmetic, exact-match accuracy by greedy generation). Teacher: "
        f"preset `base` trained with the `{plan.teacher_recipe}` recipe; students: preset "
        f"`{plan.student['model'].split(':')[-1]}`, {plan.train['max_steps']} steps on "
        f"{plan.data['num_examples']} examples; {n_seeds} seed(s) per method; "
        f"{plan.eval_examples} held-out problems; total time {elapsed / 60:.1f} min. "
        "Accuracy is generalization; top-1 agreement, top-5 overlap, answer agreement and the KLs "
        "on held-out completions are fidelity to the teacher; `ce` never sees the teacher; "
        "`@cache` trains from an offline top-8 teacher cache."
    )
