"""Memory and time of forward KL (forward + backward) from hidden states: kdlab's chunked path,
naive PyTorch (full logits of both models) and TRL's chunked divergence, in one run.

Peak memory is measured above a baseline taken after the inputs and weights are allocated, so it
counts logits, activations and the weight/hidden gradients. Times are medians over `--reps` timed
repetitions after `--warmup` untimed ones. Ratios are against the naive path of the same run.

    python benchmarks/chunked_loss.py                       # GPU: V=128256, H=2048, N=1k/2k/4k
    python benchmarks/chunked_loss.py --device cpu --vocab 4096 --hidden 256 --sizes 256  # smoke
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from kdlab.losses import build_loss, chunked_loss

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def parse_args() -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=default_device, help="cuda or cpu (default: %(default)s)")
    p.add_argument(
        "--dtype",
        choices=sorted(DTYPES),
        default=None,
        help="dtype of hidden states and weights (default: bf16 on cuda, fp32 on cpu)",
    )
    p.add_argument("--sizes", type=int, nargs="+", default=[1024, 2048, 4096], help="values of N")
    p.add_argument("--vocab", type=int, default=128256, help="V (default: %(default)s)")
    p.add_argument(
        "--hidden", type=int, default=2048, help="H of both models (default: %(default)s)"
    )
    p.add_argument("--reps", type=int, default=10, help="timed repetitions (default: %(default)s)")
    p.add_argument(
        "--warmup", type=int, default=3, help="untimed repetitions (default: %(default)s)"
    )
    p.add_argument(
        "--chunk-size",
        type=int,
        nargs="+",
        default=[None],
        help="kdlab chunk size(s); several values give one row each (default: chunked_loss's)",
    )
    p.add_argument(
        "--compile",
        choices=["auto", "on", "off", "both"],
        default="auto",
        help="kdlab's per-chunk torch.compile (auto: on for CUDA with Triton; both: one row each)",
    )
    p.add_argument("--no-trl", action="store_true", help="skip TRL's chunked divergence")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    return p.parse_args()


def make_inputs(n: int, v: int, h: int, dtype: torch.dtype, device: str) -> dict[str, Tensor]:
    scale = h**-0.5
    return {
        "s_hidden": torch.randn(n, h, dtype=dtype, device=device).requires_grad_(),
        "s_weight": torch.nn.Parameter(torch.randn(v, h, dtype=dtype, device=device) * scale),
        "t_hidden": torch.randn(n, h, dtype=dtype, device=device),
        "t_weight": torch.randn(v, h, dtype=dtype, device=device) * scale,
    }


def naive(x: dict[str, Tensor], chunk_size: int | None) -> Tensor:
    s_logits = (x["s_hidden"] @ x["s_weight"].t()).float()  # [N, V]
    with torch.no_grad():
        t_logits = (x["t_hidden"] @ x["t_weight"].t()).float()  # [N, V]
    log_q = F.log_softmax(s_logits, dim=-1)
    log_p = F.log_softmax(t_logits, dim=-1)
    loss = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).mean()
    loss.backward()
    return loss.detach()


FKL = build_loss("fkl")  # built once, as a trainer does (torch.compile caches per loss)


def kdlab_chunked(
    x: dict[str, Tensor], chunk_size: int | None, compiled: bool | None = None
) -> Tensor:
    kwargs: dict[str, Any] = {"compiled": compiled}
    if chunk_size is not None:
        kwargs["chunk_size"] = chunk_size
    loss = chunked_loss(
        FKL, x["s_hidden"], x["s_weight"], x["t_hidden"], x["t_weight"], None, **kwargs
    )
    loss.backward()
    return loss.detach()


def trl_chunked(x: dict[str, Tensor], chunk_size: int | None) -> Tensor:
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    divergence, _entropy = ChunkedDivergenceFunction.apply(
        x["s_hidden"], x["s_weight"], None, x["t_hidden"], x["t_weight"], None, 0.0
    )
    loss = divergence.mean()
    loss.backward()
    return loss.detach()


def trl_available() -> str | None:
    """None when TRL's chunked divergence imports, else the reason it does not."""
    try:
        from trl.kernels.chunked_divergence import ChunkedDivergenceFunction  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure just skips the row
        return f"{type(exc).__name__}: {exc}"
    return None


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def measure(
    fn: Callable[[dict[str, Tensor], int | None], Tensor],
    x: dict[str, Tensor],
    chunk_size: int | None,
    args: argparse.Namespace,
) -> dict[str, Any]:
    cuda = args.device.startswith("cuda")

    def step() -> Tensor:
        x["s_hidden"].grad = None
        x["s_weight"].grad = None
        return fn(x, chunk_size)

    for _ in range(args.warmup):
        step()
    sync(args.device)
    peak = None
    if cuda:
        x["s_hidden"].grad = x["s_weight"].grad = None
        torch.cuda.empty_cache()
        baseline = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        sync(args.device)
        peak = torch.cuda.max_memory_allocated() - baseline
    times = []
    for _ in range(args.reps):
        sync(args.device)
        t0 = time.perf_counter()
        loss = step()
        sync(args.device)
        times.append((time.perf_counter() - t0) * 1e3)
    grad_w = x["s_weight"].grad.float()
    return {
        "peak_extra_bytes": peak,
        "median_ms": statistics.median(times),
        "times_ms": times,
        "loss": float(loss),
        "grad_weight_norm": float(grad_w.norm()),
    }


def run(args: argparse.Namespace) -> list[dict[str, Any]]:
    dtype = DTYPES[args.dtype or ("bf16" if args.device.startswith("cuda") else "fp32")]
    impls: list[tuple[str, Callable[..., Tensor], int | None]] = [("naive", naive, None)]
    modes = {"auto": [None], "on": [True], "off": [False], "both": [True, False]}[args.compile]
    for mode in modes:
        tag = {None: "", True: ", compiled", False: ", eager"}[mode]
        impls += [
            (
                f"kdlab chunked (chunk={c or 'default'}{tag})",
                partial(kdlab_chunked, compiled=mode),
                c,
            )
            for c in args.chunk_size
        ]
    trl_reason = None if args.no_trl else trl_available()
    if args.no_trl or trl_reason:
        print(f"TRL chunked divergence skipped: {trl_reason or '--no-trl'}")
    else:
        impls.append(("trl ChunkedDivergenceFunction", trl_chunked, None))
    results = []
    for n in args.sizes:
        for name, fn, chunk in impls:
            torch.manual_seed(args.seed)
            x = make_inputs(n, args.vocab, args.hidden, dtype, args.device)
            try:
                r = measure(fn, x, chunk, args)
            except torch.OutOfMemoryError as exc:
                r = {"error": f"out of memory: {exc}".splitlines()[0]}
            results.append({"impl": name, "N": n, "V": args.vocab, "H": args.hidden, **r})
            del x
            if args.device.startswith("cuda"):
                torch.cuda.empty_cache()
            print(f"  done N={n} {name}", flush=True)
    return results


def fmt_mib(b: int | None) -> str:
    return "n/a" if b is None else f"{b / 2**20:,.0f}"


def ratio(a: float | None, b: float | None) -> str:
    return "n/a" if a is None or not b else f"{a / b:.2f}"


def markdown(results: list[dict[str, Any]]) -> str:
    lines = [
        "| N | implementation | extra memory (MiB) | memory / naive | median time (ms) "
        "| time / naive | loss |",
        "|---:|---|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        base = next(b for b in results if b["N"] == r["N"] and b["impl"] == "naive")
        if "error" in r:
            lines.append(f"| {r['N']} | {r['impl']} | {r['error']} | | | | |")
            continue
        lines.append(
            f"| {r['N']} | {r['impl']} | {fmt_mib(r['peak_extra_bytes'])} "
            f"| {ratio(r['peak_extra_bytes'], base.get('peak_extra_bytes'))} "
            f"| {r['median_ms']:.2f} | {ratio(r['median_ms'], base.get('median_ms'))} "
            f"| {r['loss']:.5f} |"
        )
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    device_name = (
        torch.cuda.get_device_name(args.device)
        if args.device.startswith("cuda")
        else platform.processor() or platform.machine()
    )
    print(
        f"device: {device_name}; torch {torch.__version__}; V={args.vocab} H={args.hidden}; "
        f"dtype={args.dtype or 'default'}; reps={args.reps} warmup={args.warmup}"
    )
    results = run(args)
    print(markdown(results))
    if args.out:
        meta = {"device": device_name, "torch": torch.__version__, "args": vars(args)}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
