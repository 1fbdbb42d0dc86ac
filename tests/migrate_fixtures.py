"""Helpers for the migration tests: the labelled test corpus, a second real embedding space, and reembed
outputs written directly in the manifest format (no Ray)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pytest
import pyarrow as pa
import pyarrow.parquet as pq

from reembed import schema as S
from reembed.embed import fingerprint
from reembed.manifest import Manifest
from reembed.storage import Location, json_lines

DATA = Path(__file__).parent / "data"
CORPUS = DATA / "migrate_corpus.jsonl"
QUERIES = DATA / "migrate_queries.jsonl"
PROJECTION_SEED = 1234


def corpus() -> list[dict[str, Any]]:
    return [obj for _, obj in json_lines(CORPUS.read_bytes(), str(CORPUS))]


def queries() -> list[dict[str, Any]]:
    return [obj for _, obj in json_lines(QUERIES.read_bytes(), str(QUERIES))]


def projected_minilm(folder: Path) -> Path:
    """all-MiniLM-L6-v2 followed by a fixed random 384 -> 1024 projection and a Normalize: a second,
    1024-d space with real meaning (a random projection nearly preserves cosine). Built once per folder."""
    folder = Path(folder)
    if (folder / "modules.json").exists():
        return folder
    import torch
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer import modules as m

    from reembed.testing import minilm_path

    base = SentenceTransformer(str(minilm_path()), device="cpu")
    w = np.random.default_rng(PROJECTION_SEED).standard_normal((1024, 384)).astype(np.float32) / np.sqrt(1024)
    dense = m.Dense(384, 1024, bias=False, activation_function=torch.nn.Identity(), init_weight=torch.from_numpy(w))
    SentenceTransformer(modules=[*base, dense, m.Normalize()], device="cpu").save(str(folder))
    return folder


def embed(model: str | Path, texts: Sequence[str], max_seq_length: int | None = 256) -> np.ndarray:
    """Vectors from the same cached Embedder that validate uses for an output made with ``model_info``."""
    from reembed.indexes.search import text_embedder

    return text_embedder(str(model), max_seq_length, "auto")(list(texts))


def model_info(name: str | Path, dim: int, normalize: bool = True, max_seq_length: int = 256) -> dict[str, Any]:
    info = {"name": str(name), "revision": "test", "dimension": dim, "normalize": normalize, "pooling": "mean",
            "dtype": "float32", "max_seq_length": max_seq_length}
    info["fingerprint"] = fingerprint(info)
    return info


def write_output(path: Path, ids: Sequence[str], vectors: np.ndarray, info: dict[str, Any], shard_rows: int = 25,
                 columns: dict[str, Sequence[Any] | pa.Array] | None = None) -> Location:
    """A committed reembed output (manifest + shards) holding exactly these vectors, as the pipeline writes it."""
    loc = Location.from_uri(str(path))
    n = len(ids)
    bounds = [(s, min(n, s + shard_rows)) for s in range(0, n, shard_rows)]
    plan = {"rows": n, "shards": [{"shard": i, "rows": b - a} for i, (a, b) in enumerate(bounds)],
            "passthrough": list(columns or {}), "bad_files": []}
    manifest = Manifest.create(loc, info, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    matrix = np.asarray(vectors)
    for shard, (a, b) in enumerate(bounds):
        cols = {S.ID: pa.array(list(ids[a:b]), pa.string()),
                S.EMBEDDING: pa.FixedSizeListArray.from_arrays(pa.array(matrix[a:b].reshape(-1).astype(np.float32)), matrix.shape[1]),
                S.TRUNCATED: pa.array([False] * (b - a))}
        for name, values in (columns or {}).items():
            cols[name] = values[a:b] if isinstance(values, pa.Array) else pa.array(list(values[a:b]))
        commit_table(manifest, shard, pa.table(cols))
    return loc


def commit_table(manifest: Manifest, shard: int, table: pa.Table) -> None:
    buf = io.BytesIO()
    pq.write_table(table, buf)
    data = buf.getvalue()
    rel = f"shards/part-{shard:05d}.parquet"
    manifest.loc.write_bytes(data, rel)
    manifest.commit_shard(shard, {"path": rel, "rows": table.num_rows, "bytes": len(data),
                                  "sha256": hashlib.sha256(data).hexdigest(), "tokens": 0, "device_seconds": 0.0,
                                  "dead_letters": 0, "reasons": {}, "truncated": 0})


def write_export(folder: Path, ids: Sequence[str], texts: Sequence[str], vectors: np.ndarray) -> Path:
    """An old-store export folder (what `reembed export` writes): id, text, old_embedding."""
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table({"id": list(ids), "text": list(texts), "old_embedding": S.embedding_array(vectors)}),
                   folder / "part-00000.parquet")
    return folder


@pytest.fixture(scope="module")
def proj(tmp_path_factory):
    """MiniLM followed by a fixed random 384 -> 1024 projection: a second space with real meaning."""
    return projected_minilm(tmp_path_factory.getbasetemp() / "minilm-proj-1024")


@pytest.fixture(scope="module")
def space(minilm, proj):
    """The test corpus embedded in both spaces: ids, texts, topics, old (384-d) and new (1024-d)."""
    rows = corpus()
    texts = [r["text"] for r in rows]
    return {"ids": [r["id"] for r in rows], "texts": texts, "topics": [r["topic"] for r in rows],
            "old": embed(minilm, texts), "new": embed(proj, texts)}
