"""The manifest without Ray: its layout and paths are checked when it is loaded, the paths of committed
records when they are read back from the commit log, files are read on its word only inside the output and
against their sha256, a claim fences a second job and cleans up what killed attempts left (uncommitted
shards, temporary files, empty _tmp/ folders), and a commit writes the same few bytes at any size."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow as pa
import pytest

from conftest import embedded_rows
from s3_fixtures import moto_server, new_bucket, s3_env, s3_user  # noqa: F401 (fixtures)
from reembed import schema as S
from reembed.cli import main
from reembed.errors import ChecksumError, ConcurrentWriteError, ManifestError, StorageError
from reembed.manifest import Manifest, read_recorded, shard_name
from reembed.storage import Location
from reembed.write import read_shard_table, write_shard

SCHEMA = S.shard_schema(4, pa.schema([pa.field("lang", pa.string())]))
MODEL = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "pooling": "cls", "dtype": "float32",
         "max_seq_length": 16, "fingerprint": "f0"}


def make_output(folder: Path, shards: int = 3, commit: int = 2) -> Manifest:
    """An output of ``shards`` planned shards of 5 rows, the first ``commit`` written and committed."""
    loc = Location.from_uri(str(folder))
    plan = {"shards": [{"shard": i, "rows": 5, "segments": []} for i in range(shards)], "rows": 5 * shards}
    dups = b"no duplicates"
    loc.write_bytes(dups, "plan", "duplicates.parquet")
    import hashlib

    m = Manifest.create(loc, MODEL, plan, {"path": "plan/duplicates.parquet", "rows": 0,
                                           "sha256": hashlib.sha256(dups).hexdigest()})
    for i in range(commit):
        m.commit_shard(i, write_shard(loc, i, embedded_rows(i, 5), SCHEMA))
    return m


def edit(folder: Path, change) -> None:
    data = json.loads((folder / "manifest.json").read_text())
    change(data)
    (folder / "manifest.json").write_text(json.dumps(data))


def edit_record(folder: Path, shard: int, change) -> None:
    """Change the commit-log entry that committed ``shard`` (as a hand edit or a corruption would)."""
    for entry in sorted((folder / "_log").glob("*.json"), reverse=True):
        data = json.loads(entry.read_text())
        if data["kind"] == "commit" and data["shard"] == shard:
            change(data["record"])
            entry.write_text(json.dumps(data))
            return
    raise AssertionError(f"no commit entry for shard {shard}")


def records(folder: Path) -> list[dict]:
    """Every committed record of the output at ``folder``, read back (and so path-checked)."""
    return list(Manifest.load(Location.from_uri(str(folder))).committed.values())


def status_line(folder: Path, capsys) -> tuple[int, str]:
    """``reembed status`` in this process: exit code and stderr, which must be one line, no traceback."""
    rc = main(["status", str(folder)])
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return rc, err.strip()


HOSTILE = {
    "relative escape": "../../etc/passwd",
    "absolute path": "/etc/passwd",
    "another bucket": "s3://someone-elses-bucket/shards/part-00000.parquet",
    "escape after a folder": "shards/../../outside.parquet",
}


@pytest.mark.parametrize("path", HOSTILE.values(), ids=HOSTILE.keys())
def test_a_shard_path_outside_the_output_is_refused_in_one_line(tmp_path, capsys, path):
    out = tmp_path / "out"
    m = make_output(out)
    edit_record(out, 1, lambda r: r.update(path=path))
    with pytest.raises(ManifestError, match=r"shards.00001.path = .* points outside the output") as e:
        records(out)
    assert "\n" not in str(e.value) and path in str(e.value) and "--fresh" in str(e.value)
    with pytest.raises(ManifestError, match="points outside the output"):
        read_shard_table(m.loc, Manifest.load(m.loc).committed[1])


@pytest.mark.parametrize("key, change", [
    ("shards.00000.dead_letter_path", "record 0: dead_letter_path=/etc/shadow"),
    ("shards.00003.path", lambda d: d["shards"].update({"00003": {"rows": 1, "path": "/etc/x"}})),  # older layout
    ("duplicates.path", lambda d: d["duplicates"].update(path="../elsewhere/duplicates.parquet")),
    ("stages.index.faiss.ids_path", lambda d: d.update(stages={"index": {"faiss": {"ids_path": "/tmp/x"}}})),
])
def test_every_path_the_manifest_names_is_checked(tmp_path, key, change):
    out = tmp_path / "out"
    make_output(out)
    if isinstance(change, str):
        edit_record(out, 0, lambda r: r.update(dead_letter_path="/etc/shadow"))
    else:
        edit(out, change)
    with pytest.raises(ManifestError, match=key.replace(".", r"\.") + " = .* points outside the output"):
        records(out)


def test_a_symlink_out_of_the_output_is_refused(tmp_path):
    out = tmp_path / "out"
    m = make_output(out)
    secret = tmp_path / "secret.parquet"
    secret.write_bytes(b"not yours")
    (out / "shards" / "link.parquet").symlink_to(secret)
    edit_record(out, 1, lambda r: r.update(path="shards/link.parquet"))
    with pytest.raises(ManifestError, match="leads outside the output through a symbolic link"):
        records(out)


def test_files_are_read_on_the_manifests_word_only_with_a_matching_sha256(tmp_path):
    out = tmp_path / "out"
    m = make_output(out)
    loc = m.loc
    assert read_recorded(loc, m.data["duplicates"], "duplicates") == b"no duplicates"
    (out / "plan" / "duplicates.parquet").write_bytes(b"tampered")
    with pytest.raises(ChecksumError, match=r"duplicates.parquet: sha256 .* does not match duplicates.sha256"):
        read_recorded(loc, m.data["duplicates"], "duplicates")
    with pytest.raises(ManifestError, match="points outside the output"):
        read_shard_table(loc, {**m.committed[0], "path": str(out / "shards" / "part-00000.parquet")})
    with pytest.raises(ManifestError, match=r"shards.00009.path = '/etc/passwd'"):
        m.commit_shard(9, {**m.committed[0], "path": "/etc/passwd"})
    assert 9 not in Manifest.load(loc).committed


@pytest.mark.parametrize("content, words", [
    ("[1, 2, 3]", "expected a JSON object, found list"),
    ("{not json", "not valid JSON"),
    ('{"format": 1, "generation": 3}', "key 'model' is missing"),
    ('{"format": 7}', "unknown manifest format 7"),
    ("MISSING shards", "key 'shards' is missing"),
    ("shards is a list", "shards is list, expected dict"),
    ("record without path", "shards.00000.path is missing"),
])
def test_a_malformed_manifest_is_one_line(tmp_path, capsys, content, words):
    out = tmp_path / "out"
    make_output(out)
    if content == "MISSING shards":
        edit(out, lambda d: d.pop("shards"))
    elif content == "shards is a list":
        edit(out, lambda d: d.update(shards=[]))
    elif content == "record without path":
        edit(out, lambda d: d["shards"].update({"00000": {"rows": 5}}))  # a record of the older layout
    else:
        (out / "manifest.json").write_text(content)
    with pytest.raises(ManifestError, match=words):
        Manifest.load(Location.from_uri(str(out)))
    rc, line = status_line(out, capsys)
    assert rc == 1 and line.startswith("reembed: error: ") and words in line and "manifest.json" in line


def test_a_commit_after_another_job_claimed_is_refused_and_changes_nothing(tmp_path):
    out = tmp_path / "out"
    make_output(out, commit=1)
    loc = Location.from_uri(str(out))
    a, b = Manifest.load(loc), Manifest.load(loc)
    a.commit_shard(1, write_shard(loc, 1, embedded_rows(1, 5), SCHEMA))
    b.claim()
    before = (out / "manifest.json").read_bytes(), sorted(p.name for p in (out / "_log").iterdir())
    with pytest.raises(ConcurrentWriteError, match="another job has taken over this output"):
        a.commit_shard(2, write_shard(loc, 2, embedded_rows(2, 5), SCHEMA))
    assert ((out / "manifest.json").read_bytes(), sorted(p.name for p in (out / "_log").iterdir())) == before
    assert 2 not in a.committed and sorted(Manifest.load(loc).committed) == [0, 1]
    with pytest.raises(ConcurrentWriteError, match="another job has taken over"):
        a.check_current()
    b.check_current()
    with pytest.raises(ConcurrentWriteError, match="changed by another job"):
        a.set_stage("index", {"status": "running"})  # manifest.json saves are fenced too


def test_ten_thousand_shard_commits_each_write_the_same_few_bytes(tmp_path):
    """A plan of 10,000 shards committed one by one: every commit writes one small entry (plus, on every
    1,000th, one checkpoint part of bounded size), however many are committed already; manifest.json is
    never rewritten."""
    out = tmp_path / "out"
    loc = Location.from_uri(str(out))
    plan = {"shards": [{"shard": i, "rows": 5, "segments": []} for i in range(10_000)], "rows": 50_000}
    m = Manifest.create(loc, MODEL, plan, {})
    manifest_bytes = (out / "manifest.json").read_bytes()
    rec = {"rows": 5, "dead_letters": 0, "reasons": {}, "truncated": 0, "tokens": 50, "bytes": 1234,
           "sha256": "0" * 64, "device_seconds": 0.01, "epoch": 1, "writer": {"node": "n" * 56, "pid": "h:1"}}
    costs = []
    for shard in range(10_000):
        m.commit_shard(shard, {**rec, "path": f"shards/part-{shard:05d}.e0001.parquet"})
        costs.append(m.commit_log.last_write)
    entries = [c.bytes for c in costs if c.requests == 1]
    assert len(entries) == 9_990 and max(entries) < 1_000 and max(entries) - min(entries) < 16
    parts = [c.bytes for c in costs if c.requests == 2]
    assert len(parts) == 10 and max(parts) < 2 * min(parts)  # the last part costs what the first did
    assert (out / "manifest.json").read_bytes() == manifest_bytes
    again = Manifest.load(loc)
    assert again.is_complete() and again.totals()["embedded"] == 50_000 and len(again.committed) == 10_000


def test_claim_fences_earlier_readers_and_removes_only_leftovers(tmp_path):
    out = tmp_path / "out"
    make_output(out, commit=1)
    loc = Location.from_uri(str(out))
    early = Manifest.load(loc)
    # What killed attempts leave: an uncommitted shard, a temporary shard, a killed manifest save, a killed
    # duplicates write; and files that are not ours to touch.
    late = write_shard(loc, 1, embedded_rows(1, 5), SCHEMA)
    (out / "shards" / "_tmp" / "part-00002.parquet.0123456789ab").write_bytes(b"half")
    (out / "manifest.json.tmp-0123456789ab").write_text("{")
    (out / "plan" / "duplicates.parquet.tmp-ba9876543210").write_bytes(b"half")
    (out / "manifest.json.backup").write_text("{}")
    (out / "notes.txt").write_text("mine")

    claimer = Manifest.load(loc)
    assert claimer.claim("shards", "dead_letter") == 5  # 2 shards files, 2 temporary files, 1 empty _tmp/
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["part-00000.parquet"]
    assert sorted(p.name for p in out.iterdir()) == [".manifest.lock", "_log", "manifest.json",
                                                     "manifest.json.backup", "notes.txt", "plan", "shards"]
    assert [p.name for p in (out / "plan").iterdir()] == ["duplicates.parquet"]
    with pytest.raises(ConcurrentWriteError):
        early.commit_shard(1, late)  # the fenced job cannot commit what it wrote
    assert sorted(Manifest.load(loc).committed) == [0]


def test_clean_temp_keeps_a_tmp_folder_in_use(tmp_path):
    out = tmp_path / "out"
    m = make_output(out, commit=1)
    (out / "shards" / "_tmp").mkdir(exist_ok=True)
    assert m.clean_temp("shards", "dead_letter") == 1 and not (out / "shards" / "_tmp").exists()
    (out / "shards" / "_tmp").mkdir()
    (out / "shards" / "_tmp" / "part-00001.parquet.0123456789ab").write_bytes(b"a writer's file")
    assert m.clean_temp("shards") == 0 and (out / "shards" / "_tmp").exists()


@pytest.mark.s3
def test_a_hostile_path_is_refused_on_s3_too(s3_env):
    bucket = new_bucket(s3_env)
    loc = Location.from_uri(f"s3://{bucket}/out")
    plan = {"shards": [{"shard": 0, "rows": 5, "segments": []}], "rows": 5}
    m = Manifest.create(loc, MODEL, plan, {})
    m.commit_shard(0, write_shard(loc, 0, embedded_rows(0, 5), SCHEMA))
    assert read_shard_table(loc, m.committed[0]).num_rows == 5
    entry = "000000000001.json"  # the commit of shard 0, after the claim at seq 0
    data = json.loads(loc.read_bytes("_log", entry))
    data["record"]["path"] = f"s3://{bucket}-other/secrets.parquet"
    loc.write_bytes(json.dumps(data).encode(), "_log", entry)
    with pytest.raises(ManifestError, match=r"shards.00000.path = 's3://.*-other/secrets.parquet' points outside"):
        list(Manifest.load(loc).committed.values())


def test_a_save_or_commit_on_a_full_disk_is_one_line_and_keeps_what_is_stored(small_disk):
    disk, resize = small_disk
    resize("128k")
    m = make_output(disk / "out", commit=1)
    rec = write_shard(m.loc, 1, embedded_rows(1, 5), SCHEMA)
    before = (disk / "out" / "manifest.json").read_bytes()
    with pytest.raises(StorageError) as e:
        m.set_stage("note", {"text": "x" * 200_000})  # a manifest too large for what is left
    assert "\n" not in str(e.value) and "manifest.json: no space left on the device" in str(e.value)
    assert (disk / "out" / "manifest.json").read_bytes() == before  # the stored manifest is intact
    assert not list((disk / "out").glob("manifest.json.tmp-*"))
    del m.data["stages"]["note"]
    filler = disk / "filler"
    fd = os.open(filler, os.O_CREAT | os.O_WRONLY)
    for chunk in (4096, 1):  # fill the disk to the last byte
        try:
            while os.write(fd, b"\0" * chunk):
                pass
        except OSError:
            pass
    os.close(fd)
    with pytest.raises(StorageError) as e:
        m.commit_shard(1, rec)
    assert "\n" not in str(e.value) and "_log: no space left on the device" in str(e.value)
    assert 1 not in m.committed and not list((disk / "out" / "_log" / "_tmp").iterdir())
    filler.unlink()
    m.commit_shard(1, rec)  # with room again, the same job goes on
    assert sorted(Manifest.load(m.loc).committed) == [0, 1]


def test_committed_holds_under_100_bytes_per_shard_and_reads_each_record_when_asked(tmp_path):
    """10,000 committed shards in a compacted part (as ``CommitLog.compact`` writes it: row groups of 10k
    rows) plus commits after it: the loaded Manifest holds < 100 bytes per shard (traced Python heap),
    also after a record was read; ``committed[s]`` and ``items()`` give back exactly what was committed.
    (It held ~340 B per shard after loading and ~2.9 KB after the first record, when every record was
    parsed into a dict on first use.)"""
    import gc
    import tracemalloc

    from reembed import commits as C

    n = 10_000
    loc = Location.from_uri(str(tmp_path / "out"))
    m = Manifest.create(loc, MODEL, {"shards": n + 20, "rows": 5 * (n + 20)}, {})

    def rec(s: int) -> dict:
        return {"rows": 5 - s % 2, "dead_letters": s % 2, "reasons": {"duplicate_id": 1} if s % 2 else {},
                "truncated": 0, "tokens": 50 + s, "bytes": 1000 + s, "sha256": f"{s:064x}", "device_seconds": 0.01,
                "epoch": 1, "writer": {"node": "n" * 56, "host_pid": "h:1"}, "path": f"shards/part-{s:05d}.e0001.parquet"}

    order = [(s * 7919) % n for s in range(n)]  # committed out of shard order, as parallel writers do
    rows = [{"seq": 0, "kind": "claim", "epoch": 1}] + [
        {"seq": i + 1, "kind": "commit", "epoch": 1, "shard": s, "record": rec(s)} for i, s in enumerate(order)]
    tables = (C._rows_table(rows[i:i + 10_000]) for i in range(0, len(rows), 10_000))
    loc.write_bytes(C._part_bytes(tables, first=0, last=n, epoch=1), C.LOG_DIR, C.CHECKPOINTS, C._part_name(0, n))
    m = Manifest.load(loc)
    m.claim()
    for s in range(n, n + 20):  # entries after the part
        m.commit_shard(s, rec(s))

    warm = Manifest.load(loc)  # imports and first-use caches out of the measurement
    warm.committed[3]
    del warm
    gc.collect()
    tracemalloc.start()
    try:
        m = Manifest.load(loc)
        committed = m.committed
        assert len(committed) == n + 20 and 17 in committed and n + 20 not in committed
        got = committed[order[5_000]]
        held = tracemalloc.get_traced_memory()[0]
    finally:
        tracemalloc.stop()
    assert held / n < 100, f"{held / n:.0f} bytes per committed shard"
    assert {k: v for k, v in got.items() if k != "committed_at"} == rec(order[5_000])
    for s in (0, 1, n - 1, n, n + 19):
        assert {k: v for k, v in committed[s].items() if k != "committed_at"} == rec(s)
    with pytest.raises(KeyError):
        committed[n + 20]
    items = dict(committed.items())
    assert sorted(items) == list(range(n + 20)) == list(committed)
    assert all({k: v for k, v in r.items() if k != "committed_at"} == rec(s) for s, r in items.items())
    t = m.totals()
    assert t["dead_lettered"] == (n + 20) // 2 and t["reasons"] == {"duplicate_id": (n + 20) // 2}
    assert m.pending() == []



def test_clean_temp_removes_a_killed_writers_file_once_its_shard_is_committed(tmp_path):
    """A writer killed mid-write (its node lost) leaves ``shards/_tmp/part-N.eE.parquet.<hex>``; another
    attempt commits shard N. The end of the run removes that file, and only files like it: a temporary file
    of a shard not committed (a live writer's) and any other name stay."""
    m = make_output(tmp_path / "out", shards=3, commit=2)
    tmp = tmp_path / "out" / "shards" / "_tmp"
    tmp.mkdir(parents=True, exist_ok=True)
    stale = tmp / f"{shard_name(1, 2)}.c60688a81d35"
    live = tmp / f"{shard_name(2, 2)}.0123456789ab"
    other = tmp / "notes.txt"
    for p in (stale, live, other):
        p.write_bytes(b"half a parquet file")
    assert 1 in m.committed and 2 not in m.committed
    assert m.clean_temp("shards") == 1
    assert sorted(p.name for p in tmp.iterdir()) == sorted([live.name, other.name])
    live.unlink(), other.unlink()
    assert m.clean_temp("shards") == 1 and not tmp.exists()  # the emptied folder goes too
