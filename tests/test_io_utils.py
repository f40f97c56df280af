"""sftmix.io_utils: the one JSON-lines reader every module uses, and its one-line errors."""

from __future__ import annotations

import json

import pytest

from sftmix.errors import SFTMixError
from sftmix.io_utils import atomic_write_jsonl, iter_jsonl, read_jsonl, read_utf8


def test_line_numbers_count_blank_lines_and_line_endings(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"a": 1}\r\n\n   \n{"a": 2}\r{"a": 3}\n')
    assert list(iter_jsonl(path)) == [(1, {"a": 1}), (4, {"a": 2}), (5, {"a": 3})]


def test_unicode_line_separators_inside_strings_stay_in_their_record(tmp_path):
    # json.dumps(..., ensure_ascii=False) writes U+2028 / U+0085 raw; str.splitlines would cut the record there
    rows = [{"text": "one\u2028two"}, {"text": "three\x85four"}]
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    assert read_jsonl(path) == rows


def test_byte_order_mark_and_given_text(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b'\xef\xbb\xbf{"a": 1}\n')
    assert read_jsonl(path) == [{"a": 1}]
    # with the text already read, the file is only named in errors
    assert list(iter_jsonl(tmp_path / "unread.jsonl", '\n{"b": 2}\n')) == [(2, {"b": 2})]


def test_round_trip_with_atomic_write_jsonl(tmp_path):
    rows = [{"id": "x", "perplexities": [1.5, 2.25]}, {"id": "y", "perplexities": [3.0, 4.0]}]
    atomic_write_jsonl(tmp_path / "out.jsonl", rows)
    assert read_jsonl(tmp_path / "out.jsonl") == rows


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ('{"a": 1}\n\n{"a": \n', r"rows\.jsonl: line 3: malformed JSON \(Expecting value\)"),
        ('{"a": 1}\n[1, 2]\n', r"rows\.jsonl: line 2: expected a JSON object, got list"),
        ('"text"\n', r"rows\.jsonl: line 1: expected a JSON object, got str"),
        ("null\n", r"rows\.jsonl: line 1: expected a JSON object, got NoneType"),
    ],
)
def test_bad_lines_are_one_line_errors_naming_file_and_line(tmp_path, content, message):
    path = tmp_path / "rows.jsonl"
    path.write_text(content)
    with pytest.raises(SFTMixError, match=message) as info:
        read_jsonl(path)
    assert "\n" not in str(info.value)


def test_rows_before_a_bad_line_are_yielded_first(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"a": 1}\n{oops}\n')
    records = iter_jsonl(path)
    assert next(records) == (1, {"a": 1})
    with pytest.raises(SFTMixError, match="line 2"):
        next(records)


def test_not_utf8_names_line_and_byte(tmp_path):
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(SFTMixError, match=r"latin1\.jsonl: line 2: not UTF-8 text \(invalid .* at byte 19\)"):
        read_utf8(path)
    # after a byte-order mark, the byte is still counted from the start of the file
    path.write_bytes(b"\xef\xbb\xbf" + b'{"a": 1}\n{"a": "caf\xe9"}\n')
    with pytest.raises(SFTMixError, match=r"line 2: not UTF-8 text \(.* at byte 22\)"):
        read_jsonl(path)
