"""Gradual migration: fused dual-store queries (each store with its own model) and dual writes.

Old store: Chroma holding all-MiniLM-L6-v2 vectors (384-d). New store: a reembed output (or an embedded
Qdrant collection) holding MiniLM + fixed random 384 -> 1024 projection vectors.
"""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from migrate_fixtures import embed, model_info, write_output
from migrate_fixtures import proj, space  # noqa: F401  (fixtures)
from reembed import migrate as M
from reembed.indexes.qdrant import point_id


def chroma_store(path, space, minilm, keep=None):
    import chromadb

    keep = keep or (lambda i: True)
    idx = [i for i, d in enumerate(space["ids"]) if keep(d)]
    col = chromadb.PersistentClient(path=str(path)).get_or_create_collection(
        "docs", embedding_function=None, metadata={"hnsw:space": "cosine"})
    col.upsert(ids=[space["ids"][i] for i in idx], embeddings=space["old"][idx],
               documents=[space["texts"][i] for i in idx], metadatas=[{"topic": space["topics"][i]} for i in idx])
    return f"chroma://{path}?collection=docs"


def output_store(path, space, proj, keep=None):
    keep = keep or (lambda i: True)
    idx = [i for i, d in enumerate(space["ids"]) if keep(d)]
    write_output(path, [space["ids"][i] for i in idx], space["new"][idx], model_info(proj, 1024),
                 columns={"text": [space["texts"][i] for i in idx]})
    return str(path)


# ---------------------------------------------------------------------------------------------------
# Fusion


def test_rrf_ranks_a_document_both_stores_found_above_one_store_only():
    old = [("a", 0.9), ("b", 0.8), ("c", 0.7)]
    new = [("d", 0.95), ("b", 0.90), ("e", 0.85)]
    hits = M.fuse({"old": old, "new": new}, "rrf")
    assert [h.id for h in hits][:3] == ["b", "a", "d"]
    assert hits[0].ranks == {"old": 2, "new": 2} and hits[0].score == pytest.approx(2 / 62)
    assert hits[1].ranks == {"old": 1} and hits[1].score == pytest.approx(1 / 61)
    # Even ranked last by both, a shared document beats anything one store ranks first (at these depths).
    deep_old = [(f"o{i}", 1 - i / 100) for i in range(19)] + [("s", 0.0)]
    deep_new = [(f"n{i}", 1 - i / 100) for i in range(19)] + [("s", 0.0)]
    assert M.fuse({"old": deep_old, "new": deep_new})[0].id == "s"


def test_weighted_fusion_normalizes_each_store_and_never_mixes_raw_scores():
    old = [("a", 0.31), ("b", 0.30), ("c", 0.10)]
    new = [("d", 0.92), ("b", 0.91), ("e", 0.40)]
    hits = M.fuse({"old": old, "new": new}, "weighted")
    assert hits[0].id == "b" and hits[0].score == pytest.approx(0.3 / 0.31 * 0 + (0.30 - 0.10) / 0.21 + (0.91 - 0.40) / 0.52)
    # Rescaling one store's raw scores (another model's cosine range) changes nothing.
    scaled = [(d, 1000 * s + 7) for d, s in new]
    assert [h.id for h in M.fuse({"old": old, "new": scaled}, "weighted")] == [h.id for h in hits]
    # Weights tip the balance between stores that disagree.
    w = M.fuse({"old": [("x", 1.0), ("y", 0.0)], "new": [("y", 1.0), ("x", 0.0)]}, "weighted", {"old": 1, "new": 3})
    assert [h.id for h in w] == ["y", "x"]
    with pytest.raises(M.MigrationError, match="unknown fusion 'max'"):
        M.fuse({"old": old}, "max")


# ---------------------------------------------------------------------------------------------------
# Dual-store query on real stores


def test_dual_query_embeds_with_each_stores_own_model(tmp_path, space, minilm, proj):
    old = M.open_store(chroma_store(tmp_path / "chroma", space, minilm), str(minilm), "old")
    new = M.open_store(output_store(tmp_path / "new", space, proj), None, "new")  # model from the manifest
    assert (old.kind, old.dim, new.kind, new.dim, new.model) == ("chroma", 384, "exact", 1024, str(proj))
    hits = M.dual_query("how do I make bread rise", old, new, k=5)
    assert hits[0].id == "cook-0" and hits[0].ranks == {"old": 1, "new": 1}
    assert hits[0].text.startswith("Knead the bread dough")
    assert all(h.id.startswith("cook-") for h in hits[:3])
    for method in ("rrf", "weighted"):
        top = M.dual_query("the moon blocks the sun", old, new, k=3, method=method)
        assert top[0].id == "astro-3"


def test_dual_query_prefers_documents_both_stores_hold(tmp_path, space, minilm, proj):
    """During a migration the new store may not have every document yet; one the old store alone ranks
    first falls below one both stores return."""
    old = M.open_store(chroma_store(tmp_path / "chroma", space, minilm), str(minilm), "old")
    new = M.open_store(output_store(tmp_path / "new", space, proj, keep=lambda d: d != "cook-0"), None, "new")
    alone = old.search(old.embed(["how do I make bread rise"]), 3)[0]
    assert alone[0][0] == "cook-0"
    hits = M.dual_query("how do I make bread rise", old, new, k=40, depth=20)
    ids = [h.id for h in hits]
    pos = ids.index("cook-0")
    assert pos >= 5 and hits[pos].ranks == {"old": 1}
    both = [i for i, h in enumerate(hits) if h.ranks.keys() == {"old", "new"}]
    assert both and max(both) < pos  # every document both stores returned ranks above it


def test_dual_query_refuses_a_store_without_a_model(tmp_path, space, minilm, proj):
    old = M.open_store(chroma_store(tmp_path / "chroma", space, minilm), None, "old")
    new = M.open_store(output_store(tmp_path / "new", space, proj), None, "new")
    with pytest.raises(M.MigrationError, match="no model to embed queries with; pass its model \\(--old-model"):
        M.dual_query("anything", old, new)
    wrong = M.open_store(chroma_store(tmp_path / "chroma", space, minilm), str(proj), "old")
    from reembed.errors import ValidationError

    with pytest.raises(ValidationError, match="gives 1024-d vectors but the output holds 384-d"):
        M.dual_query("anything", wrong, new)


def test_faiss_and_export_folder_stores(tmp_path, space, minilm, proj):
    import faiss

    index = faiss.IndexIDMap(faiss.IndexFlatIP(384))
    labels = np.arange(60, dtype=np.int64) + 1000
    index.add_with_ids(space["old"], labels)
    faiss.write_index(index, str(tmp_path / "old.faiss"))
    pq.write_table(pa.table({"position": labels, "id": space["ids"], "text": space["texts"]}), tmp_path / "docs.parquet")
    uri = f"faiss://{tmp_path}/old.faiss?docstore=docs.parquet"
    old = M.open_store(uri, str(minilm), "old")
    new = M.open_store(output_store(tmp_path / "new", space, proj), None, "new")
    assert M.dual_query("goalkeeper stops a penalty", old, new, k=3)[0].id == "soccer-1"

    M.export(uri, str(tmp_path / "export"))
    exported = M.open_store(str(tmp_path / "export"), str(minilm), "old")
    assert exported.kind == "exact" and M.dual_query("goalkeeper stops a penalty", exported, new, k=3)[0].id == "soccer-1"
    with pytest.raises(M.MigrationError, match="read-only here"):
        M.dual_write([{"id": "x", "text": "y"}], old, new)


# ---------------------------------------------------------------------------------------------------
# Dual write


def qdrant_new_store(path, space, proj, with_corpus=True):
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(path))
    client.create_collection("docs", vectors_config=models.VectorParams(size=1024, distance=models.Distance.COSINE))
    if with_corpus:
        client.upsert("docs", points=[models.PointStruct(id=point_id(d), vector=v.tolist(), payload={"id": d, "text": t})
                                      for d, v, t in zip(space["ids"], space["new"], space["texts"])])
    client.close()
    return f"qdrant://{path}?collection=docs"


def test_dual_write_lands_in_both_stores_with_each_model(tmp_path, space, minilm, proj):
    old = M.open_store(chroma_store(tmp_path / "chroma", space, minilm), str(minilm), "old")
    new = M.open_store(qdrant_new_store(tmp_path / "qdrant", space, proj), str(proj), "new")
    try:
        docs = [{"id": "late-1", "text": "Sourdough starter needs feeding with flour and water every day.", "topic": "cook"},
                {"id": "late-2", "text": "The comet's tail always points away from the Sun.", "topic": "astro"}]
        summary = M.dual_write(docs, old, new)
        assert summary["rows"] == 2

        got = old.handle.get(ids=["late-1", "late-2"], include=["embeddings", "documents", "metadatas"])
        assert got["documents"] == [d["text"] for d in docs] and got["metadatas"][0] == {"topic": "cook"}
        want_old = embed(minilm, [d["text"] for d in docs], None)
        assert np.allclose(np.asarray(got["embeddings"]), want_old, atol=1e-5)
        points = new.client.retrieve("docs", ids=[point_id("late-1")], with_vectors=True)
        assert points[0].payload == {"id": "late-1", "text": docs[0]["text"], "topic": "cook"}
        assert np.allclose(points[0].vector, embed(proj, [docs[0]["text"]])[0], atol=1e-5)

        hits = M.dual_query("feeding a sourdough starter", old, new, k=3)
        assert hits[0].id == "late-1" and hits[0].ranks == {"old": 1, "new": 1}
        # Upserts: writing the same documents again changes nothing.
        M.dual_write(docs, old, new)
        assert old.handle.count() == 62 and new.client.count("docs").count == 62
    finally:
        new.close()


def test_dual_write_reports_a_half_done_write(tmp_path, space, minilm, proj):
    old = M.open_store(chroma_store(tmp_path / "chroma", space, minilm), str(minilm), "old")
    new = M.open_store(qdrant_new_store(tmp_path / "qdrant", space, proj, with_corpus=False), str(proj), "new")
    new.client.delete_collection("docs")  # the new store went away after it was opened
    try:
        with pytest.raises(M.DualWriteError, match="written to 'old' but not to 'new'.*retry the same call"):
            M.dual_write([{"id": "late-1", "text": "A new document."}], old, new)
        assert old.handle.get(ids=["late-1"])["ids"] == ["late-1"]
        with pytest.raises(M.MigrationError, match="document 0: needs"):
            M.dual_write([{"id": "x", "text": "  "}], old, new)
    finally:
        new.close()


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_query(tmp_path, space, minilm, proj, capsys):
    from reembed.cli import main

    old_uri = chroma_store(tmp_path / "chroma", space, minilm)
    new_uri = output_store(tmp_path / "new", space, proj)
    assert main(["query", "player sent off for a foul", "--old", old_uri, "--old-model", str(minilm), "--new", new_uri,
                 "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert hits[0]["id"] == "soccer-2" and set(hits[0]["ranks"]) == {"old", "new"} and len(hits) == 3
    assert main(["query", "player sent off for a foul", "--old", old_uri, "--old-model", str(minilm), "--new", new_uri,
                 "--fusion", "weighted", "--weights", "0.2,0.8", "-k", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("  1. ") and "soccer-2" in out and "[new#1 old#1]" in out
    assert main(["query", "x", "--old", old_uri, "--new", new_uri]) == 1
    assert "--old-model" in capsys.readouterr().err
