"""Benchmark: how the Qdrant rows of the storage options' table depend on the collection's segments.

`reembed validate --quantization` searches one Qdrant Edge segment per shard of the output (the work stays in the
shard tasks). Qdrant rescores ``oversampling x limit`` candidates in each segment, so with rescoring the figure
rises with the number of segments; without it, it hardly moves. This bench searches the same vectors and the
validation's sampled queries (seed 0, each query's own document filtered out: 10 results, Qdrant rescoring
2 x 10 candidates per segment) with the whole set in segments of ``--segment`` rows, through the same Edge
shards the validation builds.

    python bench/qdrant_edge_segments.py --vectors minilm-4000.npz --segment 4000 500 --out results.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--vectors", type=Path, required=True, help=".npz with the documents' vectors (array docs)")
    ap.add_argument("--segment", type=int, nargs="+", default=[4000, 500], help="rows a segment (default 4000 500)")
    ap.add_argument("--sample", type=int, default=500, help="sampled documents as queries (default 500)")
    ap.add_argument("--out", type=Path, required=True, help="the results' JSON file")
    args = ap.parse_args(argv)
    import qdrant_edge as qe

    from reembed.validation import quantization as Qz

    t0, load0 = time.monotonic(), os.getloadavg()
    x = Qz.normalize(np.load(args.vectors)["docs"])
    positions = np.sort(np.random.default_rng(0).choice(len(x), args.sample, replace=False))
    exact = x[positions] @ x.T
    ref = [[int(i) for i in np.argsort(-exact[r], kind="stable")[:11] if i != p][:10] for r, p in enumerate(positions)]
    rows = []
    for segment in args.segment:
        for kind in ("int8", "binary"):
            hits = {rescore: [[] for _ in positions] for rescore in (True, False)}
            for lo in range(0, len(x), segment):
                with tempfile.TemporaryDirectory() as folder:
                    edge = Qz._build_edge(kind, x[lo:lo + segment], folder, lo // segment)
                    for rescore, per in hits.items():
                        params = qe.SearchParams(quantization=qe.QuantizationSearchParams(
                            ignore=False, rescore=rescore, oversampling=Qz.OVERSAMPLING if rescore else None))
                        found = edge.query_batch(qe.QueryBatchRequest([qe.QueryRequest(  # 10, not the query itself
                            limit=10, query=qe.Query.Nearest(v), params=params,
                            filter=qe.Filter(must_not=[qe.HasIdCondition({int(p) - lo})]) if lo <= p < lo + segment
                            else None)
                            for v, p in zip(x[positions].tolist(), positions)]))
                        for mine, got in zip(per, found):
                            mine += [(h.score, lo + h.id) for h in got]
                    edge.close()
            for rescore, per in hits.items():
                got = [[i for _, i in sorted(h, key=lambda t: -t[0])][:10] for h in per]
                recall = float(np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got, ref)]))
                rows.append({"segment_rows": segment, "segments": -(-len(x) // segment), "quantization": kind,
                             "rescore": rescore, "recall_at_10": round(recall, 4)})
                print(f"| {segment} | {rows[-1]['segments']} | {kind} | {'yes' if rescore else 'no'} | {recall:.4f} |")
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result = {"vectors": str(args.vectors), "rows": len(x), "dimension": x.shape[1], "queries": len(positions),
              "qdrant_edge": Qz.edge_version(), "table": rows, "wall_s": round(time.monotonic() - t0, 1),
              "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
              "load_avg": [round(v, 1) for v in (*load0, *os.getloadavg())],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.out.write_text(json.dumps(result, indent=1))
    print(f"{result['wall_s']} s wall, {result['cpu_s']} CPU s, load average {result['load_avg']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
