"""Human reports: `report.md` with PNG plots, for one run and for a comparison of runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdlab.eval.aggregate import summarise
from kdlab.train.metrics_log import read_metrics


def _pyplot():  # noqa: ANN202
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def smooth(values: Sequence[float], window: int) -> list[float]:
    """Trailing moving average (window >= 1), for readable loss curves."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= window:
            acc -= values[i - window]
        out.append(acc / min(i + 1, window))
    return out


def plot_learning_curves(curves: Mapping[str, Sequence[tuple[int, float]]], path: Path) -> Path:
    """One line per label: (step, loss) pairs, smoothed."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for label, points in curves.items():
        if not points:
            continue
        steps, values = zip(*points, strict=True)
        ax.plot(steps, smooth(list(values), max(len(values) // 20, 1)), label=label)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss (smoothed)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_scatter(
    points: Mapping[str, Sequence[tuple[float, float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    reference: tuple[float, float] | None = None,
) -> Path:
    """One colour per label, one point per run (e.g. fidelity against accuracy)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, xy in points.items():
        xs, ys = zip(*xy, strict=True) if xy else ((), ())
        ax.scatter(xs, ys, label=label, s=36, alpha=0.8)
    if reference is not None:
        ax.scatter([reference[0]], [reference[1]], marker="*", s=180, c="black", label="teacher")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value); NaNs are ignored."""
    summary = summarise(values)
    return summary.mean, summary.std


def format_metric(values: Sequence[float], digits: int = 3) -> str:
    return summarise(values).format(digits)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_run_report(out: Path, config: Any, metrics: Mapping[str, float]) -> Path:
    """`report.md` of one run: what ran, the evaluation, and the learning curve."""
    records = read_metrics(out)
    curves = {"loss": [(r["step"], r["loss"]) for r in records]}
    for key in sorted({k for r in records for k in r if k.startswith("loss/")}):
        curves[key] = [(r["step"], r[key]) for r in records if key in r]
    plot = plot_learning_curves(curves, out / "learning_curve.png")
    teacher = "-"
    if config.teacher is not None:
        teacher = config.teacher.model or f"cache {config.teacher.cache}"
    lines = [
        f"# kdlab run: {out.name}",
        "",
        f"- loss: `{config.loss.name}` {config.loss.hparams or ''}; regime: `{config.regime.name}`",
        f"- teacher: `{teacher}`; student: `{config.student.model}`; data: `{config.data.dataset}`",
        f"- steps: {records[-1]['step'] if records else 0}; final loss: {records[-1]['loss']:.4f}"
        if records
        else "- no steps logged",
        "",
        "## Evaluation",
        "",
        markdown_table(["metric", "value"], [[k, f"{v:.4f}"] for k, v in metrics.items()])
        if metrics
        else "(evaluation disabled)",
        "",
        "## Learning curve",
        "",
        f"![learning curve]({plot.name})",
        "",
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
