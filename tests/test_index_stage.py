"""The index stage: FAISS and Qdrant from the committed shards, in parallel, resumable, recorded in the
manifest; the index / versions / swap / rollback / search commands."""

from __future__ import annotations

import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import reembed
from index_fixtures import cli_logging_reset, clustered, fast_tmp, qdrant_target, write_output  # noqa: F401 (fixtures)
from reembed import cli
from reembed import validation as V
from reembed.config import IndexConfig
from reembed.indexes import qdrant as Q
from reembed.indexes import build as stage
from reembed.manifest import Manifest, ManifestError
from reembed.storage import Location


def _manifest(out: str) -> Manifest:
    return Manifest.load(Location.from_uri(out))


def _index_state(out: str) -> dict:
    return _manifest(out).data["stages"]["index"]


def _cfg(qdrant_target, **kw) -> IndexConfig:
    target, prefix = qdrant_target
    return IndexConfig(qdrant=target, collection=prefix, **kw)


def _qdrant_count(target: str, collection: str) -> int:
    c = Q.connect(target)
    try:
        return Q.count(c, collection)
    finally:
        c.close()


def test_counts_agree_and_a_rerun_changes_nothing(fast_tmp, qdrant_target):
    out = write_output(fast_tmp / "out", clustered(1200, 16, seed=1), shard_rows=100)
    cfg = _cfg(qdrant_target, faiss="hnsw", batch_size=64)
    first = stage.build_indexes(out, cfg, use_ray=False)

    rows = sum(r["rows"] for r in _manifest(out).committed.values())
    f, q = first["faiss"], first["qdrant"]
    assert rows == 1200 == f["ntotal"] == q["count"] == _qdrant_count(cfg.qdrant, q["collection"])
    assert q["collection"] == f"{cfg.collection}-v1" and (q["shards"], q["resumed_shards"]) == (12, 0)
    state = _index_state(out)
    assert state["faiss"]["status"] == state["qdrant"]["status"] == "done"
    assert state["faiss"]["sha256"] == f["sha256"] and state["faiss"]["params"]["factory"] == "HNSW32"
    meta = _collection_meta(cfg.qdrant, q["collection"])
    assert (meta["state"], meta["rows"], meta["dimension"]) == ("ready", 1200, 16)
    assert meta["fingerprint"] == _manifest(out).model["fingerprint"]

    index_file = Path(out) / f["path"]
    before = (_manifest(out).data["generation"], index_file.stat().st_mtime_ns, _collections(cfg.qdrant, cfg.collection))
    again = stage.build_indexes(out, cfg, use_ray=False)
    after = (_manifest(out).data["generation"], index_file.stat().st_mtime_ns, _collections(cfg.qdrant, cfg.collection))
    assert after == before  # not a byte of the manifest, the FAISS file or the Qdrant target changed
    assert again == first


def test_other_faiss_settings_make_a_new_version_and_keep_the_old(fast_tmp):
    out = write_output(fast_tmp / "out", clustered(1500, 16, seed=2), shard_rows=500)
    v1 = stage.build_indexes(out, IndexConfig(faiss="hnsw", qdrant="none"), use_ray=False)["faiss"]
    v2 = stage.build_indexes(out, IndexConfig(faiss="flat", qdrant="none"), use_ray=False)["faiss"]
    assert (v1["version"], v2["version"]) == (1, 2)
    assert v2["path"] == "indexes/faiss/index-v2.faiss" and (Path(out) / v1["path"]).exists()
    state = _index_state(out)
    assert [r["version"] for r in state["faiss_history"]] == [1]
    m = _manifest(out)
    assert stage.faiss_record(m)["version"] == 2 and stage.faiss_record(m, 1)["path"] == v1["path"]


def test_an_incomplete_output_is_refused(fast_tmp):
    out = write_output(fast_tmp / "out", clustered(300, 8), shard_rows=100)
    m = _manifest(out)
    m.data["plan"]["shards"] = m.shard_count + 1
    m.save()
    with pytest.raises(ManifestError, match="1 shards are not committed"):
        stage.build_indexes(out, IndexConfig(qdrant="none"), use_ray=False)


def test_killed_index_resumes_to_qdrant_count_faiss_ntotal_and_manifest_rows(fast_tmp, qdrant_target):
    """SIGKILL a real `reembed index` once some shards are recorded loaded, rerun: the shards recorded are
    skipped, the same collection is finished, and Qdrant count = FAISS ntotal = manifest rows (each
    document once). Against a server the killed load ran 4 writers at once."""
    out = write_output(fast_tmp / "out", clustered(1200, 16, seed=3), shard_rows=30)  # 40 shards
    cfg = _cfg(qdrant_target, batch_size=5)
    command = [sys.executable, "-m", "reembed", "index", out, "--no-ray", "--faiss", "flat", "--qdrant", cfg.qdrant,
               "--collection", cfg.collection, "--batch-size", "5", "--workers", "4"]
    src = str(Path(reembed.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen(command, env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    done_at_kill = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            q = (_manifest(out).data.get("stages") or {}).get("index", {}).get("qdrant") or {}
            if q.get("status") == "loading" and len(_progress(out, q)) >= 2:
                proc.send_signal(signal.SIGKILL)
                done_at_kill = len(_progress(out, q))
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and done_at_kill is None:
            proc.kill()
        proc.wait(timeout=30)
    assert done_at_kill is not None, f"never saw the upload in progress: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    killed = _index_state(out)["qdrant"]
    recorded = _progress(out, killed)
    assert killed["status"] == "loading" and done_at_kill <= len(recorded) < 40
    stamps = {p.name: p.stat().st_mtime_ns for p in recorded}
    collection = killed["collection"]
    assert _qdrant_count(cfg.qdrant, collection) < 1200

    assert cli.main(["index", out, "--no-ray", "--faiss", "flat", "--qdrant", cfg.qdrant, "--collection",
                     cfg.collection, "--batch-size", "64"]) == 0
    state = _index_state(out)
    q, f = state["qdrant"], state["faiss"]
    assert q["collection"] == collection and q["build"] == killed["build"]  # resumed, not a new version
    assert q["status"] == "done" and (q["shards"], q["resumed_shards"]) == (40, len(recorded))
    assert {p.name: p.stat().st_mtime_ns for p in _progress(out, q) if p.name in stamps} == stamps  # not loaded again
    assert len(_progress(out, q)) == 40
    rows = sum(r["rows"] for r in _manifest(out).committed.values())
    assert _qdrant_count(cfg.qdrant, collection) == q["count"] == f["ntotal"] == rows == 1200
    c = Q.connect(cfg.qdrant)
    try:
        ids, offset = [], None
        while True:
            points, offset = c.scroll(collection, limit=500, offset=offset, with_payload=True)
            ids += [p.payload["id"] for p in points]
            if offset is None:
                break
        assert sorted(ids) == sorted(f"d{i}" for i in range(1200))  # each document exactly once
        assert [v for v in Q.collections(c) if v.startswith(cfg.collection)] == [collection]
    finally:
        c.close()


def _progress(out: str, record: dict) -> list[Path]:
    """The progress records of a Qdrant build (one per shard loaded)."""
    folder = Path(out) / "_index" / "qdrant" / record["build"]
    return sorted(folder.glob("*.json")) if folder.is_dir() else []


@pytest.mark.ray
def test_faiss_and_qdrant_build_at_the_same_time_as_ray_tasks(fast_tmp, ray_local):
    out = write_output(fast_tmp / "out", clustered(12000, 32, seed=4), shard_rows=1000)
    result = stage.build_indexes(out, IndexConfig(faiss="hnsw", batch_size=100))
    state = _index_state(out)
    f, q = state["faiss"], state["qdrant"]
    assert f["ntotal"] == q["count"] == 12000
    assert result["faiss"] == f and result["qdrant"] == q
    fs, fe, qs, qe = (dt.datetime.fromisoformat(t) for t in (f["started_at"], f["finished_at"], q["started_at"], q["finished_at"]))
    overlap = (min(fe, qe) - max(fs, qs)).total_seconds()
    assert overlap > 0, f"builds ran one after the other: faiss {fs}..{fe}, qdrant {qs}..{qe}"


@pytest.mark.ray
def test_run_with_index_then_search_versions_swap_rollback(tmp_path, fast_tmp, tiny_model, ray_local, capsys):
    """One real job with the index stage configured, then every subcommand on its output."""
    from conftest import make_docs, write_parquet
    from reembed import pipeline
    from reembed.config import load_config

    docs = make_docs(240)
    write_parquet(tmp_path / "docs" / "a.parquet", docs)
    out = str(fast_tmp / "out")
    cfg = load_config(None, [f"input.uri={tmp_path / 'docs'}", f"output.uri={out}", f"model.name={tiny_model}",
                             "plan.shard_rows=50", "input.passthrough=[text, lang]", "index.enabled=true"])
    summary = pipeline.run(cfg)
    f, q = summary["index"]["faiss"], summary["index"]["qdrant"]
    assert summary["embedded"] == 240 == f["ntotal"] == q["count"]
    assert f["params"]["factory"] == "Flat"  # auto: under 1,000 vectors exact search wins
    assert q["target"] == str(Path(out) / "indexes" / "qdrant") and q["collection"] == "documents-v1"

    # search: a document's own text finds it (or an identical text) first, at cosine ~1.
    text = docs[17]["text"]
    same_text = {d["id"] for d in docs if d["text"] == text}
    assert cli.main(["search", out, text, "-k", "5", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)[0]["hits"]
    assert len(hits) == 5 and hits[0]["id"] in same_text and hits[0]["score"] == pytest.approx(1.0, abs=1e-4)

    # versions lists the collection with model, dimension, points; FAISS versions from the manifest.
    assert cli.main(["versions", "--output", out, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    [coll] = listed["qdrant"]["collections"]
    assert (coll["collection"], coll["dimension"], coll["points"], coll["model"]) == ("documents-v1", 32, 240, str(tiny_model))
    assert [r["version"] for r in listed["faiss"]] == [1]

    # swap needs a passing validation report (the tiny random model has none) unless --force ...
    assert cli.main(["swap", "--output", out, "--alias", "documents", "--to", "documents-v1"]) == 1
    assert "validation gate" in capsys.readouterr().err
    # ... and checks the count against the manifest and the dimension against the job's model.
    assert cli.main(["swap", "--output", out, "--alias", "documents", "--to", "documents-v1", "--dimension", "384", "--force"]) == 1
    assert "vectors have dimension 32, but the alias's queries are 384-d" in capsys.readouterr().err
    assert cli.main(["swap", "--output", out, "--alias", "documents", "--to", "documents-v1", "--force"]) == 0
    assert "documents: (new) -> documents-v1" in capsys.readouterr().out
    assert cli.main(["rollback", "--output", out, "--alias", "documents"]) == 1
    assert "nothing to roll back" in capsys.readouterr().err

    # validate finds the output's own FAISS index for its ANN-recall gate.
    V.validate(out, settings=V.Settings(builtin_pairs=False))
    report = json.loads(_manifest(out).loc.read_bytes("validation/report.json"))
    # (the tiny random model gives many tied vectors here, so only the wiring is checked, not the value)
    assert 0 < report["gates"]["ann_recall"]["recall"]["faiss"] <= 1

    # a rerun of the whole job changes nothing; a corrupted index is refused by search.
    gen = _manifest(out).data["generation"]
    assert pipeline.run(cfg)["index"]["faiss"] == f and _manifest(out).data["generation"] == gen
    index_file = Path(out) / f["path"]
    data = bytearray(index_file.read_bytes())
    data[100] ^= 0xFF
    index_file.write_bytes(bytes(data))
    assert cli.main(["search", out, text]) == 1
    assert "sha256" in capsys.readouterr().err


def _collections(target: str, prefix: str) -> list[tuple[str, int]]:
    c = Q.connect(target)
    try:
        return [(n, Q.count(c, n)) for n in Q.collections(c) if n.startswith(prefix)]
    finally:
        c.close()


def _collection_meta(target: str, collection: str) -> dict:
    c = Q.connect(target)
    try:
        return Q.metadata(c, collection)[Q.META]
    finally:
        c.close()


@pytest.mark.parametrize("setting,message", [
    (dict(batch_size=0), "index.batch_size"),
    (dict(upload_workers=0), "index.upload_workers"),
    (dict(recall_target=1.5), "index.recall_target"),
    (dict(collection="a/b"), "index.collection"),
    (dict(faiss_memory="lots"), "index.faiss_memory"),
    (dict(faiss="none", qdrant="none"), "nothing to build"),
])
def test_bad_index_settings_are_refused_naming_the_key(fast_tmp, setting, message):
    from reembed.config import ConfigError

    out = write_output(fast_tmp / "out", clustered(50, 8), shard_rows=50)
    with pytest.raises(ConfigError, match=message):
        stage.build_indexes(out, IndexConfig(**setting), use_ray=False)


def test_index_settings_load_from_yaml_and_are_off_by_default(tmp_path):
    from reembed.config import ConfigError, load_config

    assert load_config(None).index.enabled is False
    job = tmp_path / "job.yaml"
    job.write_text("index: {enabled: true, faiss: hnsw, qdrant: 'http://127.0.0.1:6333', collection: docs}\n")
    cfg = load_config(job).index
    assert (cfg.enabled, cfg.faiss, cfg.qdrant, cfg.collection) == (True, "hnsw", "http://127.0.0.1:6333", "docs")
    job.write_text("index: {qdrant_api_key: abc}\n")
    with pytest.raises(ConfigError, match="secrets never go in config files"):
        load_config(job)


def test_index_command_builds_and_reports(fast_tmp, capsys):
    out = write_output(fast_tmp / "out", clustered(400, 8, seed=5), shard_rows=100)
    assert cli.main(["index", out, "--no-ray", "--faiss", "flat", "--qdrant", str(fast_tmp / "q"),
                     "--collection", "docs", "--batch-size", "50", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["faiss"]["ntotal"] == result["qdrant"]["count"] == 400
    assert result["qdrant"]["collection"] == "docs-v1" and result["qdrant"]["batch_size"] == 50
    assert cli.main(["versions", "--qdrant", str(fast_tmp / "q")]) == 0
    assert "docs-v1" in capsys.readouterr().out


def test_parallel_upload_workers_keep_a_bounded_number_of_shards_in_flight():
    """The server path's worker pool: every shard once, never more than `workers` at a time."""
    import threading

    lock, live, peak, seen = threading.Lock(), [0], [0], []

    def upload(shard):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        time.sleep(0.01 * (shard % 3))
        with lock:
            live[0] -= 1
        return shard

    for result in stage.bounded_map(upload, range(25), workers=4):
        seen.append(result)
    assert sorted(seen) == list(range(25)) and 1 < peak[0] <= 4
    assert list(stage.bounded_map(upload, range(5), workers=1)) == list(range(5))


def test_a_qdrant_build_writes_the_manifest_twice_and_one_small_record_a_shard(fast_tmp):
    """Progress is O(1) per shard: 10 shards or 40, the manifest is saved at the start and the end of the
    build only, and each shard leaves one record of the same few bytes."""
    saves, sizes = {}, {}
    for shards in (10, 40):
        out = write_output(fast_tmp / f"out{shards}", clustered(shards * 10, 8, seed=shards), shard_rows=10)
        before = _manifest(out).data["generation"]
        q = stage.run_qdrant(out, IndexConfig(faiss="none", collection="docs", batch_size=10),
                             str(fast_tmp / f"q{shards}"))
        saves[shards] = _manifest(out).data["generation"] - before
        records = _progress(out, q)
        assert len(records) == shards and q["count"] == shards * 10
        sizes[shards] = {p.stat().st_size for p in records}
    assert saves == {10: 2, 40: 2}
    assert max(sizes[40]) - min(sizes[10]) <= 2 and max(sizes[40]) < 200  # the shard's digits at most


def test_a_large_embedded_load_first_says_how_long_it_will_take(fast_tmp, monkeypatch, caplog):
    import logging

    out = write_output(fast_tmp / "out", clustered(400, 8, seed=6), shard_rows=100)
    cfg = IndexConfig(faiss="none", collection="docs", batch_size=20)
    monkeypatch.setattr(stage, "EMBEDDED_PROBE_POINTS", 40)
    monkeypatch.setattr(Q, "EMBEDDED_MAX_POINTS", 1000)
    with caplog.at_level(logging.INFO, logger="reembed.indexes.build"):
        small = stage.run_qdrant(out, cfg, str(fast_tmp / "q1"))
    assert "estimate" not in small and "a lot for embedded Qdrant" not in caplog.text
    assert "embedded Qdrant allows one writer" in caplog.text

    caplog.clear()
    monkeypatch.setattr(Q, "EMBEDDED_MAX_POINTS", 300)  # as if 400 points were above the 100k of a real output
    with caplog.at_level(logging.INFO, logger="reembed.indexes.build"):
        big = stage.run_qdrant(out, cfg, str(fast_tmp / "q2"))
    said = [r.getMessage() for r in caplog.records if "a lot for embedded Qdrant" in r.getMessage()]
    assert len(said) == 1 and caplog.records[0].getMessage().startswith("Qdrant")
    assert "400 points" in said[0] and "points/s, measured on the first 40" in said[0] and "takes about" in said[0]
    assert f"reembed index {out} --qdrant http://HOST:6333" in said[0]
    est = big["estimate"]
    assert est["points"] == 400 and est["points_per_s"] > 0 and est["seconds"] == pytest.approx(400 / est["points_per_s"], abs=0.1)
    assert big["count"] == _qdrant_count(str(fast_tmp / "q2"), big["collection"]) == 400  # the timed points count once
    assert len(_progress(out, big)) == 4


@pytest.mark.ray
def test_a_writer_task_loads_its_shards_marks_them_and_returns_a_summary(fast_tmp, ray_local):
    """The server path's Ray writer, run against an embedded folder (one writer: nothing else has it open)."""
    out = write_output(fast_tmp / "out", clustered(300, 8, seed=7), shard_rows=50)
    m = _manifest(out)
    target = str(fast_tmp / "q")
    c = Q.connect(target)
    try:
        Q.create_collection(c, "docs-v1", 8, {"rows": 300})
    finally:
        c.close()
    job = stage._QdrantLoad(Location.from_uri(out), target, "docs-v1", "docs-v1.t", 32, ("text",))
    todo = [(s, stage._slim(r)) for s, r in sorted(m.committed.items())]
    out_rec = stage._load_server(job, None, todo, workers=1, use_ray=True)
    assert out_rec["writers"] == 1 and out_rec["transport"] == "http" and len(out_rec["writer_hosts"]) == 1
    assert _qdrant_count(target, "docs-v1") == 300
    from reembed.indexes.progress import Progress

    assert Progress(Location.from_uri(out), "qdrant", "docs-v1.t").done() == set(range(6))


server_only = pytest.mark.skipif(not os.environ.get("QDRANT_URL"), reason="QDRANT_URL not set (no Qdrant server here)")


@server_only
@pytest.mark.ray
def test_a_server_is_loaded_by_n_writer_tasks_each_shard_once(fast_tmp, ray_local):
    import uuid

    out = write_output(fast_tmp / "out", clustered(2400, 16, seed=8), shard_rows=100)
    name = f"reembed-test-{uuid.uuid4().hex[:8]}"
    cfg = IndexConfig(faiss="none", qdrant=os.environ["QDRANT_URL"], collection=name, batch_size=50, upload_workers=3)
    try:
        q = stage.build_indexes(out, cfg)["qdrant"]
        assert (q["writers"], q["count"], q["shards"]) == (3, 2400, 24) and q["transport"] in ("grpc", "http")
        assert len(_progress(out, q)) == 24
        assert _qdrant_count(cfg.qdrant, q["collection"]) == 2400
    finally:
        c = Q.connect(cfg.qdrant)
        try:
            for coll in Q.collections(c):
                if coll.startswith(name):
                    c.delete_collection(coll)
        finally:
            c.close()
