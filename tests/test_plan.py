"""Planning without Ray: every row in exactly one shard (plan._pack), the first occurrence of an id wins
(plan._find_duplicates), and user mistakes are one-line InputErrors naming the file."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_jsonl, write_parquet
from reembed.config import InputConfig
from reembed.errors import InputError
from reembed.plan import FileScan, _find_duplicates, _pack, make_plan


def parquet_scan(index: int, rows: int) -> FileScan:
    return FileScan(index=index, path=f"f{index}.parquet", format="parquet", size=0, rows=rows)


def jsonl_scan(index: int, rows: int, line_bytes: int = 10) -> FileScan:
    # One blank line after every third document: line numbers and byte offsets are not just the row index.
    s = FileScan(index=index, path=f"f{index}.jsonl", format="jsonl", size=0, rows=rows)
    line, pos = 0, 0
    for r in range(rows):
        s.lines.append(line)
        s.offsets.append(pos)
        line, pos = line + 1, pos + line_bytes
        if r % 3 == 2:
            line, pos = line + 1, pos + 1
    s.end_offset = pos
    return s


def covered(shards: list[dict], scans: list[FileScan]) -> dict[int, list[int]]:
    """Every (file, row) the shards cover, in shard order, checking each shard's row count on the way."""
    rows: dict[int, list[int]] = {s.index: [] for s in scans}
    for i, shard in enumerate(shards):
        assert shard["shard"] == i
        assert shard["rows"] == sum(seg["stop"] - seg["start"] for seg in shard["segments"])
        for seg in shard["segments"]:
            assert seg["stop"] > seg["start"]  # never an empty segment
            rows[seg["file"]].extend(range(seg["start"], seg["stop"]))
    return rows


@pytest.mark.parametrize("sizes, shard_rows", [
    ([10], 10),  # exactly one shard
    ([30], 10),  # an exact multiple: no empty trailing shard
    ([25], 10),  # a file larger than a shard, with a short last shard
    ([3, 0, 4, 0, 0, 5], 4),  # empty files take no segment and no shard
    ([1, 1, 1, 1, 1], 2),  # small files share shards
    ([7, 13, 2], 1),  # one row per shard
    ([7, 13, 2], 1000),  # everything in one shard
    ([0, 0], 5),  # nothing at all
])
def test_pack_puts_every_row_in_exactly_one_shard_in_plan_order(sizes, shard_rows):
    scans = [parquet_scan(i, n) for i, n in enumerate(sizes)]
    shards = _pack(scans, shard_rows)
    total = sum(sizes)
    assert len(shards) == -(-total // shard_rows)
    assert all(s["rows"] == shard_rows for s in shards[:-1]) and (not shards or 0 < shards[-1]["rows"] <= shard_rows)
    rows = covered(shards, scans)
    assert rows == {i: list(range(n)) for i, n in enumerate(sizes)}
    order = [(seg["file"], seg["start"]) for s in shards for seg in s["segments"]]
    assert order == sorted(order)


def test_pack_gives_jsonl_segments_contiguous_byte_ranges_and_their_first_line():
    scans = [jsonl_scan(0, 10), parquet_scan(1, 3), jsonl_scan(2, 7)]
    shards = _pack(scans, 4)
    assert covered(shards, scans) == {0: list(range(10)), 1: [0, 1, 2], 2: list(range(7))}
    for f in (0, 2):
        segs = [seg for s in shards for seg in s["segments"] if seg["file"] == f]
        scan = scans[f]
        assert segs[0]["byte_start"] == 0 and segs[-1]["byte_end"] == scan.end_offset
        for a, b in zip(segs, segs[1:]):
            assert a["byte_end"] == b["byte_start"]
        for seg in segs:
            assert seg["line"] == scan.lines[seg["start"]] and seg["byte_start"] == scan.offsets[seg["start"]]


def test_first_occurrence_in_plan_order_wins():
    scans = []
    for i, ids in enumerate([["a", "b", "a", None], ["c", "b", None, "d"], ["a", "d", "e"], []]):
        s = parquet_scan(i, len(ids))
        s.ids = pa.array(ids, pa.string())
        scans.append(s)
    dups = _find_duplicates(scans)
    assert dups.to_pylist() == [
        {"file": 0, "row": 2, "id": "a"},
        {"file": 1, "row": 1, "id": "b"},
        {"file": 2, "row": 0, "id": "a"},
        {"file": 2, "row": 1, "id": "d"},
    ]  # nulls (and invalid ids, which plan as nulls) are never duplicates
    assert _find_duplicates([]).num_rows == 0


def test_plan_order_is_path_order_so_the_first_file_by_name_keeps_the_id(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "text": "in b"}])
    write_parquet(tmp_path / "a.parquet", [{"id": "y", "text": "in a"}, {"id": "x", "text": "in a too"}])
    write_parquet(tmp_path / "c" / "z.parquet", [{"id": "y", "text": "in c/z"}])
    plan, dups = make_plan(InputConfig(uri=str(tmp_path)), 10)
    names = [f["path"].rsplit("/", 2)[-2:] for f in plan["files"]]
    assert names == [[tmp_path.name, "a.parquet"], [tmp_path.name, "b.jsonl"], ["c", "z.parquet"]]
    assert dups.to_pylist() == [{"file": 1, "row": 0, "id": "x"}, {"file": 2, "row": 0, "id": "y"}]
    assert plan["rows"] == 4 and plan["duplicate_rows"] == 2


# -- user mistakes: one line naming the file --------------------------------------------------------


def one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_missing_columns_name_the_file_and_the_columns_found(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", [{"doc": "1", "body": "x"}])
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path)), 10)
    msg = one_line(e)
    assert "a.jsonl: missing column(s) 'id', 'text'; columns found: 'body', 'doc'" in msg and "input.id_column" in msg


def test_a_non_text_text_column_is_refused_at_plan_time(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": [3]}), tmp_path / "a.parquet")
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path)), 10)
    assert "a.parquet: text column 'text' has type int64, not string or binary" in one_line(e)


def test_an_id_column_that_cannot_hold_ids_is_refused(tmp_path):
    pq.write_table(pa.table({"id": [[1, 2]], "text": ["x"]}), tmp_path / "a.parquet")
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path)), 10)
    assert "a.parquet: id column 'id' cannot hold ids" in one_line(e)


def test_an_unreadable_file_fails_naming_it_or_is_skipped_and_recorded(tmp_path):
    write_parquet(tmp_path / "a.parquet", make_docs(3))
    (tmp_path / "b.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path)), 10)
    assert "b.parquet: cannot read this parquet file" in one_line(e) and "--on-bad-file skip" in str(e.value)
    plan, _ = make_plan(InputConfig(uri=str(tmp_path)), 10, on_bad_file="skip")
    assert plan["rows"] == 3 and [b["path"].rsplit("/", 1)[-1] for b in plan["bad_files"]] == ["b.parquet"]


def test_a_wrong_format_names_the_file(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", make_docs(2))
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path), format="parquet"), 10)
    assert "a.jsonl: cannot read this parquet file" in one_line(e)
    write_parquet(tmp_path / "b" / "c.parquet", make_docs(2))
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path / "b"), format="jsonl"), 10)
    assert "c.parquet: no line is a JSON object" in one_line(e) and "input.format" in str(e.value)


def test_no_data_files_says_what_was_looked_for(tmp_path, caplog):
    (tmp_path / "notes.txt").write_text("hello\n")
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path)), 10)
    assert "no Parquet or JSON Lines files found" in one_line(e)
    write_jsonl(tmp_path / "a.jsonl", make_docs(1))
    with caplog.at_level("INFO", logger="reembed.plan"):
        plan, _ = make_plan(InputConfig(uri=str(tmp_path)), 10)
    assert plan["rows"] == 1 and "1 file(s) are neither Parquet nor JSON Lines" in caplog.text and "notes.txt" in caplog.text


def test_passthrough_types_that_clash_across_files_name_both_files(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "meta": pa.array([{"k": 1}])}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "text": ["y"], "meta": pa.array([[1, 2]])}), tmp_path / "b.parquet")
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path), passthrough=("meta",)), 10)
    msg = one_line(e)
    assert "column 'meta' is struct<k: int64> in " in msg and "a.parquet and list<element: int64> in " in msg
    assert msg.index("a.parquet") < msg.index("b.parquet") and "input.passthrough" in msg
