"""Human reports: `report.md` with PNG plots, for one run and for a comparison of runs."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from kdlab.eval.aggregate import summarise
from kdlab.train.metrics_log import curve, read_metrics


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


def plot_learning_curves(
    curves: Mapping[str, Sequence[tuple[int, float]]],
    path: Path,
    *,
    ylabel: str = "training loss (smoothed)",
    title: str | None = None,
    log: bool = True,
) -> Path:
    """One line per label: (step, value) pairs, smoothed."""
    return plot_panels(
        {title or "": {label: [points] for label, points in curves.items()}},
        path,
        ylabel=ylabel,
        log=log,
    )


def mean_curve(
    runs: Sequence[Sequence[tuple[int, float]]],
) -> tuple[list[int], list[float], list[float]]:
    """Steps present in every run, and the mean and sample std of the runs' values there."""
    tables = [dict(points) for points in runs if points]
    if not tables:
        return [], [], []
    steps = sorted(set.intersection(*(set(t) for t in tables)))
    stats = [summarise([t[s] for t in tables]) for s in steps]
    return steps, [x.mean for x in stats], [x.std for x in stats]


def plot_panels(
    panels: Mapping[str, Mapping[str, Sequence[Sequence[tuple[int, float]]]]],
    path: Path,
    *,
    ylabel: str,
    log: bool = False,
    cols: int = 3,
    marks: Mapping[str, Sequence[int]] | None = None,
) -> Path:
    """A grid of plots: panel title -> label -> runs of (step, value); mean line, ±std band.

    Long curves are smoothed (trailing mean over 1/20 of the points); `marks` draws dashed
    vertical lines at the given steps of a panel (e.g. where teacher hacking starts).
    """
    plt = _pyplot()
    cols = max(1, min(cols, len(panels)))
    rows = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(5.2 * cols, 3.6 * rows), squeeze=False)
    for ax, (title, lines) in zip(axes.flat, panels.items(), strict=False):
        for label, runs in lines.items():
            steps, mean, std = mean_curve(runs)
            if not steps:
                continue
            window = max(len(steps) // 20, 1)
            mean, std = smooth(mean, window), smooth(std, window)
            (line,) = ax.plot(steps, mean, label=label)
            if len([r for r in runs if r]) > 1:
                low = [m - s for m, s in zip(mean, std, strict=True)]
                high = [m + s for m, s in zip(mean, std, strict=True)]
                ax.fill_between(steps, low, high, color=line.get_color(), alpha=0.2, lw=0)
        for step in (marks or {}).get(title, ()):
            ax.axvline(step, color="black", ls="--", lw=1)
        if title:
            ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        if log:
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
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


def format_metric(values: Sequence[float], digits: int = 3) -> str:
    return summarise(values).format(digits)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def write_run_report(out: Path, config: Any, metrics: Mapping[str, float]) -> Path:
    """`report.md` of one run: what ran, the evaluation, and the learning curve."""
    records = read_metrics(out)
    curves = {"loss": curve(records, "loss")}
    for key in sorted({k for r in records for k in r if k.startswith("loss/")}):
        curves[key] = curve(records, key)
    plot = plot_learning_curves(curves, out / "learning_curve.png")
    evaluated = sorted({k for r in records for k in r if k.startswith("eval/")})
    eval_section: list[str] = []
    if evaluated:
        eval_plot = plot_learning_curves(
            {k.removeprefix("eval/"): curve(records, k) for k in evaluated},
            out / "eval_curves.png",
            ylabel="value",
            title="evaluation during training",
        )
        eval_section = [
            "## Evaluation during training",
            "",
            f"![eval curves]({eval_plot.name})",
            "",
        ]
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
        *eval_section,
    ]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path
