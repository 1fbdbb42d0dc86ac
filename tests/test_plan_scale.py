"""The plan at scale (issue 12): a read task carries only its own shard ids (a few KB whatever the size of
the plan), a gzipped JSON Lines file is decompressed once by the one task that reads all its shards, and
``plan.dedup: none`` does no dedup work and says so in the manifest."""

from __future__ import annotations

import gzip
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_jsonl
from counting_fs import counting_location
from reembed.config import InputConfig
from reembed.plan import PLAN_DIR, make_plan
from reembed.read import MAX_READ_TASKS, ShardDatasource, pack_groups, shard_runs
from reembed.storage import Location


def task_sizes(plan: dict, out: Location, pending: list[int]) -> list[int]:
    from ray import cloudpickle

    return [len(cloudpickle.dumps(t)) for t in ShardDatasource(plan, out, pending).get_read_tasks(1)]


def test_a_read_task_is_a_few_kb_at_10k_shards(tmp_path):
    """10,000 one-row shards, planned without Ray: every read task pickles to a few KB, the same as in a
    plan of 10 shards (the old plan-in-every-task design pickled 513 KB per task at 10k shards)."""
    n = 10_000
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(n)], "text": [f"text {i}" for i in range(n)]}),
                   tmp_path / "in" / "a.parquet")
    pq.write_table(pa.table({"id": ["s0", "s1"], "text": ["a", "b"]}), tmp_path / "in" / "small.parquet")
    big_out, small_out = Location.from_uri(str(tmp_path / "big")), Location.from_uri(str(tmp_path / "small"))
    big = make_plan(InputConfig(uri=str(tmp_path / "in")), 1, big_out.child(PLAN_DIR))
    small = make_plan(InputConfig(uri=str(tmp_path / "in" / "small.parquet")), 1, small_out.child(PLAN_DIR))
    assert big["shards"] == n + 2 and small["shards"] == 2
    assert len(json.dumps(big)) < 8000  # the manifest's plan: a summary and 11 segments files, not 10k shards

    sizes = task_sizes(big, big_out, list(range(big["shards"])))
    # 10,002 shards in MAX_READ_TASKS tasks of 5 (Ray Data puts each task on the driver before the first runs)
    assert len(sizes) == -(-(n + 2) // 5) <= MAX_READ_TASKS and max(sizes) < 4096, max(sizes)
    assert max(sizes) - max(task_sizes(small, small_out, [0, 1])) < 64  # independent of the plan's size
    # every other shard pending (a resume): runs of one shard each, still a few KB
    assert max(task_sizes(big, big_out, list(range(0, big["shards"], 2)))) < 4096
    assert len(task_sizes(small, small_out, [0, 1])) == 1  # SHARDS_PER_TASK: two shards, one task

    # and a task reads its own shard only: the last one, from the last segments file
    (task,) = ShardDatasource(big, big_out, [n + 1]).get_read_tasks(1)  # a task reads only its own shard
    (table,) = list(task())
    assert table.column("id").to_pylist() == ["s1"] and table.column("_shard").to_pylist() == [n + 1]


def test_read_tasks_pack_consecutive_shards_and_never_split_a_gz_group():
    groups = [[0], [1], [2, 3, 4, 5, 6], [7], [8], [9], [10]]
    packed = pack_groups(groups, max_tasks=4)  # 11 shards -> about 3 a task; the gz group stays whole
    assert packed == [[0, 1], [2, 3, 4, 5, 6], [7, 8, 9], [10]]
    assert pack_groups(groups, max_tasks=7) == groups
    assert pack_groups(groups, max_tasks=100, per_task=2) == [[0, 1], [2, 3, 4, 5, 6], [7, 8], [9, 10]]
    assert shard_runs([0, 1, 2, 5, 7, 8]) == ((0, 3), (5, 6), (7, 9))
    assert shard_runs(range(100_000)) == ((0, 100_000),)  # a fresh run's task: one run, whatever its size


def test_a_packed_task_reads_each_of_its_shards_once_in_order(tmp_path):
    (tmp_path / "in").mkdir()
    pq.write_table(pa.table({"id": [f"d{i}" for i in range(40)], "text": [f"t {i}" for i in range(40)]}),
                   tmp_path / "in" / "a.parquet")
    out = Location.from_uri(str(tmp_path / "out"))
    plan = make_plan(InputConfig(uri=str(tmp_path / "in")), 3, out.child(PLAN_DIR))
    pending = [s for s in range(plan["shards"]) if s != 4]
    ds = ShardDatasource(plan, out, pending, max_tasks=3)
    tasks = ds.get_read_tasks(1)
    assert ds.num_tasks == len(tasks) == 3
    tables = [t for task in tasks for t in task()]
    assert [t.column("_shard")[0].as_py() for t in tables] == pending  # one table per shard, in order
    assert sum(t.metadata.num_rows for t in tasks) == 40 - 3
    ids = pa.concat_tables(tables).column("id").to_pylist()
    assert ids == [f"d{i}" for i in range(40) if i // 3 != 4]


def test_gz_shards_share_one_task_that_decompresses_the_file_once(tmp_path):
    docs = make_docs(23)
    (tmp_path / "in").mkdir()
    body = "".join(json.dumps(d) + ("\n\n" if i % 5 == 0 else "\n") for i, d in enumerate(docs)).encode()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress(body))
    write_jsonl(tmp_path / "in" / "b.jsonl", make_docs(6, prefix="b"))
    out = Location.from_uri(str(tmp_path / "out"))
    plan = make_plan(InputConfig(uri=str(tmp_path / "in")), 5, out.child(PLAN_DIR))
    assert plan["rows"] == 29 and plan["shards"] == 6

    counts, source = counting_location(tmp_path / "in")
    ds = ShardDatasource(plan, out, list(range(6)), source=source)
    tasks = ds.get_read_tasks(1)
    # shards 0-4 read a.jsonl.gz (shard 4 also b.jsonl): one task; shard 5 reads b.jsonl alone
    assert ds.num_tasks == len(tasks) == 2 and [t.metadata.num_rows for t in tasks] == [25, 4]
    tables = [t for task in tasks for t in task()]
    gz_path = str(tmp_path / "in" / "a.jsonl.gz")
    assert counts.opens[gz_path] == 1
    assert [t.column("_shard")[0].as_py() for t in tables] == list(range(6))
    got = pa.concat_tables(tables)
    assert got.column("id").to_pylist() == [d["id"] for d in docs] + [f"b{i}" for i in range(6)]
    assert got.column("_text").to_pylist()[:23] == [d["text"] for d in docs]
    lines = [n for n, line in enumerate(body.decode().split("\n")) if line.strip()]
    assert got.column("_row").to_pylist()[:23] == lines
    assert got.column("_reason").null_count == 29


@pytest.mark.ray
def test_a_gz_corpus_re_embeds_exactly_and_dedup_none_is_recorded(tmp_path, tiny_model, ray_local):
    from sentence_transformers import SentenceTransformer

    from reembed import pipeline
    from reembed.config import load_config
    from reembed.manifest import Manifest
    from reembed.schema import embedding_matrix

    docs = make_docs(40)
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs[:30]).encode()))
    (tmp_path / "in" / "b.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs[30:]).encode()))
    out = tmp_path / "out"
    cfg = load_config(None, [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", f"model.name={tiny_model}",
                             "plan.shard_rows=8", "compute.max_actors=1", "compute.cpus_per_actor=0.5"])
    summary = pipeline.run(cfg)
    assert summary["complete"] and summary["embedded"] == 40 and summary["shards"] == 5

    ref = SentenceTransformer(str(tiny_model), device="cpu").encode([d["text"] for d in docs], batch_size=8)
    m = Manifest.load(Location.from_uri(str(out)))
    got = {}
    for rec in m.committed.values():
        t = pq.read_table(out / rec["path"])
        got.update(zip(t.column("id").to_pylist(), embedding_matrix(t.column("embedding"))))
    assert sorted(got) == sorted(d["id"] for d in docs)
    for d, r in zip(docs, ref):
        np.testing.assert_allclose(got[d["id"]], r, atol=1e-5)
    assert m.plan["dedup"] == "hash" and len(m.plan["store"]["duplicates"]) > 0

    # plan.dedup=none: ids known unique, no id is read at planning, and the manifest says it was off
    out2 = tmp_path / "out2"
    (tmp_path / "in" / "c.jsonl.gz").write_bytes(gzip.compress((json.dumps(docs[0]) + "\n").encode()))  # a repeat
    cfg2 = load_config(None, [f"input.uri={tmp_path / 'in'}", f"output.uri={out2}", f"model.name={tiny_model}",
                              "plan.shard_rows=8", "compute.max_actors=1", "compute.cpus_per_actor=0.5",
                              "plan.dedup=none"])
    summary = pipeline.run(cfg2)
    m2 = Manifest.load(Location.from_uri(str(out2)))
    assert summary["complete"] and summary["embedded"] == 41 and summary["dead_lettered"] == 0
    assert m2.plan["dedup"] == "none" and m2.data["duplicates"]["mode"] == "none" and m2.plan["store"]["duplicates"] == []
    assert not (out2 / "plan" / "duplicates").exists() and not (out2 / "plan" / "_ids").exists()


@pytest.mark.ray
def test_planning_as_ray_tasks_equals_planning_in_process(tmp_path, ray_local):
    """Counting and dedup as Ray tasks give the same plan files as in this process; an InputError raised
    in a task comes out as itself, one line naming the file."""
    from conftest import write_parquet
    from reembed import plan_store
    from reembed.errors import InputError

    docs = make_docs(300)
    for d in docs[::11]:
        d["id"] = "d5"
    inp = tmp_path / "in"
    write_parquet(inp / "a.parquet", docs[:100], row_group_size=30)
    write_jsonl(inp / "b.jsonl", docs[100:250])
    (inp / "c.jsonl.gz").write_bytes(gzip.compress("".join(json.dumps(d) + "\n" for d in docs[250:]).encode()))
    plans = {}
    for use_ray in (False, True):
        loc = Location.from_uri(str(tmp_path / f"out-{use_ray}")).child(PLAN_DIR)
        plan = make_plan(InputConfig(uri=str(inp)), 16, loc, use_ray=use_ray, partitions=3, range_bytes=2000)
        shards = [plan_store.read_shard(loc, s) for s in range(plan["shards"])]
        files = plan_store.read_files(loc).drop_columns(["mtime_ns"])
        plans[use_ray] = ({k: v for k, v in plan.items() if k != "store"}, files.to_pylist(),
                          [(sp.segments.to_pylist(), sp.duplicates.to_pylist()) for sp in shards])
    assert plans[True] == plans[False]
    assert plans[True][0]["duplicate_rows"] == sum(d["id"] == "d5" for d in docs) - 1 > 20

    write_jsonl(inp / "d.jsonl", [{"doc": "x"}])
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(inp)), 16, Location.from_uri(str(tmp_path / "o")).child(PLAN_DIR), use_ray=True)
    assert "\n" not in str(e.value) and "d.jsonl: missing column(s) 'id', 'text'" in str(e.value)
