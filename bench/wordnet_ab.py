"""The WordNet reverse-dictionary A/B computed directly (no reembed pipeline): each model embeds the shipped
glosses and queries with SentenceTransformer.encode, exact cosine top-10, recall@10 and nDCG@10. The reference
the test's `reembed validate` figures are compared with.

    python bench/wordnet_ab.py            # all-MiniLM-L6-v2 vs all-mpnet-base-v2, both from PyPI packages
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

DATA = Path(__file__).resolve().parent.parent / "tests" / "data"


def main() -> None:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))
    from sentence_transformers import SentenceTransformer

    from reembed.models_pypi import minilm_folder, mpnet_folder

    docs = [json.loads(line) for line in open(DATA / "wordnet_glosses.jsonl")]
    queries = [json.loads(line) for line in open(DATA / "wordnet_queries.jsonl")]
    ids = np.array([d["id"] for d in docs])
    for name, folder in (("all-MiniLM-L6-v2", minilm_folder()), ("all-mpnet-base-v2", mpnet_folder())):
        model = SentenceTransformer(str(folder), device="cpu")
        t0 = time.monotonic()
        dv = model.encode([d["text"] for d in docs], batch_size=64, normalize_embeddings=True)
        secs = time.monotonic() - t0
        qv = model.encode([q["query"] for q in queries], batch_size=64, normalize_embeddings=True)
        top = ids[np.argsort(-(qv @ dv.T), axis=1)[:, :10]]
        recall = np.mean([q["relevant"][0] in row for q, row in zip(queries, top)])
        ndcg = np.mean([next((1 / math.log2(r + 2) for r, d in enumerate(row) if d == q["relevant"][0]), 0.0)
                        for q, row in zip(queries, top)])
        print(json.dumps({"model": name, "docs": len(docs), "queries": len(queries), "recall@10": round(float(recall), 4),
                          "ndcg@10": round(float(ndcg), 4), "encode_docs_seconds": round(secs, 1)}))


if __name__ == "__main__":
    main()
