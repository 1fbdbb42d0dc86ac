"""reembed.dedup: hash-partitioned duplicate ids equal an in-memory reference (first in plan order wins),
for one and several partitions, in-process and as Ray tasks."""

from __future__ import annotations

import dataclasses
import gzip
import json
import random
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from reembed import dedup, scan
from reembed.errors import ConfigError
from reembed.storage import Location
from s3_fixtures import moto_server, new_bucket, s3_env, s3_user  # noqa: F401 (fixtures)


def plant_corpus(folder: Path, seed: int) -> tuple[list, list[dict]]:
    """Parquet, JSON Lines and gzipped JSON Lines files whose ids repeat within and across files; returns
    the id tasks (JSON Lines cut into small ranges) and the files in plan order with their ids."""
    rng = random.Random(seed)
    pool = [f"d{i}" for i in range(400)]
    files: list[dict] = []
    for i, fmt in enumerate(["parquet", "jsonl", "parquet", "jsonl.gz", "jsonl", "parquet"]):
        n = rng.randint(0, 300)
        ids = [rng.choice(pool) if rng.random() < 0.9 else None for _ in range(n)]
        name = f"f{i}.{fmt}"
        if fmt == "parquet":
            pq.write_table(pa.table({"id": pa.array(ids, pa.string()), "text": ["t"] * n}), folder / name,
                           row_group_size=50)
        else:
            lines = []
            for x in ids:
                lines.append(json.dumps({"id": x, "text": "t"}))
                if rng.random() < 0.1:
                    lines.append("   ")  # blank lines are not rows
            data = ("\n".join(lines) + "\n").encode() if lines else b""
            (folder / name).write_bytes(gzip.compress(data) if fmt.endswith(".gz") else data)
        files.append({"path": name, "ids": ids, "format": "parquet" if fmt == "parquet" else "jsonl"})
    # ints in Parquet and JSON: 7 and "7" are the same id, as in plan.py
    pq.write_table(pa.table({"id": pa.array([7, 8, 9]), "text": ["t"] * 3}), folder / "g.parquet")
    (folder / "h.jsonl").write_text('{"id": "7", "text": "t"}\n{"id": 9, "text": "t"}\n')
    files += [{"path": "g.parquet", "ids": ["7", "8", "9"], "format": "parquet"},
              {"path": "h.jsonl", "ids": ["7", "9"], "format": "jsonl"}]
    tasks = []
    for index, f in enumerate(files):
        if f["format"] == "parquet" or f["path"].endswith(".gz"):
            tasks.append(dedup.IdTask(index, f["path"], f["format"]))
        else:
            size = (folder / f["path"]).stat().st_size
            tasks += [dedup.IdTask(index, f["path"], "jsonl", s, e) for s, e in scan.jsonl_ranges(size, 97)]
    return tasks, files


def reference_duplicates(files: list[dict]) -> list[tuple[int, int, str]]:
    seen, dups = set(), []
    for index, f in enumerate(files):
        for row, x in enumerate(f["ids"]):
            if x is None:
                continue
            if x in seen:
                dups.append((index, row, x))
            seen.add(x)
    return dups


def stored_duplicates(work: Location, partitions: int) -> list[tuple[int, int, str]]:
    rows = []
    for p in range(partitions):
        t = pq.read_table(work.path(dedup.DUPLICATES_DIR, dedup.duplicates_file(p)))
        part = list(zip(*(t.column(c).to_pylist() for c in ("file", "row", "id"))))
        assert part == sorted(part)  # each part sorted by (file, row)
        rows += part
    return sorted(rows)


@pytest.mark.parametrize("partitions", [1, 7])
@pytest.mark.parametrize("seed", [0, 1])
def test_duplicates_equal_in_memory_reference(tmp_path, partitions, seed):
    (tmp_path / "in").mkdir()
    tasks, files = plant_corpus(tmp_path / "in", seed)
    source, work = Location.from_uri(str(tmp_path / "in")), Location.from_uri(str(tmp_path / "out" / "plan"))
    result = dedup.find_duplicates(source, tasks, "id", work, partitions=partitions)

    ref = reference_duplicates(files)
    assert len(ref) > 50
    assert any(f != g for (f, _, x) in ref for (g, _, y) in ref[:5] if x == y)  # some repeat across files
    assert stored_duplicates(work, partitions) == ref
    by_file: dict[int, int] = {}
    for f, _, _ in ref:
        by_file[f] = by_file.get(f, 0) + 1
    assert result.duplicates_by_file == by_file
    assert result.duplicates == len(ref)
    assert sum(r.rows for r in result.tasks) == sum(len(f["ids"]) for f in files)
    assert not work.exists(dedup.IDS_DIR)  # the id partitions are work files, removed at the end
    jsonl_rows = {}
    for r in result.tasks:
        if r.range is not None:
            jsonl_rows[r.task.file] = jsonl_rows.get(r.task.file, 0) + r.range.rows
    assert jsonl_rows == {i: len(f["ids"]) for i, f in enumerate(files) if f["format"] == "jsonl"}


@pytest.mark.parametrize("task_ids", [None, 1, 150, 10_000])
def test_any_partition_count_and_task_grouping_find_exactly_the_duplicates_of_one_partition(tmp_path, task_ids):
    """P = 1, 2, 7, 64 partitions, units grouped into id tasks of ~1, ~150 and all rows: the same
    duplicates, byte for byte, as one partition and as the in-memory reference."""
    (tmp_path / "in").mkdir()
    tasks, files = plant_corpus(tmp_path / "in", 3)
    source = Location.from_uri(str(tmp_path / "in"))
    one = dedup.find_duplicates(source, tasks, "id", Location.from_uri(str(tmp_path / "p1")), partitions=1)
    counted = [dataclasses.replace(r.task, rows=r.rows) for r in one.tasks]  # rows known, as make_plan knows them
    groups = len(dedup.group_tasks(counted, task_ids or dedup.task_size(64)))
    assert groups == {None: 1, 1: len(counted), 10_000: 1}.get(task_ids, groups) and (task_ids != 150 or 1 < groups < len(counted))
    ref = reference_duplicates(files)
    assert stored_duplicates(Location.from_uri(str(tmp_path / "p1")), 1) == ref
    for p in (2, 7, 64):
        work = Location.from_uri(str(tmp_path / f"p{p}-{task_ids}"))
        got = dedup.find_duplicates(source, counted, "id", work, partitions=p, task_ids=task_ids)
        assert stored_duplicates(work, p) == ref, p
        assert got.duplicates_by_file == one.duplicates_by_file
        assert [(r.task, r.rows, r.non_null) for r in got.tasks] == [(t, r.rows, r.non_null) for t, r in zip(counted, one.tasks)]
        assert sum(r.rows for r in got.tasks) == sum(len(f["ids"]) for f in files)


def test_grouped_id_tasks_write_one_file_each(tmp_path):
    tasks = [dedup.IdTask(i, f"f{i}", "parquet", rows=100) for i in range(10)] + [dedup.IdTask(10, "x", "parquet")]
    groups = dedup.group_tasks(tasks, 250)
    assert [len(g) for g in groups] == [2, 2, 2, 2, 2, 1]  # ~250 ids a task; a unit of unknown rows alone
    assert [t for g in groups for t in g] == tasks
    assert dedup.task_size(1) == dedup.TASK_IDS_MIN and dedup.task_size(10_000) == dedup.TASK_IDS_MAX


def test_no_task_holds_more_than_its_partition(tmp_path):
    (tmp_path / "in").mkdir()
    tasks, files = plant_corpus(tmp_path / "in", 4)
    source, work = Location.from_uri(str(tmp_path / "in")), Location.from_uri(str(tmp_path / "plan"))
    results = [dedup.partition_ids(source, t, "id", work, 7) for t in tasks]
    sizes = []
    for p in range(7):
        ids = [x for t in tasks for x in dedup.read_id_batch(work, t.name, p).column("id").to_pylist()]
        assert all(dedup.id_partitions(pa.array([x]), 7)[0] == p for x in set(ids))  # one id, one partition
        sizes.append(len(ids))
    assert sum(sizes) == sum(r.non_null for r in results)
    assert max(sizes) < 0.3 * sum(sizes)  # spread over the partitions, not gathered in one
    assert len(work.list(dedup.IDS_DIR)) == len(tasks)  # one id file per task, not one per task and partition


def test_first_wins_in_plan_order():
    t = pa.table({"file": pa.array([1, 0, 0, 2, 1, 0], pa.int32()), "row": pa.array([0, 5, 2, 0, 1, 3], pa.int64()),
                  "id": ["a", "a", "b", "a", None, "b"]})
    got = dedup.first_wins(t)
    assert list(zip(*(got.column(c).to_pylist() for c in ("file", "row", "id")))) == [(0, 3, "b"), (1, 0, "a"), (2, 0, "a")]
    assert dedup.first_wins(t.slice(0, 1)).num_rows == 0


def test_mode_none_reads_and_writes_nothing(tmp_path):
    (tmp_path / "in").mkdir()
    tasks, _ = plant_corpus(tmp_path / "in", 0)
    work = Location.from_uri(str(tmp_path / "plan"))
    result = dedup.find_duplicates(Location.from_uri(str(tmp_path / "in")), tasks, "id", work, mode="none")
    assert result.duplicates == 0 and result.tasks == [] and not (tmp_path / "plan").exists()
    with pytest.raises(ConfigError, match="dedup mode 'exact' is unknown"):
        dedup.find_duplicates(Location.from_uri(str(tmp_path / "in")), tasks, "id", work, mode="exact")


def test_partition_hash_is_stable_across_processes():
    import subprocess
    import sys

    ids = [f"doc-{i}" for i in range(50)] + ["", "é", "x" * 300]
    here = dedup.id_partitions(pa.array(ids), 13).tolist()
    code = ("import json, sys, pyarrow as pa; from reembed.dedup import id_partitions; "
            f"print(json.dumps(id_partitions(pa.array({ids!r}), 13).tolist()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**__import__("os").environ, "PYTHONHASHSEED": "123"})
    assert json.loads(out.stdout) == here
    assert len(set(here)) > 8
    # sliced arrays hash by their own bytes
    assert dedup.id_partitions(pa.array(ids).slice(3, 10), 13).tolist() == here[3:13]


@pytest.mark.ray
def test_ray_tasks_equal_in_process(tmp_path, ray_local):
    (tmp_path / "in").mkdir()
    tasks, files = plant_corpus(tmp_path / "in", 2)
    source = Location.from_uri(str(tmp_path / "in"))
    local = dedup.find_duplicates(source, tasks, "id", Location.from_uri(str(tmp_path / "a")), partitions=5)
    remote = dedup.find_duplicates(source, tasks, "id", Location.from_uri(str(tmp_path / "b")), partitions=5, use_ray=True)
    assert remote.duplicates_by_file == local.duplicates_by_file
    assert stored_duplicates(Location.from_uri(str(tmp_path / "b")), 5) == reference_duplicates(files)


@pytest.mark.s3
def test_on_s3_equals_reference(tmp_path, moto_server, s3_env):
    """Input and plan folder on S3 (moto): the id files and duplicates parts go through the Location."""
    (tmp_path / "in").mkdir()
    tasks, files = plant_corpus(tmp_path / "in", 6)
    bucket = new_bucket(moto_server)
    client = moto_server.client("s3")
    for path in (tmp_path / "in").iterdir():
        client.put_object(Bucket=bucket, Key=f"in/{path.name}", Body=path.read_bytes())
    source, work = Location.from_uri(f"s3://{bucket}/in"), Location.from_uri(f"s3://{bucket}/out/plan")
    result = dedup.find_duplicates(source, tasks, "id", work, partitions=3)
    ref = reference_duplicates(files)
    got = []
    for p in range(3):
        t = pq.read_table(pa.BufferReader(work.read_bytes(dedup.DUPLICATES_DIR, dedup.duplicates_file(p))))
        got += list(zip(*(t.column(c).to_pylist() for c in ("file", "row", "id"))))
    assert sorted(got) == ref and result.duplicates == len(ref)
    assert not work.list(dedup.IDS_DIR, recursive=True)
