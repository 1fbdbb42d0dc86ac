"""Planning cost of corpus-wide identical texts (``reembed.texts``): the key round (read every planned shard as
the read stage does, hash the texts, partition by text hash) and the partition round (find the leaders, write
the followers parts), per core.

    python bench/text_dedup.py --docs 200000 --distinct 0.5 --out /tmp/text-dedup

The corpus is Parquet, ``--distinct`` of its texts distinct (the others repeat a text anywhere in the corpus).
The process is pinned to one CPU (pyarrow at one thread) and the rounds run in this process (``use_ray=False``:
the same functions the Ray tasks run), so the figures are per core; CPU seconds of this process are the figure,
wall seconds and the load average are printed beside (the machine may be shared). ``--json`` writes the results.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from reembed import read, texts  # noqa: E402
from reembed.config import InputConfig  # noqa: E402
from reembed.plan import input_location, make_plan  # noqa: E402
from reembed.storage import Location  # noqa: E402

WORDS = "the cat dog bird river city music data vector search model token cluster gpu art science".split()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=200_000)
    p.add_argument("--distinct", type=float, default=0.5, help="share of distinct texts")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--shard-rows", type=int, default=10_000)
    p.add_argument("--partitions", type=int, default=None, help="text partitions (default: the plan's rule)")
    p.add_argument("--out", type=Path, default=Path("/tmp/reembed-text-dedup"))
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--run", action="store_true",
                   help="also run the job (reembed.pipeline.run with testing.NullEmbedder, 1024-d) with dedup_texts "
                        "on and off on a local Ray of 2 CPUs: what the copy pass costs against embedding every row")
    args = p.parse_args(argv)

    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    shutil.rmtree(args.out, ignore_errors=True)
    make_corpus(args.out / "in", args.docs, args.distinct, args.files)
    work = Location.from_uri(str(args.out / "out" / "plan"))
    cfg = InputConfig(uri=str(args.out / "in"))
    plan = make_plan(cfg, args.shard_rows, work)
    fields = {k: plan.get(k) for k in read.FIELDS if k not in ("reuse", "texts")}
    source = input_location(plan)
    load0 = os.getloadavg()[0]
    c0, w0 = time.process_time(), time.monotonic()
    summary = texts.plan_texts(plan, work, lambda shards: read.read_shards(fields, work, shards, source),
                               partitions=args.partitions)
    cpu, wall = time.process_time() - c0, time.monotonic() - w0
    # The key round alone (the read dominates it): the same reads and hashing, without the shuffle.
    c1 = time.process_time()
    for a in range(0, plan["shards"], texts.SHARDS_PER_TASK):
        for _ in read.read_shards(fields, work, list(range(a, min(a + texts.SHARDS_PER_TASK, plan["shards"]))), source):
            pass
    read_cpu = time.process_time() - c1
    # The copy pass: the old design read one leader file per distinct leader shard of each copy shard (the
    # scatter); the gather round reads each leader file once and each copy task opens one file per gather task.
    rows = texts.followers(work, 0, plan["shards"] - 1, summary["partitions"])
    origin, leader = rows.column("shard").to_numpy(), rows.column("leader_shard").to_numpy()
    per_copy = [len(np.unique(leader[(origin >= c["origin_first"]) & (origin < c["origin_stop"])]))
                for c in texts.read_copies(work).to_pylist()]
    leads = texts.moved_counts(work, "leads")
    from reembed.copies import gather_groups

    result = {"docs": args.docs, "distinct": args.distinct, "shards": plan["shards"], **summary,
              "cpu_s": round(cpu, 3), "wall_s": round(wall, 3), "docs_per_cpu_s": round(args.docs / cpu),
              "read_cpu_s": round(read_cpu, 3), "shuffle_cpu_s": round(cpu - read_cpu, 3),
              "shuffle_docs_per_cpu_s": round(args.docs / max(cpu - read_cpu, 1e-9)),
              "scatter_leader_files_per_copy_shard": {"mean": round(float(np.mean(per_copy)), 1) if per_copy else 0,
                                                      "max": int(max(per_copy, default=0))},
              "gathered_vectors": int(sum(leads.values())), "leader_files_read": len(leads),
              "gather_tasks": len(gather_groups(leads)),
              "load_avg": [round(load0, 1), round(os.getloadavg()[0], 1)],
              "at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.run:
        result["runs"] = {mode: run_job(args, mode) for mode in ("true", "false")}
    print(json.dumps(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1))
    return 0


def run_job(args, mode: str) -> dict:
    """The job on the bench's corpus with ``plan.dedup_texts`` = ``mode``; its copy log line's seconds."""
    import logging
    import resource

    import ray

    from reembed import pipeline
    from reembed.config import load_config
    from reembed.testing import NullEmbedder

    os.sched_setaffinity(0, set(range(os.cpu_count() or 1)))
    if not ray.is_initialized():
        ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    copies: list[str] = []

    class Grab(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            copies.append(record.getMessage())

    handler = Grab()
    logging.getLogger("reembed.copies").addHandler(handler)
    logging.getLogger("reembed.copies").setLevel(logging.INFO)
    out = args.out / f"out-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"input.uri={args.out / 'in'}", f"output.uri={out}", "model.name=null-1024",
                             f"plan.shard_rows={args.shard_rows}", f"plan.dedup_texts={mode}"])
    c0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.monotonic()
    s = pipeline.run(cfg, embedder=NullEmbedder)
    c1 = resource.getrusage(resource.RUSAGE_SELF)
    logging.getLogger("reembed.copies").removeHandler(handler)
    return {"wall_s": round(time.monotonic() - w0, 1), "driver_cpu_s": round(c1.ru_utime + c1.ru_stime - c0.ru_utime - c0.ru_stime, 1),
            "rows_embedded": s["rows_embedded"], "rows_deduplicated": s["rows_deduplicated"],
            "shards": s["shards"], "phases": {p["phase"]: p["seconds"] for p in s["phases"]},
            "embed_seconds": s["run"].get("embed_seconds"), "copies_log": copies,
            "load_avg": round(os.getloadavg()[0], 1)}


def make_corpus(folder: Path, docs: int, distinct: float, files: int) -> None:
    rng = np.random.default_rng(0)
    n_texts = max(1, int(docs * distinct))
    lengths = rng.integers(20, 80, size=n_texts)
    pool = [" ".join(WORDS[(i + j * 7) % len(WORDS)] for j in range(k)) + f" {i}" for i, k in enumerate(lengths)]
    pick = np.concatenate([np.arange(n_texts), rng.integers(0, n_texts, size=docs - n_texts)])
    rng.shuffle(pick)
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-docs // files)
    for f in range(files):
        rows = range(f * per, min(docs, (f + 1) * per))
        pq.write_table(pa.table({"id": [f"d{i}" for i in rows], "text": [pool[pick[i]] for i in rows]}),
                       folder / f"part-{f:03d}.parquet")


if __name__ == "__main__":
    sys.exit(main())
