"""The offline teacher cache: bytes per position, student step time, accuracy from caches (issue 5).

Three parts, one sub-command each:

1. `sizes`: bytes per position and per stored entry of kdlab's cache codec (`Codec`, Elias-Fano
   ids + log-levels, the default `value_bits: auto` and 8 bits) for k in {8, 32, 64, 128} and
   vocabularies of 32000, 128256 and 151936 tokens (and the built-in tasks' 21 and 22, k capped at
   V), with the stated log-prob error bound; computed references: a plain layout (int32 id +
   float16 log-prob = 6 bytes per entry) and DistillKit's recommended and budget compression
   settings (its `DistributionQuantizationConfig.total_bits` formula). Then a real cache is
   written with kdlab's writer for a random tiny Llama teacher (V = 32000) over synthetic
   examples, and its file bytes per position are set beside the formula.
2. `step`: the student's optimiser step with plain SFT (`ce`), online KD (`fkl` on the dense
   logits of a bigger teacher run under no_grad) and cached KD (`fkl` on a k = 64 cache of that
   teacher, written beforehand over the same examples), each a kdlab `Trainer` (`chunked: false`:
   all three losses see the `[B, T, V]` logits) calling its own `_step` (student forward, teacher
   signal, loss, backward, clipping, AdamW), timed in turn
   (SFT, online, cached, SFT, ...). Beside the steps, the cached path's parts are timed on their
   own: the signal (example keys, reading the rows, `Codec.decode`, assembling `[B, T, S]`),
   `to_buckets`, and each loss's forward + backward on the same logits.
3. `accuracy`: students with the demo's FULL settings (preset small, 450 steps, batch 32, lr 3e-3,
   500 examples; loss `fkl`, off-policy) trained from the built-in trained teacher (`dense`,
   online) and from caches of it (top-k with k in {2, 4, 8, 32, 64}, capped at the vocabulary,
   and a `sample` cache with k = 8), on `arith` and `oracle`, several seeds. Every saved student
   is evaluated against the teacher with `evaluate_saved` (accuracy, KL(teacher||student), top-1
   agreement; golden KL on oracle). Runs live in `--work/<task>/<method>-seed<N>`; finished runs
   and evaluations are kept, so a re-run resumes.

    python benchmarks/teacher_cache.py sizes --out sizes.json
    python benchmarks/teacher_cache.py step --reps 10 --out step.json
    python benchmarks/teacher_cache.py accuracy --work runs/bench-teacher-cache --out accuracy.json
    python benchmarks/teacher_cache.py step --reps 2 --seq-len 64 --batches 1   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from _models import BOS, FIRST_TOKEN, PAD, device_name, random_llama
from torch import Tensor, nn

SIZE_VOCABS = (32000, 128256, 151936)
SIZE_KS = (8, 32, 64, 128)
BUILTIN_VOCABS = {"arith": 21, "oracle": 22}
PLAIN_BYTES_PER_ENTRY = 6  # int32 id + float16 log-prob
LOG_FLOOR = 16.0
# DistillKit (arcee-ai/DistillKit, README "Logit Compression"): the recommended setting "used at
# Arcee for new captures" (~300 bytes/token) and the "budget pick" (~114 bytes per token)
DISTILLKIT = {
    "recommended": {"k": 128, "exact_k": 16, "exact_bits": 16, "terms": 6, "term_bits": 32},
    "budget": {"k": 50, "exact_k": 1, "exact_bits": 16, "terms": 3, "term_bits": 32},
}
STUDENT = {
    "hidden_size": 256,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 688,
}
TEACHER = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1408,
}
DISK_TEACHER = {
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "intermediate_size": 128,
}
# part 3: (method name, cache mode or None for the online teacher, k)
METHODS = (
    ("dense", None, None),
    ("top2", "top_k", 2),
    ("top4", "top_k", 4),
    ("top8", "top_k", 8),
    ("top32", "top_k", 32),
    ("top64", "top_k", 64),
    ("sample8", "sample", 8),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = p.add_subparsers(dest="part", required=True)
    sizes = sub.add_parser("sizes", help="part 1: bytes per position (formula and on disk)")
    sizes.add_argument("--examples", type=int, default=300, help="(default: %(default)s)")
    sizes.add_argument("--vocab", type=int, default=32000, help="on-disk V (default: %(default)s)")
    sizes.add_argument("--k", type=int, default=64, help="on-disk k (default: %(default)s)")
    sizes.add_argument(
        "--shard-examples", type=int, default=2048, help="(default: %(default)s, kdlab's)"
    )
    step = sub.add_parser("step", help="part 2: SFT vs online KD vs cached KD step time")
    step.add_argument("--vocab", type=int, default=32000, help="(default: %(default)s)")
    step.add_argument("--batch", type=int, default=8, help="sequences (default: %(default)s)")
    step.add_argument("--seq-len", type=int, default=256, help="T (default: %(default)s)")
    step.add_argument(
        "--batches", type=int, default=4, help="distinct batches cycled (default: %(default)s)"
    )
    step.add_argument("--k", type=int, default=64, help="cache k (default: %(default)s)")
    step.add_argument("--reps", type=int, default=10, help="timed rounds (default: %(default)s)")
    step.add_argument("--warmup", type=int, default=2, help="untimed ones (default: %(default)s)")
    step.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default: %(default)s; a shared machine swings with more)",
    )
    step.add_argument(
        "--profile",
        action="store_true",
        help="also print torch.profiler tables (an SFT step, a cached step, their losses)",
    )
    acc = sub.add_parser("accuracy", help="part 3: students from caches vs the dense teacher")
    acc.add_argument("--work", default="runs/bench-teacher-cache", help="(default: %(default)s)")
    acc.add_argument("--tasks", nargs="+", default=["arith", "oracle"], choices=["arith", "oracle"])
    acc.add_argument("--seeds", type=int, default=3, help="(default: %(default)s)")
    acc.add_argument(
        "--methods", nargs="+", default=[m[0] for m in METHODS], choices=[m[0] for m in METHODS]
    )
    acc.add_argument("--steps", type=int, default=None, help="override max_steps (smoke tests)")
    for sp in (sizes, step, acc):
        sp.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


# ---------------------------------------------------------------------------- shared helpers


def synthetic(n: int, prompt: tuple[int, int], completion: tuple[int, int], vocab: int) -> list:
    """`n` examples: bos + random prompt tokens, then counted random completion tokens.

    Lengths are drawn uniformly from the (low, high) ranges (equal bounds: fixed lengths).
    """
    from kdlab.data.collate import Encoded

    g = torch.Generator().manual_seed(n * 7919 + vocab)
    out = []
    for _ in range(n):
        p = int(torch.randint(prompt[0], prompt[1] + 1, (), generator=g))
        c = int(torch.randint(completion[0], completion[1] + 1, (), generator=g))
        ids = torch.randint(FIRST_TOKEN, vocab, (p - 1 + c,), generator=g).tolist()
        out.append(
            Encoded(input_ids=[BOS, *ids], counted=[False] * p + [True] * c, prompt_length=p)
        )
    return out


def plan_for(examples: list, vocab: int, k: int, teacher: str, shard_examples: int = 2048):
    """A `CachePlan` with kdlab's default codec (as `run_cache_teacher` builds it)."""
    from kdlab.teachers.cache import CachePlan, dataset_fingerprint

    codec = kdlab_codec(vocab, k)
    return CachePlan(
        teacher=teacher,
        teacher_revision=None,
        teacher_dtype="float32",
        tokenizer="synthetic",
        dataset=dataset_fingerprint(examples),
        num_examples=len(examples),
        max_length=max(len(e) for e in examples),
        vocab=vocab,
        k=codec.slots,
        mode="top_k",
        seed=0,
        shard_examples=shard_examples,
        codec=codec.to_dict(),
        data={},
    )


def kdlab_codec(vocab: int, k: int, bits: int | None = None):
    """kdlab's cache codec for (V, k): `value_bits: auto` (or `bits`), R = 16, label + tail."""
    from kdlab.teachers.cache import TRAILING, auto_value_bits
    from kdlab.teachers.codec import Codec

    k = min(k, vocab)
    return Codec(vocab, k, bits or auto_value_bits(vocab, k, LOG_FLOOR), LOG_FLOOR, TRAILING)


def write_json(path: str | None, part: str, results: Any, args: argparse.Namespace) -> None:
    if path:
        meta = {
            "part": part,
            "device": device_name(),
            "torch": torch.__version__,
            "args": vars(args),
        }
        Path(path).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


# ---------------------------------------------------------------------------- part 1: sizes


def distillkit_bytes(
    vocab: int, k: int, exact_k: int, exact_bits: int, terms: int, term_bits: int
) -> int:
    """Bytes per position of DistillKit's `DistributionQuantizationConfig.total_bits` (no bins).

    `exact_k` log-probs in `exact_bits`, `terms` polynomial coefficients in `term_bits` (rounded up
    to a byte), then k ids of `ceil(log2 V)` bits each, rounded up to a byte
    (arcee-ai/DistillKit, distillkit/compression/config.py).
    """
    logprob_bits = exact_k * exact_bits + terms * term_bits
    index_bytes = (k * math.ceil(math.log2(vocab)) + 7) // 8
    return -(-logprob_bits // 8) + index_bytes


def size_rows() -> list[dict[str, Any]]:
    from kdlab.teachers.codec import fitting_value_bits

    rows = []
    vocabs = [*SIZE_VOCABS, *BUILTIN_VOCABS.values()]
    for vocab in vocabs:
        for k in sorted({min(k, vocab) for k in SIZE_KS}):
            auto, eight = kdlab_codec(vocab, k), kdlab_codec(vocab, k, 8)
            rows.append(
                {
                    "vocab": vocab,
                    "k": k,
                    "value_bits": auto.value_bits,
                    "budget_only_bits": fitting_value_bits(vocab, k, 2.5, LOG_FLOOR, trailing=2),
                    "bytes": auto.bytes_per_position,
                    "bytes_per_entry": auto.bytes_per_position / k,
                    "max_log_error": auto.max_log_error,
                    "bytes_8bit": eight.bytes_per_position,
                    "bytes_per_entry_8bit": eight.bytes_per_position / k,
                    "max_log_error_8bit": eight.max_log_error,
                    "plain_bytes": PLAIN_BYTES_PER_ENTRY * k,
                }
            )
    return rows


def distillkit_rows() -> list[dict[str, Any]]:
    rows = []
    for vocab in SIZE_VOCABS:
        for name, setting in DISTILLKIT.items():
            k = setting["k"]
            rows.append(
                {
                    "vocab": vocab,
                    "setting": name,
                    "k": k,
                    "distillkit_bytes": distillkit_bytes(vocab, **setting),
                    "kdlab_bytes": kdlab_codec(vocab, k).bytes_per_position,
                    "kdlab_bits": kdlab_codec(vocab, k).value_bits,
                    "kdlab_bytes_8bit": kdlab_codec(vocab, k, 8).bytes_per_position,
                    "plain_bytes": PLAIN_BYTES_PER_ENTRY * k,
                }
            )
    return rows


def on_disk(args: argparse.Namespace) -> dict[str, Any]:
    """Write a real cache for a random tiny Llama teacher and measure its files."""
    from kdlab.data.collate import collate
    from kdlab.teachers.cache import TeacherCache, batch_keys, top_k_rows, write_cache

    examples = synthetic(args.examples, (8, 32), (16, 64), args.vocab)
    model = random_llama(DISK_TEACHER, vocab=args.vocab, seed=1, max_len=128).eval()
    plan = plan_for(examples, args.vocab, args.k, "random-llama-h64", args.shard_examples)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "cache"
        meta = write_cache(model, examples, plan, out, pad_id=PAD, batch_size=16)
        shards = sum(p.stat().st_size for p in out.glob("shard-*.safetensors"))
        everything = sum(p.stat().st_size for p in out.iterdir())
        # the decoded values against the teacher's exact log-probs, on the first 16 examples
        cache = TeacherCache(out)
        batch = collate(examples[:16], PAD)
        keep = batch["labels"] != -100
        with torch.no_grad():
            logits = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        exact = top_k_rows(logits[keep], batch["labels"][keep], plan.k)
        ids, log_probs = cache.codec.decode(torch.cat(list(cache.rows(batch_keys(batch)))))
        order = exact.ids.sort(-1)
        same_ids = bool((order.values == ids).all())
        truth = exact.log_probs[:, : plan.k].gather(-1, order.indices)
        finite = truth > -LOG_FLOOR
        error = float((log_probs[:, : plan.k] - truth)[finite].abs().max())
    n = meta["num_positions"]
    return {
        "vocab": args.vocab,
        "k": plan.k,
        "examples": len(examples),
        "num_positions": n,
        "formula_bytes_per_position": meta["bytes_per_position"],
        "shard_file_bytes": shards,
        "all_file_bytes": everything,
        "shard_bytes_per_position": shards / n,
        "all_bytes_per_position": everything / n,
        "overhead_bytes_per_example": (shards - n * meta["bytes_per_position"]) / len(examples),
        "ids_round_trip": same_ids,
        "max_log_error_stated": meta["max_log_error"],
        "max_log_error_measured": error,
    }


def run_sizes(args: argparse.Namespace) -> None:
    rows, dk = size_rows(), distillkit_rows()
    print(sizes_markdown(rows))
    print()
    print(distillkit_markdown(dk))
    print(f"\nwriting a cache: V={args.vocab}, k={args.k}, {args.examples} examples", flush=True)
    disk = on_disk(args)
    print(disk_markdown(disk))
    write_json(args.out, "sizes", {"codec": rows, "distillkit": dk, "on_disk": disk}, args)


def sizes_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| V | k | b (auto; budget only) | bytes / position | bytes / entry | max log error | "
        "bytes / position (8 bit) | bytes / entry (8 bit) | max log error (8 bit) | "
        "plain (6 B/entry) | plain / kdlab |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']:,} | {r['k']} | {r['value_bits']}; {r['budget_only_bits']} "
            f"| {r['bytes']} "
            f"| {r['bytes_per_entry']:.2f} | {r['max_log_error']:.3f} | {r['bytes_8bit']} "
            f"| {r['bytes_per_entry_8bit']:.2f} | {r['max_log_error_8bit']:.3f} "
            f"| {r['plain_bytes']} | {r['plain_bytes'] / r['bytes']:.2f}x |"
        )
    return "\n".join(lines)


def distillkit_markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| V | DistillKit setting | k | DistillKit bytes / position | kdlab (auto) | kdlab (8 bit) "
        "| plain |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['vocab']:,} | {r['setting']} | {r['k']} | {r['distillkit_bytes']} "
            f"| {r['kdlab_bytes']} (b={r['kdlab_bits']}) | {r['kdlab_bytes_8bit']} "
            f"| {r['plain_bytes']} |"
        )
    return "\n".join(lines)


def disk_markdown(d: dict[str, Any]) -> str:
    return "\n".join(
        [
            "| V | k | examples | positions | formula B/pos | shard files B/pos | all files B/pos "
            "| overhead B/example | max log error (stated / measured) |",
            "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
            f"| {d['vocab']:,} | {d['k']} | {d['examples']} | {d['num_positions']:,} "
            f"| {d['formula_bytes_per_position']} | {d['shard_bytes_per_position']:.2f} "
            f"| {d['all_bytes_per_position']:.2f} | {d['overhead_bytes_per_example']:.1f} "
            f"| {d['max_log_error_stated']:.4f} / {d['max_log_error_measured']:.4f} |",
        ]
    )


# ---------------------------------------------------------------------------- part 2: step time


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def build_trainers(args: argparse.Namespace, work: Path) -> tuple[dict[str, Any], Any, Any]:
    """Three `Trainer`s on copies of one student: sft, online, cached. Returns them, the cached
    teacher source and the online teacher model."""
    from accelerate import Accelerator

    from kdlab.config import TrainSpec
    from kdlab.losses import WeightedSum, build_loss
    from kdlab.regimes import REGIMES, RegimeContext
    from kdlab.teachers import OnlineTeacher
    from kdlab.teachers.cache import TeacherCache, write_cache
    from kdlab.teachers.cached import CachedTeacher
    from kdlab.train.trainer import Trainer

    half = args.seq_len // 2
    data = synthetic(args.batch * args.batches, (half, half), (half, half), args.vocab)
    teacher = random_llama(TEACHER, vocab=args.vocab, seed=1, max_len=args.seq_len).eval()
    plan = plan_for(data, args.vocab, args.k, "random-llama-h512")
    write_cache(teacher, data, plan, work / "cache", pad_id=PAD, batch_size=args.batch)
    cached = CachedTeacher(TeacherCache(work / "cache"))
    student = random_llama(STUDENT, vocab=args.vocab, seed=0, max_len=args.seq_len)
    accelerator = Accelerator(cpu=True)
    steps = args.warmup + args.reps + 1
    spec = TrainSpec(
        max_steps=steps,
        batch_size=args.batch,
        lr=1e-4,
        progress=False,
        log_every=10**6,
        chunked=False,
    )
    variants = {
        "sft": (None, "ce"),
        "online": (OnlineTeacher(teacher, vocab=args.vocab), "fkl"),
        "cached": (cached, "fkl"),
    }
    trainers = {}
    for name, (source, loss) in variants.items():
        model = copy.deepcopy(student)
        context = RegimeContext(
            dataset=data,
            pad_id=PAD,
            batch_size=args.batch,
            grad_accum=1,
            seed=0,
            student=model,
            vocab=args.vocab,
        )
        trainers[name] = Trainer(
            student=model,
            teacher=source,
            loss_fn=WeightedSum({"kd" if loss == "fkl" else "ce": (build_loss(loss), 1.0)}),
            regime=REGIMES.get("off_policy")(context),
            spec=spec,
            output_dir=work / name,
            accelerator=accelerator,
            vocab=args.vocab,
        )
    return trainers, cached, teacher


def signal_parts(cached: Any, batch: dict[str, Tensor]) -> dict[str, float]:
    """`CachedTeacher.signal`'s stages, timed one by one (the same calls, in the same order)."""
    from kdlab.losses.reduce import IGNORE_INDEX
    from kdlab.teachers.cache import batch_keys

    cache, labels, t = cached.cache, batch["labels"], {}
    t0 = time.perf_counter()
    keep = labels != IGNORE_INDEX
    keys = batch_keys({k: batch[k] for k in ("input_ids", "attention_mask", "labels")})
    cached._check_rows(keys, keep.sum(-1).tolist())
    t["keys"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    codes = torch.cat(list(cache.rows(keys)))
    t["read"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    ids, log_probs = cache.codec.decode(codes)
    t["decode"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    slots = cache.k
    full_ids = torch.arange(slots).expand(*labels.shape, slots).clone()
    full_log = torch.full((*labels.shape, slots + 2), float("-inf"))
    full_log[..., -1] = 0.0
    full_ids[keep], full_log[keep] = ids, log_probs
    t["assemble"] = time.perf_counter() - t0
    return t


def loss_cases(
    trainers: dict[str, Any],
    cached: Any,
    teacher: nn.Module,
    batch: dict[str, Tensor],
    logits: Tensor,
) -> dict[str, Callable[[], None]]:
    """Each piece of the three steps' loss computation on the same `[B, T, V]` logits (a leaf),
    in an order in which each piece finds what it needs (the signal, the teacher's logits)."""
    from kdlab.losses import build_loss
    from kdlab.losses.sparse import to_buckets

    labels = batch["labels"]
    keep = labels != -100
    n = keep.sum().float()
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask")}
    held: dict[str, Any] = {}

    def signal() -> None:
        held["sparse"] = cached.signal(batch).for_loss

    def teacher_forward() -> None:
        with torch.no_grad():
            held["dense"] = teacher(**inputs).logits

    def loss_backward(name: str, target: str | None) -> Callable[[], None]:
        def run() -> None:
            logits.grad = None
            loss_fn = trainers[name].loss_fn
            teacher_signal = None if target is None else held[target]
            total, _ = loss_fn.forward_terms(logits, teacher_signal, labels, num_items_in_batch=n)
            total.backward()

        return run

    def ce_counted() -> None:  # what SFT would cost if the loss saw only the counted positions
        logits.grad = None
        build_loss("ce")(logits[keep], None, labels[keep]).backward()

    def buckets(backward: bool) -> Callable[[], None]:
        def run() -> None:
            logits.grad = None
            with torch.set_grad_enabled(backward):
                student, _, _ = to_buckets(logits, held["sparse"], labels)
            if backward:
                torch.where(student.isfinite(), student, 0.0).sum().backward()

        return run

    return {
        "signal": signal,
        "teacher_forward": teacher_forward,
        "to_buckets_fwd": buckets(False),
        "to_buckets_fwd_bwd": buckets(True),
        "loss_ce_fwd_bwd": loss_backward("sft", None),
        "loss_ce_counted_only_fwd_bwd": ce_counted,
        "loss_fkl_dense_fwd_bwd": loss_backward("online", "dense"),
        "loss_fkl_sparse_fwd_bwd": loss_backward("cached", "sparse"),
    }


def loss_parts(
    cases: dict[str, Callable[[], None]], cached: Any, batch: dict[str, Tensor]
) -> dict[str, float]:
    out = {}
    for key, case in cases.items():
        out[key] = timed(case)
        if key == "signal":
            out.update({f"signal/{k}": v for k, v in signal_parts(cached, batch).items()})
    return out


def profile_steps(
    trainers: dict[str, Any], cases: dict[str, Callable[[], None]], step: int
) -> None:
    from torch.profiler import ProfilerActivity, profile

    runs = {
        f"one {name} step": (lambda name=name: trainers[name]._step(step))
        for name in ("sft", "cached")
    }
    runs.update({k: cases[k] for k in ("loss_ce_fwd_bwd", "loss_fkl_sparse_fwd_bwd")})
    for title, fn in runs.items():
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fn()
        print(f"\n### profile: {title} (self CPU time)")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))


def run_step(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    logging.getLogger("kdlab").setLevel(logging.WARNING)
    print(
        f"device: {device_name()} ({torch.get_num_threads()} threads); torch {torch.__version__}; "
        f"V={args.vocab} batch={args.batch}x{args.seq_len} k={args.k} reps={args.reps} "
        f"warmup={args.warmup}",
        flush=True,
    )
    with tempfile.TemporaryDirectory() as tmp:
        trainers, cached, teacher = build_trainers(args, Path(tmp))
        regime = trainers["cached"].regime
        batch0 = regime.micro_batches(0)[0]
        with torch.no_grad():
            logits = (
                trainers["sft"]
                .model(input_ids=batch0["input_ids"], attention_mask=batch0["attention_mask"])
                .logits
            )
        logits = logits.float().requires_grad_()
        cases = loss_cases(trainers, cached, teacher, batch0, logits)
        steps: dict[str, list[float]] = {name: [] for name in trainers}
        parts: dict[str, list[float]] = {}
        for rep in range(args.warmup + args.reps):
            for name, trainer in trainers.items():  # sft, online, cached, sft, ...
                seconds = timed(lambda trainer=trainer, rep=rep: trainer._step(rep))
                if rep >= args.warmup:
                    steps[name].append(seconds)
            for key, seconds in loss_parts(cases, cached, batch0).items():
                if rep >= args.warmup:
                    parts.setdefault(key, []).append(seconds)
            if rep >= args.warmup:
                line = ", ".join(f"{k} {v[-1]:.3f} s" for k, v in steps.items())
                print(f"  round {rep + 1 - args.warmup}: {line}", flush=True)
        if args.profile:
            profile_steps(trainers, cases, args.warmup + args.reps)
    result = {
        "steps": {k: {"median_s": statistics.median(v), "times_s": v} for k, v in steps.items()},
        "parts": {k: {"median_s": statistics.median(v), "times_s": v} for k, v in parts.items()},
        "counted_positions": int((batch0["labels"] != -100).sum()),
    }
    print(step_markdown(result))
    write_json(args.out, "step", result, args)


def step_markdown(result: dict[str, Any]) -> str:
    steps = {k: v["median_s"] for k, v in result["steps"].items()}
    times = {k: v["times_s"] for k, v in result["steps"].items()}
    spread = {k: max(abs(t / steps[k] - 1) for t in v) for k, v in times.items()}
    lines = [
        "| step | median (s) | median / SFT median | median of per-round ratios to SFT "
        "| largest deviation of a round from the median |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, title in (
        ("sft", "SFT (`ce`)"),
        ("online", "online KD (`fkl`, dense teacher)"),
        ("cached", "cached KD (`fkl`, top-k cache)"),
    ):
        paired = statistics.median(a / b for a, b in zip(times[name], times["sft"], strict=True))
        lines.append(
            f"| {title} | {steps[name]:.3f} | {steps[name] / steps['sft']:.2f} | {paired:.2f} "
            f"| {100 * spread[name]:.0f}% |"
        )
    lines += [
        "",
        "| part (same logits, timed alone) | median (s) | × SFT step |",
        "|---|---:|---:|",
    ]
    for key, value in result["parts"].items():
        lines.append(
            f"| {key} | {value['median_s']:.4f} | {value['median_s'] / steps['sft']:.3f} |"
        )
    return "\n".join(lines)


# ---------------------------------------------------------------------------- part 3: accuracy


def effective_methods(task: str, names: list[str]) -> list[tuple[str, str | None, int | None]]:
    """The methods to train, with k capped at the vocabulary; caps that coincide run once."""
    vocab = BUILTIN_VOCABS[task]
    chosen, seen = [], set()
    for name, mode, k in METHODS:
        if name not in names:
            continue
        k_eff = None if k is None else min(k, vocab)
        if (mode, k_eff) in seen:
            continue
        seen.add((mode, k_eff))
        chosen.append((name if k_eff == k else f"top{k_eff}", mode, k_eff))
    return chosen


def method_label(task: str, name: str, mode: str | None, k: int | None, names: list[str]) -> str:
    if mode is None:
        return "dense (online teacher)"
    if mode == "sample":
        return f"sample, k = {k}"
    asked = [k0 for n, m, k0 in METHODS if m == mode and n in names and min(k0, k) == k and k0 >= k]
    if k == BUILTIN_VOCABS[task]:
        return f"top-k, k = {', '.join(map(str, asked))} (≥ V: all {k} tokens stored)"
    return f"top-k, k = {k}"


def data_section(task: str) -> dict[str, Any]:
    from kdlab.demo import FULL

    return {"dataset": f"task:{task}", "num_examples": FULL.data["num_examples"]}


def ensure_cache(task: str, mode: str, k: int, work: Path, teacher: str) -> Path:
    from kdlab.config import from_dict
    from kdlab.demo import FULL
    from kdlab.pipeline import run_cache_teacher

    path = work / task / f"cache-{mode}-k{k}"
    run_cache_teacher(
        from_dict(
            {
                "teacher": {"model": teacher},
                "data": data_section(task),
                "cache": {"path": str(path), "k": k, "mode": mode},
                "eval": {"num_examples": FULL.eval_examples},
            }
        )
    )
    return path


def student_run(
    task: str, name: str, cache: Path | None, seed: int, work: Path, teacher: str, steps: int | None
) -> Path:
    """Train (or resume, or skip when finished) one student; returns its folder."""
    from kdlab.config import from_dict
    from kdlab.demo import FULL
    from kdlab.pipeline import run_distill

    train = {**FULL.train, "seed": seed, "progress": False}
    if steps is not None:
        train.update(max_steps=steps, warmup_steps=min(train["warmup_steps"], steps))
    train["log_every"] = train["max_steps"]
    out = work / task / f"{name}-seed{seed}"
    config = from_dict(
        {
            "teacher": {"cache": str(cache)} if cache is not None else {"model": teacher},
            "student": {**FULL.student, "seed": seed},
            "data": data_section(task),
            "loss": {"name": "fkl"},
            "regime": {"name": "off_policy"},
            "train": train,
            # every student is evaluated the same way afterwards (`evaluate_saved`)
            "eval": {"enabled": False, "num_examples": FULL.eval_examples},
            "output_dir": str(out),
        }
    )
    run_distill(config, resume=True)
    return out


def evaluated(path: Path, model: str, teacher: str | None, task: str) -> dict[str, Any]:
    """`evaluate_saved` of `model` (against `teacher`), kept in `path` (computed once)."""
    from kdlab.demo import FULL
    from kdlab.eval.evaluate import evaluate_saved

    if not path.is_file():
        metrics = evaluate_saved(
            model=model, teacher=teacher, task=task, num_examples=FULL.eval_examples, batch_size=100
        )
        path.write_text(json.dumps(metrics, indent=2))
    return json.loads(path.read_text())


def run_accuracy(args: argparse.Namespace) -> None:
    from kdlab.zoo import ensure_teacher

    logging.basicConfig(level=logging.WARNING)
    work = Path(args.work)
    results: dict[str, Any] = {}
    for task in args.tasks:
        (work / task).mkdir(parents=True, exist_ok=True)
        teacher = str(ensure_teacher(task, {}, "standard"))
        methods = effective_methods(task, args.methods)
        caches = {
            name: ensure_cache(task, mode, k, work, teacher)
            for name, mode, k in methods
            if mode is not None
        }
        task_results: dict[str, Any] = {
            "teacher": evaluated(work / task / "teacher_eval.json", teacher, None, task),
            "methods": {},
        }
        for name, mode, k in methods:
            stored = None if k is None else kdlab_codec(BUILTIN_VOCABS[task], k).bytes_per_position
            task_results["methods"][name] = {
                "label": method_label(task, name, mode, k, args.methods),
                "mode": mode,
                "k": k,
                "bytes_per_position": stored,
                "runs": [],
            }
        for seed in range(args.seeds):  # every method once before the next seed
            for name, _, _ in methods:
                t0 = time.perf_counter()
                run = student_run(task, name, caches.get(name), seed, work, teacher, args.steps)
                metrics = evaluated(
                    run / "eval_with_teacher.json", str(run / "student"), teacher, task
                )
                task_results["methods"][name]["runs"].append({"dir": str(run), **metrics})
                print(
                    f"  {task} {name} seed {seed}: accuracy {metrics['accuracy']:.3f} "
                    f"({time.perf_counter() - t0:.0f} s)",
                    flush=True,
                )
        results[task] = task_results
        print(accuracy_markdown(task, task_results), flush=True)
    write_json(args.out, "accuracy", results, args)


def accuracy_markdown(task: str, r: dict[str, Any]) -> str:
    from kdlab.eval.report import format_metric

    golden = task == "oracle"
    header = ["teacher signal", "bytes / position", "accuracy ↑"]
    header += ["golden KL ↓"] if golden else []
    header += ["KL(teacher‖student) ↓", "top-1 agreement ↑", "seeds"]
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    t = r["teacher"]
    cells = ["teacher itself", "–", f"{t['accuracy']:.3f}"]
    cells += [f"{t['golden_kl']:.4f}"] if golden else []
    lines.append("| " + " | ".join([*cells, "–", "–", "1"]) + " |")
    for m in r["methods"].values():
        runs = m["runs"]

        def cell(key: str, digits: int = 3, runs: list = runs) -> str:
            return format_metric([x.get(key, math.nan) for x in runs], digits)

        cells = [
            m["label"],
            "–" if m["bytes_per_position"] is None else str(m["bytes_per_position"]),
        ]
        cells += [cell("accuracy")] + ([cell("golden_kl", 4)] if golden else [])
        cells += [cell("kl_teacher_student", 4), cell("top1_agreement"), str(len(runs))]
        lines.append("| " + " | ".join(cells) + " |")
    return f"{task}:\n" + "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    {"sizes": run_sizes, "step": run_step, "accuracy": run_accuracy}[args.part](args)


if __name__ == "__main__":
    main()
