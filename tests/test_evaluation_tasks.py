"""Readers and prompts of the multiple-choice tasks, on tiny files in each benchmark's published format."""

from __future__ import annotations

from pathlib import Path

import pytest

from sftmix.errors import SFTMixError
from sftmix.evaluation.tasks import (
    MCItem,
    build_context,
    first_items,
    load_task,
    parse_mc_record,
    read_mc_file,
    sample_fewshot,
)

EVAL = Path(__file__).parent / "assets" / "eval"


def _summary(items: list[MCItem]) -> list[tuple[str, str]]:
    """(question, right option text) per item: what a reader must get right."""
    return [(item.question, item.choices[item.answer]) for item in items]


def test_medqa_usmle_options_and_letter_answers():
    items, pool = load_task("medqa", EVAL / "medqa.jsonl")
    assert pool == []
    assert [len(item.choices) for item in items] == [5, 4]
    assert _summary(items) == [
        ("Which organ pumps blood through the body?", "Heart"),
        ("Which vitamin deficiency causes scurvy?", "Vitamin C"),
    ]


@pytest.mark.parametrize("name", ["medmcqa_hf.jsonl", "medmcqa_original.jsonl", "medmcqa_reduced.jsonl"])
def test_medmcqa_formats(name):
    """Hub copy (cop 0-3), original release (cop 1-4, detected) and the reduced "A. text" copy."""
    items, _ = load_task("medmcqa", EVAL / name)
    expected = {
        "medmcqa_hf.jsonl": [
            ("Insulin is secreted by", "beta cells"),
            ("The largest bone of the body is", "femur"),
        ],
        "medmcqa_original.jsonl": [
            ("Insulin is secreted by", "beta cells"),
            ("Pellagra is caused by deficiency of", "niacin"),
        ],
        "medmcqa_reduced.jsonl": [
            ("Insulin is secreted by", "beta cells"),
            ("The largest bone of the body is", "femur"),
        ],
    }[name]
    assert _summary(items) == expected
    assert all(not c.startswith(("A.", "B.")) for item in items for c in item.choices)


def test_pubmedqa_test_split_in_pqal_order_with_training_pool():
    for path in (EVAL / "pubmedqa", EVAL / "pubmedqa" / "test_ground_truth.json"):
        items, pool = load_task("pubmedqa", path)
        # ori_pqal.json order (111 before 333), not the label-sorted ground-truth order.
        assert [(i.id, i.choices[i.answer]) for i in items] == [("111", "yes"), ("333", "maybe")]
        assert [p.id for p in pool] == ["222"]
    assert items[0].context == "Aspirin was given to 50 patients.\nFever fell in 45 of them."


def test_pubmedqa_all_pqal_and_medagents_jsonl_give_same_prompt():
    items, pool = load_task("pubmedqa", EVAL / "pubmedqa" / "ori_pqal.json")
    assert [(i.id, i.choices[i.answer]) for i in items] == [("111", "yes"), ("222", "no"), ("333", "maybe")]
    assert pool == []
    merged, _ = load_task("pubmedqa", EVAL / "pubmedqa_medagents.jsonl")
    for formulation in ("cloze", "letter"):
        assert build_context("pubmedqa", merged[0], formulation, []) == build_context(
            "pubmedqa", items[0], formulation, []
        )


def test_mmlu_folder_header_csv_with_dev_pool():
    items, pool = load_task("mmlu_medical", EVAL / "mmlu")
    assert [(i.subject, i.choices[i.answer]) for i in items] == [
        ("anatomy", "Femur"),
        ("anatomy", "Gallbladder"),
        ("medical_genetics", "46"),
        ("medical_genetics", "Thymine"),
    ]
    assert items[1].question == 'Which organ holds "bile"?'
    assert sorted(p.subject for p in pool) == ["anatomy", "medical_genetics"]


def test_mmlu_original_csv_without_header_letter_answers():
    items, pool = load_task("mmlu_medical", EVAL / "mmlu_hendrycks" / "anatomy_test.csv")
    assert [i.choices[i.answer] for i in items] == ["Femur", "Gallbladder", "Biceps"]
    assert pool == []


def test_generic_mc_with_context():
    items, _ = load_task("mc", EVAL / "mc.jsonl")
    assert [i.id for i in items] == ["capital", "river", "ocean"]
    assert items[1].context == "The city of Paris lies on the Seine."
    assert build_context("mc", items[1], "cloze", []) == (
        "The city of Paris lies on the Seine.\nQuestion: Which river flows through the city?\nAnswer:"
    )


def test_prompts_follow_lm_eval_conventions():
    item = MCItem("x", "Q?", ["one", "two"], 1, subject="clinical_knowledge")
    assert build_context("medmcqa", item, "letter", []) == "Question: Q?\nChoices:\nA. one\nB. two\nAnswer:"
    assert build_context("medqa", item, "letter", []) == "Question: Q?\nA. one\nB. two\nAnswer:"
    assert build_context("medqa", item, "cloze", []) == "Question: Q?\nAnswer:"
    assert build_context("mmlu_medical", item, "letter", []) == (
        "The following are multiple choice questions (with answers) about clinical knowledge.\n\n"
        "Q?\nA. one\nB. two\nAnswer:"
    )
    assert build_context("mmlu_medical", item, "cloze", []) == (
        "The following are questions (with answers) about clinical knowledge.\n\nQuestion: Q?\nAnswer:"
    )
    pubmed = MCItem("p", "Works?", ["yes", "no", "maybe"], 0, context="Abstract text.")
    assert (
        build_context("pubmedqa", pubmed, "cloze", [])
        == "Abstract: Abstract text.\nQuestion: Works?\nAnswer:"
    )


def test_fewshot_layout_excludes_item_and_is_seeded():
    items, _ = load_task("mc", EVAL / "mc.jsonl")
    for index in range(len(items)):
        shots = sample_fewshot(items, index, [], 2, seed=0)
        assert len(shots) == 2 and items[index] not in shots
    draws = {tuple(s.id for s in sample_fewshot(items, 0, [], 1, seed=s)) for s in range(20)}
    assert draws == {("river",), ("ocean",)}  # both other items get drawn, never the item itself
    assert sample_fewshot(items, 0, [], 1, seed=3) == sample_fewshot(items, 0, [], 1, seed=3)
    context = build_context("mc", items[0], "letter", [items[2]])
    assert context == (
        "Question: What is the largest ocean?\nA. Atlantic\nB. Pacific\nC. Indian\nD. Arctic\nAnswer: B\n\n"
        "Question: What is the capital of France?\nA. Berlin\nB. Paris\nC. Rome\nAnswer:"
    )


def test_fewshot_pool_prefers_same_subject():
    items, pool = load_task("mmlu_medical", EVAL / "mmlu")
    shots = sample_fewshot(items, 2, pool, 1, seed=0)
    assert [s.subject for s in shots] == ["medical_genetics"]


def test_limit_is_per_subject_when_items_have_several():
    items, _ = load_task("mmlu_medical", EVAL / "mmlu")
    assert [i.subject for i in first_items(items, 1)] == ["anatomy", "medical_genetics"]
    single, _ = load_task("mc", EVAL / "mc.jsonl")
    assert [i.id for i in first_items(single, 2)] == ["capital", "river"]


def test_items_without_id_are_named_by_file_and_line_wherever_the_file_lies(tmp_path):
    rows = '{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "r", "choices": ["a", "b"], "answer": 1}\n'
    for folder in (tmp_path / "one", tmp_path / "two"):
        folder.mkdir()
        (folder / "items.jsonl").write_text(rows)
        assert [i.id for i in read_mc_file(folder / "items.jsonl")] == ["items.jsonl:1", "items.jsonl:2"]


def test_bad_inputs_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 0}\n{"question": "q", oops}\n')
    with pytest.raises(SFTMixError, match=r"bad\.jsonl: line 2: malformed JSON"):
        read_mc_file(bad)
    bad.write_text('{"question": "q", "choices": ["a", "b"], "answer": 5}\n')
    with pytest.raises(SFTMixError, match=r"bad\.jsonl:1: answer 5 is out of range"):
        read_mc_file(bad)
    bad.write_text('{"prompt": "q"}\n')
    with pytest.raises(SFTMixError, match=r"bad\.jsonl:1: unknown multiple-choice record"):
        read_mc_file(bad)
    with pytest.raises(SFTMixError, match="data file not found"):
        load_task("medqa", tmp_path / "missing.jsonl")
    with pytest.raises(SFTMixError, match="answer_idx 'F'"):
        parse_mc_record({"question": "q", "options": {"A": "x", "B": "y"}, "answer_idx": "F"}, "f:3")
    csv = tmp_path / "anatomy_test.csv"
    csv.write_text("Which?,a,b,c,d,E\n")
    with pytest.raises(SFTMixError, match=r"anatomy_test\.csv:1: answer 'E' is out of range"):
        load_task("mmlu_medical", csv)
    csv.write_text("Which?,a,b,c,d,A\nWhat?,a,b,c,d,maybe\n")
    with pytest.raises(SFTMixError, match=r"anatomy_test\.csv:2: field 'answer'"):
        load_task("mmlu_medical", csv)
