"""The ``reembed`` command: parses arguments, then calls one function per subcommand."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from typing import Any, Callable

from reembed.config import DEFAULT_MODEL, ConfigError, JobConfig, load_config

log = logging.getLogger("reembed")

EXIT_OK, EXIT_FAIL, EXIT_USAGE = 0, 1, 2


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _setup_logging(args.verbose)
    try:
        return args.func(args) or EXIT_OK
    except ConfigError as e:
        print(f"reembed: config error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("reembed: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # the CLI owns user-facing output: one clear line, details with -v
        if _is_user_error(e):
            print(f"reembed: error: {e}", file=sys.stderr)
            if args.verbose:
                raise
            return EXIT_FAIL
        raise


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="reembed",
        description="Re-embed a document corpus with a new embedding model on Ray: sharded, resumable output "
                    "with a checkpoint manifest.",
    )
    p.add_argument("-v", "--verbose", action="count", default=0, help="more logging (-vv for debug)")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    r = sub.add_parser(
        "run", help="re-embed every document under --input into --output (rerun to resume)",
        description="Re-embed every document under the input into the output. Running the same command again "
                    "resumes from the last committed shard.",
    )
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="committed and pending shards, rows, dead letters, model, throughput",
                       description="Show an output's progress from its manifest.")
    s.add_argument("output", metavar="OUTPUT_URI", help="the job's output folder or URI")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.set_defaults(func=cmd_status)

    for register in _extra_commands():
        register(sub)
    return p


def add_run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("--input", metavar="URI", help="folder, file, glob or URI of Parquet / JSON Lines documents "
                   "(local path, file://, s3://, gs://, ...); config key input.uri")
    r.add_argument("--output", metavar="URI", help="where shards, dead letters and the manifest go; config key output.uri")
    r.add_argument("--model", metavar="NAME_OR_PATH", help=f"sentence-transformers model: hub name resolved through "
                   f"the local Hugging Face cache, or a local folder (default {DEFAULT_MODEL}); config key model.name")
    r.add_argument("--config", metavar="job.yaml", help="YAML file with the same settings (sections input, output, "
                   "model, plan, compute); unknown keys are refused")
    r.add_argument("--set", metavar="KEY=VALUE", action="append", default=[], dest="overrides",
                   help="override one setting, e.g. --set model.dtype=bfloat16 --set plan.shard_rows=5000 (repeatable)")
    r.add_argument("--id-column", help="input column holding document ids (default id)")
    r.add_argument("--text-column", help="input column holding document text (default text)")
    r.add_argument("--passthrough", metavar="COL[,COL]", help="input columns copied into the output shards, e.g. text,lang")
    r.add_argument("--shard-rows", type=int, help="rows per output shard, the unit of commit and resume (default 10000)")
    r.add_argument("--device", choices=["auto", "cpu", "cuda"], help="embedding device (default auto: GPU when the cluster has one)")
    r.add_argument("--dtype", choices=["auto", "float32", "float16", "bfloat16"], help="model dtype (default auto: float16 on GPU, float32 on CPU)")
    r.add_argument("--backend", choices=["auto", "torch", "onnx", "onnx-int8"], help="what runs the model (default "
                   "auto: torch on GPU, ONNX Runtime float32 on CPU); onnx-int8 quantizes for CPU; config key model.backend")
    r.add_argument("--batch-tokens", type=int, help="padded tokens per forward pass (default: tuned profile, else a device default)")
    r.add_argument("--min-actors", type=int, help="Embedder actor pool minimum (default 1)")
    r.add_argument("--max-actors", type=int, help="Embedder actor pool maximum (default: one per GPU)")
    r.add_argument("--address", help="Ray cluster address (default RAY_ADDRESS, else a local Ray)")
    r.add_argument("--on-bad-file", choices=["fail", "skip"], help="an unreadable input file stops the job (fail, "
                   "default) or is recorded in the manifest's ledger and skipped (skip)")
    r.add_argument("--fresh", action="store_true", help="discard an existing output (shards, dead letters, "
                   "manifest) and start over instead of resuming")
    r.add_argument("--json", action="store_true", help="print the final summary as JSON")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    flags = {
        "input.uri": args.input, "output.uri": args.output, "model.name": args.model,
        "input.id_column": args.id_column, "input.text_column": args.text_column,
        "input.passthrough": args.passthrough, "plan.shard_rows": args.shard_rows, "model.device": args.device,
        "model.dtype": args.dtype, "model.backend": args.backend, "model.batch_tokens": args.batch_tokens, "compute.min_actors": args.min_actors,
        "compute.max_actors": args.max_actors, "compute.ray_address": args.address, "on_bad_file": args.on_bad_file,
        "output.fresh": True if args.fresh else None,
    }
    from reembed.config import replace_path

    cfg = load_config(args.config, args.overrides)
    for key, value in flags.items():
        if value is not None:
            cfg = replace_path(cfg, key.split("."), value, source=f"--{key.split('.')[-1].replace('_', '-')}")
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from reembed import pipeline

    cfg = config_from_args(args)
    summary = pipeline.run(cfg)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_summary(summary))
    return EXIT_OK if summary["complete"] else EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    from reembed import pipeline, storage
    from reembed.manifest import Manifest

    m = Manifest.load(storage.Location.from_uri(args.output))
    if m is None:
        print(f"reembed: {args.output}: no manifest.json here (not a reembed output, or nothing planned yet)", file=sys.stderr)
        return EXIT_FAIL
    summary = pipeline.summarize(m)
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_summary(summary, status=True))
    return EXIT_OK


def format_summary(s: dict[str, Any], status: bool = False) -> str:
    m = s["model"]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["reasons"].items())) or "none"
    accounted = s["embedded"] + s["dead_lettered"]
    lines = [
        f"output:      {s['output']}",
        f"model:       {m['name']} (revision {m['revision']}, {m['dimension']}-d, normalize={m['normalize']}, "
        f"dtype={m['dtype']}, max_seq_length={m['max_seq_length']}, fingerprint {m['fingerprint']})",
        f"shards:      {s['committed']}/{s['shards']} committed, {len(s['pending'])} pending"
        + (f" ({', '.join(map(str, s['pending'][:10]))}{', ...' if len(s['pending']) > 10 else ''})" if s["pending"] else ""),
        f"rows:        input {s['input_rows']} = embedded {s['embedded']} + dead-lettered {s['dead_lettered']}"
        + ("" if s["complete"] else f" (so far: {accounted})"),
        f"dead letters: {reasons}",
        f"truncated:   {s['truncated']} embedded rows were longer than {m['max_seq_length']} tokens",
        f"tokens:      {s['tokens']} real tokens, {s['bytes']} bytes of shards, {s['device_seconds']} device-seconds",
    ]
    if s.get("rows_per_second"):
        lines.append(f"throughput:  {s['rows_per_second']} rows/s over all runs")
    if s["bad_files"]:
        lines.append(f"bad files:   {len(s['bad_files'])} skipped: " + "; ".join(b["path"] for b in s["bad_files"][:5]))
    lines.append("status:      " + ("complete" if s["complete"] else "incomplete: run the same command again to resume"))
    return "\n".join(lines)


def _extra_commands() -> list[Callable[[Any], None]]:
    """Subcommands of the later stages (index, migrate, tune, cost), registered by their modules."""
    registers = []
    for mod in ("reembed.indexes.commands", "reembed.tune", "reembed.cost", "reembed.migrate.commands"):
        try:
            module = __import__(mod, fromlist=["register"])
        except ModuleNotFoundError as e:
            if e.name != mod:  # a real import error inside the module must not vanish
                raise
            continue
        if hasattr(module, "register"):
            registers.append(module.register)
    return registers


def _is_user_error(e: Exception) -> bool:
    from reembed.cost import PriceError
    from reembed.embed import ModelLoadError
    from reembed.manifest import ManifestError
    from reembed.plan import InputError
    from reembed.storage import StorageError

    return isinstance(e, (InputError, StorageError, ManifestError, ModelLoadError, PriceError, FileNotFoundError,
                          PermissionError))


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose < 0 else logging.INFO if verbose < 2 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("urllib3", "filelock", "httpx", "sentence_transformers", "transformers", "faiss"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


if __name__ == "__main__":
    sys.exit(main())
