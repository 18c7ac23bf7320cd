"""The run config: validation before any model loads, overrides, error messages."""

from __future__ import annotations

import pytest

from kdlab.config import ConfigError, apply_overrides, describe_fields, from_dict, load_config


def test_defaults_and_loss_hparams_beside_name() -> None:
    config = from_dict({"loss": {"name": "jsd", "beta": 0.3}, "student": {"model": "preset:tiny"}})
    assert config.loss.name == "jsd"
    assert config.loss.hparams == {"beta": 0.3}
    assert config.to_dict()["loss"] == {"name": "jsd", "beta": 0.3}
    assert config.train.max_steps == 100


def test_regime_options_and_generation_beside_name() -> None:
    raw = {"regime": {"name": "on_policy", "lmbda": 0.25, "generation": {"temperature": 0}}}
    config = from_dict(raw)
    assert config.regime.name == "on_policy"
    assert config.regime.options == {"lmbda": 0.25}
    assert config.regime.generation.temperature == 0.0
    assert config.regime.generation.max_new_tokens == 64  # untouched defaults stay
    written = config.to_dict()["regime"]
    assert written["name"] == "on_policy" and written["lmbda"] == 0.25
    assert from_dict({"regime": written}) == config  # config.yaml reads back to the same run
    override = apply_overrides(raw, ["regime.lmbda=0.75", "regime.generation.top_p=0.9"])
    assert from_dict(override).regime.options == {"lmbda": 0.75}
    assert from_dict(override).regime.generation.top_p == pytest.approx(0.9)


def test_overrides_parse_yaml_scalars_and_do_not_mutate() -> None:
    raw = {"train": {"max_steps": 5}}
    out = apply_overrides(raw, ["train.max_steps=3", "loss.name=rkl", "train.lr=1e-3"])
    assert raw == {"train": {"max_steps": 5}}
    assert out["train"]["max_steps"] == 3 and out["loss"]["name"] == "rkl"
    assert from_dict(out).train.lr == pytest.approx(1e-3)


@pytest.mark.parametrize(
    ("raw", "needles"),
    [
        ({"train": {"max_stepz": 3}}, ["train.max_stepz", "max_steps", "batch_size"]),
        ({"bogus": 1}, ["bogus", "teacher", "output_dir"]),
        ({"train": {"max_steps": "many"}}, ["train.max_steps", "expected int", "'many'"]),
        ({"train": {"max_steps": 0}}, ["train.max_steps", ">= 1"]),
        ({"train": {"precision": "fp8"}}, ["train.precision", "'fp32'", "'bf16'"]),
        ({"loss": {"name": "nope"}}, ["unknown loss 'nope'", "fkl", "jsd", "akl"]),
        ({"loss": {"name": "jsd", "gamma": 1}}, ["gamma", "beta", "temperature"]),
        ({"regime": {"name": "nope"}}, ["unknown regime", "off_policy"]),
        ({"regime": {"name": "on_policy", "lamda": 1}}, ["regime.lamda", "lmbda"]),
        ({"regime": {"name": "on_policy", "lmbda": 1.5}}, ["regime", "lmbda", "[0, 1]"]),
        ({"regime": {"name": "off_policy", "lmbda": 0.5}}, ["regime.lmbda"]),
        ({"regime": {"generation": {"top_p": 0}}}, ["regime.generation", "top_p", "(0, 1]"]),
        ({"regime": {"generation": {"temprature": 1}}}, ["temprature", "temperature"]),
        ({"regime": {"generation": {"backend": "tgi"}}}, ["backend", "vllm", "'tgi'"]),
        ({"train": {"report_to": ["mlflow"]}}, ["mlflow", "wandb", "tensorboard"]),
    ],
)
def test_bad_config_names_the_problem_and_the_choices(raw: dict, needles: list[str]) -> None:
    with pytest.raises(ConfigError) as err:
        from_dict(raw)
    for needle in needles:
        assert needle in str(err.value)


def test_load_config_errors(tmp_path) -> None:  # noqa: ANN001
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)
    with pytest.raises(ConfigError, match="key=value"):
        load_config(_write(tmp_path), ["novalue"])


def _write(tmp_path):  # noqa: ANN001, ANN202
    path = tmp_path / "ok.yaml"
    path.write_text("loss: {name: fkl}\n")
    return path


def test_every_field_is_documented() -> None:
    rows = describe_fields()
    keys = {r[0] for r in rows}
    assert {"train.max_steps", "loss.name", "data.overlong", "teacher.model"} <= keys
    assert all(r[3] for r in rows), [r[0] for r in rows if not r[3]]
