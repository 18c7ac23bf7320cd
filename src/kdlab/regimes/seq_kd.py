"""Sequence-level KD: train on the teacher's own completions, generated once before training.

Kim & Rush, "Sequence-Level Knowledge Distillation" (EMNLP 2016). Instead of the dataset's
completions, the student is trained on the sequences the teacher itself produces for the training
prompts, approximating the teacher's mode (the paper decodes with beam search). Here the teacher
generates one completion per training prompt in `prepare`, before the first step; the completions
are stored in the run folder (`regime/teacher_completions.*`, a `RecordStore`) and every step draws
batches from the dataset with its completions replaced by the teacher's, in `off_policy`'s order.

Open choices and their defaults:

- `greedy` (default true): decode with temperature 0 whatever `regime.generation.temperature` says.
  Sequence-level KD targets the teacher's mode; the paper uses beam search (beam 5), which kdlab's
  shared `generate` does not offer, and greedy decoding is its beam-1 case. `greedy: false` samples
  with `regime.generation`'s temperature and top-p instead (the MiniLLM/DistiLLM repositories build
  their SeqKD baseline data by sampling at temperature 1).
- Backend: `regime.generation.backend` `hf` uses the model in memory; `vllm` uses vLLM on the
  teacher's checkpoint path (its weights never change during the run) and fails before any
  generation when vLLM or a GPU is missing; `auto` takes vLLM when it is installed, a GPU is
  present, the run has one process and the teacher was loaded from a path, else `hf`.
- Prompts are split over processes by `index % world_size == rank`; each process appends its
  records, `generation.batch_size` prompts at a time, so a killed run keeps every finished chunk
  and a resumed one generates only the missing prompts. Once every process is done the main
  process writes the done marker with statistics; a done store is reused, never regenerated.
- Each record keeps a short hash of its prompt: resuming with different data is an error instead
  of a silent mismatch. The generation settings are kept in the done marker; resuming with other
  settings logs a warning and reuses the stored completions.
"""

from __future__ import annotations

import dataclasses
import gc
import hashlib
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from kdlab.data.collate import Encoded
from kdlab.models.generation import (
    Sampling,
    VLLMGenerator,
    eos_ids,
    generate,
    vllm_available,
)
from kdlab.regimes.base import REGIMES, RegimeContext, option, prompt_of, with_completion
from kdlab.regimes.off_policy import OffPolicy
from kdlab.regimes.on_policy import check_generation_fits
from kdlab.regimes.store import Record, RecordStore, fill_store

logger = logging.getLogger("kdlab")

STORE_NAME = "teacher_completions"

Generator = Callable[[list[list[int]], int], list[list[int]]]  # (prompts, seed) -> completions


@dataclass(frozen=True)
class SeqKDOptions:
    greedy: bool = option(
        True,
        "decode the teacher greedily (temperature 0, its mode, as the paper's beam search "
        "approximates); false: sample with regime.generation's temperature and top_p",
    )


def prompt_hash(prompt: Sequence[int]) -> str:
    """A short fingerprint of a prompt's token ids (detects a changed dataset on resume)."""
    return hashlib.sha1(",".join(map(str, prompt)).encode()).hexdigest()[:16]


def teacher_path(teacher: torch.nn.Module) -> str:
    """The folder or hub id the teacher was loaded from ('' for a model built in memory)."""
    return str(getattr(teacher, "name_or_path", "") or "")


def resolve_backend(sampling: Sampling, teacher: torch.nn.Module, world_size: int) -> str:
    """`hf` or `vllm` for generating with the (fixed) teacher; a clear error if vLLM cannot run."""
    if sampling.backend == "hf":
        return "hf"
    if sampling.backend == "vllm":
        if not vllm_available():
            raise ValueError(
                "regime.generation.backend=vllm needs vLLM installed and a CUDA GPU; install "
                "vllm (pip install vllm) or set regime.generation.backend to hf or auto"
            )
        if not teacher_path(teacher):
            raise ValueError(
                "regime.generation.backend=vllm loads the teacher from its checkpoint path, but "
                "this teacher was built in memory; save it and set teacher.model to the folder, "
                "or set regime.generation.backend to hf"
            )
        return "vllm"
    usable = vllm_available() and world_size == 1 and bool(teacher_path(teacher))
    return "vllm" if usable else "hf"


@REGIMES.register("seq_kd")
class SeqKD(OffPolicy):
    """The teacher's own completions of the training prompts, generated once and stored."""

    trains_on_dataset = False

    Options = SeqKDOptions
    needs_teacher_model = True
    supports_vllm = True

    def __init__(self, context: RegimeContext) -> None:
        super().__init__(context)
        self.teacher = context.require("teacher", "seq_kd")
        check_generation_fits(context, context.extras.get("max_length"))
        self.sampling = self._teacher_sampling()
        self.backend = resolve_backend(context.sampling, self.teacher, context.world_size)
        self.store = RecordStore(context.regime_dir, STORE_NAME, rank=context.rank)
        self._train_set: list[Encoded] | None = None
        self._vllm: VLLMGenerator | None = None

    def _teacher_sampling(self) -> Sampling:
        sampling = self.context.sampling
        if self.options.greedy:
            return dataclasses.replace(sampling, temperature=0.0)
        return sampling

    # ------------------------------------------------------------------ before training

    def prepare(self, *, resume: bool = False) -> None:
        """Generate the teacher's completions that the store lacks, then build the train set.

        A store is always resumed, whatever `resume` says: the pipeline already refuses a run
        folder holding `regime/` without `--resume`, and every record's prompt is checked.
        """
        c = self.context
        if self.store.is_done():
            logger.info("seq_kd: reusing the teacher completions in %s", self.store.directory)
            self._warn_if_settings_changed()
        else:
            mine = [i for i in range(len(c.dataset)) if i % c.world_size == c.rank]
            generator = self._generator()
            fill_store(
                self.store,
                mine,
                lambda batch: self._records(batch, generator),
                chunk=self.sampling.batch_size,
                desc="seq_kd: teacher completions",
                progress=c.rank == 0 and self._progress(),
            )
            del generator
            self._release_vllm()
            c.barrier()
            if c.rank == 0:
                self.store.finish(self._summary(self.store.load()))
            c.barrier()
        self._train_set = self._build_train_set(self.store.load())
        summary = self.store.summary()
        logger.info(
            "seq_kd: %d teacher completions, %d tokens, mean length %.1f, %.0f%% ended by eos",
            summary["sequences"],
            summary["tokens"],
            summary["mean_length"],
            100 * summary["eos_share"],
        )

    def _records(self, batch: list[int], generator: Generator) -> list[Record]:
        prompts = [prompt_of(self.context.dataset[i]) for i in batch]
        seed = (self.context.seed * 1_000_003 + batch[0]) * 1_009 + 7  # only used when sampling
        completions = generator(prompts, seed)
        return [
            {"index": i, "prompt_hash": prompt_hash(p), "completion": comp}
            for i, p, comp in zip(batch, prompts, completions, strict=True)
        ]

    def _generator(self) -> Generator:
        c = self.context
        eos = eos_ids(self.teacher, c.eos_id)
        if self.backend == "vllm":
            dtype = str(next(self.teacher.parameters()).dtype).removeprefix("torch.")
            engine = VLLMGenerator(teacher_path(self.teacher), dtype=dtype)
            self._vllm = engine
            return lambda prompts, seed: engine.generate(
                prompts, eos_id=eos, sampling=self.sampling, seed=seed
            )
        return lambda prompts, seed: generate(
            self.teacher, prompts, pad_id=c.pad_id, eos_id=eos, sampling=self.sampling, seed=seed
        )

    def _release_vllm(self) -> None:
        """Free vLLM's GPU memory before training starts (best effort)."""
        if self._vllm is None:
            return
        self._vllm = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _progress(self) -> bool:
        config = self.context.extras.get("config")
        return bool(getattr(getattr(config, "train", None), "progress", True))

    def _settings(self) -> dict[str, Any]:
        s = self.sampling
        return {
            "teacher": teacher_path(self.teacher),
            "greedy": self.options.greedy,
            "temperature": s.temperature,
            "top_p": s.top_p,
            "max_new_tokens": s.max_new_tokens,
            "backend": self.backend,
        }

    def _summary(self, records: dict[int, Record]) -> dict[str, Any]:
        eos = set(eos_ids(self.teacher, self.context.eos_id))
        lengths = [len(r["completion"]) for r in records.values()]
        ended = sum(bool(r["completion"]) and r["completion"][-1] in eos for r in records.values())
        n = max(len(lengths), 1)
        return {
            "sequences": len(lengths),
            "tokens": sum(lengths),
            "mean_length": sum(lengths) / n,
            "eos_share": ended / n,
            "settings": self._settings(),
        }

    def _warn_if_settings_changed(self) -> None:
        stored = self.store.summary().get("settings", {})
        now = self._settings()
        changed = sorted(k for k in now if k in stored and stored[k] != now[k])
        if changed:
            logger.warning(
                "seq_kd: the stored teacher completions were generated with other settings (%s); "
                "reusing them. Start a new output_dir to regenerate.",
                ", ".join(f"{k}: {stored[k]!r} -> {now[k]!r}" for k in changed),
            )

    def _build_train_set(self, records: dict[int, Record]) -> list[Encoded]:
        """The dataset with each completion replaced by the teacher's; checks the prompts."""
        out = []
        for i, example in enumerate(self.context.dataset):
            record = records.get(i)
            if record is None:
                raise ValueError(
                    f"seq_kd: no stored teacher completion for training example {i} in "
                    f"{self.store.directory}; the store is incomplete (start a new output_dir)"
                )
            if record["prompt_hash"] != prompt_hash(prompt_of(example)):
                raise ValueError(
                    f"seq_kd: the stored teacher completion {i} in {self.store.directory} belongs "
                    "to another prompt: the training data changed since it was generated; use "
                    "the original data or a new output_dir"
                )
            out.append(with_completion(example, record["completion"]))
        return out

    # ------------------------------------------------------------------ training

    @property
    def train_set(self) -> list[Encoded]:
        if self._train_set is None:
            raise RuntimeError("seq_kd: call prepare() before drawing batches")
        return self._train_set

    def stats(self) -> dict[str, Any]:
        """The statistics of the stored completions (sequences, tokens, mean length, eos share)."""
        return self.store.summary()
