"""``reembed tune``: measure throughput at a range of token budgets on this machine and save the best."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

from reembed.errors import UsageError
from reembed.tune import (DEFAULT_SAMPLE_ROWS, format_comparison, format_table, read_sample, save_profile,
                          synthetic_sample, tune, write_report)

log = logging.getLogger("reembed.tune")


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "tune", help="measure throughput at a range of token budgets on this machine's device and save the best",
        description="Sweep token budgets (padded tokens per forward pass) on this machine's GPU (or CPU), back off "
                    "on out-of-memory, and save a profile keyed by model, device type and max_seq_len that "
                    "`reembed run` picks up automatically. Prints a table and writes an HTML report.",
    )
    from reembed.config import DEFAULT_MODEL

    p.add_argument("--model", default=DEFAULT_MODEL, metavar="NAME_OR_PATH", help=f"sentence-transformers model (default {DEFAULT_MODEL})")
    p.add_argument("--sample", metavar="URI", help="Parquet / JSON Lines documents to measure on (default: synthetic "
                   "texts spread over the model's sequence length)")
    p.add_argument("--text-column", default="text", help="text column of --sample (default text)")
    p.add_argument("--sample-rows", type=int, help="documents to measure on (default 8192 on GPU, 256 on CPU)")
    p.add_argument("--max-seq-len", type=int, help="truncate at this many tokens (default: the model's own setting)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where to measure (default auto: cuda when a GPU is visible, else cpu)")
    p.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], default="auto",
                   help="compute precision (default auto: float16 on GPU, float32 on CPU)")
    p.add_argument("--backend", choices=["auto", "torch", "onnx", "onnx-int8", "all"], default="auto",
                   help="what runs the model (as model.backend in `reembed run`; default auto). On CPU, 'all' tunes "
                        "torch float32, torch bfloat16 (where the CPU has it), onnx and onnx-int8 one after the "
                        "other, saves a profile for each and prints them side by side")
    p.add_argument("--budgets", metavar="N[,N]", help="token budgets to try (default: powers of two, 8192-524288 on "
                   "GPU, 512-16384 on CPU)")
    p.add_argument("--max-batch-rows", type=int, default=1024, help="rows per forward pass at most (default 1024)")
    p.add_argument("--compile", action="store_true", help="torch.compile the model first (as model.compile=true runs)")
    p.add_argument("--min-seconds", type=float, default=1.0, help="measure each budget at least this long, split into "
                   "5 timed rounds whose median counts (default 1)")
    p.add_argument("--simulate-oom-above", type=int, metavar="TOKENS",
                   help="act as if the device ran out of memory above this many padded tokens per batch (to try "
                        "the back-off on a CPU)")
    p.add_argument("--report", metavar="PATH", help="HTML report path (default: next to the profile)")
    p.add_argument("--no-save", action="store_true", help="measure and report, but do not save the profile")
    p.add_argument("--json", action="store_true", help="print the profile as JSON instead of a table")
    p.set_defaults(func=cmd_tune)


def cmd_tune(args: argparse.Namespace) -> int:
    from reembed.embed import resolve_device

    device = resolve_device(args.device)
    rows = args.sample_rows or DEFAULT_SAMPLE_ROWS[device]
    model = {"name": args.model, "device": device, "dtype": args.dtype, "max_seq_length": args.max_seq_len,
             "backend": args.backend}
    budgets = [int(b) for b in args.budgets.split(",")] if args.budgets else None
    if args.sample:
        texts, source = read_sample(args.sample, args.text_column, rows), args.sample
    else:
        from reembed.embed import load_model

        seq = args.max_seq_len or load_model(args.model, None, "cpu", "float32").max_seq_length
        texts, source = synthetic_sample(rows, seq), f"synthetic ({rows} texts, up to 1.2 x {seq} words)"
    t0 = time.monotonic()
    summary = []
    for backend, dtype in _settings(args, device):
        profile = tune({**model, "backend": backend, "dtype": dtype}, texts, budgets, max_batch_rows=args.max_batch_rows,
                       compile=args.compile, min_seconds=args.min_seconds, oom_above=args.simulate_oom_above,
                       sample_source=source)
        saved = None if args.no_save else save_profile(profile)
        report_path = Path(args.report) if args.report and args.backend != "all" else (
            saved.with_suffix(".html") if saved else None)
        if report_path:
            write_report(profile, report_path)
        log.info("tune: %d budgets, %.1f s, chosen %d tokens", len(profile["points"]), time.monotonic() - t0,
                 profile["batch_tokens"])
        summary.append(profile)
        if args.json:
            continue  # one JSON document at the end
        print(f"{profile['model']} on {profile['device_name']} ({profile['backend']} backend, {profile['dtype']}, "
              f"{profile['attention']} attention, max_seq_len {profile['max_seq_length']}), sample: "
              f"{profile['sample']['rows']} docs, mean {profile['sample']['mean_tokens']} tokens")
        print(format_table(profile))
        print(f"chosen budget: {profile['batch_tokens']} tokens; largest that fits: {profile['max_fitting_budget']}")
        if saved:
            print(f"profile: {saved} (`reembed run` on {profile['accelerator']} with this model and max_seq_len uses it)")
        if report_path:
            print(f"report:  {report_path}")
    if args.json:  # one profile, or with --backend all one list of them: always one document
        print(json.dumps(summary if args.backend == "all" else summary[0], indent=1))
    elif len(summary) > 1:
        print()
        print(format_comparison(summary))
    sys.stdout.flush()
    return 0


def _settings(args: argparse.Namespace, device: str) -> list[tuple[str, str]]:
    """(backend, dtype) pairs to tune: the one asked for, or with ``--backend all`` every CPU setting."""
    if args.backend != "all":
        return [(args.backend, args.dtype)]
    if device != "cpu":
        raise UsageError("tune --backend all compares the CPU backends; on GPU the backend is torch")
    from reembed.embed import cpu_supports_bf16

    torch_dtypes = ["float32"] + (["bfloat16"] if cpu_supports_bf16() else [])
    return [("torch", d) for d in torch_dtypes] + [("onnx", "float32"), ("onnx-int8", "float32")]
