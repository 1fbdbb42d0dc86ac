"""Corpus-wide identical texts (reembed.texts, reembed.copies): within one run each distinct text is embedded
once, and every id carrying it is written with its leader's vector (the text's first row in plan order), bit for
bit, across shards far apart; the ledger stays exact and a run stopped between the passes resumes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_jsonl, write_parquet
from reembed import pipeline, plan, read, texts
from reembed import schema as S
from reembed.config import load_config
from reembed.manifest import Manifest
from reembed.storage import Location

SHARD_ROWS = 40


def cfg_for(inp, out, model, *extra):
    return load_config(None, [f"input.uri={inp}", f"output.uri={out}", f"model.name={model}",
                              f"plan.shard_rows={SHARD_ROWS}", "model.backend=torch", "plan.dedup_texts=true", *extra])


def repeated_corpus() -> list[dict]:
    """240 documents (6 shards of 40): 60 distinct texts, most repeated in shards far apart (text k at rows k,
    k + 97, k + 171, ...), some twice inside one shard, plus an empty text and a repeated id (dead letters)."""
    base = make_docs(60)
    texts_ = [f"{d['text']} number {i}" for i, d in enumerate(base)]
    docs = []
    for i in range(240):
        k = (i * 37) % 60 if i >= 60 else i
        docs.append({"id": f"d{i}", "text": texts_[k], "lang": "en" if i % 2 else "fr"})
    docs[13]["text"] = docs[12]["text"]  # a repeat inside shard 0
    docs[200]["text"] = "  "  # empty_text
    docs[201]["id"] = "d5"  # duplicate_id
    return docs


def shard_tables(out: Path) -> dict[int, pa.Table]:
    m = Manifest.load(Location.from_uri(str(out)))
    return {s: pq.read_table(out / rec["path"]) for s, rec in m.committed.items()}


def leaders_of(docs: list[dict]) -> dict[str, str]:
    """id -> the id of its text's first live row in input order (itself for a leader)."""
    seen_ids, first, out = set(), {}, {}
    for d in docs:
        if d["id"] in seen_ids or not d["text"].strip():
            seen_ids.add(d["id"])
            continue
        seen_ids.add(d["id"])
        out[d["id"]] = first.setdefault(d["text"], d["id"])
    return out


# -- the rule, without Ray ----------------------------------------------------------------------------------


def test_leaders_are_first_occurrences_in_order():
    h = S.text_hashes(pa.array(["a", "b", "a", "c", "b", "a"]))
    assert texts.leaders(h).tolist() == [0, 1, 0, 3, 1, 0]
    assert texts.leaders(S.text_hashes(pa.array([], pa.string()))).tolist() == []


def test_copy_shards_pack_whole_plan_shards_in_order():
    moved = np.array([0, 30, 0, 15, 10, 40, 0], dtype=np.int64)
    got = list(texts.pack_copies(moved, 7, 40))
    assert got == [{"shard": 7, "origin_first": 1, "origin_stop": 2, "rows": 30},
                   {"shard": 8, "origin_first": 3, "origin_stop": 5, "rows": 25},
                   {"shard": 9, "origin_first": 5, "origin_stop": 6, "rows": 40}]
    assert list(texts.pack_copies(np.zeros(3, np.int64), 3, 40)) == []


def test_auto_copies_when_the_embedding_saved_outweighs_the_copy_pass():
    from reembed.texts import COPY_CPU_S_PER_ROW as ROW, COPY_CPU_S_PER_TASK as TASK, decide

    many = {"rows": 10_000_000, "followers": 1_200_000, "moved": 1_000_000, "in_shard": 200_000, "copies": 100,
            "copy_tasks": 100, "gather_tasks": 1}
    d = decide(many, "cuda", devices=8, cpus=64)
    saved, spent = 1_000_000 * 0.24e-3 / 8, (1_000_000 * ROW + 101 * TASK) / 64
    assert d["saved_s"] == pytest.approx(saved, abs=1e-3) and d["copy_pass_s"] == pytest.approx(spent, abs=1e-3)
    assert d["dedup"] == (saved > spent) and d["rows_saved"] == 1_000_000 and d["copy_tasks"] == 101
    assert d["counts"] == {k: many[k] for k in ("rows", "followers", "moved", "in_shard", "copies")}
    # the embedding cost per row decides: a fast model (0.01 ms a row) is not worth copying for
    assert not decide(many, "cuda", 8, 64, embed_s_per_row=1e-8)["dedup"]
    assert decide(many, "cuda", 8, 64, embed_s_per_row=1.0)["dedup"]
    # few repeats: the tasks' fixed cost outweighs them; none: nothing to copy
    few = dict(many, moved=100, copy_tasks=1, gather_tasks=1)
    assert not decide(few, "cuda", 8, 64)["dedup"]
    assert not decide(dict(many, moved=0, copy_tasks=0, gather_tasks=0), "cpu", 2, 2)["dedup"]
    # on CPU the embedding is the expensive side: even 100 repeats are worth their one task
    assert decide(dict(few, moved=1_000), "cpu", devices=64, cpus=64)["embed_s_per_row"] == texts.EMBED_S_PER_ROW["cpu"]
    assert decide(dict(few, moved=1_000), "cpu", devices=64, cpus=64)["dedup"]
    # more CPUs per GPU make the copy pass cheaper against the same devices' time
    edge = dict(many, moved=200_000, copy_tasks=20)
    assert decide(edge, "cuda", 8, 256)["copy_pass_s"] < decide(edge, "cuda", 8, 16)["copy_pass_s"]


def test_auto_weighs_the_devices_the_pool_can_grow_to():
    """An autoscaling cluster that has scaled down while the plan is made: with ``compute.max_actors`` the
    devices are those the Embedder pool grows to, not the GPUs Ray reports now."""
    scaled_down = {"CPU": 16.0, "GPU": 1.0}

    def cluster(*overrides):
        return pipeline.texts_cluster(load_config(None, ["model.device=auto", *overrides]), scaled_down)

    assert cluster() == {"device": "cuda", "devices": 1, "cpus": 16}
    assert cluster("compute.max_actors=64") == {"device": "cuda", "devices": 64, "cpus": 16}
    assert cluster("compute.max_actors=64", "compute.gpus_per_actor=0.5")["devices"] == 32
    assert pipeline.texts_cluster(load_config(None, ["model.device=cpu"]), {"CPU": 8.0})["devices"] == 8
    assert pipeline.texts_cluster(load_config(None, ["model.device=cpu", "compute.max_actors=4",
                                                     "compute.cpus_per_actor=8"]), {"CPU": 8.0})["devices"] == 32
    many = {"moved": 1_000_000, "copy_tasks": 100, "gather_tasks": 1}
    # on 1 GPU the embedding saved outweighs the copy pass; spread over the 64 the pool grows to, it does not
    assert texts.decide(many, **cluster())["dedup"]
    assert not texts.decide(many, **cluster("compute.max_actors=64"))["dedup"]


def test_hash_partitions_are_stable_and_spread():
    h = S.text_hashes(pa.array([f"text {i}" for i in range(4000)]))
    p = texts.hash_partitions(h, 8)
    assert p.min() == 0 and p.max() == 7 and np.bincount(p).min() > 350
    assert (texts.hash_partitions(h.slice(100, 50), 8) == p[100:150]).all()  # an offset array hashes the same


def test_in_shard_followers_take_their_leaders_vector_bit_for_bit():
    t = pa.table({S.TEXT_HASH: S.text_hashes(pa.array(["x", "y", "x", "z", "x", "y"])),
                  S.REASON: pa.array([None, None, None, "empty_text", None, None], pa.string()),
                  S.POS: pa.array(np.arange(6, dtype=np.int64))})
    moved = np.array([False, False, False, False, True, False])
    lead = texts.in_shard_leaders(t, moved)
    assert lead.tolist() == [-1, -1, 0, -1, -1, 1]  # dead and moved rows are neither leaders nor followers
    live = pa.table({S.POS: pa.array([0, 1, 2, 5], pa.int64()), S.LEADER_POS: pa.array([-1, -1, 0, 1], pa.int64()),
                     S.EMBEDDING: S.embedding_array(np.arange(8, dtype=np.float32).reshape(4, 2)),
                     S.TRUNCATED: pa.array([True, False, False, False])})
    out, n = texts.copy_in_shard(live)
    assert n == 2
    assert S.embedding_matrix(out.column(S.EMBEDDING)).tolist() == [[0, 1], [2, 3], [0, 1], [2, 3]]
    assert out.column(S.TRUNCATED).to_pylist() == [True, False, True, False]
    assert out.column(S.COPIED).to_pylist() == [False, False, True, True]


def test_plan_lists_the_followers_whose_leader_is_in_another_shard(tmp_path):
    docs = repeated_corpus()
    write_parquet(tmp_path / "in" / "a.parquet", docs[:130])
    write_jsonl(tmp_path / "in" / "b.jsonl", docs[130:])
    cfg = cfg_for(tmp_path / "in", tmp_path / "out", "unused").input
    work = Location.from_uri(str(tmp_path / "out" / "plan"))
    p = plan.make_plan(cfg, SHARD_ROWS, work)
    fields = {k: p.get(k) for k in read.FIELDS if k not in ("reuse", "texts")}
    source = plan.input_location(p)
    summary = texts.plan_texts(p, work, lambda shards: read.read_shards(fields, work, shards, source), partitions=3)
    lead = leaders_of(docs)
    shard_of = {d["id"]: i // SHARD_ROWS for i, d in enumerate(docs)}
    moved = {i for i, l in lead.items() if i != l and shard_of[i] != shard_of[l]}
    in_shard = {i for i, l in lead.items() if i != l and shard_of[i] == shard_of[l]}
    assert summary["moved"] == len(moved) and summary["in_shard"] == len(in_shard) >= 1
    assert summary["rows"] == len(lead)
    rows = texts.followers(work, 0, p["shards"] - 1, 3)
    assert set(rows.column("id").to_pylist()) == moved
    assert all(lead[i] == l for i, l in zip(rows.column("id").to_pylist(), rows.column("leader_id").to_pylist()))
    copies = texts.read_copies(work)
    assert sum(copies.column("rows").to_pylist()) == len(moved)
    assert copies.column("shard").to_pylist() == list(range(p["shards"], p["shards"] + summary["copies"]))
    assert not work.exists(texts.KEYS_DIR)


# -- the job, on a local Ray -------------------------------------------------------------------------------


def test_auto_stores_its_decision_in_the_plan_and_drops_the_copy_pass_it_refuses(tmp_path, ray_local):
    docs = repeated_corpus()
    write_parquet(tmp_path / "in" / "a.parquet", docs)
    cfg = cfg_for(tmp_path / "in", tmp_path / "out", "unused").input
    out = Location.from_uri(str(tmp_path / "out"))
    work = out.child("plan")
    p = plan.make_plan(cfg, SHARD_ROWS, work)
    source = plan.input_location(p)
    no = dict(p)  # 1,000 GPUs and one CPU: embedding the repeats takes no time, copying them does
    pipeline.plan_texts(no, out, source, auto={"device": "cuda", "devices": 1000, "cpus": 1})
    d = no["dedup_texts"]
    assert "texts" not in no and not work.exists(texts.TEXTS_DIR) and "texts" not in no["store"]
    assert d["mode"] == "auto" and not d["dedup"] and d["rows_saved"] == d["counts"]["moved"] > 0
    assert d["saved_s"] < d["copy_pass_s"] and d["counts"]["rows"] == 238
    yes = dict(p, store=dict(p["store"]))  # one CPU core embedding: copying is far cheaper
    pipeline.plan_texts(yes, out, source, auto={"device": "cpu", "devices": 1, "cpus": 1})
    assert yes["dedup_texts"]["dedup"] and yes["texts"]["moved"] == d["counts"]["moved"]
    assert work.exists(texts.TEXTS_DIR, texts.TASKS)
    assert len(yes["store"]["texts"]) == 2 * yes["texts"]["partitions"] + len(texts.PLAN_FILES)


@pytest.fixture(scope="module")
def job(tmp_path_factory, tiny_model, ray_local):
    root = tmp_path_factory.mktemp("texts")
    docs = repeated_corpus()
    write_parquet(root / "in" / "a.parquet", docs[:130])
    write_jsonl(root / "in" / "b.jsonl", docs[130:])
    summary = pipeline.run(cfg_for(root / "in", root / "out", tiny_model, "input.passthrough=[lang]"))
    return {"root": root, "docs": docs, "summary": summary}


def test_each_distinct_text_is_embedded_once_and_every_id_gets_its_leaders_vector(job):
    docs, out, s = job["docs"], job["root"] / "out", job["summary"]
    lead = leaders_of(docs)
    distinct = len(set(lead.values()))
    assert s["complete"]
    assert s["rows_embedded"] == distinct == 60
    assert s["rows_deduplicated"] == len(lead) - distinct
    tables = shard_tables(out)
    m = Manifest.load(Location.from_uri(str(out)))
    assert len(tables) == m.shard_count > m.plan["shards"]  # copy shards after the plan's
    assert not (out / "_copies").exists()  # the gather round's files go once the copy shards are committed
    vec, lang = {}, {}
    for t in tables.values():
        for i, v, g in zip(t.column(S.ID).to_pylist(), S.embedding_matrix(t.column(S.EMBEDDING)),
                           t.column("lang").to_pylist()):
            assert i not in vec, f"{i} written twice"
            vec[i], lang[i] = v.tobytes(), g
    assert set(vec) == set(lead)  # the ledger: every live id once
    for i, l in lead.items():
        assert vec[i] == vec[l], f"{i}'s vector is not its leader {l}'s"
    first = {d["id"]: d["lang"] for d in reversed(docs)}  # passthrough from the follower's own row
    assert all(lang[i] == first[i] for i in vec)
    tokens = sum(rec["tokens"] for rec in m.committed.values())
    assert tokens == s["tokens"] and tokens > 0
    t = m.totals()
    assert t["embedded"] + t["dead_lettered"] == len(docs)
    assert t["reasons"] == {"empty_text": 1, "duplicate_id": 1}


def test_moved_rows_sums_the_plan_shards_asked_for(job):
    m = Manifest.load(Location.from_uri(str(job["root"] / "out")))
    plan_loc = m.loc.child(plan.PLAN_DIR)
    counts = texts.moved_counts(plan_loc)
    regular = range(int(m.plan["shards"]))
    assert texts.moved_rows(plan_loc, list(regular)) == int(m.plan["texts"]["moved"]) > 0
    some = [s for s in regular if s % 2]
    assert texts.moved_rows(plan_loc, some) == sum(counts.get(s, 0) for s in some)
    assert texts.moved_rows(plan_loc, []) == 0


def test_the_vectors_are_what_the_model_gives_each_text(job, tiny_model, tmp_path):
    from reembed import embed

    e = embed.Embedder({"name": str(tiny_model), "device": "cpu", "dtype": "float32", "backend": "torch"})
    try:
        docs = [d for d in job["docs"] if d["text"].strip()]
        want, _ = e.embed([d["text"] for d in docs[:60]])
    finally:
        e.close()
    tables = shard_tables(job["root"] / "out")
    got = {}
    for t in tables.values():
        got.update(zip(t.column(S.ID).to_pylist(), S.embedding_matrix(t.column(S.EMBEDDING))))
    lead = leaders_of(job["docs"])
    for d, w in zip(docs[:60], want):
        np.testing.assert_allclose(got[lead[d["id"]]], w, atol=1e-5)


def test_dry_run_counts_what_the_run_copies_by_its_planning_tasks(job, tiny_model, tmp_path, capsys):
    import json

    from reembed import cli

    s = job["summary"]
    m = Manifest.load(Location.from_uri(str(job["root"] / "out")))
    argv = ["run", "--dry-run", "--input", str(job["root"] / "in"), "--output", str(tmp_path / "out"), "--model",
            str(tiny_model), "--backend", "torch", "--shard-rows", str(SHARD_ROWS)]
    assert cli.main([*argv, "--set", "plan.dedup_texts=true", "--json"]) == 0
    t = json.loads(capsys.readouterr().out)["texts"]
    assert t["counted"].startswith("exact") and t["copy_pass"] and "decision" not in t
    assert t["distinct_texts"] == s["rows_embedded"] == 60
    assert t["rows_deduplicated"] == s["rows_deduplicated"] and t["repeated_rows"] == s["rows_deduplicated"]
    assert t["copy_shards"] == m.shard_count - m.plan["shards"] == m.plan["texts"]["copies"]
    assert t["moved_rows"] == m.plan["texts"]["moved"] and t["rows"] == m.plan["texts"]["rows"]
    assert t["saved_seconds"] > 0 and t["saved_usd"] > 0
    assert not (tmp_path / "out").exists()

    assert cli.main(argv) == 0  # auto (the default): the same counts and the decision, for a person
    text = capsys.readouterr().out
    assert f"texts:       60 distinct of {t['rows']} rows;" in text and "  auto:      " in text
    assert cli.main([*argv, "--set", "plan.dedup_texts=false", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["texts"] is None


@pytest.mark.slow
def test_off_embeds_across_shards_again(job, tiny_model, tmp_path):
    s = pipeline.run(cfg_for(job["root"] / "in", tmp_path / "out", tiny_model, "plan.dedup_texts=false"))
    m = Manifest.load(Location.from_uri(str(tmp_path / "out")))
    assert "texts" not in m.plan and m.shard_count == m.plan["shards"]
    assert s["rows_embedded"] > 60  # only a block's repeats were copied


def test_a_run_stopped_between_the_passes_resumes_to_the_same_result(job, tiny_model, tmp_path, monkeypatch):
    from reembed import copies

    cfg = cfg_for(job["root"] / "in", tmp_path / "out", tiny_model, "input.passthrough=[lang]")

    def stop(*args, **kwargs):
        raise KeyboardInterrupt("stopped between the passes")

    monkeypatch.setattr(copies, "run_copies", stop)
    with pytest.raises(KeyboardInterrupt):
        pipeline.run(cfg)
    m = Manifest.load(Location.from_uri(str(tmp_path / "out")))
    assert m.pending() == list(range(m.plan["shards"], m.shard_count))  # every regular shard, no copy shard
    monkeypatch.undo()
    s = pipeline.run(cfg)
    assert s["complete"] and s["run"]["rows_embedded"] == 0  # the resume only copied
    assert s["rows_embedded"] == job["summary"]["rows_embedded"]
    first = shard_tables(job["root"] / "out")
    again = shard_tables(tmp_path / "out")
    assert sorted(first) == sorted(again)
    for shard in first:
        assert first[shard].equals(again[shard]), f"shard {shard} differs"


def test_copy_shards_sharing_a_gz_file_go_to_one_task():
    copies = pa.table({"shard": [10, 11, 12, 13], "origin_first": [0, 2, 4, 6], "origin_stop": [2, 4, 6, 8],
                       "rows": [5, 5, 5, 5]})
    # shards 2-5 read file 1 (a .gz), the others plain files 0 and 2
    index = pa.table({"shard": [0, 1, 2, 3, 4, 5, 6, 7], "file": [0, 0, 1, 1, 1, 1, 2, 2], "rows": [9] * 8})

    def ranges(t):
        return list(zip(t.column("first").to_pylist(), t.column("stop").to_pylist()))

    got = texts.copy_task_table(copies, index, {1})
    assert ranges(got) == [(10, 11), (11, 13), (13, 14)]
    assert got.column("origin_first").to_pylist() == [0, 2, 6] and got.column("origin_stop").to_pylist() == [2, 6, 8]
    assert got.column("rows").to_pylist() == [5, 10, 5] and got.column("task").to_pylist() == [0, 1, 2]
    assert ranges(texts.copy_task_table(copies, index, set())) == [(10, 11), (11, 12), (12, 13), (13, 14)]
    # a .gz file spanning shards 1-6 joins three copy shards whose origins only touch it at their ends
    index = pa.table({"shard": [0, 1, 2, 3, 4, 5, 6, 7], "file": [0, 3, 3, 3, 3, 3, 3, 2], "rows": [9] * 8})
    assert ranges(texts.copy_task_table(copies, index, {3})) == [(10, 14)]
    # more groups than tasks: consecutive groups packed, a group never split (read.pack_groups' rule)
    many = pa.table({"shard": list(range(100, 110)), "origin_first": list(range(0, 20, 2)),
                     "origin_stop": list(range(2, 22, 2)), "rows": [1] * 10})
    assert ranges(texts.copy_task_table(many, None, set(), max_tasks=4)) == [(100, 103), (103, 106), (106, 109),
                                                                              (109, 110)]
    want = read.pack_groups([[s] for s in range(100, 110)], 4)
    assert ranges(texts.copy_task_table(many, None, set(), max_tasks=4)) == [(g[0], g[-1] + 1) for g in want]
    assert texts.copy_task_table(many.slice(0, 0), None, set()).num_rows == 0


def test_gather_tasks_take_whole_leader_shards_up_to_a_budget():
    from reembed.texts import gather_groups

    assert gather_groups({0: 5, 2: 4, 3: 2, 7: 9, 8: 1}, rows=10) == [(0, 2), (3, 3), (7, 8)]
    assert gather_groups({4: 30}, rows=10) == [(4, 4)]
    assert gather_groups({}, rows=10) == []


# -- the copy pass's driver holds O(tasks) -----------------------------------------------------------------

REGULAR = 1_500  # plan shards of 7 rows, 4 of each moved out (none of every tenth): 1,350 copy shards
COPY_TASKS = 32


class Handed(Exception):
    pass


def test_the_copy_pass_driver_reads_no_copy_shard_and_hands_out_task_ranges(tmp_path, monkeypatch):
    """At 1,350 copy shards in 32 planned copy tasks, a third of them committed, the copy pass's driver
    (``run_copies`` up to its Ray calls, which are captured) reads no row of ``copies.parquet`` or of any other
    per-shard file of ``plan/texts/``, builds no pending list and reads no commit record: each task gets its range
    of copy shards and the committed ones of it; the gather tasks ShardRefs. Then, as the tasks do, the ranges
    give exactly the pending copy shards and the refs exactly the leaders' records."""
    import pickle
    from dataclasses import replace

    import ray

    from counting_fs import counting_location
    from reembed import cluster, commits, copies
    from reembed.commits import State
    from reembed.plan_store import FILES, FILES_SCHEMA, _parquet_bytes

    counts, loc = counting_location(tmp_path / "out")
    work = loc.child("plan")
    work.write_bytes(_parquet_bytes(FILES_SCHEMA.empty_table(), 100, ["file"]), FILES)
    moved = np.where(np.arange(REGULAR) % 10 == 0, 0, 4).astype(np.int64)
    leads = np.full(REGULAR, 3_000, np.int64)  # ~333 leader shards a gather task
    monkeypatch.setattr(texts, "MAX_COPY_TASKS", COPY_TASKS)
    n_copies, n_tasks, _ = texts.plan_copy_pass(work, REGULAR, 7, moved, leads)
    assert n_copies == 1_350 and n_tasks == COPY_TASKS
    model = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "pooling": "cls", "dtype": "float32",
             "max_seq_length": 8, "fingerprint": "f" * 16}
    p = {"input_uri": "synthetic", "id_column": "id", "text_column": "text", "passthrough": [], "shard_rows": 7,
         "rows": 7 * REGULAR, "shards": REGULAR,
         "texts": {"copies": n_copies, "partitions": 1, "moved": int(moved.sum()), "copy_tasks": n_tasks}}
    m = Manifest.create(loc, model, p, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})

    def record(shard: int, rows: int) -> dict:
        return {"path": f"shards/part-{shard:05d}.parquet", "rows": rows, "bytes": 100, "sha256": f"{shard:064x}",
                "truncated": 0, "tokens": 0, "device_seconds": 0.0, "dead_letters": 0, "reasons": {}}

    for shard in range(REGULAR):
        m.commit_shard(shard, record(shard, 3))
    plan_copies = texts.read_copies(work)
    committed = {s for i, s in enumerate(plan_copies.column("shard").to_pylist()) if i % 3 == 0 or i < 60}
    for s, r in zip(plan_copies.column("shard").to_pylist(), plan_copies.column("rows").to_pylist()):
        if s in committed:
            m.commit_shard(s, record(s, r))
    m = Manifest.load(loc)
    m.state()  # the commit log's arrays, as the job holds them before the copy pass

    handed: dict = {"gather_task": [], "write_copies": []}

    def fake_remote(**options):
        def wrap(fn):
            class Remote:
                @staticmethod
                def remote(*args):
                    handed[fn.__name__].append(args)
                    return args
            return Remote
        return wrap

    def refuse(*args, **kwargs):
        raise AssertionError("the copy pass's driver read something per shard")

    counts.reset()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ray, "remote", fake_remote)
        mp.setattr(ray, "wait", lambda refs, num_returns=1: (refs[:1], refs[1:]))
        mp.setattr(cluster, "get", lambda refs: [] if isinstance(refs, tuple) else refs)
        for name in ("iter_commits", "record"):
            mp.setattr(State, name, refuse)
        mp.setattr(commits, "read_records", refuse)
        mp.setattr(Manifest, "pending", refuse)
        mp.setattr(texts, "read_copies", refuse)
        mp.setattr(texts, "moved_counts", refuse)
        assert copies.run_copies(m, loc, pa.schema([]), refuse, max_tasks=4) == 0
    opened = {path.rsplit("/plan/", 1)[-1] for path in counts.opens if "/plan/" in path}
    assert opened == {"texts/tasks.parquet", "texts/gather.parquet"}, opened

    tasks = [args[3] for args in handed["write_copies"]]
    assert 0 < len(tasks) <= COPY_TASKS and all(isinstance(t, copies.CopyTask) for t in tasks)
    starts, stops = handed["gather_task"][0][5:7]
    assert starts.tolist() == [t.origin_first for t in tasks] and stops.tolist() == [t.origin_stop for t in tasks]
    small = pickle.dumps(([replace(t, done=()) for t in tasks], starts, stops))
    assert len(small) < 200 * COPY_TASKS, f"{len(small)} bytes of task ranges"
    pending = set(range(REGULAR, REGULAR + n_copies)) - committed
    written = set()
    for t in tasks:  # each task's side: its rows of copies.parquet, less the committed ones it was handed
        assert set(t.done) == {s for s in committed if t.first <= s < t.stop}
        written |= set(texts.read_copies(work, t.first, t.stop).column("shard").to_pylist()) - set(t.done)
    assert written == pending
    groups = [(args[3], args[4]) for args in handed["gather_task"]]
    assert groups == texts.read_gather(work) and len(groups) == 5
    got = sorted(pair for args in handed["gather_task"] for pair in args[8].records(loc))
    assert got == sorted((s, rec) for s, rec in m.committed.items() if s < REGULAR)


# -- with --reuse ------------------------------------------------------------------------------------------


def test_a_reused_row_keeps_its_old_vector_though_its_text_repeats_in_other_shards(tmp_path, tiny_model, ray_local):
    """OUT1 (made by hand, seeded vectors; r0 and r2 hold the same text with different vectors, as an output made
    without corpus-wide copies may) and a new corpus of 3-row shards where each reused row's text also occurs
    earlier, or later, in other shards under new ids: every reused row keeps its OUT1 vector bit for bit, the
    new rows of a reused row's text take that vector, and a new text is embedded once."""
    from reembed.write import write_shard

    cfg = cfg_for(tmp_path / "in", tmp_path / "out", tiny_model, "plan.shard_rows=3")
    model = pipeline.inspect_model(cfg)
    dim = model["dimension"]
    old_texts = {"r0": "alpha text", "r1": "beta text", "r2": "alpha text", "r3": "gamma text"}
    old_vec = np.random.default_rng(7).standard_normal((4, dim)).astype(np.float32)
    out1 = Location.from_uri(str(tmp_path / "out1"))
    m1 = Manifest.create(out1, model, {"shards": 1, "rows": 4}, {"rows": 0, "mode": "hash"})
    rows = pa.table({S.ID: list(old_texts), S.TEXT: list(old_texts.values()), S.REASON: pa.nulls(4, pa.string()),
                     S.SOURCE_FILE: ["a.parquet"] * 4, S.SOURCE_ROW: pa.array(range(4), pa.int64()),
                     S.SHARD: pa.array([0] * 4, pa.int32()), S.POS: pa.array(range(4), pa.int64()),
                     S.EMBEDDING: S.embedding_array(old_vec), S.TRUNCATED: [False] * 4,
                     "_tokens": pa.array([3] * 4, pa.int64()), "_device_s": pa.array([0.0] * 4),
                     S.TEXT_HASH: S.text_hashes(pa.array(list(old_texts.values())))})
    m1.commit_shard(0, write_shard(out1, 0, rows, S.shard_schema(dim, text_hash=True)))
    new = [("n0", "alpha text"), ("r1", "beta text"), ("x0", "delta text"),    # shard 0
           ("r0", "alpha text"), ("r3", "gamma text"), ("n1", "beta text"),    # shard 1
           ("r2", "alpha text"), ("n2", "gamma text"), ("n3", "alpha text")]   # shard 2
    write_parquet(tmp_path / "in" / "a.parquet", [{"id": i, "text": t} for i, t in new])
    s = pipeline.run(cfg_for(tmp_path / "in", tmp_path / "out", tiny_model, "plan.shard_rows=3",
                             f"plan.reuse={tmp_path / 'out1'}"))
    assert s["complete"]
    vec = {}
    for t in shard_tables(tmp_path / "out").values():
        for i, v in zip(t.column(S.ID).to_pylist(), S.embedding_matrix(t.column(S.EMBEDDING))):
            assert i not in vec
            vec[i] = v.tobytes()
    assert set(vec) == {i for i, _ in new}
    old = {i: old_vec[k].tobytes() for k, i in enumerate(old_texts)}
    for i in ("r0", "r1", "r2", "r3"):  # carried forward, bit for bit, though n0 leads "alpha text"
        assert vec[i] == old[i], f"{i} lost its carried-forward vector"
    assert vec["n1"] == old["r1"] and vec["n2"] == old["r3"]  # new rows of a reused row's text: its vector
    assert vec["n3"] == vec["n0"] and vec["n0"] not in old.values()  # a new text's leader, embedded once
    assert s["rows_reused"] == 4 and s["rows_embedded"] == 2 and s["rows_deduplicated"] == 3
