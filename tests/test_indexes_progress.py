"""Per-shard index progress: one small create-only record per shard, the same few bytes at any count, read
back by one listing; on a local disk and on S3 (moto)."""

from __future__ import annotations

import json

import pytest

from reembed.indexes.progress import Progress
from reembed.storage import Location
from s3_fixtures import moto_server, new_bucket, s3_env, s3_user  # noqa: F401 (fixtures)


def test_marks_are_listed_back_and_read(tmp_path):
    p = Progress(Location.from_uri(str(tmp_path)), "qdrant", "docs-v1.abc123")
    assert p.done() == set()
    for shard in (0, 7, 42):
        assert p.mark(shard, rows=100, seconds=0.5) > 0
    assert p.done() == {0, 7, 42}
    rec = p.record(42)
    assert (rec["shard"], rec["rows"], rec["seconds"]) == (42, 100, 0.5) and ":" in rec["worker"]
    assert p.record(3) is None
    files = sorted(f.name for f in (tmp_path / "_index" / "qdrant" / "docs-v1.abc123").iterdir() if f.is_file())
    assert files == ["0000000000.json", "0000000007.json", "0000000042.json"]
    # Another build's records are not this one's.
    assert Progress(Location.from_uri(str(tmp_path)), "qdrant", "docs-v1.other").done() == set()
    assert p.clear() == 3 and p.done() == set()


def test_bytes_per_mark_do_not_grow_with_the_number_of_shards(tmp_path):
    """The first 500 marks and 500 marks of a 100,000-shard build write the same bytes, but for the digits
    of the shard number; nothing is rewritten (one file per shard, each written once)."""
    p = Progress(Location.from_uri(str(tmp_path)), "faiss", "v3")
    early = [p.mark(shard, rows=10_000, seconds=1.25) for shard in range(500)]
    late = [p.mark(shard, rows=10_000, seconds=1.25) for shard in range(99_500, 100_000)]
    assert max(early + late) < 200
    assert max(late) - max(early) <= len("99999") - len("499")  # the digits, nothing that grows with the count
    folder = tmp_path / "_index" / "faiss" / "v3"
    on_disk = {int(f.stem): f.stat().st_size for f in folder.glob("*.json")}
    assert len(on_disk) == 1_000 and on_disk[499] == early[-1] and on_disk[99_999] == late[-1]
    assert not any((folder / "_tmp").iterdir())  # no temporary file left behind
    assert len(p.done()) == 1_000


def test_a_damaged_record_is_named_in_one_line(tmp_path):
    from reembed.errors import ManifestError

    p = Progress(Location.from_uri(str(tmp_path)), "qdrant", "b1")
    p.mark(5, rows=1)
    (tmp_path / "_index" / "qdrant" / "b1" / "0000000005.json").write_text("{not json")
    with pytest.raises(ManifestError, match=r"0000000005\.json: not a progress record .*rerun `reembed index`"):
        p.record(5)
    assert p.done() == {5}  # listing alone still counts it: the name is the promise


@pytest.mark.parametrize("bad", ["", "..", "a/b", "v 1"])
def test_a_build_name_must_be_plain(tmp_path, bad):
    with pytest.raises(ValueError, match="plain name"):
        Progress(Location.from_uri(str(tmp_path)), "qdrant", bad)


@pytest.mark.s3
def test_on_s3_a_second_mark_keeps_the_first_record(s3_env):
    bucket = new_bucket(s3_env)
    loc = Location.from_uri(f"s3://{bucket}/out")
    p = Progress(loc, "qdrant", "docs-v2.b")
    first = p.mark(9, rows=10)
    assert first > 0 and p.mark(9, rows=999) == 0  # create-only: the record already there stands
    assert p.record(9)["rows"] == 10 and p.done() == {9}
    assert json.loads(loc.read_bytes("_index/qdrant/docs-v2.b/0000000009.json"))["shard"] == 9
