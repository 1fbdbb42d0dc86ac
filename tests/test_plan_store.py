"""reembed.plan_store: streaming shard packing equal to today's planner, the plan as Parquet, and a shard's
read that touches only its own row groups."""

from __future__ import annotations

import itertools
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from counting_fs import counting_location
from reembed import dedup, plan_store
from reembed.errors import ManifestError
from reembed.plan import FileScan, _pack
from reembed.plan_store import Unit, pack_shards
from reembed.storage import Location


@pytest.mark.parametrize("seed", range(4))
def test_packing_equals_todays_planner(seed):
    rng = random.Random(seed)
    rows = [rng.choice([0, 1, 5, 37, 250]) for _ in range(rng.randint(1, 30))]
    shard_rows = rng.choice([1, 10, 64, 1000])
    old = _pack([FileScan(index=i, path=f"f{i}", format="parquet", size=0, rows=n) for i, n in enumerate(rows)], shard_rows)
    want = [(s["shard"], g["file"], g["start"], g["stop"]) for s in old for g in s["segments"]]
    got = [(g["shard"], g["file"], g["start"], g["stop"]) for g in pack_shards([Unit(i, n) for i, n in enumerate(rows)], shard_rows)]
    assert got == want


def test_packing_splits_ranges_with_skip():
    units = [Unit(0, 3, range_start=0, first_line=0), Unit(0, 4, range_start=100, first_line=5), Unit(1, 2)]
    segs = list(pack_shards(units, shard_rows=4))
    assert [(s["shard"], s["file"], s["start"], s["stop"], s["range_start"], s["skip"], s["rows"], s["first_line"]) for s in segs] == [
        (0, 0, 0, 4, 0, 0, 4, 0),  # one segment per file per shard: read on from range 0 into range 100
        (1, 0, 4, 7, 100, 1, 3, 5),
        (1, 1, 0, 1, 0, 0, 1, 0),
        (2, 1, 1, 2, 0, 1, 1, 0),
    ]


def test_packing_streams():
    """An endless stream of units: the first segments come out at once (memory does not grow with input)."""
    endless = (Unit(i, 3) for i in itertools.count())
    first = list(itertools.islice(pack_shards(endless, shard_rows=10), 6))
    assert [(s["shard"], s["file"], s["rows"]) for s in first] == [(0, 0, 3), (0, 1, 3), (0, 2, 3), (0, 3, 1), (1, 3, 2), (1, 4, 3)]


def write_plan(plan: Location, rng: random.Random, files: int = 400, partitions: int = 3):
    """A plan of many small shards, with duplicates planted in a few of them; returns (segments, dups)."""
    units = [Unit(i, rng.randint(0, 40)) for i in range(files)]
    segments = list(pack_shards(units, shard_rows=25))
    plan_store.write_files(plan, [
        {"file": u.file, "path": f"in/f{u.file}.parquet", "uri": f"s3://b/in/f{u.file}.parquet", "format": "parquet",
         "size": 1000 + u.file, "mtime_ns": None, "etag": f'"etag-{u.file}"', "rows": u.rows, "dup_rows": 0}
        for u in units
    ])
    plan_store.write_segments(plan, iter(segments), dedup_partitions=partitions, row_group=64)
    dups = []
    for u in units:
        dups += [(u.file, r, f"id{u.file}-{r}") for r in range(u.rows) if rng.random() < 0.2]
    for p in range(partitions):
        part = sorted(d for d in dups if hash(d) % partitions == p)
        table = pa.table({"file": pa.array([d[0] for d in part], pa.int32()), "row": pa.array([d[1] for d in part], pa.int64()),
                          "id": pa.array([d[2] for d in part], pa.string())})
        pq.write_table(table, plan.path(dedup.DUPLICATES_DIR, dedup.duplicates_file(p)), row_group_size=64)
    return segments, dups


def test_a_shard_reads_only_its_own_row_groups(tmp_path, monkeypatch):
    monkeypatch.setattr(plan_store, "SHARDS_PER_PART", 100)  # several segments files from a small plan
    (tmp_path / "plan" / dedup.DUPLICATES_DIR).mkdir(parents=True)
    rng = random.Random(0)
    counts, plan = counting_location(tmp_path / "plan")
    segments, dups = write_plan(plan, rng)
    shards = max(s["shard"] for s in segments) + 1
    assert shards > 200
    parts = sorted(p.name for p in (tmp_path / "plan" / plan_store.SEGMENTS_DIR).iterdir())
    assert parts == [f"part-{i:05d}.parquet" for i in range((shards + 99) // 100)]

    for shard in [0, 1, 99, 100, shards // 2, shards - 1]:
        name = plan_store.segments_file(shard)
        md = pq.read_metadata(plan.path(name))
        assert md.num_row_groups > 1 or shard // 100 == (shards - 1) // 100  # the last part may be small
        part_segments = pq.read_table(plan.path(name)).to_pylist()
        assert {s["shard"] // 100 for s in part_segments} == {shard // 100}
        bounds, row = [], 0
        for g in range(md.num_row_groups):
            bounds.append((row, row + md.row_group(g).num_rows))
            row += md.row_group(g).num_rows
        counts.reset()
        got = plan_store.read_shard(plan, shard)
        want = [s for s in segments if s["shard"] == shard]
        assert got.segments.to_pylist() == want
        assert got.rows == sum(s["rows"] for s in want)
        owning = [g for g, (lo, hi) in enumerate(bounds) if any(part_segments[i]["shard"] == shard for i in range(lo, hi))]
        assert got.row_groups_read[name] == owning
        assert [p for p in counts.opens if plan_store.SEGMENTS_DIR in p] == [plan.path(name)]  # no other part opened
        assert sorted(got.files.column("file").to_pylist()) == sorted({s["file"] for s in want})
        assert set(got.files.column("etag").to_pylist()) == {f'"etag-{s["file"]}"' for s in want}
        want_dups = sorted(d for d in dups for s in want if d[0] == s["file"] and s["start"] <= d[1] < s["stop"])
        assert list(zip(*(got.duplicates.column(c).to_pylist() for c in ("file", "row", "id")))) == want_dups
        for p in range(3):
            part = pq.ParquetFile(plan.path(dedup.DUPLICATES_DIR, dedup.duplicates_file(p)))
            assert len(got.row_groups_read[f"{dedup.DUPLICATES_DIR}/{dedup.duplicates_file(p)}"]) <= 2 < part.metadata.num_row_groups
        assert counts.bytes_read[plan.path(name)] < 64 * 1024 + md.serialized_size + 8 + 2 * 8 * 1024


def test_segments_footer_stays_small_however_many_shards(tmp_path):
    plan = Location.from_uri(str(tmp_path / "plan"))
    n, shards = plan_store.write_segments(plan, pack_shards((Unit(i, 10) for i in range(30_000)), shard_rows=10))
    assert n == shards == 30_000
    parts = sorted((tmp_path / "plan" / plan_store.SEGMENTS_DIR).iterdir())
    assert len(parts) == -(-30_000 // plan_store.SHARDS_PER_PART)
    assert max(pq.read_metadata(p).serialized_size for p in parts) < 8 * 1024


def test_files_round_trip_with_change_detection_data(tmp_path):
    plan = Location.from_uri(str(tmp_path / "plan"))
    files = [{"file": 1, "path": "/in/b.jsonl", "uri": "/in/b.jsonl", "format": "jsonl", "size": 10, "mtime_ns": 123,
              "etag": None, "rows": 2, "dup_rows": 1},
             {"file": 0, "path": "b/a.parquet", "uri": "s3://b/a.parquet", "format": "parquet", "size": 99, "mtime_ns": None,
              "etag": '"abc"', "rows": 5, "dup_rows": 0}]
    assert plan_store.write_files(plan, files) == 2
    assert plan_store.read_files(plan).to_pylist() == sorted(files, key=lambda f: f["file"])


def test_a_shard_the_plan_lacks_is_a_manifest_error(tmp_path):
    plan = Location.from_uri(str(tmp_path / "plan"))
    plan_store.write_files(plan, [{"file": 0, "path": "a", "uri": "a", "format": "parquet", "size": 1, "mtime_ns": 1,
                                   "etag": None, "rows": 3, "dup_rows": 0}])
    assert plan_store.write_segments(plan, pack_shards([Unit(0, 3)], 2)) == (2, 2)
    assert plan_store.read_shard(plan, 1).duplicates.num_rows == 0  # dedup off: no duplicates files consulted
    with pytest.raises(ManifestError, match=r"part-00000\.parquet: the plan has no shard 7"):
        plan_store.read_shard(plan, 7)
    with pytest.raises(ManifestError, match=r"part-00009\.parquet: missing, so the plan has no shard 9999"):
        plan_store.read_shard(plan, 9999)
    with pytest.raises(ValueError, match="out of shard order"):
        plan_store.write_segments(plan, iter([{"shard": 1}, {"shard": 0}]))


def test_blocks_compose_to_todays_plan(tmp_path):
    """scan -> dedup -> pack -> plan files -> one shard's read gives the shards, duplicates and JSON Lines
    line numbers that today's plan.make_plan gives, on a corpus with blank lines and repeated ids."""
    from conftest import make_docs, write_jsonl, write_parquet
    from reembed import scan
    from reembed.config import InputConfig
    from reembed.plan import make_plan

    docs = make_docs(600)
    for d in docs[::17]:
        d["id"] = "d3"  # repeated within and across files
    src = tmp_path / "in"
    write_parquet(src / "a.parquet", docs[:200], row_group_size=64)
    write_jsonl(src / "b.jsonl", [x for d in docs[200:450] for x in ([d, "  "] if d["id"] == "d3" else [d])])
    write_parquet(src / "c.parquet", docs[450:])
    old_plan, old_dups = make_plan(InputConfig(uri=str(src)), shard_rows=37)

    source = Location.from_uri(str(src))
    plan = Location.from_uri(str(tmp_path / "out" / "plan"))
    names = [f["path"].rsplit("/", 1)[1] for f in old_plan["files"]]
    files, units, tasks = [], [], []
    for i, name in enumerate(names):
        if name.endswith(".parquet"):
            count = scan.count_parquet(source, name)
            stat, rows, file_units = count.stat, count.rows, [Unit(i, count.rows)]
            tasks.append(dedup.IdTask(i, name, "parquet"))
        else:
            js = scan.scan_jsonl(source, name, range_bytes=700)
            stat, rows, file_units = js.stat, js.rows, list(plan_store.jsonl_units(i, js.ranges))
            tasks += [dedup.IdTask(i, name, "jsonl", r.range_start, r.range_stop) for r in js.ranges]
        units += file_units
        files.append({"file": i, "path": name, "uri": source.display(name), "format": "parquet" if name.endswith("parquet") else "jsonl",
                      "size": stat.size, "mtime_ns": stat.mtime_ns, "etag": stat.etag, "rows": rows, "dup_rows": 0})
    result = dedup.find_duplicates(source, tasks, "id", plan, partitions=4)
    for f in files:
        f["dup_rows"] = result.duplicates_by_file.get(f["file"], 0)
    plan_store.write_files(plan, files)
    _, shards = plan_store.write_segments(plan, pack_shards(units, 37), dedup_partitions=4)

    assert shards == len(old_plan["shards"])
    assert [f["rows"] for f in files] == [f["rows"] for f in old_plan["files"]]
    old_dup_rows = list(zip(*(old_dups.column(c).to_pylist() for c in ("file", "row", "id"))))
    assert result.duplicates == len(old_dup_rows) > 30
    for old in old_plan["shards"]:
        got = plan_store.read_shard(plan, old["shard"])
        assert [(s["file"], s["start"], s["stop"]) for s in got.segments.to_pylist()] == \
            [(s["file"], s["start"], s["stop"]) for s in old["segments"]]
        spans = [(s["file"], s["start"], s["stop"]) for s in old["segments"]]
        want = [d for d in old_dup_rows if any(f == d[0] and a <= d[1] < b for f, a, b in spans)]
        assert list(zip(*(got.duplicates.column(c).to_pylist() for c in ("file", "row", "id")))) == want
        for seg, old_seg in zip(got.segments.to_pylist(), old["segments"]):
            if files[seg["file"]]["format"] == "jsonl":
                t = scan.read_jsonl_rows(source, names[seg["file"]], seg["range_start"], seg["skip"], seg["rows"],
                                         first_line=seg["first_line"], id_column="id")
                assert t.column(scan.LINE)[0].as_py() == old_seg["line"]
