"""``reembed run --dry-run``: what a run would do and about what it would take, before any GPU time is
spent, writing nothing to the output.

It plans the input exactly as the run does (files, rows, duplicate ids, shards; the counting and dedup
run as Ray tasks, and the plan's Parquet goes to a temporary folder on this machine that is removed
afterwards), or, on an output a run already planned, reads the plan and the commit log there (nothing
is claimed or cleaned). It loads the model on this machine's CPU once, as the run does, and estimates
the embedding time and its cost:

* from a tuned profile (``reembed tune``) for this model, device type, backend and sequence length,
  when one matches: its measured docs/s per device times the devices the run would hold;
* otherwise from a short measured sample: a few batches of the input's first texts embedded on this
  machine with the backend the run would use (on CPU the first use of a model exports it to ONNX once).
  A sample measured on this machine's CPU says nothing about a GPU cluster: then there is no estimate,
  and the result says to run ``reembed tune`` on a GPU node.

The cost is :func:`reembed.cost.price_run` of the estimated run, at the default price table.

It shows the stored vectors' dtype (``output.dtype``) and bytes per vector. With ``plan.dedup_texts`` (true or auto)
it counts the corpus's identical texts as the run does, by the run's planning Ray tasks (a pass over every text's
hash, into the temporary folder): distinct texts, rows copied instead of embedded, copy shards, the embedding
seconds and USD that saves at the estimate's rate, and with auto the decision (:func:`reembed.texts.decide`).

With ``--reuse OUT1`` it checks OUT1 with the run's own check (:func:`reembed.reuse.open_earlier`: the same refusals) and reports its committed
rows from its commit log; the exact count of rows that would be carried forward needs every input text's hash,
so it is computed only with ``--count-reuse``, by the run's own planning Ray tasks (into the temporary folder),
and the result says which.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from typing import Any

log = logging.getLogger(__name__)

SAMPLE_ROWS = 64  # texts embedded for a measured estimate
SAMPLE_REPEATS = 2  # timed passes over the sample, after one warm-up pass
FILES_LISTED = 20  # input files listed by name (the rest are counted)
COMPARED = ("a row whose id is in the --reuse output with the same text hash (blake2b-128) carries that vector "
            "forward; the hashes are compared by Ray tasks (key tasks over the input's and the earlier output's "
            "shards, one join task per id partition), never in this process")
TEXTS_COUNTED = "exact: the run's planning Ray tasks (text hashes, one task per partition), run now"
NOT_COUNTED = ("not counted: it needs a pass over every input text (its hash), which the run does in its planning "
               "Ray tasks; add --count-reuse to run those tasks now")


def dry_run(cfg, phases=None, count_reuse: bool = False) -> dict[str, Any]:
    """The dry run of job ``cfg`` (a :class:`reembed.config.JobConfig`): the plan's summary, the model, the
    stored vectors' dtype and size, what ``--reuse`` would carry forward, and an estimate of time and cost.
    Nothing is written under ``cfg.output.uri``.

    With ``plan.reuse`` the earlier output is checked as the run checks it (the same refusals); how many rows
    it would give is exact only after a pass over the input's texts (their hashes), which ``count_reuse``
    runs as the run's own planning Ray tasks; otherwise the result says it was not counted."""
    from reembed import pipeline, storage
    from reembed import schema as S
    from reembed.config import validate
    from reembed.embed.model import check_available
    from reembed.manifest import Manifest
    from reembed.phases import Phases

    validate(cfg)
    phases = phases or Phases()
    with phases.phase("model check"):
        check_available(cfg.model.name, cfg.model.revision)
    out = storage.Location.from_uri(cfg.output.uri, cfg.storage)
    pipeline.check_output_folder(out)
    existing = None if cfg.output.fresh else Manifest.load(out)
    with phases.phase("model check", f"checking the model {cfg.model.name} (loading it once on this machine's CPU)"):
        model_info = pipeline.inspect_model(cfg)
    earlier = None
    if existing is None and cfg.plan.reuse:  # as the run: refused before anything is planned
        from reembed import reuse

        with phases.phase("reuse check", f"checking the --reuse output {cfg.plan.reuse}"):
            earlier = storage.Location.from_uri(cfg.plan.reuse, cfg.storage)
            earlier = (earlier, reuse.open_earlier(earlier, model_info, out))
    pipeline.start_ray(cfg, phases)
    if existing is not None:
        with phases.phase("resume check", "reading the plan and the commit log of the existing output"):
            pipeline.check_resume(existing, cfg, model_info)
            plan, files, pending_rows = _existing(existing)
        reused = _planned_reuse(plan)
        identical = texts_summary(plan, cfg.plan.dedup_texts, "exact: from this output's plan")
    else:
        with phases.phase("plan", "planning (dry run): listing the input, counting rows, finding duplicate ids"
                          + (" and identical texts" if cfg.plan.dedup_texts else "")):
            plan, files = _plan(cfg, earlier if count_reuse else None)
        reused = _reuse_summary(plan, *earlier) if earlier else None
        identical = texts_summary(plan, cfg.plan.dedup_texts, TEXTS_COUNTED)
        pending_rows = plan["rows"] - ((reused or {}).get("reusable") or 0)
    dtype = S.vector_dtype(existing.plan) if existing is not None else cfg.output.dtype

    import ray

    resources = ray.cluster_resources()
    pool = {**pipeline.plan_pool(cfg, resources), "cluster_cpus": int(resources.get("CPU", 0))}
    with phases.phase("estimate", "estimating the embedding time"):
        estimate = _estimate(cfg, pool, plan, pending_rows, files)
    if identical is not None:
        identical.update(texts_saved(identical["rows_deduplicated"], estimate))
    result = {
        "dry_run": True,
        "output": out.uri,
        "output_exists": existing is not None,
        "input": plan.get("input_uri", cfg.input.uri),
        "files": plan["files"],
        "files_listed": files,
        "bytes": plan.get("bytes"),
        "bad_files": plan.get("bad_files", []),
        "rows": plan["rows"],
        "duplicate_ids": plan.get("duplicate_rows", 0),
        "shards": plan["shards"],
        "shard_rows": plan["shard_rows"],
        "pending_rows": pending_rows,
        "model": model_info,
        "vector_dtype": dtype,
        "bytes_per_vector": S.VECTOR_DTYPES[dtype].byte_width * int(model_info["dimension"]),
        "reuse": reused,
        "texts": identical,
        "pool": {k: pool[k] for k in ("device", "backend", "min", "max", "num_gpus", "num_cpus", "accelerator",
                                      "batch_tokens")},
        "estimate": estimate,
    }
    result["phases"] = phases.as_list()
    return result


def _plan(cfg, earlier=None) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Plan the input into a temporary folder on this machine (removed afterwards): the plan's summary and
    the first input files. ``earlier``: ``(Location, Manifest)`` of the ``--reuse`` output, whose reuse is
    then planned too, by the run's own Ray tasks (its exact counts land in ``plan["reuse"]``)."""
    from reembed import pipeline, plan_store, storage
    from reembed.plan import PLAN_DIR, make_plan

    folder = tempfile.mkdtemp(prefix="reembed-dry-run-")
    try:
        root = storage.Location.from_uri(folder)
        work = root.child(PLAN_DIR)
        source = storage.Location.from_uri(cfg.input.uri, cfg.storage)
        plan = make_plan(cfg.input, cfg.plan.shard_rows, work, cfg.on_bad_file, source=source, dedup=cfg.plan.dedup,
                         use_ray=True)
        if earlier is not None:
            pipeline.plan_reuse(plan, root, earlier[0], earlier[1], source)
        if cfg.plan.dedup_texts:  # as the run: the planning Ray tasks count the identical texts
            pipeline.plan_texts(plan, root, source,
                                auto=pipeline.texts_cluster(cfg) if cfg.plan.dedup_texts == "auto" else None)
        return plan, _first_files(work, plan_store.FILES)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _reuse_summary(plan: dict[str, Any], earlier, old) -> dict[str, Any]:
    """What ``--reuse`` would carry forward, for a new output: OUT1's committed rows from its commit log (no
    pass over anything), and the exact counts when :func:`_plan` planned the reuse (``--count-reuse``)."""
    totals = old.totals()
    found = {"uri": earlier.uri, "fingerprint": old.model["fingerprint"], "fingerprint_matches": True,
             "old_rows": int(totals["embedded"]), "old_shards_committed": len(old.committed),
             "old_shards": old.shard_count, "old_complete": old.is_complete(), "compared": COMPARED}
    counted = plan.get("reuse")
    if counted:
        found.update(counted="exact: the run's planning Ray tasks, run now (--count-reuse)",
                     **{k: counted[k] for k in ("reusable", "changed", "gone")})
    else:
        found.update(counted=NOT_COUNTED, reusable=None, changed=None, gone=None)
    return found


def texts_summary(plan: dict[str, Any], mode: Any, counted: str) -> dict[str, Any] | None:
    """What ``plan.dedup_texts`` would save, from the plan's counts (``plan["texts"]``, and with ``auto`` the
    decision in ``plan["dedup_texts"]``): distinct texts, rows copied instead of embedded, copy shards. None when
    the texts were not counted (``plan.dedup_texts: false``)."""
    t, decision = plan.get("texts"), plan.get("dedup_texts")
    counts = t or (decision or {}).get("counts")
    if not counts:
        return None
    copying = bool(t)
    rows, followers, in_shard = int(counts["rows"]), int(counts["followers"]), int(counts["in_shard"])
    found = {"mode": mode, "counted": counted, "rows": rows,
             "distinct_texts": rows - followers, "repeated_rows": followers,
             # without the copy pass a shard's own repeats are still copied (one block), the others embedded
             "rows_deduplicated": followers if copying else in_shard,
             "copy_pass": copying, "copy_shards": int(counts["copies"]) if copying else 0,
             "moved_rows": int(counts["moved"]) if copying else 0}
    if decision:
        found["decision"] = {k: decision[k] for k in ("dedup", "rows_saved", "saved_s", "copy_pass_s",
                                                      "embed_s_per_row", "device", "devices", "cpus", "copy_tasks")}
    return found


def texts_saved(rows: int, estimate: dict[str, Any]) -> dict[str, Any]:
    """The embedding seconds and USD that ``rows`` copied rows save at the estimate's rate (None without one):
    the estimate itself counts every pending row as embedded, so these come off it."""
    rate = estimate.get("docs_per_s")
    if not rate:
        return {"saved_seconds": None, "saved_usd": None}
    seconds = rows / rate
    # the estimate's cost is proportional to its rows (its seconds are rounded: 0.0 for a small input)
    usd = estimate["cost_usd"] * rows / estimate["rows"] if estimate.get("cost_usd") and estimate.get("rows") else None
    return {"saved_seconds": round(seconds, 3), "saved_usd": None if usd is None else round(usd, 8)}


def _planned_reuse(plan: dict[str, Any]) -> dict[str, Any] | None:
    """What an existing output's plan carries forward: planned already, so its counts are exact."""
    r = plan.get("reuse")
    if not r:
        return None
    return {"uri": r["uri"], "fingerprint": r["fingerprint"], "fingerprint_matches": True, "old_rows": r["old_rows"],
            "old_complete": r["old_complete"], "compared": COMPARED, "counted": "exact: from this output's plan",
            "reusable": r["reusable"], "changed": r["changed"], "gone": r["gone"]}



def _existing(manifest) -> tuple[dict[str, Any], list[dict[str, Any]], int]:
    """An output a run already planned: its plan's summary, its first input files and the rows still to do."""
    from reembed.pipeline import summarize
    from reembed.plan import PLAN_DIR
    from reembed.plan_store import FILES

    s = summarize(manifest)
    pending = max(0, s["input_rows"] - s["embedded"] - s["dead_lettered"])
    return manifest.plan, _first_files(manifest.loc.child(PLAN_DIR), FILES), pending


def _first_files(plan_loc, name: str) -> list[dict[str, Any]]:
    """The first :data:`FILES_LISTED` rows of the plan's file table (one row group, never the whole table)."""
    import pyarrow.parquet as pq

    with plan_loc.fs.open_input_file(plan_loc.path(name)) as f:
        pf = pq.ParquetFile(f)
        if pf.metadata.num_row_groups == 0:
            return []
        table = pf.read_row_group(0, columns=["path", "uri", "format", "size", "rows", "dup_rows"]).slice(0, FILES_LISTED)
    return table.to_pylist()


def _estimate(cfg, pool: dict[str, Any], plan: dict[str, Any], rows: int, files: list[dict[str, Any]]) -> dict[str, Any]:
    """Seconds and USD for ``rows`` documents on the run's pool, from a tuned profile or a measured sample."""
    from reembed import cost

    devices = pool["max"]
    profile = _profile(cfg, pool)
    est: dict[str, Any] = {"rows": rows, "device": pool["device"], "devices": devices}
    if profile is not None:
        per_device = float((profile.get("chosen") or {}).get("docs_per_s") or 0.0)
        est.update(basis="profile", profile=profile["path"], docs_per_s_per_device=per_device,
                   docs_per_s=per_device * devices)
    else:
        measured = _measure(cfg, pool, plan, files)
        est.update(measured)
        if measured.get("docs_per_s_here") and measured["device_here"] == pool["device"]:
            if pool["device"] == "cuda":
                est["docs_per_s"] = measured["docs_per_s_here"] * devices
            else:  # the sample used every core of this machine; the pool uses every CPU of the cluster
                est["docs_per_s"] = measured["docs_per_s_here"] * max(1.0, pool["cluster_cpus"] / (os.cpu_count() or 1))
        elif measured["device_here"] != pool["device"]:
            est["note"] = (f"the run would embed on {pool['device']}, this machine measured on {measured['device_here']}: "
                           f"run `reembed tune --model {cfg.model.name}` on a {pool['device']} node for an estimate")
    rate = est.get("docs_per_s")
    if not rate:
        return est
    seconds = rows / rate
    est["seconds"] = round(seconds, 1)
    est["excludes"] = "Ray start, actor start and model load (about a minute), planning"
    prices = cost.load_prices()
    run = {"device": pool["device"], "accelerator": pool["accelerator"], "device_count": devices,
           "cpus": pool["cluster_cpus"], "wall_seconds": seconds, "rows": rows}
    try:
        priced = cost.price_run(run, prices, "dry run", cfg.model.name)
    except cost.PriceError as e:
        est["cost_note"] = str(e)
    else:
        est.update(cost_usd=round(priced["cost_usd"], 8), usd_per_device_hour=priced["usd_per_device_hour"],
                   priced_as=f"{priced['count']} x {priced['device']}", prices_as_of=prices.get("as_of"))
    return est


def _profile(cfg, pool: dict[str, Any]) -> dict[str, Any] | None:
    """The tuning profile the run would pick up (the one :func:`reembed.tune.lookup_budget` finds), or None."""
    from reembed import tune
    from reembed.embed import resolve_dtype

    key = tune.accelerator_key(pool["device"], pool["accelerator"], pool["backend"],
                               cfg.model.dtype if cfg.model.dtype != "auto" else resolve_dtype("auto", pool["device"]))
    if key is None:
        return None
    folder = tune.tune_dir()
    if cfg.model.max_seq_length is not None:
        candidates = [tune.profile_path(cfg.model.name, key, cfg.model.max_seq_length, folder)]
    else:
        candidates = sorted(folder.glob(f"{tune._model_slug(cfg.model.name)}--{key}--L*.json"))
    for path in candidates:
        try:
            profile = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if profile.get("device") != pool["device"]:
            continue
        if cfg.model.max_seq_length is None and profile.get("max_seq_length") != profile.get("model_max_seq_length"):
            continue
        return {**profile, "path": str(path)}
    return None


def _measure(cfg, pool: dict[str, Any], plan: dict[str, Any], files: list[dict[str, Any]]) -> dict[str, Any]:
    """docs/s of a few batches of the input's first texts embedded on this machine, with the run's backend."""
    from reembed.embed import Embedder, resolve_device
    from reembed.pipeline import _model_args

    device = resolve_device("auto") if pool["device"] == "cuda" else "cpu"
    texts = _sample_texts(cfg, plan, files)
    if not texts:
        return {"basis": "none", "device_here": device, "note": "no texts found to measure"}
    model = {**_model_args(cfg), "device": device}
    if device != pool["device"]:
        model["backend"] = "auto"
    log.info("measuring %d documents on this machine's %s (backend %s)", len(texts), device, model["backend"])
    embedder = Embedder(model, batch_tokens=pool["batch_tokens"] if device == pool["device"] else None,
                        max_batch_rows=cfg.model.max_batch_rows)
    try:
        prep = embedder.prepare(texts)
        embedder.run(prep)  # warm-up: the first pass pays for kernels, caches, the ONNX session
        t0 = time.perf_counter()
        for _ in range(SAMPLE_REPEATS):
            embedder.run(prep)
        elapsed = time.perf_counter() - t0
    finally:
        embedder.close()
    return {"basis": "sample", "sample_rows": len(texts), "batches": len(prep.batches) * SAMPLE_REPEATS,
            "device_here": device, "backend_here": embedder.backend,
            "docs_per_s_here": round(SAMPLE_REPEATS * len(texts) / elapsed, 1) if elapsed > 0 else None}


def _sample_texts(cfg, plan: dict[str, Any], files: list[dict[str, Any]]) -> list[str]:
    """Up to :data:`SAMPLE_ROWS` non-empty texts from the start of the first input files (a Parquet file's
    first batch; a JSON Lines file's first MiB)."""
    import zlib

    import pyarrow.parquet as pq

    from reembed.plan import input_location

    column = cfg.input.text_column
    source = input_location(plan, cfg.storage)
    texts: list[str] = []
    for f in files:
        if len(texts) >= SAMPLE_ROWS:
            break
        if f["format"] == "bad":
            continue
        if f["format"] == "parquet":
            with source.fs.open_input_file(source.path(f["path"])) as fh:
                pf = pq.ParquetFile(fh)
                if column not in pf.schema_arrow.names:
                    continue
                batch = next(pf.iter_batches(columns=[column], batch_size=SAMPLE_ROWS), None)
                values = batch.column(0).to_pylist() if batch is not None else []
        else:
            with source.fs.open_input_stream(source.path(f["path"])) as fh:
                head = fh.read(1 << 20)
            if f["path"].endswith(".gz"):  # the start of a gzip stream decompresses on its own
                head = zlib.decompressobj(16 + zlib.MAX_WBITS).decompress(head, 4 << 20)
            values = []
            for line in head.splitlines():  # a line cut at the end does not parse, and is skipped
                try:
                    obj = json.loads(line)
                except ValueError:
                    continue
                values.append(obj.get(column) if isinstance(obj, dict) else None)
        texts += [t for t in values if isinstance(t, str) and t.strip()]
    return texts[:SAMPLE_ROWS]
