"""IFEval scoring with the official checkers (through lm-eval) on responses whose verdict is known."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from sftmix.errors import SFTMixError
from sftmix.evaluation.ifeval import load_ifeval, score_ifeval

pytest.importorskip("lm_eval", reason="IFEval scoring needs the eval extra (lm-eval)")

EVAL = Path(__file__).parent / "assets" / "eval"
END = "Is there anything else I can help with?"


def test_load_accepts_key_or_id():
    records = load_ifeval(EVAL / "ifeval.jsonl")
    assert [r["key"] for r in records] == [1001, 1002, 1003]
    assert records[1]["instruction_id_list"] == [
        "length_constraints:number_sentences",
        "startend:end_checker",
    ]


def test_responses_that_follow_and_violate():
    records = load_ifeval(EVAL / "ifeval.jsonl")
    following = [
        "Waves roll in\nthe gulls cry out\nthe tide comes home",
        f"A cat is a small furry animal. It likes to sleep all day. {END}",
        "Keep a routine: *go to bed at the same time* and *avoid screens late*.",
    ]
    metrics, rows = score_ifeval(records, following)
    assert metrics["prompt_level_strict_acc"] == 1.0 and metrics["inst_level_strict_acc"] == 1.0
    violating = [
        "Waves roll in, the gulls cry out, the tide comes home",  # comma
        "A cat purrs. " * 6 + "Bye.",  # 7 sentences and the wrong ending: both instructions fail
        "Sleep well by keeping a routine.",  # no highlighted section
    ]
    metrics, rows = score_ifeval(records, violating)
    assert metrics == {
        "prompt_level_strict_acc": 0.0,
        "inst_level_strict_acc": 0.0,
        "prompt_level_loose_acc": 0.0,
        "inst_level_loose_acc": 0.0,
        "n": 3,
    }
    assert rows[1]["inst_level_strict_acc"] == [False, False]


def test_loose_forgives_a_trailing_line_and_instruction_level_counts_each_instruction():
    records = load_ifeval(EVAL / "ifeval.jsonl")[1:2]
    # Right ending, but an extra closing line: strict fails end_checker, loose drops the last line and passes.
    response = f"A cat is small. It naps a lot. {END}\nThanks!"
    metrics, rows = score_ifeval(records, [response])
    assert rows[0]["inst_level_strict_acc"] == [True, False]
    assert metrics["prompt_level_strict_acc"] == 0.0 and metrics["inst_level_strict_acc"] == 0.5
    assert metrics["prompt_level_loose_acc"] == 1.0 and metrics["inst_level_loose_acc"] == 1.0


def test_bad_records(tmp_path):
    bad = tmp_path / "ifeval.jsonl"
    bad.write_text(
        '{"key": 1, "prompt": "p", "instruction_id_list": ["punctuation:no_comma"], "kwargs": []}\n'
    )
    with pytest.raises(SFTMixError, match=r"ifeval\.jsonl:1: field 'kwargs'"):
        load_ifeval(bad)
    bad.write_text('{"key": 1, "prompt": "p", "instruction_id_list": ["made:up"], "kwargs": [{}]}\n')
    with pytest.raises(SFTMixError, match="unknown instruction id"):
        score_ifeval(load_ifeval(bad), ["x"])


def test_scores_do_not_depend_on_the_global_random_state_and_loose_is_at_least_strict():
    # IFEval's own letter-frequency prompt with letter "!": the checker falls back to a random letter.
    record = {
        "key": 1129,
        "prompt": 'Write a pitch. Contain 6 or more exclamation marks "!" in your response.',
        "instruction_id_list": ["keywords:letter_frequency"],
        "kwargs": [{"let_relation": "at least", "letter": "!", "let_frequency": 6}],
    }
    # a-e (either case: the checker lowercases) pass, the other 42 of string.ascii_letters fail
    response = "aaaaaa bbbbbb cccccc dddddd eeeeee"
    verdicts = set()
    for seed in range(30):
        random.seed(seed)
        state = random.getstate()
        metrics, rows = score_ifeval([record], [response])
        assert random.getstate() == state  # the caller's random state is left alone
        verdicts.add(metrics["inst_level_strict_acc"])
        assert rows[0]["inst_level_loose_acc"] == rows[0]["inst_level_strict_acc"]  # same letter checked
    assert len(verdicts) == 1
