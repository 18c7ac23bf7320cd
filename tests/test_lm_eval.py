"""`kdlab eval --lm-eval`: a saved tiny model on a local lm-eval task, checked against plain torch.

The task is a multiple-choice over arithmetic strings (the tiny model's alphabet). Its gold
answers are chosen from the model's own log-likelihoods computed here: the most likely choice for
the first half of the documents, the least likely for the second half. lm-eval must then report
`acc` = 0.5 exactly, and `acc_norm` = the share this test computes for length-normalised scores.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import save_tiny_model
from kdlab.cli import main
from kdlab.config import ConfigError

TASK = "kdlab_arith_mc"
PROBLEMS = [(3, 4), (12, 5), (7, 8), (20, 31), (9, 9), (1, 2), (44, 13), (6, 60)] * 2


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """No test here may reach the hub: local JSON data and a local model only."""
    import datasets.config
    import huggingface_hub.constants

    for var in ("HF_DATASETS_OFFLINE", "HF_HUB_OFFLINE"):
        monkeypatch.setenv(var, "1")
        monkeypatch.setattr(datasets.config, var, True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _choice_logprobs(model, tokenizer, prompts: list[str], choices: list[str]) -> torch.Tensor:  # noqa: ANN001
    """log p(choice | bos + prompt) for each pair, summed over the choice's tokens: `[N]`."""
    texts = [p + c for p, c in zip(prompts, choices, strict=True)]
    enc = tokenizer(texts, return_tensors="pt", padding=True, padding_side="right")
    ids, mask = enc.input_ids, enc.attention_mask  # [N, T], each row starts with bos
    with torch.no_grad():
        logits = model(ids, attention_mask=mask).logits[:, :-1]  # [N, T-1, V]
    token_logp = logits.log_softmax(-1).gather(-1, ids[:, 1:, None])[..., 0]  # [N, T-1]
    ends = mask.sum(1) - 1  # [N]: index in token_logp just past each row's last token
    sizes = [len(tokenizer(c, add_special_tokens=False).input_ids) for c in choices]
    return torch.stack(
        [token_logp[i, e - n : e].sum() for i, (e, n) in enumerate(zip(ends, sizes, strict=True))]
    )


def _docs(model_dir: Path) -> tuple[list[dict], float]:
    """The documents (gold: argmax for the first half, argmin after) and the expected acc_norm."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    questions = [f"{a}+{b}=" for a, b in PROBLEMS]
    choices = [
        [str(a + b), str(a + b + 1), str(a * b), f"{b}{i}"] for i, (a, b) in enumerate(PROBLEMS)
    ]
    n = len(choices[0])
    flat = [c for row in choices for c in row]
    lls = _choice_logprobs(model, tokenizer, [q for q in questions for _ in range(n)], flat)
    lls = lls.view(len(PROBLEMS), n)  # [docs, choices]
    ranked = lls.sort(-1, descending=True).values
    assert (ranked[:, 0] - ranked[:, 1]).min() > 1e-4  # no near-ties that rounding could flip
    assert (ranked[:, -2] - ranked[:, -1]).min() > 1e-4
    half = len(PROBLEMS) // 2
    answers = torch.cat([lls[:half].argmax(-1), lls[half:].argmin(-1)])  # [docs]
    lengths = torch.tensor([[float(len(c)) for c in row] for row in choices])  # lm-eval: chars
    acc_norm = ((lls / lengths).argmax(-1) == answers).float().mean().item()
    docs = [
        {"question": q, "choices": c, "answer": int(a)}
        for q, c, a in zip(questions, choices, answers, strict=True)
    ]
    return docs, acc_norm


def _write_task(folder: Path, docs: list[dict]) -> Path:
    """A local lm-eval multiple-choice task over a JSONL file; returns the YAML folder."""
    data = folder / "data.jsonl"
    data.write_text("\n".join(json.dumps(d) for d in docs) + "\n")
    tasks = folder / "tasks"
    tasks.mkdir()
    (tasks / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs: {{data_files: {{test: {data}}}, cache_dir: {folder / 'hf-cache'}}}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\n'
        "doc_to_choice: choices\n"
        "doc_to_target: answer\n"
        'target_delimiter: ""\n'  # a space is not in the tiny tokenizer's alphabet
        "metric_list: [{metric: acc}, {metric: acc_norm}]\n"
    )
    return tasks


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, float]:
    import lm_eval  # noqa: F401  (in the dev extra: missing is a failure here, not a skip)

    root = tmp_path_factory.mktemp("lm-eval")
    model_dir = save_tiny_model(root / "model", seed=7)
    docs, acc_norm = _docs(model_dir)
    return model_dir, _write_task(root, docs), acc_norm


def test_run_lm_eval_matches_plain_torch(setup: tuple[Path, Path, float], tmp_path: Path) -> None:
    from kdlab.eval.lm_eval import run_lm_eval

    model_dir, tasks, acc_norm = setup
    out = tmp_path / "metrics.json"
    metrics = run_lm_eval(str(model_dir), [TASK], include_path=str(tasks), output=str(out))
    assert set(metrics) == {TASK}
    assert metrics[TASK]["acc"] == pytest.approx(0.5, abs=1e-9)
    assert metrics[TASK]["acc_norm"] == pytest.approx(acc_norm, abs=1e-9)
    assert 0 < metrics[TASK]["acc_stderr"] < 1
    assert all(isinstance(v, float) for v in metrics[TASK].values())
    assert json.loads(out.read_text()) == metrics


def test_cli_lm_eval_writes_json(setup: tuple[Path, Path, float], tmp_path: Path, capsys) -> None:  # noqa: ANN001
    model_dir, tasks, _ = setup
    out = tmp_path / "out.json"
    argv = ["eval", "--model", str(model_dir), "--lm-eval", TASK, "--lm-eval-include", str(tasks)]
    assert main([*argv, "--limit", "8", "--output", str(out)]) == 0
    metrics = json.loads(out.read_text())
    assert metrics[TASK]["acc"] == pytest.approx(1.0)  # the first 8 documents: gold = argmax
    # with a built-in task too: both in one table and one JSON, task -> metric -> value
    both = [*argv, "--task", "arith", "--num-examples", "8", "--limit", "4", "--out", str(out)]
    assert main(both) == 0
    metrics = json.loads(out.read_text())
    assert set(metrics) == {"arith", TASK} and "perplexity" in metrics["arith"]
    printed = capsys.readouterr().out
    assert TASK in printed and "acc_norm" in printed


def test_unknown_task_is_a_clear_error_before_loading(
    setup: tuple[Path, Path, float],
    tmp_path: Path,
    capsys,  # noqa: ANN001
) -> None:
    _, tasks, _ = setup
    missing_model = str(tmp_path / "no-such-model")  # never loaded: the task check comes first
    argv = ["eval", "--model", missing_model, "--lm-eval", "kdlab_arith_mx"]
    assert main([*argv, "--lm-eval-include", str(tasks)]) == 2
    err = capsys.readouterr().err
    assert "unknown lm-eval task 'kdlab_arith_mx' (did you mean kdlab_arith_mc" in err
    assert "--lm-eval-include" in err and "no-such-model" not in err


def test_missing_lm_eval_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    from kdlab.eval.lm_eval import run_lm_eval

    monkeypatch.setitem(sys.modules, "lm_eval", None)  # `import lm_eval` now raises ImportError
    with pytest.raises(ConfigError, match=r'pip install "kdlab\[lm-eval\]"'):
        run_lm_eval("any", ["hellaswag"])
