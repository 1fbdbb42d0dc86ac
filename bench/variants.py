"""Embedder variants side by side ((b) only): which fast path buys what on this device.

    python bench/variants.py --model MODEL_DIR --mix fixed128:30000,fixed512:12000 \
        --variants "default;fuse=0;tokenize_workers=0;compile=1" --batch-tokens 131072 --out variants.json

Each variant is ``key=value`` pairs (``;``-separated variants, ``,``-separated pairs) passed to the
Embedder: ``fuse``, ``tokenize_workers``, ``compile``, ``dtype``, ``batch_tokens``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402
from run_bench import run_embedder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--mix", default="fixed128:30000")
    p.add_argument("--variants", default="default")
    p.add_argument("--batch-tokens", type=int)
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--block-rows", type=int, default=10_000)
    p.add_argument("--work", default="bench/out")
    p.add_argument("--out")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    rows = []
    for spec in a.mix.split(","):
        mix, docs = (spec.split(":") + ["30000"])[:2]
        texts = corpus.read_texts(corpus.make_corpus(Path(a.work) / f"corpus-{mix}-{docs}", mix, int(docs)))
        for variant in a.variants.split(";"):
            kw = {}
            for pair in filter(None, variant.split(",")):
                if pair == "default":
                    continue
                k, v = pair.split("=")
                kw[k] = v if k in ("dtype", "backend") else int(v)
            dtype = kw.pop("dtype", a.dtype)
            backend = kw.pop("backend", "auto")
            budget = kw.pop("batch_tokens", a.batch_tokens)
            compile = bool(kw.pop("compile", 0))
            if "fuse" in kw:
                kw["fuse"] = bool(kw["fuse"])
            try:
                r = run_embedder({"name": a.model, "device": a.device, "dtype": dtype, "backend": backend}, texts,
                                 a.block_rows, budget,
                                 compile=compile, **kw)
            except Exception as e:  # record and go on: one broken variant must not lose the others
                logging.exception("variant %s failed", variant)
                rows.append({"mix": mix, "variant": variant, "error": f"{type(e).__name__}: {e}"[:500]})
                continue
            r.pop("vectors", None)
            r.update(mix=mix, variant=variant, docs=len(texts), docs_per_s=round(len(texts) / r["seconds"], 1))
            rows.append(r)
            print(f"{mix:10s} {variant:40s} {r['docs_per_s']:9.1f} docs/s  {r['backend']}  gpu {r['gpu_util']}%  "
                  f"budget {r['batch_tokens']}  fused {r['fused_layers']}  sync-free {r['sync_free_masks']}  "
                  f"workers {r['tokenize_workers']}  compiled {r['compiled']}  prepare {r['prepare_seconds']} s  "
                  f"load+warm {r['load_and_warmup_seconds']} s", flush=True)
    if a.out:
        Path(a.out).write_text(json.dumps(rows, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
