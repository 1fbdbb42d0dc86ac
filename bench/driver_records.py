"""Benchmark: what the scheduling process of ``index`` / ``publish`` / ``validate`` / ``repair`` spends on the
committed shards' records before its tasks start, the old way and the new way, at N committed shards.

* **records** (before): every commit record streamed from the commit log and parsed here, kept as the
  ``[(shard, slim record)]`` list the Qdrant load and ``publish`` built, then cut into 64-shard task shares
  and pickled (what the tasks were sent).
* **refs** (now): :meth:`reembed.manifest.Manifest.refs` (shard numbers, commit seqs and rows from the log's
  arrays), cut into the same shares and pickled; the tasks read their own records.

Both start from a loaded manifest (its state arrays read once, as every command does). Reported: CPU
seconds of this process (``time.process_time``), the traced Python heap's peak (``tracemalloc``) and the
pickled bytes of the shares, per shard; and, for the new way, one task's CPU seconds to read its 64
records back from the log.

    python bench/driver_records.py --shards 20000
"""

from __future__ import annotations

import argparse
import hashlib
import os
import pickle
import random
import tempfile
import time
import tracemalloc

from reembed.manifest import Manifest, shard_name
from reembed.storage import Location

SHARE = 64


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shards", type=int, default=20_000)
    ap.add_argument("--workdir", default=None, help="keep the output here (made once, reused)")
    args = ap.parse_args()
    loc = Location.from_uri(args.workdir or tempfile.mkdtemp(prefix="driver-records-"))
    if Manifest.load(loc) is None:
        t0 = time.monotonic()
        make_output(loc, args.shards)
        print(f"committed {args.shards} shards in {time.monotonic() - t0:.0f} s")
    for name, fn in (("records", old_way), ("refs", new_way)):
        m = Manifest.load(loc)
        tracemalloc.start()
        c0 = time.process_time()
        shares = fn(m)
        blob = pickle.dumps(shares)
        cpu = time.process_time() - c0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        n = len(m.committed)
        print(f"{name:8s} {n} shards: {cpu:.2f} CPU-s ({1e6 * cpu / n:.1f} us/shard), heap peak "
              f"{peak / 2**20:.1f} MiB ({peak / n:.0f} B/shard), tasks' arguments {len(blob) / n:.0f} B/shard")
    share = Manifest.load(loc).refs()[:SHARE]
    c0 = time.process_time()
    got = list(share.records(loc))
    print(f"one task reads its {len(got)} records back: {1e3 * (time.process_time() - c0):.0f} CPU-ms")
    print(f"load average {os.getloadavg()}")


def old_way(m: Manifest) -> list:
    todo = [(s, {k: rec[k] for k in ("path", "sha256", "rows", "bytes") if k in rec})
            for s, rec in sorted(m.committed.items())]
    return [todo[i:i + SHARE] for i in range(0, len(todo), SHARE)]


def new_way(m: Manifest) -> list:
    return m.refs().chunks(SHARE)


def make_output(loc: Location, shards: int) -> None:
    model = {"name": "m", "revision": "r", "dimension": 4, "normalize": True, "pooling": "cls", "dtype": "float32",
             "max_seq_length": 8, "fingerprint": hashlib.sha256(b"m").hexdigest()[:16]}
    plan = {"input_uri": "synthetic", "id_column": "id", "text_column": "text", "passthrough": [], "shard_rows": 10,
            "rows": 10 * shards, "shards": shards}
    m = Manifest.create(loc, model, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    order = list(range(shards))
    random.Random(0).shuffle(order)
    for s in order:
        m.commit_shard(s, {"path": f"shards/{shard_name(s, 1)}", "rows": 10, "bytes": 41_000, "sha256": f"{s:064x}",
                           "dead_letter_path": None, "dead_letters": 0, "reasons": {}, "truncated": 0,
                           "tokens": 120, "device_seconds": 0.01, "epoch": 1,
                           "writer": {"node": "n" * 56, "process": "host:1234"}})


if __name__ == "__main__":
    main()
