"""reembed validate: every gate passes on a sound migration and fails on purpose-built bad data.

The old store is all-MiniLM-L6-v2 (384-d, real weights); the new one is MiniLM followed by a fixed random
384 -> 1024 projection (a second space with real meaning). The corpus and labelled queries are in
tests/data/migrate_*.jsonl.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from migrate_fixtures import (QUERIES, commit_table, corpus, embed, model_info, projected_minilm, queries,
                              write_export, write_output)
from migrate_fixtures import proj, space  # noqa: F401  (fixtures)
from reembed import validation as V
from reembed.manifest import Manifest
from reembed.storage import Location

FAST = V.Settings(sample=30, builtin_pairs=False)  # the built-in pairs are exercised where they are the subject


@pytest.fixture(scope="module")
def old_export(tmp_path_factory, space):
    return str(write_export(tmp_path_factory.mktemp("old") / "export", space["ids"], space["texts"], space["old"]))


def new_output(path, space, proj, vectors=None, ids=None, info=None):
    vectors = space["new"] if vectors is None else vectors
    return write_output(path, ids or space["ids"], vectors, info or model_info(proj, vectors.shape[1]),
                        columns={"text": space["texts"]})


def shuffled(rows: np.ndarray) -> np.ndarray:
    return rows[np.random.default_rng(3).permutation(len(rows))]


def hnsw_searcher(vectors, ids):
    import faiss

    index = faiss.IndexHNSWFlat(vectors.shape[1], 16, faiss.METRIC_INNER_PRODUCT)
    index.add(V._normalize(vectors))
    return V.faiss_searcher(index, ids)


# ---------------------------------------------------------------------------------------------------
# A sound migration


def test_sound_migration_passes_every_gate(tmp_path, space, proj, minilm, old_export):
    out = new_output(tmp_path / "new", space, proj)
    report = V.validate(out, queries=str(QUERIES), old=old_export, old_model=str(minilm),
                        searchers={"faiss-hnsw": hnsw_searcher(space["new"], space["ids"])}, settings=V.Settings(sample=30))
    status = {n: g["status"] for n, g in report["gates"].items()}
    assert status == {"integrity": "pass", "sanity_pairs": "pass", "ann_recall": "pass", "overlap": "info", "ab": "pass"}, \
        {n: g["message"] for n, g in report["gates"].items()}
    assert report["passed"] and report["rows"] == 60 and report["gates"]["integrity"]["shards"] == 3
    assert report["gates"]["ann_recall"]["recall"]["faiss-hnsw"] >= 0.95
    # A random projection nearly preserves cosine: the two spaces agree on most neighbours.
    assert report["gates"]["overlap"]["mean"] > 0.6 and report["gates"]["overlap"]["queries"] == 30

    stored = json.loads((tmp_path / "new" / "validation" / "report.json").read_text())
    assert stored["passed"] and stored["gates"]["ab"]["new"] == report["gates"]["ab"]["new"]
    html = (tmp_path / "new" / "validation" / "report.html").read_text()
    assert "reembed validation: PASSED" in html and html.count("<svg") >= 4 and "src=" not in html  # self-contained
    assert V.check_validation(str(tmp_path / "new"))[0] is True


def test_ab_numbers_on_the_labelled_set(tmp_path, space, proj, minilm, old_export):
    """The report's recall@10 and nDCG@10 equal an independent brute-force computation, old and new."""
    out = new_output(tmp_path / "new", space, proj)
    ab = V.validate(out, queries=str(QUERIES), old=old_export, old_model=str(minilm), settings=FAST)["gates"]["ab"]

    qs = queries()
    texts = [q["query"] for q in qs]

    def reference(model, docs):
        q = embed(model, texts)
        order = np.argsort(-(q @ docs.T), axis=1)[:, :10]
        rec, nd = [], []
        for row, item in zip(order, qs):
            ranked = [space["ids"][j] for j in row]
            rel = set(item["relevant"])
            rec.append(len(rel & set(ranked)) / len(rel))
            dcg = sum(1 / math.log2(i + 2) for i, d in enumerate(ranked) if d in rel)
            nd.append(dcg / sum(1 / math.log2(i + 2) for i in range(min(len(rel), 10))))
        return {"recall@10": np.mean(rec), "ndcg@10": np.mean(nd)}

    for side, model, docs in (("old", minilm, space["old"]), ("new", proj, space["new"])):
        want = reference(model, docs)
        for metric, value in want.items():
            assert ab[side][metric] == pytest.approx(value, abs=1e-4), (side, metric)
    # Both spaces find every labelled document in the top 10 of this corpus; the ranking is near perfect.
    assert ab["old"]["recall@10"] == 1.0 and ab["new"]["recall@10"] == 1.0
    assert ab["old"]["ndcg@10"] > 0.97 and ab["new"]["ndcg@10"] > 0.95
    assert ab["status"] == "pass" and ab["queries"] == 20 and len(ab["per_query"]) == 20


def test_metrics_by_hand():
    assert V.recall_at_k(["a", "b", "c"], {"c": 1, "z": 1}, 3) == 0.5
    assert V.ndcg_at_k(["x", "a"], {"a": 1}) == pytest.approx(1 / math.log2(3))
    assert V.ndcg_at_k(["b", "a"], {"a": 2, "b": 1}) == pytest.approx((1 + 3 / math.log2(3)) / (3 + 1 / math.log2(3)))
    s, ids = V.exact_knn(np.eye(3, dtype=np.float32), [(["a", "b"], np.eye(3, dtype=np.float32)[:2]),
                                                        (["c"], np.eye(3, dtype=np.float32)[2:])], k=2)
    assert ids[:, 0].tolist() == ["a", "b", "c"] and s[:, 0].tolist() == [1, 1, 1]


# ---------------------------------------------------------------------------------------------------
# Integrity: purpose-built bad shards


def _corrupt(kind, vectors):
    v = vectors.copy()
    if kind == "nan":
        v[3, 5], v[40, 0] = np.nan, np.inf
    elif kind == "norm":
        v[7] *= 2.0
    elif kind == "zero":
        v[59] = 0.0
    return v


@pytest.mark.parametrize("kind,expect", [
    ("nan", r"part-00000.parquet: 1 NaN/inf or null vectors \(ids cook-3\)"),
    ("norm", r"part-00000.parquet: 1 vectors whose norm is not 1 \+- 0.001 \(ids cook-7|ids astro-1"),
    ("zero", r"part-00002.parquet: 1 zero vectors \(ids weather-5\)"),
])
def test_integrity_fails_on_bad_vectors(tmp_path, space, proj, kind, expect):
    out = new_output(tmp_path / "new", space, proj, vectors=_corrupt(kind, space["new"]))
    gate = V.validate(out, settings=FAST)["gates"]["integrity"]
    assert gate["status"] == "fail"
    assert any(__import__("re").search(expect, p) for p in gate["problems"]), gate["problems"]


def test_integrity_fails_on_wrong_dimension_and_a_replaced_shard(tmp_path, space, proj):
    # The manifest says 1024-d, one shard holds 384-d vectors.
    out = new_output(tmp_path / "a", space, proj)
    m = Manifest.load(out)
    commit_table(m, 1, pa.table({"id": space["ids"][25:50],
                                 "embedding": pa.FixedSizeListArray.from_arrays(pa.array(space["old"][25:50].reshape(-1)), 384),
                                 "truncated": [False] * 25}))
    gate = V.validate(out, settings=FAST)["gates"]["integrity"]
    assert gate["status"] == "fail" and gate["bad_dimension"] == 25
    assert "part-00001.parquet: 25 vectors of dimension 384 instead of 1024" in gate["message"]

    # A shard file replaced behind the manifest's back.
    out = new_output(tmp_path / "b", space, proj)
    pq.write_table(pa.table({"id": ["x"]}), tmp_path / "b" / "shards" / "part-00002.parquet")
    report = V.validate(out, settings=FAST)
    assert report["gates"]["integrity"]["corrupt"] == 1 and not report["passed"]
    assert "part-00002.parquet: sha256" in report["gates"]["integrity"]["message"]


def test_incomplete_output_fails_and_unknown_labels_are_reported(tmp_path, space, proj):
    out = new_output(tmp_path / "new", space, proj)
    m = Manifest.load(out)
    m.data["plan"]["shards"] = m.shard_count + 1  # one more shard planned, never committed
    m.save()
    labelled = [V.LabelledQuery("how do I make bread rise", {"cook-0": 1.0, "cook-99": 1.0})]
    g = V.validate(out, queries=labelled, settings=FAST)["gates"]
    assert g["integrity"]["status"] == "fail" and g["integrity"]["pending"] == 1
    assert g["integrity"]["message"].startswith("1 of 4 planned shards are not committed yet")
    assert g["ab"]["unknown_relevant"] == 1 and "e.g. cook-99" in g["ab"]["message"]
    assert g["ab"]["new"]["recall@10"] == 0.5


def test_a_deleted_and_a_flipped_shard_are_named_damaged(tmp_path, space, proj, capsys):
    """Each shard's bytes are checked against the sha256 its commit recorded; the report names the damaged
    shards (missing, sha256) in the gate and in a table of the HTML report. In this process (--workers 0)."""
    from reembed.cli import main

    out = new_output(tmp_path / "new", space, proj)
    m = Manifest.load(out)
    (tmp_path / "new" / m.committed[0]["path"]).unlink()
    flipped = tmp_path / "new" / m.committed[2]["path"]
    raw = bytearray(flipped.read_bytes())
    raw[100] ^= 0x01
    flipped.write_bytes(bytes(raw))
    assert main(["validate", str(tmp_path / "new"), "--workers", "0", "--no-builtin-pairs", "--sample", "10",
                 "--json"]) == 1
    gate = json.loads(capsys.readouterr().out)["gates"]["integrity"]
    assert gate["status"] == "fail" and gate["corrupt"] == 2 and gate["rows"] == 25 and gate["shards"] == 3
    assert [(d["shard"], d["reason"]) for d in gate["damaged"]] == [(0, "missing"), (2, "sha256")]
    assert "part-00000.parquet: missing" in gate["problems"][0] and "part-00002.parquet: sha256" in gate["problems"][1]
    html = (tmp_path / "new" / "validation" / "report.html").read_text()
    assert "Damaged shards" in html and "part-00002.parquet" in html


def test_topk_merges_exactly_whatever_the_split():
    """Per-shard exact top-k, merged in any grouping and any order, equals one stream over the shards in order
    (exact_knn), ties included: many duplicate vectors across shards."""
    from reembed.validation import integrity as I

    rng = np.random.default_rng(5)
    base = rng.standard_normal((30, 16)).astype(np.float32)
    vectors = base[rng.integers(0, 30, 400)]  # every vector ~13 times: ties everywhere
    ids = [f"d{i}" for i in range(400)]
    queries = np.vstack([base[:5], rng.standard_normal((5, 16)).astype(np.float32)])
    bounds = list(range(0, 400, 37)) + [400]
    blocks = [(s, ids[a:b], vectors[a:b]) for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:]))]
    want_s, want_i = V.exact_knn(queries, [(i, v) for _, i, v in blocks], 12)
    search = I.Search("embedding", queries, 12)
    tops = [I._shard_top(s, pa.table({"id": i, "embedding": pa.FixedSizeListArray.from_arrays(pa.array(v.ravel()), 16)}),
                         i, search, {}) for s, i, v in blocks]
    for trial in range(5):
        order = rng.permutation(len(tops))
        groups = np.array_split(order, trial + 1)
        merged = None
        for g in groups[::-1]:  # groups finish in any order
            part = None
            for j in g:
                part = I._merge_top(part, tops[j], 12)
            merged = I._merge_top(merged, part, 12)
        assert merged[1].tolist() == want_i.tolist() and np.array_equal(merged[0], want_s)


@pytest.mark.ray
def test_two_workers_give_the_same_report_as_one(tmp_path, space, proj, minilm, ray_local):
    """The same numbers whatever the number of shard tasks (1, 2, or none: in this process), ignoring timings:
    integrity (a damaged shard among them), exact search merged across tasks, the old side in the same pass."""
    from reembed import schema as S

    out = write_output(tmp_path / "new", space["ids"], space["new"], model_info(proj, 1024), shard_rows=4,
                       columns={"text": space["texts"], "old_embedding": S.embedding_array(space["old"])})
    flipped = tmp_path / "new" / Manifest.load(out).committed[5]["path"]
    flipped.write_bytes(flipped.read_bytes()[:-1] + b"\0")
    settings = V.Settings(sample=30, builtin_pairs=False)
    reports = {w: V.validate(out, queries=str(QUERIES), old_model=str(minilm), settings=settings, workers=w,
                             searchers={"faiss-hnsw": hnsw_searcher(space["new"], space["ids"])}, write=False)
               for w in (1, 2, 0)}

    def numbers(r):
        return json.dumps({k: v for k, v in r.items() if k not in ("created_at", "seconds")}, sort_keys=True,
                          default=V._json_default)

    assert numbers(reports[1]) == numbers(reports[2]) == numbers(reports[0])
    g = reports[2]["gates"]
    assert g["integrity"]["shards"] == 15 and [d["shard"] for d in g["integrity"]["damaged"]] == [5]
    assert g["integrity"]["rows"] == 56 and g["ab"]["status"] == "pass" and g["overlap"]["queries"] > 20


# ---------------------------------------------------------------------------------------------------
# Sanity pairs


def test_sanity_pairs_fail_for_a_random_model(tmp_path, space, tiny_model):
    """A randomly initialised BERT maps every sentence to nearly the same direction."""
    vectors = embed(tiny_model, space["texts"], max_seq_length=128)  # the tiny BERT's position table
    out = write_output(tmp_path / "new", space["ids"], vectors, model_info(tiny_model, vectors.shape[1], max_seq_length=128))
    gate = V.validate(out, settings=V.Settings(sample=30))["gates"]["sanity_pairs"]
    assert gate["status"] == "fail" and gate["failed"] >= 12
    assert "unrelated" in gate["message"]


def test_sanity_pairs_user_file(tmp_path, space, proj):
    out = new_output(tmp_path / "new", space, proj)
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"a": "The dog chased the ball.", "b": "A dog ran after a ball.", "label": "paraphrase"}) + "\n"
                     + json.dumps({"a": "The cat sat on the mat.", "b": "A cat was sitting on a mat.", "label": "unrelated"}) + "\n")
    gate = V.validate(out, pairs=str(pairs), settings=V.Settings(sample=30))["gates"]["sanity_pairs"]
    assert gate["status"] == "fail" and gate["failed"] == 1 and len(gate["pairs"]) == 26
    bad = [p for p in gate["pairs"] if not p["passed"]]
    assert bad[0]["source"] == "pairs.jsonl:2" and bad[0]["cosine"] > 0.7

    pairs.write_text('{"a": "x", "b": "y", "label": "similar"}\n')
    with pytest.raises(V.ValidationError, match=r"pairs.jsonl:1: expected"):
        V.validate(out, pairs=str(pairs), settings=FAST)


# ---------------------------------------------------------------------------------------------------
# ANN recall


def test_ann_recall_gate(tmp_path, space, proj):
    import faiss
    from qdrant_client import QdrantClient, models

    out = new_output(tmp_path / "new", space, proj)
    ids = space["ids"]
    # A FAISS index written to a file with its id list, as the index stage leaves them.
    flat = faiss.IndexFlatIP(1024)
    flat.add(space["new"])
    faiss.write_index(flat, str(tmp_path / "index.faiss"))
    pq.write_table(pa.table({"id": ids}), tmp_path / "ids.parquet")
    good = V.faiss_searcher(str(tmp_path / "index.faiss"), V.read_ids(str(tmp_path / "ids.parquet")))
    # The same index with its id map rotated: every label points at another topic's document.
    shifted = V.faiss_searcher(flat, list(shuffled(np.array(ids))))
    # An embedded Qdrant collection keyed by uuid, the document id in the payload.
    client = QdrantClient(path=str(tmp_path / "qdrant"))
    client.create_collection("docs", vectors_config=models.VectorParams(size=1024, distance=models.Distance.COSINE))
    client.upsert("docs", points=[models.PointStruct(id=i, vector=v.tolist(), payload={"id": d})
                                  for i, (d, v) in enumerate(zip(ids, space["new"]))])
    try:
        gate = V.validate(out, searchers={"faiss": good, "qdrant": V.qdrant_searcher(client, "docs"), "shifted": shifted},
                          settings=FAST)["gates"]["ann_recall"]
    finally:
        client.close()
    assert gate["recall"]["faiss"] == 1.0 and gate["recall"]["qdrant"] == 1.0
    assert gate["recall"]["shifted"] < 0.3
    assert gate["status"] == "fail" and "shifted recall@10=" in gate["message"]


# ---------------------------------------------------------------------------------------------------
# Old vs new


def test_misaligned_ids_fail_overlap_and_ab(tmp_path, space, proj, minilm, old_export):
    """The classic migration bug: new vectors joined to the wrong ids (a seeded shuffle)."""
    out = new_output(tmp_path / "new", space, proj, vectors=shuffled(space["new"]))
    report = V.validate(out, queries=str(QUERIES), old=old_export, old_model=str(minilm),
                        settings=V.Settings(sample=30, min_overlap=0.5))
    g = report["gates"]
    assert g["integrity"]["status"] == "pass" and g["sanity_pairs"]["status"] == "pass"  # the model itself is fine
    assert g["overlap"]["status"] == "fail" and g["overlap"]["mean"] < 0.3
    assert g["ab"]["status"] == "fail" and g["ab"]["new"]["recall@10"] < 0.5 and g["ab"]["old"]["recall@10"] == 1.0
    assert "new is worse than old" in g["ab"]["message"] and not report["passed"]


def test_old_vectors_from_the_shards_and_from_an_old_store(tmp_path, space, proj, minilm):
    """Without --old the shards' old_embedding column (passed through by the job) is the old side; a chroma://
    URI works as --old too."""
    import chromadb

    from reembed import schema as S

    out = write_output(tmp_path / "new", space["ids"], space["new"], model_info(proj, 1024),
                       columns={"text": space["texts"], "old_embedding": S.embedding_array(space["old"])})
    r1 = V.validate(out, queries=str(QUERIES), old_model=str(minilm), settings=FAST)
    assert "old_embedding" in r1["old"]["source"] and r1["gates"]["ab"]["status"] == "pass"

    col = chromadb.PersistentClient(path=str(tmp_path / "chroma")).get_or_create_collection(
        "docs", embedding_function=None, metadata={"hnsw:space": "l2"})
    col.upsert(ids=space["ids"][:50], embeddings=space["old"][:50], documents=space["texts"][:50])
    r2 = V.validate(out, queries=str(QUERIES), old=f"chroma://{tmp_path}/chroma?collection=docs",
                    old_model=str(minilm), settings=FAST)
    ov = r2["gates"]["overlap"]
    assert ov["missing_in_old"] > 0 and ov["queries"] + ov["missing_in_old"] == 30  # 10 documents are not in Chroma
    assert r1["gates"]["overlap"]["mean"] > 0.6 and r2["gates"]["overlap"]["status"] == "info"


def test_ab_without_old_model_is_reported_not_gated(tmp_path, space, proj, old_export):
    out = new_output(tmp_path / "new", space, proj)
    g = V.validate(out, queries=str(QUERIES), old=old_export, settings=FAST)["gates"]
    assert g["ab"]["status"] == "info" and "--old-model" in g["ab"]["message"] and g["ab"]["new"]["recall@10"] == 1.0
    g = V.validate(out, settings=FAST)["gates"]
    assert g["overlap"]["status"] == "skipped" and g["ab"]["status"] == "skipped"


def test_queries_file_errors_name_the_line(tmp_path, space, proj):
    out = new_output(tmp_path / "new", space, proj)
    bad = tmp_path / "q.jsonl"
    bad.write_text('{"query": "ok", "relevant": ["a"]}\n\n{"query": "no labels", "relevant": []}\n')
    with pytest.raises(V.ValidationError, match=r"q.jsonl:3: \"relevant\" must be"):
        V.validate(out, queries=str(bad), settings=FAST)


# ---------------------------------------------------------------------------------------------------
# The swap gate


def test_check_validation_refuses_missing_failed_and_stale_reports(tmp_path, space, proj):
    out = new_output(tmp_path / "new", space, proj)
    ok, msg = V.check_validation(str(tmp_path / "new"))
    assert not ok and "no validation report" in msg and "reembed validate" in msg

    bad = np.roll(space["new"], 1, axis=1)  # still unit norm and finite, but no longer MiniLM's meaning
    bad_out = new_output(tmp_path / "bad", space, proj, vectors=bad)
    V.validate(bad_out, settings=V.Settings(sample=30, min_ann_recall=0.9, builtin_pairs=False),
               searchers={"shifted": V.faiss_searcher(__import__("faiss").IndexFlatIP(1024), space["ids"])})
    ok, msg = V.check_validation(bad_out)
    assert not ok and "validation FAILED" in msg and "ann_recall" in msg

    V.validate(out, settings=FAST)
    ok, msg = V.check_validation(out)
    assert ok and "validation passed" in msg

    # A shard committed after validation makes the report stale.
    m = Manifest.load(out)
    commit_table(m, 3, pa.table({"id": ["late"], "embedding": pa.FixedSizeListArray.from_arrays(pa.array(space["new"][0]), 1024),
                                 "truncated": [False]}))
    ok, msg = V.check_validation(out)
    assert not ok and "stale" in msg

    (tmp_path / "new" / "validation" / "report.json").write_text("{not json")
    ok, msg = V.check_validation(Location.from_uri(str(tmp_path / "new")))
    assert not ok and "unreadable validation report" in msg


def test_cli_validate_exit_codes(tmp_path, space, proj, minilm, old_export, capsys):
    from reembed.cli import main

    out = new_output(tmp_path / "good", space, proj)
    args = ["--queries", str(QUERIES), "--old", old_export, "--old-model", str(minilm), "--sample", "20",
            "--no-builtin-pairs"]
    assert main(["validate", str(tmp_path / "good"), *args]) == 0
    text = capsys.readouterr().out
    assert "ab            PASS" in text and "sanity_pairs  SKIPPED" in text and "PASSED: report at" in text
    assert out.exists("validation/report.html")

    new_output(tmp_path / "bad", space, proj, vectors=shuffled(space["new"]))
    assert main(["validate", str(tmp_path / "bad"), *args]) == 1
    assert "FAILED" in capsys.readouterr().out
    assert main(["validate", str(tmp_path / "nothing")]) == 1
    assert "no manifest here" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# End to end: export -> reembed run -> validate


@pytest.mark.ray
def test_export_run_validate_end_to_end(tmp_path, space, proj, minilm, ray_local):
    import chromadb

    from reembed import pipeline
    from reembed.migrate import export
    from reembed.config import load_config

    col = chromadb.PersistentClient(path=str(tmp_path / "chroma")).get_or_create_collection(
        "docs", embedding_function=None, metadata={"hnsw:space": "l2"})
    col.upsert(ids=space["ids"], embeddings=space["old"], documents=space["texts"],
               metadatas=[{"topic": r["topic"]} for r in corpus()])
    export(f"chroma://{tmp_path}/chroma?collection=docs", str(tmp_path / "export"), part_rows=30)
    cfg = load_config(None, [f"input.uri={tmp_path / 'export'}", f"output.uri={tmp_path / 'new'}", f"model.name={proj}",
                             "input.passthrough=[text, topic, old_embedding]", "plan.shard_rows=20", "model.device=cpu"])
    summary = pipeline.run(cfg)
    assert summary["complete"] and summary["embedded"] == 60

    report = V.validate(str(tmp_path / "new"), queries=str(QUERIES), old_model=str(minilm), settings=V.Settings(sample=30))
    g = report["gates"]
    assert report["passed"], {n: x["message"] for n, x in g.items()}
    assert g["integrity"]["shards"] == 3 and g["ab"]["status"] == "pass" and g["overlap"]["mean"] > 0.6
    # The pipeline's vectors are the model's vectors: A/B equals the hand-built output's numbers.
    assert g["ab"]["new"]["recall@10"] == 1.0
    assert V.check_validation(str(tmp_path / "new"))[0]
