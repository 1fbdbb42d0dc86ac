"""The shard writer without Ray: assembling shards from blocks in any order, and writing one (schema,
temporary name, check, publish), including on a disk that fills up mid-write."""

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
from reembed.errors import ChecksumError, ManifestError, StorageError
from reembed.storage import Location
from reembed.write import ShardAssembler, read_shard_table, write_shard

DIM = 4
SCHEMA = S.shard_schema(DIM, pa.schema([pa.field("lang", pa.string())]))


def test_assembler_hands_out_each_shard_once_complete_whatever_the_block_order():
    sizes = {0: 7, 1: 1, 2: 13, 5: 4}
    rows = pa.concat_tables([embedded_rows(s, n) for s, n in sizes.items()])
    # Blocks of mixed shards and sizes, shuffled: the order the actor pool returns them in is arbitrary.
    order = list(range(rows.num_rows))
    random.Random(3).shuffle(order)
    rows = rows.take(pa.array(order))
    cuts = sorted(random.Random(4).sample(range(1, rows.num_rows), 6))
    blocks = [rows.slice(a, b - a) for a, b in zip([0, *cuts], [*cuts, rows.num_rows])]

    assembler = ShardAssembler(sizes)
    done = {}
    for block in blocks:
        for shard, table in assembler.add(block):
            assert shard not in done
            done[shard] = table
    assert sorted(done) == sorted(sizes) and assembler.incomplete == {}
    for shard, table in done.items():
        assert table.num_rows == sizes[shard]
        assert sorted(table.column(S.POS).to_pylist()) == list(range(sizes[shard]))
        assert set(table.column(S.SHARD).to_pylist()) == {shard}


def test_assembler_refuses_rows_it_was_not_waiting_for():
    assembler = ShardAssembler({0: 3})
    assert assembler.add(embedded_rows(0, 2)) == [] and assembler.incomplete == {0: 2}
    with pytest.raises(RuntimeError, match="shard 0: received 4 rows, planned 3"):
        assembler.add(embedded_rows(0, 2))
    with pytest.raises(RuntimeError, match="shard 7.*not pending"):
        ShardAssembler({0: 3}).add(embedded_rows(7, 1))


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
