"""Arrow schemas, column names and the canonical forms of ids and texts.

**Ids.** Every document id becomes a string, the same string whatever the input format:

- strings stay as they are (``"1.0"`` stays ``"1.0"``; no trimming, no case folding);
- integers, and floats or decimals with an integral value, become the decimal integer: ``7``, ``7.0``,
  ``1e2`` and ``Decimal("7.00")`` are ``"7"``, ``"7"``, ``"100"`` and ``"7"``, so a Parquet int64 id, a
  Parquet float64 id and a JSON number name the same document;
- other finite floats become the shortest string that reads back as the same value (Python's ``repr``:
  ``0.5`` -> ``"0.5"``, ``1e-05`` -> ``"1e-05"``; for a float32 column the shortest float32 string);
  other decimals their plain digits without trailing zeros;
- booleans are ``"true"`` / ``"false"``; Parquet binary ids must be UTF-8; other scalar types (dates,
  timestamps) take Arrow's string cast.

A missing or null id is dead-lettered as ``null_id``. NaN, infinities, JSON objects and lists, and binary
ids that are not UTF-8 are not ids: they are dead-lettered as ``invalid_id``, and never take part in
duplicate detection.

**Texts.** A text is a string, or Parquet binary holding UTF-8. A row whose binary text is not UTF-8, or
whose JSON text is not a string, is dead-lettered alone as ``invalid_text``.
"""

from __future__ import annotations

import math
from decimal import Decimal
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The shards' vector value types (``output.dtype``), and the plan key that records the output's.
VECTOR_DTYPES = {"float32": pa.float32(), "float16": pa.float16()}
VECTOR_DTYPE = "vector_dtype"

# Output shard columns.
ID = "id"
EMBEDDING = "embedding"
TRUNCATED = "truncated"
TEXT_HASH = "text_hash"
"""blake2b-128 of the embedded text's UTF-8 bytes (``fixed_size_binary(16)``; 128 bits, so two different
texts of a billion-document corpus share a hash with odds below 1e-20). Every shard a job writes has it:
``reembed run --reuse`` compares it to tell unchanged rows (see :mod:`reembed.reuse`)."""
TEXT_HASH_BYTES = 16

# Columns a document carries between the read stage, the Embedder and the shard writer.
SHARD = "_shard"  # plan shard number
POS = "_pos"  # row position within the shard (restores input order)
SOURCE_FILE = "_file"
SOURCE_ROW = "_row"
REASON = "_reason"  # dead-letter reason code, null for rows to embed
TEXT = "_text"
# Incremental runs (reembed.reuse): rows whose vector is carried forward from the earlier output, that
# vector, and rows whose vector was copied from an identical text of the same block (not embedded again).
REUSED = "_reused"
OLD_EMBEDDING = "_old_embedding"
OLD_TRUNCATED = "_old_truncated"
COPIED = "_copied"
# Corpus-wide identical texts (reembed.texts): rows a copy shard writes (not this shard), and the position of
# the row of the same shard whose vector a row takes (-1: none).
MOVED = "_moved"
LEADER_POS = "_leader_pos"

# Dead-letter reason codes.
INVALID_JSON = "invalid_json"  # a JSON Lines line that is not a JSON object
INVALID_ID = "invalid_id"  # NaN, an infinity, an object or list, non-UTF-8 binary
NULL_ID = "null_id"
DUPLICATE_ID = "duplicate_id"  # an id seen earlier in plan order (the first occurrence is embedded)
INVALID_TEXT = "invalid_text"  # JSON text that is not a string, binary text that is not UTF-8
NULL_TEXT = "null_text"
EMPTY_TEXT = "empty_text"  # empty or whitespace only
# Every reason a row can be dead-lettered for, in precedence order: a row gets the first that applies.
REASONS = (INVALID_JSON, INVALID_ID, NULL_ID, DUPLICATE_ID, INVALID_TEXT, NULL_TEXT, EMPTY_TEXT)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
    ]
)


def shard_schema(dim: int, passthrough: pa.Schema | None = None, dtype: str = "float32",
                 text_hash: bool = False) -> pa.Schema:
    """The schema of an output shard: ``id`` (string), ``embedding`` (``fixed_size_list<dtype>[dim]``, float32
    unless ``output.dtype`` says float16), ``truncated`` (bool), with ``text_hash`` the :data:`TEXT_HASH` column
    (the job always writes it; tables built by hand may leave it out), then the passthrough columns as the plan
    typed them (``plan.passthrough_schema(plan)``)."""
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(EMBEDDING, embedding_type(dim, dtype), nullable=False),
        pa.field(TRUNCATED, pa.bool_(), nullable=False),
    ]
    if text_hash:
        fields.append(pa.field(TEXT_HASH, text_hash_type(), nullable=False))
    if passthrough is not None:
        fields.extend(passthrough)
    return pa.schema(fields)


def embedding_type(dim: int, dtype: str = "float32") -> pa.DataType:
    return pa.list_(VECTOR_DTYPES[dtype], dim)


def vector_dtype(plan: dict[str, Any]) -> str:
    """The shards' vector value type a manifest's plan records (outputs made before it was a setting: float32)."""
    return plan.get(VECTOR_DTYPE) or "float32"


def text_hash_type() -> pa.DataType:
    return pa.binary(TEXT_HASH_BYTES)


def text_hashes(texts: pa.Array | pa.ChunkedArray) -> pa.Array:
    """The :data:`TEXT_HASH` of each string (null for null): blake2b-128 of its UTF-8 bytes."""
    import hashlib

    values = _combined(texts).cast(pa.string()).to_pylist()
    return pa.array([None if t is None else hashlib.blake2b(t.encode("utf-8"), digest_size=TEXT_HASH_BYTES).digest()
                     for t in values], text_hash_type())


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<float32>[dim]`` array from an (n, dim) matrix, zero-copy where possible."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)


def embedding_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """The (n, dim) float32 matrix behind a ``fixed_size_list<float32>`` column, without per-row Python; a
    float16 column (``output.dtype: float16``) is upcast, so every reader does its math in float32."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    return column.flatten().to_numpy(zero_copy_only=False).reshape(-1, dim).astype(np.float32, copy=False)


def id_strings(ids: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """An Arrow id column in canonical form (see the module docstring): ``(ids, invalid)``, where
    ``ids`` is a string array, null for null and invalid ids, and ``invalid`` flags the invalid ones.
    Raises TypeError for a type that cannot hold ids (lists, structs)."""
    ids = _combined(ids)
    n = len(ids)
    valid = np.zeros(n, dtype=bool)
    t = ids.type
    if pa.types.is_dictionary(t):
        return id_strings(ids.dictionary_decode())
    if pa.types.is_null(t):
        return pa.nulls(n, pa.string()), valid
    if _is_string(t):
        return ids.cast(pa.string()), valid
    if _is_binary(t):
        return _utf8(ids)
    if pa.types.is_integer(t) or pa.types.is_boolean(t):
        return ids.cast(pa.string()), valid
    if pa.types.is_floating(t):
        return _float_ids(ids)
    if pa.types.is_decimal(t):
        return pa.array([None if v is None else _decimal_id(v) for v in ids.to_pylist()], pa.string()), valid
    if pa.types.is_nested(t):
        raise TypeError(f"ids of type {t} are not scalars")
    try:
        return pc.cast(ids, pa.string()), valid
    except pa.ArrowException as e:
        raise TypeError(f"ids of type {t} cannot be turned into strings ({e})") from e


def json_id(value: Any) -> tuple[str | None, bool]:
    """A JSON id value in canonical form: ``(id, invalid)``; ``(None, False)`` for null or missing."""
    if value is None:
        return None, False
    if isinstance(value, str):
        return value, False
    if isinstance(value, bool):
        return ("true" if value else "false"), False
    if isinstance(value, int):
        return str(value), False
    if isinstance(value, float):
        if not math.isfinite(value):
            return None, True
        return (str(int(value)) if value.is_integer() else repr(value)), False
    return None, True  # an object or a list


def is_text_type(t: pa.DataType) -> bool:
    """Whether a Parquet column of type ``t`` can hold texts (strings, binary UTF-8, all nulls)."""
    if pa.types.is_dictionary(t):
        return is_text_type(t.value_type)
    return _is_string(t) or _is_binary(t) or pa.types.is_null(t)


def text_strings(texts: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, np.ndarray]:
    """A text column as strings: ``(texts, invalid)``; binary values that are not UTF-8 become null and
    are flagged in ``invalid``, one row each. Raises TypeError for a column that holds no texts."""
    texts = _combined(texts)
    t = texts.type
    if pa.types.is_dictionary(t):
        return text_strings(texts.dictionary_decode())
    if pa.types.is_null(t):
        return pa.nulls(len(texts), pa.string()), np.zeros(len(texts), dtype=bool)
    if _is_string(t):
        return texts.cast(pa.string()), np.zeros(len(texts), dtype=bool)
    if _is_binary(t):
        return _utf8(texts)
    raise TypeError(f"texts of type {t} are not strings")


# ---------------------------------------------------------------------------------------------------


def _combined(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    if isinstance(a, pa.ChunkedArray):
        return a.combine_chunks() if a.num_chunks != 1 else a.chunk(0)
    return a


def _is_string(t: pa.DataType) -> bool:
    return pa.types.is_string(t) or pa.types.is_large_string(t) or pa.types.is_string_view(t)


def _is_binary(t: pa.DataType) -> bool:
    return (pa.types.is_binary(t) or pa.types.is_large_binary(t) or pa.types.is_binary_view(t)
            or pa.types.is_fixed_size_binary(t))


def _utf8(values: pa.Array) -> tuple[pa.Array, np.ndarray]:
    """Binary values as strings; the values that are not UTF-8 become null and are flagged."""
    try:
        return pc.cast(values, pa.string()), np.zeros(len(values), dtype=bool)
    except pa.ArrowInvalid:
        pass  # at least one value is not UTF-8: find which, row by row
    out: list[str | None] = []
    invalid = np.zeros(len(values), dtype=bool)
    for i, v in enumerate(values.to_pylist()):
        if v is None:
            out.append(None)
            continue
        try:
            out.append(v.decode("utf-8"))
        except UnicodeDecodeError:
            out.append(None)
            invalid[i] = True
    return pa.array(out, pa.string()), invalid


def _float_ids(ids: pa.Array) -> tuple[pa.Array, np.ndarray]:
    null = ids.is_null().to_numpy(zero_copy_only=False)
    values = ids.to_numpy(zero_copy_only=False)  # nulls read as NaN; `null` tells them apart
    finite = np.isfinite(values)
    invalid = ~null & ~finite
    out = np.full(len(values), None, dtype=object)
    with np.errstate(invalid="ignore"):
        integral = finite & (values == np.floor(values))
    small = integral & (np.abs(values) < 2.0**63)
    if small.any():
        out[small] = pa.array(values[small].astype(np.int64)).cast(pa.string()).to_numpy(zero_copy_only=False)
    scalar = np.float64 if values.dtype == np.float64 else values.dtype.type
    for i in np.flatnonzero(finite & ~small):
        v = values[i]
        out[i] = str(int(v)) if integral[i] else (repr(float(v)) if scalar is np.float64 else str(scalar(v)))
    return pa.array(out, pa.string()), invalid


def _decimal_id(d: Decimal) -> str:
    if d == d.to_integral_value():
        return str(int(d))
    as_float = float(d)
    if Decimal(repr(as_float)) == d:
        return repr(as_float)  # the same string as a float64 of that value
    return format(d.normalize(), "f")
