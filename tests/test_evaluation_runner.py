"""``run_eval``: output files, several models side by side, ``compare``, and errors for bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftmix.errors import SFTMixError
from sftmix.evaluation import run_eval
from sftmix.evaluation.compare import comparison_table, results_table, unique_names
from sftmix.evaluation.runner import resolve_dtype
from sftmix.sftmix_config import EvalArguments

EVAL = Path(__file__).parent / "assets" / "eval"


def _args(tmp_path: Path, **kwargs) -> EvalArguments:
    defaults = dict(
        task="mc", data_path=str(EVAL / "mc.jsonl"), output_dir=str(tmp_path / "out"), dtype="float32"
    )
    return EvalArguments(**{**defaults, **kwargs})


def test_single_model_writes_eval_json_table_and_predictions(tiny_llama_dir, tmp_path, capsys):
    results = run_eval(
        _args(tmp_path, model_name_or_path=tiny_llama_dir, formulation="letter", num_fewshot=1)
    )
    out = tmp_path / "out"
    assert json.loads((out / "eval.json").read_text()) == results
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["id"] for r in rows] == ["capital", "river", "ocean"]
    assert results["mc"]["acc"] == pytest.approx(sum(r["correct"] for r in rows) / 3)
    assert results["mc"]["n"] == 3
    assert "| mc | acc |" in (out / "eval.md").read_text()
    assert "| mc | acc_norm |" in capsys.readouterr().out


def test_two_models_side_by_side(tiny_llama_dir, tiny_qwen2_dir, tmp_path):
    named = run_eval(_args(tmp_path, model_name_or_path=f"{tiny_llama_dir},{tiny_qwen2_dir}", limit=2))
    names = unique_names([tiny_llama_dir, tiny_qwen2_dir])
    assert list(named) == names
    out = tmp_path / "out"
    for name in names:
        assert json.loads((out / name / "eval.json").read_text()) == named[name]
        assert named[name]["mc"]["n"] == 2
    table = (out / "comparison.md").read_text()
    assert f"| task | metric | {names[0]} | {names[1]} | Δ {names[1]} |" in table
    delta = named[names[1]]["mc"]["acc"] - named[names[0]]["mc"]["acc"]
    assert f"{delta:+.4f}" in table


def test_compare_files(tmp_path, capsys):
    for name, acc in (("ntp", 0.5), ("sftmix", 0.625)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "eval.json").write_text(json.dumps({"medqa": {"acc": acc, "n": 8}}))
    files = f"{tmp_path / 'ntp' / 'eval.json'},{tmp_path / 'sftmix' / 'eval.json'}"
    named = run_eval(EvalArguments(compare=files, output_dir=str(tmp_path / "cmp")))
    assert named == {"ntp": {"medqa": {"acc": 0.5, "n": 8}}, "sftmix": {"medqa": {"acc": 0.625, "n": 8}}}
    table = (tmp_path / "cmp" / "comparison.md").read_text()
    assert "| medqa | acc | 0.5000 | 0.6250 | +0.1250 |" in table
    assert "| medqa | n | 8 | 8 | +0 |" in table
    assert "+0.1250" in capsys.readouterr().out


def test_tables_handle_missing_metrics():
    table = comparison_table({"a": {"t": {"acc": 0.5}}, "b": {"t": {"acc": 0.25, "f1": 0.1}}})
    assert "| t | acc | 0.5000 | 0.2500 | -0.2500 |" in table
    assert "| t | f1 |  | 0.1000 |  |" in table
    assert results_table({"t": {"acc": 0.5}}).splitlines()[-1] == "| t | acc | 0.5000 |"
    assert unique_names(["x/model", "y/model"]) == ["model-1", "model-2"]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task": "medmcq"}, "unknown task 'medmcq' .*did you mean 'medmcqa'"),
        ({"data_path": "/nonexistent/file.jsonl"}, "data file not found: /nonexistent/file.jsonl"),
        ({"data_path": None}, "needs --data_path"),
        ({"formulation": "mcq"}, "formulation must be"),
        ({"limit": 0}, "limit must be at least 1"),
    ],
)
def test_bad_arguments_fail_before_loading_a_model(tmp_path, kwargs, message):
    with pytest.raises(SFTMixError, match=message):
        run_eval(_args(tmp_path, model_name_or_path="/nonexistent/model", **kwargs))


def test_malformed_data_line_is_reported(tiny_llama_dir, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q"\n')
    with pytest.raises(SFTMixError, match=r"bad\.jsonl: line 2: malformed JSON"):
        run_eval(_args(tmp_path, model_name_or_path=tiny_llama_dir, data_path=str(bad)))
    with pytest.raises(SFTMixError, match="eval file not found"):
        run_eval(EvalArguments(compare=str(tmp_path / "missing.json"), output_dir=str(tmp_path)))


def test_resolve_dtype_auto():
    assert resolve_dtype("float32") == "float32"
    assert resolve_dtype("auto") in ("bfloat16", "float32")


@pytest.mark.parametrize(
    "task, data, files, metric",
    [
        ("ifeval", "ifeval.jsonl", [], "prompt_level_strict_acc"),
        ("mt_bench", "mt_bench/question.jsonl", ["model_answer/{model}.jsonl"], "avg_answer_chars"),
        ("alpaca_eval", "alpaca_eval.json", ["model_outputs.json"], "avg_answer_chars"),
        ("perplexity", "sft.jsonl", [], "perplexity"),
        ("pubmedqa", "pubmedqa", [], "macro_f1"),
        ("mmlu_medical", "mmlu", [], "acc.anatomy"),
    ],
)
def test_every_task_runs_end_to_end(tiny_llama_dir, tmp_path, task, data, files, metric):
    if task == "ifeval":
        pytest.importorskip("lm_eval")
    args = _args(tmp_path, model_name_or_path=tiny_llama_dir, task=task, data_path=str(EVAL / data))
    args.limit, args.max_new_tokens = 2, 4
    results = run_eval(args)
    assert metric in results[task]
    out = tmp_path / "out"
    for name in files:
        assert (out / name.format(model=Path(tiny_llama_dir).name)).is_file()
    assert len((out / "predictions.jsonl").read_text().splitlines()) == results[task]["n"]
