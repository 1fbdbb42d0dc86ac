"""reembed.migrate.sinks and ``reembed publish``: an output's vectors into Chroma (a persistent folder and a real
``chroma run`` server), with the export's ids, text and metadata, versioned names, resume, swap and rollback."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest

from reembed.errors import ChecksumError, MigrationError
from reembed.migrate.sinks import SINKS_DIR, next_version, publish, rollback
from sink_fixtures import N_DOCS, chroma_server, cli, expected_metadata, synthetic_output  # noqa: F401


def read_collection(uri_path, name, host=None):
    import chromadb

    client = chromadb.HttpClient(host=host.split(":")[0], port=int(host.split(":")[1])) if host else \
        chromadb.PersistentClient(path=str(uri_path))
    col = client.get_collection(name, embedding_function=None)
    got = col.get(include=["embeddings", "documents", "metadatas"])
    order = np.argsort(got["ids"])
    return col, [got["ids"][i] for i in order], np.asarray(got["embeddings"])[order], \
        [got["documents"][i] for i in order], [got["metadatas"][i] for i in order]


def writers_of(out) -> dict[str, str]:
    """Each shard's done marker -> the process (host:pid) that wrote the shard."""
    return {p.name: json.loads(p.read_text())["worker"] for p in (out / SINKS_DIR).glob("*/done/*.json")}


def check_same_documents(col_data, ids, vectors, columns):
    _, got_ids, got_vecs, docs, metas = col_data
    assert got_ids == ids
    np.testing.assert_allclose(got_vecs, vectors, atol=1e-6)  # Chroma re-normalizes in cosine space
    assert docs == columns["text"]
    assert metas == [expected_metadata(columns, i) for i in range(len(ids))]


def test_publish_into_a_persistent_chroma_keeps_ids_text_and_metadata(tmp_path, ray_local):
    out, ids, vectors, columns = synthetic_output(tmp_path / "out")
    store = tmp_path / "chroma"
    summary = publish(out, f"chroma://{store}?collection=docs", batch_size=7)
    assert (summary["collection"], summary["version"], summary["count"]) == ("docs_v1", 1, N_DOCS)
    # A local folder has one writer: a Ray actor, not this process (no vector passed through here).
    assert len(summary["writers"]) == 1 and set(writers_of(tmp_path / "out").values()) == set(summary["writers"])
    assert not summary["writers"][0].endswith(f":{os.getpid()}")
    assert summary["rows_written"] == N_DOCS and summary["shards"] == 3 and summary["shards_resumed"] == 0
    col, *rest = read_collection(store, "docs_v1")
    check_same_documents((col, *rest), ids, vectors, columns)
    assert col.metadata["reembed_model"] == "test/new-model" and col.metadata["reembed_version"] == 1
    assert col.metadata["hnsw:space"] == "cosine"  # a normalized model, no app collection to copy it from
    # Progress: one small marker per shard, the target recorded once.
    markers = sorted(p.name for p in (tmp_path / "out" / SINKS_DIR).glob("*/done/*"))
    assert markers == ["part-00000.json", "part-00001.json", "part-00002.json"]
    # A rerun finds everything done: nothing written, same collection.
    again = publish(out, f"chroma://{store}?collection=docs", use_ray=False)
    assert (again["collection"], again["rows_written"], again["shards_resumed"]) == ("docs_v1", 0, 3)


def test_a_failed_publish_resumes_into_the_same_collection(tmp_path, ray_local):
    out, ids, vectors, columns = synthetic_output(tmp_path / "out")
    shard1 = sorted((tmp_path / "out" / "shards").glob("part-00001*.parquet"))[0]
    good = shard1.read_bytes()
    shard1.write_bytes(good[:-9] + b"corrupted")  # the second shard fails its checksum mid-publish
    uri = f"chroma://{tmp_path / 'chroma'}?collection=docs"
    with pytest.raises(ChecksumError):
        publish(out, uri, workers=1)
    _, got_ids, *_ = read_collection(tmp_path / "chroma", "docs_v1")
    assert got_ids == ids[:25]  # shard 0 written and marked, shard 1 not
    shard1.write_bytes(good)
    summary = publish(out, uri, use_ray=False)
    assert (summary["collection"], summary["shards_resumed"], summary["rows_written"]) == ("docs_v1", 1, 35)
    check_same_documents(read_collection(tmp_path / "chroma", "docs_v1"), ids, vectors, columns)


def test_swap_renames_the_app_collection_aside_and_rollback_renames_it_back(tmp_path):
    import chromadb

    store = tmp_path / "chroma"
    app = chromadb.PersistentClient(path=str(store)).create_collection(
        "docs", embedding_function=None, metadata={"hnsw:space": "ip"})
    app.upsert(ids=["legacy-1", "legacy-2"], embeddings=[[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]], documents=["a", "b"])
    out, ids, vectors, columns = synthetic_output(tmp_path / "out")
    uri = f"chroma://{store}?collection=docs"
    summary = publish(out, uri, swap=True, use_ray=False)
    swap = summary["swap"]
    assert swap["renames"] == [["docs", "docs_v0"], ["docs_v1", "docs"]] and swap["model"] == "test/new-model"
    assert 0 <= swap["window_seconds"] < 5
    col, got_ids, *_ = read_collection(store, "docs")
    assert got_ids == ids and col.metadata["hnsw:space"] == "ip"  # the app collection's space is kept
    assert read_collection(store, "docs_v0")[1] == ["legacy-1", "legacy-2"]
    back = rollback(uri)
    assert back["renames"] == [["docs", "docs_v1"], ["docs_v0", "docs"]]
    assert read_collection(store, "docs")[1] == ["legacy-1", "legacy-2"]
    # The next publish of a changed output takes the next free version.
    out2, *_ = synthetic_output(tmp_path / "out2", seed=1)
    assert publish(out2, uri, use_ray=False)["collection"] == "docs_v2"


def test_publish_through_a_chroma_server_in_parallel(tmp_path, chroma_server, ray_local):  # noqa: F811
    out, ids, vectors, columns = synthetic_output(tmp_path / "out")
    uri = f"chroma://{chroma_server}?collection=served"
    summary = publish(out, uri, workers=3, batch_size=10, swap=True)
    assert summary["collection"] == "served_v1" and summary["count"] == N_DOCS
    # A server is written by Ray tasks: every shard's marker names a worker process, none is this one.
    writers = writers_of(tmp_path / "out")
    assert len(writers) == 3 and not any(w.endswith(f":{os.getpid()}") for w in writers.values())
    assert sorted(set(writers.values())) == summary["writers"]
    assert summary["swap"]["renames"] == [["served_v1", "served"]]  # no app collection yet: nothing moved aside
    check_same_documents(read_collection(None, "served", host=chroma_server), ids, vectors, columns)


def test_next_version_counts_past_every_existing_version():
    assert next_version([], "docs") == ("docs_v1", 1)
    assert next_version(["docs", "docs_v1", "docs_v7", "docs_vx", "other_v9", "docs_v2_old"], "docs") == ("docs_v8", 8)


def test_cli_publish_prints_one_line_and_refuses_bad_targets(tmp_path, cli, capsys):  # noqa: F811
    out, *_ = synthetic_output(tmp_path / "out")
    uri = f"chroma://{tmp_path / 'chroma'}?collection=docs"
    assert cli(["publish", str(tmp_path / "out"), "--to", uri, "--swap", "--no-ray"]) == 0
    printed = capsys.readouterr().out
    assert f"published {N_DOCS} documents (16-d, test/new-model)" in printed and "as docs_v1" in printed
    assert "swapped: docs_v1 -> docs" in printed
    assert cli(["publish", "--rollback", "--to", uri, "--json"]) == 1  # nothing older than docs (v1) to go back to
    assert "no earlier docs_v<N>" in capsys.readouterr().err
    assert cli(["publish", str(tmp_path / "out"), "--to", "qdrant:///x?collection=docs"]) == 1
    assert "publishing into qdrant is not done here" in capsys.readouterr().err
    assert cli(["publish", "--to", uri]) == 2
    assert "needs OUTPUT_URI" in capsys.readouterr().err
    assert cli(["publish", str(tmp_path / "missing"), "--to", uri]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "manifest.json: not found" in err
    summary = json.loads(open(sorted((tmp_path / "out" / SINKS_DIR).glob("*/complete.json"))[0]).read())
    assert summary["count"] == N_DOCS


def test_a_collection_of_another_dimension_is_refused(tmp_path):
    import chromadb

    store = tmp_path / "chroma"
    col = chromadb.PersistentClient(path=str(store)).create_collection("docs_v1", embedding_function=None)
    col.upsert(ids=["x"], embeddings=[[1.0, 2.0]])
    out, *_ = synthetic_output(tmp_path / "out")
    sink_dir = tmp_path / "out" / SINKS_DIR
    # docs_v1 exists, so the publish takes docs_v2; force the collision by recording docs_v1 as the target.
    publish_uri = f"chroma://{store}?collection=docs"
    from reembed.migrate import sinks
    from reembed.migrate.stores import parse_uri
    from reembed.manifest import Manifest
    from reembed.storage import Location

    name = sinks.sink_name(parse_uri(publish_uri), Manifest.load(Location.from_uri(str(tmp_path / "out"))))
    (sink_dir / name).mkdir(parents=True)
    (sink_dir / name / "target.json").write_text(json.dumps({"uri": publish_uri, "collection": "docs_v1", "version": 1}))
    with pytest.raises(MigrationError, match="already holds 2-d vectors, the output 16-d"):
        publish(out, publish_uri)


# ---------------------------------------------------------------------------------------------------
# Pinecone: the official client against a stand-in of one index's data plane (tests/pinecone_standin.py)


def test_publish_into_pinecone_writes_a_versioned_namespace_that_exports_back_the_same(tmp_path, monkeypatch, ray_local):
    from pinecone_standin import PineconeStandin
    from reembed.migrate.export import export
    from reembed.migrate.stores import PineconeStore
    import pyarrow.parquet as pq

    monkeypatch.setenv("PINECONE_API_KEY", "test-key")
    monkeypatch.setattr(PineconeStore, "settle_seconds", 2.0)
    out, ids, vectors, columns = synthetic_output(tmp_path / "out")
    with PineconeStandin(dimension=16) as pc:
        pc.namespaces["docs_v1"] = {"old": {"id": "old", "values": [0.0] * 16}}  # an earlier version is there
        uri = f"pinecone://wordnet?namespace=docs&host={pc.url}"
        summary = publish(out, uri, batch_size=20, workers=2)
        assert (summary["collection"], summary["count"]) == ("docs_v2", N_DOCS)
        upserts = [n for method, path, n in pc.requests if path == "/vectors/upsert"]
        assert sorted(upserts) == [5, 5, 10, 20, 20]  # shards of 25, 25 and 10 rows in batches of up to 20
        stored = pc.namespaces["docs_v2"]
        assert sorted(stored) == ids
        np.testing.assert_array_equal(np.array([stored[i]["values"] for i in ids], np.float32), vectors)
        assert stored["doc-001"]["metadata"] == {**expected_metadata(columns, 1), "text": "text of document 1"}
        # The same ids, text and metadata come back through reembed's own export of that namespace.
        export(f"pinecone://wordnet?namespace=docs_v2&host={pc.url}", str(tmp_path / "export"))
        back = pq.read_table(tmp_path / "export" / "part-00000.parquet").sort_by("id").to_pydict()
        assert back["id"] == ids and back["text"] == columns["text"] and back["pos"] == columns["pos"]
        assert back["meta_id"] == columns["meta_id"]  # export's own rename, undone again by the next publish
        with pytest.raises(MigrationError, match="Pinecone has no aliases; point the app at namespace"):
            publish(out, uri, swap=True)


def test_publish_into_a_pinecone_index_of_another_dimension_is_refused(tmp_path, monkeypatch):
    from pinecone_standin import PineconeStandin

    monkeypatch.setenv("PINECONE_API_KEY", "test-key")
    out, *_ = synthetic_output(tmp_path / "out")
    with PineconeStandin(dimension=8) as pc:
        with pytest.raises(MigrationError, match="holds 8-d vectors, the output 16-d; create an index of dimension 16"):
            publish(out, f"pinecone://wordnet?namespace=docs&host={pc.url}")
        assert not any(path == "/vectors/upsert" for _, path, _ in pc.requests)


# ---------------------------------------------------------------------------------------------------
# Weaviate: the official v4 client against a stand-in server (tests/weaviate_standin.py)


def test_publish_into_weaviate_creates_a_versioned_collection_with_ids_text_and_metadata(tmp_path):
    import uuid

    from weaviate_standin import WeaviateStandin

    out, ids, vectors, columns = synthetic_output(tmp_path / "out")
    with WeaviateStandin() as wv:
        uri = f"weaviate://127.0.0.1:{wv.http_port}/Docs?grpc_port={wv.grpc_port}"
        summary = publish(out, uri, batch_size=20, use_ray=False)
        assert (summary["collection"], summary["count"]) == ("Docs_v1", N_DOCS)
        assert "Docs_v1" in wv.classes and "Docs" not in wv.classes
        assert wv.classes["Docs_v1"]["description"].startswith("reembed v1: test/new-model (16-d")
        stored = wv.objects["Docs_v1"]
        by_doc = {o["properties"]["doc_id"]: (u, o) for u, o in stored.items()}
        assert sorted(by_doc) == ids
        u, obj = by_doc["doc-002"]
        assert u == str(uuid.uuid5(uuid.NAMESPACE_URL, "reembed:doc-002"))  # not a UUID: uuid5, id kept in doc_id
        np.testing.assert_allclose(obj["vector"], vectors[2], rtol=0, atol=0)
        meta = expected_metadata(columns, 2)
        meta["meta_id"] = meta.pop("id")  # "id" is reserved by Weaviate
        assert obj["properties"] == {**meta, "text": "text of document 2", "doc_id": "doc-002"}
        # A second publish of another output takes the next version; --swap is refused with what to do instead.
        out2, *_ = synthetic_output(tmp_path / "out2", seed=3)
        assert publish(out2, uri, use_ray=False)["collection"] == "Docs_v2"
        with pytest.raises(MigrationError, match="point the app at 'Docs_v3' instead of --swap"):
            publish(synthetic_output(tmp_path / "out3", seed=4)[0], uri, swap=True, use_ray=False)


def test_rerunning_a_finished_publish_with_swap_writes_nothing_and_swaps_once(tmp_path):
    out, ids, *_ = synthetic_output(tmp_path / "out")
    uri = f"chroma://{tmp_path / 'chroma'}?collection=docs"
    first = publish(out, uri, swap=True, use_ray=False)
    assert first["swap"]["renames"] == [["docs_v1", "docs"]]
    again = publish(out, uri, swap=True, use_ray=False)
    assert again["rows_written"] == 0 and again["swap"]["renames"] == [] and "already" in again["swap"]["note"]
    assert read_collection(tmp_path / "chroma", "docs")[1] == ids


@pytest.mark.slow
def test_a_killed_publish_reruns_to_every_document_exactly_once(tmp_path, chroma_server, ray_local):  # noqa: F811
    """SIGKILL a real `reembed publish` (a driver of this session's Ray: Ray then ends its writer tasks) once
    some shards are marked, rerun the same command: the marked shards are skipped, the cut-off ones written
    again, and the collection holds each document once (count = rows, ids unique, vectors as committed)."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    import reembed

    n = 1200  # 48 shards of 25
    out, ids, vectors, _ = synthetic_output(tmp_path / "out", n=n)
    uri = f"chroma://{chroma_server}?collection=killed"
    command = [sys.executable, "-m", "reembed", "publish", str(tmp_path / "out"), "--to", uri, "--workers", "2",
               "--batch-size", "5"]
    src = str(Path(reembed.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")]),
           "RAY_ADDRESS": ray_local.get_runtime_context().gcs_address}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE, start_new_session=True)
    marked_at_kill = None
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if len(writers_of(tmp_path / "out")) >= 2:
                os.killpg(proc.pid, signal.SIGKILL)
                marked_at_kill = len(writers_of(tmp_path / "out"))
                break
            time.sleep(0.05)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever it left behind
        except ProcessLookupError:
            pass
        proc.wait(timeout=30)
    assert marked_at_kill is not None, f"never saw a shard marked: {proc.stderr.read().decode()[-2000:]}"
    # A task in flight may finish its shard before Ray ends the dead driver's tasks: wait until the markers
    # stop changing.
    marked, still = writers_of(tmp_path / "out"), time.monotonic()
    while time.monotonic() - still < 5:
        time.sleep(0.5)
        if (now := writers_of(tmp_path / "out")) != marked:
            marked, still = now, time.monotonic()
    assert 2 <= len(marked) < 48, "killed after the end: nothing left to resume"

    summary = publish(out, uri, workers=2, batch_size=50)
    assert summary["collection"] == "killed_v1"  # the same collection, not a new version
    assert (summary["shards_resumed"], summary["count"]) == (len(marked), n)
    assert {k: v for k, v in writers_of(tmp_path / "out").items() if k in marked} == marked  # not written again
    _, got_ids, got_vecs, *_ = read_collection(None, "killed_v1", host=chroma_server)
    order = np.argsort(ids)  # read_collection sorts by id: doc-1000 before doc-101
    assert got_ids == [ids[i] for i in order] and len(set(got_ids)) == n
    np.testing.assert_allclose(got_vecs, vectors[order], atol=1e-6)


def test_swap_and_rollback_move_a_weaviate_alias_in_one_call(tmp_path):
    """Against a stand-in of Weaviate >= 1.32's alias API (tests/weaviate_standin.py, written from the API docs):
    --swap creates the app's alias, a later --swap moves it, --rollback moves it back; a collection of the app's
    name is refused with what to do."""
    from reembed.migrate.stores import WeaviateStore, parse_uri
    from weaviate_standin import WeaviateStandin, _completed

    with WeaviateStandin(version="1.32.0") as wv:
        uri = f"weaviate://127.0.0.1:{wv.http_port}/Docs?grpc_port={wv.grpc_port}"
        first = publish(synthetic_output(tmp_path / "out1")[0], uri, swap=True, use_ray=False)
        assert first["swap"]["renames"] == [["Docs", "Docs_v1"]] and wv.aliases == {"Docs": "Docs_v1"}
        assert first["swap"]["model"] == "test/new-model" and "(created)" in first["swap"]["note"]
        second = publish(synthetic_output(tmp_path / "out2", n=40, seed=1)[0], uri, swap=True, use_ray=False)
        assert second["swap"]["renames"] == [["Docs", "Docs_v2"]] and wv.aliases == {"Docs": "Docs_v2"}
        with WeaviateStore.from_uri(parse_uri(uri)) as app:  # the app's name answers with the new collection
            assert app.handle.aggregate.over_all(total_count=True).total_count == 40
        back = rollback(uri)
        assert back["renames"] == [["Docs", "Docs_v1"]] and wv.aliases == {"Docs": "Docs_v1"}
        with pytest.raises(MigrationError, match="no earlier Docs_v<N>"):
            rollback(uri)

        wv.classes["Notes"] = _completed({"class": "Notes"})  # an app that queries its collection itself
        notes = f"weaviate://127.0.0.1:{wv.http_port}/Notes?grpc_port={wv.grpc_port}"
        out3 = synthetic_output(tmp_path / "out3")[0]
        with pytest.raises(MigrationError, match="'Notes' is a collection, and a Weaviate alias cannot take"):
            publish(out3, notes, swap=True, use_ray=False)
        assert wv.aliases == {"Docs": "Docs_v1"}  # nothing created
        aliased = publish(out3, f"{notes}&alias=NotesLive", swap=True, use_ray=False)
        assert aliased["swap"]["renames"] == [["NotesLive", "Notes_v1"]] and wv.aliases["NotesLive"] == "Notes_v1"
