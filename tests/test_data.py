"""sftmix.data.dataset: formats, stable ids, assistant-only labels, truncation, and one-line errors on bad input."""

from __future__ import annotations

import json
import re

import pytest
from conftest import ASSETS, SHARED_DATA

from sftmix.data.dataset import (
    example_id,
    load_sft_dataset,
    prepare_sft_dataset,
    tokenize_messages,
    tokenize_sft_dataset,
)
from sftmix.errors import SFTMixError
from sftmix.sftmix_config import DataArguments

DATA = ASSETS / "data"
BAD = ASSETS / "bad"


def load(name: str, **kwargs):
    return load_sft_dataset(DataArguments(dataset_name=str(name), **kwargs))


@pytest.mark.parametrize(
    "name, n, first_user",
    [
        ("alpaca.json", 6, "Give three tips for staying healthy."),
        ("alpaca.csv", 6, "Give three tips for staying healthy."),
        ("alpaca.parquet", 6, "Give three tips for staying healthy."),
        ("sharegpt.jsonl", 4, "Hi!"),
        ("messages.jsonl", 4, "What is 3 * 3?"),
        ("prompt_completion.jsonl", 4, "Complete: The quick brown"),
    ],
)
def test_formats_load_as_messages(name, n, first_user):
    ds = load(DATA / name)
    assert len(ds) == n
    first = ds[0]["messages"]
    assert [m["role"] for m in first][-1] == "assistant"
    assert next(m["content"] for m in first if m["role"] == "user") == first_user


def test_alpaca_input_is_appended_to_instruction():
    ds = load(DATA / "alpaca.json")
    assert ds[1]["messages"][0]["content"] == "Translate to French.\n\nGood morning"
    assert ds[1]["messages"][1] == {"role": "assistant", "content": "Bonjour"}


def test_unicode_line_separator_inside_a_jsonl_string(tmp_path):
    # ensure_ascii=False writes U+2028 raw: it is a character of the text, not the end of a JSON line
    record = {"instruction": "Split\u2028here", "input": "", "output": "ok\x85done"}
    path = tmp_path / "data.jsonl"
    path.write_text(json.dumps(record, ensure_ascii=False) + "\n", encoding="utf-8")
    messages = load(path)[0]["messages"]
    assert [m["content"] for m in messages] == ["Split\u2028here", "ok\x85done"]


def test_sharegpt_roles_and_multi_turn():
    ds = load(DATA / "sharegpt.jsonl")
    assert [m["role"] for m in ds[1]["messages"]] == ["system", "user", "assistant", "user", "assistant"]


def test_csv_parquet_json_give_identical_examples():
    ids = [load(DATA / f"alpaca.{ext}")["id"] for ext in ("json", "csv", "parquet")]
    assert ids[0] == ids[1] == ids[2]


def test_declared_format_and_column_mapping():
    ds = load(
        DATA / "alpaca_en_zh.json",
        dataset_columns="instruction=en_instruction,input=en_input,output=en_output",
    )
    assert ds["id"] == load(DATA / "alpaca.json")["id"]
    with pytest.raises(SFTMixError, match="record 1: field .conversations. must be a non-empty list"):
        load(DATA / "alpaca.json", dataset_format="sharegpt")  # declared format wins over detection


def test_ids_stable_under_reordering_and_unique(tmp_path):
    records = json.loads((DATA / "alpaca.json").read_text())
    shuffled = tmp_path / "shuffled.jsonl"
    shuffled.write_text("".join(json.dumps(r) + "\n" for r in reversed(records + records[:1])))
    original = load(DATA / "alpaca.json")
    reordered = load(shuffled)
    assert set(original["id"]) < set(reordered["id"])
    assert len(set(reordered["id"])) == len(reordered)  # the duplicate got a suffix
    assert sum(i.startswith(original["id"][0]) for i in reordered["id"]) == 2
    row = {i: m for i, m in zip(reordered["id"], reordered["messages"], strict=True)}
    for i, m in zip(original["id"], original["messages"], strict=True):
        assert row[i] == m
    assert example_id(original["messages"][0]) == original["id"][0]


def test_system_prompt_and_max_examples():
    ds = load(DATA / "alpaca.json", system_prompt="Be kind.", max_examples=2)
    assert len(ds) == 2
    assert ds[0]["messages"][0] == {"role": "system", "content": "Be kind."}


def test_assistant_only_labels(tokenizer):
    messages = [
        {"role": "user", "content": "a"},
        {"role": "assistant", "content": "bc"},
        {"role": "user", "content": "d"},
        {"role": "assistant", "content": "ef"},
    ]
    out = tokenize_messages(tokenizer, messages)
    assert len(out["input_ids"]) == len(out["labels"])
    learned = tokenizer.decode(
        [t for t, label in zip(out["input_ids"], out["labels"], strict=True) if label != -100]
    )
    # both responses and the end-of-turn token closing each; no prompt, no role header
    assert learned == "bc<|im_end|>ef<|im_end|>"
    # the labels equal the ids where they count (unshifted, like TRL's)
    assert all(label in (-100, t) for t, label in zip(out["input_ids"], out["labels"], strict=True))


def test_truncation_drops_examples_without_response(tokenizer, caplog):
    ds = load(DATA / "alpaca.json")
    full = tokenize_sft_dataset(ds, tokenizer, max_length=None)
    prompt_lengths = [row["labels"].index(next(x for x in row["labels"] if x != -100)) for row in full]
    cut = sorted(prompt_lengths)[2]  # the two shortest prompts keep some response
    short = tokenize_sft_dataset(ds, tokenizer, max_length=cut + 1)
    assert all(len(row["input_ids"]) <= cut + 1 for row in short)
    expected = sum(p < cut + 1 for p in prompt_lengths)
    assert len(short) == expected < len(full)
    assert any("Dropped" in r.message for r in caplog.records)
    kept_end = tokenize_sft_dataset(ds, tokenizer, max_length=cut + 1, truncation_mode="keep_end")
    assert len(kept_end) == len(full)  # the end holds the response


def test_prepare_applies_selection(tokenizer, tmp_path):
    ds = load(DATA / "alpaca.json")
    ids_file = tmp_path / "ids.txt"
    ids_file.write_text("\n".join(ds["id"][:3]) + "\n")
    args = DataArguments(dataset_name=str(DATA / "alpaca.json"), selection=str(ids_file))
    prepared = prepare_sft_dataset(args, tokenizer, max_length=512)
    assert sorted(prepared["id"]) == sorted(ds["id"][:3])


@pytest.mark.parametrize(
    "name, pattern",
    [
        ("malformed.jsonl", r"malformed\.jsonl: line 2: malformed JSON"),
        ("malformed.json", r"malformed\.json: line 3: malformed JSON"),
        ("wrong_type.jsonl", r"wrong_type\.jsonl: line 2: field 'output' must be a string, got int"),
        ("missing_field.jsonl", r"missing_field\.jsonl: line 2: missing field 'output'"),
        ("all_empty.jsonl", r"all_empty\.jsonl: every response is empty"),
        ("empty.jsonl", r"empty\.jsonl: file is empty"),
        ("not_utf8.jsonl", r"not_utf8\.jsonl: line 2: not UTF-8"),
        (
            "unknown_format.jsonl",
            r"unknown_format\.jsonl: line 1: unknown data format \(keys: answer, question\)",
        ),
        ("bad_role.jsonl", r"bad_role\.jsonl: line 1: field 'messages\[0\]\.role': unknown role 'human'"),
        ("bad_speaker.jsonl", r"line 1: field 'conversations\[0\]\.from': unknown speaker 'alien'"),
        ("no_assistant.jsonl", r"no_assistant\.jsonl: line 1: no assistant turn"),
        ("not_object.jsonl", r"not_object\.jsonl: line 1: expected a JSON object, got list"),
    ],
)
def test_bad_inputs_give_one_line_errors(name, pattern):
    with pytest.raises(SFTMixError) as info:
        load(BAD / name)
    message = str(info.value)
    assert "\n" not in message
    assert re.search(pattern, message), message


def test_missing_file_and_bad_format_names():
    with pytest.raises(SFTMixError, match="dataset file not found: ./nope.jsonl"):
        load("./nope.jsonl")
    with pytest.raises(SFTMixError, match="unknown dataset_format 'yaml'"):
        load(DATA / "alpaca.json", dataset_format="yaml")
    with pytest.raises(SFTMixError, match="dataset_columns: expected 'field=column'"):
        load(DATA / "alpaca.json", dataset_columns="instruction")


@pytest.mark.skipif(not (SHARED_DATA / "alpaca_52k_en_zh_parts").is_dir(), reason="shared data not present")
def test_real_alpaca_parts_directory(tokenizer):
    ds = load(
        SHARED_DATA / "alpaca_52k_en_zh_parts",
        dataset_columns="instruction=en_instruction,input=en_input,output=en_output",
        max_examples=50,
    )
    assert len(ds) == 50 and len(set(ds["id"])) == 50
    assert all(m[0]["content"].isascii() for m in ds["messages"][:10])  # the English fields


def test_hub_dataset_name_goes_through_load_dataset(monkeypatch):
    import datasets
    from datasets import Dataset

    calls = {}

    def fake_load_dataset(name, config=None, split=None, **kwargs):
        calls.update(name=name, config=config, split=split)
        return Dataset.from_list(json.loads((DATA / "alpaca.json").read_text()))

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load("tatsu-lab/alpaca", dataset_config="default", dataset_split="train[:10]")
    assert calls == {"name": "tatsu-lab/alpaca", "config": "default", "split": "train[:10]"}
    assert ds["id"] == load(DATA / "alpaca.json")["id"]

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(SFTMixError, match="cannot load dataset 'org/none'.*Couldn't reach the Hub"):
        load("org/none")
