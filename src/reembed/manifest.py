"""The checkpoint manifest: ``OUTPUT/manifest.json``.

It holds the model's identity and fingerprint, the plan, and one record per committed shard. A shard is
done only when the manifest says so; everything else under ``shards/`` is recomputed on resume. Every
save rewrites the whole file atomically and bumps ``generation``; a save that finds the stored manifest
changed since this job read it (another job wrote meanwhile) is refused with :class:`ConcurrentWriteError`
and overwrites nothing. On S3 that check is the write itself: ``If-None-Match: *`` for the first save,
``If-Match: <ETag read or last written>`` for every later one. Elsewhere the generation is compared under
an advisory lock (local filesystems) or, on other object stores, just before the write.

Before a job writes shards it claims the output (:meth:`Manifest.claim`): one conditional save that fences
every job that read the manifest earlier (their next save fails), after which files under ``shards/`` and
``dead_letter/`` that no committed record names are leftovers and can be deleted safely.

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

from reembed import storage
from reembed.storage import Location
from reembed.errors import ConcurrentWriteError, ManifestError  # noqa: F401 (re-exported)

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def shard_name(shard: int) -> str:
    return f"part-{shard:05d}.parquet"


class Manifest:
    """An in-memory manifest bound to an output location."""

    def __init__(self, loc: Location, data: dict[str, Any], version: str | None = None):
        self.loc = loc
        self.data = data
        # Object stores with conditional writes: the ETag of the manifest this job last read or wrote.
        self._version = version

    # -- load / save ---------------------------------------------------------------------------------

    @classmethod
    def load(cls, loc: Location) -> "Manifest | None":
        version = None
        if loc.conditional_writes:
            got = loc.read_versioned(MANIFEST)
            if got is None:
                return None
            raw, version = got
        elif not loc.exists(MANIFEST):
            return None
        else:
            raw = loc.read_bytes(MANIFEST)
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ManifestError(f"{loc.display(MANIFEST)}: not valid JSON ({e}); restore it or start a fresh output") from e
        if data.get("format") != FORMAT:
            raise ManifestError(f"{loc.display(MANIFEST)}: unknown manifest format {data.get('format')!r}")
        return cls(loc, data, version)

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
        if self.loc.conditional_writes:
            self._save_conditional()
            return
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

    def _save_conditional(self) -> None:
        mine = self.data["generation"]
        self.data["generation"] = mine + 1
        self.data["updated_at"] = now()
        body = json.dumps(self.data, indent=1, sort_keys=False).encode()
        try:
            self._version = self.loc.write_if(body, MANIFEST, version=self._version)
        except storage.VersionConflict as e:
            self.data["generation"] = mine
            what = "created by another job" if self._version is None else "changed by another job since this job read it"
            raise ConcurrentWriteError(
                f"{self.loc.display(MANIFEST)}: {what} (this job had generation {mine}); two jobs must not write "
                "the same output at once, and this one stops without overwriting anything"
            ) from e
        except BaseException:
            self.data["generation"] = mine
            raise

    def reload(self) -> None:
        fresh = Manifest.load(self.loc)
        if fresh is None:
            raise ManifestError(f"{self.loc.display(MANIFEST)}: disappeared")
        self.data = fresh.data
        self._version = fresh._version

    def check_current(self) -> None:
        """Raise :class:`ConcurrentWriteError` unless the stored manifest is still the one this job last
        read or wrote (no other job has taken the output over since)."""
        if self.loc.conditional_writes:
            stored, mine = self.loc.version(MANIFEST), self._version
        else:
            stored, mine = self._stored_generation(), self.data["generation"]
        if stored != mine:
            raise ConcurrentWriteError(
                f"{self.loc.display(MANIFEST)}: another job has taken over this output; two jobs must not "
                "write the same output at once"
            )

    def claim(self, *folders: str) -> int:
        """Take over the output before writing to it, and remove what crashed or fenced jobs left behind.

        Lists the files under ``folders`` that no committed record names, then saves the manifest
        conditionally: from that moment every other job that read the manifest earlier fails at its next
        save. Only then are the listed leftovers deleted, so no object that any job could still commit
        is ever removed (a record naming one would have to be saved after this claim, which fails).
        Returns how many files were removed.
        """
        keep = self._committed_paths()
        leftovers = [i.path for folder in folders for i in self.loc.list(folder, recursive=True)
                     if self._relative(i.path) not in keep]
        self.save()
        for path in leftovers:
            self.loc.delete_path(path)
        return len(leftovers)

    def discard_uncommitted(self, shard: int, *folders: str) -> int:
        """Delete the files of ``shard`` under ``folders`` that are not committed, after checking that this
        job still holds the output: a job fenced by :meth:`claim` may write one shard late, and its object
        must make way for this job's. Returns how many files were removed."""
        self.check_current()
        keep = self._committed_paths()
        name = shard_name(shard)
        removed = 0
        for folder in folders:
            for info in self.loc.list(folder, recursive=True):
                rel = self._relative(info.path)
                if rel not in keep and (rel == f"{folder}/{name}" or rel.startswith(f"{folder}/_tmp/{name}.")):
                    self.loc.delete_path(info.path)
                    removed += 1
        return removed

    def _committed_paths(self) -> set[str]:
        paths = set()
        for rec in self.data["shards"].values():
            paths.add(rec["path"])
            if rec.get("dead_letter_path"):
                paths.add(rec["dead_letter_path"])
        return paths

    def _relative(self, path: str) -> str:
        root = self.loc.root.rstrip("/") + "/"
        return path[len(root):] if path.startswith(root) else path

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
    """An advisory lock around read-compare-write on local filesystems (S3 uses conditional writes
    instead; other object stores only get the generation check)."""
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
