"""schema.shard_schema, the one output shard schema the writer enforces, and schema.text_strings."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from reembed import schema as S


def shard_table(ids: list, dim: int = 4) -> pa.Table:
    n = len(ids)
    return pa.table([pa.array(ids, pa.string()), S.embedding_array(np.ones((n, dim))), pa.array([False] * n),
                     pa.array(["en"] * n)], names=[S.ID, S.EMBEDDING, S.TRUNCATED, "lang"])


def test_shard_schema_is_id_embedding_truncated_then_passthrough():
    passthrough = pa.schema([pa.field("lang", pa.string())])
    schema = S.shard_schema(4, passthrough)
    assert schema.names == ["id", "embedding", "truncated", "lang"]
    assert schema.field("id").type == pa.string() and not schema.field("id").nullable
    etype = schema.field("embedding").type
    assert pa.types.is_fixed_size_list(etype) and etype.list_size == 4 and etype.value_type == pa.float32()
    assert schema.field("lang").nullable
    assert S.shard_schema(4).names == ["id", "embedding", "truncated"]
    # What enforcing it catches: a table that fits casts; a null id or another dimension does not.
    assert shard_table(["a", "b"]).cast(schema).schema == schema
    with pytest.raises(ValueError, match="null values to non-nullable"):
        shard_table([None, "b"]).cast(schema)
    with pytest.raises(pa.ArrowTypeError):
        shard_table(["a"], dim=3).cast(schema)


def test_embedding_array_and_matrix_round_trip_through_a_slice():
    m = np.arange(24, dtype=np.float32).reshape(6, 4)
    arr = S.embedding_array(m)
    assert arr.type == S.embedding_type(4)
    np.testing.assert_array_equal(S.embedding_matrix(arr.slice(2, 3)), m[2:5])
    np.testing.assert_array_equal(S.embedding_matrix(pa.chunked_array([arr.slice(0, 2), arr.slice(2)])), m)


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string(), pa.string_view()])
def test_string_texts_pass_through(type_):
    texts, invalid = S.text_strings(pa.array(["a", None, ""], type_))
    assert texts.type == pa.string() and texts.to_pylist() == ["a", None, ""] and not invalid.any()


@pytest.mark.parametrize("type_", [pa.binary(), pa.large_binary(), pa.binary_view()])
def test_binary_texts_are_checked_one_row_at_a_time(type_):
    texts, invalid = S.text_strings(pa.chunked_array([pa.array([b"ok", b"\xc3\xa9"], type_),
                                                      pa.array([b"\xff", None], type_)]))
    assert texts.to_pylist() == ["ok", "é", None, None] and invalid.tolist() == [False, False, True, False]


def test_text_types():
    assert S.is_text_type(pa.string()) and S.is_text_type(pa.binary()) and S.is_text_type(pa.null())
    assert S.is_text_type(pa.dictionary(pa.int32(), pa.string()))
    assert not S.is_text_type(pa.int64()) and not S.is_text_type(pa.list_(pa.string()))
    with pytest.raises(TypeError, match="not strings"):
        S.text_strings(pa.array([1, 2]))
    texts, _ = S.text_strings(pa.array(["x", "y", "x"]).dictionary_encode())
    assert texts.to_pylist() == ["x", "y", "x"]


# Known values: existing outputs carry these hashes, and `--reuse` compares new texts against them, so the
# function must never change what it returns (blake2b-128 of the UTF-8 bytes; the first is BLAKE2b-128 of b"").
KNOWN_TEXT_HASHES = {
    "": "cae66941d9efbd404e4d88758ea67670",
    "a": "27c35e6e9373877f29e562464e46497e",
    "héllo wörld": "b8c57e59052513e34c713d72492961af",
    "the quick brown fox jumps over the lazy dog": "5bfb7372bdb2f169ed8c800e5ee441e8",
}


@pytest.mark.parametrize("type_", [pa.string(), pa.large_string()])
def test_text_hashes_keep_their_known_values_for_any_layout(type_):
    texts = list(KNOWN_TEXT_HASHES)
    want = [bytes.fromhex(h) for h in KNOWN_TEXT_HASHES.values()]
    got = S.text_hashes(pa.array(texts, type_))
    assert got.type == S.text_hash_type() and got.to_pylist() == want
    chunked = pa.chunked_array([pa.array(["x", *texts[:2]], type_).slice(1), pa.array([None, *texts[2:]], type_)])
    assert S.text_hashes(chunked).to_pylist() == [*want[:2], None, *want[2:]]  # a slice, chunks, a null
