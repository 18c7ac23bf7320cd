"""One run: load models, data and teacher -> regime -> train -> save -> evaluate -> report."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdlab.config import ConfigError, ModelSpec, RunConfig, TeacherSpec, regime_options
from kdlab.data.collate import Encoded
from kdlab.data.datasets import Splits, encode_dataset, load_splits, task_name
from kdlab.losses import KDLoss, WeightedSum, build_loss
from kdlab.models.loading import (
    PRESET_PREFIX,
    check_vocabularies,
    ensure_pad_token,
    is_preset,
    load_model,
    load_tokenizer,
    vocab_size,
)
from kdlab.regimes import REGIMES, Regime, RegimeContext
from kdlab.regimes.base import REGIME_DIR
from kdlab.teachers import OnlineTeacher, TeacherSource
from kdlab.teachers.cache import CacheError, TeacherCache
from kdlab.train.checkpoint import latest_checkpoint
from kdlab.train.trainer import STATE_FILE, Trainer

logger = logging.getLogger("kdlab")

TRAINED_TEACHER_PRESETS = {"teacher": "standard", "teacher-quick": "quick"}


@dataclass
class RunSummary:
    output_dir: Path
    steps: int
    final_loss: float | None
    eval: dict[str, Any]


@dataclass
class Loaded:
    tokenizer: PreTrainedTokenizerBase
    student: PreTrainedModel
    teacher: PreTrainedModel | None
    vocab: int | None
    train: list[Encoded]
    eval_records: list[dict[str, Any]]
    eval_encoded: list[Encoded]
    cache: TeacherCache | None = None

    def teacher_source(self) -> TeacherSource | None:
        """The teacher as the trainer sees it: a model in memory, a cache, or none."""
        if self.teacher is not None:
            return OnlineTeacher(self.teacher, vocab=self.vocab)
        if self.cache is not None:
            from kdlab.teachers.cached import CachedTeacher

            return CachedTeacher(self.cache)
        return None


LOSS_STATE_FILE = "loss_state.safetensors"


def build_run_loss(config: RunConfig) -> KDLoss:
    """`kd_weight · <loss> + ce_weight · ce`, each term logged as `loss/kd` and `loss/ce`."""
    terms: dict[str, tuple[KDLoss, float]] = {}
    if config.train.kd_weight > 0:
        terms["kd"] = (build_loss(config.loss.name, **config.loss.hparams), config.train.kd_weight)
    if config.train.ce_weight > 0:
        terms["ce"] = (build_loss("ce"), config.train.ce_weight)
    if not terms:
        raise ConfigError(
            "config error at train: kd_weight and ce_weight are both 0; nothing to train"
        )
    return WeightedSum(terms)


def check_run_folder(config: RunConfig, resume: bool) -> Path:
    """Refuse to silently mix two runs in one folder."""
    out = Path(config.output_dir)
    held = {
        "checkpoints": latest_checkpoint(out) is not None,
        REGIME_DIR: (out / REGIME_DIR).is_dir(),
    }
    for part, present in held.items():
        if not resume and present:
            raise ConfigError(
                f"{out} already holds a run ({part}/); pass --resume to continue it, or choose "
                "another output_dir"
            )
    out.mkdir(parents=True, exist_ok=True)
    return out


def finished(out: Path) -> bool:
    state = out / STATE_FILE
    return state.is_file() and json.loads(state.read_text()).get("finished", False)


def _resolve_preset(spec: ModelSpec, config: RunConfig) -> ModelSpec:
    """`preset:teacher` -> the cached trained teacher's folder (trained on first use)."""
    if spec.model is None or not is_preset(spec):
        return spec
    name = spec.model[len(PRESET_PREFIX) :]
    if name not in TRAINED_TEACHER_PRESETS:
        return spec
    task = task_name(config.data)
    if task is None:
        raise ConfigError(f"{spec.model!r} needs a built-in task dataset (data.dataset: task:NAME)")
    from kdlab.zoo import ensure_teacher

    path = ensure_teacher(task, config.data.task_args, TRAINED_TEACHER_PRESETS[name])
    return TeacherSpec(model=str(path), dtype=spec.dtype)


def _tokenizer_for(spec: ModelSpec, config: RunConfig) -> PreTrainedTokenizerBase:
    if is_preset(spec):
        task = task_name(config.data)
        if task is None:
            raise ConfigError(
                f"model {spec.model!r} is a built-in preset; presets need a built-in task dataset "
                "(data.dataset: task:arith or task:oracle)"
            )
        from kdlab.tasks import get_task

        return ensure_pad_token(get_task(task, **config.data.task_args).build_tokenizer(), task)
    return load_tokenizer(spec)


def _model_for(spec: ModelSpec, tokenizer: PreTrainedTokenizerBase, role: str) -> PreTrainedModel:
    if is_preset(spec):
        from kdlab.models.tiny import build_preset

        try:
            return build_preset(spec.model[len(PRESET_PREFIX) :], tokenizer, seed=spec.seed)
        except ValueError as err:
            raise ConfigError(f"config error at {role}.model: {err}") from err
    return load_model(spec, role=role)


def load_everything(config: RunConfig) -> Loaded:
    """Tokenizers, then data (all data errors surface here), then the cache, then the models."""
    tokenizer = _tokenizer_for(config.student, config)
    splits: Splits = load_splits(config.data, config.eval.num_examples)
    train = encode_dataset(tokenizer, splits.train, config.data)
    eval_encoded = encode_dataset(tokenizer, splits.eval, config.data)
    if config.teacher is not None and config.teacher.cache is not None:
        return _load_with_cache(config, tokenizer, train, splits, eval_encoded)
    teacher_spec = None
    if config.teacher is not None:  # may train the built-in teacher: after the data checks
        teacher_spec = _resolve_preset(config.teacher, config)
    student = _model_for(config.student, tokenizer, "student")
    teacher, vocab = None, None
    if teacher_spec is not None:
        teacher_tokenizer = _tokenizer_for(teacher_spec, config)
        teacher = _model_for(teacher_spec, teacher_tokenizer, "teacher")
        vocab = check_vocabularies(teacher, teacher_tokenizer, student, tokenizer)
    return Loaded(tokenizer, student, teacher, vocab, train, splits.eval, eval_encoded)


def _load_with_cache(
    config: RunConfig,
    tokenizer: PreTrainedTokenizerBase,
    train: list[Encoded],
    splits: Splits,
    eval_encoded: list[Encoded],
) -> Loaded:
    """Open and check the teacher cache (checksums, fit to the run), then load the student."""
    from kdlab.teachers.cache import tokenizer_fingerprint
    from kdlab.teachers.cached import check_cache_fits, check_cache_vocab

    spec: TeacherSpec = config.teacher  # type: ignore[assignment]
    cache = TeacherCache(spec.cache, verify=spec.verify)
    check_cache_fits(
        cache,
        tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
        dataset=train,
        max_length=config.data.max_length,
        k=spec.k,
    )
    if cache.meta["mode"] == "sample" and config.train.kd_weight > 0:
        try:
            build_run_loss(config).check_sampled()
        except ValueError as err:
            raise ConfigError(f"config error at loss (teacher cache {cache.path}): {err}") from err
    student = _model_for(config.student, tokenizer, "student")
    check_cache_vocab(cache, vocab_size(student))
    vocab = cache.vocab if vocab_size(student) != cache.vocab else None
    return Loaded(tokenizer, student, None, vocab, train, splits.eval, eval_encoded, cache)


def run_distill(
    config: RunConfig, *, resume: bool = False, stop_after: int | None = None
) -> RunSummary:
    """Run one distillation end to end; see `kdlab distill --help`."""
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    out = check_run_folder(config, resume)
    if resume and finished(out) and (out / "student").is_dir():
        logger.info("%s is already finished; nothing to resume", out)
        return RunSummary(out, config.train.max_steps, None, _read_json(out / "eval.json"))
    loss_fn = build_run_loss(config)
    if loss_fn.needs_teacher and config.teacher is None:
        raise ConfigError(
            f"config error: loss {config.loss.name!r} needs a teacher; set teacher.model "
            "(or use loss.name=ce for plain fine-tuning)"
        )
    if REGIMES.get(config.regime.name).needs_teacher_model and config.teacher is None:
        raise ConfigError(
            f"config error: regime {config.regime.name!r} needs the teacher model (it generates "
            "or scores with it); set teacher.model"
        )
    _fresh_accelerator_state()
    accelerator = Accelerator(
        cpu=_multi_process_cpu(),
        mixed_precision="bf16" if config.train.precision == "bf16" else "no",
        log_with=config.train.report_to or None,
        project_dir=str(out),
    )
    set_seed(config.train.seed)
    if accelerator.is_main_process:
        (out / "config.yaml").write_text(yaml.safe_dump(config.to_dict(), sort_keys=False))
    loaded = load_everything(config)
    if loaded.teacher is not None:
        loaded.teacher.to(accelerator.device)
    if config.train.report_to:
        accelerator.init_trackers(out.name, config=_flat(config.to_dict()))
    loaded.student.to(accelerator.device)
    regime = build_regime(config, loaded, accelerator, out)
    regime.prepare(resume=resume)
    trainer = Trainer(
        student=loaded.student,
        teacher=loaded.teacher_source(),
        loss_fn=loss_fn,
        regime=regime,
        spec=config.train,
        output_dir=out,
        accelerator=accelerator,
        vocab=loaded.vocab,
        evaluator=_curve_evaluator(config, loaded),
        eval_every=config.eval.every,
    )
    result = trainer.train(resume=resume, stop_after=stop_after)
    student = accelerator.unwrap_model(trainer.model)
    metrics: dict[str, Any] = {}
    if accelerator.is_main_process:
        student.save_pretrained(out / "student")
        loaded.tokenizer.save_pretrained(out / "student")
        _save_loss_state(trainer.loss_fn, out)
        if config.eval.enabled:
            metrics = _evaluate(config, loaded, student)
            (out / "eval.json").write_text(json.dumps(metrics, indent=2))
        from kdlab.eval.report import write_run_report

        write_run_report(out, config, metrics)
    if config.train.report_to:
        accelerator.end_training()
    accelerator.wait_for_everyone()
    return RunSummary(out, result.steps, result.final_loss, metrics)


def build_regime(config: RunConfig, loaded: Loaded, accelerator: Any, out: Path) -> Regime:
    """The configured regime, given the run's data, models and folder."""
    regime_cls = REGIMES.get(config.regime.name)
    if config.regime.generation.backend == "vllm" and not regime_cls.supports_vllm:
        logger.warning(
            "regime %r samples from the student being trained, whose weights change every step; "
            "it generates with transformers, not vLLM (regime.generation.backend=vllm is used by "
            "seq_kd's fixed teacher)",
            config.regime.name,
        )
    try:
        return regime_cls(
            RegimeContext(
                dataset=loaded.train,
                pad_id=loaded.tokenizer.pad_token_id,
                batch_size=config.train.batch_size,
                grad_accum=config.train.grad_accum,
                seed=config.train.seed,
                rank=accelerator.process_index,
                world_size=accelerator.num_processes,
                eos_id=loaded.tokenizer.eos_token_id,
                student=loaded.student,
                teacher=loaded.teacher,
                vocab=loaded.vocab,
                output_dir=out,
                eval_dataset=loaded.eval_encoded,
                sampling=config.regime.generation,
                options=regime_options(config.regime),
                barrier=accelerator.wait_for_everyone,
                extras={
                    "max_length": config.data.max_length,
                    "accelerator": accelerator,
                    "config": config,
                },
            )
        )
    except ValueError as err:
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"config error at regime: {err}") from err


def _save_loss_state(loss_fn: KDLoss, out: Path) -> None:
    """The final state of a learnable or stateful loss (`dac_kl`'s network, TAID's t)."""
    state = {k: v.detach().contiguous().cpu() for k, v in loss_fn.state_dict().items()}
    if state:
        from safetensors.torch import save_file

        save_file(state, str(out / LOSS_STATE_FILE))


def _evaluate(config: RunConfig, loaded: Loaded, student: PreTrainedModel) -> dict[str, Any]:
    from kdlab.eval.evaluate import evaluate_models

    with torch.no_grad():
        return evaluate_models(
            student=student,
            teacher=loaded.teacher,
            tokenizer=loaded.tokenizer,
            task=task_name(config.data),
            task_args=config.data.task_args,
            records=loaded.eval_records,
            encoded=loaded.eval_encoded,
            batch_size=config.eval.batch_size,
            with_teacher=config.eval.teacher,
        )


def _curve_evaluator(config: RunConfig, loaded: Loaded) -> Any:
    """The evaluation every `eval.every` steps (none when 0)."""
    if config.eval.every <= 0:
        return None
    from kdlab.eval.evaluate import curve_evaluator

    return curve_evaluator(
        teacher=loaded.teacher,
        tokenizer=loaded.tokenizer,
        task=task_name(config.data),
        task_args=config.data.task_args,
        eval_encoded=loaded.eval_encoded,
        train_encoded=loaded.train,
        num_examples=config.eval.curve_examples,
        batch_size=config.eval.batch_size,
    )


def _fresh_accelerator_state() -> None:
    """Let one process run several runs with different settings (the demo, tests, notebooks).

    accelerate keeps its state in process-wide singletons and refuses a second `Accelerator` with
    another precision; outside a distributed launch there is nothing to keep, so start afresh.
    """
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()


def _multi_process_cpu() -> bool:
    """Several processes and no GPU: DDP over gloo (`accelerate launch --multi_gpu`, CPU)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.cuda.is_available()


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def _flat(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(_flat(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float, str, bool)) or v is None:
            out[f"{prefix}{k}"] = v
        else:
            out[f"{prefix}{k}"] = str(v)
    return out


def run_cache_teacher(config: RunConfig, *, stop_after_shards: int | None = None) -> dict[str, Any]:
    """`kdlab cache-teacher`: run the teacher once over the training data, write the cache.

    Returns the cache's `meta.json` content. Re-running with the same config finishes a partial
    cache (finished shards are kept); a finished cache is reported as it is.
    """
    from kdlab.teachers.cache import (
        META,
        TRAILING,
        CachePlan,
        auto_value_bits,
        dataset_fingerprint,
        write_cache,
    )
    from kdlab.teachers.cache import tokenizer_fingerprint as fingerprint
    from kdlab.teachers.codec import Codec

    spec, cache = config.teacher, config.cache
    if cache is None:
        raise ConfigError(
            "config error: `kdlab cache-teacher` needs a `cache:` section (cache.path)"
        )
    if spec is None or spec.model is None:
        raise ConfigError("config error at teacher.model: `kdlab cache-teacher` needs the teacher")
    out = Path(cache.path)
    if (out / META).is_file():
        meta = json.loads((out / META).read_text())
        _check_finished_cache(meta, config, out)
        logger.info("%s already holds this finished teacher cache", out)
        return meta
    tokenizer = _tokenizer_for(spec, config)
    splits = load_splits(config.data, config.eval.num_examples)
    train = encode_dataset(tokenizer, splits.train, config.data)
    resolved = _resolve_preset(spec, config)
    model = _model_for(resolved, _tokenizer_for(resolved, config), "teacher")
    model.to("cuda" if torch.cuda.is_available() else "cpu").eval()
    vocab = min(vocab_size(model), len(tokenizer))
    k = min(cache.k, vocab)
    if k < cache.k:
        logger.warning("cache.k=%d is more than the %d-token vocabulary: storing all", cache.k, k)
    bits = cache.value_bits
    if bits == "auto":
        bits = auto_value_bits(vocab, k, cache.log_floor)
    codec = Codec(vocab, k, int(bits), cache.log_floor, trailing=TRAILING)
    plan = CachePlan(
        teacher=str(spec.model),
        teacher_revision=spec.revision,
        teacher_dtype=spec.dtype,
        tokenizer=fingerprint(tokenizer),
        dataset=dataset_fingerprint(train),
        num_examples=len(train),
        max_length=config.data.max_length,
        vocab=vocab,
        k=k,
        mode=cache.mode,
        seed=cache.seed,
        shard_examples=cache.shard_examples,
        codec=codec.to_dict(),
        data=dataclasses.asdict(config.data),
    )
    logger.info(
        "caching the teacher: %d examples, k=%d of %d tokens, %d bytes per position (%.2f per "
        "entry), log-probabilities within %.3f nats",
        len(train),
        k,
        vocab,
        codec.bytes_per_position,
        codec.bytes_per_position / k,
        codec.max_log_error,
    )
    return write_cache(
        model,
        train,
        plan,
        out,
        pad_id=tokenizer.pad_token_id,
        batch_size=cache.batch_size,
        stop_after_shards=stop_after_shards,
    )


def _check_finished_cache(meta: dict[str, Any], config: RunConfig, out: Path) -> None:
    """A finished cache in `cache.path` must be the one this config asks for."""
    cache = config.cache
    wanted = {
        "teacher": str(config.teacher.model),
        "data": dataclasses.asdict(config.data),
        "mode": cache.mode,
        "seed": cache.seed,
        "shard_examples": cache.shard_examples,
        "log_floor": cache.log_floor,
    }
    held = {**{k: meta.get(k) for k in wanted}, "log_floor": meta["codec"]["log_floor"]}
    differ = [k for k in wanted if held[k] != wanted[k]]
    if meta["k"] != cache.k and not (cache.k > meta["k"] == meta["vocab"]):
        differ.append("k")
    if cache.value_bits != "auto" and cache.value_bits != meta["codec"]["value_bits"]:
        differ.append("value_bits")
    if differ:
        raise CacheError(
            f"{out} holds a finished teacher cache written with other settings "
            f"({', '.join(differ)} differ); choose another cache.path or delete the folder"
        )
