"""Benchmark: what one shard commit costs as the output grows, manifest.json rewrite vs the commit log.

    old  what ``Manifest.commit_shard`` did before the commit log: re-read, re-serialize, rewrite manifest.json
         (``Manifest.save`` with the record added; manifest.json still reads such records as the older layout)
    new  ``reembed.commits.CommitLog.commit``: one create-only entry, plus a checkpoint part every 1,000

At each size N (shards), on local disk: seconds and bytes written per commit once N - 1 shards are committed,
and the time to read the state back (``status``: Manifest.load + totals vs commits.read_state + totals).
The old path is measured on a sample of commits after one save of a manifest already holding N - sample
records (committing all N the old way is quadratic: hours at 50k); the new path commits all N shards and
reports the last 1,000 (their entries and the one part among them, i.e. amortized).

    python bench/commit_cost.py                      # 1k, 10k, 50k shards
    python bench/commit_cost.py --sizes 1000,100000 --sample 5
    python bench/commit_cost.py --sizes 100000 --old-max 0 --compact   # the new path alone, with compaction

Prints a table and writes ``bench/out/commit_cost.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reembed.commits import CommitLog, read_state  # noqa: E402
from reembed.manifest import MANIFEST, Manifest  # noqa: E402
from reembed.storage import Location  # noqa: E402

WINDOW = 1000  # new path: the last WINDOW commits, which include exactly one checkpoint part


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,50000", help="shard counts, comma-separated")
    ap.add_argument("--sample", type=int, default=10, help="old path: commits timed at each size")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"), help="folder for the JSON")
    ap.add_argument("--old-max", type=int, default=50_000, help="measure the old path only up to this size")
    ap.add_argument("--compact", action="store_true", help="new path: also time compact() and status after it")
    ap.add_argument("--tmp", default=None, help="where the outputs are written (default: the system temp)")
    args = ap.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    _warm_up()

    rows = []
    for n in sizes:
        with tempfile.TemporaryDirectory(dir=args.tmp) as d:
            old = (bench_manifest(Location.from_uri(os.path.join(d, "old")), n, min(args.sample, n))
                   if n <= args.old_max else None)
            new = bench_log(Location.from_uri(os.path.join(d, "new")), n, args.compact)
        rows.append({"shards": n, "old": old, "new": new})
        print_row(rows[-1])

    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                         f"{platform.python_version()}",
              "disk": args.tmp or tempfile.gettempdir(), "sample": args.sample, "window": WINDOW, "sizes": rows}
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "commit_cost.json")
    with open(path, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {path}")
    return 0


def bench_manifest(loc: Location, n: int, sample: int) -> dict:
    """The old path: a manifest of ``n`` planned shards, ``n - sample`` already committed, then ``sample``
    timed commits."""
    plan = {"rows": 1000 * n, "shard_rows": 1000, "files": [],
            "shards": [{"shard": i, "rows": 1000, "segments": [{"file": i // 10, "start": 1000 * (i % 10),
                                                                "stop": 1000 * (i % 10 + 1)}]} for i in range(n)]}
    m = Manifest.create(loc, {"name": "bench", "fingerprint": "f" * 16}, plan, {})
    for i in range(n - sample):
        m.data["shards"][f"{i:05d}"] = {**shard_record(i), "committed_at": "2026-11-30T00:00:00+00:00"}
    m.save()
    seconds, sizes = [], []
    for i in range(n - sample, n):
        t = time.perf_counter()
        # What Manifest.commit_shard did before the commit log: add the record, rewrite manifest.json whole.
        m.data["shards"][f"{i:05d}"] = {**shard_record(i), "committed_at": "2026-11-30T00:00:00+00:00"}
        m.save()
        seconds.append(time.perf_counter() - t)
        sizes.append(loc.size(MANIFEST))  # the whole file is written at every commit
    t = time.perf_counter()
    totals = Manifest.load(loc).totals()
    status_s = time.perf_counter() - t
    assert totals["embedded"] == 1000 * n
    return {"commit_s": statistics.median(seconds), "commit_s_max": max(seconds),
            "bytes_per_commit": statistics.mean(sizes), "requests_per_commit": 1, "commits_timed": sample,
            "status_s": status_s, "stored_bytes": loc.size(MANIFEST)}


def bench_log(loc: Location, n: int, compact: bool = False) -> dict:
    """The new path: ``n`` commits; the last ``WINDOW`` are reported (amortized over their part)."""
    clog = CommitLog.create(loc)
    seconds, costs = [], []
    t_all = time.perf_counter()
    for i in range(n):
        t = time.perf_counter()
        clog.commit(i, shard_record(i))
        seconds.append(time.perf_counter() - t)
        costs.append(clog.last_write)
    all_s = time.perf_counter() - t_all
    window = min(WINDOW, n)
    last_s, last = seconds[-window:], costs[-window:]
    entries = [c.bytes for c in last if c.requests == 1]
    t = time.perf_counter()
    state = read_state(loc)
    totals = state.totals
    status_s = time.perf_counter() - t
    assert totals["embedded"] == 1000 * n and len(state) == n
    t = time.perf_counter()
    CommitLog.open(loc)
    open_s = time.perf_counter() - t
    extra = {}
    if compact:
        t = time.perf_counter()
        CommitLog.open(loc).compact()
        extra["compact_s"] = time.perf_counter() - t
        t = time.perf_counter()
        assert read_state(loc).totals["embedded"] == 1000 * n
        extra["status_s_compacted"] = time.perf_counter() - t
    stored = sum(e.stat().st_size for e in os.scandir(loc.path("_log")) if e.is_file())
    stored += sum(e.stat().st_size for e in os.scandir(loc.path("_log", "_checkpoints")) if e.is_file())
    return {"commit_s": statistics.median(last_s), "commit_s_max": max(last_s),
            "commit_s_amortized": sum(last_s) / window, "all_commits_s": all_s,
            "bytes_per_commit": sum(c.bytes for c in last) / window, "entry_bytes": statistics.mean(entries),
            "requests_per_commit": sum(c.requests for c in last) / window, "commits_timed": window,
            "status_s": status_s, "open_s": open_s, "stored_bytes": stored,
            # median seconds of the commits in each window of WINDOW, first to last: flat if O(1)
            "commit_s_by_window": [statistics.median(seconds[i:i + WINDOW]) for i in range(0, n, WINDOW)],
            **extra}


def _warm_up() -> None:
    """Import what the first checkpoint part needs (pyarrow pulls in pandas on first use: seconds) so
    that no size's window pays for it."""
    import pyarrow as pa
    import pyarrow.parquet  # noqa: F401

    pa.array([0])


def shard_record(i: int) -> dict:
    """A record shaped like write.write_shard's, dead letters on one shard in seven."""
    rec = {"path": f"shards/part-{i:05d}.parquet", "rows": 1000, "bytes": 1_550_000 + i, "sha256": f"{i:064x}",
           "truncated": i % 4, "tokens": 180_000 + i, "device_seconds": 0.8125, "dead_letters": 0, "reasons": {}}
    if i % 7 == 0:
        rec.update(dead_letters=2, reasons={"empty_text": 1, "too_long": 1},
                   dead_letter_path=f"dead_letter/part-{i:05d}.parquet", dead_letter_bytes=2100,
                   dead_letter_sha256=f"{i + 1:064x}")
    return rec


def print_row(row: dict) -> None:
    old, new = row["old"], row["new"]
    if not getattr(print_row, "header", False):
        print(f"{'shards':>8} | {'old s/commit':>12} {'old B/commit':>13} {'old status s':>12} | "
              f"{'new s/commit':>12} {'new B/commit':>12} {'req/commit':>10} {'new status s':>12}")
        print_row.header = True
    old_cols = (f"{old['commit_s']:>12.5f} {old['bytes_per_commit']:>13,.0f} {old['status_s']:>12.3f}" if old
                else f"{'-':>12} {'-':>13} {'-':>12}")
    print(f"{row['shards']:>8} | {old_cols} | "
          f"{new['commit_s_amortized']:>12.6f} {new['bytes_per_commit']:>12,.0f} {new['requests_per_commit']:>10.3f} "
          f"{new['status_s']:>12.3f}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
