"""`kdlab demo`: the embedded default, end to end on the built-in `arith` task.

1. A teacher is trained on `arith` once and cached (see `kdlab.zoo`).
2. A much smaller student is distilled from it with several methods and seeds, on a small data
   set; `ce` is the SFT-only baseline (no teacher).
3. Every student and the teacher are evaluated; a leaderboard (mean ± std over seeds) and
   `report.md` with plots are written to `--out`.

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

from kdlab.config import RunConfig, from_dict
from kdlab.eval.report import (
    format_metric,
    markdown_table,
    mean_std,
    plot_scatter,
    smooth,
)
from kdlab.train.metrics_log import read_metrics

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

LEADERBOARD_METRICS = (
    ("accuracy", "accuracy ↑"),
    ("top1_agreement", "top-1 agreement ↑"),
    ("answer_agreement", "answer agreement ↑"),
    ("kl_teacher_student", "KL(teacher‖student) ↓"),
    ("perplexity", "perplexity ↓"),
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
    report = write_demo_report(out, plan, teacher_metrics, results, n_seeds, elapsed)
    print(leaderboard_text(teacher_metrics, results))
    print(f"\nreport: {report}")
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


def leaderboard_rows(
    teacher: dict[str, float], results: dict[str, list[dict[str, Any]]]
) -> tuple[list[str], list[list[str]]]:
    header = ["model", *[title for _, title in LEADERBOARD_METRICS], "seeds"]
    rows = [
        [
            "teacher",
            format_metric([teacher["accuracy"]]),
            "–",
            "–",
            "–",
            format_metric([teacher["perplexity"]]),
            "1",
        ]
    ]
    ranked = sorted(results, key=lambda m: -mean_std([r["accuracy"] for r in results[m]])[0])
    for method in ranked:
        runs = results[method]
        name = "ce (SFT only)" if method == "ce" else method
        cells = [
            format_metric([r.get(k, float("nan")) for r in runs]) for k, _ in LEADERBOARD_METRICS
        ]
        rows.append([name, *cells, str(len(runs))])
    return header, rows


def leaderboard_text(teacher: dict[str, float], results: dict[str, list[dict[str, Any]]]) -> str:
    header, rows = leaderboard_rows(teacher, results)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def _learning_curves(out: Path, results: dict[str, list[dict[str, Any]]]) -> Path:
    from kdlab.eval.report import _pyplot

    plt = _pyplot()
    methods = list(results)
    cols = min(3, len(methods))
    rows = (len(methods) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3 * rows), squeeze=False)
    for ax, method in zip(axes.flat, methods, strict=False):
        for i, run in enumerate(results[method]):
            records = read_metrics(Path(run["dir"]))
            steps = [r["step"] for r in records]
            values = smooth([r["loss"] for r in records], max(len(records) // 15, 1))
            ax.plot(steps, values, alpha=0.8, label=f"seed {i}")
        ax.set_title(method)
        ax.set_xlabel("step")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(methods) :]:
        ax.axis("off")
    fig.suptitle("training loss per method (each in its own units)")
    fig.tight_layout()
    path = out / "learning_curves.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def write_demo_report(
    out: Path,
    plan: DemoPlan,
    teacher: dict[str, float],
    results: dict[str, list[dict[str, Any]]],
    n_seeds: int,
    elapsed: float,
) -> Path:
    curves = _learning_curves(out, results)
    scatter = plot_scatter(
        {m: [(r["top1_agreement"], r["accuracy"]) for r in runs] for m, runs in results.items()},
        out / "accuracy_vs_fidelity.png",
        xlabel="fidelity: top-1 agreement with the teacher",
        ylabel="accuracy (exact match)",
        reference=(1.0, teacher["accuracy"]),
    )
    header, rows = leaderboard_rows(teacher, results)
    text = [
        "# kdlab demo",
        "",
        f"Task `arith` (integer arithmetic, exact-match accuracy by greedy generation). Teacher: "
        f"preset `base` trained with the `{plan.teacher_recipe}` recipe; students: preset "
        f"`{plan.student['model'].split(':')[-1]}`, {plan.train['max_steps']} steps on "
        f"{plan.data['num_examples']} examples; {n_seeds} seed(s) per method; "
        f"{plan.eval_examples} held-out problems. Total time {elapsed / 60:.1f} min.",
        "",
        "## Leaderboard (mean ± std over seeds, sorted by accuracy)",
        "",
        markdown_table(header, rows),
        "",
        "Accuracy is generalization; top-1 agreement, answer agreement and KL(teacher‖student) "
        "on held-out completions are fidelity to the teacher. `ce` never sees the teacher.",
        "",
        "## Accuracy against fidelity",
        "",
        f"![accuracy vs fidelity]({scatter.name})",
        "",
        "## Learning curves",
        "",
        f"![learning curves]({curves.name})",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(text))
    return path
