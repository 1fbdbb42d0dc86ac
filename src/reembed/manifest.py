"""The checkpoint manifest: ``OUTPUT/manifest.json`` plus the commit log ``OUTPUT/_log/``.

``manifest.json`` holds the model's identity and fingerprint, the plan, the duplicates file and the
progress of later stages; it is written when the output is created, when a job claims it, and when a
stage records progress, never per shard. Every shard commit and every run record is one small
create-only entry of the commit log (:mod:`reembed.commits`): a commit costs O(1) at any number of
shards, and the log's compacted checkpoint parts are what a resume or ``status`` reads back. A shard is
done only when the log says so; everything else under ``shards/`` is recomputed on resume.

manifest.json saves still bump ``generation`` and are refused with :class:`ConcurrentWriteError` when the
stored file changed since this job read it (on S3: ``If-None-Match: *`` / ``If-Match: <ETag>``; local
filesystems: the generation compared under an advisory lock).

Before a job writes shards it claims the output (:meth:`Manifest.claim`): a ``claim`` entry with a new
epoch (every job holding an older epoch fails at its next commit, and none of its commits landing after
the claim counts), then a manifest.json save. Only after the claim is the committed state read and the
files under ``shards/`` and ``dead_letter/`` that no committed record names deleted as leftovers. Shard
files carry the writing job's epoch in their name (``part-00042.e0003.parquet``), so a fenced job's late
write can never replace a committed file.

Every path in a manifest or a commit record is relative to the output and must stay inside it:
:meth:`Manifest.load` refuses a manifest that names ``../x``, ``/etc/passwd`` or another bucket's URI, the
committed records are checked the same way when they are read back, and :func:`read_recorded` (the one
way a file is read on a manifest's word) checks the path again and the bytes against their sha256. This
holds for the ``path`` / ``*_path`` entries a later stage records under ``stages`` too: a stage that must
remember a file outside the output records it under another name (a URI the user gave, say ``target``).

Layout of manifest.json::

    {
      "format": 1, "generation": 7, "created_at": ..., "updated_at": ...,
      "model": {"name", "revision", "dimension", "normalize", "pooling", "dtype", "max_seq_length", "fingerprint"},
      "fingerprint": "...",
      "plan": {... a summary, see plan.make_plan; "store" names the plan's Parquet files under plan/
               with their sha256: files, segments parts, duplicates parts ...},
      "duplicates": {"rows": N, "mode": "hash" | "none"},
      "shards": {},   # records of outputs written before the commit log (read, never written)
      "runs": [],     # idem; runs are log entries now (Manifest.data["runs"] lists both)
      "stages": {"index": {...}}   # later stages record their own progress here
    }

A shard record (a commit entry's ``record``): ``rows``, ``dead_letters``, ``reasons``, ``truncated``,
``bytes``, ``sha256``, ``path``, ``dead_letter_path``, ``dead_letter_bytes``, ``dead_letter_sha256``,
``tokens``, ``device_seconds``, ``epoch``, ``writer`` (node id and host:pid of the task that wrote it),
``committed_at``, ``reused`` (rows carried forward from a ``--reuse`` output) and ``deduplicated`` (rows whose
vector was copied from an identical text of the same block).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import logging
import os
import posixpath
import re
from collections.abc import ItemsView, Iterable, Mapping, ValuesView
from dataclasses import dataclass
from typing import Any, Iterator

from reembed import storage
from reembed.commits import CommitLog, State, read_state
from reembed.errors import ChecksumError, ConcurrentWriteError, ManifestError, StorageError  # noqa: F401 (re-exported)
from reembed.storage import Location

log = logging.getLogger(__name__)

MANIFEST = "manifest.json"
FORMAT = 1


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def shard_name(shard: int, epoch: int | None = None) -> str:
    """``part-00042.parquet``, or with the writing job's epoch ``part-00042.e0003.parquet``."""
    return f"part-{shard:05d}.parquet" if epoch is None else f"part-{shard:05d}.e{epoch:04d}.parquet"


class Manifest:
    """An in-memory manifest bound to an output location."""

    def __init__(self, loc: Location, data: dict[str, Any], version: str | None = None,
                 clog: CommitLog | None = None):
        self.loc = loc
        self.data = data
        # Object stores with conditional writes: the ETag of the manifest this job last read or wrote.
        self._version = version
        self._log = clog  # this job's handle on the commit log (None until there is a log)
        self._legacy_runs = list(data.get("runs", []))  # runs recorded in manifest.json by older versions
        self._state: State | None = None  # the log's committed state as last read (dropped on commit)
        self._refresh_runs()

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
            raise ManifestError(f"{loc.display(MANIFEST)}: not valid JSON ({e}); restore it or start a fresh "
                                "output (--fresh)") from e
        check_layout(loc, data)
        clog = CommitLog.open(loc)
        if clog is not None:
            # Optimistic, as manifest.json saves are: this object may commit under the epoch current now,
            # until another job claims the output. A job that writes shards claims first (claim()).
            clog.epoch = clog.latest_epoch
        return cls(loc, data, version, clog)

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
        m._log = CommitLog.create(loc)
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
                self.loc.write_bytes(self._body(), MANIFEST)
            except OSError as e:
                self.data["generation"] = mine
                raise write_failed(e, self.loc.display(MANIFEST)) from e
            except BaseException:
                self.data["generation"] = mine
                raise

    def _save_conditional(self) -> None:
        mine = self.data["generation"]
        self.data["generation"] = mine + 1
        self.data["updated_at"] = now()
        body = self._body()
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

    def _body(self) -> bytes:
        # Runs live in the commit log; manifest.json keeps only those an older version recorded there.
        return json.dumps({**self.data, "runs": self._legacy_runs}, indent=1, sort_keys=False).encode()

    @property
    def epoch(self) -> int | None:
        """The epoch this job holds on the commit log (None before there is a log)."""
        return self._log.epoch if self._log is not None else None

    @property
    def commit_log(self) -> CommitLog | None:
        return self._log

    def check_current(self) -> None:
        """Raise :class:`ConcurrentWriteError` unless no other job has taken the output over since this
        job last wrote: no newer claim in the commit log, and manifest.json as this job last read it."""
        if self._log is not None:
            self._log.check_current()
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

        Claims first: a ``claim`` entry with the next epoch in the commit log (from then on no commit of
        an older job counts), then a conditional manifest.json save (an older job's next save fails).
        Only then is the committed state read and every file under ``folders`` that no committed record
        names deleted: no object any job could still commit is ever removed. Returns how many files
        were removed.
        """
        if self._log is None:
            self._log = CommitLog.create(self.loc)  # an output whose log was never started
        else:
            self._log.claim()
        self.save()
        self._forget()
        keep = self._committed_paths()
        leftovers = [i.path for folder in folders for i in self.loc.list(folder, recursive=True)
                     if self._relative(i.path) not in keep]
        for path in leftovers:
            self.loc.delete_path(path)
        return len(leftovers) + self.clean_temp(*folders)

    def clean_temp(self, *folders: str) -> int:
        """Remove what killed saves left behind: ``manifest.json.tmp-*`` and the same temporary names of the
        other files the manifest names outside ``shards`` (``plan/duplicates.parquet.tmp-*``), and empty
        ``_tmp/`` folders under ``folders``. Only these names are touched, never another file. Returns how
        many were removed.

        Temporary files exist only where writes go through a rename (local and POSIX-like filesystems);
        the manifest's are removed under the lock every save takes, so no save in progress loses its file.
        """
        if self.loc.is_object_store:
            return 0
        removed = 0
        singles = [MANIFEST]
        dup = (self.data.get("duplicates") or {}).get("path")
        if dup:
            singles.append(dup)
        with _lock(self.loc):
            for rel in singles:
                folder, name = posixpath.split(rel)
                pattern = re.compile(re.escape(name) + r"\.tmp-[0-9a-f]{12}")
                for info in self.loc.list(folder) if folder else self.loc.list():
                    if pattern.fullmatch(posixpath.basename(info.path)):
                        self.loc.delete_path(info.path)
                        removed += 1
        committed = self.committed
        for folder in folders:
            # A writer killed mid-write (its node lost) leaves its temporary file; once its shard is
            # committed by another attempt, that file can never be moved into place, so it goes now.
            tmp_dir = posixpath.join(folder, "_tmp")
            for info in self.loc.list(tmp_dir):
                found = _TEMP_SHARD.fullmatch(posixpath.basename(info.path))
                if found and int(found.group(1)) in committed:
                    self.loc.delete_path(info.path)
                    removed += 1
            removed += _remove_empty_dir(self.loc, tmp_dir)
        if removed:
            log.debug("%s: removed %d temporary file(s) or folder(s)", self.loc.uri, removed)
        return removed

    def discard_uncommitted(self, shard: int, *folders: str) -> int:
        """Delete the files of ``shard`` under ``folders`` that are not committed, after checking that this
        job still holds the output. Returns how many files were removed."""
        self.check_current()
        keep = self._committed_paths()
        prefix = f"part-{shard:05d}."
        removed = 0
        for folder in folders:
            for info in self.loc.list(folder, recursive=True):
                rel = self._relative(info.path)
                name = posixpath.basename(rel)
                if rel not in keep and name.startswith(prefix):
                    self.loc.delete_path(info.path)
                    removed += 1
        return removed

    def _committed_paths(self) -> set[str]:
        paths = set()  # held while a claim compares the listing with it, not kept
        for rec in self.committed.values():
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
            stored = json.loads(self.loc.read_bytes(MANIFEST))
        except ValueError:
            return None
        return stored.get("generation") if isinstance(stored, dict) else None

    # -- queries -------------------------------------------------------------------------------------

    @property
    def model(self) -> dict[str, Any]:
        return self.data["model"]

    @property
    def plan(self) -> dict[str, Any]:
        return self.data["plan"]

    @property
    def committed(self) -> "Committed":
        """shard -> record of every committed shard: a read-only mapping whose ``in``, ``len`` and keys
        come from the log's arrays (~90 bytes per shard); a record is read from the log when it is asked
        for (``committed[s]``: one row group of one part) and its paths checked then; ``items()`` and
        ``values()`` stream every record part by part, in commit order. No record is kept."""
        return Committed(self)

    @property
    def shard_count(self) -> int:
        """How many shards the plan has (a manifest of an older reembed lists them: it is their number)."""
        shards = self.plan["shards"]
        copies = int((self.plan.get("texts") or {}).get("copies", 0))  # reembed.texts: numbered after the plan's
        return (len(shards) if isinstance(shards, list) else int(shards)) + copies

    def pending(self) -> list[int]:
        """The planned shards not committed, from the log's arrays (no commit record is read)."""
        import numpy as np

        n = self.shard_count
        done = np.zeros(n, dtype=bool)
        shards = self.state().shards
        done[shards[shards < n]] = True
        for k in self.data["shards"]:  # records of outputs written before the commit log
            if 0 <= int(k) < n:
                done[int(k)] = True
        return np.flatnonzero(~done).tolist()

    def committed_digest(self) -> str:
        """One sha256 of the committed shards that changes whenever one is added, replaced or retracted,
        computed from the log's arrays (:meth:`State.digest`), not from every record."""
        h = hashlib.sha256(self.state().digest().encode())
        for k, rec in sorted(self.data["shards"].items(), key=lambda kv: int(kv[0])):  # pre-log outputs only
            if int(k) not in self.state():
                h.update(f"{int(k)}:{rec['sha256']};".encode())
        return h.hexdigest()

    def is_complete(self) -> bool:
        return not self.pending()

    def totals(self) -> dict[str, Any]:
        """Rows embedded and dead-lettered (per reason) over the committed shards."""
        state = self.state()
        legacy = {int(k): v for k, v in self.data["shards"].items() if int(k) not in state}
        t = dict(state.totals, reasons=dict(state.totals["reasons"]))
        for rec in legacy.values():
            t["embedded"] += rec["rows"]
            t["dead_lettered"] += rec["dead_letters"]
            t["truncated"] += rec.get("truncated", 0)
            t["tokens"] += rec.get("tokens", 0)
            t["bytes"] += rec.get("bytes", 0)
            t["device_seconds"] += rec.get("device_seconds", 0.0)
            for k, v in rec.get("reasons", {}).items():
                t["reasons"][k] = t["reasons"].get(k, 0) + v
        return t

    def state(self) -> State:
        """The commit log's state, read once and kept until this job commits again."""
        if self._state is None:
            self._state = read_state(self.loc)
        return self._state

    def _checked(self, shard: int, rec: dict[str, Any]) -> dict[str, Any]:
        """``rec`` once its paths are known to stay inside the output."""
        return checked_record(self.loc, shard, rec)

    def refs(self, legacy: bool = True) -> "ShardRefs":
        """Every committed shard as tasks carry them (:class:`ShardRefs`: numbers, commit seqs and rows, in
        shard order), from the log's arrays: no record is read here. ``legacy``: include the records an
        older reembed kept in manifest.json."""
        import numpy as np

        state = self.state()
        shards = state.shards.astype(np.int64)
        seqs, rows = state.seqs_of(shards), state.rows_of(shards)
        old = tuple(sorted((int(k), rec) for k, rec in self.data["shards"].items() if int(k) not in state)) \
            if legacy else ()
        if old:
            shards = np.concatenate([shards, np.array([k for k, _ in old], np.int64)])
            seqs = np.concatenate([seqs, np.full(len(old), -1, np.int64)])
            rows = np.concatenate([rows, np.array([int(rec["rows"]) for _, rec in old], np.int64)])
            order = np.argsort(shards, kind="stable")
            shards, seqs, rows = shards[order], seqs[order], rows[order]
        return ShardRefs(shards, seqs, rows.astype(np.int64), old)

    def _iter_records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(shard, record) of every committed shard: the log's in commit order, then the legacy ones."""
        state = self.state()
        for shard, rec in state.iter_records():
            yield shard, self._checked(shard, rec)
        for k, rec in self.data["shards"].items():
            if int(k) not in state:
                yield int(k), rec

    def _forget(self) -> None:
        self._state = None

    def _refresh_runs(self) -> None:
        state = read_state(self.loc) if self._log is not None else None
        self._state = state
        self.data["runs"] = self._legacy_runs + (list(state.runs) if state is not None else [])

    # -- updates -------------------------------------------------------------------------------------

    def commit_shard(self, shard: int, record: dict[str, Any]) -> None:
        """Commit ``shard`` with ``record``: one create-only entry in the commit log, O(1) at any size.
        Refused with :class:`ConcurrentWriteError` (nothing written) once another job has claimed the
        output, and with :class:`ManifestError` for a record path outside the output."""
        for field in _PATH_FIELDS:
            if record.get(field) is not None:
                inside_output(self.loc, record[field], f"shards.{shard:05d}.{field}")
        try:
            if self._log is None:
                self._log = CommitLog.create(self.loc)
            self._log.commit(shard, {**record, "committed_at": now()})
        except OSError as e:
            raise write_failed(e, self.loc.display("_log")) from e
        finally:
            self._forget()

    def retract_shard(self, shard: int, commit_seq: int, reason: str, message: str) -> None:
        """Take ``shard`` out of the committed set: its commit at ``commit_seq`` was found damaged
        (``reembed repair``). One create-only entry in the commit log; a resume re-embeds the shard."""
        if self._log is None:
            raise ManifestError(f"{self.loc.display('_log')}: no commit log to record the retraction in")
        try:
            self._log.retract(shard, commit_seq, reason, message)
        finally:
            self._forget()

    def record_run(self, run: dict[str, Any]) -> None:
        if self._log is None:
            self._log = CommitLog.create(self.loc)
        self._log.record_run(run)
        self.data["runs"].append(run)

    def set_stage(self, name: str, state: dict[str, Any]) -> None:
        self.data.setdefault("stages", {})[name] = state
        self.save()


class Committed(Mapping):
    """The committed shards of a :class:`Manifest` (see :attr:`Manifest.committed`)."""

    def __init__(self, manifest: Manifest):
        self._m = manifest
        self._state = manifest.state()
        self._legacy = {int(k) for k in manifest.data["shards"]}

    def __contains__(self, shard: object) -> bool:
        return shard in self._state or shard in self._legacy

    def __len__(self) -> int:
        return len(self._state) + len(self._legacy.difference(self._state.shards.tolist())) if self._legacy \
            else len(self._state)

    def __iter__(self) -> Iterator[int]:
        shards = set(self._state.shards.tolist()) | self._legacy if self._legacy else self._state.shards.tolist()
        return iter(sorted(shards))

    def __getitem__(self, shard: int) -> dict[str, Any]:
        if shard in self._state:
            return self._m._checked(int(shard), self._state.record(shard))
        if shard in self._legacy:
            return next(rec for k, rec in self._m.data["shards"].items() if int(k) == shard)
        raise KeyError(shard)

    def items(self) -> "ItemsView":
        return _Streamed(self, lambda: self._m._iter_records())

    def values(self) -> "ValuesView":
        return _Streamed(self, lambda: (rec for _, rec in self._m._iter_records()))


@dataclass(frozen=True, eq=False)
class ShardRefs:
    """Committed shards as a Ray task carries them: their numbers (ascending), the seqs of their effective
    commits and their rows, three int64 arrays (24 bytes a shard) instead of a record each. The task reads
    the records itself (:meth:`records`, :meth:`commits`: from the commit log's row groups, paths checked),
    so the process that schedules the tasks holds O(tasks) and parses no record. Slicing
    (``refs[i:j]``, ``refs[i::n]``) and :meth:`chunks` give the tasks' shares. ``legacy``: ``(shard,
    record)`` of outputs an older reembed wrote (records kept in manifest.json, seq -1), carried whole."""

    shards: Any
    seqs: Any
    rows: Any
    legacy: tuple = ()

    def __len__(self) -> int:
        return len(self.shards)

    def __getitem__(self, which: slice) -> "ShardRefs":
        if not isinstance(which, slice):
            raise TypeError("ShardRefs are sliced (refs[i:j], refs[i::n]); records come from records(loc)")
        return self._take(which)

    @property
    def first(self) -> int:
        return int(self.shards[0])

    @property
    def last(self) -> int:
        return int(self.shards[-1])

    def chunks(self, size: int) -> list["ShardRefs"]:
        """Consecutive shares of at most ``size`` shards."""
        return [self[i:i + size] for i in range(0, len(self), max(1, int(size)))]

    def select(self, shards: Any) -> "ShardRefs":
        """The refs of those of ``shards`` that are here (any order), in shard order."""
        import numpy as np

        want = np.unique(np.asarray(shards, dtype=np.int64))
        at = np.searchsorted(self.shards, want)
        inside = at < len(self.shards)
        at = at[inside][self.shards[at[inside]] == want[inside]]
        return self._take(at)

    def _take(self, at: Any) -> "ShardRefs":
        shards = self.shards[at].copy()
        keep = set(shards.tolist()) if self.legacy else set()
        return ShardRefs(shards, self.seqs[at].copy(), self.rows[at].copy(),
                         tuple((k, rec) for k, rec in self.legacy if k in keep))

    def commits(self, loc: Location, batch: int = 1024, checked: bool = True) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """``(shard, commit seq, record)`` of each shard, in shard order, read from the commit log at
        ``loc`` ``batch`` records at a time; ``checked``: their paths checked to stay inside the output
        (``False`` for a caller that checks each path as it reads it and reports one outside as damage)."""
        from reembed.commits import read_records

        legacy = dict(self.legacy)
        for i in range(0, len(self), batch):
            shards, seqs = self.shards[i:i + batch].tolist(), self.seqs[i:i + batch].tolist()
            got = read_records(loc, [(s, q) for s, q in zip(shards, seqs) if q >= 0])
            for s, q in zip(shards, seqs):
                rec = got[s] if q >= 0 else legacy[s]
                yield s, q, checked_record(loc, s, rec) if checked else rec

    def records(self, loc: Location) -> Iterator[tuple[int, dict[str, Any]]]:
        """``(shard, record)`` of each shard, in shard order (see :meth:`commits`)."""
        for shard, _, rec in self.commits(loc):
            yield shard, rec


def commits_of(loc: Location, items: "ShardRefs | Iterable[tuple[int, int, dict[str, Any]]]", checked: bool = True
               ) -> Iterator[tuple[int, int, dict[str, Any]]]:
    """``(shard, seq, record)`` of a task's share: read from the log for :class:`ShardRefs` (``checked``: see
    :meth:`ShardRefs.commits`), else as given."""
    return items.commits(loc, checked=checked) if isinstance(items, ShardRefs) else iter(items)


def checked_record(loc: Location, shard: int, rec: dict[str, Any]) -> dict[str, Any]:
    """``rec``, the commit record of ``shard``, once its paths are known to stay inside the output."""
    for field in _PATH_FIELDS:
        if rec.get(field) is not None:
            inside_output(loc, rec[field], f"shards.{shard:05d}.{field}")
    return rec


class _Streamed(ItemsView, ValuesView):
    """``Committed.items()`` / ``values()``: the records streamed from the log part by part."""

    def __init__(self, mapping: Committed, stream):
        super().__init__(mapping)
        self._stream = stream

    def __iter__(self):
        return self._stream()

    def __contains__(self, item: object) -> bool:
        return any(item == x for x in self)


def inside_output(loc: Location, rel: Any, key: str) -> str:
    """``rel``, a path the manifest names at ``key``, normalised, once it is known to stay inside the output.

    Refused with a one-line :class:`ManifestError`: anything but a non-empty relative path, a URI (another
    bucket), an absolute path, a ``..`` step, and on a local disk a symlink that leads out of the output.
    """
    norm, why = loc.contain(rel)
    if norm is None:
        raise ManifestError(f"{loc.display(MANIFEST)}: {key} = {rel!r} {why.replace('outside', 'outside the output', 1)}; "
                            "the manifest was edited or corrupted: restore it or start a fresh output (--fresh)")
    return norm


def read_recorded(loc: Location, record: dict[str, Any], key: str, path_field: str = "path",
                  sha_field: str = "sha256", verify: bool = True) -> bytes:
    """The bytes of the file ``record[path_field]`` (``key`` names the record in messages), read only after
    the path is known to stay inside the output, and checked against ``record[sha_field]``: a mismatch
    raises :class:`ChecksumError`. ``verify=False`` skips only the checksum, never the path check."""
    rel = inside_output(loc, record.get(path_field), f"{key}.{path_field}")
    try:
        data = loc.read_bytes(rel)
    except FileNotFoundError as e:
        raise StorageError(f"{loc.display(rel)}: missing, although {loc.display(MANIFEST)} records it at "
                           f"{key}; restore the file, or start a fresh output (--fresh)") from e
    except OSError as e:
        raise storage.explain(e, loc.display(rel), "read") from e
    if verify:
        want = record.get(sha_field)
        got = hashlib.sha256(data).hexdigest()
        if got != want:
            raise ChecksumError(f"{loc.display(rel)}: sha256 {got[:16]}... does not match {key}.{sha_field} "
                                f"{str(want)[:16]}... in {loc.display(MANIFEST)} (corrupt or replaced); restore "
                                "it, or start a fresh output (--fresh)")
    return data


def check_layout(loc: Location, data: Any) -> None:
    """Refuse, in one line naming the key, a manifest that is not the layout above: not an object, a key
    missing or of the wrong type, or a path that leaves the output."""
    where = loc.display(MANIFEST)
    fix = "restore it from a backup, or start a fresh output (--fresh)"
    if not isinstance(data, dict):
        raise ManifestError(f"{where}: expected a JSON object, found {type(data).__name__}; {fix}")
    if data.get("format") != FORMAT:
        raise ManifestError(f"{where}: unknown manifest format {data.get('format')!r} (expected {FORMAT}); {fix}")
    for key, kind in _REQUIRED.items():
        if key not in data:
            raise ManifestError(f"{where}: key {key!r} is missing; {fix}")
        if not isinstance(data[key], kind) or (kind is int and isinstance(data[key], bool)):
            raise ManifestError(f"{where}: {key} is {type(data[key]).__name__}, expected {kind.__name__}; {fix}")
    shards = data["plan"].get("shards")
    if not (isinstance(shards, list) or (isinstance(shards, int) and not isinstance(shards, bool) and shards >= 0)):
        raise ManifestError(f"{where}: plan.shards is missing or not a shard count; {fix}")
    store = data["plan"].get("store")
    if store is not None:
        if not isinstance(store, dict) or not isinstance(store.get("files"), dict) or \
                not isinstance(store.get("segments"), list) or not isinstance(store.get("duplicates"), list):
            raise ManifestError(f"{where}: plan.store (the plan's files) is malformed; {fix}")
        for key, value in _paths_under(store, "plan.store"):
            inside_output(loc, value, key)
    for name, rec in data["shards"].items():
        if not name.isdigit() or not isinstance(rec, dict):
            raise ManifestError(f"{where}: shards.{name} is not a shard record; {fix}")
        for field in ("path", "rows"):
            if field not in rec:
                raise ManifestError(f"{where}: shards.{name}.{field} is missing; {fix}")
        for field in _PATH_FIELDS:
            if field in rec:
                inside_output(loc, rec[field], f"shards.{name}.{field}")
    if "path" in data["duplicates"]:
        inside_output(loc, data["duplicates"]["path"], "duplicates.path")
    for key, value in _paths_under(data.get("stages") or {}, "stages"):
        inside_output(loc, value, key)


_REQUIRED = {"generation": int, "model": dict, "fingerprint": str, "plan": dict, "duplicates": dict, "shards": dict,
             "runs": list}
_PATH_FIELDS = ("path", "dead_letter_path")


def write_failed(e: OSError, where: str) -> StorageError:
    """A one-line :class:`StorageError` for an OS error met while writing ``where``, with what to do; a
    job that stops on it resumes from its last committed shard."""
    code = e.errno
    if code is None:  # pyarrow's own OSError carries the errno only in its text: "[errno 28] ..."
        m = re.search(r"\[errno (\d+)\]", str(e), re.IGNORECASE)
        code = int(m.group(1)) if m else None
    resume = "then rerun the same command to resume"
    if code in (errno.ENOSPC, errno.EDQUOT):
        cause = f"no space left on the device (or over quota); free some space or use another --output, {resume}"
    elif code == errno.EROFS:
        cause = f"the filesystem is read-only; use a writable --output, {resume}"
    elif code in (errno.EACCES, errno.EPERM):
        cause = f"permission denied; make the output writable, {resume}"
    elif code in (errno.ENOTDIR, errno.EEXIST):
        cause = "a file stands where a folder is needed; --output must be a folder (or a URI prefix)"
    else:
        cause = f"write failed ({' '.join(str(e).split())[:200]}); fix the cause, {resume}"
    return StorageError(f"{where}: {cause}")


def _paths_under(node: Any, key: str) -> Iterator[tuple[str, Any]]:
    """(key, value) for every ``path`` / ``*_path`` entry under ``node``, at any depth."""
    if isinstance(node, dict):
        for k, v in node.items():
            if isinstance(k, str) and (k == "path" or k.endswith("_path")) and not isinstance(v, (dict, list)):
                yield f"{key}.{k}", v
            else:
                yield from _paths_under(v, f"{key}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths_under(v, f"{key}[{i}]")


_TEMP_SHARD = re.compile(r"part-(\d{5,})\.[^/]*\.[0-9a-f]{12}")


def _remove_empty_dir(loc: Location, rel: str) -> int:
    """Remove the folder ``rel`` if it exists and is empty (object stores have no folders); 1 if removed."""
    import pyarrow.fs as pafs

    path = loc.path(rel)
    if loc.fs.type_name == "local":
        try:
            os.rmdir(path)
            return 1
        except OSError:  # absent, or not empty: a temporary file there belongs to a live or fenced writer
            return 0
    if loc.fs.get_file_info(path).type == pafs.FileType.Directory and not loc.fs.get_file_info(
            pafs.FileSelector(path, recursive=False)):
        loc.fs.delete_dir(path)
        return 1
    return 0


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
