"""One Qdrant point-id scheme: a dual write into a collection the index stage built replaces the document's
point instead of adding a second one (real embedded Qdrant, real Chroma, the tiny BERT for both models)."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pytest

from conftest import make_docs
from reembed import migrate as M
from reembed import schema as S
from reembed.indexes import qdrant as Q

COLLECTION = "docs-v1"


@pytest.fixture()
def stores(tmp_path, tiny_model):
    """Old: Chroma. New: a Qdrant collection loaded by the index stage's own functions. Both hold the same
    20 documents embedded with the tiny model."""
    import chromadb

    from reembed.indexes.search import text_embedder

    docs = make_docs(20, prefix="doc-")
    texts = [d["text"] for d in docs]
    vectors = text_embedder(str(tiny_model), None, "auto")(texts)

    client = Q.connect(str(tmp_path / "qdrant"))
    Q.create_collection(client, COLLECTION, vectors.shape[1], {"state": "ready"})
    table = pa.table({S.ID: [d["id"] for d in docs], S.EMBEDDING: S.embedding_array(vectors), "text": texts,
                      "lang": [d["lang"] for d in docs]})
    assert Q.upload(client, COLLECTION, [table], batch_size=8, passthrough=["text", "lang"]) == 20
    Q.end_bulk(client, COLLECTION)
    client.close()

    col = chromadb.PersistentClient(path=str(tmp_path / "chroma")).get_or_create_collection(
        "docs", embedding_function=None, metadata={"hnsw:space": "cosine"})
    col.upsert(ids=[d["id"] for d in docs], embeddings=vectors, documents=texts, metadatas=[{"lang": d["lang"]} for d in docs])

    old = M.open_store(f"chroma://{tmp_path}/chroma?collection=docs", str(tiny_model), "old")
    new = M.open_store(f"qdrant://{tmp_path}/qdrant?collection={COLLECTION}", str(tiny_model), "new")
    yield old, new, docs
    new.close()


def test_dual_write_of_an_indexed_document_replaces_its_point(stores, tiny_model):
    old, new, docs = stores
    assert new.client.count(COLLECTION, exact=True).count == 20
    text = "A completely rewritten second document about harbour cranes."
    M.dual_write([{"id": "doc-1", "text": text, "lang": "de"}], old, new)

    assert new.client.count(COLLECTION, exact=True).count == 20  # was 21 with the second id scheme
    found, _ = new.client.scroll(COLLECTION, limit=100, with_payload=True)
    assert sum(p.payload["id"] == "doc-1" for p in found) == 1
    point = new.client.retrieve(COLLECTION, ids=[Q.point_id("doc-1")], with_vectors=True)[0]
    assert point.payload == {"id": "doc-1", "text": text, "lang": "de"}
    want = new.embed([text])[0]
    assert np.allclose(point.vector, want / np.linalg.norm(want), atol=1e-5)
    assert old.handle.count() == 20 and old.handle.get(ids=["doc-1"])["documents"] == [text]

    # Searching the new store by the new text finds the document under its own id, with its new text.
    hit = new.search(new.embed([text]), 1)[0][0]
    assert hit[0] == "doc-1" and hit[2] == text


def test_an_index_stage_collection_exports_with_document_ids(stores, tmp_path):
    _, new, docs = stores
    new.close()  # embedded Qdrant: one client per folder
    summary = M.export(new.uri, str(tmp_path / "backup"))
    assert summary["rows"] == 20 and summary["metric"] == "cosine" and summary["collection"] == COLLECTION
    import pyarrow.parquet as pq

    table = pq.read_table(tmp_path / "backup" / "part-00000.parquet")
    assert sorted(table.column("id").to_pylist()) == sorted(d["id"] for d in docs)  # payload ids, not point uuids
    assert table.column_names == ["id", "text", "lang", "_payload", "_point_id", "old_embedding"]
    assert summary["layout"]["kind"] == "reembed" and summary["layout"]["id_kind"] == "uuid"
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert all(by_id[d["id"]]["text"] == d["text"] and by_id[d["id"]]["lang"] == d["lang"] for d in docs)


def test_wrong_dimension_and_missing_collection_are_one_line_errors(stores, tmp_path):
    old, new, _ = stores
    with pytest.raises(M.MigrationError, match=r"holds 32-d vectors; got 5-d queries"):
        new.search(np.ones((1, 5), np.float32), 3)
    with pytest.raises(M.MigrationError, match=r"holds 32-d vectors; got 4-d document vectors"):
        old.upsert(["x"], ["y"], np.ones((1, 4), np.float32), [{}])
    new.close()
    with pytest.raises(M.ExportError, match=r"no Qdrant collection 'nope' \(collections: docs-v1\)"):
        M.open_store(f"qdrant://{tmp_path}/qdrant?collection=nope")
    with pytest.raises(M.ExportError, match="no Qdrant storage folder at"):
        M.open_store(f"qdrant://{tmp_path}/absent?collection=docs")
    assert not (tmp_path / "absent").exists()
