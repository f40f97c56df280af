"""Every evaluation task reads the real public files in ../shared/data (skipped where they are absent)."""

from __future__ import annotations

import pytest
from conftest import SHARED_DATA

from sftmix.evaluation.generation import load_alpaca_eval_instructions, load_mt_bench_questions
from sftmix.evaluation.ifeval import load_ifeval
from sftmix.evaluation.tasks import load_task

pytestmark = pytest.mark.skipif(not SHARED_DATA.is_dir(), reason="../shared/data is not beside the checkout")


@pytest.mark.parametrize(
    "task, path, n",
    [
        ("medmcqa", "medmcqa_dev/validation.jsonl", 4183),
        ("pubmedqa", "pubmedqa", 500),
        ("mmlu_medical", "mmlu_medical", 1089),
        ("medqa", "medagents_benchmark/medmcqa/test.jsonl", 2816),
        ("pubmedqa", "medagents_benchmark/pubmedqa/test.jsonl", 500),
        ("mmlu_medical", "medagents_benchmark/mmlu/test.jsonl", 1089),
    ],
)
def test_multiple_choice_files(task, path, n):
    items, _ = load_task(task, SHARED_DATA / path)
    assert len(items) == n
    for item in items[:50]:
        assert 2 <= len(item.choices) <= 5 and 0 <= item.answer < len(item.choices)


def test_generation_files():
    assert len(load_ifeval(SHARED_DATA / "ifeval" / "ifeval.jsonl")) == 541
    assert len(load_mt_bench_questions(SHARED_DATA / "mt_bench" / "question.jsonl")) == 80
    assert len(load_alpaca_eval_instructions(SHARED_DATA / "alpaca_eval" / "outputs.json")) == 805
