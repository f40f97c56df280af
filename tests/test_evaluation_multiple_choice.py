"""Log-likelihood scoring: batched engine against a one-at-a-time reference, and planted answers."""

from __future__ import annotations

import functools
import math
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from sftmix.evaluation.multiple_choice import encode_pair, evaluate_multiple_choice, loglikelihood, macro_f1
from sftmix.evaluation.tasks import LETTERS, MCItem, load_task

EVAL = Path(__file__).parent / "assets" / "eval"


def _reference_loglikelihood(model, tokenizer, context: str, continuation: str) -> tuple[float, bool]:
    """One unpadded forward over context + continuation: the definition the batched engine must match."""
    context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
    ids = torch.tensor([context_ids + continuation_ids])
    with torch.no_grad():
        logprobs = torch.log_softmax(model(ids).logits[0].float(), -1)
    n = len(continuation_ids)
    window = logprobs[-n - 1 : -1]
    target = torch.tensor(continuation_ids)
    return float(window.gather(-1, target[:, None]).sum()), bool((window.argmax(-1) == target).all())


@pytest.mark.parametrize("model_fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_batched_loglikelihood_matches_one_at_a_time(request, tokenizer, model_fixture):
    model = AutoModelForCausalLM.from_pretrained(request.getfixturevalue(model_fixture)).eval()
    requests = [
        ("Question: What is the capital of France?\nAnswer:", " Paris"),
        ("Question: What is the capital of France?\nAnswer:", " Berlin is a city"),
        ("Question: x\nA. a\nB. b\nAnswer:", " A"),  # one-token continuations sharing one row
        ("Question: x\nA. a\nB. b\nAnswer:", " B"),
        ("Short:", " a much longer continuation than the context"),
        ("Trailing space moves to the continuation ", "ok"),
    ]
    expected = [_reference_loglikelihood(model, tokenizer, c, x) for c, x in requests]
    for batch_size in (1, 3, 8):
        got = loglikelihood(model, tokenizer, requests, batch_size=batch_size)
        for (ll, greedy), (ref_ll, ref_greedy) in zip(got, expected, strict=True):
            assert ll == pytest.approx(ref_ll, abs=1e-4)
            assert greedy == ref_greedy
    assert all(ll < 0 for ll, _ in expected)


def test_encode_pair_moves_trailing_space(tokenizer):
    context_ids, continuation_ids = encode_pair(tokenizer, "Answer: ", "yes")
    assert tokenizer.decode(context_ids) == "Answer:"
    assert tokenizer.decode(continuation_ids) == " yes"


def _planted_scorer(right_text: str):
    """A fake model that likes ``right_text``: in cloze it scores the continuation naming it highest; in
    letter form it finds the letter listed with it in the prompt and scores that letter highest."""

    def score(requests):
        out = []
        for context, continuation in requests:
            if continuation.strip() in LETTERS:
                line = f"{continuation.strip()}. {right_text}\n"
                out.append((-0.1 if line in context else -5.0, False))
            else:
                out.append((-0.1 if continuation.strip() == right_text else -5.0, False))
        return out

    return score


@pytest.mark.parametrize("formulation", ["cloze", "letter"])
def test_planted_answer_is_found_in_both_formulations(formulation):
    items = [MCItem("a", "Capital of France?", ["Rome", "Paris", "Oslo"], 1)]
    metrics, rows = evaluate_multiple_choice("mc", items, _planted_scorer("Paris"), formulation)
    assert metrics["acc"] == 1.0 and rows[0]["prediction"] == "B" and rows[0]["correct"]
    wrong = [MCItem("a", "Capital of France?", ["Rome", "Paris", "Oslo"], 2)]
    metrics, _ = evaluate_multiple_choice("mc", wrong, _planted_scorer("Paris"), formulation)
    assert metrics["acc"] == 0.0


def test_letter_formulation_scores_letters_and_cloze_scores_texts():
    seen = []

    def record(requests):
        seen.append(list(requests))
        return [(-1.0, False)] * len(requests)

    item = MCItem("a", "Q?", ["first", "second"], 0)
    evaluate_multiple_choice("medqa", [item], record, "letter")
    evaluate_multiple_choice("medqa", [item], record, "cloze")
    assert [c for _, c in seen[0]] == [" A", " B"]
    assert [c for _, c in seen[1]] == [" first", " second"]
    assert seen[0][0][0].endswith("A. first\nB. second\nAnswer:")


def test_a_model_that_always_answers_a_is_flagged(caplog):
    items = [MCItem(str(i), f"Q{i}?", ["w", "x", "y", "z"], i % 4) for i in range(40)]

    def score(requests):
        return [(-1.0 if continuation == " A" else -3.0, False) for _, continuation in requests]

    with caplog.at_level("WARNING"):
        metrics, _ = evaluate_multiple_choice("medmcqa", items, score, "letter")
    assert metrics["acc"] == 0.25 and metrics["top_prediction_share"] == 1.0
    assert metrics["top_prediction_share_norm"] == 1.0  # one-letter options: acc_norm predicts the same
    assert "answers A to 40 of 40 items" in caplog.text
    caplog.clear()
    metrics, _ = evaluate_multiple_choice("medmcqa", items, _planted_scorer_by_answer(items), "letter")
    assert metrics["acc"] == 1.0 and metrics["top_prediction_share"] == 0.25
    assert "answers" not in caplog.text


def _planted_scorer_by_answer(items):
    """Scores the right letter highest for every item (the question text identifies the item)."""
    right = {f"Q{item.id}?": "ABCD"[item.answer] for item in items}

    def score(requests):
        out = []
        for context, continuation in requests:
            question = next(q for q in right if q in context)
            out.append((-1.0 if continuation == " " + right[question] else -3.0, False))
        return out

    return score


def test_acc_norm_divides_by_characters():
    """Short option: higher total log-likelihood; long option: higher per character. acc and acc_norm differ."""
    scores = {" a": -2.0, " bbbbbbbbbb": -5.0}
    item = MCItem("n", "Q?", ["a", "bbbbbbbbbb"], 1)
    metrics, rows = evaluate_multiple_choice(
        "mc", [item], lambda reqs: [(scores[c], False) for _, c in reqs], "cloze"
    )
    assert (metrics["acc"], metrics["acc_norm"]) == (0.0, 1.0)
    assert (rows[0]["prediction"], rows[0]["prediction_norm"]) == ("A", "B")


def test_pubmedqa_macro_f1_and_mmlu_subjects(tmp_path):
    items, pool = load_task("pubmedqa", EVAL / "pubmedqa" / "ori_pqal.json")  # yes, no, maybe
    always_yes = evaluate_multiple_choice("pubmedqa", items, _planted_scorer("yes"), "cloze")[0]
    assert always_yes["acc"] == pytest.approx(1 / 3)
    assert always_yes["macro_f1"] == pytest.approx((0.5 + 0 + 0) / 3)  # F1(yes) = 2/(2+2)
    items, pool = load_task("mmlu_medical", EVAL / "mmlu")
    metrics, _ = evaluate_multiple_choice(
        "mmlu_medical", items, _planted_scorer("Thymine"), "cloze", pool=pool
    )
    # Ties go to option A (numpy.argmax): both anatomy answers are A; genetics gets only Thymine right.
    assert metrics["acc.anatomy"] == 1.0 and metrics["acc.medical_genetics"] == 0.5
    assert metrics["acc"] == 0.75 and metrics["n"] == 4


def test_fewshot_prompt_reaches_the_scorer_and_limit_applies():
    items, _ = load_task("mc", EVAL / "mc.jsonl")
    contexts = []

    def record(requests):
        contexts.extend(c for c, _ in requests)
        return [(-1.0, False)] * len(requests)

    metrics, rows = evaluate_multiple_choice("mc", items, record, "cloze", num_fewshot=2, limit=1)
    assert metrics["n"] == 1 and len(rows) == 1
    assert contexts[0].count("Answer:") == 3 and contexts[0].endswith(
        "What is the capital of France?\nAnswer:"
    )
    assert "Answer: Seine" in contexts[0] and "Answer: Pacific" in contexts[0]


def test_real_model_scores_end_to_end(tiny_llama_dir, tokenizer):
    """The engine plugged into the evaluator: acc is the fraction of rows whose top log-likelihood is right."""
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    items, _ = load_task("mc", EVAL / "mc.jsonl")
    score = functools.partial(loglikelihood, model, tokenizer, batch_size=2)
    metrics, rows = evaluate_multiple_choice("mc", items, score, "cloze")
    for row, item in zip(rows, items, strict=True):
        best = max(range(len(item.choices)), key=lambda k: row["loglikelihoods"][k])
        assert row["prediction"] == LETTERS[best]
        assert all(math.isfinite(x) for x in row["loglikelihoods"])
    assert metrics["acc"] == sum(r["correct"] for r in rows) / len(rows)


def test_macro_f1_per_class_mean():
    # class 0: perfect (F1 1); class 1: one right, one false alarm (F1 2/3); class 2: never predicted (F1 0).
    assert macro_f1([0, 1, 1], [0, 1, 2], 3) == pytest.approx((1 + 2 / 3 + 0) / 3)
