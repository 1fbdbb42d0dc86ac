"""Re-tune a published IVF index with this checkout's tuner and measure it, without building it again.

For the benchmark output that ``bench/faiss_scale.py`` writes (``--work``/nN, its shards and
``indexes/faiss/index-vV.*``): draws the tuning queries from a fresh uniform sample of the shards, accumulates
their exact neighbours (and those of the benchmark's own fresh queries) in one streamed pass, runs
``reembed.indexes.faiss.tune``, and reports the setting chosen, the tuner's recall@10 (documents and
off-corpus) and recall@10 of the fresh queries at that setting, with CPU seconds per step.

    python bench/faiss_retune.py --folder /tmp/faiss1m/work/n1000000 --version 1 --out bench/out/retune.json
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folder", required=True)
    ap.add_argument("--version", type=int, default=1)
    ap.add_argument("--memory", default="1200M", help="the budget the index was planned with")
    ap.add_argument("--queries", type=int, default=500, help="fresh benchmark queries")
    ap.add_argument("--clusters", type=int, default=1000)
    ap.add_argument("--out", default="bench/out/faiss_retune.json")
    args = ap.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    import logging

    import faiss
    import numpy as np

    from faiss_scale import DIM, queries, recall
    from reembed import schema as S
    from reembed.indexes import faiss as F
    from reembed.indexes.build import shard_tables
    from reembed.indexes.exact import DEPTH, KnnHeap
    from reembed.manifest import Manifest
    from reembed.storage import Location

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    loc = Location.from_uri(args.folder)
    manifest = Manifest.load(loc)
    n = sum(r["rows"] for r in manifest.committed.values())
    plan = F.plan_index(n, DIM, "ivf", args.memory)
    cwd = os.getcwd()
    os.chdir(Path(args.folder) / "indexes" / "faiss")  # the .ivfdata is named relative to its index
    index = faiss.read_index(f"index-v{args.version}.faiss")
    os.chdir(cwd)
    out = {"command": "python " + " ".join(sys.argv), "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
           "n": n, "factory": plan.factory, "load_before": os.getloadavg()}
    c0 = time.process_time()
    pool, pos = F.sample_vectors(shard_tables(loc, manifest, [S.EMBEDDING]), n, plan.train_size)
    xq, exclude = F.tuning_queries(pool, pos, 600, np.random.default_rng(1))
    del pool
    fresh = queries(args.queries, args.clusters)
    heap, truth, offset = KnnHeap(xq, DEPTH * F.K + 1), KnnHeap(fresh, 10), 0
    for table in shard_tables(loc, manifest, [S.EMBEDDING]):
        x = S.embedding_matrix(table.column(S.EMBEDDING))
        heap.add(np.arange(offset, offset + len(x)), x)
        truth.add(np.arange(offset, offset + len(x)), x)
        offset += len(x)
    out["queries_cpu_s"] = round(time.process_time() - c0, 1)
    c1, t1 = time.process_time(), time.monotonic()
    setting, got, off = F.tune(index, plan, xq, exclude, heap, 0.95)
    out.update(tune_cpu_s=round(time.process_time() - c1, 1), tune_wall_s=round(time.monotonic() - t1, 1),
               search=setting, tuned_recall=got, tuned_recall_off_corpus=off,
               recall_at_10=round(recall(index, fresh, truth.ids.astype(np.int64)), 4),
               peak_rss_mb=round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
               load_after=os.getloadavg())
    print(json.dumps(out), flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
