"""Synthetic corpora with realistic length mixes, for the benchmarks.

Texts are common English words and full stops, each of which is exactly one token in the BERT uncased
vocabulary (all-MiniLM-L6-v2, BGE), so a document's token count (with [CLS] and [SEP]) is exactly the
length drawn for it. Content does not change the arithmetic of an encoder; length does.

    python bench/corpus.py --mix mixed --docs 100000 --out bench/out/corpus-mixed

Mixes (token lengths, special tokens included):
    short     uniform 32-128                      (titles, queries, chat turns)
    medium    normal around 256 (sd 40)           (paragraphs, support answers)
    long      uniform 512-1536 (cut at the model's max_seq_len)  (articles, pages)
    mixed     60% short + 30% medium + 10% long   (a realistic document store)
    fixed128  exactly 128
    fixed512  exactly 512
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from reembed.tune import WORDS  # noqa: E402  (one BERT token each)

MIXES: dict[str, list[tuple[float, tuple]]] = {
    "short": [(1.0, ("uniform", 32, 128))],
    "medium": [(1.0, ("normal", 256, 40))],
    "long": [(1.0, ("uniform", 512, 1536))],
    "mixed": [(0.6, ("uniform", 32, 128)), (0.3, ("normal", 256, 40)), (0.1, ("uniform", 512, 1536))],
    "fixed128": [(1.0, ("fixed", 128))],
    "fixed512": [(1.0, ("fixed", 512))],
}


def token_lengths(mix: str, n: int, seed: int = 0) -> np.ndarray:
    """Token counts (special tokens included) for ``n`` documents of ``mix``."""
    if mix not in MIXES:
        raise ValueError(f"unknown mix {mix!r} (one of {', '.join(MIXES)})")
    rng = np.random.default_rng(seed)
    parts = MIXES[mix]
    which = rng.choice(len(parts), size=n, p=[w for w, _ in parts])
    out = np.empty(n, dtype=np.int64)
    for k, (_, spec) in enumerate(parts):
        sel = which == k
        m = int(sel.sum())
        if spec[0] == "uniform":
            out[sel] = rng.integers(spec[1], spec[2] + 1, size=m)
        elif spec[0] == "normal":
            out[sel] = np.clip(np.rint(rng.normal(spec[1], spec[2], size=m)), 8, None)
        else:
            out[sel] = spec[1]
    return np.maximum(out, 3)


def texts_for(lengths: np.ndarray, seed: int = 0) -> list[str]:
    """One text per length: ``length - 2`` word/full-stop tokens (plus [CLS] and [SEP] = ``length``)."""
    rng = np.random.default_rng(seed + 1)
    words = np.array(WORDS)
    texts = []
    for k in lengths:
        body = int(k) - 2
        toks = words[rng.integers(0, len(words), size=body)].tolist()
        # A full stop every 8-20 tokens: it replaces a word, so the count stays exact.
        i = int(rng.integers(8, 21))
        while i < body - 1:
            toks[i] = "."
            i += int(rng.integers(8, 21))
        texts.append(" ".join(toks).replace(" .", "."))
    return texts


def make_corpus(out: str | Path, mix: str, docs: int, files: int = 8, seed: int = 0) -> Path:
    """Write ``docs`` documents of ``mix`` as ``files`` Parquet files (columns id, text) under ``out``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out)
    marker = out / f"_{mix}-{docs}-{files}-{seed}.done"
    if marker.exists():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("*.parquet"):
        old.unlink()
    lengths = token_lengths(mix, docs, seed)
    texts = texts_for(lengths, seed)
    bounds = np.linspace(0, docs, files + 1).astype(int)
    for f in range(files):
        lo, hi = bounds[f], bounds[f + 1]
        table = pa.table({"id": [f"{mix}-{i:08d}" for i in range(lo, hi)], "text": texts[lo:hi]})
        pq.write_table(table, out / f"part-{f:03d}.parquet", row_group_size=8192)
    marker.touch()
    return out


def read_texts(folder: str | Path) -> list[str]:
    import pyarrow.parquet as pq

    texts: list[str] = []
    for p in sorted(Path(folder).glob("*.parquet")):
        texts.extend(pq.read_table(p, columns=["text"]).column("text").to_pylist())
    return texts


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mix", default="mixed", choices=list(MIXES))
    p.add_argument("--docs", type=int, default=100_000)
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    print(make_corpus(a.out, a.mix, a.docs, a.files, a.seed))


if __name__ == "__main__":
    main()
