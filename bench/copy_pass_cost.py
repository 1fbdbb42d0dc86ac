"""What the copy pass of corpus-wide identical texts costs per copied row, against what embedding a row costs.

    PYTHONPATH=src python bench/copy_pass_cost.py --docs 30000 --fractions 0.01,0.1,0.3 --json out.json

For each repeat fraction ``f`` (the share of rows whose text repeats an earlier row's, anywhere in the corpus)
the real job (``reembed.pipeline.run``, tiny 32-d BERT from ``reembed.testing``, torch backend) runs twice in
this process on one local Ray of 2 CPUs: ``plan.dedup_texts=true`` and ``false`` (the baseline). Timed around
the stages (the module functions wrapped here): the text planning (``texts.plan_texts``), the regular pass
(``pipeline._write_on_workers``) and the copy pass (``copies.run_copies``). CPU seconds are those of this
process and every process under it (the Ray cluster: /proc utime + stime, reaped children included), so they
hold on a shared machine; wall seconds and the load average are printed beside.

Per copied row it reports the copy pass's CPU seconds (and wall), the text planning's extra CPU seconds per
input row, the tiny model's embedding CPU seconds per row (the baseline run's regular pass over its rows), and
the recorded GPU figure: 0.24 ms per row (H100, BGE-large architecture, 4,251 docs/s, bench/RESULTS.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

GPU_S_PER_ROW = 0.24e-3  # H100, BGE-large architecture, the Embedder: 4,251 docs/s (bench/RESULTS.md, 2026-11-25)
TICK = os.sysconf("SC_CLK_TCK")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", type=int, default=30_000)
    p.add_argument("--fractions", default="0.01,0.1,0.3")
    p.add_argument("--shard-rows", type=int, default=2_000)
    p.add_argument("--files", type=int, default=4)
    p.add_argument("--out", type=Path, default=Path("/tmp/reembed-copy-pass-cost"))
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)

    import ray

    from reembed.testing import tiny_bert
    from text_dedup import make_corpus

    shutil.rmtree(args.out, ignore_errors=True)
    model = tiny_bert(args.out / "tiny-bert")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    results = []
    try:
        for f in [float(x) for x in args.fractions.split(",")]:
            make_corpus(args.out / f"in-{f}", args.docs, 1.0 - f, args.files)
            base = run_job(args, model, f, "false")
            dedup = run_job(args, model, f, "true")
            copied = dedup["rows_copied_by_copy_shards"]
            embed_cpu_row = base["stages"]["regular pass"]["cpu_s"] / max(1, base["rows_embedded"])
            copy = dedup["stages"].get("copy pass", {"cpu_s": 0.0, "wall_s": 0.0})
            row = {"fraction": f, "docs": args.docs, "copied_rows": copied,
                   "rows_deduplicated": dedup["rows_deduplicated"],
                   "copy_cpu_s_per_row": copy["cpu_s"] / copied if copied else None,
                   "copy_wall_s_per_row": copy["wall_s"] / copied if copied else None,
                   "copy_pass_cpu_s": copy["cpu_s"], "copy_pass_wall_s": copy["wall_s"],
                   "plan_texts_cpu_s": dedup["stages"]["plan texts"]["cpu_s"],
                   "plan_texts_cpu_s_per_input_row": dedup["stages"]["plan texts"]["cpu_s"] / args.docs,
                   "tiny_embed_cpu_s_per_row": embed_cpu_row, "gpu_s_per_row": GPU_S_PER_ROW,
                   "copy_over_gpu": (copy["cpu_s"] / copied / GPU_S_PER_ROW) if copied else None,
                   "copy_over_tiny": (copy["cpu_s"] / copied / embed_cpu_row) if copied and embed_cpu_row else None,
                   "with_texts": dedup, "baseline": base}
            results.append(row)
            print(json.dumps({k: v for k, v in row.items() if k not in ("with_texts", "baseline")}), flush=True)
    finally:
        ray.shutdown()
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                         "results": results}, indent=1))
    return 0


def run_job(args, model: Path, fraction: float, mode: str) -> dict:
    """The job with ``plan.dedup_texts=mode``: its counts and each stage's wall and CPU seconds."""
    from reembed import copies, pipeline, texts
    from reembed.config import load_config

    stages: dict[str, dict[str, float]] = {}
    wrapped = [(texts, "plan_texts", "plan texts"), (pipeline, "_write_on_workers", "regular pass"),
               (copies, "run_copies", "copy pass")]
    originals = [(mod, name, getattr(mod, name)) for mod, name, _ in wrapped]
    for mod, name, label in wrapped:
        setattr(mod, name, timed(getattr(mod, name), label, stages))
    out = args.out / f"out-{fraction}-{mode}"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"input.uri={args.out / f'in-{fraction}'}", f"output.uri={out}", f"model.name={model}",
                             "model.backend=torch", f"plan.shard_rows={args.shard_rows}", f"plan.dedup_texts={mode}"])
    try:
        c0, w0 = cpu_seconds(), time.monotonic()
        s = pipeline.run(cfg)
        c1, w1 = cpu_seconds(), time.monotonic()
    finally:
        for mod, name, fn in originals:
            setattr(mod, name, fn)
    from reembed.manifest import Manifest
    from reembed.storage import Location

    texts_plan = Manifest.load(Location.from_uri(str(out))).plan.get("texts") or {}
    return {"mode": mode, "wall_s": round(w1 - w0, 2), "cpu_s": round(spent(c0, c1), 2),
            "rows_embedded": s["rows_embedded"],
            "rows_deduplicated": s["rows_deduplicated"], "rows_copied_by_copy_shards": int(texts_plan.get("moved", 0)),
            "copy_shards": int(texts_plan.get("copies", 0)), "stages": stages,
            "load_avg": [round(x, 1) for x in os.getloadavg()]}


def timed(fn, label: str, stages: dict):
    def wrapper(*a, **kw):
        c0, w0 = cpu_seconds(), time.monotonic()
        try:
            return fn(*a, **kw)
        finally:
            got = stages.setdefault(label, {"cpu_s": 0.0, "wall_s": 0.0})
            got["cpu_s"] += spent(c0, cpu_seconds())
            got["wall_s"] += time.monotonic() - w0
            got["load_avg_1m"] = round(os.getloadavg()[0], 1)
    return wrapper


def cpu_seconds() -> dict[int, float]:
    """A snapshot of the CPU seconds of this process and every process under it (utime + stime, and what each
    reaped: cutime + cstime), by pid; :func:`spent` takes the difference of two."""
    parent: dict[int, int] = {}
    times: dict[int, float] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        parent[int(name)] = int(fields[1])
        times[int(name)] = sum(int(x) for x in fields[11:15]) / TICK
    me = os.getpid()
    mine = {}
    for pid, t in times.items():
        p, seen = pid, 0
        while p and p != me and seen < 64:
            p, seen = parent.get(p, 0), seen + 1
        if p == me:
            mine[pid] = t
    return mine


def spent(before: dict[int, float], after: dict[int, float]) -> float:
    """CPU seconds between two snapshots: each live process's growth (a new one's whole time). A process that
    ended in between is not counted past the first snapshot unless a process here reaped it (an underestimate of
    its last moments: the Embedder actors that exit as the regular pass ends)."""
    return sum(t - before.get(pid, 0.0) for pid, t in after.items())


if __name__ == "__main__":
    sys.exit(main())
