"""Multiple choice by log-likelihood, the way lm-evaluation-harness scores ``output_type: multiple_choice``.

Each option becomes a ``(context, continuation)`` request, ``continuation = " " + option`` (cloze) or
``" " + letter`` (letter formulation). The model scores only the continuation tokens; the prediction is the
option with the highest summed log-probability (``acc``) or the highest log-probability per character of the
option text (``acc_norm``, lm-eval's length normalisation: ``ll / len(choice)``).

Batches are built like lm-eval's ``_loglikelihood_tokens``: requests that share the same model input
(``(context + continuation)[:-1]``, e.g. the four one-token letters of a question) are scored by one row,
rows are sorted longest first (an out-of-memory error shows up in the first batch, and padding is minimal),
and rows are left-padded so that every continuation ends at the last position: the LM head then runs only on
the last ``max(len(continuation))`` positions (``logits_to_keep``), never on the whole prompt.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm
from transformers import PreTrainedModel, PreTrainedTokenizerBase
from trl.trainer.utils import pad

from .tasks import LETTERS, PUBMEDQA_LABELS, MCItem, build_context, choice_text, first_items, sample_fewshot

logger = logging.getLogger(__name__)

# Share of the items given the same prediction above which the accuracy mostly measures the answer prior.
DEGENERATE_SHARE = 0.9

LoglikelihoodFn = Callable[[Sequence[tuple[str, str]]], list[tuple[float, bool]]]
"""Scores ``(context, continuation)`` pairs: ``(sum of continuation log-probs, is greedy)`` for each."""


def encode_pair(
    tokenizer: PreTrainedTokenizerBase, context: str, continuation: str
) -> tuple[list[int], list[int]]:
    """Token ids of ``context`` and of ``continuation`` as the model sees them after the context.

    As lm-eval's ``_encode_pair``: trailing spaces of the context move to the continuation, the pair is
    encoded whole and split at the length of the encoded context, so the boundary token is the one the
    model would actually read. Special tokens (a BOS) are added as the tokenizer does by default.

    >>> from transformers import AutoTokenizer  # doctest: +SKIP
    >>> encode_pair(AutoTokenizer.from_pretrained("gpt2"), "Question: 2+2?\\nAnswer:", " 4")  # doctest: +SKIP
    ([24361, 25, 362, 10, 17, 30, 198, 33706, 25], [604])
    """
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces:
        context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
    whole = tokenizer(context + continuation)["input_ids"]
    context_ids = tokenizer(context)["input_ids"]
    continuation_ids = whole[len(context_ids) :]
    if not continuation_ids or whole[: len(context_ids)] != context_ids:
        # The tokenizer merged across the boundary; score the continuation encoded on its own instead.
        continuation_ids = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    return context_ids, continuation_ids


@torch.inference_mode()
def loglikelihood(
    model: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    requests: Sequence[tuple[str, str]],
    batch_size: int = 8,
    max_length: int | None = None,
    desc: str = "Scoring options",
) -> list[tuple[float, bool]]:
    """Sum of log-probabilities of each continuation given its context, and whether it is the greedy one.

    Args:
        model: A causal LM (any ``AutoModelForCausalLM``; its forward must take ``position_ids`` and
            ``logits_to_keep``, as every transformers causal LM does).
        tokenizer: Its tokenizer (needs a pad token; `sftmix.data.models.load_tokenizer` sets one).
        requests: ``(context, continuation)`` strings.
        batch_size: Model inputs (rows) per forward pass.
        max_length: Longest input; longer ones lose their oldest tokens (lm-eval truncates on the left).
            Default: the model's ``max_position_embeddings``.
        desc: Progress bar label.

    Returns:
        ``(logprob, is_greedy)`` per request, in the order of ``requests``.
    """
    max_length = max_length or getattr(model.config, "max_position_embeddings", None) or 2048
    device = next(model.parameters()).device
    # Group requests by model input: (context + continuation)[:-1].
    rows: dict[tuple[int, ...], list[tuple[int, list[int]]]] = {}
    for index, (context, continuation) in enumerate(requests):
        context_ids, continuation_ids = encode_pair(tokenizer, context, continuation)
        if not context_ids:  # nothing to condition on: lm-eval conditions on BOS/EOS
            prefix = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
            context_ids = [prefix]
        whole = (context_ids + continuation_ids)[-(max_length + 1) :]
        continuation_ids = continuation_ids[-max_length:]
        rows.setdefault(tuple(whole[:-1]), []).append((index, continuation_ids))
    order = sorted(rows, key=len, reverse=True)
    results: list[tuple[float, bool]] = [(0.0, False)] * len(requests)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in tqdm(range(0, len(order), batch_size), desc=desc, unit="batch", leave=False):
        batch = order[start : start + batch_size]
        # left padding: every row ends at the last position
        input_ids = pad([torch.tensor(row, dtype=torch.long) for row in batch], pad_id, "left")
        attention_mask = pad([torch.ones(len(row), dtype=torch.long) for row in batch], 0, "left")
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        keep = max(len(cont) for row in batch for _, cont in rows[row])
        logits = model(
            input_ids=input_ids.to(device),
            attention_mask=attention_mask.to(device),
            position_ids=position_ids.to(device),
            logits_to_keep=keep,
        ).logits
        for r, row in enumerate(batch):
            logprobs = torch.log_softmax(logits[r].float(), dim=-1)  # [keep, vocab]
            for index, cont in rows[row]:
                target = torch.tensor(cont, device=logprobs.device)
                window = logprobs[keep - len(cont) :]
                token_logprobs = window.gather(-1, target[:, None]).squeeze(-1)
                greedy = bool((window.argmax(-1) == target).all())
                results[index] = (float(token_logprobs.sum()), greedy)
    return results


def macro_f1(predictions: Sequence[int], labels: Sequence[int], num_classes: int) -> float:
    """Unweighted mean of per-class F1 (PubMedQA's ``evaluation.py`` reports it next to accuracy).

    >>> macro_f1([0, 1, 1], [0, 1, 2], 3)
    0.5555555555555555
    """
    scores = []
    for c in range(num_classes):
        tp = sum(p == c and y == c for p, y in zip(predictions, labels, strict=True))
        fp = sum(p == c and y != c for p, y in zip(predictions, labels, strict=True))
        fn = sum(p != c and y == c for p, y in zip(predictions, labels, strict=True))
        scores.append(2 * tp / (2 * tp + fp + fn) if tp else 0.0)
    return sum(scores) / num_classes


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=lambda k: (values[k], -k))  # first maximum, like numpy.argmax


def evaluate_multiple_choice(
    task: str,
    items: list[MCItem],
    score: LoglikelihoodFn,
    formulation: str = "cloze",
    num_fewshot: int = 0,
    seed: int = 42,
    pool: list[MCItem] | None = None,
    limit: int | None = None,
) -> tuple[dict[str, float], list[dict[str, Any]]]:
    """Score a multiple-choice task; return ``(metrics, per-item predictions)``.

    Args:
        task: ``medqa``, ``medmcqa``, ``pubmedqa``, ``mmlu_medical`` or ``mc`` (selects the prompt format).
        items: The questions (all of the file: few-shot examples are drawn from them when ``pool`` is empty).
        score: The log-likelihood function, e.g. ``functools.partial(loglikelihood, model, tokenizer)``.
        formulation: ``cloze`` (score option texts) or ``letter`` (list options, score their letters).
        num_fewshot: In-context examples per question.
        seed: Seed of the few-shot draw.
        pool: Few-shot examples to draw from instead of the other items (MMLU's dev split).
        limit: Score only the first ``limit`` items (of each subject, when items have several).

    Returns:
        Metrics ``acc``, ``acc_norm`` and ``n`` (plus ``macro_f1`` for PubMedQA and ``acc.<subject>`` for
        MMLU), ``top_prediction_share`` / ``top_prediction_share_norm`` (the share of items given the most frequent
        prediction by ``acc`` / ``acc_norm``: near 1, the model answers the same option to everything and the
        accuracy is that option's share of the answers; a warning says so), and one dict per item with the log-likelihoods and predictions.
    """
    if formulation not in ("cloze", "letter"):
        raise ValueError(f"formulation must be 'cloze' or 'letter', got {formulation!r}")
    scored = first_items(items, limit)
    requests, spans = [], []
    position = {id(item): index for index, item in enumerate(items)}
    for item in scored:
        shots = sample_fewshot(items, position[id(item)], pool or [], num_fewshot, seed)
        context = build_context(task, item, formulation, shots)
        spans.append((len(requests), len(item.choices)))
        requests.extend((context, " " + choice_text(item, k, formulation)) for k in range(len(item.choices)))
    outputs = score(requests)
    predictions, correct, correct_norm = [], [], []
    by_subject: dict[str, list[bool]] = {}
    for item, (first, n) in zip(scored, spans, strict=True):
        lls = [outputs[first + k][0] for k in range(n)]
        # lm-eval's acc_norm divides by the length in characters of the option string (without the space).
        lengths = [float(len(choice_text(item, k, formulation))) for k in range(n)]
        pred, pred_norm = (
            _argmax(lls),
            _argmax([ll / max(length, 1.0) for ll, length in zip(lls, lengths, strict=True)]),
        )
        correct.append(pred == item.answer)
        correct_norm.append(pred_norm == item.answer)
        if item.subject is not None:
            by_subject.setdefault(item.subject, []).append(pred == item.answer)
        predictions.append(
            {
                "id": item.id,
                "question": item.question,
                "choices": item.choices,
                "answer": LETTERS[item.answer],
                "prediction": LETTERS[pred],
                "prediction_norm": LETTERS[pred_norm],
                "loglikelihoods": lls,
                "correct": pred == item.answer,
                "correct_norm": pred_norm == item.answer,
            }
        )
    n_items = len(scored)
    metrics: dict[str, float] = {
        "acc": sum(correct) / n_items if n_items else math.nan,
        "acc_norm": sum(correct_norm) / n_items if n_items else math.nan,
        "n": n_items,
    }
    for suffix, field in (("", "prediction"), ("_norm", "prediction_norm")):
        if not n_items:
            break
        top, count = Counter(p[field] for p in predictions).most_common(1)[0]
        metrics[f"top_prediction_share{suffix}"] = count / n_items
        if count / n_items > DEGENERATE_SHARE and n_items >= 20:
            logger.warning(
                "%s: the model answers %s to %d of %d items: acc%s %.3f mostly measures how often %s is right "
                "(try the other --formulation)",
                task,
                top,
                count,
                n_items,
                suffix,
                metrics[f"acc{suffix}"],
                top,
            )
    if task == "pubmedqa" and n_items:
        preds = [LETTERS.index(p["prediction"]) for p in predictions]
        metrics["macro_f1"] = macro_f1(preds, [item.answer for item in scored], len(PUBMEDQA_LABELS))
    if len(by_subject) > 1:
        for subject, hits in sorted(by_subject.items()):
            metrics[f"acc.{subject}"] = sum(hits) / len(hits)
    return metrics, predictions
