"""Incremental re-embedding (reembed.reuse): `reembed run --reuse OUT1` embeds only the new and changed rows,
carries the others' vectors forward bit for bit, lists the gone ids (and `reembed index --prune-from` deletes
them from a Qdrant collection), and a block's identical texts are embedded once."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_jsonl, write_parquet
from reembed import cli, pipeline, reuse
from reembed import schema as S
from reembed.config import load_config
from reembed.errors import OutputRefused
from reembed.manifest import Manifest
from reembed.storage import Location

SHARD_ROWS = 50


def cfg_for(inp, out, model, *extra):
    return load_config(None, [f"input.uri={inp}", f"output.uri={out}", f"model.name={model}",
                              f"plan.shard_rows={SHARD_ROWS}", "model.backend=torch", *extra])


def vectors(out: Path) -> dict[str, bytes]:
    """id -> the raw float32 bytes of its vector, over the committed shards."""
    m = Manifest.load(Location.from_uri(str(out)))
    found = {}
    for rec in m.committed.values():
        t = pq.read_table(out / rec["path"], columns=[S.ID, S.EMBEDDING])
        for i, v in zip(t.column(S.ID).to_pylist(), S.embedding_matrix(t.column(S.EMBEDDING))):
            assert i not in found, f"{i} written twice"
            found[i] = v.tobytes()
    return found


def corpus(n: int = 200) -> list[dict]:
    docs = make_docs(n)
    for d in docs:  # make_docs repeats a text every 80 documents; these want distinct texts
        d["text"] = f"{d['text']} {d['id']}"
    return docs


def changed_corpus(docs: list[dict]) -> tuple[list[dict], set[str], set[str], set[str]]:
    """10% of the texts changed, 5% of the documents deleted, 5% added: (docs, changed, deleted, added ids)."""
    n = len(docs)
    picks = np.random.default_rng(7).permutation(n)
    changed = {docs[i]["id"] for i in picks[: n // 10]}
    deleted = {docs[i]["id"] for i in picks[n // 10: n // 10 + n // 20]}
    new = [{**d, "text": d["text"] + " and then it changed"} if d["id"] in changed else dict(d)
           for d in docs if d["id"] not in deleted]
    added = [{**d, "text": f"{d['text']} {d['id']}"} for d in make_docs(n // 20, prefix="new", start=1000)]
    return new + added, changed, deleted, {d["id"] for d in added}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_model, ray_local):
    """OUT1 of a 200-document corpus, and OUT2 of its next version (10% changed, 5% deleted, 5% added, half
    of it Parquet, half JSON Lines) run with --reuse OUT1."""
    root = tmp_path_factory.mktemp("reuse")
    docs = corpus()
    write_parquet(root / "v1" / "docs.parquet", docs)
    first = pipeline.run(cfg_for(root / "v1", root / "out1", tiny_model))
    new, changed, deleted, added = changed_corpus(docs)
    write_parquet(root / "v2" / "a.parquet", new[:120])
    write_jsonl(root / "v2" / "b.jsonl", new[120:])
    second = pipeline.run(cfg_for(root / "v2", root / "out2", tiny_model, f"plan.reuse={root / 'out1'}"))
    return {"root": root, "docs": docs, "new": new, "changed": changed, "deleted": deleted, "added": added,
            "first": first, "second": second}


@pytest.mark.slow
def test_reuse_embeds_only_changed_and_added_rows_and_equals_a_full_run(runs, tiny_model):
    root, docs, new = runs["root"], runs["docs"], runs["new"]
    changed, deleted, added = runs["changed"], runs["deleted"], runs["added"]
    assert runs["first"]["rows_embedded"] == len(docs) and runs["first"]["rows_reused"] == 0
    s = runs["second"]
    assert s["complete"] and s["embedded"] == len(new) == 200
    assert s["rows_embedded"] == len(changed) + len(added) == 30  # exactly the changed and added rows
    assert s["run"]["rows_embedded"] == 30 and s["run"]["rows_reused"] == 170
    assert s["rows_reused"] == len(docs) - len(changed) - len(deleted) == 170
    assert s["rows_deduplicated"] == 0
    assert s["gone"] == len(deleted) == 10 and s["reuse"]["changed"] == len(changed)

    old, got = vectors(root / "out1"), vectors(root / "out2")
    kept = {d["id"] for d in docs} - changed - deleted
    assert all(got[i] == old[i] for i in kept)  # carried forward, bit for bit
    assert all(got[i] != old[i] for i in changed)  # re-embedded from their new text

    full = pipeline.run(cfg_for(root / "v2", root / "full", tiny_model))
    assert full["rows_embedded"] == len(new) and full["rows_reused"] == 0
    want = vectors(root / "full")
    assert set(want) == set(got) == {d["id"] for d in new}
    ids = sorted(want)
    np.testing.assert_allclose(np.stack([np.frombuffer(got[i], np.float32) for i in ids]),
                               np.stack([np.frombuffer(want[i], np.float32) for i in ids]), atol=1e-5)

    m = Manifest.load(Location.from_uri(str(root / "out2")))
    gone = pa.concat_arrays(list(reuse.gone_ids(m.loc, m.plan))).to_pylist()
    assert sorted(gone) == sorted(deleted)

    again = pipeline.run(cfg_for(root / "v2", root / "out2", tiny_model, f"plan.reuse={root / 'out1'}"))
    assert again["complete"] and again["rows_reused"] == 170 and again["rows_embedded"] == 30


def earlier_output(folder: Path, model: dict, text_hash: bool = True) -> Path:
    """An output as a run leaves it (manifest, commit log, one committed shard of five rows), made by hand."""
    from conftest import embedded_rows
    from reembed.write import write_shard

    loc = Location.from_uri(str(folder))
    m = Manifest.create(loc, model, {"shards": 1, "rows": 5}, {"rows": 0, "mode": "hash"})
    rows = embedded_rows(0, 5, dim=model["dimension"])
    if text_hash:
        rows = rows.append_column(S.TEXT_HASH, S.text_hashes(pa.array([f"t{i}" for i in range(5)])))
    m.commit_shard(0, write_shard(loc, 0, rows, S.shard_schema(model["dimension"], text_hash=text_hash)))
    return folder


def test_reuse_of_another_model_or_of_an_output_without_text_hashes_is_refused_in_one_line(tmp_path, tiny_model,
                                                                                           capsys):
    cfg = cfg_for(tmp_path / "in", tmp_path / "out", tiny_model)
    write_parquet(tmp_path / "in" / "docs.parquet", corpus(10))
    model = pipeline.inspect_model(cfg)
    other = dict(model, max_seq_length=64, fingerprint="0" * 16)
    earlier_output(tmp_path / "other-model", other)
    with pytest.raises(OutputRefused, match="fingerprint") as e:
        pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out", tiny_model, f"plan.reuse={tmp_path / 'other-model'}"))
    assert "max_seq_length: 64 -> 128" in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "out" / "manifest.json").exists()  # refused before anything was planned

    earlier_output(tmp_path / "no-hashes", model, text_hash=False)
    with pytest.raises(OutputRefused, match="no text_hash column"):
        pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out", tiny_model, f"plan.reuse={tmp_path / 'no-hashes'}"))

    capsys.readouterr()
    rc = cli.main(["run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model",
                   str(tiny_model), "--backend", "torch", "--reuse", str(tmp_path / "other-model")])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reembed:")]
    assert rc == 3 and len(errors) == 1 and errors[0].startswith("reembed: error: --reuse ")


def test_dry_run_checks_the_reuse_output_as_the_run_does_and_counts_it_only_as_ray_tasks(tmp_path, tiny_model,
                                                                                          ray_local, capsys):
    import json

    cfg = cfg_for(tmp_path / "in", tmp_path / "out", tiny_model)
    model = pipeline.inspect_model(cfg)
    earlier_output(tmp_path / "out1", model)  # ids s0-0 .. s0-4, texts t0 .. t4
    docs = [{"id": f"s0-{i}", "text": f"t{i}"} for i in range(3)] + [{"id": "s0-3", "text": "t3, changed"},
                                                                     {"id": "n1", "text": "a new text"}]
    write_parquet(tmp_path / "in" / "docs.parquet", docs)  # s0-4 is gone
    argv = ["run", "--dry-run", "--input", str(tmp_path / "in"), "--output", str(tmp_path / "out"), "--model",
            str(tiny_model), "--backend", "torch", "--reuse", str(tmp_path / "out1"), "--json"]

    assert cli.main(argv) == 0  # checked, not counted: no pass over the input's texts
    r = json.loads(capsys.readouterr().out)
    u = r["reuse"]
    assert (u["uri"], u["fingerprint"], u["old_rows"], u["old_complete"]) == (str(tmp_path / "out1"),
                                                                                model["fingerprint"], 5, True)
    assert u["reusable"] is None and "--count-reuse" in u["counted"] and r["pending_rows"] == 5
    assert "text hash" in u["compared"] and "Ray tasks" in u["compared"]

    assert cli.main([*argv, "--count-reuse", "--set", "output.dtype=float16"]) == 0
    r = json.loads(capsys.readouterr().out)
    u = r["reuse"]
    assert (u["reusable"], u["changed"], u["gone"]) == (3, 1, 1) and u["counted"].startswith("exact")
    assert r["pending_rows"] == 2  # the changed and the new row
    assert (r["vector_dtype"], r["bytes_per_vector"]) == ("float16", 2 * model["dimension"])
    assert not (tmp_path / "out").exists()

    assert cli.main(argv[:-1]) == 0
    text = capsys.readouterr().out
    assert f"reuse:       {tmp_path / 'out1'}: same model fingerprint {model['fingerprint']}, 5 committed rows" in text
    assert "5 rows to embed (at most: the reused rows are not counted)" in text
    assert f"vectors:     float32, {model['dimension']}-d: {4 * model['dimension']} bytes per vector" in text

    # refused exactly as the run refuses it, in one line, before anything is planned
    other = dict(model, max_seq_length=64, fingerprint="0" * 16)
    earlier_output(tmp_path / "other-model", other)
    earlier_output(tmp_path / "no-hashes", model, text_hash=False)
    for old, why in (("other-model", "fingerprint"), ("no-hashes", "no text_hash column"), ("out", "own --output")):
        with pytest.raises(OutputRefused if old != "out" else Exception) as by_run:
            pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out", tiny_model, f"plan.reuse={tmp_path / old}"))
        rc = cli.main([*argv[:-3], "--reuse", str(tmp_path / old)])
        err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("reembed:")]
        assert rc in (2, 3) and err == [f"reembed: error: {by_run.value}"] and why in err[0]
    assert cli.main([*argv[:-3], "--count-reuse"]) == 2  # counting needs --reuse
    assert not (tmp_path / "out" / "manifest.json").exists()


@pytest.mark.slow
def test_prune_deletes_the_gone_ids_from_an_embedded_qdrant_collection(runs, capsys):
    from reembed.indexes import qdrant as Q
    from reembed.indexes.build import build_indexes

    root = runs["root"]
    folder = root / "qdrant"
    built = build_indexes(str(root / "out1"), load_config(None, ["index.faiss=none", f"index.qdrant={folder}"]).index,
                          use_ray=False)
    collection = built["qdrant"]["collection"]
    assert built["qdrant"]["count"] == len(runs["docs"])
    rc = cli.main(["index", str(root / "out2"), "--qdrant", str(folder), "--prune-from", collection, "--json"])
    assert rc == 0
    out = capsys.readouterr().out
    assert '"deleted": 10' in out
    client = Q.connect(str(folder))
    try:
        assert Q.count(client, collection) == len(runs["docs"]) - len(runs["deleted"])
        deleted = [Q.point_id(i) for i in sorted(runs["deleted"])]
        assert client.retrieve(collection, ids=deleted) == []
        kept = [Q.point_id(d["id"]) for d in runs["docs"][:20] if d["id"] not in runs["deleted"]]
        assert len(client.retrieve(collection, ids=kept)) == len(kept)
    finally:
        client.close()


@pytest.mark.slow
def test_dry_run_of_a_reuse_output_reports_its_planned_counts(runs, tiny_model, capsys):
    import json

    root = runs["root"]
    argv = ["run", "--dry-run", "--input", str(root / "v2"), "--output", str(root / "out2"), "--model",
            str(tiny_model), "--shard-rows", str(SHARD_ROWS), "--backend", "torch", "--reuse", str(root / "out1")]
    assert cli.main([*argv, "--json"]) == 0
    u = json.loads(capsys.readouterr().out)["reuse"]
    assert (u["reusable"], u["changed"], u["gone"]) == (170, 20, 10) and u["counted"] == "exact: from this output's plan"
    assert cli.main(argv) == 0
    assert "count:     170 rows would be reused, 20 changed texts re-embedded, 10 ids gone" in capsys.readouterr().out


def output_with_gone_parts(out: Path, parts: list[list[str]]) -> Location:
    """An output of a `--reuse` run as far as `--prune-from` reads it: a manifest and its plan's gone parts."""
    from reembed.plan import _record

    loc = Location.from_uri(str(out))
    plan = loc.child("plan")
    for p, ids in enumerate(parts):
        plan.write_bytes(reuse._parquet_bytes(pa.table({"id": pa.array(ids, pa.string())}), []), "gone",
                         reuse.part_file(p))
    plan.write_bytes(b"", "files.parquet")
    store = {"files": _record(plan, "files.parquet"), "segments": [], "duplicates": [], "reuse": [],
             "gone": [_record(plan, "gone", reuse.part_file(p)) for p in range(len(parts))]}
    model = {"name": "m", "dimension": 4, "fingerprint": "f" * 16}
    reused = {"uri": "x", "gone": sum(map(len, parts)), "partitions": len(parts)}
    Manifest.create(loc, model, {"shards": 0, "rows": 0, "store": store, "reuse": reused}, {})
    return loc


def qdrant_of(folder: Path, points: int) -> str:
    """An embedded Qdrant folder with ``documents-v1`` of points d0 .. d<points - 1>."""
    from qdrant_client import models

    from reembed.indexes import qdrant as Q

    client = Q.connect(str(folder))
    try:
        Q.create_collection(client, "documents-v1", 4, {})
        client.upsert("documents-v1", points=[models.PointStruct(id=Q.point_id(f"d{i}"), vector=[1.0, 0, 0, i],
                                                                  payload={"id": f"d{i}"}) for i in range(points)])
    finally:
        client.close()
    return str(folder)


def remaining(folder: str) -> list[str]:
    from reembed.indexes import qdrant as Q

    client = Q.connect(folder)
    try:
        points, _ = client.scroll("documents-v1", limit=1000, with_payload=True)
        return sorted((p.payload["id"] for p in points), key=lambda x: int(x[1:]))
    finally:
        client.close()


GONE_PARTS = [["d3", "d7"], ["d8", "x-never-indexed"], [], ["d15"]]  # 5 gone ids, 4 of them in the collection
LEFT = [f"d{i}" for i in range(20) if i not in (3, 7, 8, 15)]


def test_prune_from_deletes_exactly_the_gone_ids_from_embedded_qdrant_by_one_ray_actor(tmp_path, capsys, ray_local):
    import json

    out = output_with_gone_parts(tmp_path / "out2", GONE_PARTS)
    folder = qdrant_of(tmp_path / "qdrant", 20)
    assert cli.main(["index", out.uri, "--qdrant", folder, "--prune-from", "documents-v1", "--batch-size", "1",
                     "--json"]) == 0
    done = json.loads(capsys.readouterr().out)
    assert (done["gone"], done["deleted"], done["count"]) == (5, 4, 16)
    assert len(done["writers"]) == 1 and not done["writers"][0].endswith(f":{os.getpid()}")  # the one actor
    assert remaining(folder) == LEFT

    assert cli.main(["index", out.uri, "--qdrant", folder, "--prune-from", "documents-v1", "--no-ray"]) == 0  # again
    assert "0 of 5 gone ids deleted from documents-v1" in capsys.readouterr().out and remaining(folder) == LEFT
    assert cli.main(["index", out.uri, "--qdrant", folder, "--prune-from", "nope"]) == 1
    assert "no collection or alias 'nope'" in capsys.readouterr().err

    # A server's path: its task, as a Ray task (one here: an embedded folder takes one process at a time).
    from reembed.scan import run_tasks

    other = qdrant_of(tmp_path / "qdrant2", 20)
    job = reuse.Prune(other, "documents-v1", batch_size=2)
    [done] = run_tasks(reuse._prune_task, [(out, list(enumerate(Manifest.load(out).plan["store"]["gone"])), job)],
                       use_ray=True)
    assert (done["gone"], done["parts"]) == (5, 4) and not done["worker"].endswith(f":{os.getpid()}")
    assert remaining(other) == LEFT


def test_prune_from_without_ray_and_a_server_task_delete_exactly_the_gone_ids(tmp_path, capsys):
    out = output_with_gone_parts(tmp_path / "out2", GONE_PARTS)
    folder = qdrant_of(tmp_path / "qdrant", 20)
    assert cli.main(["index", out.uri, "--qdrant", folder, "--prune-from", "documents-v1", "--no-ray"]) == 0
    assert "4 of 5 gone ids deleted from documents-v1 at" in capsys.readouterr().out
    assert remaining(folder) == LEFT

    # A server's task (here run in this process, on an embedded folder): its own parts' ids, in batches.
    other = qdrant_of(tmp_path / "qdrant2", 20)
    m = Manifest.load(out)
    parts = list(enumerate(m.plan["store"]["gone"]))
    job = reuse.Prune(other, "documents-v1", batch_size=1)
    results = [reuse._prune_task(out, parts[:2], job), reuse._prune_task(out, parts[2:], job)]
    assert [(r["gone"], r["parts"]) for r in results] == [(4, 2), (1, 2)]
    assert remaining(other) == LEFT


def test_identical_texts_of_a_block_are_embedded_once_and_every_id_gets_the_vector(tiny_model, tmp_path):
    from reembed.embed import Embedder
    from reembed.write import write_shard

    texts = [f"text number {i % 7} about rivers and data" for i in range(30)]  # 7 distinct texts
    n = len(texts)
    table = pa.table({S.ID: [f"d{i}" for i in range(n)], S.TEXT: texts, S.REASON: pa.nulls(n, pa.string()),
                      S.SOURCE_FILE: ["f"] * n, S.SOURCE_ROW: np.arange(n), S.SHARD: np.zeros(n, np.int32),
                      S.POS: np.arange(n)})
    table = table.append_column(S.TEXT_HASH, S.text_hashes(table.column(S.TEXT)))
    e = Embedder({"name": str(tiny_model), "device": "cpu", "backend": "torch"})
    try:
        got = e(table)
        assert e.stats.rows == 7  # the model saw each text once
        ref, _ = e.embed(sorted(set(texts)))
    finally:
        e.close()
    assert int(np.sum(got.column(S.COPIED).to_numpy(zero_copy_only=False))) == n - 7
    vecs = S.embedding_matrix(got.column(S.EMBEDDING))
    by_text = dict(zip(sorted(set(texts)), ref))
    for t, v in zip(texts, vecs):
        np.testing.assert_allclose(v, by_text[t], atol=1e-5)
    rec = write_shard(Location.from_uri(str(tmp_path)), 0, got, S.shard_schema(vecs.shape[1], text_hash=True))
    assert rec["rows"] == n and rec["deduplicated"] == n - 7 and rec["reused"] == 0
    written = pq.read_table(tmp_path / rec["path"])
    assert written.column(S.TEXT_HASH).to_pylist() == S.text_hashes(pa.array(texts)).to_pylist()


def test_join_partition_carries_unchanged_ids_and_lists_gone_ones(tmp_path):
    work = Location.from_uri(str(tmp_path / "plan"))
    h = S.text_hashes(pa.array(["a", "b", "c", "d", "B"]))
    new = pa.table({"id": ["1", "2", "3", "5"], "shard": [0, 0, 1, 1], "pos": [0, 1, 0, 1],
                    "text_hash": [h[0], h[4], h[2], h[3]]})  # 2 changed ("b" -> "B"), 4 gone, 5 added
    old = pa.table({"id": ["1", "2", "3", "4"], "old_path": ["shards/x.parquet"] * 4, "old_row": [0, 1, 2, 3],
                    "text_hash": h.slice(0, 4)})
    assert reuse._write_partitions(work, "new", "g-0000000.parquet", new.cast(reuse._NEW_SCHEMA), 1) == (0,)
    assert reuse._write_partitions(work, "old", "g-0000000.parquet", old.cast(reuse._OLD_SCHEMA), 1) == (0,)
    counts = reuse.join_partition(work, 0, ["g-0000000.parquet"], ["g-0000000.parquet"])
    assert counts == {"reusable": 2, "changed": 1, "gone": 1}
    carried = reuse.shard_reuse(work, 1, 1)
    assert carried.to_pylist() == [{"shard": 1, "pos": 0, "old_path": "shards/x.parquet", "old_row": 2}]
    assert reuse.shard_reuse(work, 0, 1).column("old_row").to_pylist() == [0]
    gone = pq.read_table(tmp_path / "plan" / "gone" / "part-0000.parquet")
    assert gone.column("id").to_pylist() == ["4"]


def test_a_read_task_of_several_shards_opens_each_reuse_part_once(tmp_path):
    """The read stage's path, without Ray: a plan of five 2-row shards reusing a hand-made OUT1, its reuse
    planned in three partitions; one read task of all the shards opens each reuse part once, not per shard."""
    import functools

    from counting_fs import counting_location
    from reembed import read
    from reembed.plan import make_plan

    model = {"name": "m", "dimension": 4, "fingerprint": "f" * 16}
    earlier = Location.from_uri(str(earlier_output(tmp_path / "out1", model)))  # s0-0 .. s0-4: t0 .. t4
    docs = [{"id": f"s0-{i}", "text": f"t{i}" if i != 2 else "t2, changed"} for i in range(5)]
    write_parquet(tmp_path / "in" / "docs.parquet", docs + [{"id": f"n{i}", "text": f"new {i}"} for i in range(5)])
    cfg = cfg_for(tmp_path / "in", tmp_path / "out2", "m")
    source, work = Location.from_uri(str(tmp_path / "in")), Location.from_uri(str(tmp_path / "out2" / "plan"))
    plan = make_plan(cfg.input, 2, work, source=source)
    fields = {k: plan.get(k) for k in read.FIELDS if k != "reuse"}
    reader = functools.partial(read.read_shards, fields, work, source=source)
    old = Manifest.load(earlier)
    plan["reuse"] = reuse.plan_reuse(earlier, old, plan, work, reader)
    assert plan["shards"] == 5 and plan["reuse"]["reusable"] == 4
    assert plan["reuse"]["partitions"] == 1
    by_shard = [reuse.shard_reuse(work, s, 1) for s in range(5)]
    plan["reuse"]["partitions"] = 3  # spread over three parts: several parts for one task to open
    for p in range(3):
        rows = pa.concat_tables([by_shard[s] for s in range(5) if s % 3 == p])
        work.write_bytes(reuse._parquet_bytes(rows, ["shard"]), reuse.REUSE_DIR, reuse.part_file(p))

    counts, counted = counting_location(tmp_path / "out2" / "plan")
    task = {**fields, "reuse": plan["reuse"], "earlier": earlier}
    tables = list(read.read_shards(task, counted, range(5), source))
    opens = {p: n for p, n in counts.opens.items() if f"/{reuse.REUSE_DIR}/" in p}
    assert len(opens) == 3 and set(opens.values()) == {1}  # each part once for the task's five shards
    got = {i: r for t in tables for i, r in zip(t.column(S.ID).to_pylist(), t.column(S.REUSED).to_pylist())}
    assert {i for i, r in got.items() if r} == {"s0-0", "s0-1", "s0-3", "s0-4"}
    alone = [read.read_shard(task, work, s, source) for s in range(5)]  # one shard at a time: the same rows
    for a, b in zip(tables, alone):
        assert a.select([S.ID, S.REUSED, S.OLD_EMBEDDING]).equals(b.select([S.ID, S.REUSED, S.OLD_EMBEDDING]))
    reused = pa.concat_tables(tables)
    reused = reused.filter(reused.column(S.REUSED))
    old_vectors = vectors(tmp_path / "out1")
    for i, v in zip(reused.column(S.ID).to_pylist(), S.embedding_matrix(reused.column(S.OLD_EMBEDDING))):
        assert v.tobytes() == old_vectors[i]


def test_carry_forward_writes_the_old_vectors_bit_for_bit():
    rng = np.random.default_rng(0)
    new, old = rng.normal(size=(5, 8)).astype(np.float32), rng.normal(size=(5, 8)).astype(np.float32)
    reused = np.array([True, False, True, False, False])
    table = pa.table({S.EMBEDDING: S.embedding_array(new), S.TRUNCATED: np.zeros(5, bool), S.REUSED: reused,
                      S.OLD_EMBEDDING: S.embedding_array(old), S.OLD_TRUNCATED: np.ones(5, bool)})
    out, count = reuse.carry_forward(table)
    got = S.embedding_matrix(out.column(S.EMBEDDING))
    assert count == 2
    assert got[reused].tobytes() == old[reused].tobytes() and got[~reused].tobytes() == new[~reused].tobytes()
    assert out.column(S.TRUNCATED).to_pylist() == reused.tolist()


@pytest.mark.slow
def test_a_reuse_run_killed_and_rerun_is_exactly_once(runs, tiny_model, tmp_path):
    root = runs["root"]
    out = tmp_path / "out"
    args = [sys.executable, "-m", "reembed", "run", "--input", str(root / "v2"), "--output", str(out), "--model",
            str(tiny_model), "--shard-rows", "10", "--backend", "torch", "--reuse", str(root / "out1")]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RAY_ADDRESS", None)
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 240
    try:
        while time.time() < deadline and not list((out / "_log").glob("*.json"))[2:]:
            assert proc.poll() is None, "the job ended before it could be killed"
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    partial = Manifest.load(Location.from_uri(str(out)))
    assert partial is not None and not partial.is_complete()
    rerun = subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    s = pipeline.status(str(out))
    assert s["complete"] and s["rows_reused"] == 170 and s["rows_embedded"] == 30 and s["gone"] == 10
    got, old = vectors(out), vectors(root / "out1")
    assert set(got) == {d["id"] for d in runs["new"]}  # and none twice (vectors() checks)
    kept = {d["id"] for d in runs["docs"]} - runs["changed"] - runs["deleted"]
    assert all(got[i] == old[i] for i in kept)
