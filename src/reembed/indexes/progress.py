"""Per-shard progress of an index build in O(1) per shard: one small create-only record per shard done.

::

    OUTPUT/_index/qdrant/<build>/0000000042.json     {"shard": 42, "rows": 10000, "seconds": 1.9, ...}

A build marks a shard only once the shard is stored in the index (for Qdrant: its last upsert waited), so
a record is a promise that holds after any crash. Marking writes one record of ~150 bytes whatever the
number of shards (the manifest's ``stages.index`` is written only at the start and the end of a build); a
resume lists the folder once (N/1,000 requests on S3) and learns the shards done from the names alone.

Records are published like commit-log entries: create-only on S3 (``If-None-Match: *``), a complete
temporary file renamed into place elsewhere, so no reader sees half a record. Marking a shard twice (a
retried task) is harmless: the first record stands on S3, an equal one replaces it on a local disk.

Any backend can use it: ``Progress(loc, "qdrant", build).mark(shard, rows=n)``, ``.done() -> set``.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
import re

from reembed.errors import ManifestError, ObjectExistsError
from reembed.storage import Location
from reembed.cluster import worker_name

log = logging.getLogger(__name__)

ROOT = "_index"
_NAME = re.compile(r"(\d{10})\.json")
_KEY = re.compile(r"[A-Za-z0-9_.\-]+")


class Progress:
    """The shards done so far by one build of one backend (``build``: a plain name unique to the build,
    so that another build's records are never taken for this one's)."""

    def __init__(self, loc: Location, backend: str, build: str | int):
        build = str(build)
        for what, value in (("backend", backend), ("build", build)):
            if not _KEY.fullmatch(value) or value in (".", ".."):
                raise ValueError(f"progress {what} must be a plain name (letters, digits, _ . -), got {value!r}")
        self.loc = loc
        self.backend = backend
        self.build = build
        self.folder = f"{ROOT}/{backend}/{build}"

    def mark(self, shard: int, **small) -> int:
        """Record ``shard`` as done, with a few small JSON values (rows, seconds); returns the bytes written."""
        if isinstance(shard, bool) or not isinstance(shard, int) or not 0 <= shard < 10**10:
            raise ValueError(f"shard {shard!r} is not a shard number")
        body = json.dumps({"shard": shard, **small, "at": _now(), "worker": worker_name()},
                          separators=(",", ":")).encode()
        try:
            self.loc.publish(body, self.folder, _name(shard), exclusive=True)
        except ObjectExistsError:  # an earlier attempt of this shard marked it: it stays done
            return 0
        return len(body)

    def done(self) -> set[int]:
        """The shards marked so far: one listing of the folder, no record read."""
        found = set()
        for info in self.loc.list(self.folder):
            m = _NAME.fullmatch(info.base_name)
            if m:
                found.add(int(m.group(1)))
        return found

    def record(self, shard: int) -> dict | None:
        """What was marked for ``shard`` (None if it is not done)."""
        try:
            raw = self.loc.read_bytes(self.folder, _name(shard))
        except FileNotFoundError:
            return None
        try:
            return json.loads(raw)
        except ValueError as e:
            raise ManifestError(f"{self.loc.display(self.folder, _name(shard))}: not a progress record ({e}); "
                                "delete it and rerun `reembed index` (the shard is loaded again)") from e

    def clear(self) -> int:
        """Forget every record of this build (its index was lost); returns how many there were."""
        n = len(self.loc.list(self.folder, recursive=True))
        self.loc.delete_dir(self.folder)
        return n


def _name(shard: int) -> str:
    return f"{shard:010d}.json"


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
