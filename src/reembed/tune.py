"""``reembed tune``: find the token budget (padded tokens per forward pass) that runs fastest on this
machine's device, and save it where ``reembed run`` picks it up.

The sweep goes through budgets from small to large. At each one it first runs a worst-case batch (every
row at ``max_seq_len`` tokens) to see that the budget fits in device memory; on an out-of-memory error
it backs off by bisection between the last budget that fitted and the one that failed, and stops.
Then it measures docs/s on a sample of real (``--sample``) or synthetic documents. The chosen budget is
the largest one within 2% of the best throughput: as fast on the sample, and with the most rows per
forward pass, which short documents need to fill the device.

Profiles are JSON files keyed by model, device type and ``max_seq_len``, under ``$REEMBED_TUNE_DIR`` or
``~/.cache/reembed/tuning/``; :func:`lookup_budget` is what the job calls.
"""

from __future__ import annotations

import datetime as dt
import gc
import hashlib
import json
import logging
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)

FORMAT = 1
TUNE_DIR_ENV = "REEMBED_TUNE_DIR"
DEFAULT_BUDGETS = {
    "cuda": (8192, 16384, 32768, 65536, 131072, 262144, 524288),
    "cpu": (512, 1024, 2048, 4096, 8192, 16384),
}
# About one block (plan.shard_rows) on GPU: with fewer rows, large budgets mix lengths and pad more
# than they will on the job's blocks.
DEFAULT_SAMPLE_ROWS = {"cuda": 8192, "cpu": 256}
TOLERANCE = 0.02  # budgets within 2% of the best throughput count as equally fast
REPEATS = 5  # timed rounds per budget: the median is the budget's figure, min..max its spread
BACKOFF_STEPS = 3
GRID = 64  # bisected budgets are multiples of this


@dataclass
class Point:
    """One budget of the sweep."""

    budget: int
    fits: bool
    docs_per_s: float | None = None  # median of the timed rounds
    tokens_per_s: float | None = None  # real (non-padding) tokens
    padding_share: float | None = None
    batches: int | None = None
    seconds: float | None = None
    peak_memory_gib: float | None = None
    note: str = ""
    docs_per_s_min: float | None = None  # the slowest and fastest timed round
    docs_per_s_max: float | None = None

    @property
    def spread(self) -> float | None:
        """(fastest - slowest) / median of the timed rounds: how far one round can be trusted."""
        if not self.docs_per_s or self.docs_per_s_min is None or self.docs_per_s_max is None:
            return None
        return (self.docs_per_s_max - self.docs_per_s_min) / self.docs_per_s


# ---------------------------------------------------------------------------------------------------
# Profiles: where they live and how the job finds one


def tune_dir() -> Path:
    """``$REEMBED_TUNE_DIR``, else ``$REEMBED_CACHE_DIR/tuning`` (where the ONNX exports live too), else
    ``~/.cache/reembed/tuning``."""
    if os.environ.get(TUNE_DIR_ENV):
        return Path(os.environ[TUNE_DIR_ENV]).expanduser()
    cache = os.environ.get("REEMBED_CACHE_DIR") or Path.home() / ".cache" / "reembed"
    return Path(cache).expanduser() / "tuning"


def lookup_budget(model_name: str, device: str, accelerator: str | None, max_seq_length: int | None,
                  backend: str = "torch", dtype: str = "auto") -> int | None:
    """The tuned budget for this model on this kind of device, or None when no profile matches.

    ``accelerator`` is Ray's accelerator type of the cluster's GPUs (e.g. ``H100``); None on CPU, or on
    a GPU cluster that does not label its GPUs (then this machine's own GPU, if any, names the type).
    ``max_seq_length`` None means the model's own setting. ``backend`` is the resolved one (torch, onnx,
    onnx-int8) and ``dtype`` the configured one: each backend (and bfloat16 on CPU) has its own best budget.
    """
    key = accelerator_key(device, accelerator, backend, dtype)
    if key is None:
        return None
    folder = tune_dir()
    if max_seq_length is not None:
        candidates = [profile_path(model_name, key, max_seq_length, folder)]
    else:
        candidates = sorted(folder.glob(f"{_model_slug(model_name)}--{key}--L*.json"))
    for path in candidates:
        profile = _read_profile(path)
        if profile is None or profile.get("device") != device:
            continue
        if max_seq_length is None and profile.get("max_seq_length") != profile.get("model_max_seq_length"):
            continue
        budget = int(profile["batch_tokens"])
        best = profile.get("chosen") or {}
        log.info(
            "using tuned batch budget %d tokens from profile %s (tuned %s on %s, %s docs/s on its sample)",
            budget, path, profile.get("tuned_at", "?"), profile.get("device_name", key), best.get("docs_per_s", "?"),
        )
        return budget
    return None


def accelerator_key(device: str, accelerator: str | None = None, backend: str = "torch", dtype: str = "auto") -> str | None:
    """``cpu`` (``cpu-onnx``, ``cpu-onnx-int8`` for the ONNX Runtime backends, ``cpu-bfloat16`` for torch in
    bfloat16), or the GPU type as Ray names it (``H100``, ``A100``, ``L4``...), as a file-name-safe slug."""
    if device != "cuda":
        if backend not in (None, "torch"):
            return f"cpu-{backend}"
        return "cpu-bfloat16" if dtype == "bfloat16" else "cpu"
    if not accelerator:
        accelerator = local_accelerator()
    return _slug(accelerator) if accelerator else None


def local_accelerator() -> str | None:
    """This machine's first GPU, named the way Ray names accelerator types."""
    try:
        import torch

        if not torch.cuda.is_available():
            return None
        name = torch.cuda.get_device_name(0)
    except (ImportError, RuntimeError):
        return None
    return gpu_type(name)


def gpu_type(device_name: str) -> str:
    """``NVIDIA H100 80GB HBM3`` -> ``H100`` (Ray's own rule when Ray is importable)."""
    try:
        from ray._private.accelerators.nvidia_gpu import NvidiaGPUAcceleratorManager

        found = NvidiaGPUAcceleratorManager._gpu_name_to_accelerator_type(device_name)
        if found:
            return found
    except (ImportError, AttributeError):
        pass
    m = re.match(r"\w+\s+((?:[A-Z]+\s+)*[A-Z0-9]*\d[A-Z0-9]*)", device_name)
    return m.group(1).replace(" ", "-") if m else device_name.replace(" ", "-")


def profile_path(model_name: str, key: str, max_seq_length: int, folder: Path | None = None) -> Path:
    return (folder or tune_dir()) / f"{_model_slug(model_name)}--{key}--L{int(max_seq_length)}.json"


def save_profile(profile: dict[str, Any], folder: Path | None = None) -> Path:
    path = profile_path(profile["model"], profile["accelerator"], profile["max_seq_length"], folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(profile, indent=1))
    os.replace(tmp, path)
    return path


def _read_profile(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        log.warning("ignoring unreadable tuning profile %s (%s)", path, e)
        return None
    if data.get("format") != FORMAT or not isinstance(data.get("batch_tokens"), int):
        log.warning("ignoring tuning profile %s: unknown format", path)
        return None
    return data


def _model_key(name: str) -> str:
    local = Path(name).expanduser()
    return str(local.resolve()) if local.exists() else name


def _model_slug(name: str) -> str:
    key = _model_key(name)
    base = _slug(key.rstrip("/").rsplit("/", 1)[-1])[-48:]
    return f"{base}-{hashlib.sha256(key.encode()).hexdigest()[:8]}"


def _slug(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", s).strip("_") or "x"


# ---------------------------------------------------------------------------------------------------
# The sweep


def tune(model: dict[str, Any], texts: Sequence[str], budgets: Sequence[int] | None = None, *,
         max_batch_rows: int = 1024, compile: bool = False, min_seconds: float = 1.0,
         oom_above: int | None = None, sample_source: str = "synthetic") -> dict[str, Any]:
    """Sweep token budgets for ``model`` (an Embedder model dict) on ``texts``; return the profile."""
    from reembed.embed import Embedder

    embedder = Embedder(model, max_batch_rows=max_batch_rows, compile=compile)
    budgets = sorted(set(int(b) for b in (budgets or DEFAULT_BUDGETS[embedder.device])))
    points = sweep(embedder, texts, budgets, min_seconds=min_seconds, oom_above=oom_above)
    chosen = choose(points)
    warnings = noise_warnings(points, chosen)
    for w in warnings:
        log.warning("tune: %s", w)
    max_fit = max((p.budget for p in points if p.fits), default=None)
    device_name = _device_name(embedder.device)
    lengths = embedder.tokenize(list(texts)).lengths
    return {
        "format": FORMAT,
        "model": _model_key(model["name"]),
        "device": embedder.device,
        "accelerator": accelerator_key(embedder.device, gpu_type(device_name) if embedder.device == "cuda" else None,
                                       embedder.backend, embedder.dtype),
        "backend": embedder.backend,
        "device_name": device_name,
        "max_seq_length": embedder.max_seq_length,
        "model_max_seq_length": _model_default_seq_len(embedder, model),
        "dtype": embedder.dtype,
        "precision": _precision(embedder.dtype, embedder.backend),
        "attention": embedder.attention,
        "compile": embedder.compiled,
        "max_batch_rows": max_batch_rows,
        "batch_tokens": chosen.budget,
        "max_fitting_budget": max_fit,
        "chosen": _point_dict(chosen),
        "points": [_point_dict(p) for p in points],
        "repeats": REPEATS,
        "warnings": warnings,
        "sample": {"source": sample_source, "rows": len(texts), "mean_tokens": round(float(lengths.mean()), 1),
                   "max_tokens": int(lengths.max())},
        "tuned_at": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": _versions(),
    }


def sweep(embedder, texts: Sequence[str], budgets: Sequence[int], *, min_seconds: float = 1.0,
          oom_above: int | None = None, backoff_steps: int = BACKOFF_STEPS) -> list[Point]:
    """Measure each budget in ascending order; on out-of-memory, bisect towards the largest budget that
    fits (``backoff_steps`` times) and stop. ``oom_above`` simulates a device that runs out of memory
    above that many padded tokens per batch (to exercise the back-off on a CPU)."""
    points: list[Point] = []
    last_fit: int | None = None
    last_split: tuple | None = None
    for budget in sorted(budgets):
        if _fits(embedder, budget, oom_above):
            last_split = _measure_into(points, embedder, texts, budget, min_seconds, last_split)
            last_fit = budget
            continue
        points.append(Point(budget, fits=False, note="out of memory"))
        lo, hi = last_fit, budget
        for _ in range(backoff_steps):
            mid = ((lo or 0) + hi) // 2 // GRID * GRID
            if mid <= (lo or 0) or mid >= hi:
                break
            if _fits(embedder, mid, oom_above):
                last_split = _measure_into(points, embedder, texts, mid, min_seconds, last_split, note="back-off")
                lo = mid
            else:
                points.append(Point(mid, fits=False, note="out of memory (back-off)"))
                hi = mid
        break
    return sorted(points, key=lambda p: p.budget)


def choose(points: Sequence[Point], tolerance: float = TOLERANCE) -> Point:
    """The largest fitting budget whose median throughput is within ``tolerance`` of the best median
    (every measured budget fitted a worst-case batch, so the largest is safe). Medians of several timed
    rounds, so one lucky or unlucky round does not decide; :func:`noise_warnings` says when the rounds
    varied more than the tolerance, i.e. when the choice is not to be trusted."""
    measured = [p for p in points if p.fits and p.docs_per_s]
    if not measured:
        raise RuntimeError("no token budget fitted in device memory: try smaller --budgets or a shorter --max-seq-len")
    best = max(p.docs_per_s for p in measured)
    return max((p for p in measured if p.docs_per_s >= (1 - tolerance) * best), key=lambda p: p.budget)


def noise_warnings(points: Sequence[Point], chosen: Point, tolerance: float = TOLERANCE) -> list[str]:
    """Warnings when the measurements cannot support the choice: the rounds of a budget near the top
    varied more than ``tolerance``, or another budget's rounds overlap the chosen one's while its median
    is lower (the two cannot be told apart)."""
    measured = [p for p in points if p.fits and p.docs_per_s and p.spread is not None]
    if not measured:
        return []
    best = max(p.docs_per_s for p in measured)
    near = [p for p in measured if p.docs_per_s >= (1 - 4 * tolerance) * best]
    noisy = [p for p in near if p.spread > tolerance]
    out = []
    if noisy:
        worst = max(noisy, key=lambda p: p.spread)
        out.append(f"throughput varied by up to {100 * worst.spread:.0f}% between rounds (budget {worst.budget}), more "
                   f"than the {100 * tolerance:.0f}% that separates budgets: the choice of {chosen.budget} is uncertain. "
                   "Rerun on an idle machine or with a larger --min-seconds")
    rivals = [p.budget for p in measured if p is not chosen and p.docs_per_s_max >= chosen.docs_per_s_min
              and p.docs_per_s < (1 - tolerance) * best]
    if rivals and not noisy:
        out.append(f"budgets {', '.join(map(str, rivals))} overlap the chosen {chosen.budget} within their spread")
    return out


def _fits(embedder, budget: int, oom_above: int | None) -> bool:
    """Run one worst-case batch for ``budget``: as many rows as fit, each ``max_seq_length`` tokens long."""
    import torch

    from reembed.embed import Prepared, Tokens

    L = embedder.max_seq_length
    rows = max(1, min(embedder.max_batch_rows, budget // L))
    try:
        if oom_above is not None and rows * L > oom_above:
            raise torch.OutOfMemoryError(f"simulated: {rows * L} padded tokens > {oom_above}")
        rng = np.random.default_rng(budget)
        vocab = max(int(getattr(embedder.tokenizer, "vocab_size", 1000) or 1000), 2)
        ids = np.append(rng.integers(min(1000, vocab - 1), vocab, size=rows * L), 0)
        tok = Tokens(ids, np.zeros_like(ids) if embedder.block_tokenizer.with_type_ids else None,
                     np.arange(rows, dtype=np.int64) * L, np.full(rows, L, dtype=np.int64), np.zeros(rows, bool))
        idx = np.arange(rows)
        feats = [embedder.block_tokenizer.collate(tok, idx, pin=embedder.device == "cuda")]
        embedder.run(Prepared(rows, tok.lengths, tok.truncated, [idx], feats, idx, rows * L))
        return True
    except torch.OutOfMemoryError as e:
        log.info("budget %d: out of memory (%s)", budget, str(e).splitlines()[0][:120])
    except RuntimeError as e:  # CPU allocators report exhaustion as a plain RuntimeError
        if "memory" not in str(e).lower():
            raise
        log.info("budget %d: out of memory (%s)", budget, str(e).splitlines()[0][:120])
    gc.collect()
    if embedder.device == "cuda":
        torch.cuda.empty_cache()
    return False


def _measure_into(points: list[Point], embedder, texts, budget: int, min_seconds: float,
                  last_split: tuple | None, note: str = "") -> tuple:
    import torch

    prep = embedder.prepare(texts, batch_tokens=budget)
    split = tuple(len(b) for b in prep.batches)
    if split == last_split and points and points[-1].fits:
        same = points[-1]  # max_batch_rows caps the batches: nothing changes from the previous budget
        points.append(Point(budget, True, same.docs_per_s, same.tokens_per_s, same.padding_share, same.batches,
                            same.seconds, same.peak_memory_gib, f"same batches as {same.budget}",
                            same.docs_per_s_min, same.docs_per_s_max))
        return split
    cuda = embedder.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    embedder.run(prep)  # warm-up: new shapes pick their kernels
    rates = []  # docs/s of each timed round; a round is at least min_seconds / REPEATS long
    for _ in range(REPEATS):
        reps, t0 = 0, time.perf_counter()
        while True:
            embedder.run(prep)
            reps += 1
            elapsed = time.perf_counter() - t0
            if elapsed >= min_seconds / REPEATS or reps >= 50:
                break
        rates.append(reps * prep.n / elapsed)
    docs_s = float(np.median(rates))
    real = int(prep.lengths.sum())
    peak = torch.cuda.max_memory_allocated() / 2**30 if cuda else None
    point = Point(budget, True, round(docs_s, 1), round(docs_s * real / prep.n, 1),
                  round(1 - real / prep.padded, 4), len(prep.batches), round(prep.n / docs_s, 4),
                  round(peak, 2) if peak is not None else None, note, round(min(rates), 1), round(max(rates), 1))
    log.info("budget %7d: %9.1f docs/s (%d rounds, %.1f-%.1f), %11.0f tokens/s, padding %.1f%%, %d batches", budget,
             point.docs_per_s, REPEATS, point.docs_per_s_min, point.docs_per_s_max, point.tokens_per_s,
             100 * point.padding_share, point.batches)
    points.append(point)
    return split


def _device_name(device: str) -> str:
    if device == "cuda":
        import torch

        return torch.cuda.get_device_name(0)
    import platform

    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"{name} ({os.cpu_count()} CPUs)"


def _model_default_seq_len(embedder, model: dict[str, Any]) -> int:
    if model.get("max_seq_length") is None:
        return embedder.max_seq_length
    from reembed.embed import load_model

    return int(load_model(model["name"], model.get("revision"), "cpu", "float32").max_seq_length)


def _versions() -> dict[str, str]:
    out = {}
    for mod in ("torch", "transformers", "sentence_transformers"):
        try:
            out[mod] = __import__(mod).__version__
        except ImportError:
            pass
    return out


# ---------------------------------------------------------------------------------------------------
# Samples


def read_sample(uri: str, text_column: str = "text", rows: int = 4096, seed: int = 0) -> list[str]:
    """Up to ``rows`` non-empty texts from Parquet / JSON Lines files under ``uri`` (a random subset of
    the first ``4 * rows`` found, so one long file's head does not decide the length mix)."""
    import pyarrow.parquet as pq

    from reembed import storage

    loc, files = storage.list_inputs(uri)
    found: list[str] = []
    want = 4 * rows
    for f in files:
        if len(found) >= want:
            break
        name = f.path.lower()
        if name.endswith(".parquet"):
            with loc.fs.open_input_file(f.path) as fh:
                pf = pq.ParquetFile(fh)
                if text_column not in pf.schema_arrow.names:
                    raise ValueError(f"{f.path}: no column {text_column!r} (columns: {', '.join(pf.schema_arrow.names)})")
                for batch in pf.iter_batches(columns=[text_column], batch_size=4096):
                    found.extend(t for t in batch.column(0).to_pylist() if isinstance(t, str) and t.strip())
                    if len(found) >= want:
                        break
        elif name.endswith((".jsonl", ".json", ".jsonl.gz", ".ndjson")):
            import gzip

            with loc.fs.open_input_stream(f.path) as fh:
                data = fh.read()
            if name.endswith(".gz"):
                data = gzip.decompress(data)
            for line in data.splitlines():
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                text = obj.get(text_column) if isinstance(obj, dict) else None
                if isinstance(text, str) and text.strip():
                    found.append(text)
                if len(found) >= want:
                    break
    if not found:
        raise ValueError(f"{uri}: no non-empty {text_column!r} values found in {len(files)} file(s)")
    if len(found) > rows:
        pick = np.random.default_rng(seed).choice(len(found), size=rows, replace=False)
        found = [found[i] for i in sorted(pick)]
    return found


# Common English words that are each exactly one token in the BERT uncased vocabulary (MiniLM, BGE):
# synthetic texts of a known token length, for tuning here and for the benchmarks' corpora.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but have an they "
    "you were her she there one all we their has been would will its if more when who so no can said time year "
    "people way day man thing woman life child world school state family student group country problem hand part "
    "place case week company system program question work government number night point home water room mother "
    "area money story fact month lot right study book eye job word business issue side kind head house service "
    "friend father power hour game line end member law car city community name president team minute idea kid "
    "body information back parent face others level office door health person art war history party result change "
    "morning reason research girl guy moment air teacher force education model search index data river music light "
    "food market price energy plant species film album season league club station road bridge church village town "
    "county district region island lake mountain forest field paper report court police army battle ship train "
    "song band record label radio television show series episode character novel author writer poet painter museum "
    "gallery university college professor science theory method process design network software computer machine "
    "engine language culture society economy policy election vector cluster"
).split()


def synthetic_sample(n: int, max_seq_length: int, seed: int = 0) -> list[str]:
    """``n`` texts of common English words, lengths spread from an eighth of ``max_seq_length`` to a
    little past it (so some rows are truncated), about one token per word."""
    rng = np.random.default_rng(seed)
    lengths = rng.integers(max(4, max_seq_length // 8), int(max_seq_length * 1.2) + 1, size=n)
    words = np.array(WORDS)
    return [" ".join(words[rng.integers(0, len(words), size=k)]) for k in lengths]


# ---------------------------------------------------------------------------------------------------
# Output: table, HTML report


def format_table(profile: dict[str, Any]) -> str:
    lines = [f"{'budget':>9} {'fits':>5} {'docs/s':>10} {'spread':>7} {'tokens/s':>12} {'padding':>8} {'batches':>8} "
             f"{'peak GiB':>9}  note"]
    for p in profile["points"]:
        mark = " <- chosen" if p["budget"] == profile["batch_tokens"] else ""
        spread = p.get("spread")
        lines.append(
            f"{p['budget']:>9} {'yes' if p['fits'] else 'no':>5} {_num(p['docs_per_s'], 10, 1)} "
            f"{'-' if spread is None else f'{100 * spread:.1f}%':>7} "
            f"{_num(p['tokens_per_s'], 12, 0)} {_num(None if p['padding_share'] is None else 100 * p['padding_share'], 7, 1)}% "
            f"{_num(p['batches'], 8, 0)} {_num(p['peak_memory_gib'], 9, 2)}  {p['note']}{mark}"
        )
    lines += [f"warning: {w}" for w in profile.get("warnings", [])]
    return "\n".join(lines)


def format_comparison(profiles: Sequence[dict[str, Any]]) -> str:
    """The best point of each backend side by side, fastest first, against the first one (torch float32)."""
    base = profiles[0]["chosen"]["docs_per_s"]
    lines = [f"{'backend':<11} {'dtype':<9} {'budget':>7} {'docs/s':>9} {'x ' + profiles[0]['backend']:>9}  run with"]
    for p in sorted(profiles, key=lambda p: -p["chosen"]["docs_per_s"]):
        best = p["chosen"]["docs_per_s"]
        flags = f"--backend {p['backend']}" + (f" --dtype {p['dtype']}" if p["dtype"] == "bfloat16" else "")
        lines.append(f"{p['backend']:<11} {p['dtype']:<9} {p['batch_tokens']:>7} {best:>9.1f} {best / base:>9.2f}  {flags}")
    lines.append("float32 backends give the same vectors; bfloat16 and onnx-int8 are close (cosine ~0.9999 / ~0.99), "
                 "not equal, and get their own output fingerprint.")
    return "\n".join(lines)


def write_report(profile: dict[str, Any], path: str | Path) -> Path:
    from reembed import report

    pts = [p for p in profile["points"] if p["fits"] and p["docs_per_s"]]
    rows = [{"budget (tokens)": p["budget"], "fits": p["fits"], "docs/s (median)": p["docs_per_s"],
             "spread %": None if p.get("spread") is None else round(100 * p["spread"], 1),
             "tokens/s": p["tokens_per_s"],
             "padding %": None if p["padding_share"] is None else round(100 * p["padding_share"], 2),
             "batches": p["batches"], "peak GiB": p["peak_memory_gib"], "note": p["note"]} for p in profile["points"]]
    info = [{"setting": k, "value": profile[k]} for k in
            ("model", "device_name", "accelerator", "backend", "precision", "attention", "compile", "max_seq_length",
             "max_batch_rows", "batch_tokens", "max_fitting_budget", "repeats", "tuned_at") if k in profile]
    info.append({"setting": "sample", "value": json.dumps(profile["sample"])})
    page = report.page(f"Token-budget tuning: {Path(profile['model']).name} on {profile['device_name']}", [
        report.section("Throughput vs token budget",
                       report.line_chart({"docs/s (median)": [(p["budget"], p["docs_per_s"]) for p in pts],
                                          "slowest round": [(p["budget"], p["docs_per_s_min"]) for p in pts
                                                            if p.get("docs_per_s_min") is not None],
                                          "fastest round": [(p["budget"], p["docs_per_s_max"]) for p in pts
                                                            if p.get("docs_per_s_max") is not None]},
                                         x_label="token budget (padded tokens per forward pass)", y_label="docs/s", log_x=True),
                       report.paragraph(f"Chosen: {profile['batch_tokens']} tokens (the largest budget whose median of "
                                        f"{profile.get('repeats', 1)} timed rounds is within {TOLERANCE:.0%} of the best "
                                        "median)."),
                       *[report.paragraph(f"Warning: {w}", "fail") for w in profile.get("warnings", [])]),
        report.section("Sweep", report.table(rows)),
        report.section("Setup", report.table(info)),
    ])
    return report.write(path, page)


def _point_dict(p: Point) -> dict[str, Any]:
    return {**asdict(p), "spread": None if p.spread is None else round(p.spread, 4)}


def _precision(dtype: str, backend: str) -> str:
    """What the vectors are computed in: the int8 backend's recipe, not the float32 its inputs are."""
    from reembed.embed import space_dtype

    return space_dtype(dtype, backend)


def _num(v, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if v is None else f"{v:>{width},.{digits}f}"


# ---------------------------------------------------------------------------------------------------
# CLI
