"""``reembed run | status``: the embedding job and its progress."""

from __future__ import annotations

import argparse
import json
from typing import Any

from reembed.cli import human_bytes, phase_table
from reembed.phases import human_seconds
from reembed.config import DEFAULT_MODEL, JobConfig, load_config, replace_path

EXIT_OK, EXIT_FAIL = 0, 1


def register(sub) -> None:
    r = sub.add_parser(
        "run", help="re-embed every document under --input into --output (rerun to resume)",
        description="Re-embed every document under the input into the output. Running the same command again "
                    "resumes from the last committed shard.",
    )
    add_run_arguments(r)
    r.set_defaults(func=cmd_run)

    s = sub.add_parser("status", help="RUNNING / SUCCEEDED / FAILED / INTERRUPTED, committed and pending shards, "
                       "rows, dead letters, model, rows/s and ETA",
                       description="Show an output's progress from its manifest, commit log and the live run's "
                                   "heartbeat: the state (as `ray job status` gives it), which host holds the run, "
                                   "rows/s, ETA and the last commit.")
    s.add_argument("output", metavar="OUTPUT_URI", help="the job's output folder or URI")
    add_storage_config(s)
    s.add_argument("--json", action="store_true", help="print the status as JSON (with --follow: one JSON "
                   "object per line, per refresh)")
    add_follow_arguments(s)
    s.set_defaults(func=cmd_status)


def add_storage_config(p: argparse.ArgumentParser) -> None:
    """``--config job.yaml``: the job's storage settings (S3 endpoint, region, retries) for a command that
    reads an output."""
    p.add_argument("--config", metavar="job.yaml", help="the job's YAML config; its storage section (endpoint_url, "
                   "region, max_attempts) says where the output's object store is")


def location(args: argparse.Namespace, uri: str | None):
    """``uri`` opened with the storage settings of ``--config`` (None stays None)."""
    from reembed.storage import Location

    return None if uri is None else Location.from_uri(uri, storage_settings(args))


def storage_settings(args: argparse.Namespace):
    """The storage settings of ``--config`` (defaults without one), for ``Location.from_uri``."""
    from reembed.storage import Settings

    path = getattr(args, "config", None)
    return Settings.of(load_config(path).storage) if path else Settings()


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
    r.add_argument("--reuse", metavar="OUTPUT_URI", help="an earlier output of the same model: rows whose id and "
                   "text are unchanged there take its vectors (bit for bit) instead of being embedded, and the ids it "
                   "has that the input lacks are listed as gone; config key plan.reuse")
    r.add_argument("--fresh", action="store_true", help="discard an existing output (shards, dead letters, "
                   "manifest) and start over instead of resuming")
    r.add_argument("--dry-run", action="store_true", help="plan only: list files, rows, shards and duplicate "
                   "ids, check the model, and estimate time and cost (tuned profile or a short sample on this "
                   "machine); writes nothing to the output and starts no Embedder actors")
    r.add_argument("--count-reuse", action="store_true", help="with --dry-run --reuse: count exactly the rows the "
                   "earlier output would give (a pass over the input's texts, as the run's planning Ray tasks); "
                   "without it the dry run checks the earlier output and says what would be compared")
    r.add_argument("--json", action="store_true", help="print the final summary (with per-phase timings) as JSON")
    r.add_argument("--take-over", action="store_true", help="run even though another run is live on this output "
                   "(its heartbeat is fresh): that run is fenced at its next commit and this one continues from "
                   "the last commit")


def config_from_args(args: argparse.Namespace) -> JobConfig:
    flags = {
        "input.uri": args.input, "output.uri": args.output, "model.name": args.model,
        "input.id_column": args.id_column, "input.text_column": args.text_column,
        "input.passthrough": args.passthrough, "plan.shard_rows": args.shard_rows, "model.device": args.device,
        "model.dtype": args.dtype, "model.backend": args.backend, "model.batch_tokens": args.batch_tokens, "compute.min_actors": args.min_actors,
        "compute.max_actors": args.max_actors, "compute.ray_address": args.address, "on_bad_file": args.on_bad_file,
        "output.fresh": True if args.fresh else None, "plan.reuse": getattr(args, "reuse", None),
    }

    cfg = load_config(args.config, args.overrides)
    for key, value in flags.items():
        if value is not None:
            cfg = replace_path(cfg, key.split("."), value, source=f"--{key.split('.')[-1].replace('_', '-')}")
    return cfg


def cmd_run(args: argparse.Namespace) -> int:
    from reembed import pipeline

    cfg = config_from_args(args)
    if getattr(args, "count_reuse", False) and not (args.dry_run and cfg.plan.reuse):
        from reembed.errors import UsageError

        raise UsageError("--count-reuse counts what --reuse would carry forward in a dry run: give it with "
                         "--dry-run and --reuse OUTPUT_URI")
    if args.dry_run:
        from reembed import dryrun

        result = dryrun.dry_run(cfg, count_reuse=getattr(args, "count_reuse", False))
        print(json.dumps(result, indent=1, default=str) if args.json else format_dry_run(result))
        return EXIT_OK
    summary = pipeline.run(cfg, take_over=getattr(args, "take_over", False))
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_summary(summary))
        if summary.get("phases"):
            print("\n" + phase_table(summary["phases"]))
    return EXIT_OK if summary["complete"] else EXIT_FAIL


def cmd_status(args: argparse.Namespace) -> int:
    from reembed import pipeline

    if getattr(args, "follow", False):
        return follow(args)
    summary = pipeline.status(args.output, storage_settings(args))
    if args.json:
        print(json.dumps(summary, indent=1, default=str))
    else:
        print(format_status(summary))
    return EXIT_OK


def format_summary(s: dict[str, Any], status: bool = False) -> str:
    m = s["model"]
    reasons = ", ".join(f"{k}={v}" for k, v in sorted(s["reasons"].items())) or "none"
    accounted = s["embedded"] + s["dead_lettered"]
    lines = [
        f"output:      {s['output']}",
        f"model:       {m['name']} (revision {m['revision']}, {m['dimension']}-d, normalize={m['normalize']}, "
        f"dtype={m['dtype']}, max_seq_length={m['max_seq_length']}, fingerprint {m['fingerprint']})",
        vectors_line(s["vector_dtype"], m["dimension"], s["bytes_per_vector"]),
        f"shards:      {s['committed']}/{s['shards']} committed, {len(s['pending'])} pending"
        + (f" ({', '.join(map(str, s['pending'][:10]))}{', ...' if len(s['pending']) > 10 else ''})" if s["pending"] else ""),
        f"rows:        input {s['input_rows']} = embedded {s['embedded']} + dead-lettered {s['dead_lettered']}"
        + ("" if s["complete"] else f" (so far: {accounted})"),
        f"dead letters: {reasons}",
        f"truncated:   {s['truncated']} embedded rows were longer than {m['max_seq_length']} tokens",
        f"tokens:      {s['tokens']} real tokens, {human_bytes(s['bytes'])} of shards, {s['device_seconds']} device-seconds",
    ]
    if s.get("rows_reused") or s.get("rows_deduplicated") or s.get("reuse"):
        lines.append(f"incremental: {s['rows_embedded']} rows embedded by the model, {s['rows_reused']} reused"
                     + (f" from {s['reuse']['uri']}" if s.get("reuse") else "")
                     + f", {s['rows_deduplicated']} copied from identical texts"
                     + (f"; {s['gone']} ids of the earlier output are gone (plan/gone/)" if s.get("reuse") else ""))
    if s.get("rows_per_second"):
        lines.append(f"throughput:  {s['rows_per_second']} rows/s over all runs")
    if s["bad_files"]:
        lines.append(f"bad files:   {len(s['bad_files'])} skipped: " + "; ".join(b["path"] for b in s["bad_files"][:5]))
    damaged = s.get("damaged") or []
    if damaged:
        lines.append(f"damaged:     {len(damaged)} committed shard(s) found missing or corrupt and retracted ("
                     f"{', '.join(map(str, damaged[:10]))}{', ...' if len(damaged) > 10 else ''})")
    repair = f"status:      damaged: run `reembed repair {s['output']}` (or the same run command) to re-embed them"
    if s.get("state"):  # the live run's lines; its advice, unless a live run must not be told to rerun
        lines += live_lines(s)
        if damaged and s["state"] != "RUNNING":
            lines[-1] = repair
    elif damaged:
        lines.append(repair)
    else:
        lines.append("status:      " + ("complete" if s["complete"] else "incomplete: run the same command again to resume"))
    return "\n".join(lines)




def vectors_line(dtype: str, dim: int, per_vector: int) -> str:
    """What the shards store per vector (``output.dtype``) and what it costs."""
    return f"vectors:     {dtype}, {dim}-d: {per_vector} bytes per vector (output.dtype)"


def format_dry_run(r: dict[str, Any]) -> str:
    """What ``reembed run --dry-run`` found, for a person."""
    m, e, pool = r["model"], r["estimate"], r["pool"]
    lines = [
        f"dry run:     nothing written to {r['output']}" + (" (an existing output: resuming it)" if r["output_exists"] else ""),
        f"input:       {r['input']}: {r['files']} file(s), {human_bytes(r['bytes'])}, {r['rows']} rows, "
        f"{r['duplicate_ids']} duplicate ids" + (f", {len(r['bad_files'])} unreadable" if r["bad_files"] else ""),
    ]
    for f in r["files_listed"]:
        lines.append(f"  {f['uri']}  {f['format']}  {human_bytes(f['size'])}  {f['rows']} rows"
                     + (f", {f['dup_rows']} duplicate ids" if f["dup_rows"] else ""))
    if r["files"] > len(r["files_listed"]):
        lines.append(f"  ... and {r['files'] - len(r['files_listed'])} more")
    lines += [
        f"shards:      {r['shards']} of up to {r['shard_rows']} rows; {r['pending_rows']} rows to embed"
        + (" (at most: the reused rows are not counted)" if r.get("reuse") and r["reuse"]["reusable"] is None
           else ""),
        f"model:       {m['name']} ({m['dimension']}-d, normalize={m['normalize']}, pooling {m['pooling']}, "
        f"max_seq_length={m['max_seq_length']}, fingerprint {m['fingerprint']})",
        vectors_line(r["vector_dtype"], m["dimension"], r["bytes_per_vector"]),
        f"pool:        {pool['min']}-{pool['max']} Embedder actor(s) on {pool['device']}"
        + (f" ({pool['accelerator']})" if pool["accelerator"] else "") + f", {pool['backend']} backend, "
        f"batch budget {pool['batch_tokens'] or 'default'} tokens",
    ]
    lines += reuse_lines(r.get("reuse"))
    lines += texts_lines(r.get("texts"))
    if e.get("basis") == "profile":
        basis = f"tuned profile {e['profile']}: {e['docs_per_s_per_device']:.1f} docs/s per device"
    elif e.get("basis") == "sample":
        basis = (f"{e['sample_rows']} documents measured on this machine's {e['device_here']} ({e['backend_here']}): "
                 f"{e['docs_per_s_here']} docs/s")
    else:
        basis = e.get("note", "no basis")
    lines.append(f"measured:    {basis}")
    if e.get("seconds") is not None:
        cost = (f", about {_usd(e['cost_usd'])} ({e['priced_as']} at ${e['usd_per_device_hour']}/h, prices of "
                f"{e['prices_as_of']})" if "cost_usd" in e else f" (cost: {e.get('cost_note')})")
        lines.append(f"estimate:    {human_seconds(e['seconds'])} of embedding at {e['docs_per_s']:.1f} docs/s{cost}; "
                     f"excludes {e['excludes']}")
    elif e.get("note"):
        lines.append(f"estimate:    none: {e['note']}")
    lines.append("next:        the same command without --dry-run runs it")
    return "\n".join(lines)


def texts_lines(t: dict[str, Any] | None) -> list[str]:
    """The dry run's identical-texts lines (``plan.dedup_texts``): counts, copy shards, what it saves."""
    if t is None:
        return ["texts:       not counted (plan.dedup_texts=false: only a block's identical texts are copied)"]
    saved = (f"; saves ~{human_seconds(t['saved_seconds'])} of the estimate below"
             + (f", about {_usd(t['saved_usd'])}" if t.get("saved_usd") is not None else "")
             if t.get("saved_seconds") is not None else "")
    lines = [f"texts:       {t['distinct_texts']} distinct of {t['rows']} rows; {t['rows_deduplicated']} rows copied "
             f"instead of embedded" + (f" ({t['moved_rows']} by {t['copy_shards']} copy shards)" if t["copy_pass"]
                                       else " (a shard's own repeats: no copy pass)") + saved,
             f"  counted:   {t['counted']}"]
    d = t.get("decision")
    if d:
        lines.append(f"  auto:      {'copy pass' if d['dedup'] else 'no copy pass'}: {d['rows_saved']} rows repeat a "
                     f"text of another shard; embedding them ~{d['saved_s']:.1f} s on {d['devices']} {d['device']} "
                     f"device(s), copying them ~{d['copy_pass_s']:.1f} s ({d['copy_tasks']} tasks on {d['cpus']} CPUs)")
    return lines


def reuse_lines(u: dict[str, Any] | None) -> list[str]:
    """The dry run's ``--reuse`` lines: the earlier output as checked, how rows are matched, and the counts
    (exact, or why not counted)."""
    if not u:
        return []
    old = (f"{u['old_rows']} committed rows" + (f" in {u['old_shards_committed']} of {u['old_shards']} shards"
                                                  if "old_shards" in u else "")
           + ("" if u["old_complete"] else ", not complete: only committed shards are reused"))
    lines = [f"reuse:       {u['uri']}: same model fingerprint {u['fingerprint']}, {old}",
             f"  how:       {u['compared']}"]
    if u.get("reusable") is None:
        lines.append(f"  count:     {u['counted']}")
    else:
        lines.append(f"  count:     {u['reusable']} rows would be reused, {u['changed']} changed texts re-embedded, "
                     f"{u['gone']} ids gone ({u['counted']})")
    return lines


def _usd(amount: float) -> str:
    return f"${amount:.2f}" if amount >= 0.01 else f"${amount:.2g}"


# -- the live run: state, rate, ETA, --follow -----------------------------------------------------------


def add_follow_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--follow", "-f", action="store_true", help="refresh until the run ends; exit 0 when it "
                   "SUCCEEDED, 1 when it FAILED or was INTERRUPTED")
    p.add_argument("--interval", type=float, default=5.0, metavar="SECONDS",
                   help="seconds between refreshes with --follow (default 5)")


def format_status(s: dict[str, Any]) -> str:
    """``reembed status``: the summary with the live run's lines (only those, before the output is planned)."""
    if "model" in s:
        return format_summary(s, status=True)
    return "\n".join([f"output:      {s['output']}", *live_lines(s)])


def live_lines(s: dict[str, Any]) -> list[str]:
    """The state of the run (RUNNING / SUCCEEDED / FAILED / INTERRUPTED), who holds it, rows/s, ETA, the last
    commit, and what to do next. Advice never tells a user to rerun while a run is live."""
    state, lv = s["state"], s.get("live") or {}
    lines = [f"state:       {state}" + (f" ({lv['phase']})" if state == "RUNNING" and lv.get("phase") else "")]
    if lv:
        job = f", Ray job {lv['ray_job']}" if lv.get("ray_job") else ""
        when = f"ended {lv['finished_at']}" if lv.get("finished_at") else f"last beat {lv['beat_age_s']:.0f} s ago"
        lines.append(f"run:         host {lv['host']} pid {lv['pid']}{job}, started {lv['started_at']}, {when}"
                     + (f" (epoch {lv['epoch']})" if lv.get("epoch") else ""))
        if lv.get("rows_total") is not None:
            rate = f"{lv['rows_per_second']:,.1f} rows/s" if lv.get("rows_per_second") else "rows/s not measured yet"
            eta = f", ETA {human_seconds(lv['eta_seconds'])}" if lv.get("eta_seconds") is not None else ""
            lines.append(f"this run:    {lv['rows_done']:,}/{lv['rows_total']:,} rows, {lv['shards_done']}/"
                         f"{lv['shards_total']} shards; {rate}{eta}")
        if lv.get("last_commit_at"):
            lines.append(f"last commit: {lv['last_commit_at']}")
    uri = s["output"]
    if state == "RUNNING":
        advice = (f"running: follow it with `reembed status {uri} --follow`; a second run on this output is refused "
                  "unless --take-over (which fences this one)")
    elif state == "SUCCEEDED":
        advice = "complete"
    elif state == "FAILED":
        error = lv.get("error") or "see its log"
        says_how = "rerun" in error or "same command" in error  # reembed's errors say what to do next
        advice = f"failed: {error}" + ("" if says_how else "; fix the cause, then run the same command again to resume")
    else:
        why = "it stopped" if not lv else lv.get("error") or f"its heartbeat stopped {lv['beat_age_s']:.0f} s ago"
        advice = f"interrupted ({why}): run the same command again to resume"
    lines.append(f"status:      {advice}")
    return lines


def follow(args: argparse.Namespace) -> int:
    """Print the status every ``--interval`` seconds until the run is no longer RUNNING: one line per
    refresh (one JSON object per line with --json), then the whole status. Exit 0 on SUCCEEDED, else 1."""
    import sys
    import time

    from reembed import pipeline

    settings, tty = storage_settings(args), sys.stdout.isatty() and not args.json
    while True:
        summary = pipeline.status(args.output, settings)
        if summary["state"] != "RUNNING":
            break
        if args.json:
            print(json.dumps(summary, default=str), flush=True)
        else:
            line = progress_line(summary)
            print(("\r\x1b[K" + line) if tty else line, end="" if tty else "\n", flush=True)
        time.sleep(max(0.1, args.interval))
    if tty:
        print()
    print(json.dumps(summary, default=str) if args.json else format_status(summary), flush=True)
    return EXIT_OK if summary["state"] == "SUCCEEDED" else EXIT_FAIL


def progress_line(s: dict[str, Any]) -> str:
    lv = s.get("live") or {}
    parts = [s["state"], lv.get("phase") or ""]
    if "shards" in s:
        parts.append(f"shards {s['committed']}/{s['shards']}")
    if lv.get("rows_total") is not None:
        parts.append(f"rows {lv['rows_done']:,}/{lv['rows_total']:,}")
    if lv.get("rows_per_second"):
        parts.append(f"{lv['rows_per_second']:,.1f} rows/s")
    if lv.get("eta_seconds") is not None:
        parts.append(f"ETA {human_seconds(lv['eta_seconds'])}")
    parts.append(f"on {lv.get('host')} pid {lv.get('pid')}")
    return "  ".join(p for p in parts if p)
