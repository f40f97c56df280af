"""Held-out response perplexity on any SFT file: the quantity stage 1 of SFTMix measures, on new data.

The file is read and tokenised exactly as for training (`sftmix.data.dataset.load_sft_dataset` and
`tokenize_sft_dataset`), so only assistant tokens count. Two figures are reported:

- ``perplexity``: token-weighted, ``exp(sum of response-token NLL / number of response tokens)`` over the set;
- ``mean_example_perplexity``: the mean over examples of ``exp(mean NLL of the example's response tokens)``,
  the per-example ``Perp`` that SFTMix averages over checkpoints to get confidence.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..data.dataset import load_sft_dataset, tokenize_sft_dataset
from ..sftmix_config import DataArguments
from ..stage1.scoring import LMHead, length_grouped_batches, response_nll_sums
from .calibration import calibration_metrics, example_calibration_rows, response_token_scores


@torch.inference_mode()
def response_nll(
    model: PreTrainedModel,
    examples: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
) -> list[tuple[float, int]]:
    """Summed NLL of the response tokens of each example, and how many there are.

    The scoring of stage 1 (`sftmix.stage1.scoring.response_nll_sums`): the LM head runs on response positions
    only, through the fused head, so no ``[batch, positions, vocab]`` logits are built.

    Args:
        model: A causal LM.
        examples: Dicts with ``input_ids`` and ``labels`` (``-100`` outside responses, unshifted: the logits at
            position ``t - 1`` predict ``labels[t]``).
        pad_token_id: Id used to right-pad a batch (its positions carry no label).
        batch_size: Examples per forward pass (sorted by length to waste little padding).

    Returns:
        ``(nll_sum, n_tokens)`` per example, in input order.
    """
    device = next(model.parameters()).device
    head = LMHead.of(model)
    batches = length_grouped_batches([len(ex["input_ids"]) for ex in examples], batch_size)
    results: list[tuple[float, int]] = [(0.0, 0)] * len(examples)
    for batch in tqdm(batches, desc="Perplexity", unit="batch"):
        sums, counts = response_nll_sums(
            model,
            [examples[i]["input_ids"] for i in batch],
            [examples[i]["labels"] for i in batch],
            head,
            chunk_size=1024,
            device=device,
            pad_token_id=pad_token_id,
        )
        for i, nll, n in zip(batch, sums.tolist(), counts.tolist(), strict=True):
            results[i] = (nll, n)
    return results


def evaluate_perplexity(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    data_path: str,
    limit: int | None = None,
    batch_size: int = 8,
    max_length: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Response perplexity and calibration of ``model`` on the SFT file ``data_path`` (any format
    `load_sft_dataset` reads), from one pass over its response tokens (`response_token_scores`).

    Args:
        model: A causal LM.
        tokenizer: Its tokenizer (chat template used to render the conversations).
        data_path: Local SFT file (or Hub dataset name).
        limit: Use only the first N examples.
        batch_size: Examples per forward pass.
        max_length: Truncation length (keeps the start); default: the model's ``max_position_embeddings``.

    Returns:
        ``{"perplexity", "mean_example_perplexity", "nll_per_token", "tokens", "n"}`` plus the calibration
        metrics of `sftmix.evaluation.calibration` (``ece``, ``mean_confidence``, ``accuracy``, ``brier``,
        ``confidence_std``), and one dict per example (``id``, ``tokens``, ``nll``, ``perplexity``,
        ``confidence``, ``accuracy``, ``brier_sum`` and its per-bin sums ``bins``).
    """
    dataset = load_sft_dataset(DataArguments(dataset_name=data_path, max_examples=limit))
    max_length = max_length or getattr(model.config, "max_position_embeddings", None)
    tokenized = tokenize_sft_dataset(dataset, tokenizer, max_length)
    examples = [{"input_ids": ex["input_ids"], "labels": ex["labels"]} for ex in tokenized]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    scores = response_token_scores(model, examples, pad_id, batch_size)
    per_example = example_calibration_rows(scores, len(examples))
    rows = [
        {"id": ex_id, **row}
        for ex_id, row in zip(tokenized["id"], per_example, strict=True)
        if row["tokens"] > 0
    ]
    total_nll = sum(r["nll"] for r in rows)
    total_tokens = sum(r["tokens"] for r in rows)
    metrics = {
        "perplexity": math.exp(total_nll / total_tokens),
        "mean_example_perplexity": sum(r["perplexity"] for r in rows) / len(rows),
        "nll_per_token": total_nll / total_tokens,
        **calibration_metrics(scores),
        "tokens": total_tokens,
        "n": len(rows),
    }
    return metrics, rows
