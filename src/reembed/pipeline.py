"""The re-embedding job: plan -> Ray Data read -> Embedder actor pool -> shard writer tasks -> commit.

``run(cfg)`` is the whole job. Running it again on the same output resumes: committed shards are
skipped, the rest are recomputed, and the result is the same as an uninterrupted run.

Vectors never pass through the driver. It iterates the embedded blocks' references, learns from a tiny
task per block which shards the block holds (:func:`write.block_shards`), and once a shard's rows are
all embedded launches a writer task on its blocks (:func:`write.write_shard_from_blocks`), which Ray
schedules next to them; the driver receives the small record and commits it to the commit log (one
create-only entry, O(1) at any size). A shard whose blocks were lost with a node is embedded again in
another pass of the same run.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import time
from typing import Any, Iterator

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from reembed import cluster, embed, live, plan_store, storage
from reembed import schema as S
from reembed.cluster import init_ray, surface  # init_ray: also reached as pipeline.init_ray by indexes.build
from reembed.config import JobConfig, validate
from reembed.errors import ConcurrentWriteError, OutputRefused
from reembed.indexes import build as index_stage
from reembed.embed.model import check_available
from reembed.manifest import Manifest, ManifestError, now, read_recorded, write_failed
from reembed.phases import Phases, Progress, human_bytes
from reembed.plan import PLAN_DIR, check_input, input_location, make_plan, passthrough_schema
from reembed.write import DEAD_LETTER, SHARDS, ShardRouter, block_shards, write_shard_from_blocks

log = logging.getLogger(__name__)

WRITER_CPUS = 0.25  # a writer task sorts, encodes, hashes and uploads one shard
SUMMARY_CPUS = 0.25  # a block's {shard: rows}: tiny, but a smaller share lets Ray start dozens of workers
WRITERS_PER_CPU = 2  # writer tasks in flight per cluster CPU (at least 4)
LOST_PASSES = 3  # passes of one run over shards whose blocks were lost with a node


def run(cfg: JobConfig, embedder: Any = None, take_over: bool = False) -> dict[str, Any]:
    """Re-embed every document under ``cfg.input.uri`` into ``cfg.output.uri``; returns the summary.

    ``embedder`` replaces :class:`embed.Embedder` in the actor pool (a class with its constructor's
    keyword arguments and a ``describe(cfg)`` classmethod giving the model record): the benchmarks'
    null embedder runs the real read -> pool -> writer -> commit path without a model.

    The run holds the output's heartbeat (:mod:`reembed.live`) from start to end: an output another run
    holds is refused with :class:`LiveRunError` unless ``take_over`` (that run is fenced at its next commit).

    Every error a user can cause comes out as a :class:`ReembedError` of its own class, also when it was
    raised inside a Ray task (Ray's wrappers are taken off, see :func:`surface`).
    """
    validate(cfg)
    started, t0 = now(), time.monotonic()
    phases = Phases()
    storage.preflight(cfg.input.uri, cfg.output.uri, cfg.storage)
    out = storage.Location.from_uri(cfg.output.uri, cfg.storage)
    check_output_folder(out)
    live.refuse_if_live(out, take_over)  # a live output is refused first, in a second
    if embedder is None:
        with phases.phase("model check"):
            check_available(cfg.model.name, cfg.model.revision)  # a second or two: before anything is written
    with live.Heartbeat.acquire(out, take_over=take_over) as beat:
        summary = _run_held(cfg, out, embedder, beat, started, t0, phases)
        if not summary["complete"]:
            beat.finish(live.FAILED, f"ended with {len(summary['pending'])} shard(s) pending")
    return summary


def _run_held(cfg: JobConfig, out: storage.Location, embedder: Any, beat: live.Heartbeat, started: str,
              t0: float, phases: Phases) -> dict[str, Any]:
    """:func:`run` once the run holds the output's heartbeat."""
    beat.phase("preparing")
    if cfg.output.fresh:
        _wipe(out)

    with phases.phase("model check", f"checking the model {cfg.model.name} (loading it once on this machine's CPU)"):
        model_info = inspect_model(cfg) if embedder is None else embedder.describe(cfg)  # first, without Ray
    manifest = open_output(cfg, out, model_info, phases)

    beat.check()  # a run taken over while it planned stops here, before it claims the output back
    # Claiming fences any other job on this output before leftovers of crashed attempts are removed.
    cleaned = manifest.claim(SHARDS, DEAD_LETTER) if manifest.pending() else manifest.clean_temp(SHARDS, DEAD_LETTER)
    if cleaned:
        log.info("removed %d uncommitted file(s) left by an interrupted attempt", cleaned)
    pending = manifest.pending()
    total = manifest.shard_count
    log.info("%d of %d shards committed, %d pending", total - len(pending), total, len(pending))

    run_info: dict[str, Any] = {"started_at": started, "shards_committed": 0, "rows": 0, "tokens": 0, "device_seconds": 0.0}
    beat.held(manifest.epoch)
    if pending:
        try:
            run_info.update(_execute(cfg, manifest, pending, embedder, phases, beat))
        except Exception as e:
            found = surface(e)
            if found is e:
                raise
            raise found from e
    run_info["finished_at"] = now()
    run_info["wall_seconds"] = round(time.monotonic() - t0, 3)
    if pending:
        manifest.record_run(run_info)
        manifest.clean_temp(SHARDS, DEAD_LETTER)  # the _tmp/ folders this run's writes went through
    summary = summarize(manifest)
    summary["run"] = run_info
    if cfg.index.enabled and summary["complete"]:
        beat.phase("indexing")
        with phases.phase("index", "building the indexes (FAISS and Qdrant, in parallel)"):
            summary["index"] = index_stage.run_index(cfg.output.uri, cfg.index, ray_address=cfg.compute.ray_address)
    phases.add("other", time.monotonic() - t0 - sum(phases.seconds.values()))  # storage checks, bookkeeping
    summary["phases"] = phases.as_list()
    return summary


def open_output(cfg: JobConfig, out: storage.Location, model_info: dict[str, Any],
                phases: Phases | None = None) -> Manifest:
    """The output's manifest: on a new output Ray is started and the input planned now (as Ray tasks; the
    plan's Parquet goes under ``plan/``) and the manifest saved; on a resume it is loaded and checked, without
    Ray (model, input settings, the plan's files against their sha256, the input files against the plan)."""
    phases = phases or Phases()
    manifest = Manifest.load(out)
    source = storage.Location.from_uri(cfg.input.uri, cfg.storage)
    if manifest is None:
        earlier = None
        if cfg.plan.reuse:  # refused in a second (other model, no text hashes) before anything is planned
            from reembed import reuse

            earlier = storage.Location.from_uri(cfg.plan.reuse, cfg.storage)
            old = reuse.open_earlier(earlier, model_info, out)
        start_ray(cfg, phases)  # counting and dedup run as Ray tasks
        with phases.phase("plan", "planning: listing the input, counting rows, finding duplicate ids"):
            try:
                plan = make_plan(cfg.input, cfg.plan.shard_rows, out.child(PLAN_DIR), cfg.on_bad_file, source=source,
                                 dedup=cfg.plan.dedup, use_ray=True)
                if earlier is not None:  # first: the identical texts' plan keeps the carried-forward rows
                    plan_reuse(plan, out, earlier, old, source)
                if cfg.plan.dedup_texts:
                    plan_texts(plan, out, source, auto=texts_cluster(cfg) if cfg.plan.dedup_texts == "auto" else None)
            except OSError as e:
                raise write_failed(e, out.display(PLAN_DIR)) from e
            plan[S.VECTOR_DTYPE] = cfg.output.dtype
            return Manifest.create(out, model_info, plan, {"rows": plan["duplicate_rows"], "mode": plan["dedup"]})
    with phases.phase("resume check", "resuming: checking the output's model, plan and input files"):
        check_resume(manifest, cfg, model_info)
    return manifest


def plan_reuse(plan: dict[str, Any], out: storage.Location, earlier: storage.Location, old: Manifest,
               source: storage.Location) -> None:
    """Add the reuse of ``earlier`` (``--reuse``) to ``plan``: the join as Ray tasks (:mod:`reembed.reuse`),
    its summary under ``plan["reuse"]`` and its Parquet parts, with their sha256, under ``plan["store"]``."""
    import functools

    from reembed import read, reuse
    from reembed.plan import _record

    work = out.child(PLAN_DIR)
    fields = {k: plan.get(k) for k in read.FIELDS if k != "reuse"}
    reader = functools.partial(read.read_shards, fields, work, source=source)
    plan["reuse"] = reuse.plan_reuse(earlier, old, plan, work, reader, use_ray=True)
    parts = [reuse.part_file(p) for p in range(plan["reuse"]["partitions"])]
    plan["store"]["reuse"] = [_record(work, reuse.REUSE_DIR, name) for name in parts]
    plan["store"]["gone"] = [_record(work, reuse.GONE_DIR, name) for name in parts]


def plan_texts(plan: dict[str, Any], out: storage.Location, source: storage.Location,
               auto: dict[str, Any] | None = None) -> None:
    """Add corpus-wide identical texts to ``plan`` (``plan.dedup_texts``): Ray tasks by text hash
    (:mod:`reembed.texts`), the summary under ``plan["texts"]`` (its ``copies`` are shards numbered after the
    plan's) and its Parquet parts, with their sha256, under ``plan["store"]["texts"]``. ``auto``
    (``plan.dedup_texts: auto``: :func:`texts_cluster`): the copy pass is kept only where it costs less than the
    embedding it saves (:func:`reembed.texts.decide`); the decision and its numbers go to ``plan["dedup_texts"]``."""
    import functools

    from reembed import read, texts
    from reembed.plan import _record

    work = out.child(PLAN_DIR)
    fields = {k: plan.get(k) for k in read.FIELDS if k not in ("reuse", "texts")}
    reader = functools.partial(read.read_shards, fields, work, source=source)
    summary = texts.plan_texts(plan, work, reader, use_ray=True)
    if auto is not None:
        decision = plan["dedup_texts"] = texts.decide(summary, **auto)
        log.info("plan.dedup_texts=auto: %s: %d rows repeat a text of another shard; embedding them ~%.1f s "
                 "(%d %s device(s) at %.2g s a row), the copy pass ~%.1f s (%d tasks on %d CPUs)",
                 "copy them" if decision["dedup"] else "embed them", decision["rows_saved"], decision["saved_s"],
                 decision["devices"], decision["device"], decision["embed_s_per_row"], decision["copy_pass_s"],
                 decision["copy_tasks"], decision["cpus"])
        if not decision["dedup"]:
            work.delete_dir(texts.TEXTS_DIR)
            return
    plan["texts"] = summary
    parts = [texts.part_file(p) for p in range(plan["texts"]["partitions"])]
    names = parts + [f"{texts.LEADERS_DIR}/{name}" for name in parts] + list(texts.PLAN_FILES)
    plan["store"]["texts"] = [_record(work, texts.TEXTS_DIR, *name.split("/")) for name in names]


def texts_cluster(cfg: JobConfig, resources: dict[str, float] | None = None) -> dict[str, Any]:
    """What :func:`reembed.texts.decide` weighs: the device kind, how many devices embed and the CPUs the copy
    pass spreads over. The devices are those the Embedder pool can grow to when ``compute.max_actors`` is set
    (``max_actors`` x ``gpus_per_actor`` GPUs; on CPU x ``cpus_per_actor`` cores), so an autoscaling cluster
    (KubeRay) that has scaled down while the plan is made is not judged as the smaller one; else the GPUs (on
    CPU, the CPUs) of the cluster now (``resources``, default ``ray.cluster_resources()``)."""
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    gpus, cpus = int(resources.get("GPU", 0)), max(1, int(resources.get("CPU", 1)))
    device = cfg.model.device if cfg.model.device != "auto" else ("cuda" if gpus else "cpu")
    c = cfg.compute
    if device == "cuda":
        devices = max(1, round(c.max_actors * c.gpus_per_actor) if c.max_actors else gpus)
    else:
        devices = max(1, int(c.max_actors * c.cpus_per_actor) if c.max_actors and c.cpus_per_actor else cpus)
    return {"device": device, "devices": devices, "cpus": cpus}


def start_ray(cfg: JobConfig, phases: Phases) -> None:
    """Start or join Ray (once per process), timed as the ``ray start`` phase."""
    import ray

    if not ray.is_initialized():
        with phases.phase("ray start"):
            init_ray(cfg.compute.ray_address)


def check_output_folder(out: storage.Location) -> None:
    """Refuse an output that is an existing file (a folder is expected) before anything is planned."""
    if out.is_object_store:
        return  # an object at the prefix's own key does not stop keys under it
    try:
        kind = out.fs.get_file_info(out.root).type
    except OSError as e:
        raise storage.explain(e, out.uri, "check", out.settings) from e
    if kind == pafs.FileType.File:
        raise storage.StorageError(
            f"{out.uri}: is a file; the output must be a folder (new, or one a reembed run wrote): "
            "choose another --output (output.uri)"
        )


def inspect_model(cfg: JobConfig) -> dict[str, Any]:
    """Load the model on the driver's CPU once to learn its identity (dimension, pooling, revision), and
    fail before any GPU work if it cannot be found, or cannot run on the backend asked for (before the
    manifest is created: a refused backend leaves nothing behind)."""
    m = cfg.model
    embed.check_backend(_model_args(cfg), m.device, m.compile)
    model = embed.load_model(m.name, m.revision, "cpu", "float32", m.max_seq_length)
    return embed.describe_model(model, m.name, embed.space_dtype(m.dtype, m.backend), m.revision)


def check_resume(manifest: Manifest, cfg: JobConfig, model_info: dict[str, Any]) -> None:
    """Refuse to resume an output made with another model, embedding setting or input."""
    where = manifest.loc.display("manifest.json")
    stored = manifest.model
    if stored["fingerprint"] != model_info["fingerprint"]:
        diffs = [f"{k}: {stored.get(k)!r} -> {model_info.get(k)!r}" for k in
                 ("name", "revision", "dimension", "normalize", "pooling", "dtype", "max_seq_length")
                 if stored.get(k) != model_info.get(k)]
        raise OutputRefused(
            f"{where}: fingerprint mismatch: this output was made with fingerprint {stored['fingerprint']} "
            f"and this job has {model_info['fingerprint']} ({'; '.join(diffs)}). Vectors from different "
            "settings must not be mixed: use another --output, or --fresh to discard this one."
        )
    plan = manifest.plan
    if S.vector_dtype(plan) != cfg.output.dtype:
        raise OutputRefused(
            f"{where}: this output's shards hold {S.vector_dtype(plan)} vectors and this job asks for "
            f"output.dtype={cfg.output.dtype}; one output holds one dtype: set output.dtype={S.vector_dtype(plan)}, "
            "use another --output, or --fresh to discard this one")
    mine = {"input_uri": cfg.input.uri, "id_column": cfg.input.id_column, "text_column": cfg.input.text_column,
            "passthrough": list(cfg.input.passthrough), "shard_rows": cfg.plan.shard_rows, "dedup": cfg.plan.dedup}
    diffs = [f"{k}: {plan.get(k)!r} -> {v!r}" for k, v in mine.items() if plan.get(k) != v]
    planned_reuse = (plan.get("reuse") or {}).get("uri")
    if planned_reuse != (storage.Location.from_uri(cfg.plan.reuse).uri if cfg.plan.reuse else None):
        diffs.append(f"reuse: {planned_reuse!r} -> {cfg.plan.reuse!r}")
    if diffs:
        raise OutputRefused(
            f"{where}: this output was planned with other input settings ({'; '.join(diffs)}); "
            "use another --output, or --fresh to re-plan"
        )
    if cfg.plan.dedup_texts != "auto" and bool(plan.get("texts")) != cfg.plan.dedup_texts:
        log.warning("%s: planned with plan.dedup_texts=%s; this resume follows its plan (--fresh re-plans)",
                    where, str(bool(plan.get("texts"))).lower())
    # The plan's files, read back on the manifest's word: inside the output and unchanged.
    store = plan.get("store")
    if store is None:
        raise ManifestError(f"{where}: this output's plan is inside its manifest (an older reembed wrote it); "
                            "finish it with that version, or --fresh to re-plan")
    for i, rec in enumerate(store["segments"]):
        read_recorded(manifest.loc, rec, f"plan.store.segments[{i}]")
    for key in ("duplicates", "reuse", "gone", "texts"):
        for i, rec in enumerate(store.get(key, [])):
            read_recorded(manifest.loc, rec, f"plan.store.{key}[{i}]")
    files = pq.read_table(pa.BufferReader(read_recorded(manifest.loc, store["files"], "plan.store.files")))
    check_input(plan, files, storage.Location.from_uri(cfg.input.uri, cfg.storage))


def status(output: str | storage.Location, settings: Any = None) -> dict[str, Any]:
    """The progress of an output (the summary ``reembed status`` prints), from its manifest; ``settings``
    are the storage settings (``storage.Settings`` or the job config's ``storage`` section)."""
    loc = output if isinstance(output, storage.Location) else storage.Location.from_uri(output, settings)
    m = Manifest.load(loc)
    if m is None:
        return _status_before_plan(loc)
    summary = summarize(m)
    summary.update(planned=True, **live.describe(loc, summary["complete"]))
    return summary


def _status_before_plan(loc: storage.Location) -> dict[str, Any]:
    """An output without a manifest: a run that is still planning it, or that stopped before it planned."""
    found = live.describe(loc, complete=False)
    if found["live"] is None:
        raise ManifestError(f"{loc.uri}: no manifest.json here (not a reembed output, or nothing planned yet)")
    return {"output": loc.uri, "planned": False, "complete": False, **found}


def summarize(manifest: Manifest) -> dict[str, Any]:
    t = manifest.totals()
    plan = manifest.plan
    runs = manifest.data.get("runs", [])
    wall = sum(r.get("wall_seconds", 0) for r in runs)
    run_rows = sum(r.get("rows", 0) for r in runs)
    return {
        "output": manifest.loc.uri,
        "model": manifest.model,
        "input_rows": plan["rows"],
        "shards": manifest.shard_count,
        "committed": len(manifest.committed),
        "pending": manifest.pending(),
        "embedded": t["embedded"],
        "dead_lettered": t["dead_lettered"],
        "reasons": t["reasons"],
        "truncated": t["truncated"],
        "tokens": t["tokens"],
        "bytes": t["bytes"],
        "device_seconds": round(t["device_seconds"], 3),
        "bad_files": plan.get("bad_files", []),
        "rows_per_second": round(run_rows / wall, 1) if wall else None,
        "complete": manifest.is_complete(),
        # Shards `reembed repair` found damaged and retracted, not re-embedded yet (they are also pending).
        "damaged": sorted(manifest.state().damaged),
        # Incremental runs: rows written with a vector = embedded by the model + reused from the --reuse
        # output + copied from an identical text of the same block.
        "rows_embedded": t["embedded"] - t.get("reused", 0) - t.get("deduplicated", 0),
        "rows_reused": t.get("reused", 0),
        "rows_deduplicated": t.get("deduplicated", 0),
        "reuse": plan.get("reuse"),
        "gone": (plan.get("reuse") or {}).get("gone"),
        # What a stored vector is (output.dtype) and costs: the shards' embedding column holds dim of them.
        "vector_dtype": S.vector_dtype(plan),
        "bytes_per_vector": S.VECTOR_DTYPES[S.vector_dtype(plan)].byte_width * int(manifest.model["dimension"]),
    }


# ---------------------------------------------------------------------------------------------------


def _execute(cfg: JobConfig, manifest: Manifest, pending: list[int], embedder: Any = None,
             phases: Phases | None = None, beat: live.Heartbeat | None = None) -> dict[str, Any]:
    import ray
    from ray.data import ActorPoolStrategy

    from reembed.read import ShardDatasource

    phases = phases or Phases()
    start_ray(cfg, phases)
    resources = ray.cluster_resources()
    pool = plan_pool(cfg, resources)
    log.info(
        "embedding %d shards on %s (%s backend): %d-%d Embedder actors (%s GPU, %s CPU each), batch budget %s tokens",
        len(pending), pool["device"], pool["backend"], pool["min"], pool["max"], pool["num_gpus"], pool["num_cpus"],
        pool["batch_tokens"] or "default",
    )
    log.info("starting the Embedder actors: each loads the model%s; progress shows from the first embedded "
             "block on", " (on CPU, the first use of a model exports it to ONNX once: about a minute)"
             if pool["backend"].startswith("onnx") else "")
    if pool["device"] == "cpu" and cfg.model.dtype == "auto" and embed.cpu_supports_bf16():
        log.info("this CPU has native bfloat16 (AVX512-BF16/AMX): model.dtype=bfloat16 may be faster than float32 "
                 "(vectors at cosine ~0.9999 to float32; a new output, since the fingerprint changes)")
    plan = manifest.plan
    model_args = {**_model_args(cfg), "device": pool["device"]}

    # The input's Location carries the job's storage settings into every read task; each task reads its
    # own segments from the plan's Parquet under the output.
    regular = int(plan["shards"])  # the plan's shards; copy shards of identical texts are numbered after them
    index = plan_store.segment_index(manifest.loc.child(PLAN_DIR), regular)
    copies = [s for s in pending if s >= regular]
    pending = [s for s in pending if s < regular]
    source = input_location(plan, cfg.storage)
    earlier = storage.Location.from_uri(plan["reuse"]["uri"], cfg.storage) if plan.get("reuse") else None

    def dataset(todo: list[int]):
        datasource = ShardDatasource(plan, manifest.loc, todo, source=source, index=index, earlier=earlier)
        ds = ray.data.read_datasource(datasource, num_cpus=cfg.compute.read_cpus,
                                      override_num_blocks=datasource.num_tasks)
        ds = ds.map_batches(
            embedder or embed.Embedder,
            fn_constructor_kwargs={
                "model": model_args,
                "batch_tokens": pool["batch_tokens"],
                "max_batch_rows": cfg.model.max_batch_rows,
                "torch_threads": pool["torch_threads"],
                "compile": cfg.model.compile,
                "crash_once": os.environ.get(embed.CRASH_ONCE_ENV),
            },
            # One shard per call (Ray Data requires a batch size for GPU actors); the Embedder sorts and
            # batches by tokens inside it, and the router accepts any grouping of rows.
            batch_size=cfg.plan.shard_rows,
            batch_format="pyarrow",
            compute=ActorPoolStrategy(
                min_size=pool["min"], max_size=pool["max"],
                max_tasks_in_flight_per_actor=cfg.compute.batches_in_flight + 1,
                max_concurrent_calls_per_actor=2,
            ),
            num_gpus=pool["num_gpus"],
            num_cpus=pool["num_cpus"],
            # Ray Data restarts a dead Embedder actor and retries its in-flight blocks (max_restarts=-1,
            # max_task_retries=-1 by default); a block is only ever delivered once, and the router
            # refuses any shard that receives more rows than planned.
        )
        return ds

    expected = plan_store.shard_rows(index, pending)
    moved, copy_rows = _copy_rows(manifest, pending, copies)
    # Passthrough values may be null whatever the input's schema said (a JSON Lines row may lack the key).
    shard_schema = S.shard_schema(manifest.model["dimension"],
                                  pa.schema([f.with_nullable(True) for f in passthrough_schema(plan)]),
                                  S.vector_dtype(plan), text_hash=True)
    total_rows = sum(expected.values()) - moved + copy_rows  # the rows the commits will account for
    stats = {"shards_committed": 0, "rows": 0, "tokens": 0, "device_seconds": 0.0, "bytes": 0,
             "rows_reused": 0, "rows_deduplicated": 0,
             "device": pool["device"], "device_count": pool["max"], "accelerator": pool["accelerator"],
             # CPUs of the cluster the run held (what a cloud bills a CPU run for); GPU runs are billed per GPU.
             "cpus": int(resources.get("CPU", 0)),
             "dtype": embed.resolve_dtype(cfg.model.dtype, pool["device"]), "backend": pool["backend"],
             "batch_tokens": pool["batch_tokens"]}
    t0 = time.monotonic()
    bar = Progress(total_rows, "embedded")
    if beat is not None:
        beat.phase("embedding", rows_total=total_rows, shards_total=len(pending) + len(copies))
        bar = live.Progress(bar, beat)
    todo, passes = list(pending), 0
    try:
        with _ray_data_console():
            while todo:
                passes += 1
                lost = _write_on_workers(dataset(todo), manifest, {s: expected[s] for s in todo}, shard_schema,
                                         stats, bar, max_writers=max(4, int(WRITERS_PER_CPU * stats["cpus"])))
                if lost and passes >= LOST_PASSES:
                    raise RuntimeError(f"shards {lost[:20]} lost their embedded rows with a node in {passes} "
                                       "passes; everything else is committed: rerun to resume")
                if lost:
                    log.warning("%d shard(s) lost their embedded rows with a node; embedding them again", len(lost))
                todo = lost
            if copies:  # identical texts: every leader is committed now
                from reembed.copies import run_copies

                if beat is not None:
                    beat.phase("copying")
                run_copies(manifest, source, shard_schema, lambda shard, rec: _commit(manifest, shard, rec, stats, bar),
                           max_tasks=max(4, int(WRITERS_PER_CPU * stats["cpus"])))
    finally:
        bar.close()
    secs = time.monotonic() - t0
    first_block = stats.pop("first_block_at", None)  # actors started and loaded the model before it
    if first_block:
        phases.take("actor start", first_block - t0)
    phases.take("embed", secs - (first_block - t0 if first_block else 0.0))
    log.info(
        "embed: %d rows, %s, %.1f s, %.1f rows/s (%d shards, %.1f device-seconds)",
        stats["rows"], human_bytes(stats["bytes"]), secs, stats["rows"] / secs if secs else 0.0,
        stats["shards_committed"], stats["device_seconds"],
    )
    stats["rows_embedded"] = stats["rows"] - stats["rows_reused"] - stats["rows_deduplicated"]
    if stats["rows_reused"] or stats["rows_deduplicated"]:
        log.info("embed: %d rows embedded by the model, %d reused from %s, %d copied from identical texts",
                 stats["rows_embedded"], stats["rows_reused"], (plan.get("reuse") or {}).get("uri", "-"),
                 stats["rows_deduplicated"])
    stats["embed_seconds"] = round(secs, 3)
    stats["device_seconds"] = round(stats["device_seconds"], 3)
    return stats


def _write_on_workers(ds, manifest: Manifest, expected: dict[int, int], shard_schema: pa.Schema,
                      stats: dict[str, Any], bar, max_writers: int) -> list[int]:
    """Route the dataset's blocks to writer tasks, one per shard once its rows are all embedded, and
    commit each record the writers return. Returns the shards whose blocks were lost (a node died); any
    other error is raised after every writer already running has been committed or has failed."""
    import ray

    summarize_block = ray.remote(num_cpus=SUMMARY_CPUS, max_retries=3)(block_shards)
    write_task = ray.remote(num_cpus=WRITER_CPUS, max_retries=3)(write_shard_from_blocks)
    out, epoch = manifest.loc, manifest.epoch
    router = ShardRouter(expected)
    summaries: dict[Any, Any] = {}  # summary ref -> block ref
    ref_of = summaries.copy()
    writers: dict[Any, int] = {}  # writer ref -> shard
    ready: list[tuple[int, list[Any]]] = []  # complete shards waiting for a writer slot
    lost: set[int] = set()
    losses: list[BaseException] = []

    def launch() -> None:
        while ready and len(writers) < max_writers:
            shard, blocks = ready.pop(0)
            writers[write_task.remote(out, shard, epoch, shard_schema, *blocks)] = shard

    def settle(wait: bool) -> None:
        """Take in finished summaries and writers; with ``wait``, block until one finishes."""
        refs = [*summaries, *writers]
        if not refs:
            return
        done, _ = ray.wait(refs, num_returns=1) if wait else ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in done:
            if ref in summaries:
                del summaries[ref]
                try:
                    summary = ray.get(ref)
                except Exception as e:
                    if not _lost(e):
                        raise
                    # Its shards never complete here and are embedded again in the next pass.
                    log.warning("an embedded block was lost with a node before it was routed (%s)", type(e).__name__)
                    losses.append(e)
                    continue
                stats.setdefault("first_block_at", time.monotonic())
                ready.extend(router.add(ref_of[ref], summary))
                del ref_of[ref]
            else:
                shard = writers.pop(ref)
                try:
                    rec = ray.get(ref)
                except Exception as e:
                    if not _lost(e):
                        raise
                    log.warning("shard %05d: its writer or blocks were lost with a node (%s)", shard,
                                type(e).__name__)
                    losses.append(e)
                    lost.add(shard)
                    continue
                _commit(manifest, shard, rec, stats, bar)
        launch()

    try:
        for bundle in ds.iter_internal_ref_bundles():
            for entry, piece in zip(bundle.blocks, bundle.slices or [None] * len(bundle.blocks)):
                if piece is not None and (piece.start_offset, piece.end_offset) != (0, entry.metadata.num_rows):
                    raise RuntimeError("Ray Data handed out a slice of a block; the shard router needs whole blocks")
                ref = summarize_block.remote(entry.ref)
                summaries[ref] = ref_of[ref] = entry.ref
            settle(wait=False)
            while len(writers) >= max_writers and ready:
                settle(wait=True)  # backpressure: no more blocks until a writer slot frees up
        while summaries or writers or ready:
            settle(wait=True)
    except BaseException:
        # Commit what the writers already running still finish (starting no new ones), then let the
        # error through.
        ready.clear()
        max_writers = 0
        while writers:
            try:
                settle(wait=True)
            except Exception as e:  # the first error is the one to report
                log.debug("while draining writers after an error: %s", e)
        raise
    if router.incomplete and not losses:
        raise RuntimeError(f"the pipeline ended with incomplete shards {router.incomplete}; rerun to resume")
    return sorted(lost | set(router.incomplete))


def _commit(manifest: Manifest, shard: int, rec: dict[str, Any], stats: dict[str, Any], bar) -> None:
    try:
        manifest.commit_shard(shard, rec)
    except ConcurrentWriteError:
        # Fenced: no job ever commits a file named with this job's epoch, so what this writer published
        # is garbage now; remove it rather than leave it to the next claim.
        for field in ("path", "dead_letter_path"):
            if rec.get(field):
                manifest.loc.delete(rec[field])
        raise
    stats["shards_committed"] += 1
    stats["rows"] += rec["rows"]
    stats["tokens"] += rec["tokens"]
    stats["device_seconds"] += rec["device_seconds"]
    stats["bytes"] += rec["bytes"]
    stats["rows_reused"] += rec.get("reused", 0)
    stats["rows_deduplicated"] += rec.get("deduplicated", 0)
    bar.update(rec["rows"] + rec["dead_letters"])
    log.debug("committed shard %05d: %d rows, %d dead letters, %d bytes (written on %s)", shard, rec["rows"],
             rec["dead_letters"], rec["bytes"], rec.get("writer", {}).get("host_pid"))


def _copy_rows(manifest: Manifest, pending: list[int], copies: list[int]) -> tuple[int, int]:
    """``(rows the pending regular shards move out to copy shards, rows of the pending copy shards)``."""
    if "texts" not in manifest.plan:
        return 0, 0
    from reembed import texts

    plan_loc = manifest.loc.child(PLAN_DIR)
    moved = texts.moved_rows(plan_loc, pending)
    if not copies:
        return moved, 0
    state = manifest.state()  # the copy shards' rows: the plan's moved rows less those committed
    done = state.shards[state.shards >= int(manifest.plan["shards"])]
    return moved, int(manifest.plan["texts"]["moved"]) - int(state.rows_of(done).sum())


def _lost(e: BaseException) -> bool:
    """Whether a writer's failure means its blocks or its node were lost (so the shard can be embedded
    again), not an error of the write itself (those are raised)."""
    import ray

    kinds = (ray.exceptions.ObjectLostError, ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
             ray.exceptions.ActorDiedError)
    return isinstance(e, kinds) or isinstance(getattr(e, "cause", None), kinds)


def plan_pool(cfg: JobConfig, resources: dict[str, float]) -> dict[str, Any]:
    """Size the Embedder actor pool from the cluster's resources.

    GPU: one actor per ``gpus_per_actor`` GPUs, up to every GPU the cluster has now (an autoscaling
    cluster that starts at zero GPUs needs ``compute.max_actors``). CPU: actors hold all but one CPU of
    the cluster between them, so read tasks never starve.
    """
    c = cfg.compute
    gpus = resources.get("GPU", 0.0)
    cpus = resources.get("CPU", 1.0)
    device = cfg.model.device
    if device == "auto":
        device = "cuda" if gpus > 0 else "cpu"
    accelerator = next((k.split(":", 1)[1] for k in resources if k.startswith("accelerator_type:")), None)
    # Resolved here for the log, the run record and the tuning profile; each actor resolves it again (and
    # under auto falls back to torch, with a warning, where the ONNX export fails).
    backend = embed.resolve_backend(cfg.model.backend, device, embed.resolve_dtype(cfg.model.dtype, device),
                                    cfg.model.compile)
    if device == "cuda":
        num_gpus = c.gpus_per_actor
        num_cpus = c.cpus_per_actor if c.cpus_per_actor is not None else 1.0
        fit = int(gpus // num_gpus) if num_gpus else 1
        max_actors = c.max_actors or max(1, fit)
        threads = None
    else:
        num_gpus = 0
        num_cpus = c.cpus_per_actor if c.cpus_per_actor is not None else max(1.0, cpus - 1.0)
        max_actors = c.max_actors or max(1, int((cpus - 1) // num_cpus) or 1)
        # Logical CPUs keep a slot free for reads; torch may still use the core the reads mostly wait on.
        threads = min(os.cpu_count() or 1, int(num_cpus) + 1)
    return {
        "device": device, "num_gpus": num_gpus, "num_cpus": num_cpus,
        "min": min(c.min_actors, max_actors), "max": max_actors, "torch_threads": threads,
        "accelerator": accelerator, "backend": backend,
        "batch_tokens": cfg.model.batch_tokens or _tuned_budget(cfg, device, accelerator, backend),
    }


def _tuned_budget(cfg: JobConfig, device: str, accelerator: str | None, backend: str) -> int | None:
    """A token budget from a tuning profile (``reembed tune``), if one matches; None for the default."""
    try:
        from reembed import tune
    except ImportError:
        return None
    return tune.lookup_budget(cfg.model.name, device, accelerator, cfg.model.max_seq_length, backend,
                              embed.resolve_dtype(cfg.model.dtype, device))


def _model_args(cfg: JobConfig) -> dict[str, Any]:
    m = cfg.model
    return {"name": m.name, "revision": m.revision, "dtype": m.dtype, "max_seq_length": m.max_seq_length,
            "normalize": m.normalize, "backend": m.backend}


@contextlib.contextmanager
def _ray_data_console() -> Iterator[None]:
    """While the dataset runs, Ray Data's console shows warnings and errors only (its progress bars and
    INFO lines too at ``-v``, see :func:`cluster.ray_data_console`; ``-q`` follows reembed's level), and
    leaves out its report of a task that raised one of our errors: that report is a traceback, and the
    error reaches the user once, as one line, from whoever catches it. Ray Data's own log file
    (``ray-data.log`` in the session's logs) still gets every record."""
    handlers = [h for h in logging.getLogger("ray.data").handlers
                if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]
    gate = _RayDataConsoleFilter(max(logging.getLogger("reembed").getEffectiveLevel(), cluster.ray_data_console()))
    for h in handlers:
        h.addFilter(gate)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(gate)


class _RayDataConsoleFilter(logging.Filter):
    def __init__(self, level: int):
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.level or cluster.harmless_ray_data_record(record):
            return False
        # Ray Data also logs while it handles the exception, without attaching it ("Exception occurred in
        # Ray Data or Ray Core internal code ..."): the exception being handled tells those records apart.
        err = record.exc_info[1] if record.exc_info else sys.exc_info()[1]
        return err is None or surface(err) is err




def _wipe(out: storage.Location) -> None:
    from reembed.commits import LOG_DIR

    for part in (SHARDS, DEAD_LETTER, PLAN_DIR, LOG_DIR):
        out.delete_dir(part)
    out.delete("manifest.json")
