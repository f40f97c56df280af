"""Raw SFT records as users have them, and their conversion to chat messages (used by `sftmix.data.dataset`).

`iter_records` reads a local ``.json``/``.jsonl``/``.parquet``/``.csv`` file (or a directory / glob of them) or
a Hugging Face Hub dataset and yields every record with its location (file and line, or row) for errors;
`detect_format` recognises Alpaca, ShareGPT, OpenAI messages and prompt/completion records; `to_messages`
converts one to ``{"role", "content"}`` messages, and `example_id` hashes them into the example's stable id.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import datasets

from ..errors import SFTMixError
from ..io_utils import iter_jsonl, read_utf8
from ..sftmix_config import DATASET_FORMATS, DataArguments

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
    if path.stat().st_size == 0:
        raise SFTMixError(f"{path}: file is empty")
    if path.suffix == ".csv":
        _read_text(path)  # UTF-8 and emptiness checks with a line number
    try:
        table = datasets.load_dataset(path.suffix.lstrip("."), data_files=str(path), split="train")
    except Exception as e:  # Arrow/pandas raise many types; the message is what the user needs
        raise SFTMixError(f"{path}: cannot read as {path.suffix}: {str(e).splitlines()[0]}") from e
    if len(table) == 0:
        raise SFTMixError(f"{path}: holds no records")
    offset = 2 if path.suffix == ".csv" else 1
    for i, record in enumerate(table):
        yield f"{path}: {'line' if path.suffix == '.csv' else 'row'} {i + offset}", record


def _read_hub_records(args: DataArguments) -> Iterator[tuple[str, Any]]:
    try:
        table = datasets.load_dataset(args.dataset_name, args.dataset_config, split=args.dataset_split)
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


def with_field_names(record: Any, columns: dict[str, str]) -> Any:
    """The record with user columns renamed to the fields they stand for (``en_output`` -> ``output``)."""
    if not columns or not isinstance(record, dict):
        return record
    inverse = {column: key for key, column in columns.items()}
    return {inverse.get(k, k): v for k, v in record.items()}
