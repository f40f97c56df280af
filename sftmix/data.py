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

import glob
import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from datasets import Dataset
from transformers import PreTrainedTokenizerBase

from .errors import SFTMixError
from .io_utils import iter_jsonl, read_utf8
from .sftmix_config import DATASET_FORMATS, DataArguments

logger = logging.getLogger(__name__)

LOCAL_SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")
SHAREGPT_ROLES = {
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
    "bard": "assistant",
    "bing": "assistant",
    "model": "assistant",
    "system": "system",
}
MESSAGE_ROLES = {"system", "user", "assistant"}


# ---------------------------------------------------------------------------------------------------------
# 1. Reading records


def _local_files(name: str) -> list[Path] | None:
    """The local data files ``name`` stands for (a file, a directory or a glob), or None for a Hub name."""
    path = Path(name).expanduser()
    if path.is_file():
        return [path]
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix in LOCAL_SUFFIXES and p.is_file())
        if not files:
            raise SFTMixError(f"{name}: directory holds no {'/'.join(LOCAL_SUFFIXES)} file")
        return files
    if any(ch in name for ch in "*?["):
        files = sorted(
            Path(p) for p in glob.glob(os.path.expanduser(name)) if Path(p).suffix in LOCAL_SUFFIXES
        )
        if not files:
            raise SFTMixError(f"{name}: no data file matches this pattern")
        return files
    if path.suffix in LOCAL_SUFFIXES or name.startswith((".", "/", "~")):
        raise SFTMixError(f"dataset file not found: {name}")
    return None


def _read_text(path: Path) -> str:
    text = read_utf8(path)
    if not text.strip():
        raise SFTMixError(f"{path}: file is empty")
    return text


def _read_json_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Yield (location, record) from a JSON array file or a JSON-lines file."""
    text = _read_text(path)
    if path.suffix == ".json" and text.lstrip().startswith(("[", "{")):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            if text.lstrip().startswith("{") and "\n{" in text:  # JSON lines in a .json file
                yield from _read_jsonl_records(path, text)
                return
            raise SFTMixError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from e
        if isinstance(data, dict):  # {"data": [...]} / {"train": [...]} wrappers
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise SFTMixError(f"{path}: expected a JSON list of records (or JSON lines)")
            data = lists[0]
        if not isinstance(data, list):
            raise SFTMixError(f"{path}: expected a JSON list of records (or JSON lines)")
        if not data:
            raise SFTMixError(f"{path}: holds no records")
        for i, record in enumerate(data):
            yield f"{path}: record {i + 1}", record
    else:
        yield from _read_jsonl_records(path, text)


def _read_jsonl_records(path: Path, text: str) -> Iterator[tuple[str, Any]]:
    for lineno, record in iter_jsonl(path, text):
        yield f"{path}: line {lineno}", record


def _read_table_records(path: Path) -> Iterator[tuple[str, Any]]:
    """Parquet and CSV through `datasets` (Arrow); rows are reported 1-based (CSV: file line numbers)."""
    from datasets import load_dataset

    if path.stat().st_size == 0:
        raise SFTMixError(f"{path}: file is empty")
    if path.suffix == ".csv":
        _read_text(path)  # UTF-8 and emptiness checks with a line number
    try:
        table = load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    except Exception as e:  # Arrow/pandas raise many types; the message is what the user needs
        raise SFTMixError(f"{path}: cannot read as {path.suffix}: {str(e).splitlines()[0]}") from e
    if len(table) == 0:
        raise SFTMixError(f"{path}: holds no records")
    offset = 2 if path.suffix == ".csv" else 1
    for i, record in enumerate(table):
        yield f"{path}: {'line' if path.suffix == '.csv' else 'row'} {i + offset}", record


def _read_hub_records(args: DataArguments) -> Iterator[tuple[str, Any]]:
    from datasets import load_dataset

    try:
        table = load_dataset(args.dataset_name, args.dataset_config, split=args.dataset_split)
    except Exception as e:
        raise SFTMixError(
            f"cannot load dataset {args.dataset_name!r} (not a local file; as a Hub dataset: "
            f"{str(e).splitlines()[0] if str(e) else type(e).__name__})"
        ) from e
    for i, record in enumerate(table):
        yield f"{args.dataset_name}: row {i}", record


def iter_records(args: DataArguments) -> Iterator[tuple[str, Any]]:
    """Yield ``(location, record)`` for every raw record; location names the file and line for errors."""
    if not args.dataset_name:
        raise SFTMixError("dataset_name is not set: give a local data file or a Hub dataset name")
    files = _local_files(args.dataset_name)
    if files is None:
        yield from _read_hub_records(args)
        return
    for path in files:
        reader = _read_table_records if path.suffix in (".parquet", ".csv") else _read_json_records
        yield from reader(path)


# ---------------------------------------------------------------------------------------------------------
# 2. Formats -> chat messages


def parse_columns(spec: str | None) -> dict[str, str]:
    """Parse ``dataset_columns`` (``"instruction=en_instruction,output=en_output"``) into a mapping."""
    if not spec:
        return {}
    mapping = {}
    for item in spec.split(","):
        key, sep, column = item.partition("=")
        if not sep or not key.strip() or not column.strip():
            raise SFTMixError(f"dataset_columns: expected 'field=column' items, got {item!r}")
        mapping[key.strip()] = column.strip()
    return mapping


def detect_format(record: dict[str, Any], location: str) -> str:
    """Guess the data format from the keys of the first record."""
    if not isinstance(record, dict):
        raise SFTMixError(f"{location}: expected a JSON object, got {type(record).__name__}")
    if "messages" in record:
        return "messages"
    if "conversations" in record:
        conv = record["conversations"]
        if isinstance(conv, list) and conv and isinstance(conv[0], dict) and "role" in conv[0]:
            return "messages"
        return "sharegpt"
    if "prompt" in record and "completion" in record:
        return "prompt_completion"
    if "instruction" in record and "output" in record:
        return "alpaca"
    raise SFTMixError(
        f"{location}: unknown data format (keys: {', '.join(sorted(record)) or 'none'}); expected Alpaca "
        "(instruction/input/output), ShareGPT (conversations), messages, or prompt/completion; set "
        "dataset_format and dataset_columns to map other names"
    )


def _text(record: dict[str, Any], key: str, location: str, required: bool = True) -> str:
    if key not in record or record[key] is None:
        if required:
            raise SFTMixError(f"{location}: missing field '{key}'")
        return ""
    value = record[key]
    if not isinstance(value, str):
        raise SFTMixError(f"{location}: field '{key}' must be a string, got {type(value).__name__}")
    return value


def _turns(value: Any, field: str, location: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise SFTMixError(f"{location}: field '{field}' must be a non-empty list of turns")
    turns = []
    for k, turn in enumerate(value):
        where = f"{location}: field '{field}[{k}]'"
        if not isinstance(turn, dict):
            raise SFTMixError(f"{where} must be an object with '{role_key}' and '{content_key}'")
        if role_key not in turn:
            raise SFTMixError(f"{where}: missing '{role_key}'")
        if content_key not in turn or not isinstance(turn[content_key], str):
            raise SFTMixError(f"{where}: '{content_key}' must be a string")
        turns.append({"role": turn[role_key], "content": turn[content_key]})
    return turns


def to_messages(record: Any, fmt: str, location: str, columns: dict[str, str]) -> list[dict[str, str]]:
    """Convert one raw record in format ``fmt`` to a list of ``{"role", "content"}`` chat messages."""
    if not isinstance(record, dict):
        raise SFTMixError(f"{location}: expected a JSON object, got {type(record).__name__}")
    col = {k: columns.get(k, k) for k in ("instruction", "input", "output", "system", "prompt", "completion")}
    if fmt == "alpaca":
        instruction = _text(record, col["instruction"], location)
        extra = _text(record, col["input"], location, required=False)
        prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        messages = [
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": _text(record, col["output"], location)},
        ]
        system = _text(record, col["system"], location, required=False)
        return ([{"role": "system", "content": system}] if system else []) + messages
    if fmt == "prompt_completion":
        prompt, completion = record.get(col["prompt"]), record.get(col["completion"])
        if isinstance(prompt, list) or isinstance(completion, list):  # conversational prompt/completion
            return _turns(prompt, col["prompt"], location, "role", "content") + _turns(
                completion, col["completion"], location, "role", "content"
            )
        return [
            {"role": "user", "content": _text(record, col["prompt"], location)},
            {"role": "assistant", "content": _text(record, col["completion"], location)},
        ]
    if fmt == "sharegpt":
        field = columns.get("conversations", "conversations")
        turns = _turns(record.get(field), field, location, "from", "value")
        for k, turn in enumerate(turns):
            role = SHAREGPT_ROLES.get(str(turn["role"]).lower())
            if role is None:
                raise SFTMixError(f"{location}: field '{field}[{k}].from': unknown speaker {turn['role']!r}")
            turn["role"] = role
        return turns
    if fmt == "messages":
        field = columns.get("messages", "messages" if "messages" in record else "conversations")
        turns = _turns(record.get(field), field, location, "role", "content")
        for k, turn in enumerate(turns):
            if turn["role"] not in MESSAGE_ROLES:
                raise SFTMixError(f"{location}: field '{field}[{k}].role': unknown role {turn['role']!r}")
        return turns
    raise SFTMixError(f"unknown dataset_format {fmt!r}; choose one of {', '.join(DATASET_FORMATS)}")


def example_id(messages: list[dict[str, str]]) -> str:
    """A stable id from the example's content: the first 16 hex digits of the SHA-256 of its messages.

    >>> example_id([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}])
    '99c87cbcecd18c34'
    """
    canonical = json.dumps(
        [[m["role"], m["content"]] for m in messages], ensure_ascii=False, separators=(",", ":")
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()[:16]


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
            fmt = detect_format(_with_field_names(record, columns), location)
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


def _with_field_names(record: Any, columns: dict[str, str]) -> Any:
    """The record with user columns renamed to the fields they stand for (``en_output`` -> ``output``)."""
    if not columns or not isinstance(record, dict):
        return record
    inverse = {column: key for key, column in columns.items()}
    return {inverse.get(k, k): v for k, v in record.items()}


# ---------------------------------------------------------------------------------------------------------
# 3. Tokenisation with assistant-only labels


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
    labels = [-100] * len(input_ids)
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
    kept = tokenized.filter(lambda ex: any(t != -100 for t in ex["labels"]), num_proc=num_proc)
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
