"""Calibration of next-token predictions on the response tokens of an SFT file (``sftmix eval --task calibration``).

At every response token the model's top-1 next-token probability is its confidence, and the prediction is
correct when the top-1 token is the label (Guo et al., 2017, "On Calibration of Modern Neural Networks"):

- ``ece``: expected calibration error, 15 equal-width bins of confidence on [0, 1] (bin ``b`` holds
  ``(b/15, (b+1)/15]``, the first also 0), token-weighted: ``sum_b n_b / N * |accuracy_b - confidence_b|``;
- ``mean_confidence`` and ``accuracy``: the mean top-1 probability and the top-1 accuracy over all tokens;
- ``brier``: the mean over tokens of ``(1 - p(label))^2``, the Brier score of the label's probability;
- ``confidence_std``: the standard deviation over examples of SFTMix's confidence of one model, the negative
  response perplexity ``-exp(mean NLL)`` (the paper reports SFTMix lowers its spread by about 7%).

Per example, `example_calibration_rows` keeps each bin's token count, confidence sum and correct count, so an
ECE over any resample of examples (the efficacy study's bootstrap) is `ece_from_bins` of their sums.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import numpy as np
import torch
from transformers import PreTrainedModel

from ..data.dataset import IGNORE_INDEX
from ..stage1.scoring import LMHead, length_grouped_batches

NUM_BINS = 15
CALIBRATION_KEYS = ("ece", "mean_confidence", "accuracy", "brier", "confidence_std")


class TokenScores(NamedTuple):
    """Per response token of a set of examples (1-D arrays of one length), and the example each belongs to."""

    example: np.ndarray  # int64 index of the example
    nll: np.ndarray  # -log p(label)
    confidence: np.ndarray  # top-1 probability
    correct: np.ndarray  # bool: the top-1 token is the label


@torch.inference_mode()
def response_token_scores(
    model: PreTrainedModel,
    examples: list[dict[str, Any]],
    pad_token_id: int,
    batch_size: int = 8,
    chunk_size: int = 1024,
) -> TokenScores:
    """NLL, top-1 probability and top-1 correctness of every response token, in one no-grad pass.

    The LM head runs on response positions only, ``chunk_size`` rows at a time in fp32 (with the model's logit
    scaling and soft-capping), so no ``[batch, positions, vocab]`` logits are built.

    Args:
        model: A causal LM.
        examples: Dicts with ``input_ids`` and unshifted ``labels`` (``-100`` outside responses).
        pad_token_id: Id used to right-pad a batch.
        batch_size: Examples per forward pass (grouped by length).
        chunk_size: Response tokens per LM-head chunk.
    """
    from trl.trainer.utils import pad

    device = next(model.parameters()).device
    head = LMHead.of(model)
    weight = head.weight.float()
    bias = head.bias.float() if head.bias is not None else None
    parts: list[tuple[torch.Tensor, ...]] = []
    for batch in length_grouped_batches([len(ex["input_ids"]) for ex in examples], batch_size):
        ids = pad([torch.tensor(examples[i]["input_ids"]) for i in batch], pad_token_id).to(device)
        mask = pad([torch.ones(len(examples[i]["input_ids"]), dtype=torch.long) for i in batch]).to(device)
        labels = pad([torch.tensor(examples[i]["labels"]) for i in batch], IGNORE_INDEX).to(device)[:, 1:]
        hidden = model.base_model(input_ids=ids, attention_mask=mask, use_cache=False).last_hidden_state
        keep = labels != IGNORE_INDEX
        rows, targets = hidden[:, :-1][keep].float(), labels[keep]
        owner = torch.tensor(batch, device=device)[keep.nonzero()[:, 0]]
        for start in range(0, len(targets), chunk_size):
            z = rows[start : start + chunk_size] @ weight.T
            if bias is not None:
                z = z + bias
            z = z * head.logit_scale
            if head.softcap is not None:
                z = head.softcap * torch.tanh(z / head.softcap)
            logp = torch.log_softmax(z, dim=-1)
            y = targets[start : start + chunk_size]
            top_logp, top = logp.max(dim=-1)  # the first maximum
            nll = -logp.gather(1, y[:, None]).squeeze(1)
            parts.append((owner[start : start + chunk_size], nll, top_logp.exp(), top == y))
    if not parts:
        empty = np.zeros(0)
        return TokenScores(empty.astype(np.int64), empty, empty, empty.astype(bool))
    example, nll, confidence, correct = (
        torch.cat(column).cpu().numpy() for column in zip(*parts, strict=True)
    )
    return TokenScores(
        example.astype(np.int64), nll.astype(np.float64), confidence.astype(np.float64), correct
    )


def confidence_bins(confidence: np.ndarray, num_bins: int = NUM_BINS) -> np.ndarray:
    """Bin of each confidence: ``(b/num_bins, (b+1)/num_bins]`` is bin ``b`` (0 goes to bin 0)."""
    return np.clip(np.ceil(np.asarray(confidence) * num_bins).astype(np.int64) - 1, 0, num_bins - 1)


def ece_from_bins(count: np.ndarray, confidence_sum: np.ndarray, correct_sum: np.ndarray) -> np.ndarray:
    """Token-weighted ECE from per-bin token counts, confidence sums and correct counts (last axis: bins).

    Example:
        >>> round(float(ece_from_bins(np.array([2, 2]), np.array([0.4, 1.8]), np.array([0, 2]))), 4)
        0.15
    """
    total = count.sum(-1)
    return np.abs(correct_sum - confidence_sum).sum(-1) / np.maximum(total, 1)


def calibration_metrics(scores: TokenScores, num_bins: int = NUM_BINS) -> dict[str, float]:
    """``ece``, ``mean_confidence``, ``accuracy``, ``brier``, ``confidence_std`` (see the module docstring)."""
    bins = confidence_bins(scores.confidence, num_bins)
    count = np.bincount(bins, minlength=num_bins)
    conf_sum = np.bincount(bins, weights=scores.confidence, minlength=num_bins)
    correct_sum = np.bincount(bins, weights=scores.correct.astype(np.float64), minlength=num_bins)
    label_prob = np.exp(-scores.nll)
    examples = np.unique(scores.example)
    mean_nll = (
        np.bincount(scores.example, weights=scores.nll)[examples] / np.bincount(scores.example)[examples]
    )
    return {
        "ece": float(ece_from_bins(count, conf_sum, correct_sum)),
        "mean_confidence": float(scores.confidence.mean()),
        "accuracy": float(scores.correct.mean()),
        "brier": float(((1.0 - label_prob) ** 2).mean()),
        "confidence_std": float(np.std(-np.exp(mean_nll), ddof=1)) if len(examples) > 1 else 0.0,
    }


def example_calibration_rows(scores: TokenScores, num_examples: int, num_bins: int = NUM_BINS) -> list[dict]:
    """Per example: its tokens, NLL sum, mean confidence and accuracy, and its per-bin sums (for bootstraps)."""
    bins = confidence_bins(scores.confidence, num_bins)
    flat = scores.example * num_bins + bins
    size = num_examples * num_bins
    count = np.bincount(flat, minlength=size).reshape(num_examples, num_bins)
    conf = np.bincount(flat, weights=scores.confidence, minlength=size).reshape(num_examples, num_bins)
    correct = np.bincount(flat, weights=scores.correct.astype(np.float64), minlength=size)
    correct = correct.reshape(num_examples, num_bins)
    nll = np.bincount(scores.example, weights=scores.nll, minlength=num_examples)
    brier = np.bincount(scores.example, weights=(1 - np.exp(-scores.nll)) ** 2, minlength=num_examples)
    rows = []
    for i in range(num_examples):
        n = int(count[i].sum())
        rows.append(
            {
                "tokens": n,
                "nll": float(nll[i]),
                "perplexity": math.exp(nll[i] / n) if n else math.nan,
                "confidence": float(conf[i].sum() / n) if n else math.nan,
                "accuracy": float(correct[i].sum() / n) if n else math.nan,
                "brier_sum": float(brier[i]),
                "bins": {
                    "count": count[i].tolist(),
                    "confidence": conf[i].tolist(),
                    "correct": correct[i].tolist(),
                },
            }
        )
    return rows
