"""Response perplexity: batched, head-on-response-positions-only NLL against a plain full-logits computation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from sftmix.data.dataset import load_sft_dataset, tokenize_sft_dataset
from sftmix.evaluation.perplexity import evaluate_perplexity, response_nll
from sftmix.sftmix_config import DataArguments

SFT_FILE = Path(__file__).parent / "assets" / "eval" / "sft.jsonl"


def _plain_nll(model, input_ids: list[int], labels: list[int]) -> tuple[float, int]:
    """Shifted cross-entropy over the full logits of one unpadded example."""
    with torch.no_grad():
        logits = model(torch.tensor([input_ids])).logits[0, :-1].float()
    targets = torch.tensor(labels[1:])
    return float(F.cross_entropy(logits, targets, ignore_index=-100, reduction="sum")), int(
        targets.ne(-100).sum()
    )


@pytest.mark.parametrize("batch_size", [1, 2, 8])
def test_response_nll_matches_full_logits(tiny_qwen2_dir, tokenizer, batch_size):
    model = AutoModelForCausalLM.from_pretrained(tiny_qwen2_dir).eval()
    tokenized = tokenize_sft_dataset(
        load_sft_dataset(DataArguments(dataset_name=str(SFT_FILE))), tokenizer, None
    )
    examples = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in tokenized]
    got = response_nll(model, examples, tokenizer.pad_token_id, batch_size=batch_size)
    for (nll, n), ex in zip(got, examples, strict=True):
        ref_nll, ref_n = _plain_nll(model, ex["input_ids"], ex["labels"])
        assert n == ref_n > 0
        assert nll == pytest.approx(ref_nll, rel=1e-4)


def test_token_weighted_and_mean_example_perplexity(tiny_llama_dir, tokenizer):
    model = AutoModelForCausalLM.from_pretrained(tiny_llama_dir).eval()
    metrics, rows = evaluate_perplexity(model, tokenizer, str(SFT_FILE), batch_size=2)
    assert metrics["n"] == len(rows) == 3
    total_nll, total_tokens = sum(r["nll"] for r in rows), sum(r["tokens"] for r in rows)
    assert metrics["tokens"] == total_tokens
    assert metrics["perplexity"] == pytest.approx(math.exp(total_nll / total_tokens))
    assert metrics["mean_example_perplexity"] == pytest.approx(
        sum(math.exp(r["nll"] / r["tokens"]) for r in rows) / 3
    )
    # A random model over a 101-token vocabulary is close to uniform: perplexity near the vocabulary size.
    assert 30 < metrics["perplexity"] < 300
    limited, _ = evaluate_perplexity(model, tokenizer, str(SFT_FILE), limit=1)
    assert limited["n"] == 1 and limited["tokens"] == rows[0]["tokens"]
