"""Benchmark: the FAISS IVF index built by many workers (issue 13), 1 worker vs 2, on seeded clustered 1024-d vectors.

For each size N: writes an output of N seeded clustered unit vectors (``--clusters`` Gaussian clusters, not
uniform noise: recall on random data means nothing) as committed shards, shard by shard (the corpus is never
in memory), then builds the IVF index with ``reembed.indexes.faiss_dist.build_ivf`` as Ray tasks, once per
worker count, and measures:

* wall seconds of the build and of its steps (sample + train, add, merge + tune);
* peak RSS of each kind of process: the trainer, the add workers (max over them), the merger, and this
  (the coordinating) process;
* recall@10 of the published index, at the search setting stored in it, on fresh queries against exact
  search (streamed over the shards with the one exact kNN); with ``--single``, the same for the
  single-process build (``reembed.indexes.faiss.build``) of the same plan.

    python bench/faiss_scale.py --sizes 200000 --workers 1,2 --memory 512M --single
    python bench/faiss_scale.py --sizes 1000000 --workers 1,2 --memory 512M

Writes ``--out`` (JSON: command, date, machine, load, one entry per size and worker count).
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import io
import json
import os
import platform
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

DIM = 1024


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="200000,1000000")
    ap.add_argument("--workers", default="1,2")
    ap.add_argument("--memory", default="512M", help="the FAISS memory budget (index.faiss_memory)")
    ap.add_argument("--shard-rows", type=int, default=10_000)
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--queries", type=int, default=500)
    ap.add_argument("--cpus", type=int, default=2, help="CPUs of the local Ray")
    ap.add_argument("--single", action="store_true", help="also build the same plan in one process (holds the index)")
    ap.add_argument("--work", default="/tmp/reembed-faiss-bench")
    ap.add_argument("--out", default="bench/out/faiss_scale.json")
    ap.add_argument("--no-ray", dest="ray", action="store_false",
                    help="no Ray: one worker, the steps one after another in this process")
    ap.add_argument("--train-only", metavar="N:NLIST,...",
                    help="only time the training task on N clustered vectors into NLIST lists (GPU k-means when "
                         "faiss sees a GPU, then the CPU), e.g. 262144:4096")
    args = ap.parse_args()
    # GNU OpenMP spins waiting threads by default: on a shared, oversubscribed machine that made faiss 5-14x
    # slower (PQ training 11 s on one thread, 156 s on two at load ~25; 20 s with PASSIVE).
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.train_only:
        return time_training(args.train_only, args.out, args.clusters)

    import logging

    import ray

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("faiss").setLevel(logging.WARNING)
    have_ray = False
    for attempt in range(1, 6 if args.ray else 1):  # on a loaded machine the raylet can miss its 30 s start-up window
        try:
            ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     runtime_env={"env_vars": {"PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src"),
                                               "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}})
            have_ray = True
            break
        except Exception as e:  # Ray raises a bare Exception for this
            if "timed out during startup" not in str(e):
                raise
            print(f"ray.init attempt {attempt}: {e}", flush=True)
            ray.shutdown()
            _end_children()  # ray.shutdown() leaves a failed start's GCS, dashboard and monitors running
            time.sleep(10)
    results: dict[str, Any] = {
        "command": "python " + " ".join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": _machine(), "load_before": os.getloadavg(), "dim": DIM, "memory": args.memory,
        "clusters": args.clusters, "shard_rows": args.shard_rows, "runs": []}
    for n in [int(s) for s in args.sizes.split(",")]:
        folder = Path(args.work) / f"n{n}"
        t0 = time.monotonic()
        write_corpus(folder, n, args.shard_rows, args.clusters)
        xq = queries(args.queries, args.clusters)
        write_s = time.monotonic() - t0
        truth = exact(folder, xq)
        exact_s = time.monotonic() - t0 - write_s
        print(f"N={n}: corpus written in {write_s:.0f} s, exact kNN in {exact_s:.0f} s", flush=True)
        results.setdefault("corpus", []).append({"n": n, "write_s": round(write_s, 1), "exact_s": round(exact_s, 1),
                                                 "load_avg_1m": round(os.getloadavg()[0], 1)})
        for w in [int(s) for s in args.workers.split(",")]:
            if not have_ray and w > 1:
                results["runs"].append({"n": n, "mode": "distributed", "workers": w, "not_measured": "Ray did not start"})
                continue
            results["runs"].append(run_distributed(folder, n, w, args.memory, xq, truth, use_ray=have_ray))
            print(json.dumps(results["runs"][-1]), flush=True)
            _save(args.out, results)
        if args.single:
            results["runs"].append(run_single(folder, n, args.memory, xq, truth))
            print(json.dumps(results["runs"][-1]), flush=True)
        results["load_after"] = os.getloadavg()
        _save(args.out, results)
        shutil.rmtree(folder, ignore_errors=True)
    ray.shutdown()


def run_distributed(folder: Path, n: int, workers: int, memory: str, xq, truth, use_ray: bool = True) -> dict[str, Any]:
    from reembed.indexes import faiss as F
    from reembed.indexes import faiss_dist as D
    from reembed.manifest import Manifest
    from reembed.storage import Location

    loc = Location.from_uri(str(folder))
    manifest = Manifest.load(loc)
    plan = F.plan_index(n, DIM, "ivf", memory)
    version = F.next_version(loc)
    load = os.getloadavg()
    t0 = time.monotonic()
    files, params = D.build_ivf(loc, sorted(manifest.committed.items()), plan, version, inputs=f"bench-{version}",
                                workers=workers, use_ray=use_ray)
    wall = time.monotonic() - t0
    index, _ = F.read_index(loc, files)
    got = recall(index, xq, truth)
    peak = params["peak_rss_bytes"]
    return {"n": n, "mode": "distributed" if use_ray else "steps in one process (no Ray)", "workers": workers, "factory": params["factory"], "reason": plan.reason,
            "train_size": plan.train_size, "train_bytes": plan.train_bytes, "budget_bytes": plan.budget_bytes,
            "groups": params["groups"], "add_processes": params["add_processes"], "wall_s": round(wall, 1),
            "train_s": params["train_seconds"], "add_s": params["add_seconds"], "merge_s": params["merge_seconds"],
            "peak_rss_mb": {k: round((v or 0) / 2**20) for k, v in peak.items()},
            "coordinator_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "cpu_s": params.get("cpu_seconds"), "coordinator_cpu_s": round(_cpu_self(), 1),
            "search": params["search"], "tuned_recall": params["recall_at_10"], "tuned_on": params.get("tuned_on"),
            "tuned_recall_off_corpus": params.get("recall_off_corpus"), "recall_at_10": round(got, 4),
            "index_bytes": files["bytes"] + files["ivfdata_bytes"], "load_avg_1m": [round(load[0], 1),
                                                                                    round(os.getloadavg()[0], 1)]}


def run_single(folder: Path, n: int, memory: str, xq, truth) -> dict[str, Any]:
    """The same plan built by one process (reembed.indexes.faiss.build), in a child process for its own RSS."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    with ctx.Pool(1) as pool:
        return pool.apply(_single, (str(folder), n, memory, xq, truth))


def _single(folder: str, n: int, memory: str, xq, truth) -> dict[str, Any]:
    from reembed.indexes import faiss as F
    from reembed.indexes.build import shard_tables
    from reembed.manifest import Manifest
    from reembed.storage import Location

    loc = Location.from_uri(folder)
    manifest = Manifest.load(loc)
    plan = F.plan_index(n, DIM, "ivf", memory)
    t0, c0 = time.monotonic(), time.process_time()
    train = F.sample_vectors(shard_tables(loc, manifest, ["embedding"]), n, plan.train_size)
    built = F.build(shard_tables(loc, manifest, ["id", "embedding"]), plan, train)
    wall = time.monotonic() - t0
    return {"n": n, "mode": "single-process", "workers": 1, "factory": built.params["factory"], "wall_s": round(wall, 1),
            "train_s": built.params["train_seconds"], "add_s": built.params["add_seconds"],
            "cpu_s": round(time.process_time() - c0, 1), "load_avg_1m": round(os.getloadavg()[0], 1),
            "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
            "search": built.params["search"], "recall_at_10": round(recall(built.index, xq, truth), 4)}


def time_training(spec: str, out: str, clusters: int) -> None:
    """Seconds of ``faiss_dist.train`` (the build's training task: k-means for the coarse quantizer, then PQ)
    per ``N:NLIST``, on the GPU when faiss sees one and with the GPU hidden (all CPU cores)."""
    import tempfile

    import faiss
    import numpy as np

    from reembed.indexes import faiss as F
    from reembed.indexes import faiss_dist as D
    from reembed.storage import Location

    faiss.omp_set_num_threads(os.cpu_count() or 1)
    results = {"command": "python " + " ".join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
               "machine": _machine(), "gpus": faiss.get_num_gpus(), "runs": []}
    real = faiss.get_num_gpus
    for item in spec.split(","):
        n, nlist = (int(v) for v in item.split(":"))
        x = clustered(np.random.default_rng(7), centres(clusters), n)
        plan = F.FaissPlan("ivf", f"IVF{nlist},PQ64x8", DIM, n, nlist=nlist, pq_m=64, pq_bits=8, train_size=n)
        for device in (["cuda"] if real() else []) + ["cpu"]:
            faiss.get_num_gpus = real if device == "cuda" else (lambda: 0)  # the CPU run: the GPU hidden from train()
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.monotonic()
                rec = D.train(Location.from_uri(tmp), "t", plan, 600, 0, (x, np.arange(n)))
                results["runs"].append({"n": n, "nlist": nlist, "device": rec["device"],
                                        "seconds": round(time.monotonic() - t0, 2)})
            print(json.dumps(results["runs"][-1]), flush=True)
            _save(out, results)
    faiss.get_num_gpus = real


# ---------------------------------------------------------------------------------------------------


def centres(clusters: int):
    import numpy as np

    return np.random.default_rng(2026).standard_normal((clusters, DIM)).astype(np.float32)


def clustered(rng, c, n: int, spread: float = 0.6):
    import numpy as np

    x = c[rng.integers(0, len(c), n)] + spread * rng.standard_normal((n, DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def queries(n: int, clusters: int):
    import numpy as np

    return clustered(np.random.default_rng([2026, 10**9]), centres(clusters), n)


def write_corpus(folder: Path, n: int, shard_rows: int, clusters: int) -> None:
    """Committed shards of ``n`` clustered vectors (seeded per shard) and a manifest, as the job writes them."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from reembed import schema as S
    from reembed.manifest import Manifest, shard_name
    from reembed.storage import Location

    shutil.rmtree(folder, ignore_errors=True)
    loc = Location.from_uri(str(folder))
    shards = [(s, min(shard_rows, n - lo)) for s, lo in enumerate(range(0, n, shard_rows))]
    model = {"name": "synthetic-clustered", "revision": "0", "dimension": DIM, "normalize": True, "pooling": "none",
             "dtype": "float32", "max_seq_length": 0, "fingerprint": hashlib.sha256(b"bench").hexdigest()[:16]}
    plan = {"input_uri": "synthetic", "id_column": "id", "text_column": "text", "passthrough": [],
            "shard_rows": shard_rows, "rows": n, "shards": [{"shard": s, "rows": r, "segments": []} for s, r in shards]}
    m = Manifest.create(loc, model, plan, {"path": "plan/duplicates.parquet", "rows": 0, "sha256": ""})
    c = centres(clusters)
    offset = 0
    for s, rows in shards:
        x = clustered(np.random.default_rng([2026, s]), c, rows)
        table = pa.table({S.ID: pa.array([f"d{i}" for i in range(offset, offset + rows)], pa.string()),
                          S.EMBEDDING: S.embedding_array(x), S.TRUNCATED: pa.array(np.zeros(rows, bool))})
        buf = io.BytesIO()
        pq.write_table(table, buf)
        data = buf.getvalue()
        loc.write_bytes(data, "shards", shard_name(s))
        m.commit_shard(s, {"path": f"shards/{shard_name(s)}", "rows": rows, "bytes": len(data),
                           "sha256": hashlib.sha256(data).hexdigest(), "truncated": 0, "tokens": 0,
                           "device_seconds": 0.0, "dead_letters": 0, "reasons": {}})
        offset += rows


def exact(folder: Path, xq, k: int = 10):
    """Exact top-k ids (positions) of the queries, streamed over the shards."""
    import numpy as np

    from reembed.indexes.build import shard_tables
    from reembed.indexes.exact import KnnHeap
    from reembed.manifest import Manifest
    from reembed.storage import Location
    from reembed import schema as S

    loc = Location.from_uri(str(folder))
    heap, offset = KnnHeap(xq, k), 0
    for table in shard_tables(loc, Manifest.load(loc), [S.EMBEDDING]):
        x = S.embedding_matrix(table.column(S.EMBEDDING))
        heap.add(np.arange(offset, offset + len(x)), x)
        offset += len(x)
    return heap.ids.astype(np.int64)


def recall(index, xq, truth, k: int = 10) -> float:
    import numpy as np

    found = index.search(xq, k)[1]
    return float(np.mean([len(set(f.tolist()) & set(t.tolist())) / k for f, t in zip(found, truth)]))


def _end_children() -> None:
    """SIGKILL every process under this one (at this point: only what a failed ``ray.init`` started). On this
    machine a failed start left its gcs_server, dashboard, monitor and log monitor running, one set per try."""
    import signal

    parents: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    parents[int(entry)] = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
    mine, frontier = [], [os.getpid()]
    while frontier:
        kids = [pid for pid, ppid in parents.items() if ppid in frontier]
        mine += kids
        frontier = kids
    for pid in mine:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _cpu_self() -> float:
    """CPU seconds of this process and its waited-for children (user + system)."""
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def _machine() -> dict[str, Any]:
    mem = 0
    try:
        with open("/proc/meminfo") as f:
            mem = int(f.readline().split()[1]) * 1024
    except OSError:
        pass
    return {"platform": platform.platform(), "cpus": os.cpu_count(), "memory_gib": round(mem / 2**30, 1),
            "python": platform.python_version(), "note": "shared development VM (other test runs on the same 2 cores)"}


def _save(path: str, results: dict[str, Any]) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
