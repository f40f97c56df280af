"""The data layer: read SFT data as users have it and turn it into token ids with assistant-only labels.

The path of an example through this module, top to bottom:

1. `load_sft_dataset` reads a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file (or a directory / glob of
   them) or a Hugging Face Hub dataset, detects the format (Alpaca, ShareGPT, OpenAI messages,
   prompt/completion) and converts every record to chat ``messages``. Every record is checked; the first bad
   one stops the run with a one-line `SFTMixError` naming the file, the line (or row) and the field.
2. Each example gets a stable ``id``: a hash of its messages, so it does not depend on the file order
   (identical duplicates get ``-1``, ``-2``... suffixes in file order).
3. `tokenize_sft_dataset` renders the messages with the tokenizer's chat template and marks the assistant
   tokens (the response text and the end-of-turn token that closes it): ``labels`` is ``-100`` everywhere else,
   so the loss only covers what the assistant says. Sequences longer than ``max_length`` are truncated
   (``keep_start`` keeps the beginning, ``keep_end`` the end, as in TRL); examples whose response is cut away
   entirely are dropped and counted in the log.
"""

from __future__ import annotations

import hashlib
import logging
from typing import Any

import numpy as np
from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from ..errors import SFTMixError
from ..sftmix_config import DATASET_FORMATS, DataArguments
from .records import detect_format, example_id, iter_records, parse_columns, to_messages, with_field_names

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100
"""Label of a position that carries no loss (prompt, padding), as in transformers and TRL."""


def load_sft_dataset(args: DataArguments) -> Dataset:
    """Read ``args.dataset_name`` into a `Dataset` with columns ``id`` and ``messages``.

    Raises:
        SFTMixError: one line naming the file, the line or row and the field of the first bad record, when a
            record is malformed, a field is missing or mistyped, the file is empty or not UTF-8, the format is
            unknown, or every response is empty.
    """
    columns = parse_columns(getattr(args, "dataset_columns", None))
    fmt = args.dataset_format
    if fmt not in DATASET_FORMATS:
        raise SFTMixError(f"unknown dataset_format {fmt!r}; choose one of {', '.join(DATASET_FORMATS)}")
    ids, conversations, seen = [], [], {}
    empty = 0
    for location, record in iter_records(args):
        if fmt == "auto":
            fmt = detect_format(with_field_names(record, columns), location)
        messages = to_messages(record, fmt, location, columns)
        if not any(m["role"] == "assistant" for m in messages):
            raise SFTMixError(f"{location}: no assistant turn to learn from")
        if args.system_prompt and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": args.system_prompt}] + messages
        if not any(m["role"] == "assistant" and m["content"].strip() for m in messages):
            empty += 1
            continue
        base = example_id(messages)
        n = seen.get(base, 0)
        seen[base] = n + 1
        ids.append(base if n == 0 else f"{base}-{n}")
        conversations.append(messages)
        if args.max_examples is not None and len(ids) >= args.max_examples:
            break
    if not ids:
        raise SFTMixError(f"{args.dataset_name}: every response is empty: nothing to train on")
    if empty:
        logger.warning("Dropped %d examples whose responses are all empty", empty)
    logger.info("Loaded %d examples (%s format) from %s", len(ids), fmt, args.dataset_name)
    return Dataset.from_dict({"id": ids, "messages": conversations})


def assistant_char_spans(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> tuple[str, list[tuple[int, int]]]:
    """Render ``messages`` with the chat template; return the text and the character spans of assistant turns.

    A span covers the response text and the end-of-turn marker the template puts after it (what the model must
    learn to emit to stop), not the role header before it. Spans come from rendering the conversation up to each
    assistant turn with and without it, which works for any template that renders earlier turns the same way
    whatever follows them (all common ones do). When a template does not, the response text is searched for in the
    full rendering instead.
    """
    text = tokenizer.apply_chat_template(messages, tokenize=False)
    spans = []
    search_from = 0
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = (
            tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            if i
            else ""
        )
        upto = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if i and text.startswith(upto) and upto.startswith(prefix):
            start, end = len(prefix), len(upto.rstrip())
        else:
            start = text.find(message["content"], search_from)
            if start < 0:
                raise SFTMixError(
                    "the chat template does not reproduce the assistant text; cannot mask the prompt"
                )
            end = start + len(message["content"])
            if tokenizer.eos_token and text.startswith(tokenizer.eos_token, end):
                end += len(tokenizer.eos_token)
        spans.append((start, max(start, end)))
        search_from = end
    return text, spans


def tokenize_messages(
    tokenizer: PreTrainedTokenizerBase, messages: list[dict[str, str]]
) -> dict[str, list[int]]:
    """Token ids of the rendered conversation and labels that are ``-100`` outside assistant spans."""
    text, spans = assistant_char_spans(tokenizer, messages)
    encoding = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    input_ids = encoding["input_ids"]
    labels = [IGNORE_INDEX] * len(input_ids)
    for k, (tok_start, tok_end) in enumerate(encoding["offset_mapping"]):
        if tok_end > tok_start and any(s <= tok_start and tok_end <= e for s, e in spans):
            labels[k] = input_ids[k]
    return {"input_ids": input_ids, "labels": labels}


def truncate(
    example: dict[str, list[int]], max_length: int | None, mode: str = "keep_start"
) -> dict[str, list[int]]:
    """Cut ``input_ids`` and ``labels`` to ``max_length`` tokens, keeping the start or the end (TRL's modes)."""
    if max_length is None or len(example["input_ids"]) <= max_length:
        return example
    if mode == "keep_start":
        sl = slice(None, max_length)
    elif mode == "keep_end":
        sl = slice(-max_length, None)
    else:
        raise SFTMixError(f"unknown truncation_mode {mode!r}: use keep_start or keep_end")
    return {"input_ids": example["input_ids"][sl], "labels": example["labels"][sl]}


def tokenize_sft_dataset(
    dataset: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    truncation_mode: str = "keep_start",
    num_proc: int | None = None,
) -> Dataset:
    """Turn an ``id``/``messages`` dataset into ``id``/``input_ids``/``labels`` (assistant-only, unshifted).

    Truncates to ``max_length`` (``keep_start`` or ``keep_end``) and drops the examples that have no response
    token left, logging how many. The result is what `trl.SFTTrainer` trains on as is (it skips its own
    tokenisation when ``input_ids`` exist).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise SFTMixError("sftmix needs a fast tokenizer (offset mapping) to mask prompts")

    def _tokenize(example: dict[str, Any]) -> dict[str, list[int]]:
        return truncate(tokenize_messages(tokenizer, example["messages"]), max_length, truncation_mode)

    tokenized = dataset.map(_tokenize, remove_columns=["messages"], num_proc=num_proc, desc="Tokenizing")
    kept = tokenized.filter(lambda ex: any(t != IGNORE_INDEX for t in ex["labels"]), num_proc=num_proc)
    dropped = len(tokenized) - len(kept)
    if dropped:
        logger.warning(
            "Dropped %d of %d examples whose response was cut away entirely by max_length=%s",
            dropped,
            len(tokenized),
            max_length,
        )
    if len(kept) == 0:
        raise SFTMixError(f"no example has a response token within max_length={max_length}")
    return kept


def prepare_sft_dataset(
    data_args: DataArguments,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int | None,
    truncation_mode: str = "keep_start",
) -> Dataset:
    """The whole data path every stage uses: load and check, select (``data_args.selection``), tokenise."""
    dataset = load_sft_dataset(data_args)
    if data_args.selection:
        from .selection import apply_selection

        dataset = apply_selection(dataset, data_args.selection, tokenizer=tokenizer)
    return tokenize_sft_dataset(dataset, tokenizer, max_length, truncation_mode)


def dataset_fingerprint(dataset: Dataset) -> str:
    """SHA-256 (16 hex digits) of the ids, token ids and labels, in order: what a scores file was made from."""
    digest = hashlib.sha256()
    for row_id, ids, labels in zip(dataset["id"], dataset["input_ids"], dataset["labels"], strict=True):
        digest.update(row_id.encode())
        digest.update(np.asarray(ids, dtype=np.int64).tobytes())
        digest.update(np.asarray(labels, dtype=np.int64).tobytes())
        digest.update(b"\n")
    return digest.hexdigest()[:16]


def content_id(row: dict[str, Any]) -> str:
    """`example_id` of a row of any dataset `trl.SFTTrainer` accepts: conversational ``messages``,
    prompt/completion (strings or message lists) as `load_sft_dataset` converts them, so a dynamics file of
    the CLI matches the same data loaded from Python; plain ``text``; or already tokenized ``input_ids``."""
    if "messages" in row:
        return example_id(row["messages"])
    if "prompt" in row and "completion" in row:
        return example_id(to_messages(row, "prompt_completion", "dataset row", {}))
    if "text" in row:
        return example_id([{"role": "text", "content": row["text"]}])
    if "input_ids" in row:
        return hashlib.sha256(np.asarray(row["input_ids"], dtype=np.int64).tobytes()).hexdigest()[:16]
    raise SFTMixError(f"cannot derive example ids from the columns {sorted(row)}: add an 'id' column")


def with_content_ids(dataset: Dataset) -> Dataset:
    """``dataset`` with an ``id`` column from the content (`content_id`; duplicates get ``-1``, ``-2``... in
    order, as `load_sft_dataset` does), unless it has one."""
    if "id" in dataset.column_names:
        return dataset
    ids, seen = [], {}
    for row in dataset:
        base = content_id(row)
        ids.append(base if base not in seen else f"{base}-{seen[base]}")
        seen[base] = seen.get(base, 0) + 1
    return dataset.add_column("id", ids)
