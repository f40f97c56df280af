"""Calibration of response tokens: the metrics against a hand computation, the token pass against full logits."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from sftmix.data.dataset import load_sft_dataset, tokenize_sft_dataset
from sftmix.evaluation import run_eval
from sftmix.evaluation.calibration import (
    TokenScores,
    calibration_metrics,
    ece_from_bins,
    example_calibration_rows,
    response_token_scores,
)
from sftmix.evaluation.perplexity import response_nll
from sftmix.sftmix_config import DataArguments, EvalArguments

SFT_FILE = Path(__file__).parent / "assets" / "eval" / "sft.jsonl"


def _scores() -> TokenScores:
    # two examples: tokens 0-2 belong to example 0, tokens 3-4 to example 1
    confidence = np.array([0.95, 0.5, 0.05, 0.5, 1 / 15])
    correct = np.array([True, False, False, True, True])
    label_prob = np.array([0.95, 0.2, 0.01, 0.5, 1 / 15])
    return TokenScores(np.array([0, 0, 0, 1, 1]), -np.log(label_prob), confidence, correct)


def test_calibration_metrics_match_a_hand_computation():
    metrics = calibration_metrics(_scores())
    # bins of width 1/15, (lo, hi]: 0.95 -> bin 14, 0.5 (twice) -> bin 7, 0.05 and 1/15 -> bin 0
    # bin 14: |1 - 0.95| * 1; bin 7: |1/2 - 0.5| * 2; bin 0: |1/2 - (0.05 + 1/15) / 2| * 2
    ece = (0.05 + 0.0 + abs(1 - (0.05 + 1 / 15))) / 5
    assert metrics["ece"] == pytest.approx(ece)
    assert metrics["mean_confidence"] == pytest.approx((0.95 + 0.5 + 0.05 + 0.5 + 1 / 15) / 5)
    assert metrics["accuracy"] == pytest.approx(3 / 5)
    brier = ((1 - 0.95) ** 2 + (1 - 0.2) ** 2 + (1 - 0.01) ** 2 + (1 - 0.5) ** 2 + (1 - 1 / 15) ** 2) / 5
    assert metrics["brier"] == pytest.approx(brier)
    # SFTMix's confidence of one model: minus the example's response perplexity
    perp = [math.exp(-np.log([0.95, 0.2, 0.01]).mean()), math.exp(-np.log([0.5, 1 / 15]).mean())]
    assert metrics["confidence_std"] == pytest.approx(float(np.std(perp, ddof=1)))
    assert set(metrics) == {"ece", "mean_confidence", "accuracy", "brier", "confidence_std"}


def test_per_example_bins_sum_to_the_set_ece():
    scores = _scores()
    rows = example_calibration_rows(scores, 3)  # example 2 has no token
    assert [r["tokens"] for r in rows] == [3, 2, 0]
    total = {k: np.sum([r["bins"][k] for r in rows], axis=0) for k in ("count", "confidence", "correct")}
    assert float(ece_from_bins(total["count"], total["confidence"], total["correct"])) == pytest.approx(
        calibration_metrics(scores)["ece"]
    )
    assert rows[1]["accuracy"] == 1.0 and rows[0]["confidence"] == pytest.approx(0.5)


def test_token_scores_match_full_logits(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    tokenized = tokenize_sft_dataset(
        load_sft_dataset(DataArguments(dataset_name=str(SFT_FILE))), tokenizer, None
    )
    examples = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in tokenized]
    scores = response_token_scores(model, examples, tokenizer.pad_token_id, batch_size=2, chunk_size=5)
    want_conf, want_correct, want_nll = [], [], []
    for ex in examples:
        with torch.no_grad():
            probs = model(torch.tensor([ex["input_ids"]])).logits[0, :-1].float().softmax(-1)
        targets = torch.tensor(ex["labels"][1:])
        keep = targets != -100
        want_conf += probs[keep].max(-1).values.tolist()
        want_correct += (probs[keep].argmax(-1) == targets[keep]).tolist()
        want_nll += (-probs[keep].gather(1, targets[keep][:, None]).log().squeeze(1)).tolist()
    order = np.argsort(scores.example, kind="stable")  # batches are grouped by length: back to input order
    np.testing.assert_allclose(scores.confidence[order], want_conf, rtol=1e-5)
    np.testing.assert_allclose(scores.nll[order], want_nll, rtol=1e-5)
    assert scores.correct[order].tolist() == want_correct
    # the same NLL as the fused head of perplexity / stage 1
    fused = response_nll(model, examples, tokenizer.pad_token_id, batch_size=2)
    sums = np.bincount(scores.example, weights=scores.nll)
    np.testing.assert_allclose(sums, [nll for nll, _ in fused], rtol=1e-5)


def test_eval_task_calibration_writes_the_stable_keys(tiny_llama_dir, tmp_path):
    out = tmp_path / "eval"
    results = run_eval(
        EvalArguments(
            model_name_or_path=tiny_llama_dir,
            task="calibration",
            data_path=str(SFT_FILE),
            output_dir=str(out),
        )
    )
    written = json.loads((out / "eval.json").read_text())
    assert written == results
    metrics = written["calibration"]
    assert {"ece", "mean_confidence", "accuracy", "brier", "confidence_std", "n", "tokens"} == set(metrics)
    assert 0 <= metrics["ece"] <= 1 and 0 < metrics["mean_confidence"] < 1 and metrics["n"] == 3
    # perplexity's pass reports the same calibration
    perplexity = run_eval(
        EvalArguments(
            model_name_or_path=tiny_llama_dir,
            task="perplexity",
            data_path=str(SFT_FILE),
            output_dir=str(out / "p"),
        )
    )["perplexity"]
    assert perplexity["ece"] == pytest.approx(metrics["ece"])
