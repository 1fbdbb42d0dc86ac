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
    assert q["collection"] == f"{cfg.collection}-v1" and q["shards_done"] == list(range(12))
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


def test_killed_qdrant_load_resumes_to_exact_counts(fast_tmp, qdrant_target):
    """SIGKILL a real process mid-upload, rerun: the same collection is finished with every point once."""
    out = write_output(fast_tmp / "out", clustered(1200, 16, seed=3), shard_rows=30)  # 40 shards
    cfg = _cfg(qdrant_target, batch_size=5)
    script = ("import sys; from reembed.config import IndexConfig; from reembed.indexes import build as stage; "
              f"stage.run_qdrant({out!r}, IndexConfig(batch_size=5, collection={cfg.collection!r}), {cfg.qdrant!r})")
    src = str(Path(reembed.__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([src, os.environ.get("PYTHONPATH", "")])}
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    done_at_kill = None
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            q = (_manifest(out).data.get("stages") or {}).get("index", {}).get("qdrant") or {}
            if q.get("status") == "loading" and len(q.get("shards_done", [])) >= 2:
                proc.send_signal(signal.SIGKILL)
                done_at_kill = len(q["shards_done"])
                break
            time.sleep(0.02)
    finally:
        if proc.poll() is None and done_at_kill is None:
            proc.kill()
        proc.wait(timeout=30)
    assert done_at_kill is not None, f"never saw the upload in progress: {proc.stderr.read().decode()[-2000:]}"
    assert proc.returncode == -signal.SIGKILL
    killed = _index_state(out)["qdrant"]
    assert killed["status"] == "loading" and done_at_kill <= len(killed["shards_done"]) < 40
    collection = killed["collection"]
    assert _qdrant_count(cfg.qdrant, collection) < 1200

    result = stage.build_indexes(out, IndexConfig(faiss="none", qdrant=cfg.qdrant, collection=cfg.collection,
                                              batch_size=64), use_ray=False)["qdrant"]
    assert result["collection"] == collection  # resumed, not a new version
    assert result["status"] == "done" and result["shards_done"] == list(range(40))
    c = Q.connect(cfg.qdrant)
    try:
        assert Q.count(c, collection) == 1200
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
    assert cli.main(["swap", "--output", out, "--alias", "documents", "--to", "documents-v1"]) == 3  # refused
    assert "validation gate" in capsys.readouterr().err
    # ... and checks the count against the manifest and the dimension against the job's model.
    assert cli.main(["swap", "--output", out, "--alias", "documents", "--to", "documents-v1", "--dimension", "384", "--force"]) == 3
    assert "vectors have dimension 32, but the alias's queries are 384-d" in capsys.readouterr().err
    assert cli.main(["swap", "--output", out, "--alias", "documents", "--to", "documents-v1", "--force"]) == 0
    assert "documents: (new) -> documents-v1" in capsys.readouterr().out
    assert cli.main(["rollback", "--output", out, "--alias", "documents"]) == 3
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
