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
from reembed.plan_store import Unit, pack_shards
from reembed.storage import Location


@pytest.mark.parametrize("seed", range(4))
def test_packing_equals_a_row_by_row_reference(seed):
    rng = random.Random(seed)
    rows = [rng.choice([0, 1, 5, 37, 250]) for _ in range(rng.randint(1, 30))]
    shard_rows = rng.choice([1, 10, 64, 1000])
    # reference: number every row in plan order, shard = position // shard_rows, then merge runs
    want: list[tuple[int, int, int, int]] = []
    pos = 0
    for f, n in enumerate(rows):
        for r in range(n):
            shard = pos // shard_rows
            if want and want[-1][0] == shard and want[-1][1] == f and want[-1][3] == r:
                want[-1] = (shard, f, want[-1][2], r + 1)
            else:
                want.append((shard, f, r, r + 1))
            pos += 1
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


def test_make_plan_equals_a_line_by_line_reference(tmp_path):
    """make_plan's Parquet plan (footer counts, JSON Lines ranges, hash-partitioned dedup, streaming packing)
    covers every row once in order, at the right line numbers, with the duplicates a first-wins reference
    finds, on a corpus with blank lines and repeated ids."""
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
    plan_loc = Location.from_uri(str(tmp_path / "out" / "plan"))
    plan = make_plan(InputConfig(uri=str(src)), 37, plan_loc, partitions=4, range_bytes=700)
    source = Location.from_uri(str(src))

    # reference: (file, row, line, id) of every document in plan order
    ref = [(0, i, i, d["id"]) for i, d in enumerate(docs[:200])]
    lines = (src / "b.jsonl").read_text().split("\n")
    import json
    row = 0
    for n, line in enumerate(lines):
        if line.strip():
            ref.append((1, row, n, json.loads(line)["id"]))
            row += 1
    ref += [(2, i, i, d["id"]) for i, d in enumerate(docs[450:])]
    seen, want_dups = set(), []
    for f, r, _, i in ref:
        if i in seen:
            want_dups.append((f, r, i))
        seen.add(i)

    assert plan["rows"] == len(ref) and plan["shards"] == -(-len(ref) // 37) and plan["files"] == 3
    assert plan["duplicate_rows"] == len(want_dups) > 30
    got, got_dups = [], []
    for shard in range(plan["shards"]):
        sp = plan_store.read_shard(plan_loc, shard)
        got_dups += list(zip(*(sp.duplicates.column(c).to_pylist() for c in ("file", "row", "id"))))
        for seg in sp.segments.to_pylist():
            if seg["file"] == 1:
                ls = scan.jsonl_slice(source, "b.jsonl", seg["range_start"], seg["skip"], seg["rows"],
                                      first_line=seg["first_line"])
                got += [(1, r, n) for r, n in zip(range(seg["start"], seg["stop"]), ls.numbers.tolist())]
            else:
                got += [(seg["file"], r, r) for r in range(seg["start"], seg["stop"])]
    assert got == [(f, r, n) for f, r, n, _ in ref]
    assert got_dups == want_dups

    # A read task's shards read together: the same plans as one by one, each plan file opened once.
    counts, counted = counting_location(tmp_path / "out" / "plan")
    shards = list(range(plan["shards"]))
    together = plan_store.read_shards(counted, shards)
    for sp in together:
        alone = plan_store.read_shard(plan_loc, sp.shard)
        assert (sp.segments, sp.files, sp.duplicates) == (alone.segments, alone.files, alone.duplicates)
    dup_opens = {p: n for p, n in counts.opens.items() if "/duplicates/" in p}
    assert len(dup_opens) == 4 and set(dup_opens.values()) == {1}  # not once per shard
