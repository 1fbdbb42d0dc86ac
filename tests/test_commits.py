"""The commit log (reembed.commits): O(1) commits at any size, epoch fencing, lost answers, checkpoint parts,
compaction, crashes mid-checkpoint; on local disk and on a real S3 server (moto)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from s3_fixtures import fault_proxy, moto_server, new_bucket, s3_env, s3_user  # noqa: F401 (fixtures)
from reembed.commits import CommitLog, read_state
from reembed.errors import ConcurrentWriteError, ManifestError
from reembed.storage import Location

SRC = str(Path(__file__).resolve().parents[1] / "src")


def record(shard: int, rows: int = 10) -> dict:
    """A small shard record shaped like the pipeline's (a few hundred bytes of JSON)."""
    dead = shard % 3
    return {"rows": rows, "dead_letters": dead, "reasons": {"too_long": dead} if dead else {},
            "truncated": shard % 2, "tokens": 100 * rows, "bytes": 1000 + shard, "device_seconds": 0.25,
            "sha256": f"{shard:064x}", "path": f"shards/part-{shard:05d}.parquet",
            "dead_letter_path": f"dead_letter/part-{shard:05d}.parquet" if dead else None}


def expected_totals(records: dict[int, dict]) -> dict:
    reasons: dict[str, int] = {}
    for rec in records.values():
        for k, v in rec["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    return {"embedded": sum(r["rows"] for r in records.values()),
            "dead_lettered": sum(r["dead_letters"] for r in records.values()), "reasons": reasons,
            "truncated": sum(r["truncated"] for r in records.values()),
            "tokens": sum(r["tokens"] for r in records.values()),
            "bytes": sum(r["bytes"] for r in records.values()),
            "device_seconds": pytest.approx(sum(r["device_seconds"] for r in records.values())),
            "reused": sum(r.get("reused", 0) for r in records.values()),
            "deduplicated": sum(r.get("deduplicated", 0) for r in records.values())}


def assert_state(loc: Location, records: dict[int, dict], runs: list[dict] = ()) -> None:
    state = read_state(loc)
    assert state.shards.tolist() == sorted(records)
    assert len(state) == len(records)
    assert dict(state.iter_records()) == records
    assert state.totals == expected_totals(records)
    assert state.runs == list(runs)


def entry_path(loc: Location, seq: int) -> Path:
    return Path(loc.path("_log", f"{seq:012d}.json"))


# -- cost ---------------------------------------------------------------------------------------------


def test_ten_thousand_commits_each_cost_the_same_and_reopen_reads_only_the_tail(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc)  # one part per 1,000 entries
    costs, records = [], {}
    for shard in range(10_000):
        records[shard] = record(shard)
        clog.commit(shard, records[shard])
        costs.append(clog.last_write)
    clog.record_run({"wall_seconds": 12.5})

    # Every commit is one create-only entry, plus one part on every 1,000th: nothing grows with the log.
    assert {c.requests for c in costs} == {1, 2}
    assert sum(c.requests == 2 for c in costs) == 10
    entry = [c.bytes for c in costs if c.requests == 1]
    assert max(entry[-100:]) < 2 * min(entry[:100])
    # Amortized (entries and the part of each 1,000-entry window), the first and the last window cost the same.
    first, last = sum(c.bytes for c in costs[:1000]), sum(c.bytes for c in costs[-1000:])
    assert 0.5 < last / first < 2
    assert max(c.bytes for c in costs) < 400 * 1000  # one part of 1,000 rows: bounded by K, not by N

    # Reopened, the state is what was committed; the checkpoint parts cover entries 0..9999, so deleting
    # those entries changes nothing: reading the state never reads entries a part covers.
    assert_state(loc, records, [{"wall_seconds": 12.5}])
    for seq in range(10_000):
        entry_path(loc, seq).unlink()
    assert_state(loc, records, [{"wall_seconds": 12.5}])
    reopened = CommitLog.open(loc)
    assert reopened.next_seq == 10_002 and reopened.latest_epoch == 1


def test_a_recommitted_shard_counts_once_with_its_last_record(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc, checkpoint_every=4)
    records = {s: record(s) for s in range(6)}
    for s, rec in records.items():
        clog.commit(s, rec)
    records[1] = record(1, rows=99)  # in a later part than its first commit
    records[5] = record(5, rows=77)  # in the tail, after its first commit in a part
    clog.commit(1, records[1])
    clog.commit(5, records[5])
    assert_state(loc, records)


def test_checkpoint_parts_written_before_the_reuse_counts_read_them_as_zero(tmp_path):
    import pyarrow.parquet as pq

    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc, checkpoint_every=4)
    records = {s: {**record(s), "reused": s, "deduplicated": 1} for s in range(6)}
    for s, rec in records.items():
        clog.commit(s, rec)
    assert read_state(loc).totals["reused"] == 15 and read_state(loc).totals["deduplicated"] == 6
    parted: set[int] = set()
    for part in (tmp_path / "out" / "_log" / "_checkpoints").glob("*.parquet"):  # as an older reembed wrote them
        t = pq.read_table(part)
        parted.update(x for x in t.column("shard").to_pylist() if x is not None)
        pq.write_table(t.drop_columns(["reused", "deduplicated"]).replace_schema_metadata(t.schema.metadata), part)
    assert parted and parted < set(records)
    totals = read_state(loc).totals  # the checkpointed shards count 0, those in the tail their records
    tail = set(records) - parted
    assert totals["reused"] == sum(tail) and totals["deduplicated"] == len(tail)
    assert totals["embedded"] == sum(r["rows"] for r in records.values())


def test_a_retracted_shard_leaves_the_committed_set_until_it_is_committed_again(tmp_path):
    """``reembed repair``'s retract entries: wherever the commit they name lies (a part, the tail, the same
    window), through checkpoints and compaction; a stale retract (the shard was committed again since) and a
    fenced one change nothing."""
    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc, checkpoint_every=4)
    seqs = {s: clog.commit(s, record(s)) for s in range(8)}
    records = {s: record(s) for s in range(8)}
    old_3 = seqs[3]
    records[3] = record(3, rows=33)
    clog.commit(3, records[3])  # committed again: a retract naming its first commit is stale
    clog.retract(1, seqs[1], "sha256", "shards/part-00001.parquet: sha256 mismatch")  # its commit is in a part
    clog.retract(6, seqs[6], "missing", "shards/part-00006.parquet: missing")  # its commit is in the same window
    clog.retract(3, old_3, "missing", "stale")
    del records[1], records[6]
    assert_state(loc, records)
    state = read_state(loc)
    assert sorted(state.damaged) == [1, 6] and state.damaged[1]["reason"] == "sha256"
    assert state.seq_of(1) == -1 and state.seq_of(3) > old_3

    # A fenced job's retract lands after a claim: ignored.
    other = CommitLog.open(loc, checkpoint_every=4)
    other.claim()
    with pytest.raises(ConcurrentWriteError, match="without committing the retraction of shard 5"):
        clog.retract(5, seqs[5], "missing", "fenced")
    for s in range(8, 13):  # more parts: the retracts are read back from checkpoint parts now
        records[s] = record(s)
        other.commit(s, records[s])
    assert_state(loc, records)
    assert sorted(read_state(loc).damaged) == [1, 6]

    records[1] = record(1, rows=11)  # repaired: committed again
    other.commit(1, records[1])
    assert_state(loc, records)
    assert sorted(read_state(loc).damaged) == [6]
    other.compact()
    assert_state(loc, records)
    assert sorted(read_state(loc).damaged) == [6]
    reopened = CommitLog.open(loc, checkpoint_every=4)
    assert reopened.next_seq == other.next_seq
    reopened.claim()
    records[6] = record(6)
    reopened.commit(6, records[6])
    assert_state(loc, records)
    assert read_state(loc).damaged == {}


# -- fencing ------------------------------------------------------------------------------------------


def test_a_claim_fences_the_older_job_even_if_its_late_entry_lands(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    a = CommitLog.create(loc, checkpoint_every=5)
    a.commit(0, record(0))
    a.commit(1, record(1))
    b = CommitLog.open(loc, checkpoint_every=5)
    assert b.epoch is None and b.claim() == 2
    with pytest.raises(ConcurrentWriteError, match=r"_log/000000000003\.json: another job has taken over this "
                                                   r"output \(epoch 2, this job holds 1\).*without committing shard 2"):
        a.commit(2, record(2))
    assert 2 not in read_state(loc)
    with pytest.raises(ConcurrentWriteError, match=r"000000000003\.json: another job has taken over"):
        a.check_current()
    b.check_current()

    # A store that let A's entry land after B's claim (A skipping the claim it never read) changes nothing:
    # replay ignores a commit whose epoch is below the latest claim.
    late = {"seq": b.next_seq, "kind": "commit", "epoch": 1, "at": "2026-01-01T00:00:00+00:00",
            "writer": a.writer, "shard": 70, "record": record(70)}
    entry_path(loc, late["seq"]).write_text(json.dumps(late))
    state = read_state(loc)
    assert 70 not in state and state.ignored == 1 and state.epoch == 2
    # B meets that entry at its next seq, moves past it, and commits; the late entry stays ignored once
    # checkpoint parts cover it too.
    b.commit(3, record(3))
    assert b.last_write.requests >= 2 and b.next_seq == late["seq"] + 2
    for s in range(4, 10):
        b.commit(s, record(s))
    state = read_state(loc)
    assert state.shards.tolist() == [0, 1, 3, 4, 5, 6, 7, 8, 9] and state.ignored == 0  # a part covers it now
    assert_state(loc, {s: record(s) for s in (0, 1, 3, 4, 5, 6, 7, 8, 9)})


def test_a_claim_racing_a_committing_job_keeps_exactly_what_it_was_told_is_committed(tmp_path):
    import threading

    loc = Location.from_uri(str(tmp_path / "out"))
    a = CommitLog.create(loc, checkpoint_every=50)
    told, refused = [], []

    def job_a() -> None:
        for s in range(20_000):  # stops at the claim, long before the end
            try:
                a.commit(s, record(s))
            except ConcurrentWriteError:
                refused.append(s)
                return
            told.append(s)

    thread = threading.Thread(target=job_a)
    thread.start()
    while len(told) < 200:
        thread.join(0.001)
    b = CommitLog.open(loc, checkpoint_every=50)
    b.claim()  # races A's next commits: whichever lands first at a seq wins it
    thread.join(60)
    assert refused and told == list(range(len(told)))
    # Every commit A was told succeeded is in the state, and nothing else.
    assert_state(loc, {s: record(s) for s in told})
    b.commit(9999, record(9999))
    assert read_state(loc).shards.tolist() == [*told, 9999]


def test_two_claims_at_the_same_moment_one_fails(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    CommitLog.create(loc)
    b, c = CommitLog.open(loc), CommitLog.open(loc)
    assert b.claim() == 2
    with pytest.raises(ConcurrentWriteError, match="another job claimed this output at the same moment"):
        c.claim()
    with pytest.raises(ManifestError, match="has not claimed the output"):
        c.commit(0, record(0))
    # The fenced job's own claim goes after commits of the current holder (they precede the claim).
    b.commit(0, record(0))
    d = CommitLog.open(loc)
    b.commit(1, record(1))
    assert d.claim() == 3
    assert read_state(loc).shards.tolist() == [0, 1] and read_state(loc).epoch == 3
    with pytest.raises(ConcurrentWriteError):
        b.commit(2, record(2))


def test_a_second_create_is_refused(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    assert CommitLog.open(loc) is None
    CommitLog.create(loc).commit(0, record(0))
    with pytest.raises(ConcurrentWriteError, match=r"000000000000\.json: a commit log was created here by another job"):
        CommitLog.create(loc)
    assert_state(loc, {0: record(0)})


# -- lost answers -------------------------------------------------------------------------------------


def test_a_retry_that_meets_its_own_entry_is_not_a_conflict(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc)
    clog.commit(0, record(0))
    # The first attempt at shard 1 landed but the writer never learned it: the same entry is at its seq.
    seq = clog.next_seq
    landed = {"seq": seq, "kind": "commit", "epoch": 1, "at": "2026-01-01T00:00:00.000+00:00",
              "writer": clog.writer, "shard": 1, "record": record(1)}
    entry_path(loc, seq).write_text(json.dumps(landed))
    assert clog.commit(1, record(1)) == seq
    assert clog.next_seq == seq + 1
    # ... whereas an entry of another writer at its seq is someone else's: this one goes after it.
    theirs = {**landed, "seq": clog.next_seq, "writer": "someone-else", "shard": 2, "record": record(2)}
    entry_path(loc, theirs["seq"]).write_text(json.dumps(theirs))
    assert clog.commit(3, record(3)) == theirs["seq"] + 1
    assert_state(loc, {s: record(s) for s in range(4)})


def test_bad_input_gets_one_line_naming_the_file(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc)
    with pytest.raises(ManifestError, match=r"shard -1 is not a shard number"):
        clog.commit(-1, record(0))
    with pytest.raises(ManifestError, match=r"shard '3' is not a shard number"):
        clog.commit("3", record(0))
    entry_path(loc, 1).write_text("{not json")
    with pytest.raises(ManifestError, match=r"_log/000000000001\.json: not a commit-log entry"):
        read_state(loc)


# -- checkpoints, crashes, compaction -----------------------------------------------------------------


CRASH_IN_CHECKPOINT = """
import os, sys
from reembed import storage
from reembed.commits import CommitLog

def crash(self, data, *parts, **kw):
    # publish's first step (the part under a temporary name in _tmp/), then the process dies
    tmp = self.path(*parts[:-1], "_tmp", parts[-1] + ".4f2a")
    self.fs.create_dir(os.path.dirname(tmp), recursive=True)
    with self.fs.open_output_stream(tmp) as f:
        f.write(data[: len(data) // 2])
    os._exit(17)

loc = storage.Location.from_uri(sys.argv[1])
clog = CommitLog.create(loc, checkpoint_every=10)
for s in range(18):
    clog.commit(s, {"rows": s, "dead_letters": 0})  # entries 1..18; entries 0..9 are in the first part
storage.Location.publish = crash
clog.commit(18, {"rows": 18, "dead_letters": 0})  # entry 19: the second part, 10..19, crashes
"""


def test_a_crash_mid_checkpoint_leaves_the_state_correct(tmp_path):
    out = tmp_path / "out"
    script = tmp_path / "crash.py"
    script.write_text(textwrap.dedent(CRASH_IN_CHECKPOINT))
    proc = subprocess.run([sys.executable, str(script), str(out)], env={**os.environ, "PYTHONPATH": SRC},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 17, proc.stderr
    parts = sorted(p.name for p in (out / "_log" / "_checkpoints").iterdir())
    assert parts == ["000000000000-000000000009.parquet", "_tmp"]
    assert [p.name for p in (out / "_log" / "_checkpoints" / "_tmp").iterdir()] == [
        "000000000010-000000000019.parquet.4f2a"]
    committed = {s: {"rows": s, "dead_letters": 0} for s in range(19)}
    loc = Location.from_uri(str(out))
    state = read_state(loc)
    assert dict(state.iter_records()) == committed and state.last_seq == 19

    # The next job reads entries 10..19 from the log; its claim (entry 20) writes the part the crash lost.
    clog = CommitLog.open(loc, checkpoint_every=10)
    assert clog.claim() == 2
    assert clog.last_write.requests == 2
    assert "000000000010-000000000020.parquet" in os.listdir(out / "_log" / "_checkpoints")
    clog.commit(19, {"rows": 19, "dead_letters": 0})
    committed[19] = {"rows": 19, "dead_letters": 0}
    assert dict(read_state(loc).iter_records()) == committed


def test_compaction_supersedes_parts_and_later_parts_still_chain(tmp_path):
    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc, checkpoint_every=10)
    records = {}
    for s in range(35):
        records[s] = record(s)
        clog.commit(s, records[s])
    clog.record_run({"n": 1})
    records[3] = record(3, rows=1)
    clog.commit(3, records[3])
    other = CommitLog.open(loc, checkpoint_every=10)
    assert other.claim() == 2
    removed = other.compact()
    assert removed == 3
    parts = sorted(os.listdir(loc.path("_log", "_checkpoints")))
    assert parts == ["000000000000-000000000038.parquet", "_tmp"]
    assert_state(loc, records, [{"n": 1}])
    assert read_state(loc).epoch == 2
    # The older writer is fenced; the new one keeps checkpointing after the compacted part.
    with pytest.raises(ConcurrentWriteError):
        clog.commit(99, record(99))
    for s in range(35, 60):
        records[s] = record(s)
        other.commit(s, records[s])
    other.record_run({"n": 2})
    parts = sorted(os.listdir(loc.path("_log", "_checkpoints")))
    assert parts[0] == "000000000000-000000000038.parquet" and len(parts) == 4
    assert_state(loc, records, [{"n": 1}, {"n": 2}])
    # Compaction by another process while a writer is mid-window: the writer's next part overlaps the
    # compacted one, and the chain applies only its rows past the compacted part (the run once).
    assert CommitLog.open(loc, checkpoint_every=10).compact() == 3
    other.record_run({"n": 3})
    for s in range(60, 75):
        records[s] = record(s)
        other.commit(s, records[s])
    parts = sorted(os.listdir(loc.path("_log", "_checkpoints")))
    assert parts == ["000000000000-000000000064.parquet", "000000000059-000000000068.parquet",
                     "000000000069-000000000078.parquet", "_tmp"]
    assert_state(loc, records, [{"n": 1}, {"n": 2}, {"n": 3}])


# -- S3 -----------------------------------------------------------------------------------------------


@pytest.mark.s3
def test_on_s3_entries_are_create_only_and_claims_fence(s3_env, fault_proxy, monkeypatch):
    bucket = new_bucket(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    loc = Location.from_uri(f"s3://{bucket}/out")
    assert CommitLog.open(loc) is None
    a = CommitLog.create(loc, checkpoint_every=5)
    with pytest.raises(ConcurrentWriteError, match="a commit log was created here by another job"):
        CommitLog.create(loc)
    records = {s: record(s) for s in range(7)}
    for s in range(6):
        a.commit(s, records[s])
    # The PUT of entry 7 lands but its answer is lost (a 500): the retry meets its own entry (412), which
    # is not a conflict, and the commit counts once.
    fault_proxy.add("PUT", r"/out/_log/000000000007\.json", times=1, status=500, code="InternalError",
                    after_forward=True)
    assert a.commit(6, records[6]) == 7
    assert fault_proxy.count("PUT", r"/out/_log/000000000007\.json") == 2
    assert a.next_seq == 8

    b = CommitLog.open(loc, checkpoint_every=5)
    assert b.next_seq == 8 and b.claim() == 2
    with pytest.raises(ConcurrentWriteError, match=r"000000000008\.json: another job has taken over this output"):
        a.commit(7, record(7))
    b.commit(8, record(8))
    records[8] = record(8)
    # A late entry of the fenced job, landing after the claim, is ignored.
    late = {"seq": b.next_seq, "kind": "commit", "epoch": 1, "at": "x", "writer": a.writer, "shard": 9,
            "record": record(9)}
    loc.write_if(json.dumps(late).encode(), "_log", f"{late['seq']:012d}.json", version=None)
    b.commit(10, record(10))
    records[10] = record(10)
    parts = [p.path.rsplit("/", 1)[1] for p in loc.list("_log", "_checkpoints")]
    assert parts == ["000000000000-000000000004.parquet", "000000000005-000000000009.parquet"]
    assert_state(loc, records)
    assert read_state(loc).ignored == 1


def test_a_part_that_cannot_be_written_does_not_fail_the_commit(tmp_path, caplog):
    loc = Location.from_uri(str(tmp_path / "out"))
    clog = CommitLog.create(loc, checkpoint_every=10)
    blocker = Path(loc.path("_log", "_checkpoints", "_tmp"))
    blocker.parent.mkdir(parents=True)
    blocker.write_text("in the way")  # a file where publish needs its temporary folder
    records = {}
    for s in range(15):
        records[s] = record(s)
        clog.commit(s, records[s])
    assert "checkpoint part 000000000000-000000000009.parquet not written" in caplog.text
    assert_state(loc, records)  # from the entries
    blocker.unlink()
    while not list(blocker.parent.glob("*.parquet")):
        s += 1
        records[s] = record(s)
        clog.commit(s, records[s])
    assert s == 15  # retried a tenth of a window (one entry) later; the part covers every entry so far
    assert [p.name for p in blocker.parent.glob("*.parquet")] == ["000000000000-000000000016.parquet"]
    assert_state(loc, records)


@pytest.mark.s3
def test_on_s3_reading_the_state_lists_only_the_parts_and_reads_only_the_tail(s3_env, fault_proxy, monkeypatch):
    bucket = new_bucket(s3_env)
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", fault_proxy.endpoint)
    loc = Location.from_uri(f"s3://{bucket}/out")
    clog = CommitLog.create(loc, checkpoint_every=100)
    records = {s: record(s) for s in range(180)}
    for s, rec in records.items():
        clog.commit(s, rec)
    fault_proxy.clear()
    assert_state(loc, records)
    lists = [s.path for s in fault_proxy.seen if s.method == "GET" and "list-type=2" in s.path]
    assert lists and all("prefix=out%2F_log%2F_checkpoints%2F" in p for p in lists)  # never the entries
    entry_gets = fault_proxy.count("GET", r"/out/_log/\d{12}\.json")
    assert 81 <= entry_gets <= 81 + 64  # entries 100..180, then one batch that finds the end
    assert fault_proxy.count("GET", r"/out/_log/0000000000\d\d\.json") == 0  # covered by the part
