"""Data selection before stage 1: ``longest:N`` and files of example ids."""

from __future__ import annotations

import doctest
import json

import pytest
from datasets import Dataset

import sftmix.data.selection as selection
from sftmix.data.selection import apply_selection, response_lengths
from sftmix.errors import SFTMixError


def _dataset(responses: list[str | list[str]]) -> Dataset:
    rows = []
    for k, response in enumerate(responses):
        turns = [response] if isinstance(response, str) else response
        messages = []
        for t, text in enumerate(turns):
            messages += [
                {"role": "user", "content": f"question {k}.{t}"},
                {"role": "assistant", "content": text},
            ]
        rows.append(messages)
    return Dataset.from_dict({"id": [f"id{k}" for k in range(len(rows))], "messages": rows})


def test_docstring_examples():
    assert doctest.testmod(selection).failed == 0


def test_no_selection_keeps_everything():
    ds = _dataset(["a", "b"])
    assert apply_selection(ds, None)["id"] == ["id0", "id1"]
    assert apply_selection(ds, "")["id"] == ["id0", "id1"]


def test_longest_counts_all_assistant_turns_and_keeps_order():
    # id1 has two short turns that add up to the longest response; ties keep the earlier example.
    ds = _dataset(["abcd", ["abc", "abc"], "ab", "abcd", "a"])
    assert response_lengths(ds) == [4, 6, 2, 4, 1]
    assert apply_selection(ds, "longest:2")["id"] == ["id0", "id1"]
    assert apply_selection(ds, "longest:3")["id"] == ["id0", "id1", "id3"]
    assert apply_selection(ds, "longest:99")["id"] == [f"id{k}" for k in range(5)]


def test_longest_in_tokens(tokenizer):
    # The tiny tokenizer is character-level but merges nothing: use its own counts as the reference.
    ds = _dataset(["hello world", "hi", "a b c d e f"])
    expected = [
        len(tokenizer(m[1]["content"], add_special_tokens=False)["input_ids"]) for m in ds["messages"]
    ]
    assert response_lengths(ds, tokenizer) == expected
    longest = max(range(3), key=lambda i: (expected[i], -i))
    assert apply_selection(ds, "longest:1", tokenizer=tokenizer)["id"] == [f"id{longest}"]


@pytest.mark.parametrize("spec", ["longest:", "longest:0", "longest:-3", "longest:x", "longest:1.5"])
def test_bad_longest_spec(spec):
    with pytest.raises(SFTMixError, match="longest:N"):
        apply_selection(_dataset(["a"]), spec)


def test_id_file_lines(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("# AlpaGasus-filtered ids\nid3\n\n  id1  \nid3  # listed twice\n")
    assert apply_selection(_dataset(["a", "b", "c", "d"]), str(path))["id"] == ["id1", "id3"]


def test_id_file_json(tmp_path):
    path = tmp_path / "keep.json"
    path.write_text(json.dumps(["id2", "id0"]))
    assert apply_selection(_dataset(["a", "b", "c"]), str(path))["id"] == ["id0", "id2"]


def test_unknown_id_names_file_and_line(tmp_path):
    path = tmp_path / "keep.txt"
    path.write_text("id0\nid1\nnope\n")
    with pytest.raises(SFTMixError, match=r"keep.txt: line 3: unknown example id 'nope'"):
        apply_selection(_dataset(["a", "b"]), str(path))
    path = tmp_path / "keep.json"
    path.write_text('["id0", "nope"]')
    with pytest.raises(SFTMixError, match=r"keep.json: item 2: unknown example id 'nope'"):
        apply_selection(_dataset(["a", "b"]), str(path))


def test_bad_id_files(tmp_path):
    with pytest.raises(SFTMixError, match="expected longest:N, drop_unconfident:F or an existing file"):
        apply_selection(_dataset(["a"]), str(tmp_path / "missing.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("# nothing\n\n")
    with pytest.raises(SFTMixError, match="lists no example id"):
        apply_selection(_dataset(["a"]), str(empty))
    broken = tmp_path / "broken.json"
    broken.write_text('[\n"id0",\n')
    with pytest.raises(SFTMixError, match=r"broken.json: line \d+: malformed JSON"):
        apply_selection(_dataset(["a"]), str(broken))
    not_ids = tmp_path / "numbers.json"
    not_ids.write_text("[1, 2]")
    with pytest.raises(SFTMixError, match="item 1 of the JSON list is not an id"):
        apply_selection(_dataset(["a"]), str(not_ids))


# ---- drop_unconfident: data cleaning with the data map (applied after stage 1) ---------------------------------
def _dynamics(path, confidences: dict[str, float]):
    rows = [{"id": i, "confidence": c, "split": "confident"} for i, c in confidences.items()]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fraction, kept", [(0.25, ["id0", "id2", "id3"]), (0.5, ["id0", "id2"])])
def test_drop_unconfident_drops_the_least_confident_and_keeps_order(tmp_path, fraction, kept):
    from sftmix.stage1.splits import drop_unconfident

    ds = _dataset(["a", "b", "c", "d"])
    path = _dynamics(
        tmp_path / "d.jsonl", {"id0": -1.0, "id1": -9.0, "id2": -0.5, "id3": -3.0, "extra": -0.1}
    )
    assert list(drop_unconfident(ds, fraction, path)["id"]) == kept


def test_drop_unconfident_ties_drop_the_later_example(tmp_path):
    from sftmix.stage1.splits import drop_unconfident

    path = _dynamics(tmp_path / "d.jsonl", {"id0": -2.0, "id1": -2.0, "id2": -2.0, "id3": -1.0})
    assert list(drop_unconfident(_dataset(["a"] * 4), 0.5, path)["id"]) == ["id0", "id3"]


def test_drop_unconfident_with_other_data_is_one_line(tmp_path):
    from sftmix.stage1.splits import drop_unconfident

    ds = _dataset(["a", "b"])
    with pytest.raises(SFTMixError, match="is for another dataset"):
        drop_unconfident(ds, 0.5, _dynamics(tmp_path / "o.jsonl", {"x": -1.0, "y": -2.0}))
    with pytest.raises(SFTMixError, match="no entry for 1 of the 2"):
        drop_unconfident(ds, 0.5, _dynamics(tmp_path / "p.jsonl", {"id0": -1.0}))
    no_confidence = tmp_path / "s.jsonl"
    no_confidence.write_text('{"id": "id0", "split": "confident"}\n{"id": "id1", "split": "unconfident"}\n')
    with pytest.raises(SFTMixError, match="s.jsonl: line 1: missing field 'confidence'"):
        drop_unconfident(ds, 0.5, no_confidence)


@pytest.mark.parametrize(
    "spec", ["drop_unconfident:", "drop_unconfident:0", "drop_unconfident:1", "drop_unconfident:x"]
)
def test_bad_drop_unconfident_specs(spec):
    with pytest.raises(SFTMixError, match="expected drop_unconfident:F with F a fraction between 0 and 1"):
        apply_selection(_dataset(["a"]), spec)


def test_stage1_resplits_what_the_drop_keeps(tmp_path):
    """With Mixup after a drop, the halves are the kept examples' own median split, not the file's."""
    from sftmix.stage1.splits import read_dynamics_splits

    path = _dynamics(tmp_path / "d.jsonl", {"id0": -1.0, "id1": -9.0, "id2": -0.5, "id3": -3.0})
    assert read_dynamics_splits(path, among=["id0", "id2", "id3"]) == {
        "id0": False,
        "id2": True,
        "id3": False,
    }
    assert read_dynamics_splits(path, among=["id0", "id2"]) == {"id2": True, "id0": False}
