"""One canonical string per id, whatever the input format: integers and integral floats -> "7", other
floats -> their shortest repr, strings unchanged; NaN and infinities are dead-lettered as invalid_id."""

from __future__ import annotations

import math
from decimal import Decimal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from input_fixtures import outcome, plan_and_read
from reembed import schema as S


def test_parquet_int64_float64_and_json_numbers_name_the_same_documents(tmp_path):
    pq.write_table(pa.table({"id": pa.array([1, 2, -3], pa.int64()), "text": ["a", "b", "c"]}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": pa.array([1.0, 4.0, 0.5], pa.float64()), "text": ["d", "e", "f"]}),
                   tmp_path / "b.parquet")
    # JSON: 1 (int) and 1.0 / 1e0 (floats) are the same id as Parquet's 1; the string "1.0" stays a string.
    (tmp_path / "c.jsonl").write_text(
        '{"id": 2.0, "text": "g"}\n{"id": 1e0, "text": "h"}\n{"id": "1.0", "text": "i"}\n'
        '{"id": 0.5, "text": "j"}\n{"id": 7, "text": "k"}\n{"id": 1e-05, "text": "l"}\n'
    )
    plan, docs = plan_and_read(tmp_path, shard_rows=4)
    assert outcome(docs) == [
        ("1", None), ("2", None), ("-3", None),
        ("1", "duplicate_id"), ("4", None), ("0.5", None),
        ("2", "duplicate_id"), ("1", "duplicate_id"), ("1.0", None), ("0.5", "duplicate_id"), ("7", None),
        ("1e-05", None),
    ]
    assert plan["duplicate_rows"] == 4


def test_nan_and_infinity_ids_are_invalid_in_both_formats_and_never_duplicates(tmp_path):
    pq.write_table(pa.table({"id": [1.5, math.nan, math.inf, -math.inf, math.nan, None],
                             "text": ["a", "b", "c", "d", "e", "f"]}), tmp_path / "a.parquet")
    # Python's json (and so reembed) reads NaN / Infinity / -Infinity; 1e400 overflows to infinity.
    (tmp_path / "b.jsonl").write_text(
        '{"id": NaN, "text": "g"}\n{"id": Infinity, "text": "h"}\n{"id": -Infinity, "text": "i"}\n'
        '{"id": 1e400, "text": "j"}\n{"id": "nan", "text": "a string is an id"}\n{"id": null, "text": "k"}\n'
        '{"id": {"a": 1}, "text": "l"}\n{"id": [1], "text": "m"}\n{"text": "no id key"}\n'
    )
    plan, docs = plan_and_read(tmp_path, shard_rows=5)
    assert outcome(docs) == [
        ("1.5", None), (None, "invalid_id"), (None, "invalid_id"), (None, "invalid_id"), (None, "invalid_id"),
        (None, "null_id"),
        (None, "invalid_id"), (None, "invalid_id"), (None, "invalid_id"), (None, "invalid_id"), ("nan", None),
        (None, "null_id"), (None, "invalid_id"), (None, "invalid_id"), (None, "null_id"),
    ]
    assert plan["duplicate_rows"] == 0 and plan["rows"] == docs.num_rows == 15


@pytest.mark.parametrize("values, type_, expected", [
    ([1, None, -3, 2**62], pa.int64(), ["1", None, "-3", str(2**62)]),
    ([7, 255], pa.uint8(), ["7", "255"]),
    ([7.0, -0.0, 0.1, 1e20, 1e-05, 123456789012.5], pa.float64(),
     ["7", "0", "0.1", "100000000000000000000", "1e-05", "123456789012.5"]),
    ([0.1, 3.0, 1e-05], pa.float32(), ["0.1", "3", "1e-05"]),  # the shortest float32 string, not 0.10000000149...
    ([Decimal("7.00"), Decimal("0.50"), Decimal("0.10000000000000000001")], pa.decimal128(30, 20),
     ["7", "0.5", "0.10000000000000000001"]),
    ([True, False], pa.bool_(), ["true", "false"]),
    (["1.0", " x "], pa.large_string(), ["1.0", " x "]),
])
def test_arrow_ids_take_the_canonical_form(values, type_, expected):
    ids, invalid = S.id_strings(pa.array(values, type_))
    assert ids.type == pa.string() and ids.to_pylist() == expected and not invalid.any()


@pytest.mark.parametrize("value, expected", [
    (7, ("7", False)), (7.0, ("7", False)), (-0.0, ("0", False)), (0.5, ("0.5", False)), (1e-05, ("1e-05", False)),
    (1e20, ("100000000000000000000", False)), (2**70, (str(2**70), False)), ("7.0", ("7.0", False)),
    (True, ("true", False)), (None, (None, False)),
    (math.nan, (None, True)), (math.inf, (None, True)), ({"a": 1}, (None, True)), ([1], (None, True)),
])
def test_json_ids_take_the_canonical_form(value, expected):
    assert S.json_id(value) == expected


def test_json_and_arrow_forms_agree_on_random_floats():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1e6, 500), np.round(rng.normal(0, 1e6, 500)), rng.normal(0, 1e-6, 200),
                             10.0 ** rng.integers(-30, 30, 200)])
    ids, _ = S.id_strings(pa.array(values))
    assert ids.to_pylist() == [S.json_id(float(v))[0] for v in values]
    assert [float(i) for i in ids.to_pylist()] == values.tolist()  # every form reads back as the same float


def test_binary_ids_must_be_utf8_one_row_at_a_time():
    ids, invalid = S.id_strings(pa.array([b"a", b"\xff\xfe", None, "é".encode()], pa.binary()))
    assert ids.to_pylist() == ["a", None, None, "é"] and invalid.tolist() == [False, True, False, False]


def test_dictionary_ids_are_decoded():
    ids, invalid = S.id_strings(pa.array(["x", "y", "x"]).dictionary_encode())
    assert ids.to_pylist() == ["x", "y", "x"] and not invalid.any()


def test_nested_ids_are_refused():
    with pytest.raises(TypeError, match="not scalars"):
        S.id_strings(pa.array([[1], [2]]))
