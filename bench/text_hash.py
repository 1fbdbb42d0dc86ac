"""Benchmark: the per-row text hash (``reembed.schema.text_hashes``, blake2b-128 of each text's UTF-8 bytes) that
every shard carries and ``--reuse`` compares, in rows/s per core, against what embedding a document costs.

Two corpora: the WordNet gloss extract shipped in ``tests/data`` (4,000 short real texts, repeated to
``--rows``) and ``--rows`` texts of 1,000 characters made of its words. Each is hashed ``--repeats`` times in
this process; the best CPU seconds (``time.process_time``) count, with the wall time and the load average
beside them (the machine is shared). For reference it also times ``raw_buffers``, the same hashes computed
from the Arrow string buffers (no str decode and re-encode): checked equal to ``text_hashes`` row for row.

    python bench/text_hash.py                   # 100,000 rows each
    python bench/text_hash.py --rows 400000

Prints a table and writes ``bench/out/text_hash.json``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import time
from pathlib import Path

import numpy as np
import pyarrow as pa

from reembed import schema as S

WORDNET = Path(__file__).resolve().parents[1] / "tests" / "data" / "wordnet_glosses.jsonl"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=100_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="bench/out/text_hash.json")
    args = ap.parse_args()
    glosses = [json.loads(line)["text"] for line in WORDNET.read_text().splitlines() if line.strip()]
    corpora = {"wordnet glosses": pa.array((glosses * (args.rows // len(glosses) + 1))[: args.rows]),
               "1k-char texts": pa.array(long_texts(glosses, args.rows, 1000))}
    rows = []
    for name, texts in corpora.items():
        ref = S.text_hashes(texts)
        for fn in (S.text_hashes, raw_buffers):
            got, cpu, wall = best_of(fn, texts, args.repeats)
            assert got.equals(ref), f"{fn.__name__} gives other hashes than text_hashes on {name}"
            rows.append({"corpus": name, "how": fn.__name__, "rows": len(texts),
                         "mean_chars": round(float(np.mean([len(t) for t in texts.to_pylist()])), 1),
                         "cpu_s": round(cpu, 4), "wall_s": round(wall, 4),
                         "rows_per_s_per_core": round(len(texts) / cpu), "mb_per_s": round(texts.nbytes / cpu / 1e6)})
    result = {"date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "cpus": os.cpu_count(),
              "load_average": os.getloadavg(), "repeats": args.repeats, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"{'corpus':<16} {'how':<12} {'rows':>8} {'chars':>6} {'CPU s':>7} {'wall s':>7} {'rows/s/core':>12} {'MB/s':>5}")
    for r in rows:
        print(f"{r['corpus']:<16} {r['how']:<12} {r['rows']:>8,} {r['mean_chars']:>6} {r['cpu_s']:>7.3f} "
              f"{r['wall_s']:>7.3f} {r['rows_per_s_per_core']:>12,} {r['mb_per_s']:>5}")
    print(f"load average {result['load_average']}")


def raw_buffers(texts: pa.Array) -> pa.Array:
    """The same blake2b-128 per row, hashed from the Arrow buffers' byte ranges (no nulls in this bench)."""
    texts = texts.cast(pa.large_string())
    n = len(texts)
    offsets = np.frombuffer(texts.buffers()[1], dtype=np.int64)[texts.offset: texts.offset + n + 1].tolist()
    data = memoryview(texts.buffers()[2] or b"")
    blake = hashlib.blake2b
    digests = [blake(data[a:b], digest_size=S.TEXT_HASH_BYTES).digest() for a, b in zip(offsets, offsets[1:])]
    return pa.FixedSizeBinaryArray.from_buffers(S.text_hash_type(), n, [None, pa.py_buffer(b"".join(digests))])


def long_texts(glosses: list[str], n: int, chars: int) -> list[str]:
    """``n`` texts of ``chars`` characters of the glosses' words, drawn with a fixed seed."""
    words = [w for g in glosses for w in g.split()]
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        picks = rng.integers(len(words), size=chars // 3)
        out.append(" ".join(words[i] for i in picks)[:chars])
    return out


def best_of(fn, texts: pa.Array, repeats: int) -> tuple[pa.Array, float, float]:
    best_cpu, best_wall, got = float("inf"), float("inf"), None
    for _ in range(repeats):
        c0, w0 = time.process_time(), time.perf_counter()
        got = fn(texts)
        best_cpu, best_wall = min(best_cpu, time.process_time() - c0), min(best_wall, time.perf_counter() - w0)
    return got, best_cpu, best_wall


if __name__ == "__main__":
    main()
