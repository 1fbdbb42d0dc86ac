"""FAISS IVF built by many workers (reembed.indexes.faiss_dist): the plan within its memory budget, groups and
samples, Ray workers equal to one process, a killed build resumed, the on-disk index searched and validated,
damaged files rebuilt, multipart uploads to S3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from index_fixtures import cli_logging_reset, clustered, fast_tmp, tables, write_output  # noqa: F401 (fixtures)
from reembed import cli
from reembed.config import IndexConfig
from reembed.indexes import build as stage
from reembed.indexes import faiss as F
from reembed.indexes import faiss_dist as D
from reembed.manifest import Manifest
from reembed.storage import Location
from s3_fixtures import moto_server, s3_env, s3_user  # noqa: F401 (fixtures)

faiss = pytest.importorskip("faiss")

from index_fixtures import CORPUS_DIM as DIM, CORPUS_N as N, corpus  # noqa: E402,F401 (the shared corpus)

SHARD = 500




def _recall(index, xb, xq, k=10) -> float:
    found = index.search(xq, k)[1]
    truth = faiss.knn(xq, xb, k, metric=faiss.METRIC_INNER_PRODUCT)[1]
    return float(np.mean([len(set(f) & set(t)) / k for f, t in zip(found, truth)]))


def _single_process_recall(xb, xq, plan) -> float:
    train = F.sample_vectors(iter(tables(xb, SHARD)), len(xb), plan.train_size)
    return _recall(F.build(iter(tables(xb, SHARD)), plan, train).index, xb, xq)


def _state(out: str) -> dict:
    return Manifest.load(Location.from_uri(out)).data["stages"]["index"]["faiss"]


def _records(out: str) -> list[Path]:
    return sorted(Path(out).glob("indexes/faiss/_build/*/g*.json"))


# -- the plan ------------------------------------------------------------------------------------------


def test_ivf_at_a_billion_vectors_fits_its_budget_training_sample_included():
    budget = F.parse_memory("16G")
    plan = F.plan_index(10**9, 1024, "auto", "16G")
    assert plan.kind == "ivf" and ",PQ" in plan.factory
    # The sample, its copy while k-means runs, and the centroids all fit; 39 points per centroid at least.
    assert plan.train_bytes == 2 * plan.train_size * 1024 * 4 + plan.nlist * 1024 * 4 <= budget
    assert plan.train_size >= 39 * plan.nlist and plan.estimated_bytes <= budget
    assert plan.nlist == 32_768 and "nlist 131,072 -> 32,768" in plan.reason
    # Where the budget is roomy, nlist is what autofaiss picks.
    assert F.plan_index(50_000_000, 1024, "auto", "64G").nlist == 65_536


@pytest.mark.parametrize("rows,memory,kind,words", [
    (500, "16G", "flat", "under 1,000"),
    (5_000, "1M", "hnsw", "under 10,000"),
    (200_000, "16G", "hnsw", "fits the 16.0 GiB budget"),
    (200_000, "300M", "ivf", "IVF-Flat (~297.5 MiB) fits"),
    (200_000, "200M", "ivf", "re-ranked by SQ8"),
])
def test_auto_says_why_it_chose_what_it_chose(rows, memory, kind, words):
    plan = F.plan_index(rows, 384, "auto", memory)
    assert plan.kind == kind and plan.reason.startswith("auto: ") and words in plan.reason
    assert "requested" in F.plan_index(rows, 384, "ivf", memory).reason


def test_groups_are_consecutive_balanced_and_do_not_depend_on_workers():
    shards = [(s, {"rows": r}) for s, r in enumerate([100] * 37 + [40])]
    groups = D.groups_of(shards, group_rows=1000)
    assert len(groups) == 16  # MIN_GROUPS: enough for several workers
    assert [s for g in groups for s, _ in g.shards] == list(range(38))  # every shard once, in order
    assert [g.offset for g in groups] == list(np.cumsum([0] + [g.rows for g in groups])[:-1])
    assert sum(g.rows for g in groups) == 3740 and max(g.rows for g in groups) <= 300
    assert len(D.groups_of(shards, group_rows=100)) == 38  # at most group_rows rows (one shard at least)
    assert len(D.groups_of(shards[:3], group_rows=1000)) == 3  # never more groups than shards


def test_the_sample_is_split_exactly_and_each_group_draws_its_share(corpus, tmp_path):
    xb, _ = corpus
    out = write_output(tmp_path / "out", xb, shard_rows=SHARD)
    loc = Location.from_uri(out)
    groups = D.groups_of(sorted(Manifest.load(loc).committed.items()))
    counts = D.sample_counts([g.rows for g in groups], 1200, seed=3)
    assert counts.sum() == 1200 and all(0 < c <= g.rows for c, g in zip(counts, groups))
    x, ids = D.sample_group(loc, groups[5], int(counts[5]), seed=3)
    assert len(set(ids.tolist())) == len(ids) == counts[5]
    assert groups[5].offset <= ids.min() and ids.max() < groups[5].offset + groups[5].rows
    assert np.allclose(x, xb[ids], atol=1e-6)  # the faiss id of a row is its position in shard order


# -- building ----------------------------------------------------------------------------------------


@pytest.mark.ray
@pytest.mark.parametrize("pq", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["ivf-flat", "ivf-pq-refine"])
def test_ray_workers_build_the_recall_of_a_single_process_build(corpus, fast_tmp, ray_local, pq):
    """Three Ray workers fill the groups; the merged on-disk index reaches a single-process build's recall."""
    xb, xq = corpus
    out = write_output(fast_tmp / "out", xb, shard_rows=SHARD)
    memory = "16G" if not pq else "700K"  # a budget where IVF-Flat does not fit: PQ codes, SQ8 re-ranking
    rec = stage.run_faiss(out, IndexConfig(faiss="ivf", qdrant="none", faiss_memory=memory), workers=3, use_ray=True)
    p = rec["params"]
    assert (",PQ" in p["factory"] and p["refine"] == "SQ8") == pq
    assert rec["ntotal"] == N and p["workers"] == 3 and p["groups"] == N // SHARD and p["ondisk"]
    assert p["add_processes"] >= 2, "the groups were all added by one process"
    assert rec["ivfdata_path"] == "indexes/faiss/index-v1.ivfdata" and rec["reason"] == p["reason"]
    index, ids = F.read_index(Location.from_uri(out), rec)
    got = _recall(index, xb, xq)
    single = _single_process_recall(xb, xq, F.plan_index(N, DIM, "ivf", memory))
    assert got >= 0.95 and abs(got - single) <= 0.01, (got, single)
    assert abs(p["recall_at_10"] - got) <= 0.03 and p["recall_met"] is True  # what it records is what fresh queries get
    assert p["tuned_on"].endswith(F.TUNED_ON) and p["off_corpus"].endswith(F.OFF_CORPUS)
    assert ids.to_pylist()[:2] == ["d0", "d1"] and list(index.search(xb[[7, 4321]], 1)[1][:, 0]) == [7, 4321]
    assert not (Path(out) / "indexes/faiss/_build").exists() or not any((Path(out) / "indexes/faiss/_build").iterdir())


_KILL_AFTER = """
import os, sys
from reembed.config import IndexConfig
from reembed.indexes import build, faiss_dist

published = 0
real = faiss_dist.publish_group

def publish_then_die(*args):
    global published
    real(*args)
    published += 1
    if published == int(sys.argv[2]):
        os._exit(137)  # killed: no cleanup, no exception handler runs

faiss_dist.publish_group = publish_then_die
build.run_faiss(sys.argv[1], IndexConfig(faiss="ivf", qdrant="none"))
"""


def test_a_build_killed_mid_way_resumes_from_its_published_groups(corpus, fast_tmp):
    xb, xq = corpus[0][:3000], corpus[1]
    out = write_output(fast_tmp / "out", xb, shard_rows=SHARD)
    reference = shutil.copytree(out, fast_tmp / "reference")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(D.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    killed = subprocess.run([sys.executable, "-c", textwrap.dedent(_KILL_AFTER), out, "3"], env=env,
                            capture_output=True, text=True, timeout=300)
    assert killed.returncode == 137, killed.stderr[-2000:]
    assert len(_records(out)) == 3 and _state(out)["status"] == "building"
    assert not list(Path(out).glob("indexes/faiss/index-v*"))

    rec = stage.run_faiss(out, IndexConfig(faiss="ivf", qdrant="none"))
    assert rec["ntotal"] == 3000 == sum(r["rows"] for r in Manifest.load(Location.from_uri(out)).committed.values())
    assert rec["params"]["groups_reused"] == 3 and rec["params"]["groups"] == 6
    uninterrupted = stage.run_faiss(str(reference), IndexConfig(faiss="ivf", qdrant="none"))
    got = _recall(F.read_index(Location.from_uri(out), rec)[0], xb, xq)
    want = _recall(F.read_index(Location.from_uri(str(reference)), uninterrupted)[0], xb, xq)
    assert got >= 0.95 and abs(got - want) <= 0.01
    assert rec["sha256"] == uninterrupted["sha256"] and rec["ivfdata_sha256"] == uninterrupted["ivfdata_sha256"]


@pytest.mark.slow
def test_a_damaged_group_is_added_again_on_the_rerun(corpus, fast_tmp):
    xb, xq = corpus[0][:3000], corpus[1]
    out = write_output(fast_tmp / "out", xb, shard_rows=SHARD)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(D.__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    assert subprocess.run([sys.executable, "-c", textwrap.dedent(_KILL_AFTER), out, "3"], env=env,
                          capture_output=True, timeout=300).returncode == 137
    part = next(Path(out).glob("indexes/faiss/_build/*/g00001.faiss"))
    data = bytearray(part.read_bytes())
    data[len(data) // 2] ^= 0xFF
    part.write_bytes(bytes(data))
    rec = stage.run_faiss(out, IndexConfig(faiss="ivf", qdrant="none"))
    assert rec["params"]["groups_reused"] == 2 and rec["ntotal"] == 3000
    assert _recall(F.read_index(Location.from_uri(out), rec)[0], xb, xq) >= 0.95


# -- using it ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def text_output(tiny_model, tmp_path_factory):
    """An output whose vectors are the tiny model's embeddings of 1,200 documents, so text queries work."""
    from conftest import make_docs
    from reembed.indexes.search import text_embedder

    docs = make_docs(1200)
    x = text_embedder(str(tiny_model), 128, "cpu")([d["text"] for d in docs])
    out = write_output(tmp_path_factory.mktemp("text") / "out", np.asarray(x, np.float32), shard_rows=100,
                       model_name=str(tiny_model))
    return out, docs


def test_the_merged_index_answers_search_and_the_validation_gate(text_output, capsys):
    from reembed import validation as V

    out, docs = text_output
    assert cli.main(["index", out, "--faiss", "ivf", "--qdrant", "none", "--no-ray"]) == 0
    rec = _state(out)
    assert rec["ivfdata_path"] and rec["ntotal"] == len(docs)
    capsys.readouterr()
    text = docs[17]["text"]
    assert cli.main(["search", out, text, "-k", "5", "--json"]) == 0
    printed = capsys.readouterr().out
    hits = json.loads(printed)[0]["hits"]  # stdout holds the answer only (faiss's own printf goes to stderr)
    assert hits[0]["id"] in {d["id"] for d in docs if d["text"] == text}
    assert hits[0]["score"] == pytest.approx(1.0, abs=1e-4)
    report = V.validate(out, settings=V.Settings(builtin_pairs=False))
    gate = report["gates"]["ann_recall"]
    assert gate["measured"]["faiss"]["index"] == rec["path"]
    assert gate["status"] == "pass" and gate["recall"]["faiss"] >= 0.9


@pytest.mark.parametrize("which", ["path", "ivfdata_path", pytest.param("ids_path", marks=pytest.mark.slow)])
def test_a_damaged_index_file_is_rebuilt_by_reembed_index(corpus, fast_tmp, capsys, which):
    xb, xq = corpus
    out = write_output(fast_tmp / "out", xb[:3000], shard_rows=SHARD)
    args = ["index", out, "--faiss", "ivf", "--qdrant", "none", "--no-ray"]
    assert cli.main(args) == 0
    first = _state(out)
    damaged = Path(out) / first[which]
    data = bytearray(damaged.read_bytes())
    data[len(data) // 2] ^= 0xFF  # one flipped byte, same size
    damaged.write_bytes(bytes(data))
    with pytest.raises(F.ChecksumError):
        F.read_index(Location.from_uri(out), first)
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "damaged" in capsys.readouterr().err
    rebuilt = _state(out)
    assert rebuilt["version"] == 2 and rebuilt["ntotal"] == 3000
    index, ids = F.read_index(Location.from_uri(out), rebuilt)
    assert _recall(index, xb[:3000], xq) >= 0.95
    assert cli.main(args) == 0 and _state(out) == rebuilt  # intact now: up to date, nothing done


def test_index_says_out_loud_when_recall_stays_below_target_and_verify_hashes_whole(corpus, fast_tmp, capsys,
                                                                                      monkeypatch):
    xb, _ = corpus
    out = write_output(fast_tmp / "out", xb[:3000], shard_rows=SHARD)
    args = ["index", out, "--faiss", "ivf", "--faiss-memory", "120K", "--recall-target", "0.999", "--qdrant", "none",
            "--no-ray"]
    assert cli.main(args) == 0  # published: the index works, below its target
    err = capsys.readouterr().err
    rec = _state(out)
    assert rec["params"]["recall_met"] is False and not rec["params"]["refine"]
    assert "WARNING: FAISS" in err and "BELOW the target" in err and "re-ranking by SQ8 codes needs" in err
    hashed = []
    real = F._file_sha256
    monkeypatch.setattr(F, "_file_sha256", lambda path: hashed.append(path) or real(path))
    assert cli.main(args) == 0 and _state(out) == rec and hashed == []  # up to date by fingerprint
    assert cli.main([*args, "--verify"]) == 0 and _state(out) == rec
    assert len(hashed) == 3  # index, id map, inverted lists: each hashed whole


# -- S3 ------------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_large_files_go_to_s3_as_multipart_uploads(s3_env, tmp_path):
    from s3_fixtures import new_bucket

    bucket = new_bucket(s3_env)
    loc = Location.from_uri(f"s3://{bucket}/out")
    local = tmp_path / "big.bin"
    local.write_bytes(np.random.default_rng(0).bytes(11 * 2**20 + 5))
    before = local.read_bytes()
    rec = F.publish_file(loc, str(local), "indexes/faiss/big.bin", threshold=5 * 2**20, chunk=5 * 2**20)
    head = s3_env.client("s3").head_object(Bucket=bucket, Key="out/indexes/faiss/big.bin")
    assert head["ETag"].strip('"').endswith("-3"), head["ETag"]  # three parts: a multipart upload
    assert rec["bytes"] == len(before) and loc.read_bytes("indexes/faiss/big.bin") == before
    small = tmp_path / "small.bin"
    small.write_bytes(b"x" * 1000)
    F.publish_file(loc, str(small), "indexes/faiss/small.bin", threshold=5 * 2**20)
    assert "-" not in s3_env.client("s3").head_object(Bucket=bucket, Key="out/indexes/faiss/small.bin")["ETag"]


@pytest.mark.s3
@pytest.mark.slow
def test_an_ivf_build_on_s3_is_searchable_and_rebuilt_when_damaged(s3_env, corpus, tmp_path, monkeypatch):
    from s3_fixtures import new_bucket

    monkeypatch.setenv("REEMBED_CACHE", str(tmp_path / "cache"))
    xb, xq = corpus
    bucket = new_bucket(s3_env)
    out = write_output(f"s3://{bucket}/out", xb[:3000], shard_rows=SHARD)
    cfg = IndexConfig(faiss="ivf", qdrant="none")
    rec = stage.run_faiss(out, cfg)
    loc = Location.from_uri(out)
    assert rec["ntotal"] == 3000 and loc.exists(rec["ivfdata_path"])
    assert not loc.list("indexes/faiss/_build", recursive=True)
    index, _ = F.read_index(loc, rec)
    assert _recall(index, xb[:3000], xq) >= 0.95
    s3 = s3_env.client("s3")
    s3.put_object(Bucket=bucket, Key=f"out/{rec['ivfdata_path']}", Body=b"not the lists")
    assert stage.faiss_current(loc, Manifest.load(loc), cfg) is None
    assert stage.run_faiss(out, cfg)["version"] == 2
