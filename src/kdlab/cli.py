"""The `kdlab` command line. Subcommands import their heavy dependencies inside `main`."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

EXIT_USAGE = 2


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="kdlab", description="Knowledge distillation of language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    demo = sub.add_parser("demo", help="built-in task end to end: teacher, students, report")
    demo.add_argument("--quick", action="store_true", help="a smaller demo (about 2 minutes)")
    demo.add_argument("--out", default="kdlab-demo", help="output folder (default: kdlab-demo)")
    demo.add_argument("--seeds", type=int, default=None, help="seeds per method")

    distill = sub.add_parser("distill", help="one distillation run from a YAML config")
    distill.add_argument("config", nargs="?", help="YAML run config")
    distill.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set train.max_steps=3 (repeatable)",
    )
    distill.add_argument("--resume", action="store_true", help="continue an interrupted run")
    distill.add_argument(
        "--help-config", action="store_true", help="list every config field and exit"
    )

    cache = sub.add_parser(
        "cache-teacher", help="run the teacher once over the data and write an offline cache"
    )
    cache.add_argument("config", help="YAML config with teacher.model, data and a cache section")
    cache.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config field, e.g. --set cache.k=32 (repeatable)",
    )

    compare = sub.add_parser(
        "compare", help="a grid of runs (methods x seeds x values) -> leaderboard + report"
    )
    compare.add_argument("config", help="comparison YAML (base run config, methods, seeds, grid)")

    ev = sub.add_parser(
        "eval", help="accuracy / perplexity / fidelity of a saved model, or lm-eval tasks"
    )
    ev.add_argument("--model", required=True, help="model path or hub id")
    ev.add_argument("--teacher", default=None, help="teacher path or hub id (for fidelity)")
    ev.add_argument("--task", default=None, help="built-in task: arith or oracle")
    ev.add_argument("--num-examples", type=int, default=200, help="held-out examples")
    ev.add_argument(
        "--batch-size", type=int, default=None, help="default: 64 for --task, 8 for --lm-eval"
    )
    ev.add_argument("--out", "--output", default=None, help="JSON file for the metrics")
    ev.add_argument(
        "--lm-eval",
        default=None,
        metavar="TASKS",
        help="comma-separated lm-evaluation-harness tasks, e.g. hellaswag,arc_easy "
        '(needs pip install "kdlab[lm-eval]"; see docs/evaluation.md)',
    )
    ev.add_argument(
        "--lm-eval-include", default=None, metavar="DIR", help="folder of local lm-eval task YAMLs"
    )
    ev.add_argument("--limit", type=int, default=None, help="lm-eval: at most N examples per task")
    ev.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples")

    sub.add_parser("losses", help="registered losses, their hyperparameters and papers")
    sub.add_parser("regimes", help="registered regimes (where training sequences come from)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return EXIT_USAGE
    _setup_logging()
    from kdlab.config import ConfigError
    from kdlab.data.datasets import DataError
    from kdlab.models.loading import ModelError
    from kdlab.teachers.cache import CacheError

    try:
        return _COMMANDS[args.command](args)
    except (ConfigError, DataError, ModelError, CacheError) as err:
        print(f"kdlab: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        if args.command == "cache-teacher":
            print("kdlab: interrupted; run the same command again to finish", file=sys.stderr)
        else:
            print("kdlab: interrupted; finished steps are checkpointed (--resume)", file=sys.stderr)
        return 130


def _setup_logging() -> None:
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("kdlab").setLevel(logging.INFO)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _cmd_demo(args: argparse.Namespace) -> int:
    from kdlab.demo import run_demo

    run_demo(out=args.out, quick=args.quick, seeds=args.seeds)
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    from kdlab.config import describe_fields, load_config

    if args.help_config:
        for key, tp, default, text in describe_fields():
            print(f"{key:28s} {tp:32s} {default:14s} {text}")
        return 0
    if not args.config:
        print("kdlab: error: distill needs a CONFIG file (see configs/)", file=sys.stderr)
        return EXIT_USAGE
    config = load_config(args.config, args.overrides)
    from kdlab.pipeline import run_distill

    summary = run_distill(config, resume=args.resume)
    print(f"done: {summary.steps} steps; student saved to {summary.output_dir / 'student'}")
    for key, value in summary.eval.items():
        print(f"  {key:24s} {value:.4f}" if isinstance(value, float) else f"  {key:24s} {value}")
    return 0


def _cmd_cache_teacher(args: argparse.Namespace) -> int:
    from kdlab.config import load_config
    from kdlab.pipeline import run_cache_teacher

    config = load_config(args.config, args.overrides)
    meta = run_cache_teacher(config)
    print(
        f"teacher cache: {meta['num_positions']} positions, k={meta['k']} ({meta['mode']}), "
        f"{meta['bytes_per_position']} bytes per position ({meta['bytes_per_entry']:.2f} per "
        f"entry), log-probabilities within {meta['max_log_error']:.3f} nats"
    )
    print(f"train from it with: teacher: {{cache: {config.cache.path}}}")
    return 0


def _cmd_compare(args: argparse.Namespace) -> int:
    from kdlab.compare import run_comparison

    report = run_comparison(args.config)
    # the leaderboard and any verdicts, without the plots
    print("\n".join(line for line in report.read_text().splitlines() if not line.startswith("![")))
    print(f"\nreport: {report} (and {report.with_suffix('.html')})")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    if args.lm_eval is not None:
        return _eval_lm_eval(args)
    if args.task is None:
        print("kdlab: error: eval needs --task, --lm-eval or both", file=sys.stderr)
        return EXIT_USAGE
    metrics = _eval_builtin(args)
    for key, value in metrics.items():
        print(f"{key:24s} {value:.4f}" if isinstance(value, float) else f"{key:24s} {value}")
    out = Path(args.out) if args.out else Path(args.model) / f"eval_{args.task}.json"
    if out.parent.is_dir():
        out.write_text(json.dumps(metrics, indent=2))
        print(f"saved to {out}")
    return 0


def _eval_builtin(args: argparse.Namespace) -> dict[str, float]:
    from kdlab.eval.evaluate import evaluate_saved

    return evaluate_saved(
        model=args.model,
        teacher=args.teacher,
        task=args.task,
        num_examples=args.num_examples,
        batch_size=args.batch_size or 64,
    )


def _eval_lm_eval(args: argparse.Namespace) -> int:
    """`--lm-eval`: lm-eval tasks, after the built-in `--task` when one is given too."""
    import json
    from pathlib import Path

    from kdlab.eval.lm_eval import run_lm_eval

    if args.teacher is not None and args.task is None:
        print("kdlab: error: --teacher needs --task (fidelity is built-in only)", file=sys.stderr)
        return EXIT_USAGE
    tasks = list(dict.fromkeys(t.strip() for t in args.lm_eval.split(",") if t.strip()))
    results = {args.task: _eval_builtin(args)} if args.task is not None else {}
    results |= run_lm_eval(
        args.model,
        tasks,
        include_path=args.lm_eval_include,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        batch_size=args.batch_size or 8,
    )
    print(f"{'task':24s} {'metric':24s} value")
    for task, metrics in results.items():
        for metric, value in metrics.items():
            shown = f"{value:.4f}" if isinstance(value, float) else value
            print(f"{task:24s} {metric:24s} {shown}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"saved to {args.out}")
    return 0


def _cmd_losses(args: argparse.Namespace) -> int:
    from kdlab.losses import available_losses, loss_info

    for name in available_losses():
        info = loss_info(name)
        hps = ", ".join(f"{k}={v!r}" for k, v in info["hparams"].items()) or "-"
        needs = [w for w, on in (("labels", info["needs_labels"]),) if on]
        if info["needs_teacher"]:
            cache = "sampled too" if info["sampled"] else "top-k"
            needs.append(f"cache: {cache}" if info["sparse"] else "cache: no")
        if info["coupling"] != "position":
            needs.append(f"couples positions: {info['coupling']}")
        print(f"{name:8s} {hps}" + (f"  [{'; '.join(needs)}]" if needs else ""))
        print(f"{'':8s} {info['paper']}")
    print("\nDetails: docs/losses/<name>.md; examples: configs/losses/<name>.yaml")
    return 0


def _cmd_regimes(args: argparse.Namespace) -> int:
    from kdlab.regimes import REGIMES, describe_options

    for name in REGIMES.names():
        regime = REGIMES.get(name)
        summary = (regime.__doc__ or "").strip().splitlines()[0]
        teacher = "  [needs the teacher model]" if regime.needs_teacher_model else ""
        print(f"{name:15s} {summary}{teacher}")
        for option, default, text in describe_options(regime.Options):
            print(f"{'':15s}   {option}={default!r}: {text}")
    print("\nAll generating regimes share regime.generation (see `kdlab distill --help-config`).")
    print("Details: docs/regimes/<name>.md; examples: configs/regimes/<name>.yaml")
    return 0


_COMMANDS = {
    "cache-teacher": _cmd_cache_teacher,
    "compare": _cmd_compare,
    "demo": _cmd_demo,
    "distill": _cmd_distill,
    "eval": _cmd_eval,
    "losses": _cmd_losses,
    "regimes": _cmd_regimes,
}

if __name__ == "__main__":
    sys.exit(main())
