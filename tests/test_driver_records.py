"""The commands that fan out over the committed shards (index: FAISS and Qdrant, publish, validate, reuse,
repair) send their tasks shard numbers and commit seqs (:class:`reembed.manifest.ShardRefs`), never the
records: at 2,500 committed shards the scheduling process parses no commit record and sends a few bytes a
shard, and what the tasks read back from the commit log is exactly the committed records.

Each test runs a command's scheduling side for real with every way of reading a record refused, stops it
where it hands the work to its tasks, then (refusal lifted) reads the records the way the tasks do."""

from __future__ import annotations

import contextlib
import hashlib
import pickle
import random

import numpy as np
import pytest

from reembed import commits
from reembed.commits import State
from reembed.manifest import Manifest, ShardRefs, shard_name
from reembed.storage import Location

SHARDS = 2_500  # two and a half checkpoint parts: parts plus a tail of plain entries
BYTES_PER_SHARD = 64  # what the tasks' arguments may cost per shard (three int64 arrays: 24 bytes)


class Handed(Exception):
    """Raised where a command hands its shards to its tasks: the test stops it there."""


def _record(shard: int, rows: int) -> dict:
    return {"path": f"shards/{shard_name(shard)}", "rows": rows, "bytes": 1000 + shard, "sha256": f"{shard:064x}",
            "truncated": 0, "tokens": 3 * rows, "device_seconds": 0.0, "dead_letters": 0, "reasons": {}}


@pytest.fixture(scope="module")
def many(tmp_path_factory) -> Location:
    """An output of SHARDS committed shards (no shard files), committed in a shuffled order, a few twice."""
    loc = Location.from_uri(str(tmp_path_factory.mktemp("many")))
    model = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "pooling": "cls", "dtype": "float32",
             "max_seq_length": 8, "fingerprint": hashlib.sha256(b"m").hexdigest()[:16]}
    plan = {"input_uri": "synthetic", "id_column": "id", "text_column": "text", "passthrough": ["text"],
            "shard_rows": 7, "rows": 7 * SHARDS, "shards": SHARDS}
    m = Manifest.create(loc, model, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    order = list(range(SHARDS))
    random.Random(13).shuffle(order)
    for shard in order + order[:5]:  # the last five again: their second commit is the effective one
        m.commit_shard(shard, _record(shard, 1 + shard % 7))
    return loc


@pytest.fixture(scope="module")
def expected(many) -> list[tuple[int, dict]]:
    return sorted(Manifest.load(many).committed.items())


@contextlib.contextmanager
def no_record_read():
    """Every way of reading a commit record fails while inside."""
    mp = pytest.MonkeyPatch()

    def refuse(*args, **kwargs):
        raise AssertionError("a commit record was read by the scheduling process")

    try:
        for name in ("iter_commits", "record"):
            mp.setattr(State, name, refuse)
        mp.setattr(commits, "read_records", refuse)
        yield
    finally:
        mp.undo()


def read_as_tasks(loc: Location, shares) -> list[tuple[int, dict]]:
    """The records the tasks read for their ``shares`` (ShardRefs), in shard order."""
    return sorted(pair for share in shares for pair in share.records(loc))


def _small(obj, shards: int = SHARDS) -> None:
    size = len(pickle.dumps(obj))
    assert size < BYTES_PER_SHARD * shards, f"{size} bytes of task arguments for {shards} shards"


# -- index -----------------------------------------------------------------------------------------------


def test_index_faiss_groups_carry_shard_refs_and_read_their_records_in_the_task(many, expected, monkeypatch):
    from reembed.config import IndexConfig
    from reembed.indexes import build as stage
    from reembed.indexes import faiss_dist as D

    handed = {}

    def capture(loc, shards, plan, version, **kw):
        handed["groups"] = D.groups_of(shards, group_rows=200)  # what build_ivf sends its tasks
        raise Handed

    monkeypatch.setattr(D, "build_ivf", capture)
    with no_record_read(), pytest.raises(Handed):
        stage.run_faiss(many, IndexConfig(faiss="ivf", qdrant="none"))
    groups = handed["groups"]
    assert all(isinstance(g.shards, ShardRefs) for g in groups) and len(groups) > 16
    assert [g.offset for g in groups] == list(np.cumsum([0] + [g.rows for g in groups])[:-1])
    _small(groups)
    assert [pair for g in groups for pair in g.records(many)] == expected  # in shard order, group by group


def test_index_qdrant_writers_carry_shard_refs_and_sums_come_from_the_arrays(many, expected, tmp_path, monkeypatch):
    from reembed.config import IndexConfig
    from reembed.indexes import build as stage

    handed = {}

    def capture(job, client, todo, rows):
        handed.update(todo=todo, rows=rows)
        raise Handed

    monkeypatch.setattr(stage, "_load_embedded", capture)
    with no_record_read(), pytest.raises(Handed):
        stage.run_qdrant(many, IndexConfig(faiss="none", qdrant=str(tmp_path / "q")), str(tmp_path / "q"))
    todo = handed["todo"]
    assert isinstance(todo, ShardRefs) and len(todo) == SHARDS
    assert handed["rows"] == int(todo.rows.sum()) == sum(rec["rows"] for _, rec in expected)
    shares = [todo[i::3] for i in range(3)]  # the server path's round-robin shares
    _small(shares)
    assert read_as_tasks(many, shares) == expected


# -- publish ---------------------------------------------------------------------------------------------


def test_publish_writers_carry_shard_refs(many, expected, tmp_path, monkeypatch):
    pytest.importorskip("chromadb")
    from reembed.migrate import sinks

    handed = {}

    def capture(self, loc, items, store=None):
        handed["items"] = items
        raise Handed

    monkeypatch.setattr(sinks.SinkWrite, "write", capture)
    with no_record_read(), pytest.raises(Handed):
        sinks.publish(many, f"chroma://{tmp_path / 'chroma'}?collection=docs", use_ray=False)
    items = handed["items"]
    assert isinstance(items, ShardRefs) and len(items) == SHARDS
    from reembed.repair import _batches

    shares = list(_batches(items, 64))  # how map_shards and the single writer cut it
    _small(shares)
    assert read_as_tasks(many, shares) == expected


# -- validate --------------------------------------------------------------------------------------------


def _capture_map_shards(handed: dict):
    def fake(fn, loc, items, *args, total, **kw):
        from reembed.repair import _batches

        handed.setdefault("calls", []).append((fn.__name__, items, args, total))
        assert isinstance(items, ShardRefs), f"{fn.__name__} was handed {type(items).__name__}"
        handed.setdefault("batches", []).append(list(_batches(items, 64)))
        raise Handed

    return fake


def test_validate_scans_samples_and_relabels_from_shard_refs(many, expected, monkeypatch):
    from reembed import validation as V
    from reembed.validation import integrity, queries

    handed: dict = {}
    fake = _capture_map_shards(handed)
    for module in (V, integrity):
        monkeypatch.setattr(module, "map_shards", fake)
    monkeypatch.setattr("reembed.repair.map_shards", fake)  # queries.ids_by_field imports it when called
    with no_record_read():
        m = Manifest.load(many)
        shards, rows = integrity.committed_rows(m)
        positions = np.sort(np.random.default_rng(0).choice(int(rows.sum()), 50, replace=False))
        with pytest.raises(Handed):
            V._sample(many, m, shards, rows, positions, integrity.SampleJob(4), {"workers": 0})
        with pytest.raises(Handed):  # the one pass over every shard (and the old side's, another output)
            integrity.OldSide(loc=many, manifest=m).knn(np.ones((2, 4), np.float32), 3)
        with pytest.raises(Handed):
            queries.ids_by_field(many, "text", {"x"})
    (sample_fn, sampled, (job, want), _), (scan_fn, scanned, _, total), (ids_fn, all_refs, _, _) = handed["calls"]
    assert (sample_fn, scan_fn, ids_fn) == ("sample_batch", "scan_batch", "_ids_batch")
    assert sampled.shards.tolist() == sorted(want) and len(sampled) <= 51 and total == len(scanned) == SHARDS
    for batches in handed["batches"]:
        _small(batches)
    assert read_as_tasks(many, handed["batches"][1]) == read_as_tasks(many, handed["batches"][2]) == expected
    assert read_as_tasks(many, handed["batches"][0]) == [p for p in expected if p[0] in want]


# -- reuse -----------------------------------------------------------------------------------------------


def test_reuse_key_tasks_over_the_earlier_output_carry_shard_refs(many, expected, tmp_path, monkeypatch):
    from reembed import reuse

    handed = {}

    def fake_run_tasks(fn, argsets, use_ray, num_cpus=0.5):
        handed[fn.__name__] = argsets
        if fn.__name__ == "join_partition":
            return [{"reusable": 0, "changed": 0, "gone": 0} for _ in argsets]
        return [() for _ in argsets]

    monkeypatch.setattr(reuse, "run_tasks", fake_run_tasks)
    work = Location.from_uri(str(tmp_path / "plan"))
    with no_record_read():
        old = Manifest.load(many)
        summary = reuse.plan_reuse(many, old, {"rows": 10, "shards": SHARDS}, work, read_shards=None)
    assert summary["old_rows"] == sum(rec["rows"] for _, rec in expected)
    groups = [args[2] for args in handed["old_keys"]]
    assert all(isinstance(g, ShardRefs) for g in groups)
    assert all(isinstance(args[2], range) for args in handed["new_keys"])  # NEW's shards as ranges
    _small(groups)
    assert read_as_tasks(many, groups) == expected


# -- repair ----------------------------------------------------------------------------------------------


def test_repair_check_tasks_carry_shard_refs(many, expected, monkeypatch):
    from reembed import repair as R

    handed = {}

    def fake(fn, loc, items, *args, total, **kw):
        assert isinstance(items, ShardRefs) and total == len(items)
        handed["batches"] = list(R._batches(items, 64))
        return iter([{"checked": len(b), "damaged": []} for b in handed["batches"]])

    monkeypatch.setattr(R, "map_shards", fake)
    with no_record_read():
        summary = R.repair(many, check_only=True, workers=0)
    assert summary["checked"] == SHARDS and summary["retracted"] == 0 and summary["complete"]
    _small(handed["batches"])
    assert read_as_tasks(many, handed["batches"]) == expected
    assert [seq for b in handed["batches"] for seq in b.seqs.tolist()] == \
        Manifest.load(many).state().seqs_of(np.arange(SHARDS)).tolist()


# -- the reader ------------------------------------------------------------------------------------------


def test_records_are_read_through_parts_compaction_and_recommits_and_a_wrong_seq_is_one_clear_error(tmp_path):
    from reembed.errors import ManifestError

    loc = Location.from_uri(str(tmp_path / "out"))
    model = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "pooling": "cls", "dtype": "float32",
             "max_seq_length": 8, "fingerprint": "f" * 16}
    plan = {"input_uri": "s", "id_column": "id", "text_column": "text", "passthrough": [], "shard_rows": 7,
            "rows": 7 * 30, "shards": 30}
    m = Manifest.create(loc, model, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    log = m.commit_log
    log.checkpoint_every = log._part_due = 8  # parts of 8 entries, then a tail
    for shard in reversed(range(30)):
        m.commit_shard(shard, _record(shard, 2))
    refs = Manifest.load(loc).refs()
    want = sorted(Manifest.load(loc).committed.items())
    assert list(refs.records(loc)) == want
    m.commit_shard(4, _record(4, 3))  # shard 4 committed again after the refs were taken
    commits.CommitLog.open(loc).compact()  # one part holds the effective commits only
    assert list(refs.records(loc)) == want  # the refs still read the commits they name (from their entries)
    assert list(Manifest.load(loc).refs().records(loc))[4][1]["rows"] == 3
    wrong = ShardRefs(np.array([4, 5]), np.array([0, 1]), np.array([2, 2]))  # seq 0 is the claim, 1 shard 29's
    with pytest.raises(ManifestError, match=r"000000000000.json: no commit of shard 4 at seq 0; the commit log"):
        list(wrong.records(loc))
