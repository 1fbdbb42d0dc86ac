"""The checkpoint manifest: ``OUTPUT/manifest.json``.

It holds the model's identity and fingerprint, the plan, and one record per committed shard. A shard is
done only when the manifest says so; everything else under ``shards/`` is recomputed on resume. Every
save rewrites the whole file atomically and bumps ``generation``; a save whose generation no longer
matches the stored one (another job wrote meanwhile) is refused with :class:`ConcurrentWriteError`.

Layout::

    {
      "format": 1, "generation": 7, "created_at": ..., "updated_at": ...,
      "model": {"name", "revision", "dimension", "normalize", "pooling", "dtype", "max_seq_length", "fingerprint"},
      "fingerprint": "...",
      "plan": {... see plan.make_plan ...},
      "duplicates": {"path": "plan/duplicates.parquet", "rows": N, "sha256": ...},
      "shards": {"00042": {"rows", "dead_letters", "reasons", "truncated", "bytes", "sha256", "path",
                           "dead_letter_path", "dead_letter_bytes", "dead_letter_sha256", "tokens",
                           "device_seconds", "committed_at"}},
      "runs": [{"started_at", "finished_at", "wall_seconds", "device", "device_count", ...}],
      "stages": {"index": {...}}   # later stages record their own progress here
    }
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
from typing import Any, Iterator

from reembed.storage import Location

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


class ManifestError(RuntimeError):
    """The output's manifest refuses this job (fingerprint mismatch, corrupt file, ...)."""


class ConcurrentWriteError(ManifestError):
    """Another job changed the manifest since this one read it."""


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


class Manifest:
    """An in-memory manifest bound to an output location."""

    def __init__(self, loc: Location, data: dict[str, Any]):
        self.loc = loc
        self.data = data

    # -- load / save ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, loc: Location) -> "Manifest | None":
        if not loc.exists(MANIFEST):
            return None
        raw = loc.read_bytes(MANIFEST)
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ManifestError(f"{loc.display(MANIFEST)}: not valid JSON ({e}); restore it or start a fresh output") from e
        if data.get("format") != FORMAT:
            raise ManifestError(f"{loc.display(MANIFEST)}: unknown manifest format {data.get('format')!r}")
        return cls(loc, data)

    @classmethod
    def create(cls, loc: Location, model: dict[str, Any], plan: dict[str, Any], duplicates: dict[str, Any]) -> "Manifest":
        data = {
            "format": FORMAT,
            "generation": 0,
            "created_at": now(),
            "updated_at": now(),
            "model": model,
            "fingerprint": model["fingerprint"],
            "plan": plan,
            "duplicates": duplicates,
            "shards": {},
            "runs": [],
            "stages": {},
        }
        m = cls(loc, data)
        m.save()
        return m

    def save(self) -> None:
        """Write the manifest atomically, refusing if someone else saved since we read it."""
        with _lock(self.loc):
            stored = self._stored_generation()
            mine = self.data["generation"]
            if stored is not None and stored != mine:
                raise ConcurrentWriteError(
                    f"{self.loc.display(MANIFEST)}: changed by another job (generation {stored}, expected {mine}); "
                    "two jobs must not write the same output at once"
                )
            self.data["generation"] = mine + 1
            self.data["updated_at"] = now()
            try:
                self.loc.write_bytes(json.dumps(self.data, indent=1, sort_keys=False).encode(), MANIFEST)
            except BaseException:
                self.data["generation"] = mine
                raise

    def reload(self) -> None:
        fresh = Manifest.load(self.loc)
        if fresh is None:
            raise ManifestError(f"{self.loc.display(MANIFEST)}: disappeared")
        self.data = fresh.data

    def _stored_generation(self) -> int | None:
        if not self.loc.exists(MANIFEST):
            return None
        try:
            return json.loads(self.loc.read_bytes(MANIFEST)).get("generation")
        except ValueError:
            return None

    # -- queries -------------------------------------------------------------------------------------

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def plan(self) -> dict[str, Any]:
        return self.data["plan"]

    @property
    def committed(self) -> dict[int, dict[str, Any]]:
        return {int(k): v for k, v in self.data["shards"].items()}

    def pending(self) -> list[int]:
        done = self.committed
        return [s["shard"] for s in self.plan["shards"] if s["shard"] not in done]

    def is_complete(self) -> bool:
        return not self.pending()

    def totals(self) -> dict[str, Any]:
        """Rows embedded and dead-lettered (per reason) over the committed shards."""
        reasons: dict[str, int] = {}
        rows = dead = truncated = tokens = size = 0
        device_s = 0.0
        for rec in self.committed.values():
            rows += rec["rows"]
            dead += rec["dead_letters"]
            truncated += rec.get("truncated", 0)
            tokens += rec.get("tokens", 0)
            size += rec.get("bytes", 0)
            device_s += rec.get("device_seconds", 0.0)
            for k, v in rec.get("reasons", {}).items():
                reasons[k] = reasons.get(k, 0) + v
        return {"embedded": rows, "dead_lettered": dead, "reasons": reasons, "truncated": truncated,
                "tokens": tokens, "bytes": size, "device_seconds": device_s}

    def shard_paths(self) -> Iterator[tuple[int, str]]:
        """(shard, path relative to the output) for every committed shard, in shard order."""
        for shard, rec in sorted(self.committed.items()):
            yield shard, rec["path"]

    # -- updates -------------------------------------------------------------------------------------

    def commit_shard(self, shard: int, record: dict[str, Any]) -> None:
        record = {**record, "committed_at": now()}
        self.data["shards"][f"{shard:05d}"] = record
        try:
            self.save()
        except BaseException:
            self.data["shards"].pop(f"{shard:05d}", None)
            raise

    def record_run(self, run: dict[str, Any]) -> None:
        self.data["runs"].append(run)
        self.save()

    def set_stage(self, name: str, state: dict[str, Any]) -> None:
        self.data.setdefault("stages", {})[name] = state
        self.save()


@contextlib.contextmanager
def _lock(loc: Location) -> Iterator[None]:
    """An advisory lock around read-compare-write on local filesystems (object stores use conditional
    writes instead)."""
    if loc.is_object_store or loc.fs.type_name != "local":
        yield
        return
    import fcntl

    os.makedirs(loc.root, exist_ok=True)
    with open(os.path.join(loc.root, ".manifest.lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
