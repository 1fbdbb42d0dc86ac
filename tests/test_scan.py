"""reembed.scan: row counts from Parquet footers and vectorized JSON Lines range scans, the range reader,
gzipped JSON Lines read once, change-detection data; each compared with a plain Python reference."""

from __future__ import annotations

import gzip
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from counting_fs import counting_location
from s3_fixtures import moto_server, new_bucket, s3_env, s3_user  # noqa: F401 (fixtures)
from reembed import scan
from reembed.errors import InputError
from reembed.plan import json_id
from reembed.plan_store import jsonl_units, pack_shards
from reembed.storage import Location


def reference_lines(data: bytes) -> list[tuple[int, bytes]]:
    """(line number, line) of each non-blank line, walking the file in Python."""
    out, pos, n = [], 0, 0
    while pos < len(data):
        nl = data.find(b"\n", pos)
        stop = len(data) if nl < 0 else nl
        if data[pos:stop].strip():
            out.append((n, data[pos:stop]))
        n, pos = n + 1, stop + 1
    return out


def reference_id(line: bytes):
    try:
        obj = json.loads(line)
    except ValueError:
        return None
    return json_id(obj.get("id")) if isinstance(obj, dict) else None


EDGE_CASES = {
    "plain": b'{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}\n',
    "blank_lines": b'\n\n{"id": 1, "text": "a"}\n\n   \n\t\n{"id": 2, "text": "b"}\n\n',
    "crlf": b'{"id": 1, "text": "a"}\r\n\r\n{"id": 2, "text": "b"}\r\n',
    "no_final_newline": b'{"id": 1, "text": "a"}\n{"id": 2, "text": "b"}',
    "one_line": b'{"id": 1, "text": "a"}\n',
    "one_line_no_newline": b'{"id": 1, "text": "a"}',
    "empty": b"",
    "only_blank": b"\n \n\r\n\t\n",
    "whitespace_tail": b'{"id": 1, "text": "a"}\n   ',
    "non_ascii": '{"id": "é", "text": "日本語 text"}\n\n{"id": "ü", "text": "x"}\n'.encode(),
}


@pytest.mark.parametrize("name", sorted(EDGE_CASES))
@pytest.mark.parametrize("range_bytes", [1, 2, 3, 7, 16, 1 << 20])
def test_jsonl_range_counts_equal_reference(tmp_path, name, range_bytes):
    data = EDGE_CASES[name]
    (tmp_path / "f.jsonl").write_bytes(data)
    loc = Location.from_uri(str(tmp_path))
    result = scan.scan_jsonl(loc, "f.jsonl", range_bytes=range_bytes)
    ref = reference_lines(data)
    assert result.rows == len(ref)
    assert sum(r.lines for r in result.ranges) == len(data.split(b"\n")) - (1 if data.endswith(b"\n") or not data else 0)
    assert [(r.range_start, r.range_stop) for r in result.ranges] == scan.jsonl_ranges(len(data), range_bytes)
    for r in result.ranges:  # first_line_start is a real line start at or after the range start
        assert r.first_line_start >= r.range_start
        assert r.first_line_start == 0 or r.first_line_start >= len(data) or data[r.first_line_start - 1] == 10


def test_jsonl_counts_and_ids_of_mixed_line_endings_equal_reference(tmp_path):
    data = EDGE_CASES["blank_lines"] + EDGE_CASES["crlf"] + EDGE_CASES["no_final_newline"]
    (tmp_path / "f.jsonl").write_bytes(data)
    loc = Location.from_uri(str(tmp_path))
    ref = reference_lines(data)
    assert scan.scan_jsonl(loc, "f.jsonl", range_bytes=5).rows == len(ref)
    count, ids = scan.jsonl_ids(loc, "f.jsonl", 0, len(data), "id")
    assert ids.to_pylist() == [reference_id(line) for _, line in ref]


def random_jsonl(rng: random.Random, n: int) -> bytes:
    pieces = []
    for i in range(n):
        r = rng.random()
        if r < 0.1:
            pieces.append(rng.choice(["", "  ", "\t", "\r", " \r"]))
            continue
        ident = rng.choice([i, f"d{i}", float(i) + 0.5, f"d{i}"])
        line = json.dumps({"id": ident, "text": "w" * rng.randint(0, 40), "n": i})
        if r > 0.97:
            line = "not json {" if r > 0.99 else "[1, 2]"
        pieces.append(line + ("\r" if rng.random() < 0.1 else ""))
    return ("\n".join(pieces) + ("\n" if rng.random() < 0.5 else "")).encode()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_segments_read_back_every_row_once_in_order(tmp_path, seed):
    """Count ranges, pack them into shards, read every segment: the rows, their line numbers and their
    canonical ids equal a line-by-line reference, whatever the range size."""
    rng = random.Random(seed)
    data = random_jsonl(rng, 400)
    (tmp_path / "f.jsonl").write_bytes(data)
    loc = Location.from_uri(str(tmp_path))
    ref = reference_lines(data)
    range_bytes = rng.choice([13, 101, 997, 5000])
    result = scan.scan_jsonl(loc, "f.jsonl", range_bytes=range_bytes)
    assert result.rows == len(ref)

    units = list(jsonl_units(0, result.ranges))
    got = []
    for seg in pack_shards(units, shard_rows=rng.choice([1, 7, 50])):
        ls = scan.jsonl_slice(loc, "f.jsonl", seg["range_start"], seg["skip"], seg["rows"], first_line=seg["first_line"])
        assert len(ls) == seg["rows"]
        got += list(ls.lines())
    assert got == ref


def test_jsonl_ids_per_range_equal_reference(tmp_path):
    rng = random.Random(5)
    data = random_jsonl(rng, 300)
    (tmp_path / "f.jsonl").write_bytes(data)
    loc = Location.from_uri(str(tmp_path))
    ids = []
    for start, stop in scan.jsonl_ranges(len(data), 211):
        count, part = scan.jsonl_ids(loc, "f.jsonl", start, stop, "id")
        assert count == scan.count_jsonl_range(loc, "f.jsonl", start, stop)
        assert len(part) == count.rows
        ids += part.to_pylist()
    assert ids == [reference_id(line) for _, line in reference_lines(data)]


def test_ids_are_canonicalised_as_the_plan_does(tmp_path):
    lines = [{"id": 7}, {"id": "x"}, {"id": 7.5}, {"id": True}, {"id": None}, {"text": "no id"}, {"id": {"a": 1}},
             {"id": [1]}, {"id": "2020-01-01"}, {"id": 3}]
    data = "\n".join(json.dumps(x) for x in lines).encode() + b"\nnot json\n"
    (tmp_path / "f.jsonl").write_bytes(data)
    loc = Location.from_uri(str(tmp_path))
    _, ids = scan.jsonl_ids(loc, "f.jsonl", 0, len(data), "id")
    assert ids.to_pylist() == [json_id(x.get("id")) for x in lines] + [None]
    # a column of ints alone takes pyarrow's fast path; a float beside ints must not turn 3 into "3.0"
    (tmp_path / "g.jsonl").write_bytes(b'{"id": 3}\n{"id": 4}\n{"id": 4.5}\n')
    assert scan.jsonl_ids(loc, "g.jsonl", 0, 100, "id")[1].to_pylist() == ["3", "4", "4.5"]
    (tmp_path / "h.jsonl").write_bytes(b'{"id": 3}\n{"id": 4}\n')
    assert scan.jsonl_ids(loc, "h.jsonl", 0, 100, "id")[1].to_pylist() == ["3", "4"]


@pytest.mark.parametrize("tail", [
    b'{"id": 7, "text": "int after strings"}', b'{"id": 7.0, "text": "integral float"}', b'{"id": 1e0}',
    b'{"id": 7.5}', b'{"id": true}', b'{"id": 99999999999999999999}', b'{"id": {"a": 1}}', b'{"id": [1]}',
    b'{"id": "s", "text": "\xff\xfe not utf-8"}', b'{"id": "\xff"}', b'{"id": "a"}{"id": "b"}', b'[1, 2]', b'5',
    b'{"id": "a", "text": "x\\q"}', b'{"id": "a"} trailing', b'{"text": "no id"}', b'{"id": null}', b'{"id": -0}',
    b'{"id": "2020-01-01"}', b'{"id": "a", "t": NaN}', b'{"id": "a", "nested": {"z": [1, {"q": 2}]}}',
])
@pytest.mark.parametrize("head", [b'{"id": "x%d", "text": "t"}', b'{"id": %d, "text": "t"}', b'{"text": "no id %d"}',
                                  b"not json %d"])
def test_ids_read_alone_equal_each_line_parsed_with_json(tmp_path, head, tail):
    """The id column is read without building the other fields where pyarrow can; any line where that
    could differ from ``json.loads`` of each line (another id type, not UTF-8, not one object) must give
    the reference's ids all the same."""
    data = b"\n".join([head % i for i in range(5)] + [tail] + [head % i for i in range(5, 8)]) + b"\n"
    (tmp_path / "f.jsonl").write_bytes(data)
    loc = Location.from_uri(str(tmp_path))
    _, ids = scan.jsonl_ids(loc, "f.jsonl", 0, len(data), "id")
    assert ids.to_pylist() == [reference_id(line) for _, line in reference_lines(data)]


def test_parquet_count_reads_only_the_footer(tmp_path):
    n = 200_000
    table = pa.table({"id": [f"doc-{i}" for i in range(n)], "text": [f"text number {i} " * 3 for i in range(n)]})
    pq.write_table(table, tmp_path / "a.parquet", row_group_size=30_000, compression="none")
    counts, loc = counting_location(tmp_path)
    result = scan.count_parquet(loc, "a.parquet")
    assert result.rows == pq.read_metadata(tmp_path / "a.parquet").num_rows == n
    assert result.row_groups == 7
    assert result.columns == ("id", "text")
    size = os.path.getsize(tmp_path / "a.parquet")
    read = counts.bytes_read[str(tmp_path / "a.parquet")]
    assert read <= 64 * 1024 + pq.read_metadata(tmp_path / "a.parquet").serialized_size + 8
    assert read < size / 20
    assert result.stat.size == size and result.stat.mtime_ns


def test_parquet_ids_equal_plan(tmp_path):
    from reembed.plan import arrow_ids

    ints = pa.array([1, None, 3], pa.int64())
    pq.write_table(pa.table({"id": ints, "text": ["a", "b", "c"]}), tmp_path / "a.parquet")
    loc = Location.from_uri(str(tmp_path))
    assert scan.parquet_ids(loc, "a.parquet", "id").to_pylist() == arrow_ids(ints, "a")[0].to_pylist() == ["1", None, "3"]


def test_corrupt_parquet_is_one_clear_error(tmp_path):
    (tmp_path / "bad.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(InputError, match=r"bad\.parquet: cannot read the Parquet footer.*fix or remove"):
        scan.count_parquet(Location.from_uri(str(tmp_path)), "bad.parquet")


def test_gz_is_read_and_decompressed_once_for_all_its_shards(tmp_path):
    rng = random.Random(3)
    data = random_jsonl(rng, 500)
    (tmp_path / "f.jsonl.gz").write_bytes(gzip.compress(data))
    (tmp_path / "f.jsonl").write_bytes(data)
    counts, loc = counting_location(tmp_path)
    ref = reference_lines(data)

    count = scan.count_gz(loc, "f.jsonl.gz")
    assert count.rows == len(ref)
    assert scan.scan_jsonl(loc, "f.jsonl.gz", range_bytes=10).ranges == (count,)  # one range, never split
    counts.reset()

    slices = [(0, 100), (100, 1), (101, len(ref) - 101)]
    located = scan.gz_line_slices(loc, "f.jsonl.gz", slices)
    gz = str(tmp_path / "f.jsonl.gz")
    assert counts.opens[gz] == 1
    assert counts.bytes_read[gz] == os.path.getsize(gz)  # the compressed bytes, once
    assert [len(ls) for ls in located] == [n for _, n in slices]
    assert [line for ls in located for line in ls.lines()] == ref
    plain = [scan.jsonl_slice(loc, "f.jsonl", 0, s, n) for s, n in slices]
    assert [list(ls.lines()) for ls in located] == [list(ls.lines()) for ls in plain]
    counts.reset()
    _, ids = scan.jsonl_ids(loc, "f.jsonl.gz", 0, 0, "id")
    assert counts.opens[gz] == 1
    assert ids.to_pylist() == [reference_id(line) for _, line in ref]


def test_reader_refuses_a_file_that_shrank(tmp_path):
    (tmp_path / "f.jsonl").write_bytes(b'{"id": 1}\n{"id": 2}\n')
    loc = Location.from_uri(str(tmp_path))
    with pytest.raises(InputError, match=r"f\.jsonl: expected 3 documents.*changed since the plan"):
        scan.jsonl_slice(loc, "f.jsonl", 0, 1, 2)
    (tmp_path / "g.jsonl.gz").write_bytes(gzip.compress(b'{"id": 1}\n'))
    with pytest.raises(InputError, match=r"g\.jsonl\.gz: expected 2 documents"):
        scan.gz_line_slices(loc, "g.jsonl.gz", [(0, 2)])


def test_stat_changes_when_the_file_changes(tmp_path):
    path = tmp_path / "f.jsonl"
    path.write_bytes(b'{"id": 1}\n')
    loc = Location.from_uri(str(tmp_path))
    before = scan.stat_file(loc, "f.jsonl")
    assert before.size == 10 and before.mtime_ns and before.etag is None
    path.write_bytes(b'{"id": 2}\n')
    os.utime(path, ns=(before.mtime_ns + 5_000_000_000, before.mtime_ns + 5_000_000_000))
    after = scan.stat_file(loc, "f.jsonl")
    assert after.size == before.size and after.mtime_ns != before.mtime_ns
    path.unlink()
    with pytest.raises(InputError, match=r"f\.jsonl: no such input file"):
        scan.stat_file(loc, "f.jsonl")


def test_ranges_cover_the_file():
    assert scan.jsonl_ranges(0, 10) == [(0, 0)]
    assert scan.jsonl_ranges(25, 10) == [(0, 10), (10, 20), (20, 25)]
    assert scan.jsonl_ranges(10, 10) == [(0, 10)]


@pytest.mark.s3
def test_s3_counts_reads_and_etags(moto_server, s3_env):
    """On S3 (moto): footer and range counts, the range reader, gz, and the ETag that changes with the object."""
    bucket = new_bucket(moto_server)
    client = moto_server.client("s3")
    rng = random.Random(11)
    data = random_jsonl(rng, 200)
    sink = pa.BufferOutputStream()
    pq.write_table(pa.table({"id": [str(i) for i in range(1000)], "text": ["t"] * 1000}), sink, row_group_size=100)
    client.put_object(Bucket=bucket, Key="in/a.parquet", Body=sink.getvalue().to_pybytes())
    client.put_object(Bucket=bucket, Key="in/b.jsonl", Body=data)
    client.put_object(Bucket=bucket, Key="in/c.jsonl.gz", Body=gzip.compress(data))
    loc = Location.from_uri(f"s3://{bucket}/in")
    ref = reference_lines(data)

    pf = scan.count_parquet(loc, "a.parquet")
    assert pf.rows == 1000 and pf.stat.etag and pf.stat.size == loc.size("a.parquet")
    js = scan.scan_jsonl(loc, "b.jsonl", range_bytes=500)
    assert js.rows == len(ref) and len(js.ranges) > 1 and js.stat.etag
    r = js.ranges[1]
    skip = sum(x.rows for x in js.ranges[:1])
    ls = scan.jsonl_slice(loc, "b.jsonl", r.range_start, 0, r.rows, first_line=js.ranges[0].lines)
    assert list(ls.lines()) == ref[skip:skip + r.rows]
    assert scan.scan_jsonl(loc, "c.jsonl.gz").rows == len(ref)
    [whole] = scan.gz_line_slices(loc, "c.jsonl.gz", [(0, len(ref))])
    assert list(whole.lines()) == ref

    before = scan.stat_file(loc, "b.jsonl")
    client.put_object(Bucket=bucket, Key="in/b.jsonl", Body=data.replace(b"w", b"v"))
    after = scan.stat_file(loc, "b.jsonl")
    assert after.size == before.size and after.etag != before.etag


def test_blank_means_what_bytes_strip_strips():
    import numpy as np

    every = np.arange(256, dtype=np.uint8)
    assert [not x for x in scan._non_space(every)] == [not bytes([i]).strip() for i in range(256)]


def test_blank_lines_are_found_per_line_whatever_they_start_with(tmp_path):
    """Lines that start with whitespace (indented objects, blank lines of spaces and tabs) are counted
    as ``bytes.strip`` says, in every range and chunk split."""
    import random

    rng = random.Random(7)
    pieces = [b"", b" ", b"\t", b"\r", b"  \t ", b"{}", b'  {"id": 1}', b"\t\tx", b" \x0b\x0c", b"x  "]
    lines = [rng.choice(pieces) for _ in range(3000)]
    data = b"\n".join(lines) + b"\n  {}"
    (tmp_path / "w.jsonl").write_bytes(data)
    want = sum(1 for line in data.split(b"\n") if line.strip())
    loc = Location.from_uri(str(tmp_path))
    for range_bytes in (7, 100, 1 << 20):
        assert scan.scan_jsonl(loc, "w.jsonl", range_bytes=range_bytes).rows == want
    counter = scan._LineCounter()
    for i in range(0, len(data), 5):
        counter.feed(data[i:i + 5])
    assert counter.finish() == (want, data.count(b"\n") + 1)
    assert scan._Lines(data, final=True).rows == want


def test_first_range_and_gz_carry_the_file_stat(tmp_path):
    data = b'{"id": 1}\n' * 50
    (tmp_path / "f.jsonl").write_bytes(data)
    (tmp_path / "f.jsonl.gz").write_bytes(gzip.compress(data))
    loc = Location.from_uri(str(tmp_path))
    ranges = scan.scan_jsonl(loc, "f.jsonl", range_bytes=100).ranges
    assert ranges[0].stat == scan.stat_file(loc, "f.jsonl") and ranges[0].stat.size == len(data)
    assert all(r.stat is None for r in ranges[1:])  # one stat per file, not per range
    assert scan.jsonl_ids(loc, "f.jsonl", 0, 100, "id")[0].stat.mtime_ns
    gz = scan.count_gz(loc, "f.jsonl.gz")
    assert gz.stat.size == (tmp_path / "f.jsonl.gz").stat().st_size == gz.range_stop
    assert scan.jsonl_ids(loc, "f.jsonl.gz", 0, 0, "id")[0].stat == gz.stat
