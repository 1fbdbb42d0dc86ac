"""Planning throughput per core: the whole plan (``reembed.plan.make_plan``: listing, counting, ids,
hash-partitioned duplicate detection, the plan's Parquet) and its parts, for Parquet and JSON Lines.

    python bench/plan_scan.py --docs 1000000 --files 4 --out /tmp/plan-scan

The process is pinned to one CPU (threads of pyarrow and numpy included) and the planning runs in this
process (``use_ray=False``: the same functions the Ray tasks run), so the figures are per core. The
figure is CPU seconds of this process (the machine may be shared; wall seconds are printed beside).
Targets (issue 12): Parquet planning >= 1,000,000 documents/s per core, JSON Lines >= 200,000, with ids
(duplicate detection on). Prints one line per measurement (the fastest of ``--repeat`` runs); ``--json``
writes them too, with the peak RSS of the process.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reembed import dedup, scan  # noqa: E402
from reembed.config import InputConfig  # noqa: E402
from reembed.plan import IDS_PER_PARTITION, make_plan  # noqa: E402
from reembed.storage import Location  # noqa: E402

WORDS = "the cat dog bird river city music data vector search model token cluster gpu art science".split()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=1_000_000, help="documents per format")
    p.add_argument("--files", type=int, default=4, help="JSON Lines files (Parquet gets 5x as many)")
    p.add_argument("--out", type=Path, default=Path("/tmp/reembed-plan-scan"), help="folder for the corpus")
    p.add_argument("--words", type=int, nargs=2, default=(5, 25), metavar=("MIN", "MAX"),
                   help="words per document (default 5 25: ~130-byte lines; 45 100 gives the ~450 bytes of issue 12)")
    p.add_argument("--cpu", type=int, default=None, help="the CPU to pin to (default: the first allowed)")
    p.add_argument("--partitions", type=int, default=None,
                   help="dedup partitions (default: the plan's own rule, one per plan.IDS_PER_PARTITION ids)")
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement; the fastest counts")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = p.parse_args(argv)

    cpu = args.cpu if args.cpu is not None else min(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpu})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    jsonl, parquet, gz = make_corpus(args.out, args.docs, args.files, tuple(args.words))
    loc = Location.from_uri(str(args.out))
    n = args.docs
    results: dict[str, dict[str, float]] = {}

    def timed(name: str, fn, docs: int = n) -> None:
        cpu_s, wall_s = float("inf"), float("inf")
        for _ in range(args.repeat):  # the best of a few: other processes share the machine
            c0, t0 = time.process_time(), time.perf_counter()
            fn()
            cpu_s, wall_s = min(cpu_s, time.process_time() - c0), min(wall_s, time.perf_counter() - t0)
        results[name] = {"docs_per_cpu_s": docs / cpu_s, "cpu_s": cpu_s, "wall_s": wall_s}
        print(f"{name:<50} {docs / cpu_s:>14,.0f} docs/CPU-s  ({cpu_s:.2f} CPU-s, {wall_s:.2f} s wall)", flush=True)

    def plan(fmt: str, dedup_mode: str = "hash"):
        def go():
            work = args.out / "_plans" / fmt
            shutil.rmtree(work, ignore_errors=True)
            make_plan(InputConfig(uri=str(args.out), format=fmt, pattern=f"*.{fmt}"), 10_000,
                      Location.from_uri(str(work)), dedup=dedup_mode, partitions=args.partitions)
        return go

    print(f"corpus: {n:,} docs as {len(parquet)} Parquet files, {len(jsonl)} JSON Lines files "
          f"({sum(f.stat().st_size for f in jsonl) / n:.0f} bytes/doc), {len(gz)} .jsonl.gz; pinned to CPU {cpu}")
    timed("parquet: make_plan (count + ids + dedup)", plan("parquet"))
    timed("parquet: make_plan, dedup none", plan("parquet", "none"))
    timed("parquet: scan.count_parquet (footer only)", lambda: [scan.count_parquet(loc, f.name) for f in parquet])
    timed("parquet: scan.parquet_ids", lambda: [scan.parquet_ids(loc, f.name, "id") for f in parquet])
    timed("jsonl: make_plan (count + ids + dedup)", plan("jsonl"))
    timed("jsonl: make_plan, dedup none", plan("jsonl", "none"))
    timed("jsonl: scan.scan_jsonl (count, 64 MiB ranges)", lambda: [scan.scan_jsonl(loc, f.name) for f in jsonl])
    timed("jsonl: scan.jsonl_ids (count + ids)", lambda: [
        scan.jsonl_ids(loc, f.name, s, e, "id") for f in jsonl for s, e in scan.jsonl_ranges(f.stat().st_size)])
    tasks = [dedup.IdTask(i, f.name, "jsonl", s, e) for i, f in enumerate(jsonl) for s, e in scan.jsonl_ranges(f.stat().st_size)]
    work = Location.from_uri(str(args.out / "_plans" / "dedup"))
    parts = args.partitions or max(1, -(-n // IDS_PER_PARTITION))
    timed(f"jsonl: dedup.find_duplicates (P={parts})", lambda: dedup.find_duplicates(loc, tasks, "id", work, partitions=parts))
    timed("jsonl.gz: scan.count_gz", lambda: [scan.count_gz(loc, f.name) for f in gz])

    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS of this process: {peak_mb:,.0f} MB")
    if args.json:
        args.json.write_text(json.dumps({"docs": n, "cpu": cpu, "bytes_per_jsonl_doc": round(sum(f.stat().st_size for f in jsonl) / n, 1),
                                         "load": os.getloadavg(), "peak_rss_mb": round(peak_mb, 1),
                                         "results": results}, indent=2))
    return 0


def make_corpus(out: Path, n: int, files: int, words: tuple[int, int] = (5, 25)) -> tuple[list[Path], list[Path], list[Path]]:
    """Documents of ``words`` words as JSON Lines, Parquet and one .jsonl.gz; reused when already there."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = out / f".corpus-{n}-{files}-{words[0]}-{words[1]}"
    jsonl = [out / f"part-{i:03d}.jsonl" for i in range(files)]
    parquet = [out / f"part-{i:03d}.parquet" for i in range(files * 5)]
    gz = [out / "all.jsonl.gz"]
    if stamp.exists():
        return jsonl, parquet, gz
    rng = np.random.default_rng(0)
    lengths = rng.integers(words[0], words[1] + 1, n)
    words = np.array(WORDS)
    texts = [" ".join(words[rng.integers(0, len(WORDS), k)]) for k in lengths]
    ids = [f"doc-{i:09d}" for i in range(n)]
    ids[n // 2] = ids[0]  # one planted duplicate, so dedup has something to find
    for i, path in enumerate(jsonl):
        lo, hi = i * n // files, (i + 1) * n // files
        path.write_text("".join(json.dumps({"id": ids[j], "text": texts[j], "lang": "en"}) + "\n" for j in range(lo, hi)))
    for i, path in enumerate(parquet):
        lo, hi = i * n // len(parquet), (i + 1) * n // len(parquet)
        pq.write_table(pa.table({"id": ids[lo:hi], "text": texts[lo:hi], "lang": ["en"] * (hi - lo)}), path)
    with gzip.open(gz[0], "wb", compresslevel=1) as f:
        for path in jsonl:
            f.write(path.read_bytes())
    stamp.touch()
    return jsonl, parquet, gz


if __name__ == "__main__":
    sys.exit(main())
