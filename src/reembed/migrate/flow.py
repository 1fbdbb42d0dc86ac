"""The whole migration as one resumable job: export -> run -> index -> validate -> adopt -> swap.

    reembed migrate --from "qdrant:///srv/app/qdrant?collection=documents" --model NEW --old-model OLD \\
        --workdir /data/migration [--queries labelled.jsonl --label-id-field metadata.doc_id] [--swap|--no-swap]

Under ``--workdir``: ``export/`` (the app's store as reembed input, with its payloads and point ids),
``output/`` (the new embeddings, a normal reembed output) and ``migrate.json``, the one small record of
the stages (``{"stages": {"export": {"status": "done", "result": {...}}, ...}}``). Each stage is the same
library call as its own command (``reembed export``, ``run``, ``index``, ``validate``, ``adopt``,
``swap``), and each is resumable on its own, so rerunning the command continues where it stopped and ends
in the same state as an uninterrupted run. It stops before touching the app's collection when the
validation gate fails.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass
from typing import Any, Callable

from reembed.config import ConfigError, IndexConfig, JobConfig
from reembed.errors import MigrationError
from reembed.migrate.adopt import kill_point
from reembed.storage import Location

log = logging.getLogger(__name__)

STAGES = ("export", "run", "index", "validate", "adopt", "swap")
STATE = "migrate.json"
EXPORT_DIR, OUTPUT_DIR = "export", "output"
# The export columns the job passes through: the text (validate cuts its text queries from it, `reembed
# search` shows it) and the app's payload and point id (the new collection is written with them).
CARRIED = ("text", "_payload", "_point_id")


@dataclass(frozen=True)
class MigrateSettings:
    """The ``migrate:`` section of migrate.yaml, or the flags of ``reembed migrate``."""

    source: str = ""  # the app's store, qdrant://PATH_OR_HOST?collection=NAME
    model: str = ""  # the new model
    workdir: str = ""
    old_model: str | None = None  # the app's current query model: the A/B's old side, recorded on adopt
    queries: str | None = None  # labelled queries (JSON Lines) for the A/B gate
    label_id_field: str | None = None  # the field the labels' ids are in (metadata.doc_id, point_id)
    swap: bool = True
    sample: int = 200
    faiss: str = "auto"  # the FAISS index validate measures ANN recall on ("none" skips it)
    # "keep": the new collection has the app's point ids; "derive": reembed's uuid5 of each document id
    # (the export's id column: a payload id_field=, or the point id), for an app that maps ids itself.
    point_ids: str = "keep"
    use_ray: bool = True


def migrate(settings: MigrateSettings, job: JobConfig | None = None,
            progress: Callable[[str, dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run (or continue) the migration; returns ``migrate.json``'s content. ``job`` carries the job's other
    settings (plan, compute, storage, model options); ``progress(stage, record)`` is called as each ends."""
    from reembed.migrate.stores.base import parse_uri

    job = job or JobConfig()
    _check(settings)
    src = parse_uri(settings.source)
    if src.kind != "qdrant" or not src.option("collection"):
        raise ConfigError(f"--from {src.shown}: reembed migrate takes the app's Qdrant collection, "
                          "qdrant://PATH_OR_HOST?collection=NAME (other stores: run `reembed export`, `run` and "
                          "`validate` step by step)")
    work = Location.from_uri(settings.workdir, job.storage)
    state = _open_state(work, settings, src.shown)
    flow = _Flow(settings, job, work, src, state, progress)
    for stage in STAGES:
        flow.step(stage)
    return state


# ---------------------------------------------------------------------------------------------------


class _Flow:
    def __init__(self, settings: MigrateSettings, job: JobConfig, work: Location, src, state: dict[str, Any],
                 progress):
        from reembed.migrate.stores.qdrant import target_of_uri

        self.s, self.job, self.work, self.src, self.state = settings, job, work, src, state
        self.progress = progress or (lambda stage, rec: None)
        self.name = src.option("collection")
        self.target = target_of_uri(src)
        self.export_loc = work.child(EXPORT_DIR)
        self.output_loc = work.child(OUTPUT_DIR)

    def step(self, stage: str) -> None:
        rec = self.state["stages"].get(stage) or {}
        if rec.get("status") in ("done", "skipped") and self._still_done(stage, rec):
            log.info("migrate %s: done earlier, skipped", stage)
            return
        t0 = time.monotonic()
        result = getattr(self, f"_{stage}")()
        kill_point(stage)  # TEST HOOK: a crash after the work, before it is recorded
        status = "skipped" if result.get("skipped") else "done"
        rec = {"status": status, "seconds": round(time.monotonic() - t0, 3), "result": result}
        self.state["stages"][stage] = rec
        _save_state(self.work, self.state)
        self.progress(stage, rec)

    def _still_done(self, stage: str, rec: dict[str, Any]) -> bool:
        if stage == "swap" and rec.get("status") == "skipped":
            return not self.s.swap  # --no-swap earlier, --swap now
        if stage == "validate":  # a report made on the output as it is now, still passing
            from reembed.validation import check_validation

            return check_validation(self.output_loc)[0]
        return True

    # -- the stages ------------------------------------------------------------------------------

    def _export(self) -> dict[str, Any]:
        from reembed.migrate.export import export

        summary = export(self.s.source, self.export_loc, overwrite=True)
        keep = ("rows", "dimension", "metric", "layout", "text_missing", "columns")
        return {"to": self.export_loc.uri, **{k: summary.get(k) for k in keep}}

    def _run(self) -> dict[str, Any]:
        import reembed

        columns = (self.state["stages"]["export"]["result"].get("columns") or [])
        carried = tuple(c for c in CARRIED if c in columns and not (c == "_point_id" and self.s.point_ids == "derive"))
        cfg = dataclasses.replace(
            self.job,
            input=dataclasses.replace(self.job.input, uri=self.export_loc.uri, id_column="id", text_column="text",
                                      passthrough=tuple(dict.fromkeys([*self.job.input.passthrough, *carried]))),
            output=dataclasses.replace(self.job.output, uri=self.output_loc.uri),
            model=dataclasses.replace(self.job.model, name=self.s.model),
            index=dataclasses.replace(self.job.index, enabled=False))
        summary = reembed.run(cfg)
        keep = ("rows", "embedded", "dead_lettered", "shards", "seconds")
        return {"output": self.output_loc.uri, "passthrough": list(cfg.input.passthrough),
                **{k: summary[k] for k in keep if k in summary}}

    def _index(self) -> dict[str, Any]:
        from reembed.indexes.build import build_indexes

        cfg = dataclasses.replace(self.job.index, qdrant=self.target, collection=self.name, faiss=self.s.faiss)
        results = build_indexes(self.output_loc, cfg, ray_address=self.job.compute.ray_address, use_ray=self.s.use_ray)
        q = results["qdrant"]
        return {"collection": q["collection"], "points": q.get("count"), "target": q.get("target"),
                "faiss": (results.get("faiss") or {}).get("path")}

    def _validate(self) -> dict[str, Any]:
        from reembed import validation as V
        from reembed.validation.queries import load_queries, relabel

        workers, address = (None if self.s.use_ray else 0), self.job.compute.ray_address  # --no-ray: in this process
        labelled = load_queries(self.s.queries) if self.s.queries else []
        if labelled and self.s.label_id_field:
            labelled = relabel(labelled, self.output_loc, self.s.label_id_field, workers=workers, ray_address=address)
        report = V.validate(self.output_loc, queries=labelled, old=self.export_loc.uri, old_model=self.s.old_model,
                            settings=V.Settings(sample=self.s.sample), workers=workers, ray_address=address)
        gates = {n: {"status": g["status"], "message": g.get("message", "")} for n, g in report["gates"].items()}
        if not report["passed"]:
            failed = "; ".join(f"{n}: {g['message']}" for n, g in gates.items() if g["status"] == V.FAIL)
            self.state["stages"]["validate"] = {"status": "failed", "result": {"gates": gates}}
            _save_state(self.work, self.state)
            raise MigrationError(f"validation gate FAILED ({failed}); the app's collection is untouched. Report: "
                                 f"{self.output_loc.display(V.REPORT_HTML)}; fix the cause and rerun `reembed "
                                 "migrate` (it continues from validate)")
        return {"passed": True, "gates": gates, "report": self.output_loc.display(V.REPORT_JSON)}

    def _adopt(self) -> dict[str, Any]:
        from reembed.migrate.adopt import adopt

        return adopt(self.s.source, model=self.s.old_model)

    def _swap(self) -> dict[str, Any]:
        to = self.state["stages"]["index"]["result"]["collection"]
        if not self.s.swap:
            return {"skipped": True, "alias": self.name, "to": to,
                    "command": f"reembed swap --qdrant {self.src.shown!r} --alias {self.name} --to {to} "
                               f"--output {self.output_loc.uri}"}
        from reembed.indexes.swap import swap

        return swap(self.name, to, qdrant=self.target, output=self.output_loc)


def _check(s: MigrateSettings) -> None:
    for key, flag in (("source", "--from"), ("model", "--model"), ("workdir", "--workdir")):
        if not getattr(s, key):
            raise ConfigError(f"{flag} is required (or migrate.{key} in --config)")
    if s.point_ids not in ("keep", "derive"):
        raise ConfigError(f"migrate.point_ids must be keep or derive, got {s.point_ids!r}")
    if s.sample < 1:
        raise ConfigError(f"migrate.sample must be >= 1, got {s.sample}")


def _open_state(work: Location, s: MigrateSettings, shown: str) -> dict[str, Any]:
    """The stages so far; a workdir of another migration (other store or model) is refused."""
    if not work.exists(STATE):
        return {"format": 1, "from": shown, "model": s.model, "stages": {}}
    try:
        state = json.loads(work.read_bytes(STATE))
        same = state["from"] == shown and state["model"] == s.model and isinstance(state["stages"], dict)
    except (ValueError, KeyError, TypeError) as e:
        raise MigrationError(f"{work.display(STATE)}: unreadable ({type(e).__name__}); use another --workdir") from e
    if not same:
        raise MigrationError(f"{work.display(STATE)}: this workdir holds the migration of {state['from']} to "
                             f"{state['model']}; use another --workdir for {shown} to {s.model}")
    return state


def _save_state(work: Location, state: dict[str, Any]) -> None:
    work.write_bytes(json.dumps(state, indent=1, default=str).encode(), STATE)


def settings_from(data: dict[str, Any], source: str) -> MigrateSettings:
    """A ``migrate:`` section, refusing unknown keys and wrong types (naming the key and the file)."""
    names = {f.name: f for f in dataclasses.fields(MigrateSettings)}
    alias = {"from": "source"}
    out: dict[str, Any] = {}
    for key, value in (data or {}).items():
        name = alias.get(key, key)
        if name not in names:
            raise ConfigError(f"{source}: unknown key migrate.{key} (known: from, "
                              f"{', '.join(n for n in names if n != 'source')})")
        want = bool if name in ("swap", "use_ray") else int if name == "sample" else str
        if value is not None and not (isinstance(value, want) and not (want is int and isinstance(value, bool))):
            raise ConfigError(f"{source}: migrate.{key} must be {want.__name__}, got {value!r}")
        out[name] = value
    return MigrateSettings(**out)


def load_migrate_config(path: str | None, overrides: list[str] | tuple[str, ...] = ()) -> tuple[MigrateSettings, JobConfig]:
    """migrate.yaml: a job config (sections input, model, plan, compute, storage, index; see README) plus a
    ``migrate:`` section (:class:`MigrateSettings`'s keys; ``from`` for ``source``)."""
    from pathlib import Path

    import yaml

    from reembed.config import _load_yaml, apply_override, build

    data: dict[str, Any] = {}
    source = "defaults"
    if path:
        source = str(path)
        try:
            loaded = _load_yaml(Path(path).read_text(), source)
        except OSError as e:
            raise ConfigError(f"{path}: cannot read config file ({e.strerror})") from e
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: not valid YAML: {e}") from e
        if loaded is not None and not isinstance(loaded, dict):
            raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(loaded).__name__}")
        data = dict(loaded or {})
    section = data.pop("migrate", None) or {}
    if not isinstance(section, dict):
        raise ConfigError(f"{source}: migrate must be a mapping of keys, got {type(section).__name__}")
    job = build(JobConfig, data, source=source, prefix="")
    for item in overrides:
        job = apply_override(job, item)
    return settings_from(section, source), job
