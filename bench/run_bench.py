"""Benchmark: the naive loop vs reembed's Embedder vs the full Ray job, on the same data and model.

    (a) naive     the migration-guide loop: ``SentenceTransformer.encode`` per batch of 32, then ``.tolist()``
    (b) embedder  ``reembed.embed.Embedder`` alone, block by block (``embed_stream``): token-budget batches
    (c) job       the whole Ray job, ``reembed.pipeline.run``: read -> Embedder actor -> Parquet shards + manifest

For each: docs/s, real (non-padding) tokens/s, padding share, model FLOP utilisation (MFU) against the
GPU's datasheet dense bf16/fp16 peak and against a measured large-matmul rate, and mean GPU utilisation
(NVML). For (c) two rates: end to end (the ``pipeline.run`` call with the Ray cluster already up: plan,
model check, actor start and model load included) and marginal (the same job on 16 documents is timed
first; marginal docs/s = extra documents / extra seconds, i.e. the rate a long job runs at).

    python bench/run_bench.py --model minilm --mix mixed --docs 4000 --naive-docs 1000          # CPU
    python bench/run_bench.py --model bge-large-random --tokenizer TOKDIR --mix fixed128,fixed512,mixed \
        --docs 120000 --naive-docs 20000 --tune                                                  # GPU

Writes ``results.json`` and ``results.md`` under ``--out``.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import corpus  # noqa: E402

log = logging.getLogger("bench")

H100_PEAK_TFLOPS = 989.0  # H100 SXM datasheet, dense bf16/fp16 tensor core
ROWS_NAIVE_BATCH = 32


# ---------------------------------------------------------------------------------------------------
# Model arithmetic


def flops_per_doc(config, lengths: np.ndarray) -> np.ndarray:
    """Forward FLOPs of a BERT-style encoder per document of ``lengths`` real tokens: 2 x the
    weight-matrix multiply-adds per token, plus QK^T and AV (4 x len^2 x hidden per layer)."""
    d, layers = config.hidden_size, config.num_hidden_layers
    ff = getattr(config, "intermediate_size", 4 * d)
    per_token = 2 * layers * (4 * d * d + 2 * d * ff)
    lengths = lengths.astype(np.float64)
    return lengths * per_token + layers * 4.0 * lengths**2 * d


class GpuSampler:
    """Mean GPU utilisation (NVML 'utilization.gpu', sampled every 100 ms) over a phase."""

    def __init__(self):
        self.samples: list[int] = []
        self._stop = threading.Event()
        self._handle = None
        try:
            import pynvml

            pynvml.nvmlInit()
            self._nvml = pynvml
            self._handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        except Exception:  # no NVML (CPU machine): nothing to sample
            self._nvml = None

    def __enter__(self):
        if self._handle is not None:
            self._thread = threading.Thread(target=self._run, daemon=True)
            self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.1):
            self.samples.append(self._nvml.nvmlDeviceGetUtilizationRates(self._handle).gpu)

    def __exit__(self, *exc):
        self._stop.set()
        if self._handle is not None:
            self._thread.join()

    @property
    def mean(self) -> float | None:
        return round(statistics.fmean(self.samples), 1) if self.samples else None


def measure_matmul_tflops() -> float | None:
    """bf16 8192^3 matmul rate on this GPU (median of 20 after warm-up), random data."""
    import torch

    if not torch.cuda.is_available():
        return None
    n = 8192
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    for _ in range(5):
        a @ b
    times = []
    for _ in range(20):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        a @ b
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1000)
    del a, b
    torch.cuda.empty_cache()
    return round(2 * n**3 / statistics.median(times) / 1e12, 1)


# ---------------------------------------------------------------------------------------------------
# The three contenders


def run_naive(model_path: str, texts: list[str], device: str, dtype: str) -> dict[str, Any]:
    import torch
    from sentence_transformers import SentenceTransformer

    model = SentenceTransformer(model_path, device=device, model_kwargs={"dtype": getattr(torch, dtype)})
    model.encode(texts[:2 * ROWS_NAIVE_BATCH], batch_size=ROWS_NAIVE_BATCH)  # warm-up
    _sync(device)
    vectors = []
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        for i in range(0, len(texts), ROWS_NAIVE_BATCH):
            vectors.extend(model.encode(texts[i:i + ROWS_NAIVE_BATCH], batch_size=ROWS_NAIVE_BATCH).tolist())
        seconds = time.perf_counter() - t0
    del model
    _free(device)
    return {"seconds": seconds, "gpu_util": gpu.mean, "vectors": np.asarray(vectors, dtype=np.float32)}


def run_embedder(model_args: dict[str, Any], texts: list[str], block_rows: int, batch_tokens: int | None,
                 compile: bool = False, keep: int = 0, **embedder_kwargs) -> dict[str, Any]:
    from reembed.embed import Embedder

    t_load = time.perf_counter()
    emb = Embedder(model_args, batch_tokens=batch_tokens, compile=compile, **embedder_kwargs)
    # Warm-up on a block like the real ones: kernel selection, allocator growth (and compilation).
    for _ in emb.embed_stream([texts[:min(len(texts), block_rows)]]):
        pass
    warm = time.perf_counter() - t_load
    emb.stats.__init__()
    blocks = [texts[i:i + block_rows] for i in range(0, len(texts), block_rows)]
    kept = []
    with GpuSampler() as gpu:
        t0 = time.perf_counter()
        for vectors, _ in emb.embed_stream(blocks):
            if sum(len(k) for k in kept) < keep:
                kept.append(vectors)
        seconds = time.perf_counter() - t0
    st = emb.stats
    out = {"seconds": seconds, "gpu_util": gpu.mean, "load_and_warmup_seconds": round(warm, 2),
           "batch_tokens": emb.batch_tokens, "backend": emb.backend, "dtype": emb.dtype, "attention": emb.attention,
           "compiled": emb.compiled,
           "fused_layers": emb.fused, "sync_free_masks": emb._split, "tokenize_workers": emb.block_tokenizer.workers,
           "padded_tokens": st.padded_tokens, "tokens": st.tokens, "batches": st.batches,
           "device_seconds": round(st.device_seconds, 3), "prepare_seconds": round(st.prepare_seconds, 3),
           "vectors": np.concatenate(kept)[:keep] if kept else None}
    emb.close()
    del emb
    _free(model_args.get("device", "cpu"))
    return out


class _Commits(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.times: list[tuple[float, int]] = []
        self.messages: list[str] = []

    def emit(self, record):
        msg = record.getMessage()
        if msg.startswith("committed shard"):
            shard = int(msg.split()[2].rstrip(":"))
            self.times.append((time.perf_counter(), int(msg.split(": ", 1)[1].split(" rows")[0]), shard))
        elif "tuned batch budget" in msg or msg.startswith("embed:") or msg.startswith("embedding "):
            self.messages.append(msg)


def run_job(model_path: str, corpus_dir: Path, out_dir: Path, device: str, dtype: str, shard_rows: int,
            batch_tokens: int | None, compile: bool = False, backend: str = "auto") -> dict[str, Any]:
    """The job twice: on 16 documents (start-up: plan, model check, actor start, model load, one tiny
    block, commit) and on the whole corpus. The Ray cluster is up for both (the first job of the process
    starts it), as it is on a real cluster. Marginal docs/s = extra documents / extra seconds."""
    tiny_dir = out_dir.parent / f"{out_dir.name}-tiny-input"
    if not tiny_dir.exists():
        import pyarrow.parquet as pq

        tiny_dir.mkdir(parents=True)
        first = sorted(corpus_dir.glob("*.parquet"))[0]
        pq.write_table(pq.read_table(first).slice(0, 16), tiny_dir / "part-000.parquet")
    tiny = _job_once(model_path, tiny_dir, out_dir.parent / f"{out_dir.name}-tiny", device, dtype, shard_rows,
                     batch_tokens, compile, backend)
    full = _job_once(model_path, corpus_dir, out_dir, device, dtype, shard_rows, batch_tokens, compile, backend)
    extra = full["seconds"] - tiny["seconds"]
    full["startup_seconds"] = round(tiny["seconds"], 2)
    full["steady_docs_per_s"] = round((full["rows"] - tiny["rows"]) / extra, 1) if extra > 0 else None
    return full


def _job_once(model_path: str, corpus_dir: Path, out_dir: Path, device: str, dtype: str, shard_rows: int,
              batch_tokens: int | None, compile: bool = False, backend: str = "auto") -> dict[str, Any]:
    from reembed import pipeline
    from reembed.config import load_config

    sets = [f"input.uri={corpus_dir}", f"output.uri={out_dir}", f"model.name={model_path}", f"model.device={device}",
            f"model.dtype={dtype}", f"model.backend={backend}", f"plan.shard_rows={shard_rows}", "output.fresh=true"]
    if batch_tokens:
        sets.append(f"model.batch_tokens={batch_tokens}")
    if compile:
        sets.append("model.compile=true")
    cfg = load_config(None, sets)
    handler = _Commits()
    for name in ("reembed.pipeline", "reembed.tune"):
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(logging.INFO)
    try:
        with GpuSampler() as gpu:
            t0 = time.perf_counter()
            summary = pipeline.run(cfg)
            seconds = time.perf_counter() - t0
    finally:
        for name in ("reembed.pipeline", "reembed.tune"):
            logging.getLogger(name).removeHandler(handler)
    commits = handler.times
    run = summary["run"]
    return {"seconds": seconds, "gpu_util": gpu.mean, "rows": run.get("rows"), "tokens": run.get("tokens"),
            "embed_seconds": run.get("embed_seconds"), "device_seconds": run.get("device_seconds"),
            "batch_tokens": run.get("batch_tokens"), "backend": run.get("backend"), "first_commit_after_s": round(commits[0][0] - t0, 2) if commits else None,
            "complete": summary["complete"], "log": handler.messages, "output": str(out_dir)}


# ---------------------------------------------------------------------------------------------------
# One mix


def bench_mix(args, spec: str, model_path: str, model_config, peak_measured: float | None) -> dict[str, Any]:
    """``spec``: ``mix`` or ``mix:docs`` or ``mix:docs:naive_docs``."""
    from reembed.embed import DEFAULT_BATCH_TOKENS, BlockTokenizer, token_budget_batches

    mix, *sizes = spec.split(":")
    docs = int(sizes[0]) if sizes else args.docs
    work = Path(args.work)
    cdir = corpus.make_corpus(work / f"corpus-{mix}", mix, docs, files=args.files)
    texts = corpus.read_texts(cdir)
    n_naive = min(int(sizes[1]) if len(sizes) > 1 else args.naive_docs, len(texts))
    model_args = {"name": model_path, "device": args.device, "dtype": args.dtype, "backend": args.backend}
    from transformers import AutoTokenizer

    tok = BlockTokenizer(AutoTokenizer.from_pretrained(model_path), _max_seq(model_path)).encode(texts)
    lengths = tok.lengths
    res: dict[str, Any] = {"mix": mix, "docs": len(texts), "naive_docs": n_naive,
                           "mean_tokens": round(float(lengths.mean()), 1),
                           "truncated_share": round(float(tok.truncated.mean()), 4)}
    budget = args.batch_tokens
    if budget is None and args.tune_budget:
        budget = args.tune_budget
    flops = flops_per_doc(model_config, lengths) if model_config is not None else None
    gpu = args.device == "cuda"

    def rates(seconds: float, rows: int, padded: int | None, extra: dict[str, Any]) -> dict[str, Any]:
        real = int(lengths[:rows].sum())
        r = {"docs_per_s": round(rows / seconds, 1), "tokens_per_s": round(real / seconds, 1),
             "padding_share": None if padded is None else round(1 - real / padded, 4), "seconds": round(seconds, 2)}
        if flops is not None and gpu:
            achieved = float(flops[:rows].sum()) / seconds / 1e12
            r["model_tflops"] = round(achieved, 1)
            r["mfu_vs_989"] = round(achieved / H100_PEAK_TFLOPS, 4)
            if peak_measured:
                r[f"mfu_vs_{peak_measured:.0f}"] = round(achieved / peak_measured, 4)
        r.update(extra)
        return r

    repeats = max(1, args.repeats)
    a_runs, b_runs, c_runs = [], [], []
    naive_vecs = emb_vecs = None
    for rep in range(repeats):
        if "a" not in args.skip:
            log.info("[%s] (a) naive loop on %d docs (repeat %d)", mix, n_naive, rep + 1)
            a = _guard(args, res, "a", run_naive, model_path, texts[:n_naive], args.device, _dtype(args))
            if a:
                naive_vecs = a.pop("vectors")
                padded = sum(len(c) * int(c.max()) for c in np.array_split(lengths[:n_naive], range(ROWS_NAIVE_BATCH, n_naive, ROWS_NAIVE_BATCH)))
                a_runs.append(rates(a["seconds"], n_naive, padded, {"gpu_util": a["gpu_util"]}))
        if "b" not in args.skip:
            log.info("[%s] (b) Embedder on %d docs (repeat %d)", mix, len(texts), rep + 1)
            b = _guard(args, res, "b", run_embedder, model_args, texts, args.shard_rows, budget, args.compile, keep=n_naive)
            if b:
                emb_vecs = b.pop("vectors")
                b_runs.append(rates(b.pop("seconds"), len(texts), b["padded_tokens"], b))
        if "c" not in args.skip:
            log.info("[%s] (c) Ray job on %d docs (repeat %d)", mix, len(texts), rep + 1)
            c = _guard(args, res, "c", run_job, model_path, cdir, work / f"job-{mix}", args.device, args.dtype,
                       args.shard_rows, args.batch_tokens, args.compile, args.backend)
            if not c:
                continue
            used = c.get("batch_tokens") or budget or DEFAULT_BATCH_TOKENS[args.device]
            padded = None
            if used:
                padded = 0
                for s in range(0, len(texts), args.shard_rows):
                    part = lengths[s:s + args.shard_rows]
                    padded += sum(len(bt) * int(part[bt[0]]) for bt in token_budget_batches(part, used, 1024))
            steady = c.pop("steady_docs_per_s")
            c_runs.append(rates(c["seconds"], len(texts), padded, {**c, "steady_docs_per_s": steady}))
    res["a"] = _median_run(a_runs)
    res["b"] = _median_run(b_runs)
    res["c"] = _median_run(c_runs)
    if a_runs:
        res["a_runs"] = [r["docs_per_s"] for r in a_runs]
    if b_runs:
        res["b_runs"] = [r["docs_per_s"] for r in b_runs]
    if c_runs:
        res["c_runs"] = [r["docs_per_s"] for r in c_runs]
        res["c_steady_runs"] = [r.get("steady_docs_per_s") for r in c_runs]
    if naive_vecs is not None and emb_vecs is not None:
        k = min(len(naive_vecs), len(emb_vecs))
        d = naive_vecs[:k] - emb_vecs[:k]
        cos = np.sum(naive_vecs[:k] * emb_vecs[:k], 1) / (np.linalg.norm(naive_vecs[:k], axis=1) * np.linalg.norm(emb_vecs[:k], axis=1))
        res["equality"] = {"rows": k, "max_abs_diff": float(np.abs(d).max()), "min_cosine": float(cos.min())}
    ratios = {}
    if res["a"] and res["b"]:
        ratios["b_over_a"] = round(res["b"]["docs_per_s"] / res["a"]["docs_per_s"], 3)
    if res["b"] and res["c"]:
        ratios["c_over_b_end_to_end"] = round(res["c"]["docs_per_s"] / res["b"]["docs_per_s"], 3)
        if res["c"].get("steady_docs_per_s"):
            ratios["c_over_b_steady"] = round(res["c"]["steady_docs_per_s"] / res["b"]["docs_per_s"], 3)
    res["ratios"] = ratios
    return res


def _guard(args, res: dict[str, Any], key: str, fn, *a, **kw):
    if not args.keep_going:
        return fn(*a, **kw)
    try:
        return fn(*a, **kw)
    except Exception as e:  # --keep-going: one broken contender must not lose the others' figures
        log.exception("(%s) failed", key)
        res.setdefault("errors", {})[key] = f"{type(e).__name__}: {e}"[:2000]
        _free("cuda" if args.device == "cuda" else "cpu")
        return None


def _median_run(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    if not runs:
        return None
    ranked = sorted(runs, key=lambda r: r.get("steady_docs_per_s") or r["docs_per_s"])
    return ranked[(len(ranked) - 1) // 2]  # the median run (lower median for an even count)


# ---------------------------------------------------------------------------------------------------
# Report


def markdown(results: dict[str, Any]) -> str:
    hw = results["hardware"]
    lines = [f"## {results['label']} ({results['date']})", "",
             f"- hardware: {hw['device_name']}; host {hw['cpu']} ({hw['cpus']} CPUs); {hw.get('gpu_memory_gib', '-')} GiB GPU memory",
             f"- software: {', '.join(f'{k} {v}' for k, v in results['versions'].items())}",
             f"- model: {results['model']['name']} ({results['model']['params_m']} M parameters, {results['model']['dtype']})",
             f"- command: `{results['command']}`"]
    if results.get("matmul_tflops"):
        lines.append(f"- measured bf16 8192^3 matmul: {results['matmul_tflops']} TFLOP/s")
    if results.get("tune"):
        t = results["tune"]
        lines.append(f"- tuned budget: {t['batch_tokens']} tokens (largest fitting {t['max_fitting_budget']}), "
                     f"profile `{t['path']}`")
    lines.append("")
    head = ("| mix | contender | docs | docs/s | real tokens/s | padding | MFU vs 989 | MFU vs measured | GPU util % | notes |")
    lines += [head, "|" + "---|" * 10]
    for mix, r in results["mixes"].items():
        for key, name in (("a", "(a) naive encode/32"), ("b", "(b) Embedder"), ("c", "(c) Ray job")):
            x = r.get(key)
            if not x:
                continue
            mfu_m = next((v for k, v in x.items() if k.startswith("mfu_vs_") and k != "mfu_vs_989"), None)
            docs = r["naive_docs"] if key == "a" else r["docs"]
            note = ""
            if key == "c":
                note = (f"end to end {x['docs_per_s']} docs/s (cluster up; start-up {x.get('startup_seconds')} s, "
                        f"first commit after {x.get('first_commit_after_s')} s); marginal {x.get('steady_docs_per_s')} docs/s")
            if key == "b":
                note = f"budget {x['batch_tokens']}, {x['dtype']}, {x['attention']}{', compiled' if x.get('compiled') else ''}"
            rate = x.get("steady_docs_per_s") or x["docs_per_s"] if key == "c" else x["docs_per_s"]
            lines.append(f"| {mix} (mean {r['mean_tokens']} tok) | {name} | {docs} | {rate} | {x['tokens_per_s']:.0f} | "
                         f"{_pct(x.get('padding_share'))} | {_pct(x.get('mfu_vs_989'))} | {_pct(mfu_m)} | "
                         f"{x.get('gpu_util') if x.get('gpu_util') is not None else '-'} | {note} |")
        rat = r.get("ratios", {})
        eq = r.get("equality")
        lines.append(f"| {mix} | ratios | | b/a = {rat.get('b_over_a')} | c/b marginal = {rat.get('c_over_b_steady')} | "
                     f"c/b end-to-end = {rat.get('c_over_b_end_to_end')} | | | | "
                     + (f"(b) vs (a): max abs diff {eq['max_abs_diff']:.2e}, min cosine {eq['min_cosine']:.6f} over {eq['rows']} rows" if eq else "")
                     + " |")
    lines.append("")
    return "\n".join(lines)


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}%"


# ---------------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="minilm", help="model folder, 'minilm' (real all-MiniLM-L6-v2) or "
                   "'bge-large-random' (BGE-large architecture, random weights, built under --work)")
    p.add_argument("--tokenizer", help="bert-base-uncased tokenizer folder for bge-large-random (default: MiniLM's)")
    p.add_argument("--mix", default="mixed", help=f"comma list of corpus mixes ({', '.join(corpus.MIXES)}), each "
                   "optionally with its own sizes: MIX:DOCS:NAIVE_DOCS")
    p.add_argument("--docs", type=int, default=4000, help="documents for (b) and (c)")
    p.add_argument("--naive-docs", type=int, default=1000, help="documents for (a) (a prefix of the same corpus)")
    p.add_argument("--files", type=int, default=8)
    p.add_argument("--shard-rows", type=int, default=10_000, help="rows per shard for (c), and per block for (b)")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
    p.add_argument("--backend", default="auto", choices=["auto", "torch", "onnx", "onnx-int8"],
                   help="what runs the model in (b) and (c) (as model.backend; (a) is always plain torch)")
    p.add_argument("--batch-tokens", type=int, help="token budget for (b) and (c) (default: tuned profile, else default)")
    p.add_argument("--tune", action="store_true", help="run the tuner first (saved profile is then used by (b) and (c))")
    p.add_argument("--tune-budgets", help="budgets for --tune (comma list)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model in (b) and (c)")
    p.add_argument("--keep-going", action="store_true", help="record a failing contender's error and go on")
    p.add_argument("--repeats", type=int, default=1, help="repeat a/b/c interleaved and report the median run")
    p.add_argument("--skip", default="", help="contenders to skip, e.g. 'a' or 'c'")
    p.add_argument("--work", default="bench/out", help="corpora, models and job outputs")
    p.add_argument("--out", help="where results.json / results.md go (default --work)")
    p.add_argument("--label", default="benchmark")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("sentence_transformers", "transformers", "ray", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault(
        "REEMBED_TUNE_DIR", str(Path(args.work).resolve() / "tuning"))

    import torch

    from reembed.embed import resolve_device, resolve_dtype

    args.device = resolve_device(args.device)
    args.tune_budget = None
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out or work)
    out.mkdir(parents=True, exist_ok=True)
    model_path = _model(args.model, work, args.tokenizer)
    cfg = _hf_config(model_path)
    results: dict[str, Any] = {
        "label": args.label, "date": dt.date.today().isoformat(), "command": " ".join(["python", *sys.argv]),
        "hardware": _hardware(args.device), "versions": _versions(),
        "model": {"name": args.model, "path": model_path, "dtype": resolve_dtype(args.dtype, args.device),
                  "params_m": _params_m(model_path)},
        "settings": {k: v for k, v in vars(args).items() if k not in ("tune_budget",)}, "mixes": {},
    }
    if args.device == "cuda":
        results["matmul_tflops"] = measure_matmul_tflops()
        log.info("bf16 matmul: %s TFLOP/s", results["matmul_tflops"])
    if args.tune:
        from reembed import tune

        texts = tune.synthetic_sample(tune.DEFAULT_SAMPLE_ROWS[args.device], _max_seq(model_path))
        budgets = [int(b) for b in args.tune_budgets.split(",")] if args.tune_budgets else None
        prof = tune.tune({"name": model_path, "device": args.device, "dtype": args.dtype, "backend": args.backend},
                         texts, budgets,
                         min_seconds=1.0 if args.device == "cuda" else 0.5)
        path = tune.save_profile(prof)
        tune.write_report(prof, out / "tune.html")
        print(tune.format_table(prof), file=sys.stderr)
        results["tune"] = {"batch_tokens": prof["batch_tokens"], "max_fitting_budget": prof["max_fitting_budget"],
                           "path": str(path), "points": prof["points"], "sample": prof["sample"]}
    if args.batch_tokens is None:
        from reembed import tune

        from reembed.embed import resolve_backend

        backend = resolve_backend(args.backend, args.device, _dtype(args), args.compile)
        args.tune_budget = tune.lookup_budget(model_path, args.device, None, None, backend, _dtype(args))
    for spec in args.mix.split(","):
        results["mixes"][spec.split(":")[0]] = bench_mix(args, spec, model_path, cfg, results.get("matmul_tflops"))
        _write(out, results)
        print(markdown(results), file=sys.stderr)
    print(markdown(results))
    return 0


def _write(out: Path, results: dict[str, Any]) -> None:
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    (out / "results.md").write_text(markdown(results))


def _model(name: str, work: Path, tokenizer: str | None) -> str:
    if name == "minilm":
        from reembed.testing import minilm_path

        return str(minilm_path())
    if name == "bge-large-random":
        folder = work / "models" / "bge-large-random"
        if not (folder / "modules.json").exists():
            from reembed.testing import bge_large_random

            t0 = time.perf_counter()
            bge_large_random(folder, tokenizer=tokenizer)
            log.info("built %s in %.1f s", folder, time.perf_counter() - t0)
        return str(folder.resolve())
    return name


def _hf_config(model_path: str):
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


def _max_seq(model_path: str) -> int:
    """The model's max_seq_length without loading its weights: sentence_bert_config.json, else the
    tokenizer's model_max_length, capped by the position embeddings."""
    folder = Path(model_path)
    try:
        return int(json.loads((folder / "sentence_bert_config.json").read_text())["max_seq_length"])
    except (OSError, KeyError, ValueError):
        pass
    from transformers import AutoTokenizer

    limit = AutoTokenizer.from_pretrained(model_path).model_max_length
    cfg = _hf_config(model_path)
    positions = getattr(cfg, "max_position_embeddings", None) or limit
    return int(min(limit, positions))


def _params_m(model_path: str) -> float | None:
    cfg = _hf_config(model_path)
    if cfg is None:
        return None
    d, layers, ff = cfg.hidden_size, cfg.num_hidden_layers, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    emb = (cfg.vocab_size + cfg.max_position_embeddings + getattr(cfg, "type_vocab_size", 0)) * d
    return round((layers * (4 * d * d + 2 * d * ff + 9 * d + ff) + emb) / 1e6, 1)


def _hardware(device: str) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    hw: dict[str, Any] = {"cpu": cpu, "cpus": os.cpu_count(), "device": device}
    if device == "cuda":
        import torch

        props = torch.cuda.get_device_properties(0)
        hw.update(device_name=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                  sms=props.multi_processor_count)
        try:
            import pynvml

            pynvml.nvmlInit()
            hw["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:
            pass
    else:
        hw["device_name"] = f"CPU: {cpu}"
    return hw


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("torch", "transformers", "sentence_transformers", "ray", "tokenizers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


def _dtype(args) -> str:
    from reembed.embed import resolve_dtype

    return resolve_dtype(args.dtype, args.device)


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def _free(device: str) -> None:
    import gc

    gc.collect()
    if device == "cuda":
        import torch

        torch.cuda.empty_cache()


if __name__ == "__main__":
    sys.exit(main())
