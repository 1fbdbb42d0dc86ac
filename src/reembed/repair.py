"""``reembed repair``: find the committed shards whose files are missing or damaged, and re-embed exactly those.

    reembed repair OUTPUT [--config job.yaml] [--check-only] [--workers N]

1. **Check.** Every committed shard's file (and its dead-letter file) is read and hashed in Ray tasks, a
   batch of shards each and at most ``workers`` at once; a task carries its shards' numbers and commit seqs
   (:class:`~reembed.manifest.ShardRefs`) and reads their records from the commit log itself, and the
   driver gets back only the damaged shards: it parses no record and holds O(tasks), not O(shards).
   Damaged: the file is missing, its sha256 is not the one committed, it cannot be read, or the record names
   a path outside the output (never followed: :meth:`Location.contain`).
2. **Retract.** Each damaged shard gets one create-only ``retract`` entry in the commit log naming the
   commit found damaged (:meth:`reembed.commits.CommitLog.retract`): from then on it is not committed, the
   ledger's totals leave it out, and ``reembed status`` says "damaged".
3. **Re-embed.** Unless ``check_only``, the normal resume (:func:`reembed.pipeline.run`) re-embeds exactly
   the shards that are not committed: its claim removes the damaged files as leftovers and the job writes
   them again under its new epoch. The job's settings come from ``--config`` or, without one, from the
   manifest (input, plan and model settings; the resume's fingerprint check refuses a mismatch).

The finished FAISS build's files are hashed whole too, one Ray task per file (:func:`check_index_files`: an
open of the index compares only a fingerprint); damaged ones are named in the summary (``faiss_damaged``) and rebuilt by
``reembed index``.

:func:`check_shard_files` is the one definition of a damaged shard; ``reembed validate`` uses it too, and
:func:`map_shards` (Ray tasks over batches of committed shards, results streamed) is how both fan out.
"""

from __future__ import annotations

import logging
import math
import re
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

from reembed import cluster
from reembed.errors import ChecksumError, ManifestError, StorageError
from reembed.manifest import Manifest, ShardRefs, commits_of, read_recorded
from reembed.storage import Location

log = logging.getLogger(__name__)

REASONS = ("missing", "sha256", "unreadable", "outside")
TASK_CPUS = 1.0  # a check task reads, hashes (and for validate parses and searches) one shard at a time
SHARDS_PER_TASK_MAX = 64
TASKS_PER_WORKER = 4  # batches per worker, so a slow node does not hold the tail of the job
LISTED = 100  # damaged shards named in a summary (all of them are retracted)


def repair(output: str | Location, cfg: Any = None, *, check_only: bool = False, workers: int | None = None,
           ray_address: str | None = None, embedder: Any = None) -> dict[str, Any]:
    """Check every committed shard of ``output``, retract the damaged ones and (unless ``check_only``)
    re-embed them with the normal resume. ``cfg``: the job's :class:`~reembed.config.JobConfig` (its
    ``output.uri`` is set to ``output``); None rebuilds it from the manifest. ``workers``: check tasks at
    once (None: every CPU Ray has; 0: in this process, without Ray). ``embedder`` goes to
    :func:`reembed.pipeline.run`. Returns the summary (``checked``, ``damaged``, ``retracted``, ``run``)."""
    t0 = time.monotonic()
    settings = cfg.storage if cfg is not None else None
    loc = output if isinstance(output, Location) else Location.from_uri(output, settings)
    manifest = Manifest.load(loc)
    if manifest is None:
        raise ManifestError(f"{loc.display('manifest.json')}: no manifest here; repair a reembed output")
    if manifest.commit_log is None:
        raise ManifestError(f"{loc.display('manifest.json')}: this output has no commit log (an older reembed "
                            "wrote it); nothing can be retracted: re-run it with --fresh")
    state = manifest.state()
    before = dict(state.damaged)  # found by an earlier check and not repaired yet
    checked = 0
    damaged: list[dict[str, Any]] = []
    # The tasks carry shard numbers and commit seqs and read the records themselves: none is parsed here.
    for result in map_shards(check_batch, loc, manifest.refs(legacy=False), total=len(state), workers=workers,
                             ray_address=ray_address):
        checked += result["checked"]
        for d in result["damaged"]:
            # One O(1) create-only entry each, as the results stream in.
            manifest.retract_shard(d["shard"], d["seq"], d["reason"], d["message"])
            log.warning("shard %05d: %s; retracted", d["shard"], d["message"])
            damaged.append(d)
    damaged.sort(key=lambda d: d["shard"])
    summary: dict[str, Any] = {
        "output": loc.uri, "checked": checked, "retracted": len(damaged),
        "damaged": [{k: d[k] for k in ("shard", "reason", "message")} for d in damaged[:LISTED]],
        "earlier_damaged": sorted(before)[:LISTED], "run": None,
        "faiss_damaged": check_index_files(loc, manifest, workers, ray_address),
    }
    log.info("repair: %d committed shards checked, %d damaged%s, %.1f s", checked, len(damaged),
             f" ({len(before)} found damaged earlier)" if before else "", time.monotonic() - t0)
    if not check_only and (damaged or manifest.pending()):
        from reembed import pipeline
        from reembed.config import replace_path

        job = cfg if cfg is not None else config_from_manifest(manifest)
        job = replace_path(job, ["output", "uri"], loc.uri, source="repair OUTPUT")
        summary["run"] = pipeline.run(job, embedder=embedder)
    after = Manifest.load(loc)
    summary["still_damaged"] = sorted(after.state().damaged)[:LISTED]
    summary["complete"] = after.is_complete()
    summary["seconds"] = round(time.monotonic() - t0, 3)
    return summary


def check_index_files(loc: Location, manifest: Manifest, workers: int | None = 0,
                      ray_address: str | None = None) -> list[str]:
    """The files of the output's finished FAISS build whose whole sha256 differs from the manifest (an open
    compares only their fingerprint: :func:`reembed.indexes.faiss.check_file`); `reembed index` rebuilds them.
    Each file is hashed by its own Ray task (at 1B vectors ~36 GB read once per repair, the index, its ids and
    its inverted lists at once, on the nodes), and only its verdict comes back; ``workers=0`` hashes them here."""
    from reembed.indexes.build import state_of
    from reembed.indexes.faiss import damaged_file, file_keys

    rec = state_of(manifest).get("faiss")
    if not rec or rec.get("status") != "done":
        return []
    if workers == 0:
        found = [damaged_file(loc, rec, key, True) for key in file_keys(rec)]
    else:
        import ray

        from reembed.cluster import init_ray

        init_ray(ray_address)
        task = ray.remote(num_cpus=TASK_CPUS, max_retries=3, retry_exceptions=[OSError])(damaged_file)
        found = cluster.get([task.remote(loc, rec, key, True) for key in file_keys(rec)])
    bad = [b for b in found if b is not None]
    if bad:
        log.warning("FAISS v%s: %s damaged (sha256 differs from the manifest); `reembed index %s` builds it again",
                    rec.get("version"), ", ".join(bad), loc.uri)
    return bad


def check_batch(loc: Location, batch: ShardRefs | Sequence[tuple[int, int, dict[str, Any]]]) -> dict[str, Any]:
    """A Ray task: the files of a batch of committed shards (:class:`ShardRefs`, whose records it reads from
    the commit log, or ``(shard, commit seq, record)``) against their sha256; returns how many were checked and
    the damaged ones (a few hundred bytes each)."""
    damaged = []
    for shard, seq, rec in commits_of(loc, batch, checked=False):  # a path outside is damage "outside"
        _, damage = check_shard_files(loc, shard, rec)
        if damage is not None:
            damaged.append({**damage, "seq": seq})
    return {"checked": len(batch), "damaged": damaged}


def check_shard_files(loc: Location, shard: int, rec: dict[str, Any], hostile: str = "damage"
                      ) -> tuple[bytes | None, dict[str, Any] | None]:
    """The bytes of committed ``shard`` once its file and its dead-letter file match their records, else
    ``(None, damage)`` with ``damage = {"shard", "path", "reason", "message"}`` (``reason`` one of
    :data:`REASONS`; ``message`` one line naming the file). A record path outside the output is never
    followed: it is damage ``outside``, or with ``hostile="raise"`` the :class:`ManifestError` itself."""
    key = f"shards.{shard:05d}"
    data = None
    for path_field, sha_field in (("path", "sha256"), ("dead_letter_path", "dead_letter_sha256")):
        if path_field != "path" and not rec.get(path_field):
            continue
        try:
            got = read_recorded(loc, rec, key, path_field, sha_field)
        except ChecksumError as e:
            return None, _damage(shard, rec, path_field, "sha256", str(e))
        except StorageError as e:
            reason = "missing" if isinstance(e.__cause__, FileNotFoundError) else "unreadable"
            return None, _damage(shard, rec, path_field, reason, str(e))
        except OSError as e:
            return None, _damage(shard, rec, path_field, "unreadable", f"{loc.display(str(rec.get(path_field)))}: "
                                 f"unreadable ({' '.join(str(e).split())[:200]})")
        except ManifestError as e:
            if hostile == "raise":
                raise
            return None, _damage(shard, rec, path_field, "outside", str(e))
        if path_field == "path":
            data = got
    return data, None


def map_shards(fn: Callable[..., Any], loc: Location, items: Iterable[Any], *args: Any, total: int,
               workers: int | None = None, ray_address: str | None = None,
               options: dict[str, Any] | None = None) -> Iterator[Any]:
    """``fn(loc, batch, *args)`` over batches of ``items`` (``total`` of them), yielded as they finish, in
    any order. As Ray tasks of :data:`TASK_CPUS` each, at most ``workers`` at once (None: every CPU the
    cluster has); ``args`` are put in Ray's object store once, not shipped with every task. ``workers=0``
    runs them in this process. ``items`` are read lazily: the driver holds at most ``workers`` batches.
    ``options``: more Ray task options (a scheduling strategy, a runtime_env)."""
    if workers is not None and workers < 0:
        raise ValueError(f"workers must be >= 0, got {workers}")
    if workers == 0:
        per_task = max(1, min(SHARDS_PER_TASK_MAX, total))
        for batch in _batches(items, per_task):
            yield fn(loc, batch, *args)
        return
    import ray

    from reembed.cluster import init_ray

    init_ray(ray_address)
    slots = workers or max(1, int(ray.cluster_resources().get("CPU", 1)))
    per_task = max(1, min(SHARDS_PER_TASK_MAX, math.ceil(total / (TASKS_PER_WORKER * slots))))
    remote = ray.remote(num_cpus=TASK_CPUS, max_retries=3, retry_exceptions=[OSError])(fn)
    if options:
        remote = remote.options(**options)
    shared = [ray.put(a) for a in args]
    in_flight: list[Any] = []
    batches = _batches(items, per_task)
    try:
        while True:
            while len(in_flight) < slots:
                batch = next(batches, None)
                if batch is None:
                    break
                in_flight.append(remote.remote(loc, batch, *shared))
            if not in_flight:
                return
            done, in_flight = ray.wait(in_flight, num_returns=1)
            yield cluster.get(done[0])
    finally:
        for ref in in_flight:  # an error (or an abandoned generator): stop what is still running
            ray.cancel(ref)


def config_from_manifest(manifest: Manifest) -> Any:
    """The job's settings as the manifest recorded them: input (URI, columns, passthrough, pattern, format),
    plan (shard rows, dedup) and model (name, hub revision, dtype or the int8 backend, max_seq_length).
    Settings it does not record (compute, storage, device) are the defaults; pass ``--config`` for others."""
    from reembed.config import InputConfig, JobConfig, ModelConfig, OutputConfig, PlanConfig
    from reembed.embed.model import INT8_SPACE

    plan, model = manifest.plan, manifest.model
    where = manifest.loc.display("manifest.json")
    if "input_uri" not in plan:
        raise ManifestError(f"{where}: the plan does not record its input; pass the job's --config")
    inp = InputConfig(uri=plan["input_uri"], id_column=plan.get("id_column", "id"),
                      text_column=plan.get("text_column", "text"), passthrough=tuple(plan.get("passthrough", [])),
                      pattern=plan.get("pattern", "*"), format=plan.get("format", "auto"))
    dtype = model.get("dtype")
    revision = model.get("revision")
    m = ModelConfig(name=model["name"], max_seq_length=model.get("max_seq_length"),
                    revision=revision if isinstance(revision, str) and _HUB_COMMIT.fullmatch(revision) else None,
                    dtype=dtype if dtype in ("float32", "float16", "bfloat16") else "auto",
                    backend="onnx-int8" if dtype == INT8_SPACE else "auto")
    from reembed.schema import vector_dtype

    return JobConfig(input=inp, output=OutputConfig(uri=manifest.loc.uri, dtype=vector_dtype(plan)), model=m,
                     plan=PlanConfig(shard_rows=int(plan.get("shard_rows", PlanConfig.shard_rows)),
                                     dedup=plan.get("dedup", "hash")))


# ---------------------------------------------------------------------------------------------------


_HUB_COMMIT = re.compile(r"[0-9a-f]{40}")


def _damage(shard: int, rec: dict[str, Any], path_field: str, reason: str, message: str) -> dict[str, Any]:
    return {"shard": int(shard), "path": str(rec.get(path_field)), "reason": reason,
            "message": " ".join(message.split())}


def _batches(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    if isinstance(items, ShardRefs):  # shares of shard numbers and seqs: each task reads its records
        yield from items.chunks(size)
        return
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch
