"""The shard writer without Ray: routing blocks to shards in any order and gathering a shard's rows from its
blocks, and writing one (schema, temporary name with the job's epoch, check, publish), including on a disk
that fills up mid-write."""

from __future__ import annotations

import hashlib
import os
import random
import uuid
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import embedded_rows
from reembed import schema as S
from s3_fixtures import moto_server, new_bucket, s3_env, s3_user  # noqa: F401 (fixtures)
from reembed.errors import ChecksumError, ManifestError, StorageError
from reembed.storage import Location
from reembed.write import (ShardRouter, block_shards, read_shard_table, shard_rows, write_shard,
                           write_shard_from_blocks)

DIM = 4
SCHEMA = S.shard_schema(DIM, pa.schema([pa.field("lang", pa.string())]))


def test_router_hands_out_each_shard_once_complete_whatever_the_block_order():
    sizes = {0: 7, 1: 1, 2: 13, 5: 4}
    rows = pa.concat_tables([embedded_rows(s, n) for s, n in sizes.items()])
    # Blocks of mixed shards and sizes, shuffled: the order the actor pool returns them in is arbitrary.
    order = list(range(rows.num_rows))
    random.Random(3).shuffle(order)
    rows = rows.take(pa.array(order))
    cuts = sorted(random.Random(4).sample(range(1, rows.num_rows), 6))
    blocks = [rows.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, rows.num_rows])]

    router = ShardRouter(sizes)
    done = {}
    for i, block in enumerate(blocks):  # the driver routes by a block's key and its {shard: rows} only
        for shard, keys in router.add(i, block_shards(block)):
            assert shard not in done
            done[shard] = shard_rows(shard, [blocks[k] for k in keys])
    assert sorted(done) == sorted(sizes) and router.incomplete == {}
    for shard, table in done.items():
        assert table.num_rows == sizes[shard]
        assert sorted(table.column(S.POS).to_pylist()) == list(range(sizes[shard]))
        assert set(table.column(S.SHARD).to_pylist()) == {shard}


def test_router_refuses_rows_it_was_not_waiting_for_and_forgets_a_lost_shard():
    router = ShardRouter({0: 3})
    assert router.add("a", block_shards(embedded_rows(0, 2))) == [] and router.incomplete == {0: 2}
    with pytest.raises(RuntimeError, match="shard 0: received 4 rows, planned 3"):
        router.add("b", block_shards(embedded_rows(0, 2)))
    with pytest.raises(RuntimeError, match="shard 7.*not pending"):
        ShardRouter({0: 3}).add("c", block_shards(embedded_rows(7, 1)))
    router = ShardRouter({0: 3})
    router.add("a", {0: 2})
    router.forget(0, 3)  # its blocks were lost: it must come again whole
    assert router.incomplete == {0: 0} and router.add("b", {0: 3}) == [(0, ["b"])]


def test_a_writer_gathers_its_shard_from_mixed_blocks_names_the_file_by_epoch_and_says_where_it_ran(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    rows = pa.concat_tables([embedded_rows(4, 6), embedded_rows(5, 3)])
    blocks = [rows.slice(0, 4), rows.slice(4, 5)]  # the second block holds rows of shards 4 and 5
    rec = write_shard_from_blocks(loc, 4, 7, SCHEMA, *blocks)
    assert rec["path"] == "shards/part-00004.e0007.parquet" and rec["epoch"] == 7
    assert rec["writer"]["host_pid"].endswith(f":{os.getpid()}")
    table = read_shard_table(loc, rec)
    assert table.num_rows + rec["dead_letters"] == 6 and set(table.column("id").to_pylist()) <= {
        r for r in embedded_rows(4, 6).column("id").to_pylist()}
    again = write_shard_from_blocks(loc, 4, 7, SCHEMA, *blocks)  # a retried writer replaces its own file
    assert again["sha256"] == rec["sha256"] and read_shard_table(loc, again).num_rows == table.num_rows


def test_write_shard_sorts_splits_dead_letters_and_records_what_it_published(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    rows = embedded_rows(3, 10, dead={2: S.EMPTY_TEXT, 7: S.DUPLICATE_ID})
    shuffled = rows.take(pa.array([9, 2, 0, 5, 7, 1, 8, 3, 6, 4]))
    rec = write_shard(loc, 3, shuffled, SCHEMA)

    shard = tmp_path / "out" / "shards" / "part-00003.parquet"
    data = shard.read_bytes()
    assert rec["path"] == "shards/part-00003.parquet" and rec["bytes"] == len(data)
    assert rec["sha256"] == hashlib.sha256(data).hexdigest()
    assert rec["rows"] == 8 and rec["dead_letters"] == 2
    assert rec["reasons"] == {S.EMPTY_TEXT: 1, S.DUPLICATE_ID: 1}
    table = pq.read_table(shard)
    assert table.schema.equals(SCHEMA)  # exactly the shard schema: no internal columns, required fields kept
    assert table.column(S.ID).to_pylist() == [f"s3-{i}" for i in range(10) if i not in (2, 7)]  # input order
    dl = pq.read_table(tmp_path / "out" / rec["dead_letter_path"])
    assert dl.schema.equals(S.DEAD_LETTER_SCHEMA) and dl.column("id").to_pylist() == ["s3-2", "s3-7"]
    # Written under a temporary name in _tmp/ and moved: nothing is left there.
    assert not list((tmp_path / "out" / "shards" / "_tmp").iterdir())
    assert read_shard_table(loc, rec, columns=[S.ID]).num_rows == 8


@pytest.mark.parametrize("change, error", [
    (lambda t: t.set_column(t.schema.get_field_index(S.EMBEDDING), S.EMBEDDING,
                            S.embedding_array(np.zeros((t.num_rows, 3)))),
     r"column 'embedding' is fixed_size_list<item: float>\[3\], the shard schema says"),
    (lambda t: t.set_column(t.schema.get_field_index(S.ID), S.ID, pa.array([None] * t.num_rows, pa.string())),
     "column 'id' holds 6 null"),
    (lambda t: t.drop_columns(["lang"]), "column 'lang' is missing"),
])
def test_a_table_that_does_not_fit_the_shard_schema_is_a_bug_and_nothing_is_written(tmp_path, change, error):
    loc = Location.from_uri(str(tmp_path / "out"))
    with pytest.raises(TypeError, match=error):
        write_shard(loc, 0, change(embedded_rows(0, 6)), SCHEMA)
    assert not (tmp_path / "out" / "shards").exists()


def test_read_shard_table_checks_the_bytes_against_the_record(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    rec = write_shard(loc, 0, embedded_rows(0, 5), SCHEMA)
    path = tmp_path / "out" / rec["path"]
    other = write_shard(loc, 1, embedded_rows(1, 5), SCHEMA)
    path.write_bytes((tmp_path / "out" / other["path"]).read_bytes())  # a valid Parquet file, but not this one
    with pytest.raises(ChecksumError, match=r"part-00000.parquet: sha256 .* does not match shards.00000.sha256"):
        read_shard_table(loc, rec, key="shards.00000")
    assert read_shard_table(loc, rec, verify=False).num_rows == 5  # only the checksum is skipped
    with pytest.raises(ManifestError, match=r"shards.00000.path = '../../etc/passwd' points outside the output"):
        read_shard_table(loc, {**rec, "path": "../../etc/passwd"}, verify=False, key="shards.00000")


def test_a_shard_cut_short_by_a_full_disk_is_never_published(small_disk):
    tiny_disk, resize = small_disk
    resize("256k")
    loc = Location.from_uri(str(tiny_disk / "out"))
    small = write_shard(loc, 0, embedded_rows(0, 10), SCHEMA)
    # Fill the disk up to a few KiB, then write a shard larger than what is left.
    (tiny_disk / "filler").write_bytes(os.urandom(200 * 1024))
    big = embedded_rows(1, 3000, dim=DIM, seed=uuid.uuid4().int % 1000)
    with pytest.raises(StorageError) as e:
        write_shard(loc, 1, big, SCHEMA)
    msg = str(e.value)
    assert "\n" not in msg and "part-00001.parquet: no space left on the device" in msg and "rerun" in msg
    shards = tiny_disk / "out" / "shards"
    assert not (shards / "part-00001.parquet").exists()
    assert not list((shards / "_tmp").iterdir())  # the partial temporary file was removed too
    assert read_shard_table(loc, small).num_rows == 10  # what was published before is intact

    (tiny_disk / "filler").unlink()
    rec = write_shard(loc, 1, big, SCHEMA)
    assert read_shard_table(loc, rec).num_rows == 3000


def test_a_written_file_that_fails_its_check_is_removed(tmp_path):
    """The check runs on the temporary file before the move: here the check (the one write_shard uses)
    counts rows in what was written, and a file with the wrong count never reaches its final name."""
    from reembed.write import _parquet_bytes, _verifier

    loc = Location.from_uri(str(tmp_path / "out"))
    table = pa.table({"x": list(range(5))})
    with pytest.raises(StorageError, match="written file has 5 rows, expected 6"):
        loc.publish(_parquet_bytes(table), "shards", "part-00000.parquet", verify=_verifier(6, "part-00000"))
    with pytest.raises(StorageError, match="not readable Parquet"):
        loc.publish(b"PAR1 truncated", "shards", "part-00000.parquet", verify=_verifier(6, "part-00000"))
    assert not (tmp_path / "out" / "shards" / "part-00000.parquet").exists()
    assert not list(Path(tmp_path / "out" / "shards" / "_tmp").iterdir())


@pytest.mark.s3
def test_on_s3_a_retried_writer_replaces_its_own_object_and_never_another_jobs(s3_env):
    bucket = new_bucket(s3_env)
    loc = Location.from_uri(f"s3://{bucket}/out")
    first = write_shard_from_blocks(loc, 2, 5, SCHEMA, embedded_rows(2, 6))
    again = write_shard_from_blocks(loc, 2, 5, SCHEMA, embedded_rows(2, 6))  # the create-only PUT meets its own
    assert again["path"] == first["path"] == "shards/part-00002.e0005.parquet"
    assert read_shard_table(loc, again).num_rows == first["rows"]
    other = write_shard_from_blocks(loc, 2, 6, SCHEMA, embedded_rows(2, 6))  # a later job: its own name
    assert other["path"] == "shards/part-00002.e0006.parquet" and loc.exists(first["path"])
