"""Arrow schemas and column names: documents in flight, embedding shards, dead letters."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

# Output shard columns.
ID = "id"
EMBEDDING = "embedding"
TRUNCATED = "truncated"

# Columns a document carries between the read stage, the Embedder and the shard writer.
SHARD = "_shard"  # plan shard number
POS = "_pos"  # row position within the shard (restores input order)
SOURCE_FILE = "_file"
SOURCE_ROW = "_row"
REASON = "_reason"  # dead-letter reason code, null for rows to embed
TEXT = "_text"

# Dead-letter reason codes.
NULL_ID = "null_id"
NULL_TEXT = "null_text"
EMPTY_TEXT = "empty_text"
DUPLICATE_ID = "duplicate_id"
INVALID_JSON = "invalid_json"
INVALID_TEXT = "invalid_text"
REASONS = (NULL_ID, NULL_TEXT, EMPTY_TEXT, DUPLICATE_ID, INVALID_JSON, INVALID_TEXT)

DEAD_LETTER_SCHEMA = pa.schema(
    [
        pa.field("id", pa.string()),
        pa.field("reason", pa.string(), nullable=False),
        pa.field("source_file", pa.string(), nullable=False),
        pa.field("source_row", pa.int64(), nullable=False),
    ]
)


def embedding_type(dim: int) -> pa.DataType:
    return pa.list_(pa.float32(), dim)


def embedding_array(vectors: np.ndarray) -> pa.FixedSizeListArray:
    """A ``fixed_size_list<float32>[dim]`` array from an (n, dim) matrix, zero-copy where possible."""
    vectors = np.ascontiguousarray(vectors, dtype=np.float32)
    n, dim = vectors.shape
    return pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1), type=pa.float32()), dim)


def embedding_matrix(column: pa.ChunkedArray | pa.FixedSizeListArray) -> np.ndarray:
    """The (n, dim) float32 matrix behind a ``fixed_size_list<float32>`` column, without per-row Python."""
    if isinstance(column, pa.ChunkedArray):
        column = column.combine_chunks()
    dim = column.type.list_size
    flat = column.flatten() if column.offset == 0 and column.null_count == 0 else column.flatten()
    return flat.to_numpy(zero_copy_only=False).reshape(-1, dim)


def shard_schema(dim: int, passthrough: pa.Schema | None = None) -> pa.Schema:
    fields = [
        pa.field(ID, pa.string(), nullable=False),
        pa.field(EMBEDDING, embedding_type(dim), nullable=False),
        pa.field(TRUNCATED, pa.bool_(), nullable=False),
    ]
    if passthrough is not None:
        fields.extend(passthrough)
    return pa.schema(fields)
