"""No-grad scoring of response tokens: what stage 1 measures on each checkpoint, and evaluation on held-out data.

`score_checkpoint` gives ``Perp_c(i)``, the perplexity of each example's response tokens given its instruction,
in no-grad batches grouped by length (`length_grouped_batches`). Only the positions that carry loss go through
the LM head, a chunk at a time, through the fused head of training (`response_nll_sums`), so no ``[batch, seq,
vocab]`` tensor is ever built. `sftmix.evaluation.perplexity` scores held-out files with the same code.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import gather_object, is_peft_model
from datasets import Dataset
from tqdm.auto import tqdm
from transformers import PreTrainedModel
from trl.trainer.utils import maybe_gather_lm_head_ctx, pad

from ..data.dataset import IGNORE_INDEX
from ..errors import SFTMixError
from ..head import fused_linear_cross_entropy, lm_head_parameters, lm_head_transform


def length_grouped_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row indices in batches of ``batch_size``, longest first (ties by index), so padding stays minimal.

    >>> length_grouped_batches([3, 9, 5, 9, 1], 2)
    [[1, 3], [2, 0], [4]]
    """
    if batch_size < 1:
        raise SFTMixError(f"scoring_batch_size must be >= 1, got {batch_size}")
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[s : s + batch_size] for s in range(0, len(order), batch_size)]


def response_token_counts(dataset: Dataset) -> np.ndarray:
    """Per example, the number of tokens whose NLL is scored: ``labels[t] != -100`` for ``t >= 1``.

    Position 0 is never predicted (nothing precedes it), as in the shifted SFT loss.
    """
    return np.array(
        [sum(label != IGNORE_INDEX for label in labels[1:]) for labels in dataset["labels"]], dtype=np.int64
    )


class LMHead(NamedTuple):
    """What the fused head needs of a model's output layer, looked up once per model rather than per batch."""

    weight: torch.Tensor
    bias: torch.Tensor | None
    logit_scale: float
    softcap: float | None

    @classmethod
    def of(cls, model: PreTrainedModel) -> LMHead:
        return cls(*lm_head_parameters(model), *lm_head_transform(model))


@torch.no_grad()
def response_nll_sums(
    model: PreTrainedModel,
    input_ids: Sequence[Sequence[int]],
    labels: Sequence[Sequence[int]],
    head: LMHead,
    chunk_size: int,
    device: torch.device,
    pad_token_id: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL of each row's response tokens and their number, for one batch; never builds ``[B, T, V]``.

    Args:
        model: The causal LM (its ``base_model`` gives the last hidden states).
        input_ids: ``B`` rows of token ids, right-padded here to the batch's own longest row.
        labels: The rows' unshifted labels (``-100`` where no loss): ``labels[t]`` is predicted at ``t - 1``.
        head: `LMHead.of` the model.
        chunk_size: Loss positions per LM-head chunk.
        device: Where the model's inputs go.
        pad_token_id: Id of the padding (masked and unlabelled, so its value does not change the result).

    Returns:
        ``[B]`` float64 NLL sums and ``[B]`` int64 token counts, on ``device``.
    """
    input_ids_t = pad([torch.tensor(row, dtype=torch.long) for row in input_ids], pad_token_id).to(device)
    attention_mask = pad([torch.ones(len(row), dtype=torch.long) for row in input_ids]).to(device)
    labels_t = pad([torch.tensor(row, dtype=torch.long) for row in labels], IGNORE_INDEX).to(device)

    if getattr(model, "_sftmix_head", False):  # the model being trained: its own forward, so FSDP hooks run
        out = model(
            input_ids=input_ids_t,
            attention_mask=attention_mask,
            labels=labels_t,
            sftmix={"ntp_weight": 0.0, "chunk_size": chunk_size},
        )
        return out.example_nll_sum.double(), out.example_tokens
    # The backbone's last hidden state is the LM head's input; the head runs on loss positions only.
    hidden = model.base_model(
        input_ids=input_ids_t, attention_mask=attention_mask, use_cache=False
    ).last_hidden_state
    targets = labels_t[:, 1:]
    mask = targets != IGNORE_INDEX
    hidden, targets = hidden[:, :-1][mask], targets[mask]  # [n_tokens, H], [n_tokens]
    example = mask.nonzero()[:, 0]
    # The fused head of training, without gradients: per-token NLL with the model's logit scaling / soft-capping
    weight = head.weight
    with maybe_gather_lm_head_ctx(weight, head.bias):
        nll = fused_linear_cross_entropy(
            hidden.to(weight.device),
            weight,
            targets.to(weight.device),
            torch.ones(len(targets), device=weight.device),
            head.bias,
            chunk_size=chunk_size,
            logit_scale=head.logit_scale,
            softcap=head.softcap,
        ).ce.to(device)
    rows = len(input_ids)
    sums = torch.zeros(rows, dtype=torch.float64, device=device).index_add_(0, example, nll.double())
    return sums, torch.bincount(example, minlength=rows)


def score_checkpoint(
    model: PreTrainedModel,
    dataset: Dataset,
    batch_size: int = 16,
    *,
    chunk_size: int = 1024,
    bf16: bool = False,
    show_progress: bool = True,
    desc: str = "Scoring",
) -> np.ndarray:
    """Perplexity of every example's response given its instruction: ``exp(mean NLL)`` over its loss tokens.

    Args:
        model: A causal LM (``get_output_embeddings`` and ``base_model`` with a ``last_hidden_state``).
            Put it on the device to score on first; it is used in eval mode and left as it was.
        dataset: Rows with ``input_ids`` and unshifted ``labels`` (``-100`` where no loss), as made by
            `sftmix.data.dataset.tokenize_sft_dataset`.
        batch_size: Examples per no-grad forward. Batches are grouped by length (longest first) and padded
            only to their own longest row.
        chunk_size: Loss positions per LM-head chunk: bounds the float32 ``[chunk, vocab]`` logits buffer.
        bf16: Run under bfloat16 autocast (as when the training config sets ``bf16``).
        show_progress: Show a tqdm bar (main process only).
        desc: The progress bar's label.

    Returns:
        ``[N]`` float64 array of perplexities in dataset order. NaN for an example with no scored token.

    Under ``accelerate launch`` each process scores every ``num_processes``-th batch and the results are
    gathered, so every process returns the same array, bit-identical to a single-process run (each example
    is computed in the same batch either way).
    """
    state = PartialState()
    batches = length_grouped_batches([len(ids) for ids in dataset["input_ids"]], batch_size)
    mine = batches[state.process_index :: state.num_processes]
    columns = dataset.select_columns(["input_ids", "labels"])  # read a batch at once, only what is scored
    device = next(model.parameters()).device
    head = LMHead.of(model)
    was_training = model.training
    model.eval()
    results: list[tuple[int, float]] = []
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            for batch in tqdm(mine, desc=desc, disable=not show_progress or not state.is_local_main_process):
                rows = columns[batch]
                sums, counts = response_nll_sums(
                    model, rows["input_ids"], rows["labels"], head, chunk_size, device
                )
                # an example with no scored token gives NaN (0/0)
                perplexities = torch.exp(sums / counts.double()).cpu()
                results.extend(zip(batch, perplexities.tolist(), strict=True))
    finally:
        model.train(was_training)
    if state.num_processes > 1:
        results = gather_object(results)
    perplexities = np.full(len(dataset), np.nan)
    for index, value in results:
        perplexities[index] = value
    return perplexities


def unwrap_for_scoring(model: torch.nn.Module) -> torch.nn.Module:
    """The causal LM to score: the PEFT model's base (its adapters stay active), else the model itself."""
    return model.get_base_model() if is_peft_model(model) else model


def with_training_labels(dataset: Dataset, collator: Callable[[list[dict]], dict]) -> Dataset:
    """``input_ids`` and unshifted ``labels`` of each example exactly as the trainer's collator makes them, so that
    scoring counts the tokens training counts (TRL's ``completion_mask`` / ``assistant_masks``, or sftmix's labels)."""
    columns = [c for c in dataset.column_names if c != "id"]
    input_ids, labels = [], []
    for row in dataset.select_columns(columns):
        batch = collator([row])
        input_ids.append(
            batch["input_ids"][0][batch["attention_mask"][0].bool()].tolist()
            if "attention_mask" in batch
            else batch["input_ids"][0].tolist()
        )
        labels.append(batch["labels"][0][: len(input_ids[-1])].tolist())
    return Dataset.from_dict({"input_ids": input_ids, "labels": labels})


@dataclass(frozen=True)
class ScoringSettings:
    """How a scoring pass runs (`score_checkpoint`'s settings), as the run's config sets them."""

    batch_size: int = 16
    chunk_size: int = 1024
    bf16: bool = False

    @classmethod
    def of(cls, args: Any) -> ScoringSettings:
        """From an `SFTMixConfig` (or any config with ``scoring_batch_size``; head chunk and bf16 if it has them)."""
        return cls(
            args.scoring_batch_size,
            getattr(args, "head_chunk_size", 1024),
            bool(getattr(args, "bf16", False)),
        )

    def score(self, model: PreTrainedModel, dataset: Dataset, desc: str) -> np.ndarray:
        return score_checkpoint(
            model, dataset, self.batch_size, chunk_size=self.chunk_size, bf16=self.bf16, desc=desc
        )
