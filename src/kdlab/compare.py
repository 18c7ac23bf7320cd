"""`kdlab compare`: a grid of runs (methods × seeds × hyperparameter values) and its leaderboard.

A comparison config is a YAML file:

    base:        {teacher: ..., student: ..., data: ..., train: ..., eval: ...}   # a run config
    methods:     {ce: {loss.name: ce}, fkl: {loss.name: fkl}, gkd: {regime.name: on_policy}}
    seeds:       3                             # train.seed and student.seed = 0 .. seeds − 1
    grid:        {train.lr: [1.0e-3, 3.0e-3]}  # optional: every combination is a grid point
    output_dir:  runs/compare

Every run goes to `output_dir/runs/<method>[,<key>=<value>...]/seed<k>`; running the comparison
again skips finished runs and resumes unfinished ones. Results: `results.json` (every run's
metrics), the leaderboard in `report.md`, and a self-contained `report.html` (plots embedded),
with mean ± std, the 95% confidence interval, the rank and the number of seeds.
"""

from __future__ import annotations

import base64
import copy
import html
import itertools
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kdlab.config import ConfigError, RunConfig, from_dict
from kdlab.eval.aggregate import Summary, ranks, summarise

logger = logging.getLogger("kdlab")

METRICS = (  # (key, title, higher is better)
    ("accuracy", "accuracy", True),
    ("golden_kl", "golden KL", False),
    ("top1_agreement", "top-1 agreement", True),
    ("answer_agreement", "answer agreement", True),
    ("kl_teacher_student", "KL(teacher‖student)", False),
    ("perplexity", "perplexity", False),
)


@dataclass(frozen=True)
class Entry:
    """One grid point of one method: its name and the run configs of its seeds."""

    name: str
    configs: tuple[RunConfig, ...]


def load_comparison(path: str | Path) -> tuple[list[Entry], Path]:
    """Read and validate a comparison config: every run config is checked before any runs."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison config {str(path)!r} not found")
    raw = yaml.safe_load(path.read_text()) or {}
    return expand(raw)


def expand(raw: dict[str, Any]) -> tuple[list[Entry], Path]:
    """The entries (method × grid point) of a comparison, each with one config per seed."""
    unknown = sorted(set(raw) - {"base", "methods", "seeds", "grid", "output_dir"})
    if unknown:
        raise ConfigError(
            f"comparison config: unknown key(s) {', '.join(unknown)}; valid: base, methods, "
            "seeds, grid, output_dir"
        )
    methods, seeds = raw.get("methods") or {}, raw.get("seeds", 1)
    if not isinstance(methods, dict) or not methods:
        raise ConfigError("comparison config: `methods` must map names to overrides")
    if not isinstance(seeds, int) or seeds < 1:
        raise ConfigError(f"comparison config: `seeds` must be an integer >= 1, got {seeds!r}")
    grid = raw.get("grid") or {}
    if any(not isinstance(v, list) or not v for v in grid.values()):
        raise ConfigError("comparison config: every `grid` key needs a non-empty list of values")
    out = Path(raw.get("output_dir", "runs/compare"))
    entries = []
    for method, overrides in methods.items():
        for point in itertools.product(*grid.values()):
            values = dict(zip(grid, point, strict=True))
            name = ",".join([str(method), *(f"{k}={v}" for k, v in values.items())])
            configs = tuple(
                _run_config(raw.get("base") or {}, {**(overrides or {}), **values}, seed, out, name)
                for seed in range(seeds)
            )
            entries.append(Entry(name, configs))
    return entries, out


def _run_config(
    base: dict[str, Any], overrides: dict[str, Any], seed: int, out: Path, name: str
) -> RunConfig:
    raw = copy.deepcopy(base)
    for key, value in {**overrides, "train.seed": seed, "student.seed": seed}.items():
        _set(raw, key, value)
    raw["output_dir"] = str(out / "runs" / name / f"seed{seed}")
    try:
        return from_dict(raw)
    except ConfigError as err:
        raise ConfigError(f"comparison entry {name!r}, seed {seed}: {err}") from err


def _set(raw: dict[str, Any], dotted: str, value: Any) -> None:
    *sections, last = dotted.split(".")
    node = raw
    for key in sections:
        if node.get(key) is None:
            node[key] = {}
        node = node[key]
        if not isinstance(node, dict):
            raise ConfigError(f"comparison override {dotted!r}: {key!r} is not a section")
    node[last] = value


def run_comparison(path: str | Path) -> Path:
    """Run (or finish) every run of the grid, then write the leaderboard and reports."""
    from kdlab.pipeline import run_distill

    entries, out = load_comparison(path)
    out.mkdir(parents=True, exist_ok=True)
    total = sum(len(e.configs) for e in entries)
    results: dict[str, list[dict[str, Any]]] = {}
    done = 0
    for entry in entries:
        for config in entry.configs:
            done += 1
            logger.info("run %d/%d: %s, seed %d", done, total, entry.name, config.train.seed)
            summary = run_distill(config, resume=True)  # finished runs are skipped
            results.setdefault(entry.name, []).append({"dir": config.output_dir, **summary.eval})
    (out / "results.json").write_text(json.dumps(results, indent=2))
    table = leaderboard(results)
    write_reports(out, table, results)
    return out / "report.md"


def leaderboard(results: dict[str, list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """One row per entry: each metric's `Summary` and rank, sorted by accuracy (best first)."""
    present = [m for m in METRICS if any(m[0] in r for runs in results.values() for r in runs)]
    rows = {
        name: {key: summarise([r.get(key, float("nan")) for r in runs]) for key, _, _ in present}
        for name, runs in results.items()
    }
    for key, _, higher in present:
        order = ranks({n: row[key].mean for n, row in rows.items()}, higher_is_better=higher)
        for name, rank in order.items():
            rows[name][f"rank/{key}"] = rank
    first = present[0][0] if present else None
    ordered = sorted(rows, key=lambda n: rows[n][f"rank/{first}"] if first else 0)
    return [{"name": n, "seeds": len(results[n]), **rows[n]} for n in ordered]


def table_cells(table: list[dict[str, Any]]) -> tuple[list[str], list[list[str]]]:
    present = [m for m in METRICS if table and m[0] in table[0]]
    header = ["entry", *[f"{t} {'↑' if h else '↓'}" for _, t, h in present], "seeds"]
    rows = []
    for row in table:
        cells = [row["name"]]
        for key, _, _ in present:
            s: Summary = row[key]
            ci = "" if s.n < 2 else f" [±{s.ci95:.3f}]"
            cells.append(f"{s.format()}{ci} (#{row[f'rank/{key}']})" if s.n else "–")
        rows.append([*cells, str(row["seeds"])])
    return header, rows


def write_reports(
    out: Path, table: list[dict[str, Any]], results: dict[str, list[dict[str, Any]]]
) -> None:
    """`report.md` (PNG plots beside it) and a self-contained `report.html` (plots inline)."""
    from kdlab.eval.report import markdown_table, plot_learning_curves, plot_scatter
    from kdlab.train.metrics_log import read_metrics

    curves = {}
    for name, runs in results.items():
        records = read_metrics(Path(runs[0]["dir"]))
        curves[name] = [(r["step"], r["loss"]) for r in records]
    plots = [plot_learning_curves(curves, out / "learning_curves.png")]
    if any("top1_agreement" in r for runs in results.values() for r in runs):
        points = {
            name: [(r["top1_agreement"], r["accuracy"]) for r in runs if "top1_agreement" in r]
            for name, runs in results.items()
        }
        plots.append(
            plot_scatter(
                points,
                out / "accuracy_vs_fidelity.png",
                xlabel="fidelity: top-1 agreement with the teacher",
                ylabel="accuracy",
            )
        )
    header, rows = table_cells(table)
    intro = (
        "Mean ± sample std over seeds, [± half-width of the 95% t-interval], (#rank). "
        "Learning curves show the first seed of each entry."
    )
    md = ["# kdlab comparison", "", intro, "", markdown_table(header, rows), ""]
    md += [f"![{p.stem}]({p.name})\n" for p in plots]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(header, rows, plots, intro))


def _html(header: list[str], rows: list[list[str]], plots: list[Path], intro: str) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    images = "".join(
        f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img alt="{p.stem}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in plots
    )
    style = "body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>kdlab comparison</title>"
        f"<style>{style}</style></head><body><h1>kdlab comparison</h1><p>{html.escape(intro)}</p>"
        f"<table><tr>{cells}</tr>{body}</table>{images}</body></html>"
    )
