"""Benchmark: ``reembed validate`` as a Ray job, 1 worker vs 2 workers (and in-process, no Ray).

The output is written directly with the project's writer (``reembed.write.write_shard``, the function Ray's
writer tasks run) and committed to a real commit log, so validate reads exactly what a run leaves: 10,000-row
shards of seeded clustered synthetic 1024-d vectors (``--clusters`` unit centres, each vector a centre plus
Gaussian noise, normalized; not uniform random, whose neighbours mean nothing), ids ``d0 ... dN-1``. The
model in the manifest is a tiny random 1024-d BERT (``reembed.testing.tiny_bert``): validate loads it to
embed queries, and with no sanity pairs, labelled queries or index, the gates that run are integrity (every
shard read, sha256-checked, counted) and exact search of the sampled documents over all shards, i.e. the
whole-corpus passes this benchmark is about.

    python bench/validate_scale.py                         # 200,000 vectors
    python bench/validate_scale.py --rows 1000000 --workers 1,2
    python bench/validate_scale.py --rows 200000 --keep /tmp/vout   # keep (and reuse) the output

Prints one line per run and writes ``--out`` (JSON): per run the wall seconds, the CPU seconds of this process and its local Ray
(all of it: GCS, raylet, workers) in all and per shard, rows/s, MB/s of shard bytes,
the report's integrity figures, and the machine and its load average before and after.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402
import pyarrow as pa  # noqa: E402

from reembed import schema as S  # noqa: E402
from reembed.embed import fingerprint  # noqa: E402
from reembed.manifest import Manifest  # noqa: E402
from reembed.storage import Location  # noqa: E402

DIM = 1024
SHARD_ROWS = 10_000


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000)
    ap.add_argument("--workers", default="1,2", help="worker counts, comma-separated (0: in this process, no Ray)")
    ap.add_argument("--repeat", type=int, default=1, help="runs per worker count (alternating)")
    ap.add_argument("--clusters", type=int, default=512)
    ap.add_argument("--noise", type=float, default=0.35)
    ap.add_argument("--sample", type=int, default=200, help="validate --sample (documents searched exactly)")
    ap.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the local Ray")
    ap.add_argument("--probe-shards", type=int, default=3, help="shards timed in CPU seconds, in this process")
    ap.add_argument("--keep", help="write the output here and keep it (reused if it is already there)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out" / "validate_scale.json"))
    args = ap.parse_args(argv)

    tmp = None
    if args.keep:
        folder = Path(args.keep)
    else:
        tmp = tempfile.mkdtemp(prefix="validate-bench-")
        folder = Path(tmp)
    try:
        out = folder / f"out-{args.rows}"
        t0 = time.monotonic()
        written = write_output(out, folder / "model", args.rows, args.clusters, args.noise)
        write_s = time.monotonic() - t0
        print(f"output: {args.rows} rows in {written['shards']} shards, {written['bytes'] / 1e6:.0f} MB "
              f"({'reused' if written['reused'] else f'written in {write_s:.1f} s'})", flush=True)

        import ray

        ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
        from reembed import validation as V

        settings = V.Settings(sample=args.sample, builtin_pairs=False, device="cpu")
        V.validate(Location.from_uri(str(out)), settings=V.Settings(sample=10, builtin_pairs=False, device="cpu"),
                   write=False, workers=1)  # warm: the model's load, imports, Ray's workers; outside the timings
        runs = []
        counts = [int(w) for w in args.workers.split(",")]
        for _ in range(args.repeat):
            for w in counts:
                load0 = os.getloadavg()
                cpu0, driver0 = _tree_cpu(), time.process_time()
                t = time.monotonic()
                report = V.validate(Location.from_uri(str(out)), settings=settings, write=False, workers=w)
                secs = time.monotonic() - t
                cpu, driver = _tree_cpu(cpu0), time.process_time() - driver0
                g = report["gates"]["integrity"]
                run = {"workers": w, "seconds": round(secs, 2), "rows_per_s": round(args.rows / secs),
                       "cpu_s": round(cpu, 1), "cpu_s_per_shard": round(cpu / written["shards"], 3),
                       "driver_cpu_s": round(driver, 2),
                       "mb_per_s": round(written["bytes"] / 1e6 / secs, 1), "integrity": g["status"],
                       "rows": g["rows"], "shards": g["shards"], "sampled": report["settings"]["sample"],
                       "norm": g["norm"], "load_before": [round(x, 1) for x in load0],
                       "load_after": [round(x, 1) for x in os.getloadavg()]}
                runs.append(run)
                print(f"workers={w}: {secs:.1f} s, {cpu:.1f} CPU-s ({run['cpu_s_per_shard']} per shard; driver "
                      f"{driver:.1f}), {run['rows_per_s']} rows/s, {run['mb_per_s']} MB/s "
                      f"(integrity {g['status']}, {g['rows']} rows; load {run['load_before'][0]} -> "
                      f"{run['load_after'][0]})", flush=True)
        ray.shutdown()
        probe = cpu_probe(out, args.sample, args.probe_shards)
        print(f"cpu: {probe['cpu_s_per_shard']} CPU-s per shard in one task ({probe['mb_per_cpu_s']} MB per CPU-s; "
              f"read + sha256 {probe['read_sha_cpu_s']} s, parse + integrity + exact search the rest)", flush=True)
        result = {
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
            "command": "python bench/validate_scale.py " + " ".join(argv if argv is not None else sys.argv[1:]),
            "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs, Python "
                       f"{platform.python_version()}; local Ray with {args.cpus} CPUs",
            "rows": args.rows, "dim": DIM, "shard_rows": SHARD_ROWS, "clusters": args.clusters, "noise": args.noise,
            "shards": written["shards"], "shard_bytes": written["bytes"], "write_seconds": round(write_s, 1),
            "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "runs": runs, "cpu_probe": probe,
        }
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=1))
        print(f"wrote {args.out}")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


def _tree_cpu(since: dict | None = None):
    """CPU seconds (user + system) of this process and every process under it (the local Ray it started:
    GCS, raylet, the workers that run validate's tasks), read from /proc. Without ``since``: a snapshot
    {(pid, start): seconds}; with it: the seconds used since that snapshot (processes that ended meanwhile
    are not counted)."""
    tick = os.sysconf("SC_CLK_TCK")
    procs = {}
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            # fields after the command: state ppid ... utime stime (11, 12) ... starttime (19)
            procs[int(pid)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / tick, int(fields[19]))
    mine, todo = set(), [os.getpid()]
    while todo:
        pid = todo.pop()
        mine.add(pid)
        todo.extend(p for p, (ppid, _, _) in procs.items() if ppid == pid and p not in mine)
    now = {(p, procs[p][2]): procs[p][1] for p in mine if p in procs}
    if since is None:
        return now
    return sum(v - since.get(k, 0.0) for k, v in now.items())


def cpu_probe(out: Path, sample: int, shards: int) -> dict:
    """CPU seconds (this process, not wall: the machine may be loaded) that one shard task spends per shard,
    with the queries validate searches (``sample`` documents, k = DEPTH * 11), and the part of it that is
    reading and hashing the file."""
    import hashlib

    from reembed.indexes.exact import DEPTH
    from reembed.validation.integrity import ScanJob, Search, committed, scan_batch

    loc = Location.from_uri(str(out))
    manifest = Manifest.load(loc)
    items = sorted(committed(manifest))[:shards]
    rng = np.random.default_rng(0)
    queries = rng.standard_normal((sample, DIM)).astype(np.float32)
    job = ScanJob(dim=DIM, normalized=True, searches=(Search(S.EMBEDDING, queries, DEPTH * 11, DIM),))
    scan_batch(loc, items[:1], job)  # warm
    c0 = time.process_time()
    scan_batch(loc, items, job)
    per = (time.process_time() - c0) / len(items)
    c0 = time.process_time()
    for _, _, rec in items:
        hashlib.sha256(loc.read_bytes(rec["path"])).hexdigest()
    read_sha = (time.process_time() - c0) / len(items)
    mb = sum(rec["bytes"] for _, _, rec in items) / len(items) / 1e6
    return {"shards": len(items), "queries": sample, "k": DEPTH * 11, "cpu_s_per_shard": round(per, 3),
            "read_sha_cpu_s": round(read_sha, 3), "mb_per_shard": round(mb, 1), "mb_per_cpu_s": round(mb / per, 1)}


def write_output(out: Path, model_dir: Path, rows: int, clusters: int, noise: float) -> dict:
    """A committed output of ``rows`` clustered vectors (one writer call and one commit per shard)."""
    from reembed.testing import tiny_bert
    from reembed.write import write_shard

    loc = Location.from_uri(str(out))
    existing = Manifest.load(loc)
    if existing is not None and existing.is_complete():
        state = existing.state()
        return {"shards": len(state), "bytes": state.totals["bytes"], "reused": True}
    if out.exists():
        shutil.rmtree(out)
    model = tiny_bert(model_dir, hidden=DIM, layers=1, heads=4) if not (model_dir / "modules.json").exists() else model_dir
    info = {"name": str(model), "revision": "bench", "dimension": DIM, "normalize": True, "pooling": "cls",
            "dtype": "float32", "max_seq_length": 128}
    info["fingerprint"] = fingerprint(info)
    n_shards = -(-rows // SHARD_ROWS)
    plan = {"rows": rows, "shards": n_shards, "passthrough": [], "bad_files": [], "dedup": "hash"}
    manifest = Manifest.create(loc, info, plan, {"rows": 0, "mode": "hash"})
    schema = S.shard_schema(DIM)
    rng = np.random.default_rng(0)
    centres = rng.standard_normal((clusters, DIM)).astype(np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    total = 0
    for shard in range(n_shards):
        a, b = shard * SHARD_ROWS, min(rows, (shard + 1) * SHARD_ROWS)
        n = b - a
        r = np.random.default_rng(1000 + shard)
        v = centres[r.integers(0, clusters, n)] + (noise / np.sqrt(DIM)) * r.standard_normal((n, DIM)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        table = pa.table({S.ID: pa.array([f"d{i}" for i in range(a, b)], pa.string()),
                          S.EMBEDDING: S.embedding_array(v), S.TRUNCATED: pa.array(np.zeros(n, bool)),
                          S.POS: pa.array(np.arange(n, dtype=np.int64)), S.REASON: pa.nulls(n, pa.string()),
                          "_tokens": pa.array(np.full(n, 128, np.int64)), "_device_s": pa.array(np.zeros(n))})
        rec = write_shard(loc, shard, table, schema, epoch=manifest.epoch)
        manifest.commit_shard(shard, rec)
        total += rec["bytes"]
    return {"shards": n_shards, "bytes": total, "reused": False}


if __name__ == "__main__":
    sys.exit(main())
