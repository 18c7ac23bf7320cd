"""`kdlab compare`: a grid of runs (methods × seeds × hyperparameter values) and its leaderboard.

A comparison config is a YAML file:

    base:        {teacher: ..., student: ..., data: ..., train: ..., eval: ...}   # a run config
    methods:     {ce: {loss.name: ce}, fkl: {loss.name: fkl}, gkd: {regime.name: on_policy}}
    seeds:       3                             # train.seed and student.seed = 0 .. seeds − 1
    grid:        {train.lr: [1.0e-3, 3.0e-3]}  # optional: every combination is a grid point
    output_dir:  runs/compare

With a `cache:` section in `base` (and `base.teacher.model`), the teacher cache is written once
before the runs (`kdlab cache-teacher`), and entries use it with `teacher: {cache: <cache.path>}`.

Every run goes to `output_dir/runs/<method>[,<key>=<value>...]/seed<k>`; running the comparison
again skips finished runs and resumes unfinished ones. Results: `results.json` (every run's
metrics), the leaderboard in `report.md`, and a self-contained `report.html` (plots embedded),
with mean ± std, the 95% confidence interval, the rank and the number of seeds. Runs that log
proxy and golden curves (`eval.every` on `oracle`) also get a teacher-hacking verdict
(`teacher_hacking.json` and a section of the report).
"""

from __future__ import annotations

import base64
import copy
import html
import itertools
import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import yaml

from kdlab.config import ConfigError, RunConfig, from_dict
from kdlab.eval.aggregate import Summary, ranks, summarise

logger = logging.getLogger("kdlab")

METRICS = (  # (key, title, higher is better)
    ("accuracy", "accuracy", True),
    ("golden_kl", "golden KL", False),
    ("perplexity", "perplexity", False),
    ("top1_agreement", "top-1 agreement", True),
    ("topk_overlap", "top-5 overlap", True),
    ("answer_agreement", "answer agreement", True),
    ("kl_teacher_student", "KL(teacher‖student)", False),
    ("kl_student_teacher", "KL(student‖teacher)", False),
)
# curves logged every `eval.every` steps that the teacher-hacking check reads
PROXY_CURVE = "eval/train/kl_teacher_student"  # distance to the teacher where it is optimised
HELD_OUT_PROXY_CURVE = "eval/kl_teacher_student"
GOLDEN_CURVE = "eval/golden_kl"  # distance to the true distribution, held out


@dataclass(frozen=True)
class Section:
    """A titled table of a report, after the leaderboard."""

    title: str
    note: str
    header: list[str]
    rows: list[list[str]]


@dataclass(frozen=True)
class Entry:
    """One grid point of one method: its name and the run configs of its seeds."""

    name: str
    configs: tuple[RunConfig, ...]


def load_comparison(path: str | Path) -> tuple[list[Entry], Path]:
    """Read and validate a comparison config: every run config is checked before any runs."""
    return expand(_read(path))


def _read(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"comparison config {str(path)!r} not found")
    return yaml.safe_load(path.read_text()) or {}


def shared_cache_config(raw: dict[str, Any]) -> RunConfig | None:
    """The `kdlab cache-teacher` run of a comparison whose `base` has a `cache:` section.

    The cache is written once, before the runs, from the base's teacher and data; entries train
    from it with `teacher: {cache: <cache.path>}` (a finished cache is reused).
    """
    base = raw.get("base") or {}
    if not base.get("cache"):
        return None
    if not (base.get("teacher") or {}).get("model"):
        raise ConfigError(
            "comparison config: base.cache needs base.teacher.model (the teacher whose cache "
            "the entries share)"
        )
    try:
        return from_dict(copy.deepcopy(base))
    except ConfigError as err:
        raise ConfigError(f"comparison base: {err}") from err


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

    raw = _read(path)
    entries, out = expand(raw)
    cache_run = shared_cache_config(raw)
    out.mkdir(parents=True, exist_ok=True)
    if cache_run is not None:
        from kdlab.pipeline import run_cache_teacher

        logger.info("teacher cache shared by the runs: %s", cache_run.cache.path)
        run_cache_teacher(cache_run)  # resumable; a finished cache with these settings is reused
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
    return write_reports(out, table, results)


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


def table_cells(
    table: list[dict[str, Any]],
    *,
    reference: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the leaderboard as text.

    Args:
        table: `leaderboard` rows.
        reference: one model's own metrics (e.g. the teacher's), shown first as `teacher`.
        labels: display names of entries (default: the entry names).
    """
    present = [m for m in METRICS if table and m[0] in table[0]]
    header = ["entry", *[f"{t} {'↑' if h else '↓'}" for _, t, h in present], "seeds"]
    rows = []
    if reference is not None:
        cells = [f"{reference[k]:.3f}" if k in reference else "–" for k, _, _ in present]
        rows.append(["teacher", *cells, "1"])
    for row in table:
        cells = [(labels or {}).get(row["name"], row["name"])]
        for key, _, _ in present:
            s: Summary = row[key]
            ci = "" if s.n < 2 else f" [±{s.ci95:.3f}]"
            cells.append(f"{s.format()}{ci} (#{row[f'rank/{key}']})" if s.n else "–")
        rows.append([*cells, str(row["seeds"])])
    return header, rows


def leaderboard_text(header: list[str], rows: list[list[str]]) -> str:
    """The leaderboard as aligned plain text, for the console."""
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in [header, *rows]
    ]
    return "\n".join([lines[0], "-" * len(lines[0]), *lines[1:]])


def hacking_verdicts(results: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """Per entry: the teacher-hacking verdict of its seed-mean curves and of each seed.

    Entries whose runs logged no proxy and golden curves (`eval.every` on `oracle` with a
    teacher model) are left out.
    """
    from kdlab.eval.hacking import detect_teacher_hacking
    from kdlab.eval.report import mean_curve
    from kdlab.train.metrics_log import curve, read_metrics

    out: dict[str, dict[str, Any]] = {}
    for name, runs in results.items():
        records = [read_metrics(Path(r["dir"])) for r in runs]
        proxies = [curve(rs, PROXY_CURVE) for rs in records]
        goldens = [curve(rs, GOLDEN_CURVE) for rs in records]
        if not all(len(p) >= 3 and len(g) >= 3 for p, g in zip(proxies, goldens, strict=True)):
            continue
        steps, proxy, _ = mean_curve(proxies)
        golden_steps, golden, _ = mean_curve(goldens)
        if len(steps) < 3 or steps != golden_steps:  # the seeds were evaluated at other steps
            continue
        seeds = [
            detect_teacher_hacking([s for s, _ in p], [v for _, v in p], [v for _, v in g])
            for p, g in zip(proxies, goldens, strict=True)
        ]
        out[name] = {"mean": detect_teacher_hacking(steps, proxy, golden), "seeds": seeds}
    return out


def write_reports(
    out: Path,
    table: list[dict[str, Any]],
    results: dict[str, list[dict[str, Any]]],
    *,
    title: str = "kdlab comparison",
    preamble: str = "",
    reference: dict[str, float] | None = None,
    labels: dict[str, str] | None = None,
) -> Path:
    """`report.md` (PNG plots beside it) and a self-contained `report.html` (plots inline).

    Args:
        out: the comparison folder.
        table: `leaderboard(results)`.
        results: entry -> one dict per run (`dir` and the run's final metrics).
        title: the report's title.
        preamble: a paragraph on what ran, before the leaderboard.
        reference: the teacher's own metrics: a leaderboard row and a star in the scatter plot.
        labels: display names of entries.

    Returns:
        The path of `report.md`.
    """
    from kdlab.eval.report import markdown_table, plot_panels, plot_scatter
    from kdlab.train.metrics_log import curve, read_metrics

    records = {name: [read_metrics(Path(r["dir"])) for r in runs] for name, runs in results.items()}
    losses = {
        (labels or {}).get(name, name): {"loss": [curve(rs, "loss") for rs in runs]}
        for name, runs in records.items()
    }
    plots = [plot_panels(losses, out / "learning_curves.png", ylabel="training loss", log=True)]
    points = {
        (labels or {}).get(name, name): [
            (r["top1_agreement"], r["accuracy"])
            for r in runs
            if "top1_agreement" in r and "accuracy" in r
        ]
        for name, runs in results.items()
    }
    if any(points.values()):
        plots.append(
            plot_scatter(
                points,
                out / "accuracy_vs_fidelity.png",
                xlabel="fidelity: top-1 agreement with the teacher",
                ylabel="accuracy",
                reference=None
                if reference is None or "accuracy" not in reference
                else (1.0, reference["accuracy"]),
            )
        )
    verdicts = hacking_verdicts(results)
    sections: list[Section] = []
    if verdicts:
        lines = {
            "proxy: KL(teacher‖student), training data": PROXY_CURVE,
            "KL(teacher‖student), held out": HELD_OUT_PROXY_CURVE,
            "golden: KL(true‖student), held out": GOLDEN_CURVE,
        }
        panels = {
            name: {label: [curve(rs, key) for rs in records[name]] for label, key in lines.items()}
            for name in verdicts
        }
        marks = {n: [v["mean"].onset] for n, v in verdicts.items() if v["mean"].flagged}
        plots.append(
            plot_panels(panels, out / "proxy_golden.png", ylabel="KL (nats)", log=True, marks=marks)
        )
        rows = [
            [
                name,
                v["mean"].describe(),
                f"{sum(x.flagged for x in v['seeds'])} of {len(v['seeds'])}",
            ]
            for name, v in verdicts.items()
        ]
        sections.append(
            Section(
                "Teacher hacking",
                HACKING_NOTE,
                ["entry", "seed-mean curves", "seeds flagged"],
                rows,
            )
        )
    header, rows = table_cells(table, reference=reference, labels=labels)
    intro = (
        f"{preamble} Mean ± sample std over seeds, [± half-width of the 95% t-interval], "
        "(#rank). Curves: mean over seeds, band ± one std."
    ).strip()
    md = [f"# {title}", "", intro, "", markdown_table(header, rows), ""]
    for sec in sections:
        md += [f"## {sec.title}", "", sec.note, "", markdown_table(sec.header, sec.rows), ""]
    md += [f"![{p.stem}]({p.name})\n" for p in plots]
    (out / "report.md").write_text("\n".join(md))
    (out / "report.html").write_text(_html(title, header, rows, plots, intro, sections))
    if verdicts:
        summary = {
            n: {"mean": asdict(v["mean"]), "seeds": [asdict(x) for x in v["seeds"]]}
            for n, v in verdicts.items()
        }
        (out / "teacher_hacking.json").write_text(json.dumps(summary, indent=2))
    return out / "report.md"


HACKING_NOTE = (
    "Proxy: KL(teacher‖student) on training examples (what distillation optimises); golden: "
    "KL(true‖student) on held-out examples, both every `eval.every` steps. Flagged when, after "
    "golden's lowest point, golden rose and proxy fell by more than 2% (curves smoothed by a "
    "running median of 3; `kdlab.eval.hacking`)."
)


def _html(
    title: str,
    header: list[str],
    rows: list[list[str]],
    plots: list[Path],
    intro: str,
    sections: list[Section],
) -> str:
    images = "".join(
        f'<h2>{html.escape(p.stem.replace("_", " "))}</h2><img alt="{p.stem}" '
        f'src="data:image/png;base64,{base64.b64encode(p.read_bytes()).decode()}">'
        for p in plots
    )
    extra = "".join(
        f"<h2>{html.escape(sec.title)}</h2><p>{html.escape(sec.note)}</p>"
        f"{_html_table(sec.header, sec.rows)}"
        for sec in sections
    )
    style = "body{font-family:sans-serif}td,th{border:1px solid #ccc;padding:4px 8px}"
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
        f"<style>{style}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<p>{html.escape(intro)}</p>"
        f"{_html_table(header, rows)}{extra}{images}</body></html>"
    )


def _html_table(header: list[str], rows: list[list[str]]) -> str:
    cells = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in rows
    )
    return f"<table><tr>{cells}</tr>{body}</table>"
