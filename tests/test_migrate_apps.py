"""A LangChain and a LlamaIndex QdrantVectorStore app survive the migration unchanged: export keeps their
payload layout and point ids, the index stage writes them back, adopt turns the app's collection name into an
alias, swap moves it to the new model's collection and rollback moves it back. The apps are the real
libraries on embedded Qdrant with real models (all-MiniLM-L6-v2 -> its 1024-d projection); the new vectors
are embedded directly (no Ray) so this stays fast; `reembed migrate` end to end is in test_migrate_flow.py."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import uuid

import numpy as np
import pyarrow as pa
import pytest

import reembed.migrate as M
from app_fixtures import (COLLECTION, build_langchain_app, build_llamaindex_app, langchain_answers,
                          llamaindex_answers)
from migrate_fixtures import embed, model_info, proj, write_output  # noqa: F401 (fixture)
from reembed.config import IndexConfig
from reembed.errors import MigrationError, SwapRefused
from reembed.indexes import qdrant as Q
from reembed.indexes.build import build_indexes
from reembed.indexes.swap import rollback, swap
from reembed.migrate.parts import read_parts
from reembed.storage import Location

pytest.importorskip("langchain_qdrant")
pytest.importorskip("llama_index.vector_stores.qdrant")


def _new_collection(tmp_path, app, proj, layout: str):
    """Export the app's store, embed its texts with the new model, and load the new collection beside the
    old one through the index stage (what `reembed run` + `reembed index` do, without Ray)."""
    summary = M.export(f"qdrant://{app}?collection={COLLECTION}", str(tmp_path / "export"))
    assert summary["layout"]["kind"] == layout and summary["text_missing"] == 0
    table = pa.concat_tables([t for _, t in read_parts(Location.from_uri(str(tmp_path / "export")))])
    texts = table.column("text").to_pylist()
    out = write_output(tmp_path / "out", table.column("id").to_pylist(), embed(proj, texts), model_info(proj, 1024),
                       columns={c: table.column(c) for c in ("text", "_payload", "_point_id")})
    rec = build_indexes(out, IndexConfig(faiss="none", qdrant=str(app), collection=COLLECTION), use_ray=False)["qdrant"]
    return summary, table, out, rec["collection"]


def test_langchain_app_reads_the_new_collection_through_adopt_swap_and_rollback(tmp_path, minilm, proj):
    app = tmp_path / "app"
    ids = build_langchain_app(app, minilm)
    before = langchain_answers(app, minilm, ids)
    summary, table, out, new = _new_collection(tmp_path, app, proj, "langchain")

    # The export keeps the texts (page_content), the ids LangChain gave, and the nested metadata.
    assert summary["layout"]["text_field"] == "page_content" and summary["layout"]["id_kind"] == "uuid"
    assert summary["layout"]["json_columns"] == ["metadata"]
    assert sorted(table.column("_point_id").to_pylist()) == sorted(str(uuid.UUID(i)) for i in ids)
    payload = json.loads(table.column("_payload")[0].as_py())
    assert set(payload) == {"page_content", "metadata"} and isinstance(payload["metadata"]["tags"], list)

    # The app's name is a collection: swap is refused with the way out, then adopt makes it an alias.
    with pytest.raises(SwapRefused, match="reembed adopt"):
        swap(COLLECTION, new, qdrant=str(app), output=out, force=True)
    adopted = M.adopt(f"qdrant://{app}?collection={COLLECTION}", model=str(minilm), use_ray=False)
    assert adopted["collection"] == f"{COLLECTION}-v0" and adopted["same_results"] and adopted["points"] == 60
    assert 0 <= adopted["window_seconds"] < 5 and "did not exist for" in adopted["window"]
    assert langchain_answers(app, minilm, ids) == before  # through the alias, the same app answers the same

    moved = swap(COLLECTION, new, qdrant=f"qdrant://{app}", output=out, force=True)
    assert moved["to"] == new and moved["model"] == str(proj) and moved["dimension"] == 1024
    after = langchain_answers(app, proj, ids)
    assert after["top"][0] == before["top"][0]  # page_content, metadata.doc_id and nested metadata.tags
    assert after["filtered"] == ["astro"] * 5  # the filter on metadata.topic
    assert after["by_id"] == before["by_id"]  # get_by_ids with LangChain's own ids
    with pytest.raises(Exception, match="384|1024|dim"):  # the old query model no longer fits
        langchain_answers(app, minilm, ids)

    # The old collection and the new one, in the same embedded folder, open at once in this process (as
    # `reembed validate --old qdrant://APP?collection=documents-v0 --qdrant qdrant://APP?collection=documents`).
    with M.open_store(f"qdrant://{app}?collection={COLLECTION}-v0", model=str(minilm), name="old") as old, \
            M.open_store(f"qdrant://{app}?collection={COLLECTION}", model=str(proj), name="new") as now:
        hits = M.dual_query("how do I make bread rise", old, now, k=3)
        assert (old.dim, now.dim) == (384, 1024) and hits[0].text == before["top"][0][0]

    back = rollback(COLLECTION, qdrant=str(app))
    assert back["to"] == f"{COLLECTION}-v0" and back["model"] == str(minilm) and back["dimension"] == 384
    assert langchain_answers(app, minilm, ids) == before


def test_llamaindex_app_reads_the_new_collection_through_adopt_swap_and_rollback(tmp_path, minilm, proj):
    app = tmp_path / "app"
    ids = build_llamaindex_app(app, minilm)
    before = llamaindex_answers(app, minilm, ids)
    summary, table, out, new = _new_collection(tmp_path, app, proj, "llamaindex")
    assert summary["layout"]["text_field"] == "_node_content.text"
    assert sorted(table.column("id").to_pylist()) == sorted(ids)  # node ids are the point ids
    assert table.column("source_id").to_pylist()[:1] and "_node_content" not in table.column_names

    M.adopt(f"qdrant://{app}?collection={COLLECTION}", model=str(minilm), use_ray=False)
    swap(COLLECTION, new, qdrant=str(app), output=out, force=True)
    after = llamaindex_answers(app, proj, ids)
    assert after["top"][0] == before["top"][0] and after["top"][0][1] == "cook-0"  # node rebuilt from _node_content
    assert after["filtered"] == ["astro"] * 5
    assert after["by_id"] == before["by_id"]
    rollback(COLLECTION, qdrant=str(app))
    assert llamaindex_answers(app, minilm, ids) == before


def test_a_hand_made_payload_with_integer_ids_is_written_back_as_it_was(tmp_path):
    """Arbitrary payloads (nested values, no text field reembed knows) and integer point ids."""
    from qdrant_client import QdrantClient, models

    rng = np.random.default_rng(0)
    client = QdrantClient(path=str(tmp_path / "app"))
    client.create_collection("docs", vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
    payloads = [{"body": f"text {i}", "info": {"n": i, "tags": ["a", str(i)]}, "score": i / 2} for i in range(12)]
    client.upsert("docs", points=[models.PointStruct(id=i * 7, vector=rng.standard_normal(8).tolist(), payload=p)
                                  for i, p in enumerate(payloads)])
    client.close()
    summary = M.export(f"qdrant://{tmp_path}/app?collection=docs&text_field=body", str(tmp_path / "export"))
    assert summary["layout"]["id_kind"] == "int" and summary["text_missing"] == 0
    table = pa.concat_tables([t for _, t in read_parts(Location.from_uri(str(tmp_path / "export")))])
    out = write_output(tmp_path / "out", table.column("id").to_pylist(), rng.standard_normal((12, 4)),
                       model_info("new-model", 4), columns={c: table.column(c) for c in ("_payload", "_point_id")})
    rec = build_indexes(out, IndexConfig(faiss="none", qdrant=str(tmp_path / "app"), collection="docs"),
                        use_ray=False)["qdrant"]
    got = _payloads(tmp_path / "app", rec["collection"])
    assert got == {i * 7: p for i, p in enumerate(payloads)}

    # Without _point_id (migrate --point-ids derive) the ids are reembed's uuid5 of the document ids.
    out = write_output(tmp_path / "out2", table.column("id").to_pylist(), rng.standard_normal((12, 4)),
                       model_info("new-model", 4), columns={"_payload": table.column("_payload")})
    rec = build_indexes(out, IndexConfig(faiss="none", qdrant=str(tmp_path / "app"), collection="derived"),
                        use_ray=False)["qdrant"]
    got = _payloads(tmp_path / "app", rec["collection"])
    assert got == {Q.point_id(str(i * 7)): p for i, p in enumerate(payloads)}


def test_adopt_killed_inside_its_window_is_finished_by_a_rerun(tmp_path):
    """SIGKILL between deleting the app's collection and creating the alias: the rerun creates the alias."""
    from qdrant_client import QdrantClient, models

    client = QdrantClient(path=str(tmp_path / "app"))
    client.create_collection("docs", vectors_config=models.VectorParams(size=4, distance=models.Distance.DOT))
    client.upsert("docs", points=[models.PointStruct(id=i, vector=[float(i), 1.0, 0.5, -1.0], payload={"k": i})
                                  for i in range(30)])
    client.close()
    uri = f"qdrant://{tmp_path}/app?collection=docs"
    code = f"import reembed.migrate as M; M.adopt({uri!r}, model='old-model', use_ray=False)"
    env = {**__import__("os").environ, "REEMBED_MIGRATE_KILL_AT": "adopt-window"}
    killed = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    client = Q.connect(str(tmp_path / "app"))
    try:
        assert Q.collections(client) == ["docs-v0"] and Q.aliases(client) == {}  # the name is gone: in the window
    finally:
        client.close()
    again = M.adopt(uri)
    assert again["alias"] == "docs" and again["collection"] == "docs-v0" and again["resumed_window"]
    third = M.adopt(uri)
    assert third["changed"] is False and third["model"] == "old-model" and third["points"] == 30
    client = Q.connect(str(tmp_path / "app"))
    try:
        assert Q.aliases(client) == {"docs": "docs-v0"} and Q.count(client, "docs") == 30
    finally:
        client.close()


def test_adopt_refuses_what_it_cannot_adopt(tmp_path):
    from qdrant_client import QdrantClient

    QdrantClient(path=str(tmp_path / "app")).close()
    with pytest.raises(MigrationError, match="no collection or alias named 'docs'"):
        M.adopt(f"qdrant://{tmp_path}/app?collection=docs")
    with pytest.raises(MigrationError, match="adopt takes a Qdrant collection"):
        M.adopt(f"chroma://{tmp_path}/app?collection=docs")


def test_one_process_opens_an_embedded_folder_once(tmp_path):
    """The old store and the new collection in one folder, opened twice in one process: one client, shared;
    the folder is free for another process once both are closed."""
    a = Q.connect(str(tmp_path / "q"))
    b = Q.connect(str(tmp_path / "q"))
    try:
        a.create_collection("x", vectors_config=__import__("qdrant_client").models.VectorParams(size=2, distance="Dot"))
        assert Q.collections(b) == ["x"]
        a.close()
        assert Q.collections(b) == ["x"]  # b still works after a closed
    finally:
        a.close()
        b.close()
    other = subprocess.run([sys.executable, "-c", f"from qdrant_client import QdrantClient; "
                            f"c = QdrantClient(path={str(tmp_path / 'q')!r}); print(c.get_collections()); c.close()"],
                           capture_output=True, text=True)
    assert other.returncode == 0, other.stderr[-2000:]


def test_adopt_and_versions_on_the_command_line(tmp_path, capsys, ray_local):
    """`reembed adopt` says what the window was and how long; `versions` takes the same qdrant:// URI and
    shows the recorded model; `swap` onto the app's own collection name points at adopt. The embedded folder is
    copied by one Ray task on this node, while this process has let go of it (one process may open it)."""
    from qdrant_client import QdrantClient, models

    from reembed.cli import main

    for app in ("app", "app2"):
        client = QdrantClient(path=str(tmp_path / app))
        client.create_collection("docs", vectors_config=models.VectorParams(size=3, distance=models.Distance.COSINE))
        client.upsert("docs", points=[models.PointStruct(id=i, vector=[1.0, i, 2.0 - i]) for i in range(5)])
        client.close()
    assert main(["adopt", "--store", f"qdrant://{tmp_path}/app2?collection=docs", "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    assert len(record["copied_by"]) == 1 and not record["copied_by"][0].endswith(f":{os.getpid()}")
    assert (record["points"], record["queries_checked"], record["same_results"]) == (5, 5, True)
    uri = f"qdrant://{tmp_path}/app?collection=docs"
    assert main(["adopt", "--store", uri, "--model", "old-model", "--no-ray"]) == 0
    out = capsys.readouterr().out
    assert "adopted: docs is now an alias -> docs-v0 (5 points, query model old-model)" in out
    assert re.search(r"window: the name 'docs' did not exist for [0-9.]+ ms", out)
    assert "checked: 5 sample queries answer the same before and after" in out
    assert main(["versions", "--qdrant", f"qdrant://{tmp_path}/app"]) == 0
    assert re.search(r"docs-v0 +old-model +3 +5 +none +ready +docs", capsys.readouterr().out)
    assert main(["adopt", "--store", uri]) == 0
    assert "already an alias -> docs-v0; nothing changed" in capsys.readouterr().out


def _payloads(folder, collection: str) -> dict:
    """point id -> payload of every point of ``collection`` in an embedded Qdrant folder."""
    client = Q.connect(str(folder))
    try:
        return {p.id: p.payload for p in client.scroll(collection, limit=100, with_payload=True)[0]}
    finally:
        client.close()


# ---------------------------------------------------------------------------------------------------
# Dual write into an app's collection: the app's own library reads the document back as one of its own


def test_dual_write_into_langchain_apps_writes_their_layout(tmp_path, tiny_model):
    from langchain_qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    from app_fixtures import langchain_embeddings

    for side in ("old", "new"):
        build_langchain_app(tmp_path / side, tiny_model)
    new_id, text = str(uuid.uuid4()), "A brand new recipe: sourdough rises overnight in a cool kitchen."
    with M.open_store(f"qdrant://{tmp_path / 'old'}?collection={COLLECTION}", str(tiny_model), "old") as old, \
            M.open_store(f"qdrant://{tmp_path / 'new'}?collection={COLLECTION}", str(tiny_model), "new") as new:
        docs = [{"id": new_id, "text": text, "topic": "food", "tags": ["food", "v2"]}]
        M.dual_write(docs, old, new)
        M.dual_write(docs, old, new)  # written again: replaced, not added
    for side in ("old", "new"):
        client = QdrantClient(path=str(tmp_path / side))
        try:
            assert client.count(COLLECTION, exact=True).count == 61  # the corpus' 60, and this one once
            store = QdrantVectorStore(client=client, collection_name=COLLECTION,
                                      embedding=langchain_embeddings(tiny_model))
            (got,) = store.get_by_ids([new_id])
            assert got.page_content == text and got.metadata["_id"] == new_id
            assert {k: got.metadata[k] for k in ("topic", "tags")} == {"topic": "food", "tags": ["food", "v2"]}
            assert store.similarity_search(text, k=1)[0].page_content == text
        finally:
            client.close()


def test_dual_write_into_llamaindex_apps_writes_their_nodes(tmp_path, tiny_model):
    from llama_index.core import VectorStoreIndex
    from llama_index.vector_stores.qdrant import QdrantVectorStore
    from qdrant_client import QdrantClient

    from app_fixtures import llamaindex_embeddings

    for side in ("old", "new"):
        build_llamaindex_app(tmp_path / side, tiny_model)
    text = "A brand new node about telescopes seeing faint galaxies."
    with M.open_store(f"qdrant://{tmp_path / 'old'}?collection={COLLECTION}", str(tiny_model), "old") as old, \
            M.open_store(f"qdrant://{tmp_path / 'new'}?collection={COLLECTION}", str(tiny_model), "new") as new:
        M.dual_write([{"id": "late-7", "text": text, "source_id": "late-7", "topic": "astro"}], old, new)
    node_id = str(uuid.uuid5(Q.NAMESPACE, "late-7"))  # not a UUID: the one point id rule
    for side in ("old", "new"):
        client = QdrantClient(path=str(tmp_path / side))
        try:
            store = QdrantVectorStore(client=client, collection_name=COLLECTION)
            (node,) = store.get_nodes(node_ids=[node_id])
            assert node.node_id == node_id and node.get_content() == text
            assert node.metadata == {"source_id": "late-7", "topic": "astro"}
            index = VectorStoreIndex.from_vector_store(store, embed_model=llamaindex_embeddings(tiny_model))
            top = index.as_retriever(similarity_top_k=1).retrieve(text)
            assert top[0].node.node_id == node_id and top[0].node.metadata["source_id"] == "late-7"
        finally:
            client.close()


def test_runs_of_pages_from_the_scrolled_starts_copy_every_point_once(tmp_path):
    """What the copying tasks of a server adopt do, here one run after another on embedded Qdrant: the starts
    come from scrolling ids only, each run scrolls its pages from its start, and together they copy each point
    once (mixed integer and UUID ids, a last page that is not full)."""
    from qdrant_client import QdrantClient, models

    from reembed.migrate.adopt import _copy_points, _create_copy, page_starts

    ids = list(range(0, 150, 3)) + [str(uuid.uuid5(uuid.NAMESPACE_URL, f"p{i}")) for i in range(47)]
    client = QdrantClient(path=str(tmp_path / "app"))
    client.create_collection("docs", vectors_config=models.VectorParams(size=4, distance=models.Distance.COSINE))
    rng = np.random.default_rng(0)
    client.upsert("docs", points=[models.PointStruct(id=i, vector=rng.standard_normal(4).tolist(), payload={"n": n})
                                  for n, i in enumerate(ids)])
    client.close()
    client = Q.connect(str(tmp_path / "app"))
    try:
        starts = page_starts(client, "docs", page_size=7, every=3)
        assert len(starts) == -(-len(ids) // 21) and starts[0] is None  # 97 points: 14 pages, 5 runs of 3
        _create_copy(client, "docs", "docs-v0", "m")
        runs = [_copy_points(client, "docs", "docs-v0", 7, 4, 0, start=s, pages=3) for s in starts]
        assert [r["points"] for r in runs] == [21, 21, 21, 21, 13]
        assert Q.count(client, "docs-v0") == len(ids)
        copied = {p.id: p.payload for p in client.scroll("docs-v0", limit=200, with_payload=True)[0]}
        assert copied == {p.id: p.payload for p in client.scroll("docs", limit=200, with_payload=True)[0]}
    finally:
        client.close()


@pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="QDRANT_URL not set (no Qdrant server here)")
def test_adopt_on_a_server_copies_with_parallel_ray_tasks(ray_local):
    from qdrant_client import models

    url, name = os.environ["QDRANT_URL"], f"adopt-{uuid.uuid4().hex[:8]}"
    client = Q.connect(url)
    try:
        client.create_collection(name, vectors_config=models.VectorParams(size=8, distance=models.Distance.COSINE))
        rng = np.random.default_rng(1)
        client.upsert(name, points=[models.PointStruct(id=i, vector=rng.standard_normal(8).tolist(), payload={"i": i})
                                    for i in range(3000)])
        result = M.adopt(f"{url.replace('http', 'qdrant', 1)}?collection={name}", page_size=100, workers=3)
        assert result["points"] == 3000 and result["same_results"] and len(result["copied_by"]) >= 2
        assert not any(w.endswith(f":{os.getpid()}") for w in result["copied_by"])
        assert Q.aliases(client)[name] == result["collection"]
    finally:
        for c in (name, f"{name}-v0"):
            if c in Q.collections(client):
                client.delete_collection(c)
        client.close()
