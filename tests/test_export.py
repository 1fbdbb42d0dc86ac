"""reembed.migrate.export: each store that runs here (Chroma persistent + HTTP, Qdrant embedded, FAISS) round-trips
counts, ids, texts, metadata and old vectors exactly."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from migrate_fixtures import corpus, embed
from reembed import migrate as M
from reembed.migrate import Batch, ExportError, PartWriter, PineconeStore, WeaviateStore
from reembed.storage import Location


@pytest.fixture(scope="module")
def docs(minilm):
    rows = corpus()
    vectors = embed(minilm, [r["text"] for r in rows])
    return rows, vectors


def read_export(folder: Path) -> tuple[pa.Table, dict]:
    meta = json.loads((folder / "_export.json").read_text())
    parts = [pq.read_table(folder / p["path"]) for p in meta["parts"]]
    assert len({t.schema for t in parts}) == 1, "every part must have the same schema"
    return pa.concat_tables(parts), meta


def assert_round_trip(table: pa.Table, rows: list[dict], vectors: np.ndarray, id_of=lambda r: r["id"]) -> None:
    assert table.num_rows == len(rows)
    got_ids = table.column("id").to_pylist()
    assert len(set(got_ids)) == len(rows)
    want = {id_of(r): (r, vectors[i]) for i, r in enumerate(rows)}
    assert set(got_ids) == set(want)
    got_vecs = np.asarray(table.column("old_embedding").combine_chunks().flatten().to_numpy()).reshape(table.num_rows, -1)
    assert table.schema.field("old_embedding").type == pa.list_(pa.float32(), vectors.shape[1])
    for i, doc_id in enumerate(got_ids):
        row, vec = want[doc_id]
        assert table.column("text")[i].as_py() == row["text"]
        assert np.array_equal(got_vecs[i], vec), f"{doc_id}: old vector changed in the export"


# ---------------------------------------------------------------------------------------------------
# Chroma


def fill_chroma(client, docs, name="docs", space="l2"):
    rows, vectors = docs
    col = client.get_or_create_collection(name, embedding_function=None, metadata={"hnsw:space": space})
    col.upsert(ids=[r["id"] for r in rows], embeddings=vectors, documents=[r["text"] for r in rows],
               metadatas=[{"topic": r["topic"], "n": i} for i, r in enumerate(rows)])
    return col


def test_chroma_persistent_round_trip(tmp_path, docs):
    import chromadb

    fill_chroma(chromadb.PersistentClient(path=str(tmp_path / "chroma")), docs)
    out = tmp_path / "backup"
    summary = M.export(f"chroma://{tmp_path}/chroma?collection=docs", str(out), page_size=7, part_rows=25)

    table, meta = read_export(out)
    rows, vectors = docs
    assert_round_trip(table, rows, vectors)
    assert summary["rows"] == meta["rows"] == 60 and meta["dimension"] == 384 and meta["metric"] == "l2"
    assert [p["rows"] for p in meta["parts"]] == [25, 25, 10]
    for p in meta["parts"]:
        import hashlib

        assert hashlib.sha256((out / p["path"]).read_bytes()).hexdigest() == p["sha256"]
    by_id = {r["id"]: r for r in table.to_pylist()}
    assert all(by_id[r["id"]]["topic"] == r["topic"] and by_id[r["id"]]["n"] == i for i, r in enumerate(rows))
    assert table.column_names == ["id", "text", "n", "topic", "old_embedding"]


def test_chroma_cosine_exports_what_chroma_stores(tmp_path, docs):
    """A cosine collection does not hand back the exact floats it was given (Chroma rewrites them within a
    float32 ulp or so); the export must hold exactly what the store holds."""
    import chromadb

    col = fill_chroma(chromadb.PersistentClient(path=str(tmp_path / "chroma")), docs, space="cosine")
    stored = col.get(include=["embeddings"])
    M.export(f"chroma://{tmp_path}/chroma?collection=docs", str(tmp_path / "out"), page_size=13)
    table, meta = read_export(tmp_path / "out")
    assert meta["metric"] == "cosine"
    want = dict(zip(stored["ids"], np.asarray(stored["embeddings"], np.float32)))
    got = np.asarray(table.column("old_embedding").combine_chunks().flatten()).reshape(60, -1)
    assert all(np.array_equal(got[i], want[d]) for i, d in enumerate(table.column("id").to_pylist()))
    assert np.allclose(got, np.vstack([docs[1][[r["id"] for r in docs[0]].index(d)] for d in table.column("id").to_pylist()]), atol=1e-6)


def test_chroma_http_server_round_trip(tmp_path, docs):
    """A real `chroma run` server on 127.0.0.1 (the binary ships with chromadb)."""
    import chromadb

    chroma_bin = Path(os.environ.get("VIRTUAL_ENV", "")) / "bin" / "chroma"
    if not chroma_bin.exists():
        import shutil
        import sys

        chroma_bin = Path(sys.executable).parent / "chroma"
        if not chroma_bin.exists() and shutil.which("chroma"):
            chroma_bin = Path(shutil.which("chroma"))
    port = _free_port()
    proc = subprocess.Popen([str(chroma_bin), "run", "--path", str(tmp_path / "srv"), "--host", "127.0.0.1",
                             "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        client = _wait_for_chroma(chromadb, port)
        fill_chroma(client, docs, name="remote")
        out = tmp_path / "backup"
        M.export(f"chroma://127.0.0.1:{port}?collection=remote", str(out), page_size=16)
        table, meta = read_export(out)
        assert_round_trip(table, *docs)
        assert meta["source"] == f"chroma://127.0.0.1:{port}?collection=remote"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_chroma(chromadb, port: int):
    deadline = time.monotonic() + 60
    while True:
        try:
            client = chromadb.HttpClient(host="127.0.0.1", port=port)
            client.heartbeat()
            return client
        except Exception:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.3)


# ---------------------------------------------------------------------------------------------------
# Qdrant (embedded)


def test_qdrant_embedded_round_trip(tmp_path, docs):
    from qdrant_client import QdrantClient, models

    rows, vectors = docs
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    # DOT keeps vectors as given (a cosine collection stores them normalized, which is then what is exported).
    client.create_collection("docs", vectors_config=models.VectorParams(size=384, distance=models.Distance.DOT))
    client.upsert("docs", points=[
        models.PointStruct(id=i, vector=vectors[i].tolist(), payload={"doc_id": r["id"], "body": r["text"], "topic": r["topic"]})
        for i, r in enumerate(rows)])
    client.close()

    out = tmp_path / "backup"
    summary = M.export(f"qdrant://{tmp_path}/qdrant?collection=docs&text_field=body&id_field=doc_id",
                               str(out), page_size=9, part_rows=1000)
    table, meta = read_export(out)
    assert_round_trip(table, rows, vectors)
    assert summary["metric"] == "dot" and meta["rows"] == 60
    # text and id fields are not metadata; the point's own id and payload are kept for writing it back
    assert table.column_names == ["id", "text", "topic", "_payload", "_point_id", "old_embedding"]
    assert table.column("_point_id").to_pylist() == [str(i) for i in range(60)]
    assert json.loads(table.column("_payload")[0].as_py()) == {"doc_id": rows[0]["id"], "body": rows[0]["text"],
                                                               "topic": rows[0]["topic"]}
    assert summary["layout"]["kind"] == "payload" and summary["layout"]["id_kind"] == "int"


def test_qdrant_named_vectors_need_a_choice(tmp_path, docs):
    from qdrant_client import QdrantClient, models

    rows, vectors = docs
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    client.create_collection("docs", vectors_config={
        "minilm": models.VectorParams(size=384, distance=models.Distance.DOT),
        "other": models.VectorParams(size=4, distance=models.Distance.DOT)})
    client.upsert("docs", points=[
        models.PointStruct(id=i, vector={"minilm": vectors[i].tolist(), "other": [1.0, 0, 0, 0]}, payload={"text": r["text"]})
        for i, r in enumerate(rows[:10])])
    client.close()
    uri = f"qdrant://{tmp_path}/qdrant?collection=docs"
    with pytest.raises(ExportError, match="several named vectors"):
        M.export(uri, str(tmp_path / "a"))
    M.export(uri + "&vector=minilm", str(tmp_path / "b"))
    table, _ = read_export(tmp_path / "b")
    assert table.column("id").to_pylist() == [str(i) for i in range(10)]  # point ids when no id_field
    got = np.asarray(table.column("old_embedding").combine_chunks().flatten()).reshape(10, -1)
    assert np.array_equal(got, vectors[:10])


# ---------------------------------------------------------------------------------------------------
# FAISS


def test_faiss_flat_with_positional_docstore(tmp_path, docs):
    import faiss

    rows, vectors = docs
    index = faiss.IndexFlatIP(384)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "text": r["text"], "topic": r["topic"]} for r in rows]),
                   tmp_path / "docstore.parquet")

    summary = M.export(f"faiss://{tmp_path}/index.faiss?docstore=docstore.parquet", str(tmp_path / "out"),
                               page_size=16)
    table, meta = read_export(tmp_path / "out")
    assert_round_trip(table, rows, vectors)
    assert summary["metric"] == "inner_product" and summary["lossy"] is False


def test_faiss_idmap_with_jsonl_docstore_in_any_order(tmp_path, docs):
    import faiss

    rows, vectors = docs
    labels = np.arange(len(rows), dtype=np.int64) * 10 + 7  # labels unrelated to positions
    index = faiss.IndexIDMap(faiss.IndexFlatL2(384))
    index.add_with_ids(vectors, labels)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    order = np.random.default_rng(0).permutation(len(rows))
    with open(tmp_path / "docs.jsonl", "w") as f:
        for i in order:
            f.write(json.dumps({"position": int(labels[i]), "id": rows[i]["id"], "text": rows[i]["text"]}) + "\n")

    M.export(f"faiss://{tmp_path}/index.faiss?docstore={tmp_path}/docs.jsonl", str(tmp_path / "out"))
    table, meta = read_export(tmp_path / "out")
    assert_round_trip(table, rows, vectors)
    assert meta["metric"] == "l2"
    assert table.column("id").to_pylist() == [r["id"] for r in rows]  # index order


def test_faiss_docstore_mismatch_is_named(tmp_path, docs):
    import faiss

    rows, vectors = docs
    index = faiss.IndexFlatIP(384)
    index.add(vectors)
    faiss.write_index(index, str(tmp_path / "index.faiss"))
    pq.write_table(pa.Table.from_pylist([{"id": r["id"], "text": r["text"]} for r in rows[:-1]]), tmp_path / "d.parquet")
    with pytest.raises(ExportError, match="docstore has 59 rows and the index 60 vectors"):
        M.export(f"faiss://{tmp_path}/index.faiss?docstore=d.parquet", str(tmp_path / "out"))


# ---------------------------------------------------------------------------------------------------
# Parts, schema, refusals


def test_part_writer_unifies_metadata_that_appears_or_widens_late(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    w = PartWriter(loc, part_rows=3)
    v = np.eye(4, dtype=np.float32)
    w.add(Batch(["a", "b", "c"], ["x", None, "z"], [{"n": 1}, {"n": 2}, {}], v[:3]))
    w.add(Batch(["d", "e", "f"], ["p", "q", "r"], [{"n": 1.5, "tag": "new"}, {"n": 2}, {"nested": {"k": [1, 2]}}], v[:3]))
    w.add(Batch(["g"], ["s"], [{"mixed": 1}], v[:1]))
    w.add(Batch(["h"], ["t"], [{"mixed": "one"}], v[1:2]))
    parts = w.close()
    tables = [pq.read_table(tmp_path / "out" / p["path"]) for p in parts]
    assert [t.num_rows for t in tables] == [3, 3, 2]
    assert len({t.schema for t in tables}) == 1
    schema = tables[0].schema
    assert schema.names == ["id", "text", "mixed", "n", "nested", "tag", "old_embedding"]
    assert schema.field("n").type == pa.float64() and schema.field("mixed").type == pa.string()
    allrows = pa.concat_tables(tables).to_pylist()
    assert [r["n"] for r in allrows[:5]] == [1.0, 2.0, None, 1.5, 2.0]
    assert allrows[5]["nested"] == '{"k": [1, 2]}' and allrows[1]["text"] is None
    assert [r["mixed"] for r in allrows[6:]] == ["1", "one"]


def test_part_writer_refuses_mixed_dimensions(tmp_path):
    w = PartWriter(Location.from_uri(str(tmp_path)), part_rows=10)
    w.add(Batch(["a"], ["x"], [{}], np.ones((1, 4), np.float32)))
    with pytest.raises(ExportError, match="'b' has a 3-d vector, earlier ones 4-d"):
        w.add(Batch(["b"], ["y"], [{}], np.ones((1, 3), np.float32)))


def test_export_refuses_to_overwrite_and_secrets_in_uris(tmp_path, docs):
    import chromadb

    fill_chroma(chromadb.PersistentClient(path=str(tmp_path / "chroma")), docs)
    uri = f"chroma://{tmp_path}/chroma?collection=docs"
    M.export(uri, str(tmp_path / "out"), part_rows=40)
    with pytest.raises(ExportError, match="already holds an export"):
        M.export(uri, str(tmp_path / "out"))
    summary = M.export(uri, str(tmp_path / "out"), part_rows=100, overwrite=True)
    assert len(summary["parts"]) == 1 and sorted(os.listdir(tmp_path / "out")) == ["_export.json", "part-00000.parquet"]
    with pytest.raises(ExportError, match="secrets never go in a URI .* set QDRANT_API_KEY"):
        M.parse_uri("qdrant://db:6333?collection=docs&api_key=abc")
    with pytest.raises(ExportError, match=r"no Chroma collection 'nope' \(collections: docs\)"):
        M.export(f"chroma://{tmp_path}/chroma?collection=nope", str(tmp_path / "x"))
    with pytest.raises(ExportError, match="unknown store scheme"):
        M.parse_uri("milvus://host/docs")


def test_cli_export(tmp_path, docs, capsys):
    import chromadb

    from reembed.cli import main

    fill_chroma(chromadb.PersistentClient(path=str(tmp_path / "chroma")), docs)
    assert main(["export", "--from", f"chroma://{tmp_path}/chroma?collection=docs", "--to", str(tmp_path / "o")]) == 0
    assert "exported 60 documents (384-d, metric l2)" in capsys.readouterr().out
    assert main(["export", "--from", f"chroma://{tmp_path}/chroma?collection=docs", "--to", str(tmp_path / "o")]) == 1
    assert "already holds an export" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Pinecone and Weaviate: no server here. These drive the paging code with stand-ins shaped like the
# official clients' documented responses (pinecone 10: ListResponse pages + FetchResponse; weaviate v4:
# collection.iterator objects); they do not prove the real clients behave so.


class _Obj:
    def __init__(self, **kw):
        self.__dict__.update(kw)


def test_pinecone_paging_against_a_stand_in():
    vectors = {f"v{i}": _Obj(id=f"v{i}", values=[float(i), 1.0], metadata={"text": f"doc {i}", "lang": "en"}) for i in range(250)}

    class Index:
        fetches: list[int] = []

        def list(self, namespace, limit):
            ids = list(vectors)
            for s in range(0, len(ids), limit):
                yield _Obj(vectors=[_Obj(id=i) for i in ids[s:s + limit]])

        def fetch(self, ids, namespace):
            self.fetches.append(len(ids))
            return _Obj(vectors={i: vectors[i] for i in ids if i != "v7"})  # v7 deleted meanwhile

    idx = Index()
    batches = list(PineconeStore(idx, "ns", fetch_size=40).batches(page_size=100))
    ids = [i for b in batches for i in b.ids]
    assert len(ids) == 249 and "v7" not in ids and max(idx.fetches) == 40
    b = batches[0]
    assert b.texts[0] == "doc 0" and b.metadata[0] == {"lang": "en"} and b.vectors.dtype == np.float32


def test_weaviate_cursor_against_a_stand_in():
    objs = [_Obj(uuid=f"00000000-0000-0000-0000-{i:012d}", properties={"text": f"t{i}", "k": i},
                 vector={"default": [1.0, float(i)]}) for i in range(5)]

    class Collection:
        def iterator(self, include_vector, cache_size):
            assert include_vector
            return iter(objs)

    batches = list(WeaviateStore(Collection()).batches(page_size=2))
    assert [len(b) for b in batches] == [2, 2, 1]
    assert batches[2].ids == [objs[4].uuid] and batches[2].texts == ["t4"] and batches[2].metadata == [{"k": 4}]
    assert np.array_equal(batches[1].vectors, np.array([[1, 2], [1, 3]], np.float32))
