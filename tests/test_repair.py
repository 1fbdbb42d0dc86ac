"""reembed repair: a deleted, a corrupted and a hostile committed shard are found, retracted, re-embedded, and the
ledger is exact afterwards; `status` says damaged in between; nothing outside the output is ever read or touched."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_parquet
from migrate_fixtures import model_info, write_output
from reembed import pipeline
from reembed.cli import main
from reembed.config import load_config
from reembed.manifest import Manifest
from reembed.repair import check_shard_files, repair
from reembed.schema import embedding_matrix
from reembed.storage import Location


def shard_contents(out: Path) -> tuple[Counter, Counter, dict[str, np.ndarray]]:
    """(ids in shards, ids in dead letters, id -> vector) over the committed shards, read from the files."""
    m = Manifest.load(Location.from_uri(str(out)))
    embedded, dead, vectors = Counter(), Counter(), {}
    for rec in m.committed.values():
        t = pq.read_table(out / rec["path"])
        ids = t.column("id").to_pylist()
        embedded.update(ids)
        vectors.update(zip(ids, embedding_matrix(t.column("embedding"))))
        if rec.get("dead_letter_path"):
            dead.update(pq.read_table(out / rec["dead_letter_path"]).column("id").to_pylist())
    return embedded, dead, vectors


@pytest.mark.ray
@pytest.mark.slow  # two runs of the job: 137 s and 271 s measured on the shared VM under load 30-90
def test_deleted_corrupted_and_hostile_shards_are_found_and_re_embedded_exactly(tmp_path, tiny_model, ray_local,
                                                                                 capsys):
    docs = make_docs(40)
    docs[12]["text"] = ""  # a dead letter in shard 1, so its dead-letter file is part of the ledger too
    write_parquet(tmp_path / "in" / "a.parquet", docs)
    out = tmp_path / "out"
    cfg = load_config(None, [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", f"model.name={tiny_model}",
                             "plan.shard_rows=10", "model.batch_tokens=256"])
    clean = pipeline.run(cfg)
    assert clean["complete"] and clean["embedded"] == 39 and clean["dead_lettered"] == 1
    _, _, clean_vectors = shard_contents(out)

    loc = Location.from_uri(str(out))
    m = Manifest.load(loc)
    recs = {s: m.committed[s] for s in range(4)}
    (out / recs[0]["path"]).unlink()  # deleted
    corrupt = out / recs[1]["path"]
    raw = bytearray(corrupt.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte flipped: same size, still "there"
    corrupt.write_bytes(bytes(raw))
    # A tampered commit record naming a file outside the output (a real file there, which must stay untouched).
    outside = tmp_path / "outside.parquet"
    outside.write_bytes(b"not the output's")
    m.commit_log.commit(3, {**recs[3], "path": "../outside.parquet"})
    assert pipeline.status(str(out))["complete"]  # what the log says, before any check

    # Check only: all three found, retracted; status says damaged, the ledger leaves them out.
    assert main(["repair", str(out), "--check-only", "--json"]) == 1
    summary = json.loads(capsys.readouterr().out)
    assert summary["checked"] == 4 and summary["retracted"] == 3 and summary["run"] is None
    assert {d["shard"]: d["reason"] for d in summary["damaged"]} == {0: "missing", 1: "sha256", 3: "outside"}
    assert all(recs[0]["path"] in d["message"] for d in summary["damaged"] if d["shard"] == 0)
    status = pipeline.status(str(out))
    assert status["damaged"] == [0, 1, 3] and not status["complete"] and status["pending"] == [0, 1, 3]
    assert status["embedded"] == 10 and status["dead_lettered"] == 0  # only shard 2 still counts
    assert main(["status", str(out)]) == 0
    assert "status:      damaged: run `reembed repair" in capsys.readouterr().out

    # Repair, with the job's settings read from the manifest: exactly the three shards are embedded again.
    assert main(["repair", str(out)]) == 0
    text = capsys.readouterr().out
    assert "earlier:     3 shard(s)" in text and "re-embedded: 3 shard(s)" in text and "status:      complete" in text
    status = pipeline.status(str(out))
    assert status["complete"] and status["damaged"] == [] and status["pending"] == []
    assert status["input_rows"] == status["embedded"] + status["dead_lettered"] == 40
    embedded, dead, vectors = shard_contents(out)
    assert set(embedded.values()) == {1} and set(dead.values()) == {1} and len(embedded) == 39
    assert set(embedded) | set(dead) == {d["id"] for d in docs} and not set(embedded) & set(dead)
    assert sorted(vectors) == sorted(clean_vectors)
    for i, v in clean_vectors.items():
        np.testing.assert_allclose(vectors[i], v, atol=1e-5)
    m = Manifest.load(loc)
    assert m.committed[2] == recs[2]  # the sound shard was not touched
    assert {m.committed[s]["path"] for s in (0, 1, 3)}.isdisjoint({recs[s]["path"] for s in (0, 1, 3)})
    assert outside.read_bytes() == b"not the output's"  # never read into the output, never deleted
    assert sorted(p.name for p in (out / "shards").iterdir()) == sorted(Path(m.committed[s]["path"]).name
                                                                        for s in range(4))
    # A second check finds nothing.
    again = repair(str(out), check_only=True, workers=2)
    assert again["checked"] == 4 and again["retracted"] == 0 and again["complete"]


def test_check_shard_files_names_each_kind_of_damage(tmp_path):
    """In this process (workers=0): a missing, a replaced, a dead-letter-corrupt shard and a record whose path is
    absent or leaves the output; a hostile path is never opened."""
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((50, 8)).astype(np.float32)
    loc = write_output(tmp_path / "out", [f"d{i}" for i in range(50)], vectors, model_info("m", 8, normalize=False),
                       shard_rows=10)
    m = Manifest.load(loc)
    recs = {s: m.committed[s] for s in range(5)}
    (tmp_path / "out" / recs[0]["path"]).unlink()
    (tmp_path / "out" / recs[1]["path"]).write_bytes(b"PAR1 replaced")
    (tmp_path / "out" / "dead_letter").mkdir()
    (tmp_path / "out" / "dead_letter" / "part-00002.parquet").write_bytes(b"x")
    with_dead = {**recs[2], "dead_letter_path": "dead_letter/part-00002.parquet", "dead_letter_sha256": "0" * 64}

    data, damage = check_shard_files(loc, 4, recs[4])
    assert damage is None and len(data) == recs[4]["bytes"]
    assert check_shard_files(loc, 0, recs[0])[1]["reason"] == "missing"
    assert check_shard_files(loc, 1, recs[1])[1]["reason"] == "sha256"
    d = check_shard_files(loc, 2, with_dead)[1]
    assert d["reason"] == "sha256" and d["path"] == "dead_letter/part-00002.parquet"
    for bad in ("/etc/passwd", "../../etc/passwd", None):
        d = check_shard_files(loc, 3, {**recs[3], "path": bad})[1]
        assert d["reason"] == "outside" and ("outside the output" in d["message"] or "not a path" in d["message"])
    with pytest.raises(Exception, match="outside the output|not a path"):
        check_shard_files(loc, 3, {**recs[3], "path": "/etc/passwd"}, hostile="raise")

    summary = repair(loc, check_only=True, workers=0)
    assert summary["checked"] == 5 and [d["shard"] for d in summary["damaged"]] == [0, 1]
    assert sorted(Manifest.load(loc).state().damaged) == [0, 1]
    assert Manifest.load(loc).pending() == [0, 1]


def test_repair_hashes_the_faiss_files_that_an_open_only_fingerprints(tmp_path, monkeypatch):
    """A flipped byte inside the inverted lists, same size and mtime: an open's fingerprint (ends of the
    file, here 64 bytes each) does not see it; repair hashes the files whole and names it."""
    import os

    from index_fixtures import clustered, write_output as write_vectors
    from reembed.config import IndexConfig
    from reembed.indexes import build as stage
    from reembed.indexes import faiss as F
    from reembed.repair import check_index_files

    monkeypatch.setattr(F, "EDGE", 64)
    out = write_vectors(tmp_path / "out", clustered(3000, 32, seed=1), shard_rows=500)
    rec = stage.run_faiss(out, IndexConfig(faiss="ivf", qdrant="none"))
    loc = Location.from_uri(out)
    assert check_index_files(loc, Manifest.load(loc)) == []
    path = Path(out) / rec["ivfdata_path"]
    stat = path.stat()
    assert stat.st_size > 4 * 64
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert F.damaged_files(loc, rec) == []  # the fingerprint matches
    assert check_index_files(loc, Manifest.load(loc)) == [loc.display(rec["ivfdata_path"])]


@pytest.mark.ray
def test_repair_hashes_each_faiss_file_in_a_ray_task_and_only_verdicts_come_back(tmp_path, monkeypatch, ray_local):
    """With workers, every FAISS file is hashed by its own Ray task: hashing in this process fails the test."""
    from index_fixtures import clustered, write_output as write_vectors
    from reembed.config import IndexConfig
    from reembed.indexes import build as stage
    from reembed.indexes import faiss as F
    from reembed.repair import check_index_files

    out = write_vectors(tmp_path / "out", clustered(3000, 32, seed=1), shard_rows=500)
    rec = stage.run_faiss(out, IndexConfig(faiss="ivf", qdrant="none"))
    path = Path(out) / rec["ids_path"]
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size: only a whole hash sees it
    path.write_bytes(bytes(data))

    def refuse(*args):
        raise AssertionError("a FAISS file was hashed in the driver")

    monkeypatch.setattr(F, "file_sha256", refuse)
    monkeypatch.setattr(F, "_file_sha256", refuse)
    loc = Location.from_uri(out)
    assert check_index_files(loc, Manifest.load(loc), workers=2) == [loc.display(rec["ids_path"])]
