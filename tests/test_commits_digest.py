"""What `reembed index` and `validate` need of the committed set (pending shards, rows, the inputs key, the
validation report's shards digest) comes from the commit log's arrays: no commit record is parsed, at any
number of shards."""

from __future__ import annotations

import hashlib

import pytest

from reembed.commits import CommitLog, State
from reembed.indexes.build import inputs_key, rows_of
from reembed.manifest import Manifest, shard_name
from reembed.storage import Location
from reembed.validation import shards_digest

SHARDS = 2_500  # two and a half checkpoint parts: parts plus a tail of plain entries
PLANNED = SHARDS + 3


def _record(shard: int, rows: int = 7) -> dict:
    return {"path": f"shards/{shard_name(shard)}", "rows": rows, "bytes": 1000 + shard, "sha256": f"{shard:064x}",
            "truncated": 0, "tokens": 0, "device_seconds": 0.0, "dead_letters": 0, "reasons": {}}


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Location:
    loc = Location.from_uri(str(tmp_path_factory.mktemp("many")))
    model = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "pooling": "cls", "dtype": "float32",
             "max_seq_length": 8, "fingerprint": hashlib.sha256(b"m").hexdigest()[:16]}
    plan = {"input_uri": "synthetic", "id_column": "id", "text_column": "text", "passthrough": [], "shard_rows": 7,
            "rows": 7 * PLANNED, "shards": PLANNED}
    m = Manifest.create(loc, model, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    for shard in range(SHARDS):
        m.commit_shard(shard, _record(shard))
    return loc


@pytest.fixture
def no_records(monkeypatch):
    """Reading the committed records back (the O(shards) path) fails the test."""
    monkeypatch.setattr(State, "iter_commits", _refuse)


def _refuse(self):
    raise AssertionError("a commit record was read")


def test_pending_rows_and_digests_read_no_commit_record(many, no_records):
    m = Manifest.load(many)
    assert m.pending() == [SHARDS, SHARDS + 1, SHARDS + 2] and not m.is_complete()
    assert rows_of(m) == 7 * SHARDS
    digest, key = shards_digest(m), inputs_key(m)
    assert len(digest) == 16 and len(key) == 16
    assert shards_digest(Manifest.load(many)) == digest and inputs_key(Manifest.load(many)) == key  # stable


def test_the_digest_follows_commits_and_retractions(many, monkeypatch):
    def digest() -> str:
        with monkeypatch.context() as mp:
            mp.setattr(State, "iter_commits", _refuse)
            return shards_digest(Manifest.load(many))

    before = digest()
    m = Manifest.load(many)
    m.claim()  # (a claim reads the records itself, to find leftovers)
    m.commit_shard(17, _record(17, rows=8))  # shard 17 re-embedded: another commit
    recommitted = digest()
    assert recommitted != before
    m.commit_shard(SHARDS, _record(SHARDS))  # a new shard
    added = digest()
    assert added not in (before, recommitted) and Manifest.load(many).pending() == [SHARDS + 1, SHARDS + 2]
    m.retract_shard(SHARDS, Manifest.load(many).state().seq_of(SHARDS), "sha256_mismatch", "test")
    assert digest() == recommitted and SHARDS in Manifest.load(many).pending()


def test_compaction_keeps_the_digest(many):  # (compaction itself reads the records: no refusal here)
    before = shards_digest(Manifest.load(many))
    CommitLog.open(many).compact()
    assert shards_digest(Manifest.load(many)) == before
