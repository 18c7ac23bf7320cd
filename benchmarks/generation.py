"""Student generation with and without the KV cache; an on-policy step against an off-policy one.

For each model size, in one run:

1. generation throughput: `kdlab.models.generation.generate` on `--batch` prompts of
   `--prompt-len` random tokens, `--new-tokens` sampled tokens each (temperature 1, eos disabled so
   every row runs to the budget), with `use_cache=True` and `use_cache=False`, timed alternately;
   tokens/s is generated tokens over the wall time of one call, the median of `--repeats` calls
   after one untimed warm-up round;
2. training step time: the kdlab `Trainer` (loss `fkl`, AdamW, an online teacher of the same size)
   with regime `off_policy` and with `on_policy` at lmbda=1 (every step samples `--new-tokens`
   tokens from the student first), on the same synthetic data (prompt `--prompt-len` tokens, dataset
   completion `--new-tokens` tokens, so both regimes train on sequences of equal length); the
   median over `--repeats` steps after one untimed first step, from the per-step wall times the
   trainer logs (`elapsed_s` in metrics.jsonl).

Model sizes (`--preset`, several allowed): `small` and `base` are kdlab's tiny-model presets with
the 21-token arith tokenizer (0.13M and 1.05M parameters); `large` is a synthetic Llama config
with hidden size 512, 8 layers, 8 heads, MLP 1408 and a 32000-token vocabulary (~58M parameters),
big enough for the KV cache to matter. Timings are quoted as ratios measured in the same run
(cache / no cache, on-policy / off-policy); absolute times on a shared machine are only context.

    python benchmarks/generation.py                                  # small, base, large on CPU
    python benchmarks/generation.py --device cuda --batch 32 --new-tokens 128
    python benchmarks/generation.py --preset small --repeats 2       # smoke test, seconds
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from _models import BOS, FIRST_TOKEN, PAD, device_name, random_llama
from torch import nn

LARGE_VOCAB = 32000
LARGE = {
    "hidden_size": 512,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "intermediate_size": 1408,
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    default_device = "cuda" if torch.cuda.is_available() else "cpu"
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--device", default=default_device, choices=["cpu", "cuda"])
    p.add_argument(
        "--preset",
        nargs="+",
        default=["small", "base", "large"],
        choices=["small", "base", "large"],
        help="model sizes (default: %(default)s)",
    )
    p.add_argument("--batch", type=int, default=4, help="prompts / examples (default: %(default)s)")
    p.add_argument(
        "--prompt-len", type=int, default=16, help="prompt tokens (default: %(default)s)"
    )
    p.add_argument("--new-tokens", type=int, default=64, help="generated (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=3, help="timed repeats (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads on --device cpu (default: %(default)s; on a shared machine more "
        "threads than free cores make timings swing by 10x and more)",
    )
    p.add_argument("--out", default=None, help="also write the results as JSON here")
    return p.parse_args(argv)


def build_model(preset: str, seed: int) -> nn.Module:
    """A randomly initialised Llama of size `preset`, the same for the same seed."""
    if preset == "large":
        return random_llama(LARGE, vocab=LARGE_VOCAB, seed=seed, max_len=512)
    from kdlab.models.tiny import build_preset
    from kdlab.tasks import get_task

    return build_preset(preset, get_task("arith").build_tokenizer(), seed=seed)


def no_eos(model: nn.Module) -> nn.Module:
    """Every row runs to `max_new_tokens`: equal work with and without the cache, every repeat."""
    model.generation_config.eos_token_id = None
    return model


def random_rows(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(FIRST_TOKEN, vocab, (n, length), generator=g).tolist()


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def generation_speed(model: nn.Module, args: argparse.Namespace) -> dict[str, dict]:
    """Tokens/s with and without the KV cache; the two are timed alternately, so a slow spell of
    a shared machine hits both."""
    from kdlab.models.generation import Sampling, generate

    vocab = model.config.vocab_size
    prompts = [[BOS, *row] for row in random_rows(args.batch, args.prompt_len - 1, vocab, 0)]
    times: dict[str, list[float]] = {"gen_cache": [], "gen_no_cache": []}
    produced = 0
    for repeat in range(args.repeats + 1):  # the first round is the warm-up
        for key, use_cache in (("gen_cache", True), ("gen_no_cache", False)):
            sampling = Sampling(
                max_new_tokens=args.new_tokens,
                temperature=1.0,
                batch_size=args.batch,
                use_cache=use_cache,
            )
            sync(args.device)
            t0 = time.perf_counter()
            out = generate(model, prompts, pad_id=PAD, eos_id=None, sampling=sampling, seed=0)
            sync(args.device)
            if repeat:
                times[key].append(time.perf_counter() - t0)
            produced = sum(len(c) for c in out)
    return {
        key: {
            "median_s": statistics.median(t),
            "times_s": t,
            "tokens_per_s": produced / statistics.median(t),
        }
        for key, t in times.items()
    }


def dataset(vocab: int, args: argparse.Namespace) -> list:
    """Synthetic examples: bos + random prompt tokens, then `new_tokens` counted tokens."""
    from kdlab.data.collate import Encoded

    n = 4 * args.batch
    prompts = random_rows(n, args.prompt_len - 1, vocab, 1)
    completions = random_rows(n, args.new_tokens, vocab, 2)
    return [
        Encoded(
            input_ids=[BOS, *p, *c],
            counted=[False] * args.prompt_len + [True] * args.new_tokens,
            prompt_length=args.prompt_len,
        )
        for p, c in zip(prompts, completions, strict=True)
    ]


def step_time(preset: str, regime_name: str, args: argparse.Namespace) -> dict:
    """Median wall time of one optimiser step of the kdlab Trainer with `regime_name`."""
    from accelerate import Accelerator

    from kdlab.config import TrainSpec
    from kdlab.losses import WeightedSum, build_loss
    from kdlab.models.generation import Sampling
    from kdlab.regimes import REGIMES, RegimeContext
    from kdlab.regimes.base import NoOptions
    from kdlab.regimes.on_policy import OnPolicyOptions
    from kdlab.teachers import OnlineTeacher
    from kdlab.train.trainer import Trainer

    accelerator = Accelerator(cpu=args.device == "cpu")
    student = no_eos(build_model(preset, seed=0)).to(accelerator.device)
    teacher = build_model(preset, seed=1).to(accelerator.device)
    vocab = student.config.vocab_size
    context = RegimeContext(
        dataset=dataset(vocab, args),
        pad_id=PAD,
        batch_size=args.batch,
        grad_accum=1,
        seed=0,
        eos_id=None,
        student=student,
        teacher=teacher,
        vocab=vocab,
        sampling=Sampling(max_new_tokens=args.new_tokens, temperature=1.0, batch_size=args.batch),
        options=OnPolicyOptions(lmbda=1.0) if regime_name == "on_policy" else NoOptions(),
    )
    regime = REGIMES.get(regime_name)(context)
    spec = TrainSpec(
        max_steps=args.repeats + 1, batch_size=args.batch, lr=1e-4, progress=False, log_every=10**6
    )
    with tempfile.TemporaryDirectory() as out:
        trainer = Trainer(
            student=student,
            teacher=OnlineTeacher(teacher, vocab=vocab),
            loss_fn=WeightedSum({"kd": (build_loss("fkl"), 1.0)}),
            regime=regime,
            spec=spec,
            output_dir=Path(out),
            accelerator=accelerator,
            vocab=vocab,
        )
        trainer.train()
        lines = (Path(out) / "metrics.jsonl").read_text().splitlines()
        elapsed = [json.loads(line)["elapsed_s"] for line in lines]
    per_step = [b - a for a, b in zip(elapsed, elapsed[1:], strict=False)]  # drops step 1
    return {"median_s": statistics.median(per_step), "times_s": per_step}


def measure(preset: str, args: argparse.Namespace) -> dict:
    model = no_eos(build_model(preset, seed=0)).to(args.device)
    result: dict[str, Any] = {
        "preset": preset,
        "parameters": sum(p.numel() for p in model.parameters()),
    }
    result.update(generation_speed(model, args))
    del model
    result["step_off_policy"] = step_time(preset, "off_policy", args)
    result["step_on_policy"] = step_time(preset, "on_policy", args)
    return result


def markdown(results: list[dict]) -> str:
    lines = [
        "| model | params | gen tok/s, KV cache | gen tok/s, no cache | cache speed-up "
        "| off-policy step (s) | on-policy step (s) | on / off |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        cache, plain = r["gen_cache"]["tokens_per_s"], r["gen_no_cache"]["tokens_per_s"]
        off, on = r["step_off_policy"]["median_s"], r["step_on_policy"]["median_s"]
        lines.append(
            f"| {r['preset']} | {r['parameters'] / 1e6:.2f}M | {cache:,.0f} | {plain:,.0f} "
            f"| {cache / plain:.2f}x | {off:.3f} | {on:.3f} | {on / off:.2f}x |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.device == "cpu":
        torch.set_num_threads(args.threads)
    logging.getLogger("kdlab").setLevel(logging.WARNING)
    print(
        f"device: {device_name(args.device)} ({torch.get_num_threads()} threads); "
        f"torch {torch.__version__}; batch={args.batch} prompt={args.prompt_len} "
        f"new_tokens={args.new_tokens} repeats={args.repeats}",
        flush=True,
    )
    results = []
    for preset in args.preset:
        t0 = time.perf_counter()
        results.append(measure(preset, args))
        print(f"  done {preset} ({time.perf_counter() - t0:.0f} s)", flush=True)
    print(markdown(results))
    if args.out:
        meta = {"device": device_name(args.device), "torch": torch.__version__, "args": vars(args)}
        Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))


if __name__ == "__main__":
    main()
