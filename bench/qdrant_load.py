"""Benchmark: how fast Qdrant is loaded by the index stage, per writer process.

    embedded   ``reembed.indexes.build.run_qdrant`` on a synthetic output (seeded clustered 1024-d vectors,
               committed shards and a manifest) into an embedded Qdrant folder: points/s end to end (shards
               read and sha256-checked, points upserted, progress records, count check), on the folders named
               by --where (local disk and tmpfs by default).
    client     the client's own work per point for a server, without one: building the upsert batch and
               encoding it as the HTTP body (JSON) and as the gRPC message (protobuf), CPU seconds on one core.

    python bench/qdrant_load.py                         # 10,000 points, 1024-d
    python bench/qdrant_load.py --points 2000 --where /dev/shm

Prints a table and writes ``bench/out/qdrant_load.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reembed import schema as S  # noqa: E402
from reembed.config import IndexConfig  # noqa: E402
from reembed.indexes import build as stage  # noqa: E402
from reembed.manifest import Manifest, shard_name  # noqa: E402
from reembed.storage import Location  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--points", type=int, default=10_000)
    ap.add_argument("--dim", type=int, default=1024)
    ap.add_argument("--shard-rows", type=int, default=1_000)
    ap.add_argument("--batch-size", type=int, default=256, help="points per upsert (the index stage's default)")
    ap.add_argument("--where", default=f"{tempfile.gettempdir()},/dev/shm",
                    help="folders the embedded Qdrant is written under, comma-separated")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    args = ap.parse_args(argv)

    vectors = clustered(args.points, args.dim)
    results = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "points": args.points,
               "dim": args.dim, "shard_rows": args.shard_rows, "batch_size": args.batch_size,
               "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                           "load_average": os.getloadavg()}, "embedded": [], "client": client_work(vectors[:2000])}
    for where in [w for w in args.where.split(",") if w and os.path.isdir(w)]:
        with tempfile.TemporaryDirectory(dir=where, prefix="reembed-qbench-") as d:
            out = write_output(Path(d) / "out", vectors, args.shard_rows)
            t0, c0 = time.monotonic(), time.process_time()
            rec = stage.run_qdrant(out, IndexConfig(faiss="none", collection="bench", batch_size=args.batch_size),
                                   os.path.join(d, "qdrant"))
            wall, cpu = time.monotonic() - t0, time.process_time() - c0
            size = sum(f.stat().st_size for f in Path(d, "qdrant").rglob("*") if f.is_file())
        results["embedded"].append({"where": where, "fs": _fs_type(where), "count": rec["count"],
                                    "seconds": round(wall, 2), "cpu_seconds": round(cpu, 2),
                                    "points_per_s": round(rec["count"] / wall, 1), "qdrant_bytes": size})
    print(f"{'embedded under':<24} {'points':>7} {'seconds':>8} {'points/s':>9} {'cpu s':>7}")
    for r in results["embedded"]:
        print(f"{r['where'] + ' (' + r['fs'] + ')':<24} {r['count']:>7} {r['seconds']:>8} {r['points_per_s']:>9} "
              f"{r['cpu_seconds']:>7}")
    c = results["client"]
    print(f"client work per point ({args.dim}-d): batch {c['batch_us']:.0f} us, + JSON {c['json_us']:.0f} us "
          f"(HTTP: {c['http_points_per_s']:.0f} points/s/core), + protobuf {c['grpc_us']:.0f} us "
          f"(gRPC: {c['grpc_points_per_s']:.0f} points/s/core)")
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, "qdrant_load.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {path}")
    return 0


def client_work(vectors: np.ndarray, batch: int = 256) -> dict:
    """CPU seconds per point the client spends before a byte reaches a server: the upsert batch as
    ``reembed.indexes.qdrant.upload`` builds it, then its HTTP body (pydantic JSON) or gRPC message."""
    from qdrant_client import models
    from qdrant_client.conversions.conversion import RestToGrpc

    from reembed.indexes import qdrant as Q

    ids = [f"d{i}" for i in range(len(vectors))]
    t0 = time.process_time()
    batches = [models.Batch(ids=[Q.point_id(i) for i in ids[lo:lo + batch]], vectors=vectors[lo:lo + batch].tolist(),
                            payloads=[{Q.PAYLOAD_ID: i, "text": f"text of {i}"} for i in ids[lo:lo + batch]])
               for lo in range(0, len(ids), batch)]
    t1 = time.process_time()
    body = sum(len(models.PointsBatch(batch=b).model_dump_json(exclude_unset=True)) for b in batches)
    t2 = time.process_time()
    msgs = 0
    for b in batches:
        points = [models.PointStruct(id=i, vector=v, payload=p) for i, v, p in zip(b.ids, b.vectors, b.payloads)]
        msgs += sum(RestToGrpc.convert_point_struct(p).ByteSize() for p in points)
    t3 = time.process_time()
    n = len(ids)
    per = {"batch_us": (t1 - t0) / n * 1e6, "json_us": (t2 - t1) / n * 1e6, "grpc_us": (t3 - t2) / n * 1e6}
    return {**{k: round(v, 1) for k, v in per.items()}, "points": n, "json_bytes_per_point": body // n,
            "grpc_bytes_per_point": msgs // n,
            "http_points_per_s": round(1e6 / (per["batch_us"] + per["json_us"]), 0),
            "grpc_points_per_s": round(1e6 / (per["batch_us"] + per["grpc_us"]), 0)}


def clustered(n: int, dim: int, clusters: int = 100, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((clusters, dim)).astype(np.float32)
    x = centres[rng.integers(0, clusters, n)] + 0.6 * rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def write_output(folder: Path, vectors: np.ndarray, shard_rows: int) -> str:
    """A complete output of committed shards (id, embedding, text) and its manifest."""
    loc = Location.from_uri(str(folder))
    dim = vectors.shape[1]
    model = {"name": "bench-model", "revision": "r1", "dimension": dim, "normalize": True, "pooling": "cls",
             "dtype": "float32", "max_seq_length": 512, "fingerprint": f"bench-{dim}"}
    shards = range(0, len(vectors), shard_rows)
    plan = {"input_uri": "synthetic", "id_column": "id", "text_column": "text", "passthrough": ["text"],
            "shard_rows": shard_rows, "rows": len(vectors),
            "shards": [{"shard": i, "rows": min(shard_rows, len(vectors) - lo), "segments": []}
                       for i, lo in enumerate(shards)]}
    m = Manifest.create(loc, model, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    for i, lo in enumerate(shards):
        hi = min(lo + shard_rows, len(vectors))
        ids = [f"d{j}" for j in range(lo, hi)]
        table = pa.table({S.ID: pa.array(ids), S.EMBEDDING: S.embedding_array(vectors[lo:hi]),
                          S.TRUNCATED: pa.array([False] * (hi - lo)), "text": pa.array([f"text of {j}" for j in ids])})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        loc.write_bytes(data, "shards", shard_name(i))
        m.commit_shard(i, {"path": f"shards/{shard_name(i)}", "rows": hi - lo, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest(), "truncated": 0, "tokens": 0,
                           "device_seconds": 0.0, "dead_letters": 0, "reasons": {}})
    return str(folder)


def _fs_type(path: str) -> str:
    best, kind = "", "?"
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mnt, fs, *_ = line.split()
                if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) > len(best):
                    best, kind = mnt, fs
    except OSError:
        pass
    return kind


if __name__ == "__main__":
    sys.exit(main())
