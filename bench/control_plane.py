"""Benchmark: the job's control plane at 1k-50k shards, with a NULL embedder (fixed 1024-d vectors, no model).

Runs the real job path, ``reembed.pipeline.run``: plan -> Ray Data read tasks -> actor pool (here
:class:`reembed.testing.NullEmbedder`) -> per-block summary tasks -> writer tasks on the workers -> commit records through
the commit log. With no model the figures are what the job costs around the embedding: per shard and per
document, on the driver and in the commit log.

Per size N (shards of ``--shard-rows`` documents):

* commit cost per shard: bytes the commit log holds per committed shard (entries plus checkpoint parts, i.e.
  amortized) and driver seconds per ``Manifest.commit_shard`` call (timed around the real call);
* read task size: the pickled size of one read task of the plan, and seconds from the start of the run to
  the first embedded block routed on the driver;
* driver CPU: user + system seconds of the driver process over the run, per shard and per document (Ray's
  core-worker threads in that process included), and the driver's peak RSS; also the planning's share, and
  the steady state: CPU between the first and the latest commit per shard committed in between;
* ``status``: seconds for ``reembed.pipeline.status`` on the finished output.

    python bench/control_plane.py                            # 1k, 10k, 50k shards of 10 documents
    python bench/control_plane.py --sizes 1000,10000,20000 --shard-rows 10 --cpus 2
    python bench/control_plane.py --sizes 50000 --max-minutes 30   # stop after 30 min, report what ran
    python bench/control_plane.py --sizes 50000 --max-minutes 30 --workdir /data/cp   # kept: run it again to resume

Prints a table and writes ``bench/out/control_plane.json``. The baseline for driver CPU per document is
issue 12's measurement of the old path (the driver sorted, encoded, hashed, wrote and verified every shard):
0.43 CPU-s per 10,000 x 1024 shard = 43 us per document.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

import numpy as np  # noqa: E402

from reembed.testing import NullEmbedder  # noqa: E402

DIM = 1024
OLD_DRIVER_US_PER_DOC = 43.0  # issue 12: 0.43 CPU-s per 10,000-row 1024-d shard on the driver


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="1000,10000,50000", help="shard counts, comma-separated")
    ap.add_argument("--shard-rows", type=int, default=10)
    ap.add_argument("--cpus", type=int, default=None, help="CPUs of the local Ray (default: all)")
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop a size's run after this long (Ctrl-C, as a user would: the writers in flight are "
                         "committed) and report the shards committed by then; the per-shard figures are then "
                         "over the part that ran (best effort: Ray Data may not take the interrupt at once)")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "out"))
    ap.add_argument("--tmp", default=None, help="where inputs and outputs are written (default: system temp)")
    ap.add_argument("--workdir", default=None,
                    help="keep each size's input and output under WORKDIR/shards-N: running the same command "
                         "again resumes a size that was stopped (the figures then cover the shards committed "
                         "by that run; 'resumed_from' says how many were committed before it)")
    args = ap.parse_args(argv)
    import ray

    for attempt in range(5):  # on a loaded machine the raylet may miss Ray's fixed 30 s start-up wait
        try:
            ray.init(address="local", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                     logging_level="WARNING")
            break
        except Exception as e:  # Ray raises a bare Exception for it
            if "timed out during startup" not in str(e) or attempt == 4:
                raise
            ray.shutdown()
            time.sleep(10)
    rows = []
    os.makedirs(args.out, exist_ok=True)
    for n in [int(s) for s in args.sizes.split(",")]:
        if args.workdir:
            root = Path(args.workdir, f"shards-{n}")
            root.mkdir(parents=True, exist_ok=True)
            rows.append(bench_size(root, n, args.shard_rows, args.max_minutes))
        else:
            with tempfile.TemporaryDirectory(dir=args.tmp) as d:
                rows.append(bench_size(Path(d), n, args.shard_rows, args.max_minutes))
        print_row(rows[-1])
        result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "machine": machine(),
                  "shard_rows": args.shard_rows, "dim": DIM, "old_driver_us_per_doc": OLD_DRIVER_US_PER_DOC,
                  "rows": rows}
        Path(args.out, "control_plane.json").write_text(json.dumps(result, indent=1))  # after each size
    return 0


def bench_size(root: Path, shards: int, shard_rows: int, max_minutes: float | None = None) -> dict[str, Any]:
    import _thread
    import threading

    import pyarrow as pa
    import pyarrow.parquet as pq

    from reembed import manifest as manifest_mod
    from reembed import pipeline, write
    from reembed.config import load_config

    docs = shards * shard_rows
    before = 0
    if (root / "out" / "manifest.json").exists():  # a kept --workdir: this run resumes
        before = pipeline.status(str(root / "out"))["committed"]
    else:
        (root / "in").mkdir(exist_ok=True)
        pq.write_table(pa.table({"id": pa.array(np.char.add("d", np.arange(docs).astype(str))),
                                 "text": pa.array(np.full(docs, "x"))}),
                       root / "in" / "docs.parquet", row_group_size=max(shard_rows, 10_000))
    cfg = load_config(None, [f"input.uri={root / 'in'}", f"output.uri={root / 'out'}", f"model.name=null-{DIM}",
                             f"plan.shard_rows={shard_rows}", "compute.min_actors=1", "compute.max_actors=1",
                             "compute.cpus_per_actor=1"])

    commit_s: list[float] = []
    commit_cpu: list[float] = []  # driver CPU at the first and at the latest commit
    first_block: list[float] = []
    planned: list[tuple[float, float]] = []  # (wall, driver CPU) of planning
    real_commit, real_add, real_plan = manifest_mod.Manifest.commit_shard, write.ShardRouter.add, pipeline.make_plan

    def timed_commit(self, shard, record):
        t = time.perf_counter()
        real_commit(self, shard, record)
        commit_s.append(time.perf_counter() - t)
        now = _cpu()
        if commit_cpu:
            commit_cpu[1:] = [now]
        else:
            commit_cpu.append(now)

    def noted_add(self, block, summary):
        if not first_block:
            first_block.append(time.perf_counter())
        return real_add(self, block, summary)

    def timed_plan(*a, **k):
        c, t = _cpu(), time.perf_counter()
        plan = real_plan(*a, **k)
        planned.append((time.perf_counter() - t, _cpu() - c))
        return plan

    manifest_mod.Manifest.commit_shard, write.ShardRouter.add, pipeline.make_plan = timed_commit, noted_add, timed_plan
    load_before = os.getloadavg()
    stop = threading.Timer(60 * max_minutes, _thread.interrupt_main) if max_minutes else None
    partial = False
    try:
        cpu0, t0 = _cpu(), time.perf_counter()
        if stop:
            stop.start()
        try:
            summary = pipeline.run(cfg, embedder=NullEmbedder)
            assert summary["complete"] and summary["embedded"] == docs, {k: summary[k] for k in ("complete", "embedded")}
        except KeyboardInterrupt:
            if not stop or stop.is_alive():
                raise
            partial = True
        wall, cpu = time.perf_counter() - t0, _cpu() - cpu0
    finally:
        if stop:
            stop.cancel()
        manifest_mod.Manifest.commit_shard, write.ShardRouter.add, pipeline.make_plan = real_commit, real_add, real_plan

    committed = len(commit_s)
    log_bytes = sum(p.stat().st_size for p in (root / "out" / "_log").rglob("*") if p.is_file())
    t = time.perf_counter()
    status = pipeline.status(str(root / "out"))
    status_s = time.perf_counter() - t
    assert status["committed"] == before + committed, (status["committed"], before, committed)
    # Steady state: the driver's CPU between the first and the latest commit, per shard committed in
    # between (planning and start-up left out); the whole-run figure includes them.
    steady = (commit_cpu[-1] - commit_cpu[0]) / (committed - 1) if committed > 1 and len(commit_cpu) > 1 else None
    return {
        "shards": shards, "docs": docs, "committed": committed, "resumed_from": before, "total_committed": before + committed,
        "partial": partial, "wall_s": round(wall, 2),
        "plan_wall_s": round(planned[0][0], 2) if planned else None,
        "plan_driver_cpu_s": round(planned[0][1], 3) if planned else None,
        "commit_bytes_per_shard": round(log_bytes / max(before + committed, 1), 1),
        "commit_ms_median": round(1000 * sorted(commit_s)[len(commit_s) // 2], 3) if commit_s else None,
        "commit_ms_p99": round(1000 * sorted(commit_s)[int(0.99 * (len(commit_s) - 1))], 3) if commit_s else None,
        **read_task_bytes(root / "out"),
        "first_block_s": round(first_block[0] - t0, 2) if first_block else None,
        "driver_cpu_s": round(cpu, 2), "driver_cpu_ms_per_shard": round(1000 * cpu / max(committed, 1), 3),
        "driver_cpu_ms_per_shard_steady": round(1000 * steady, 3) if steady is not None else None,
        "driver_cpu_us_per_doc": round(1e6 * cpu / max(committed * shard_rows, 1), 2),
        # The driver's work is per block and per shard, not per document (no vector passes through it):
        # at production shards of 10,000 documents a document costs the per-shard figure / 10,000.
        "driver_cpu_us_per_doc_at_10k_rows": round(1e6 * cpu / max(committed, 1) / 10_000, 3),
        "driver_cpu_us_per_doc_at_10k_rows_steady": round(1e6 * steady / 10_000, 4) if steady is not None else None,
        "driver_cpu_vs_old": round(1e6 * cpu / max(committed, 1) / 10_000 / OLD_DRIVER_US_PER_DOC, 4),
        "driver_cpu_vs_old_steady": round(1e6 * steady / 10_000 / OLD_DRIVER_US_PER_DOC, 5) if steady is not None else None,
        "driver_peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "status_s": round(status_s, 3),
        # The machine may be shared: CPU seconds are the figures to compare, wall depends on the load.
        "load_before": [round(x, 2) for x in load_before], "load_after": [round(x, 2) for x in os.getloadavg()],
    }


def read_task_bytes(out: Path) -> dict[str, int]:
    """Pickled size of the largest of a few read tasks of the finished output's plan (all shards pending),
    and how many read tasks that plan makes."""
    import ray.cloudpickle as cloudpickle

    from reembed.manifest import Manifest
    from reembed.read import ShardDatasource
    from reembed.storage import Location

    loc = Location.from_uri(str(out))
    m = Manifest.load(loc)
    shards = list(range(m.shard_count))
    tasks = ShardDatasource(m.plan, loc, shards).get_read_tasks(len(shards))
    return {"read_task_bytes": max(len(cloudpickle.dumps(t)) for t in [tasks[0], tasks[len(tasks) // 2], tasks[-1]]),
            "read_tasks": len(tasks)}


def _cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def print_row(r: dict[str, Any]) -> None:
    print(f"{r['shards']:>7} shards {r['docs']:>8} docs  {r['committed']} committed{' (stopped)' if r['partial'] else ''}  "
          f"plan {r['plan_driver_cpu_s']} CPU-s  steady {r['driver_cpu_ms_per_shard_steady']} ms/shard  wall {r['wall_s']:>7.1f} s  commit {r['commit_bytes_per_shard']:>6.0f} B/shard "
          f"{r['commit_ms_median']:>6.2f} ms (p99 {r['commit_ms_p99']:.2f})  read task {r['read_task_bytes']:>7} B ({r['read_tasks']} tasks)  "
          f"first block {r['first_block_s']} s  driver {r['driver_cpu_ms_per_shard']:.2f} ms/shard "
          f"{r['driver_cpu_us_per_doc']:.1f} us/doc here, {r['driver_cpu_us_per_doc_at_10k_rows']:.2f} us/doc at "
          f"10k-row shards ({100 * r['driver_cpu_vs_old']:.1f}% of old)  "
          f"peak RSS {r['driver_peak_rss_mb']} MB  status {r['status_s']} s", flush=True)


def machine() -> dict[str, Any]:
    return {"python": platform.python_version(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "load": os.getloadavg()}


if __name__ == "__main__":
    sys.exit(main())
