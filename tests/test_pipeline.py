"""The job spine end to end on a local Ray: equality with plain encode, resume after SIGKILL, actor death,
bad input with reason codes, fingerprint checks."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cluster_fixtures import committed_records
from conftest import make_docs, write_jsonl, write_parquet, write_resume_corpus
from reembed import pipeline
from reembed.config import load_config
from reembed.manifest import Manifest, ManifestError
from reembed.plan import InputError
from reembed.schema import embedding_matrix
from reembed.storage import Location

pytestmark = pytest.mark.ray


def cfg_for(inp, out, model, *extra):
    return load_config(None, [f"input.uri={inp}", f"output.uri={out}", f"model.name={model}", *extra])


def ledger(out: Path) -> tuple[Counter, Counter, dict]:
    """(ids in shards, ids in dead letters, reasons) over the committed shards of an output."""
    m = Manifest.load(Location.from_uri(str(out)))
    embedded, dead, reasons = Counter(), Counter(), {}
    for rec in m.committed.values():
        embedded.update(pq.read_table(out / rec["path"], columns=["id"]).column("id").to_pylist())
        if rec.get("dead_letter_path"):
            t = pq.read_table(out / rec["dead_letter_path"])
            for i, r in zip(t.column("id").to_pylist(), t.column("reason").to_pylist()):
                dead[i] += 1
                reasons[i] = r
    return embedded, dead, reasons


def read_vectors(out: Path) -> dict[str, np.ndarray]:
    m = Manifest.load(Location.from_uri(str(out)))
    vecs = {}
    for rec in m.committed.values():
        t = pq.read_table(out / rec["path"])
        for i, v in zip(t.column("id").to_pylist(), embedding_matrix(t.column("embedding"))):
            vecs[i] = v
    return vecs


def test_multi_actor_run_equals_plain_encode(tmp_path, tiny_model, ray_local):
    from sentence_transformers import SentenceTransformer

    docs = make_docs(120)
    docs[7]["text"] = "long " * 300  # truncated at 128 tokens
    write_parquet(tmp_path / "in" / "a.parquet", docs[:70], row_group_size=16)
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[70:])
    out = tmp_path / "out"
    cfg = cfg_for(tmp_path / "in", out, tiny_model, "plan.shard_rows=25", "compute.min_actors=2",
                  "compute.max_actors=2", "compute.cpus_per_actor=0.5", "model.batch_tokens=256",
                  "input.passthrough=[lang]")
    summary = pipeline.run(cfg)
    assert summary["complete"] and summary["embedded"] == 120 and summary["dead_lettered"] == 0
    assert summary["truncated"] == 1

    ref = SentenceTransformer(str(tiny_model), device="cpu").encode([d["text"] for d in docs], batch_size=7)
    got = read_vectors(out)
    assert sorted(got) == sorted(d["id"] for d in docs)
    for d, r in zip(docs, ref):
        np.testing.assert_allclose(got[d["id"]], r, atol=1e-5)

    # Plain Parquet any reader can open: fixed_size_list<float32>[32], passthrough carried, input order kept.
    t = pq.read_table(out / Manifest.load(Location.from_uri(str(out))).committed[0]["path"])
    etype = t.schema.field("embedding").type
    assert pa.types.is_fixed_size_list(etype) and etype.list_size == 32 and etype.value_type == pa.float32()
    assert t.column("id").to_pylist() == [d["id"] for d in docs[:25]]
    assert t.column("lang").to_pylist() == [d["lang"] for d in docs[:25]]
    assert t.column("truncated").to_pylist()[7] is True

    m = Manifest.load(Location.from_uri(str(out)))
    assert m.model["dimension"] == 32 and m.model["normalize"] is True and m.model["max_seq_length"] == 128
    rec = m.committed[0]
    assert rec["rows"] == 25 and rec["bytes"] == (out / rec["path"]).stat().st_size and len(rec["sha256"]) == 64
    assert m.data["runs"][-1]["device"] == "cpu" and m.data["runs"][-1]["tokens"] > 0

    # A rerun of a finished job changes nothing.
    before = committed_records(out), sorted(p.name for p in (out / "_log").iterdir())
    again = pipeline.run(cfg)
    assert again["complete"] and (committed_records(out), sorted(p.name for p in (out / "_log").iterdir())) == before


def test_bad_input_reasons(tmp_path, tiny_model, ray_local):
    inp = tmp_path / "in"
    rows = [
        {"id": "ok1", "text": "a fine document"},
        {"id": "nulltext", "text": None},
        {"id": "empty", "text": ""},
        {"id": "blank", "text": "  \t\n "},
        {"id": None, "text": "no id here"},
        {"id": "dup", "text": "first copy wins"},
        {"id": "dup", "text": "second copy in the same file"},
        {"id": "long", "text": "word " * 500},
    ]
    write_parquet(inp / "a.parquet", rows)
    write_jsonl(inp / "b.jsonl", [
        {"id": "dup", "text": "third copy, another file"},
        "{not json",
        "",
        {"id": "ok2", "text": "another fine one"},
        {"id": "weird", "text": {"nested": True}},
        {"id": 17, "text": "numeric id"},
    ])
    out = tmp_path / "out"
    s = pipeline.run(cfg_for(inp, out, tiny_model, "plan.shard_rows=4"))
    assert s["input_rows"] == 13  # the blank JSONL line is not a document
    assert s["input_rows"] == s["embedded"] + s["dead_lettered"]
    assert s["reasons"] == {"null_text": 1, "empty_text": 2, "null_id": 1, "duplicate_id": 2,
                            "invalid_json": 1, "invalid_text": 1}
    assert s["truncated"] == 1
    embedded, dead, reasons = ledger(out)
    assert set(embedded) == {"ok1", "dup", "long", "ok2", "17"} and all(v == 1 for v in embedded.values())
    assert reasons["nulltext"] == "null_text" and reasons["blank"] == "empty_text" and reasons["empty"] == "empty_text"
    assert reasons["weird"] == "invalid_text" and reasons[None] in ("null_id", "invalid_json")
    # The first "dup" (a.parquet row 5) is the one embedded; the other two are dead letters with their source.
    dls = [r for p in sorted((out / "dead_letter").glob("*.parquet")) for r in pq.read_table(p).to_pylist()]
    dups = sorted((Path(r["source_file"]).name, r["source_row"]) for r in dls if r["reason"] == "duplicate_id")
    assert dups == [("a.parquet", 6), ("b.jsonl", 0)]
    bad_json = [r for r in dls if r["reason"] == "invalid_json"][0]
    assert bad_json["source_row"] == 1 and bad_json["source_file"].endswith("b.jsonl")
    shard = pq.read_table(out / Manifest.load(Location.from_uri(str(out))).committed[0]["path"])
    assert shard.column("id").to_pylist() == ["ok1"]  # shard 0 = rows 0-3 of a.parquet


def test_missing_column_fails_fast_naming_file(tmp_path, tiny_model, ray_local):
    write_parquet(tmp_path / "in" / "a.parquet", [{"doc": "x", "body": "y"}])
    with pytest.raises(InputError) as e:
        pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out", tiny_model))
    msg = str(e.value)
    assert "a.parquet" in msg and "'id'" in msg and "'text'" in msg and "'doc'" in msg and "'body'" in msg
    assert not (tmp_path / "out" / "manifest.json").exists()


def test_corrupt_file_fails_fast_or_is_skipped(tmp_path, tiny_model, ray_local):
    inp = tmp_path / "in"
    write_parquet(inp / "a.parquet", make_docs(10))
    (inp / "broken.parquet").write_bytes(b"PAR1 this is not parquet at all")
    with pytest.raises(InputError, match=r"broken\.parquet.*--on-bad-file skip"):
        pipeline.run(cfg_for(inp, tmp_path / "out1", tiny_model))
    s = pipeline.run(cfg_for(inp, tmp_path / "out2", tiny_model, "on_bad_file=skip"))
    assert s["complete"] and s["embedded"] == 10
    assert len(s["bad_files"]) == 1 and s["bad_files"][0]["path"].endswith("broken.parquet")
    m = Manifest.load(Location.from_uri(str(tmp_path / "out2")))
    assert m.plan["bad_files"][0]["error"]


def test_fingerprint_mismatch_refused(tmp_path, tiny_model, ray_local):
    write_parquet(tmp_path / "in" / "a.parquet", make_docs(10))
    out = tmp_path / "out"
    pipeline.run(cfg_for(tmp_path / "in", out, tiny_model))
    with pytest.raises(ManifestError, match=r"fingerprint mismatch.*max_seq_length: 128 -> 64.*--fresh"):
        pipeline.run(cfg_for(tmp_path / "in", out, tiny_model, "model.max_seq_length=64"))
    with pytest.raises(ManifestError, match="other input settings"):
        pipeline.run(cfg_for(tmp_path / "in", out, tiny_model, "plan.shard_rows=3"))
    s = pipeline.run(cfg_for(tmp_path / "in", out, tiny_model, "model.max_seq_length=64", "output.fresh=true"))
    assert s["complete"] and s["model"]["max_seq_length"] == 64


def test_backends_float_resumes_across_them_int8_is_its_own_space(tmp_path, tiny_model, ray_local):
    """torch and ONNX Runtime float32 compute the same vectors (one fingerprint: an output started by one
    resumes under the other); int8 weights are another embedding space and are refused on a float output."""
    docs = make_docs(40)
    write_parquet(tmp_path / "in" / "a.parquet", docs)
    out = tmp_path / "out"
    first = pipeline.run(cfg_for(tmp_path / "in", out, tiny_model, "model.backend=torch", "plan.shard_rows=10"))
    m = Manifest.load(Location.from_uri(str(out)))
    assert m.data["runs"][-1]["backend"] == "torch"
    # Same fingerprint under onnx: the run resumes (nothing pending) instead of refusing.
    again = pipeline.run(cfg_for(tmp_path / "in", out, tiny_model, "model.backend=onnx", "plan.shard_rows=10"))
    assert again["complete"] and again["model"]["fingerprint"] == first["model"]["fingerprint"]
    with pytest.raises(ManifestError, match=r"fingerprint mismatch.*dtype: 'auto' -> 'int8-w7'"):
        pipeline.run(cfg_for(tmp_path / "in", out, tiny_model, "model.backend=onnx-int8", "plan.shard_rows=10"))

    q = tmp_path / "q"
    s = pipeline.run(cfg_for(tmp_path / "in", q, tiny_model, "model.backend=onnx-int8", "plan.shard_rows=10"))
    assert s["complete"] and s["model"]["dtype"] == "int8-w7"
    assert Manifest.load(Location.from_uri(str(q))).data["runs"][-1]["backend"] == "onnx-int8"
    vec = {}
    for root in (out, q):
        t = pa.concat_tables(pq.read_table(f) for f in sorted((root / "shards").glob("*.parquet")))
        vec[root] = dict(zip(t.column("id").to_pylist(), embedding_matrix(t.column("embedding"))))
    a = np.stack([vec[out][d["id"]] for d in docs])
    b = np.stack([vec[q][d["id"]] for d in docs])
    assert ((a * b).sum(1)).min() > 0.95  # both normalized: close, not equal
    assert np.abs(a - b).max() > 1e-4

    # Queries against the int8 output are embedded by the int8 model: a document's own text finds its vector.
    from reembed.migrate import open_store

    store = open_store(str(q), name="new", device="cpu")
    assert store.backend == "onnx-int8" and open_store(str(out), device="cpu").backend == "auto"
    own = store.embed([d["text"] for d in docs[:5]])
    # Dynamic int8 quantizes activations per batch, so a row moves ~1e-4 with its batch-mates: far closer
    # to its int8 vector than the float model's vector is.
    assert np.abs(own - b[:5]).max() < 1e-3 < np.abs(a[:5] - b[:5]).max()


def test_actor_exit_mid_batch_keeps_ledger_exact(tmp_path, tiny_model, ray_local, monkeypatch):
    docs = make_docs(200)
    write_parquet(tmp_path / "in" / "a.parquet", docs)
    marker = tmp_path / "crashed-once"
    monkeypatch.setenv("REEMBED_CRASH_ONCE", str(marker))
    out = tmp_path / "out"
    s = pipeline.run(cfg_for(tmp_path / "in", out, tiny_model, "plan.shard_rows=20"))
    assert marker.exists(), "the fault was never injected"
    assert s["complete"] and s["embedded"] == 200
    embedded, dead, _ = ledger(out)
    assert embedded == Counter(d["id"] for d in docs) and not dead


def _committed(out: Path) -> dict:
    return committed_records(out)


@pytest.mark.slow  # 80 s: in `make test-slow` (CI runs both)
def test_resume_after_sigkill(tmp_path, tiny_model):
    docs = write_resume_corpus(tmp_path / "in")
    out = tmp_path / "out"
    args = [sys.executable, "-m", "reembed", "run", "--input", str(tmp_path / "in"), "--output", str(out),
            "--model", str(tiny_model), "--shard-rows", "50", "--set", "model.batch_tokens=128"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": ""}
    env.pop("RAY_ADDRESS")
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 180
    try:
        while time.time() < deadline and not _committed(out):
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    first = _committed(out)
    total = Manifest.load(Location.from_uri(str(out))).shard_count  # 30, and copy shards of repeated texts
    assert 1 <= len(first) < total, f"expected a partial run, got {len(first)} of {total} shards committed"

    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "input 1500 = embedded 1500 + dead-lettered 0" in rerun.stdout
    final = _committed(out)
    assert len(final) == total
    # Committed shards were not recomputed: same record, same commit time.
    for k, rec in first.items():
        assert final[k] == rec
    embedded, dead, _ = ledger(out)
    assert embedded == Counter(d["id"] for d in docs) and not dead
    assert not list(out.glob("shards/_tmp/*")), "temporary files left behind"
    status = subprocess.run([sys.executable, "-m", "reembed", "status", str(out)], capture_output=True, text=True)
    assert f"{total}/{total} committed" in status.stdout and "complete" in status.stdout
