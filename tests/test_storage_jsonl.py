"""The one JSON Lines reader: gzip by its bytes (read once), errors naming file and line."""

import gzip

import pytest

from reembed.errors import ValidationError
from reembed.storage import Location, json_lines


def test_gz_file_read_through_a_location_is_decompressed_once(tmp_path):
    body = b'{"id": 1, "text": "a"}\n\n{"id": 2, "text": "b"}\n'
    (tmp_path / "q.jsonl.gz").write_bytes(gzip.compress(body))
    (tmp_path / "q.jsonl").write_bytes(body)
    loc = Location.from_uri(str(tmp_path))
    # pyarrow already decompressed the .gz by its extension: the reader must not do it again
    via_location = list(json_lines(loc.read_bytes("q.jsonl.gz"), "q.jsonl.gz"))
    raw = list(json_lines((tmp_path / "q.jsonl.gz").read_bytes(), "q.jsonl.gz"))
    plain = list(json_lines(body, "q.jsonl"))
    assert via_location == raw == plain == [(1, {"id": 1, "text": "a"}), (3, {"id": 2, "text": "b"})]


def test_errors_name_file_and_line():
    with pytest.raises(ValidationError, match=r"q.jsonl:2: not valid JSON"):
        list(json_lines(b'{"a": 1}\n{"a": \n', "q.jsonl", ValidationError))
    with pytest.raises(ValidationError, match=r"q.jsonl:1: expected a JSON object"):
        list(json_lines(b"[1, 2]\n", "q.jsonl", ValidationError))
    with pytest.raises(ValidationError, match=r"q.jsonl:1: not UTF-8"):
        list(json_lines(b'{"a": "\xff"}\n', "q.jsonl", ValidationError))
    with pytest.raises(ValidationError, match=r"q.jsonl.gz: not a readable gzip"):
        list(json_lines(b"\x1f\x8bgarbage", "q.jsonl.gz", ValidationError))
