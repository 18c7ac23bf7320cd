"""The typed run config: YAML + `--set key=value` overrides, validated before any model loads.

Top-level sections (the contract): `teacher`, `student`, `data`, `loss`, `regime`, `train`, `eval`,
`output_dir`. Every field has a help string (`kdlab distill --help-config` prints them all); an
unknown key, a wrong type, an out-of-range value, an unknown loss or loss hyperparameter is one
`ConfigError` that names the field and lists the valid choices.
"""

from __future__ import annotations

import copy
import dataclasses
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from kdlab.models.generation import Sampling

_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


class ConfigError(ValueError):
    """A problem with a run config, raised before any work starts."""


def _help(text: str, default: Any = dataclasses.MISSING, **kw: Any) -> Any:
    if "default_factory" in kw:
        return field(metadata={"help": text}, **kw)
    return field(default=default, metadata={"help": text})


@dataclass(frozen=True)
class ModelSpec:
    model: str = _help(
        "hub id, local path, or built-in preset (`preset:tiny|small|base` random-initialised, "
        "`preset:teacher` = the built-in task's trained teacher, trained once and cached)"
    )
    revision: str | None = _help("hub revision (branch, tag or commit)", None)
    tokenizer: str | None = _help("tokenizer id/path when it differs from `model`", None)
    dtype: Literal["float32", "bfloat16", "float16"] = _help("weights dtype", "float32")
    trust_remote_code: bool = _help("allow custom modelling code from the hub (off: safer)", False)
    seed: int = _help("initialisation seed for random presets", 0)


@dataclass(frozen=True)
class TeacherSpec(ModelSpec):
    model: str | None = _help(
        "hub id, local path, or built-in preset of the teacher model (or use `cache`)", None
    )
    cache: str | None = _help(
        "folder of an offline teacher cache (`kdlab cache-teacher`): train from it with no "
        "teacher in memory",
        None,
    )
    k: int | None = _help("with `cache`: the top-k the run expects the cache to hold", None)
    verify: bool = _help("with `cache`: check every shard's checksum before training", True)

    def __post_init__(self) -> None:
        if (self.model is None) == (self.cache is None):
            raise ValueError(
                "set exactly one of teacher.model (a model in memory) and teacher.cache (an "
                "offline cache written by `kdlab cache-teacher`)"
            )
        if self.k is not None and self.cache is None:
            raise ValueError("teacher.k only applies to a cached teacher (teacher.cache)")


@dataclass(frozen=True)
class CacheSpec:
    path: str = _help("folder the cache is written to (resumed when it holds a partial cache)")
    k: int = _help("token entries kept per position (at most the vocabulary size)", 64)
    mode: Literal["top_k", "sample"] = _help(
        "`top_k`: the teacher's k most likely tokens + the tail mass; `sample`: k tokens drawn "
        "from the teacher, importance-weighted (random-sampling KD, unbiased)",
        "top_k",
    )
    value_bits: Literal["auto"] | int = _help(
        "bits per stored log-probability, 2..8 (auto: the most that keep <= 2.5 bytes per "
        "entry, at least 6)",
        "auto",
    )
    log_floor: float = _help(
        "log-probabilities below -log_floor are stored as -log_floor (probability < e^-16)", 16.0
    )
    shard_examples: int = _help("examples per shard file (a killed run redoes one shard)", 2048)
    batch_size: int = _help("examples per teacher forward pass", 16)
    seed: int = _help("seed of the sampling mode's draws", 0)


@dataclass(frozen=True)
class DataSpec:
    dataset: str = _help(
        "`task:arith`, `task:oracle`, a local .jsonl/.json/.parquet/.csv file, or a hub id",
        "task:arith",
    )
    split: str = _help("split to train on (files and hub datasets)", "train")
    eval_split: str | None = _help(
        "split to evaluate on; none: the last `eval.num_examples` records are held out", None
    )
    num_examples: int | None = _help(
        "training examples: generated for tasks (default 2000), a cap for datasets", None
    )
    task_args: dict[str, Any] = _help(
        "keyword arguments of the built-in task (e.g. {digits: 3})", default_factory=dict
    )
    prompt_field: str = _help("column with the prompt", "prompt")
    completion_field: str = _help("column with the completion", "completion")
    messages_field: str = _help("column with chat messages (used when present)", "messages")
    max_length: int = _help("maximum tokens per example (prompt + completion)", 256)
    overlong: Literal["error", "truncate", "drop"] = _help(
        "what to do with longer examples: stop with an error, cut the completion, or drop them",
        "error",
    )
    completion_only: bool = _help("only completion tokens count in the loss", True)
    seed: int = _help("seed for generating task data", 1234)


@dataclass(frozen=True)
class LossSpec:
    name: str = _help("registered loss name (`kdlab losses` lists them)", "fkl")
    hparams: dict[str, Any] = _help(
        "the loss's hyperparameters, written beside `name` in YAML", default_factory=dict
    )


@dataclass(frozen=True)
class RegimeSpec:
    name: str = _help(
        "where training sequences come from: off_policy, on_policy, seq_kd, adaptive, "
        "warmup_distill, scrg (`kdlab regimes` lists them with their options)",
        "off_policy",
    )
    generation: Sampling = _help(
        "how generating regimes sample (student or teacher)", default_factory=Sampling
    )
    options: dict[str, Any] = _help(
        "the regime's own options, written beside `name` in YAML", default_factory=dict
    )


@dataclass(frozen=True)
class TrainSpec:
    max_steps: int = _help("optimiser steps", 100)
    batch_size: int = _help("examples per micro-batch per process", 16)
    grad_accum: int = _help("micro-batches per optimiser step", 1)
    lr: float = _help("peak learning rate", 5e-5)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    warmup_steps: int = _help("linear learning-rate warm-up steps", 0)
    lr_scheduler: Literal["constant", "linear", "cosine"] = _help(
        "learning-rate schedule after warm-up", "linear"
    )
    max_grad_norm: float = _help(
        "gradient clipping norm (0: off); a learnable loss's parameters are clipped apart", 1.0
    )
    kd_weight: float = _help("weight of the distillation loss", 1.0)
    ce_weight: float = _help("weight of the hard-label cross-entropy", 0.0)
    seed: int = _help("seed for data order and sampling", 0)
    precision: Literal["fp32", "bf16"] = _help("training precision (bf16: mixed precision)", "fp32")
    chunked: Literal["auto"] | bool = _help(
        "compute the loss from hidden states in token chunks, never holding full logits of "
        "both models (auto: when the vocabulary has >= 16384 entries)",
        "auto",
    )
    chunk_size: int = _help("tokens per chunk for the chunked loss", 1024)
    save_every: int = _help("checkpoint every N steps (0: only at the end)", 0)
    log_every: int = _help("print a log line every N steps", 10)
    report_to: list[str] = _help(
        "extra loggers through accelerate's trackers: wandb, tensorboard", default_factory=list
    )
    progress: bool = _help("show a progress bar", True)


@dataclass(frozen=True)
class EvalSpec:
    enabled: bool = _help("evaluate the student (and teacher) after training", True)
    num_examples: int = _help("held-out examples for evaluation", 200)
    batch_size: int = _help(
        "evaluation batch size (full logits of both models per batch; small for big vocabularies)",
        16,
    )
    teacher: bool = _help("also evaluate the teacher (accuracy), for the report", False)
    every: int = _help(
        "during training, every N steps: distance to the teacher (proxy), to the true "
        "distribution on `oracle` (golden) and perplexity, logged as `eval/...` (0: off)",
        0,
    )
    curve_examples: int = _help(
        "held-out (and training) examples used by the evaluation every `eval.every` steps", 64
    )


@dataclass(frozen=True)
class RunConfig:
    teacher: TeacherSpec | None = _help(
        "the teacher: a model or an offline cache (omit for losses that need none, e.g. ce)", None
    )
    student: ModelSpec = _help(
        "the student", default_factory=lambda: ModelSpec(model="preset:small")
    )
    data: DataSpec = _help("training and evaluation data", default_factory=DataSpec)
    loss: LossSpec = _help("the distillation loss", default_factory=LossSpec)
    regime: RegimeSpec = _help("where training sequences come from", default_factory=RegimeSpec)
    train: TrainSpec = _help("optimisation", default_factory=TrainSpec)
    eval: EvalSpec = _help("evaluation after training", default_factory=EvalSpec)
    output_dir: str = _help("run folder", "runs/kdlab")
    cache: CacheSpec | None = _help("what `kdlab cache-teacher` writes (ignored by distill)", None)

    def to_dict(self) -> dict[str, Any]:
        """Plain data, as written to `config.yaml` (loss hyperparameters beside `name`)."""
        data = dataclasses.asdict(self)
        loss = data["loss"]
        data["loss"] = {"name": loss["name"], **loss["hparams"]}
        regime = data["regime"]
        data["regime"] = {
            "name": regime["name"],
            **regime["options"],
            "generation": regime["generation"],
        }
        return data


_RANGES: dict[str, tuple[float, float | None]] = {
    "train.max_steps": (1, None),
    "train.batch_size": (1, None),
    "train.grad_accum": (1, None),
    "train.lr": (0, None),
    "train.weight_decay": (0, None),
    "train.warmup_steps": (0, None),
    "train.max_grad_norm": (0, None),
    "train.kd_weight": (0, None),
    "train.ce_weight": (0, None),
    "train.chunk_size": (1, None),
    "train.save_every": (0, None),
    "train.log_every": (1, None),
    "data.max_length": (2, None),
    "data.num_examples": (1, None),
    "eval.num_examples": (1, None),
    "eval.batch_size": (1, None),
    "eval.every": (0, None),
    "eval.curve_examples": (1, None),
    "teacher.k": (1, None),
    "cache.k": (1, None),
    "cache.value_bits": (2, 8),
    "cache.log_floor": (0.5, None),
    "cache.shard_examples": (1, None),
    "cache.batch_size": (1, None),
}


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it (ints widen to floats)."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        errors = {}
        for arg in typing.get_args(tp):
            try:
                return _coerce(value, arg, where)
            except ConfigError as err:
                errors[arg] = err
        sections = [a for a in errors if dataclasses.is_dataclass(a)]
        if sections and isinstance(value, dict):  # a section's own error says more
            raise errors[sections[0]]
    elif origin is Literal:
        if value in typing.get_args(tp) and type(value) is type(
            next(a for a in typing.get_args(tp) if a == value)
        ):
            return value
    elif tp is type(None):
        if value is None:
            return None
    elif dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    elif origin is list:
        if isinstance(value, list):
            (item,) = typing.get_args(tp)
            return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    elif origin is dict:
        if isinstance(value, dict):
            return dict(value)
    elif tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads `1e-3` as a string
    elif tp is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config error at {where}: expected {_type_name(tp)}, got {value!r}")


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"config error at {where}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(data) - set(names))
    if unknown:
        raise ConfigError(
            f"config error: unknown key(s) {', '.join(f'{where}.{k}'.lstrip('.') for k in unknown)}"
            f"; valid keys{' in ' + where if where else ''}: {', '.join(names)}"
        )
    kwargs = {}
    for name in names:
        if name in data:
            path = f"{where}.{name}".lstrip(".")
            kwargs[name] = _coerce(data[name], hints[name], path)
            _check_range(path, kwargs[name])
    try:
        return cls(**kwargs)
    except TypeError as err:  # a required field is missing
        missing = [f.name for f in dataclasses.fields(cls) if f.name not in kwargs]
        raise ConfigError(f"config error at {where}: missing {', '.join(missing)}") from err
    except ValueError as err:  # the dataclass's own check (e.g. regime.generation.top_p)
        if isinstance(err, ConfigError):
            raise
        raise ConfigError(f"config error at {where}: {err}") from err


def _check_range(path: str, value: Any) -> None:
    if path not in _RANGES or isinstance(value, (str, bool)) or value is None:
        return  # e.g. `value_bits: auto`
    low, high = _RANGES[path]
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise ConfigError(f"config error at {path}: must be {bound}, got {value!r}")


def _split_sections(raw: dict[str, Any]) -> dict[str, Any]:
    """YAML writes `loss: {name: jsd, beta: 0.3}` and `regime: {name: on_policy, lmbda: 0.5}`;
    the specs keep a loss's hyperparameters and a regime's options apart."""
    loss = dict(raw.get("loss") or {})
    name = loss.pop("name", LossSpec.name)
    hparams = dict(loss.pop("hparams", {}) or {})
    hparams.update(loss)
    out = {**raw, "loss": {"name": name, "hparams": hparams}}
    if "regime" in raw:
        regime = dict(raw.get("regime") or {})
        spec = {"name": regime.pop("name", RegimeSpec.name)}
        if "generation" in regime:
            spec["generation"] = regime.pop("generation")
        options = dict(regime.pop("options", {}) or {})
        options.update(regime)
        out["regime"] = {**spec, "options": options}
    return out


def _validate_loss(spec: LossSpec) -> None:
    from kdlab.losses import build_loss

    try:
        build_loss(spec.name, **spec.hparams)
    except ValueError as err:
        raise ConfigError(f"config error at loss: {err}") from err


def _validate_regime(spec: RegimeSpec) -> None:
    from kdlab.regimes import REGIMES

    try:
        REGIMES.get(spec.name)
    except ValueError as err:
        raise ConfigError(f"config error at regime.name: {err}") from err
    regime_options(spec)


def regime_options(spec: RegimeSpec) -> Any:
    """The regime's `Options` instance built from `regime.<option>` keys (validated)."""
    from kdlab.regimes import REGIMES

    return _build(REGIMES.get(spec.name).Options, spec.options, "regime")


def from_dict(raw: dict[str, Any]) -> RunConfig:
    """Validate plain data (parsed YAML) into a `RunConfig`; raises `ConfigError`."""
    if not isinstance(raw, dict):
        raise ConfigError(f"config error: the config must be a mapping, got {type(raw).__name__}")
    config = _build(RunConfig, _split_sections(raw), "")
    if config.train.report_to:
        bad = sorted(set(config.train.report_to) - {"wandb", "tensorboard"})
        if bad:
            raise ConfigError(
                f"config error at train.report_to: unknown logger(s) {bad}; "
                "valid: wandb, tensorboard"
            )
    _validate_loss(config.loss)
    _validate_regime(config.regime)
    if config.teacher is not None and config.teacher.cache is not None:
        _validate_cached_teacher(config)
    return config


def _validate_cached_teacher(config: RunConfig) -> None:
    """A cached teacher holds the dataset's sequences, top-k only: refuse what cannot use it."""
    from kdlab.losses import build_loss
    from kdlab.regimes import REGIMES

    regime = REGIMES.get(config.regime.name)
    if not regime.trains_on_dataset:
        raise ConfigError(
            f"config error at regime.name: regime {config.regime.name!r} trains on sequences "
            "that are not in the dataset, which a teacher cache cannot score; use "
            "regime.name=off_policy with teacher.cache, or teacher.model"
        )
    if config.train.kd_weight > 0:
        try:
            build_loss(config.loss.name, **config.loss.hparams).check_sparse()
        except ValueError as err:
            raise ConfigError(f"config error at loss: {err}") from err


def parse_override(item: str) -> tuple[list[str], Any]:
    """`train.max_steps=3` -> (["train", "max_steps"], 3); values are parsed as YAML scalars."""
    if "=" not in item:
        raise ConfigError(f"--set expects key=value (e.g. train.max_steps=3), got {item!r}")
    key, text = item.split("=", 1)
    keys = [k for k in key.strip().split(".") if k]
    if not keys:
        raise ConfigError(f"--set has an empty key in {item!r}")
    return keys, yaml.safe_load(text) if text.strip() else ""


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Return a copy of `raw` with every `--set key=value` applied (the input is not mutated)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        keys, value = parse_override(item)
        node = out
        for k in keys[:-1]:
            if node.get(k) is None:
                node[k] = {}
            if not isinstance(node[k], dict):
                raise ConfigError(f"--set {item!r}: {k!r} is not a section")
            node = node[k]
        node[keys[-1]] = value
    return out


def load_config(path: str | Path, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config file, apply `--set` overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    return from_dict(apply_overrides(raw, overrides or []))


def describe_fields(cls: type = RunConfig, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) for every field, for `--help-config` and the docs."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        tp = hints[f.name]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        target = tp if dataclasses.is_dataclass(tp) else (inner[0] if inner else None)
        if target is not None:
            rows.append((key, "section", "", f.metadata.get("help", "")))
            rows.extend(describe_fields(target, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = repr(f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = repr(f.default_factory())
        else:
            default = "required"
        rows.append((key, _type_name(tp), default, f.metadata.get("help", "")))
    return rows
