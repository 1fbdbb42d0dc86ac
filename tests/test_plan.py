"""Planning without Ray: every row in exactly one shard (plan_store.pack_shards), plan order is path order
(the first occurrence of an id wins), the plan summary the manifest stores, and user mistakes are one-line
InputErrors naming the file."""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import make_docs, write_jsonl, write_parquet
from reembed import plan_store
from reembed.config import InputConfig
from reembed.errors import InputError
from reembed.plan import make_plan as _make_plan
from reembed.plan_store import Unit, pack_shards
from reembed.storage import Location


def make_plan(cfg: InputConfig, shard_rows: int, **kw) -> dict:
    """make_plan with the plan folder in ``_plan`` under the input (an underscore folder is never input)."""
    root = cfg.uri if not cfg.uri.endswith((".parquet", ".jsonl")) else cfg.uri.rsplit("/", 1)[0]
    return _make_plan(cfg, shard_rows, Location.from_uri(f"{root}/_plan"), **kw)


def covered(segments: list[dict], files: int) -> dict[int, list[int]]:
    """Every (file, row) the segments cover, in shard order, checking shards are numbered densely."""
    rows: dict[int, list[int]] = {f: [] for f in range(files)}
    last = -1
    for seg in segments:
        assert seg["shard"] in (last, last + 1)
        last = seg["shard"]
        assert seg["stop"] > seg["start"] and seg["rows"] == seg["stop"] - seg["start"]  # never an empty segment
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
    segments = list(pack_shards([Unit(i, n) for i, n in enumerate(sizes)], shard_rows))
    total = sum(sizes)
    shards = sorted({s["shard"] for s in segments})
    assert len(shards) == -(-total // shard_rows)
    per_shard = [sum(s["rows"] for s in segments if s["shard"] == k) for k in shards]
    assert all(n == shard_rows for n in per_shard[:-1]) and (not per_shard or 0 < per_shard[-1] <= shard_rows)
    assert covered(segments, len(sizes)) == {i: list(range(n)) for i, n in enumerate(sizes)}
    order = [(seg["file"], seg["start"]) for seg in segments]
    assert order == sorted(order)


def test_plan_order_is_path_order_so_the_first_file_by_name_keeps_the_id(tmp_path):
    write_jsonl(tmp_path / "b.jsonl", [{"id": "x", "text": "in b"}])
    write_parquet(tmp_path / "a.parquet", [{"id": "y", "text": "in a"}, {"id": "x", "text": "in a too"}])
    write_parquet(tmp_path / "c" / "z.parquet", [{"id": "y", "text": "in c/z"}])
    plan = make_plan(InputConfig(uri=str(tmp_path)), 10)
    files = plan_store.read_files(Location.from_uri(str(tmp_path / "_plan")))
    assert files.column("path").to_pylist() == ["a.parquet", "b.jsonl", "c/z.parquet"]
    assert files.column("dup_rows").to_pylist() == [0, 1, 1]
    dups = plan_store.read_shard(Location.from_uri(str(tmp_path / "_plan")), 0).duplicates
    assert dups.to_pylist() == [{"file": 1, "row": 0, "id": "x"}, {"file": 2, "row": 0, "id": "y"}]
    assert plan["rows"] == 4 and plan["duplicate_rows"] == 2


def test_the_plan_summary_is_small_and_names_its_files_with_their_sha256(tmp_path):
    for k in range(3):
        write_parquet(tmp_path / f"f{k}.parquet", make_docs(50, start=50 * k))
    plan = make_plan(InputConfig(uri=str(tmp_path)), 7)
    assert plan["shards"] == 22 and plan["files"] == 3 and plan["rows"] == 150 and plan["dedup"] == "hash"
    store = plan["store"]
    names = [store["files"]["path"]] + [r["path"] for r in store["segments"] + store["duplicates"]]
    assert names[:2] == ["plan/files.parquet", "plan/segments/part-00000.parquet"] and len(store["duplicates"]) == 1
    for rec in [store["files"], *store["segments"], *store["duplicates"]]:
        data = (tmp_path / "_plan" / rec["path"].split("/", 1)[1]).read_bytes()
        assert hashlib.sha256(data).hexdigest() == rec["sha256"]
    assert len(json.dumps(plan)) < 6000


def test_dedup_none_reads_no_id_and_finds_no_duplicates(tmp_path):
    write_parquet(tmp_path / "a.parquet", [{"id": "x", "text": "a"}, {"id": "x", "text": "b"}])
    plan = make_plan(InputConfig(uri=str(tmp_path)), 10, dedup="none")
    assert plan["dedup"] == "none" and plan["duplicate_rows"] == 0 and plan["store"]["duplicates"] == []
    assert not (tmp_path / "_plan" / "duplicates").exists() and not (tmp_path / "_plan" / "_ids").exists()


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
    plan = make_plan(InputConfig(uri=str(tmp_path)), 10, on_bad_file="skip")
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
        plan = make_plan(InputConfig(uri=str(tmp_path)), 10)
    assert plan["rows"] == 1 and "1 file(s) are neither Parquet nor JSON Lines" in caplog.text and "notes.txt" in caplog.text


def test_passthrough_types_that_clash_across_files_name_both_files(tmp_path):
    pq.write_table(pa.table({"id": ["a"], "text": ["x"], "meta": pa.array([{"k": 1}])}), tmp_path / "a.parquet")
    pq.write_table(pa.table({"id": ["b"], "text": ["y"], "meta": pa.array([[1, 2]])}), tmp_path / "b.parquet")
    with pytest.raises(InputError) as e:
        make_plan(InputConfig(uri=str(tmp_path), passthrough=("meta",)), 10)
    msg = one_line(e)
    assert "column 'meta' is struct<k: int64> in " in msg and "a.parquet and list<element: int64> in " in msg
    assert msg.index("a.parquet") < msg.index("b.parquet") and "input.passthrough" in msg
