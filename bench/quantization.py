"""Benchmark: bytes per vector and recall@10 of every storage option, as `reembed validate --quantization`
reports them.

* ``wordnet``: the shipped WordNet extract (tests/data/wordnet_glosses.jsonl, 4,000 glosses) embedded by the real
  all-MiniLM-L6-v2 (384-d) through `reembed run` (local Ray, CPU), then validated with ``--quantization``.
* ``clustered``: seeded clustered synthetic unit vectors (tests/index_fixtures.clustered) at 1024-d, the width
  of BGE-large, written as a committed output; the model that embeds validation's text queries is a random
  1024-d BERT (only its dimension matters: the table's queries here are the sampled documents).

Queries are the validation's sampled documents (``--sample``), each left out of its own results. CPU seconds
(this process and its children) and the load average are recorded beside the wall time.

    python bench/quantization.py --set wordnet [--no-ray] --out bench/results/2026-11-30-quantization
    python bench/quantization.py --set wordnet --vectors minilm-4000.npz --cli --out /tmp/quant-edge

``--vectors NPZ``: the glosses' all-MiniLM-L6-v2 vectors already computed (array ``docs``, 4,000 x 384, in the
extract's order) instead of embedding them again. ``--cli``: the table from the real command,
``reembed validate OUTPUT --quantization`` in a subprocess (its report.json), instead of the library call.
    python bench/quantization.py --set clustered --rows 20000 --out bench/results/2026-11-30-quantization
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
DATA = ROOT / "tests" / "data"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", choices=["wordnet", "clustered"], default="wordnet")
    ap.add_argument("--rows", type=int, default=20_000, help="clustered: vectors (default 20,000)")
    ap.add_argument("--dim", type=int, default=1024, help="clustered: dimension (default 1024)")
    ap.add_argument("--sample", type=int, default=500, help="sampled documents as queries (default 500)")
    ap.add_argument("--out", type=Path, required=True, help="folder for the output and results.json")
    ap.add_argument("--no-ray", action="store_true", help="wordnet: embed in this process instead of `reembed run`")
    ap.add_argument("--vectors", type=Path, help="wordnet: the glosses' vectors already computed (.npz, array docs)")
    ap.add_argument("--cli", action="store_true", help="run `reembed validate --quantization` in a subprocess")
    args = ap.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    t0, load0 = time.monotonic(), os.getloadavg()
    output = (_wordnet(args.out, not args.no_ray, args.vectors) if args.set == "wordnet"
              else _clustered(args.out, args.rows, args.dim))
    from reembed import validation as V

    t1 = time.monotonic()
    if args.cli:
        command = [sys.executable, "-m", "reembed", "validate", output, "--quantization", "--sample", str(args.sample),
                   "--no-builtin-pairs", "--workers", "0"]
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")])}
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        print(done.stdout + done.stderr)
        if done.returncode not in (0, 1):  # 1: a gate failed; the table is there all the same
            return done.returncode
        report = json.loads((Path(output) / "validation" / "report.json").read_text())
    else:
        report = V.validate(output, settings=V.Settings(sample=args.sample, builtin_pairs=False, quantization=True),
                            workers=0, write=False)
    validate_s = time.monotonic() - t1
    usage = [resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    result = {"set": args.set, "rows": report["rows"], "dimension": report["model"]["dimension"],
              "model": report["model"]["name"], "table": report["quantization"], "validate_wall_s": round(validate_s, 1),
              "via": "reembed validate --quantization (CLI)" if args.cli else "reembed.validation.validate",
              "wall_s": round(time.monotonic() - t0, 1),
              "cpu_s": round(sum(u.ru_utime + u.ru_stime for u in usage), 1),
              "load_avg": [round(v, 1) for v in (*load0, *os.getloadavg())],
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    (args.out / f"{args.set}.json").write_text(json.dumps(result, indent=1))
    print(f"{args.set}: {result['rows']} vectors, {result['dimension']}-d, {report['quantization']['queries']} queries")
    print("| option | bytes / vector | x smaller | recall@10 | how |")
    print("|---|---|---|---|---|")
    for o in report["quantization"]["options"]:
        print(f"| {o['label']} | {o['bytes_per_vector']} | {o['compression']} | {o['recall_at_10']} | {o['how']} |")
    print(f"validate {validate_s:.1f} s wall; whole bench {result['wall_s']} s wall, {result['cpu_s']} CPU s; "
          f"load average {result['load_avg']}")
    return 0


def _wordnet(out: Path, ray: bool, vectors: Path | None = None) -> str:
    """The glosses embedded by all-MiniLM-L6-v2: through the real job (``ray``; resumes if already there), or
    in this process by the query path's embedder (the same model and backend) and written as committed shards
    (for a machine too loaded to start Ray), or taken from ``vectors`` and written the same way."""
    import numpy as np

    from reembed.testing import minilm_path

    target = out / "wordnet-minilm"
    if vectors is not None:
        if not (target / "manifest.json").exists():
            from index_fixtures import write_output

            docs = np.load(vectors)["docs"]
            assert len(docs) == len((DATA / "wordnet_glosses.jsonl").read_text().splitlines()), docs.shape
            write_output(target, docs, 500, model_name=str(minilm_path()))
    elif ray:
        from reembed import pipeline
        from reembed.config import load_config

        pipeline.run(load_config(None, [f"input.uri={DATA / 'wordnet_glosses.jsonl'}", f"output.uri={target}",
                                        f"model.name={minilm_path()}", "plan.shard_rows=500",
                                        "input.passthrough=[text]"]))
    elif not (target / "manifest.json").exists():
        from index_fixtures import write_output
        from reembed.indexes.search import text_embedder

        texts = [json.loads(line)["text"] for line in (DATA / "wordnet_glosses.jsonl").read_text().splitlines()]
        write_output(target, text_embedder(str(minilm_path()), None, "cpu")(texts), 500, model_name=str(minilm_path()))
    return str(target)


def _clustered(out: Path, rows: int, dim: int) -> str:
    from index_fixtures import clustered, write_output
    from reembed.testing import tiny_bert

    model = tiny_bert(out / f"random-bert-{dim}", hidden=dim, layers=1, heads=4)
    target = out / f"clustered-{rows}x{dim}"
    if not (target / "manifest.json").exists():
        write_output(target, clustered(rows, dim, clusters=100, spread=0.6, seed=0), 2_000, model_name=str(model))
    return str(target)


if __name__ == "__main__":
    raise SystemExit(main())
