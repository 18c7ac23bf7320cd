"""Forward + backward time and peak memory of every registered loss, relative to `fkl`.

Every loss runs on the chunked path (`chunked_loss`: hidden states and lm_head weights in,
chunk by chunk), on the same inputs: N positions as B sequences of T tokens, vocabulary V, hidden
size H for both models, labels on every position, default hyperparameters. Each loss is measured
in a fresh subprocess, so its peak memory is its own: on CUDA the peak allocated memory above the
inputs, on CPU the growth of the process's peak resident set above the inputs (coarser: it also
counts allocator caching). Times are medians over `--reps` timed repetitions after `--warmup`
untimed ones; the table quotes each loss's time and memory as a ratio to `fkl` in the same run
(measured first and last; the baseline is the mean of the two).

    python benchmarks/loss_overhead.py                     # V=32000, N=2048 (B=4 x T=512)
    python benchmarks/loss_overhead.py --losses fkl atkd --reps 2 --vocab 4096   # smoke test
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

import torch
from torch import Tensor


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=default_device, help="cuda or cpu (default: %(default)s)")
    p.add_argument("--vocab", type=int, default=32000, help="V (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="B sequences (default: %(default)s)")
    p.add_argument("--seq-len", type=int, default=512, help="T per sequence (default: %(default)s)")
    p.add_argument("--hidden", type=int, default=1024, help="H (default: %(default)s)")
    p.add_argument("--chunk-size", type=int, default=1024, help="(default: %(default)s)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed ones (default: %(default)s)")
    p.add_argument("--losses", nargs="+", default=None, help="default: every registered loss")
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def make_inputs(args: argparse.Namespace) -> dict[str, Tensor]:
    b, t, h, v, dev = args.batch, args.seq_len, args.hidden, args.vocab, args.device
    g = torch.Generator(device="cpu").manual_seed(0)
    scale = 2.0 * h**-0.5  # logits of a few nats' spread, like a trained LM's
    return {
        "s_hidden": torch.randn(b, t, h, generator=g).to(dev).requires_grad_(),
        "s_weight": torch.nn.Parameter((torch.randn(v, h, generator=g) * scale).to(dev)),
        "t_hidden": torch.randn(b, t, h, generator=g).to(dev),
        "t_weight": (torch.randn(v, h, generator=g) * scale).to(dev),
        "labels": torch.randint(0, v, (b, t), generator=g).to(dev),
    }


def peak_bytes(device: str) -> int:
    if device.startswith("cuda"):
        return torch.cuda.max_memory_allocated()
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def worker(args: argparse.Namespace) -> dict[str, Any]:
    """One loss in this process: time and peak memory of forward + backward."""
    from kdlab.losses import build_loss, chunked_loss

    torch.manual_seed(0)
    loss_fn = build_loss(args.worker).to(args.device)
    x = make_inputs(args)

    def step() -> float:
        x["s_hidden"].grad = x["s_weight"].grad = None
        loss = chunked_loss(
            loss_fn,
            x["s_hidden"],
            x["s_weight"],
            x["t_hidden"],
            x["t_weight"],
            x["labels"],
            chunk_size=args.chunk_size,
        )
        loss.backward()
        sync(args.device)
        return float(loss)

    sync(args.device)
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated() if args.device.startswith("cuda") else peak_bytes("cpu")
    for _ in range(args.warmup):
        value = step()
    extra = peak_bytes(args.device) - before
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        value = step()
        times.append(time.perf_counter() - t0)
    return {
        "loss": args.worker,
        "value": value,
        "median_s": statistics.median(times),
        "times_s": times,
        "peak_extra_bytes": max(extra, 0),
    }


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_one(name: str, argv: list[str]) -> dict[str, Any]:
    cmd = [sys.executable, __file__, *argv, "--worker", name]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        return {"loss": name, "error": proc.stderr.strip().splitlines()[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def markdown(results: list[dict[str, Any]]) -> str:
    runs = [r for r in results if r["loss"] == "fkl" and "error" not in r]
    base = {k: statistics.mean(r[k] for r in runs) for k in ("median_s", "peak_extra_bytes")}
    lines = [
        "| loss | median time (s) | time / fkl | peak extra memory (MiB) | memory / fkl | value |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"| {r['loss']} | error: {r['error']} | | | | |")
            continue
        mem = r["peak_extra_bytes"] / 2**20
        lines.append(
            f"| {r['loss']} | {r['median_s']:.3f} | {r['median_s'] / base['median_s']:.2f} "
            f"| {mem:,.0f} | {r['peak_extra_bytes'] / max(base['peak_extra_bytes'], 1):.2f} "
            f"| {r['value']:.4f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    from kdlab.losses import available_losses

    names = args.losses or available_losses()
    # fkl first and last: the baseline is the mean of the two, which evens out slow drifts of a
    # shared machine over the run
    names = ["fkl", *[n for n in names if n != "fkl"], "fkl"]
    shared = ("device", "vocab", "batch", "seq_len", "hidden", "chunk_size", "reps", "warmup")
    argv = [x for k in shared for x in (f"--{k.replace('_', '-')}", str(getattr(args, k)))]
    device = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {device}; torch {torch.__version__}; V={args.vocab} N={args.batch * args.seq_len}"
        f" (B={args.batch} x T={args.seq_len}) H={args.hidden} chunk={args.chunk_size}; "
        f"reps={args.reps} warmup={args.warmup}",
        flush=True,
    )
    results = []
    for name in names:
        results.append(run_one(name, argv))
        print(f"  done {name}", flush=True)
    print(markdown(results))
    if args.out:
        meta = {"device": device, "torch": torch.__version__, "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
