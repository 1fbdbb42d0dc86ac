"""The read stage without Ray: dead-letter marking (read._mark), per-row text checks, and the one list of
reason codes (schema.REASONS) that every emitted reason belongs to."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import write_jsonl
from input_fixtures import outcome, plan_and_read
from reembed import schema as S
from reembed.errors import InputError
from reembed.read import _mark

SRC = Path(__file__).resolve().parents[1] / "src" / "reembed"


def docs_table(ids: list, texts: list) -> pa.Table:
    n = len(ids)
    return pa.table({S.ID: pa.array(ids, pa.string()), S.TEXT: pa.array(texts, pa.string()),
                     S.REASON: pa.nulls(n, pa.string())})


def reasons(table: pa.Table) -> list:
    return table.column(S.REASON).to_pylist()


def test_mark_nulls_blanks_and_duplicates():
    t = docs_table(["a", None, "c", "d", "e", "f"], ["x", "y", None, "", " \t\n", "z"])
    marked = _mark(t, dup_rows=set(), seg={"start": 0, "stop": 6})
    assert reasons(marked) == [None, "null_id", "null_text", "empty_text", "empty_text", None]

    # Duplicate rows are indexes within the file; this segment holds file rows 10-15.
    marked = _mark(t, dup_rows={3, 10, 15, 16}, seg={"start": 10, "stop": 16})
    assert reasons(marked) == ["duplicate_id", "null_id", "null_text", "empty_text", "empty_text", "duplicate_id"]


def test_mark_takes_the_first_reason_in_precedence_order():
    # Row 0: unreadable line (everything else is missing too). Row 1: invalid id and invalid text.
    # Row 2: a duplicate with a null text. Row 3: an invalid text (nulled by the reader). Row 4: fine.
    t = docs_table([None, None, "dup", "d", "e"], [None, None, None, None, "ok"])
    flags = {
        S.INVALID_JSON: np.array([True, False, False, False, False]),
        S.INVALID_ID: np.array([False, True, False, False, False]),
        S.INVALID_TEXT: np.array([False, True, False, True, False]),
    }
    marked = _mark(t, {2}, {"start": 0, "stop": 5}, flags)
    assert reasons(marked) == ["invalid_json", "invalid_id", "duplicate_id", "invalid_text", None]
    assert list(S.REASONS).index("invalid_json") < list(S.REASONS).index("null_id")


def test_mark_refuses_a_reason_that_is_not_in_the_list():
    t = docs_table(["a"], ["x"])
    with pytest.raises(ValueError, match="schema.REASONS"):
        _mark(t, set(), {"start": 0, "stop": 1}, {"too_long": np.array([True])})


def test_one_bad_utf8_value_in_a_binary_text_column_dead_letters_only_its_row(tmp_path):
    texts = [b"first", "caf\xc3\xa9".encode("latin-1"), b"\xff\xfe not utf-8", None, b"", b"last"]
    pq.write_table(pa.table({"id": ["a", "b", "c", "d", "e", "f"], "text": pa.array(texts, pa.binary())}),
                   tmp_path / "a.parquet")
    _, docs = plan_and_read(tmp_path, shard_rows=4)
    assert outcome(docs) == [("a", None), ("b", None), ("c", "invalid_text"), ("d", "null_text"),
                             ("e", "empty_text"), ("f", None)]
    assert docs.column(S.TEXT).to_pylist()[:2] == ["first", "café"]
    assert docs.column(S.SOURCE_ROW).to_pylist() == [0, 1, 2, 3, 4, 5]


def test_json_lines_rows_are_checked_one_by_one(tmp_path):
    path = tmp_path / "a.jsonl"
    path.write_bytes(b'{"id": "a", "text": "fine"}\n'
                     b'{"id": "b", "text": "\xff not utf-8"}\n'
                     b'\n'
                     b'{"id": "c", "text": 42}\n'
                     b'[1, 2]\n'
                     b'{"id": "d", "text": ["x"]}\n'
                     b'{"id": "e"}\n'
                     b'{"id": "f", "text": "   "}\n')
    _, docs = plan_and_read(tmp_path, shard_rows=3)
    assert outcome(docs) == [("a", None), (None, "invalid_json"), ("c", "invalid_text"), (None, "invalid_json"),
                             ("d", "invalid_text"), ("e", "null_text"), ("f", "empty_text")]
    # source rows are 0-based line numbers: the blank line 2 is not a document
    assert docs.column(S.SOURCE_ROW).to_pylist() == [0, 1, 3, 4, 5, 6, 7]


def test_every_reason_the_code_emits_is_in_reasons_and_every_listed_reason_is_emitted(tmp_path):
    pq.write_table(pa.table({"id": pa.array([1.0, float("nan"), None, 1.0, 2.0, 3.0, 4.0, 5.0]),
                             "text": pa.array([b"a", b"b", b"c", b"d", b"\xff", None, b" ", b"ok"])}),
                   tmp_path / "a.parquet")
    write_jsonl(tmp_path / "b.jsonl", ["{broken", {"id": 9, "text": 9}, {"id": 10, "text": "fine"}])
    _, docs = plan_and_read(tmp_path, shard_rows=3)
    emitted = {r for r in reasons(docs) if r is not None}
    assert emitted == set(S.REASONS)

    # And no reason code is spelled out as a string anywhere but schema.py: the code uses only the constants.
    for module in sorted(SRC.rglob("*.py")):
        if module.name == "schema.py":
            continue
        text = module.read_text()
        for code in S.REASONS:
            assert not re.search(rf"[\"']{code}[\"']", text), f"{module} spells out {code!r}; use schema's constant"


def test_a_passthrough_value_of_another_type_in_the_sampled_rows_names_its_line(tmp_path):
    rows = [{"id": f"d{i}", "text": "x", "n": i} for i in range(5)]
    write_jsonl(tmp_path / "a.jsonl", rows[:4] + [{"id": "d4", "text": "x", "n": "four"}])
    with pytest.raises(InputError, match=r"a\.jsonl: passthrough column 'n' mixes types \(line 4: 'four', after 0\)"):
        plan_and_read(tmp_path, shard_rows=10, passthrough=("n",))


def test_a_passthrough_value_of_another_type_after_the_sampled_rows_names_its_line(tmp_path):
    rows = [{"id": f"d{i}", "text": "x", "n": i} for i in range(1200)]
    rows[1100]["n"] = "eleven hundred"  # past the 1,000 rows the plan infers the column's type from
    write_jsonl(tmp_path / "a.jsonl", rows)
    with pytest.raises(InputError, match=r"a\.jsonl: passthrough column 'n' does not fit type int64 "
                                         r"\(line 1100: 'eleven hundred'\)"):
        plan_and_read(tmp_path, shard_rows=2000, passthrough=("n",))


def test_a_passed_through_text_column_does_not_turn_a_bad_text_into_a_type_clash(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"id": "a", "text": "fine", "lang": "en"}, {"id": "b", "text": {"x": 1}, "lang": "fr"},
                                       {"id": "c", "text": 7, "lang": "de"}])
    _, docs = plan_and_read(tmp_path, shard_rows=2, passthrough=("text", "lang"))
    assert outcome(docs) == [("a", None), ("b", "invalid_text"), ("c", "invalid_text")]
    assert docs.column("text").to_pylist() == ["fine", None, None] and docs.column("lang").to_pylist() == ["en", "fr", "de"]
