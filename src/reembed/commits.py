"""The commit log: one small create-only object per shard commit, so a commit costs O(1) at any size.

``manifest.json`` is rewritten whole at every commit (3.6 s and 53 MB a commit at 100k shards). Here a
commit appends one entry of a few hundred bytes instead, Delta-Lake style::

    OUTPUT/_log/000000000000.json                     {"seq": 0, "kind": "claim", "epoch": 1, ...}
    OUTPUT/_log/000000000001.json                     {"seq": 1, "kind": "commit", "epoch": 1, "shard": 42,
                                                       "record": {...}, "at": ..., "writer": ...}
    OUTPUT/_log/_checkpoints/000000000000-000000000999.parquet   the effect of entries 0..999

**Entries** are numbered without gaps and written create-only: on S3 ``If-None-Match: *``
(:meth:`Location.write_if` with ``version=None``); on a local filesystem a complete temporary file is
hard-linked to the entry's name, which fails if the name exists. Other stores (GCS, Azure, HDFS) get a
check-then-write: best effort, two jobs racing there can both believe they wrote the same seq. A writer
keeps its next seq in memory; a writer only tries seq ``n`` after it has written or read ``n - 1``, so
the log has no gaps and readers find its end by reading forward until an entry is missing (no listing).

**Fencing by epoch.** :meth:`CommitLog.claim` appends a ``claim`` entry whose epoch is one more than the
latest. A writer whose create-only write finds its seq taken reads the entries it missed, in one
sweep: its own earlier write at that seq (a retry whose answer was lost) counts as written; a claim with
a higher epoch fences it (:class:`ConcurrentWriteError`, nothing written); anything else moves it on past
them. :meth:`CommitLog.check_current` does the same sweep without writing. A claim that meets another
claim fails, as two racing ``Manifest.claim`` calls do; it goes after plain commits of the job it fences.
Replay
applies entries in seq order and ignores a commit (or run) whose epoch is below the latest claim seen
so far: a fenced job can never commit after the claim that fenced it, even on a store that lets its
entry land.

**Checkpoint parts.** Every ``checkpoint_every`` entries (default 1,000) the writer publishes one Parquet
part holding the effect of the entries since the previous part: one row per shard committed there (the
last commit of a shard wins), plus every claim and run. Nothing else is ever rewritten, so a commit
writes one entry plus, amortized, 1/K of a part. Parts are named by the seqs they cover; a reader lists
``_checkpoints/`` (N/K names), walks the chain of parts from seq 0 taking at each step the part that
reaches furthest (so :meth:`CommitLog.compact`'s one big part supersedes the small ones and a part left
by a crashed compaction is harmless), then reads the entries after the chain. A part is published like a
shard (temporary name, then rename; one PUT on S3), so a crash mid-checkpoint leaves only a temporary
file under ``_checkpoints/_tmp/`` that no reader looks at, and the entries it would have covered are
still read from the log. Entries are never deleted (a fenced writer must keep finding its seq taken).

A claimer should take the output first and only then compute leftovers from :func:`read_state`: after
the claim, no older job's commit can count, so the state it reads is final for them.

**Retractions.** ``reembed repair`` found a committed shard's file missing or not matching its sha256: it
appends one ``retract`` entry naming the shard and the seq of the commit it found damaged
(:meth:`CommitLog.retract`). Replay takes the shard out of the committed set only while that very commit is
still the shard's effective one (a shard committed again meanwhile stays committed), so the next resume
re-embeds exactly the retracted shards; until then :attr:`State.damaged` names them (``reembed status``
says "damaged"). A retract is fenced by epoch like a commit.
"""

from __future__ import annotations

import concurrent.futures
import datetime as dt
import errno
import io
import itertools
import json
import logging
import os
import posixpath
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

from reembed import storage
from reembed.errors import ConcurrentWriteError, ManifestError
from reembed.storage import Location

log = logging.getLogger(__name__)

LOG_DIR = "_log"
CHECKPOINTS = "_checkpoints"
CHECKPOINT_EVERY = 1000
KINDS = ("claim", "commit", "run", "retract")
# Record fields summed into State.totals (Manifest.totals' names on the right).
# "reused" and "deduplicated" (incremental runs, reembed.reuse) came later: parts written before read as 0.
_COUNTS = ("rows", "dead_letters", "truncated", "tokens", "bytes", "reused", "deduplicated")
_PROBE_BATCH_MAX = 64  # entries read in parallel when finding the end of the log on an object store
_PROBE_THREADS = 16
_UNSEEN_RETRIES = 5


@dataclass
class WriteCost:
    """What a write sent to storage: bytes of entries and parts, and how many create/put requests."""

    bytes: int = 0
    requests: int = 0

    def add(self, other: "WriteCost") -> None:
        self.bytes += other.bytes
        self.requests += other.requests


class CommitLog:
    """The commit log of one output location.

    ``CommitLog.create(loc)`` starts a new log and holds its first epoch; ``CommitLog.open(loc)`` reads
    where an existing one ends (O(1) in its length) and may :meth:`claim` it. Only a log that holds an
    epoch (created or claimed) can :meth:`commit`. :attr:`last_write` says what the last append wrote,
    :attr:`written` what this object wrote in all. One object is one writer: call it from one thread
    (the driver's commit loop), as with :class:`~reembed.manifest.Manifest`.
    """

    def __init__(self, loc: Location, checkpoint_every: int = CHECKPOINT_EVERY):
        if checkpoint_every < 1:
            raise ValueError("checkpoint_every must be >= 1")
        self.loc = loc
        self.checkpoint_every = checkpoint_every
        self.writer = uuid.uuid4().hex[:16]
        self.epoch: int | None = None  # the epoch this job holds, once created or claimed
        self.last_write = WriteCost()
        self.written = WriteCost()
        self._next = 0  # the next seq this writer will try
        self._covered = 0  # the first seq no checkpoint part covers
        self._tail = _Delta()  # the effect of the entries from _covered to _next - 1
        self._part_due = checkpoint_every  # the next part is written once _next reaches this
        self._warned_best_effort = False

    # -- open / create / claim -------------------------------------------------------------------------

    @classmethod
    def open(cls, loc: Location, checkpoint_every: int = CHECKPOINT_EVERY) -> "CommitLog | None":
        """The log at ``loc``, positioned after its last entry; None if there is none. Reads the names of
        the checkpoint parts, the footer of the last one, and the entries after it."""
        clog = cls(loc, checkpoint_every)
        chain = _chain(loc)
        if chain:
            last = chain[-1]
            clog._covered = last.last + 1
            clog._tail = _Delta(epoch=_read_part_epoch(loc, last))
        for entry in _read_from(loc, clog._covered):
            clog._tail.apply(entry)
        clog._next = clog._covered + clog._tail.count
        clog._part_due = clog._covered + checkpoint_every
        if clog._next == 0:
            return None
        return clog

    @classmethod
    def create(cls, loc: Location, checkpoint_every: int = CHECKPOINT_EVERY) -> "CommitLog":
        """Start a new log at ``loc`` holding epoch 1. Refused with :class:`ConcurrentWriteError` if a log
        is there already (another job created it first)."""
        clog = cls(loc, checkpoint_every)
        clog._append({"kind": "claim", "epoch": 1}, new_log=True)
        return clog

    @property
    def next_seq(self) -> int:
        return self._next

    @property
    def latest_epoch(self) -> int:
        """The highest epoch claimed in the entries this object has seen."""
        return self._tail.epoch

    def claim(self) -> int:
        """Take the output over: append a claim with the next epoch and return it. From then on every
        job holding an older epoch fails at its next commit, and no commit of theirs that lands after
        this claim counts. A claim racing another claim fails with :class:`ConcurrentWriteError`."""
        return self._append({"kind": "claim", "epoch": self._tail.epoch + 1})["epoch"]

    # -- updates -------------------------------------------------------------------------------------

    def commit(self, shard: int, record: dict[str, Any]) -> int:
        """Record ``shard`` as done with ``record`` (a small JSON-able dict); returns the entry's seq.
        Raises :class:`ConcurrentWriteError` (and writes nothing) if another job has claimed the output."""
        if isinstance(shard, bool) or not isinstance(shard, (int, np.integer)) or not 0 <= shard < 2**31:
            raise ManifestError(f"{self.loc.display(LOG_DIR)}: shard {shard!r} is not a shard number "
                                "(an int from 0 to 2**31 - 1)")
        return self._append({"kind": "commit", "epoch": self._held(), "shard": int(shard), "record": record})["seq"]

    def retract(self, shard: int, commit_seq: int, reason: str, message: str) -> int:
        """Take ``shard`` out of the committed set because its commit at seq ``commit_seq`` was found damaged
        (``reason``: missing, sha256, unreadable, outside; ``message``: one line naming the file). Replay
        ignores it if the shard was committed again after ``commit_seq``. Returns the entry's seq."""
        record = {"commit_seq": int(commit_seq), "reason": reason, "message": message}
        return self._append({"kind": "retract", "epoch": self._held(), "shard": int(shard), "record": record})["seq"]

    def record_run(self, run: dict[str, Any]) -> int:
        """Record one run of the job (timings, device); returns the entry's seq."""
        return self._append({"kind": "run", "epoch": self._held(), "record": run})["seq"]

    def compact(self) -> int:
        """Publish one part covering every entry so far, then delete the parts it supersedes. Returns the
        number of parts deleted. Entries are kept (a fenced writer must still find its seq taken)."""
        state = self.state()
        if state.last_seq < 0:
            return 0
        name = _part_name(0, state.last_seq)
        data = _part_bytes(_state_tables(state), first=0, last=state.last_seq, epoch=state.epoch)
        self.loc.publish(data, LOG_DIR, CHECKPOINTS, name)
        self.written.add(WriteCost(len(data), 1))
        removed = 0
        for part in _parts(self.loc):
            if part.last <= state.last_seq and part.name != name:
                self.loc.delete(LOG_DIR, CHECKPOINTS, part.name)
                removed += 1
        if self._covered <= state.last_seq < self._next:
            # This writer's next part starts where the compacted one ends. (A writer that has not seen
            # every compacted entry keeps its own window: its next part overlaps, which readers allow.)
            self._tail = _Delta(epoch=state.epoch)
            for entry in _read_from(self.loc, state.last_seq + 1, stop=self._next):
                self._tail.apply(entry)
            self._covered = state.last_seq + 1
            self._part_due = self._covered + self.checkpoint_every
        log.info("%s: compacted entries 0..%d into %s (%d shards), %d parts removed",
                 self.loc.display(LOG_DIR), state.last_seq, name, len(state), removed)
        return removed

    def check_current(self) -> None:
        """Raise :class:`ConcurrentWriteError` if another job has claimed the output since this one last
        wrote (reads only the entries appended since then)."""
        held = self._held()
        for entry in _read_from(self.loc, self._next):
            if entry["kind"] == "claim" and entry["epoch"] > held:
                raise ConcurrentWriteError(
                    f"{self.loc.display(LOG_DIR, _entry_name(entry['seq']))}: another job has taken over this "
                    f"output (epoch {entry['epoch']}, this job holds {held}); two jobs must not write the same "
                    "output at once")
            self._tail.apply(entry)
            self._next = entry["seq"] + 1

    # -- queries -------------------------------------------------------------------------------------

    def state(self) -> "State":
        """The committed state as stored now: read part by part, then the entries after the parts."""
        return read_state(self.loc)

    # -- internals -----------------------------------------------------------------------------------

    def _held(self) -> int:
        if self.epoch is None:
            raise ManifestError(f"{self.loc.display(LOG_DIR)}: this job has not claimed the output; "
                                "claim it before committing")
        return self.epoch

    def _append(self, what: dict[str, Any], new_log: bool = False) -> dict[str, Any]:
        """Write ``what`` as the next entry, moving past entries other writers appended meanwhile."""
        cost = WriteCost()
        unseen = 0  # create-only writes refused for an entry that could not be read yet
        while True:
            seq = self._next
            entry = {"seq": seq, "kind": what["kind"], "epoch": what["epoch"], "at": _now(),
                     "writer": self.writer, **{k: v for k, v in what.items() if k not in ("kind", "epoch")}}
            body = json.dumps(entry, separators=(",", ":")).encode()
            cost.add(WriteCost(len(body), 1))
            if self._create(seq, body):
                break
            # Taken: read every entry appended since this writer's last one (in one sweep, so a writer
            # catching up with a busy one gets there), then try again after them.
            missed = _read_from(self.loc, seq)
            found = next(missed, None)
            if found is None:
                # S3 answers 409 ConditionalRequestConflict while another conditional PUT of the key is in
                # flight: the entry may not be readable yet. Try the same seq again, briefly.
                unseen += 1
                if unseen > _UNSEEN_RETRIES:
                    raise ManifestError(f"{self.loc.display(LOG_DIR, _entry_name(seq))}: refused as existing but "
                                        "cannot be read; is something deleting the log?")
                time.sleep(0.05 * 2 ** unseen)
                continue
            if _same_entry(found, entry):
                entry = found  # our own earlier attempt landed (its answer was lost)
                break
            for found in itertools.chain([found], missed):
                self._refuse_if_fenced(found, entry, new_log)
                self._tail.apply(found)
                self._next = found["seq"] + 1
        if entry["kind"] == "claim":
            self.epoch = entry["epoch"]
        self._tail.apply(entry)
        self._next = seq + 1
        if self._next >= self._part_due:
            cost.add(self._checkpoint())
        self.last_write = cost
        self.written.add(cost)
        return entry

    def _refuse_if_fenced(self, found: dict[str, Any], mine: dict[str, Any], new_log: bool) -> None:
        where = self.loc.display(LOG_DIR, _entry_name(found["seq"]))
        if new_log:
            raise ConcurrentWriteError(f"{where}: a commit log was created here by another job; two jobs must "
                                       "not write the same output at once")
        if found["kind"] != "claim":
            return
        if mine["kind"] == "claim":
            raise ConcurrentWriteError(f"{where}: another job claimed this output at the same moment (epoch "
                                       f"{found['epoch']}); two jobs must not write the same output at once")
        if found["epoch"] > mine["epoch"]:
            what = {"commit": f"shard {mine.get('shard')}", "retract": f"the retraction of shard {mine.get('shard')}"
                    }.get(mine["kind"], "the run record")
            raise ConcurrentWriteError(
                f"{where}: another job has taken over this output (epoch {found['epoch']}, this job holds "
                f"{mine['epoch']}); two jobs must not write the same output at once, and this one stops "
                f"without committing {what}"
            )

    def _create(self, seq: int, body: bytes) -> bool:
        """Write the entry ``seq`` only if it does not exist; False if it does."""
        if not self.loc.conditional_writes and self.loc.fs.type_name != "local" and not self._warned_best_effort:
            log.warning("%s: this store has no create-only writes; the commit log relies on one job at a time",
                        self.loc.display(LOG_DIR))
            self._warned_best_effort = True
        return create_only(self.loc, body, LOG_DIR, _entry_name(seq), tag=self.writer)

    def _checkpoint(self) -> WriteCost:
        """Publish the part covering ``_covered .. _next - 1`` and start a new tail.

        The entry just written is the commit; a part only saves readers work. So a part that cannot be
        written is logged and tried again a tenth of a window later, and the commit still succeeds."""
        first, last = self._covered, self._next - 1
        data = _part_bytes(self._tail.table(), first=first, last=last, epoch=self._tail.epoch)
        try:
            self.loc.publish(data, LOG_DIR, CHECKPOINTS, _part_name(first, last))
        except (storage.StorageError, OSError) as e:
            self._part_due = self._next + max(1, self.checkpoint_every // 10)
            log.warning("%s: checkpoint part %s not written (%s); entries stay readable, retrying at seq %d",
                        self.loc.display(LOG_DIR, CHECKPOINTS), _part_name(first, last), e, self._part_due)
            return WriteCost(len(data), 1)
        self._covered = last + 1
        self._part_due = self._covered + self.checkpoint_every
        self._tail = _Delta(epoch=self._tail.epoch)
        log.debug("%s: checkpoint part %s (%d bytes)", self.loc.display(LOG_DIR), _part_name(first, last), len(data))
        return WriteCost(len(data), 1)


def read_state(loc: Location) -> "State":
    """The committed state at ``loc`` (empty if there is no log): the chain of checkpoint parts, one
    part at a time, then the entries after it."""
    for attempt in range(3):
        chain = _chain(loc)
        state = State(loc, chain)
        try:
            for part, table in _part_tables(loc, chain, [c for c in _PART_COLUMNS if c != "record"]):
                state._apply_part(part, table)
        except FileNotFoundError:
            if attempt == 2:
                raise
            log.debug("%s: a checkpoint part vanished while reading (compaction); reading again", loc.display(LOG_DIR))
            continue
        tail = _Delta(epoch=state.epoch)
        for entry in _read_from(loc, state.last_seq + 1):
            tail.apply(entry)
        state._apply_tail(tail)
        state._trim()
        return state
    raise AssertionError("unreachable")  # pragma: no cover


class State:
    """What the log says is committed.

    ``shards`` (sorted numpy array) and ``in`` answer which shards are done; :attr:`totals` sums the
    committed records (Manifest.totals' keys); :meth:`iter_records` streams the records again from
    storage, so a state of 100k shards holds a few arrays, not 100k dicts.
    """

    def __init__(self, loc: Location, chain: list["_Part"]):
        self.loc = loc
        self.epoch = 0
        self.last_seq = -1
        self.runs: list[dict[str, Any]] = []
        self.ignored = 0  # commits and runs of fenced jobs that landed after the claim that fenced them
        self._chain = chain
        self._tail_records: dict[int, dict[str, Any]] = {}
        self._seq = np.full(0, -1, dtype=np.int64)  # per shard: seq of its effective commit, -1 if none
        self._counts = np.zeros((0, len(_COUNTS)), dtype=np.int64)
        self._device_s = np.zeros(0, dtype=np.float64)
        # Dead letters per shard and reason: one int32 column per reason code seen (a handful), not a dict
        # per shard, so a state of N shards holds ~90 bytes per shard whatever its records say.
        self._codes: list[str] = []
        self._reason_counts = np.zeros((0, 0), dtype=np.int32)
        self._n = 0  # shards 0.._n - 1 have been touched (the arrays may be longer until _trim)
        self._lookup: _Lookup | None = None  # reads records by seq (keeps the row group read last)
        self._damaged: dict[int, dict[str, Any]] = {}  # retracted shards not committed again since

    @property
    def shards(self) -> np.ndarray:
        return np.flatnonzero(self._seq >= 0)

    def __contains__(self, shard: object) -> bool:
        return isinstance(shard, (int, np.integer)) and 0 <= shard < len(self._seq) and self._seq[shard] >= 0

    def __len__(self) -> int:
        return int(np.count_nonzero(self._seq >= 0))

    @property
    def totals(self) -> dict[str, Any]:
        """Rows embedded and dead-lettered (per reason), truncated, tokens, bytes, device seconds."""
        done = self._seq >= 0
        sums = self._counts[done].sum(axis=0) if len(self._seq) else np.zeros(len(_COUNTS), dtype=np.int64)
        per_code = self._reason_counts[done].sum(axis=0, dtype=np.int64) if len(self._seq) else []
        reasons = {code: int(n) for code, n in zip(self._codes, per_code) if n}
        rows, dead, truncated, tokens, size, reused, deduplicated = (int(x) for x in sums)
        return {"embedded": rows, "dead_lettered": dead, "reasons": reasons, "truncated": truncated,
                "tokens": tokens, "bytes": size, "device_seconds": float(self._device_s[done].sum()),
                "reused": reused, "deduplicated": deduplicated}

    @property
    def damaged(self) -> dict[int, dict[str, Any]]:
        """Shards a check found damaged and retracted, not committed again since: shard ->
        ``{"seq", "reason", "message"}`` (``seq``: the retract entry's)."""
        return dict(self._damaged)

    def rows_of(self, shards: np.ndarray) -> np.ndarray:
        """The committed rows of each of ``shards`` (committed ones), from the log's arrays."""
        return self._counts[np.asarray(shards, dtype=np.int64), 0].copy()

    def seq_of(self, shard: int) -> int:
        """The seq of ``shard``'s effective commit (-1 if it is not committed)."""
        return int(self._seq[shard]) if 0 <= shard < len(self._seq) else -1

    def record(self, shard: int) -> dict[str, Any]:
        """The record of ``shard``'s effective commit (KeyError if it is not committed), read from the
        entries after the parts or from the one row group of the part that holds its seq: a few KB read,
        nothing kept but the last row group read (so records looked up in commit order cost one read per
        row group)."""
        seq = self.seq_of(shard) if isinstance(shard, (int, np.integer)) else -1
        if seq < 0:
            raise KeyError(shard)
        entry = self._tail_records.get(int(shard))
        if entry is not None and entry["seq"] == seq:
            return entry["record"]
        if self._lookup is None:
            self._lookup = _Lookup(self.loc, self._chain)
        found = self._lookup.record(int(shard), seq)
        if found is None:
            raise KeyError(shard)
        return found

    def seqs_of(self, shards: np.ndarray) -> np.ndarray:
        """The seqs of the effective commits of ``shards`` (committed ones), from the log's arrays."""
        return self._seq[np.asarray(shards, dtype=np.int64)].copy()

    def digest(self) -> str:
        """One sha256 of the committed set, from the arrays alone (no record is read): each committed shard,
        the seq of its effective commit, its rows and bytes. Entries are create-only and never rewritten (a
        compaction keeps the seqs), so (shard, seq) names one commit, and with it its file's sha256: the
        digest changes when a shard is committed, re-committed or retracted, and nothing else changes it."""
        import hashlib

        done = np.flatnonzero(self._seq >= 0)
        h = hashlib.sha256()
        for a in (done, self._seq[done], self._counts[done][:, [_COUNTS.index("rows"), _COUNTS.index("bytes")]]):
            h.update(np.ascontiguousarray(a, dtype="<i8").tobytes())
        return h.hexdigest()

    def iter_records(self) -> Iterator[tuple[int, dict[str, Any]]]:
        """(shard, record) for every committed shard, in commit order, read part by part."""
        for shard, _, rec in self.iter_commits():
            yield shard, rec

    def iter_commits(self) -> Iterator[tuple[int, int, dict[str, Any]]]:
        """(shard, seq of its commit, record) for every committed shard, in commit order, read part by part."""
        import pyarrow.parquet as pq

        for part in self._chain:
            with self.loc.fs.open_input_file(self.loc.path(LOG_DIR, CHECKPOINTS, part.name)) as f:
                for batch in pq.ParquetFile(f).iter_batches(columns=["seq", "kind", "shard", "record"]):
                    cols = batch.to_pydict()
                    for seq, kind, shard, rec in zip(cols["seq"], cols["kind"], cols["shard"], cols["record"]):
                        if kind == "commit" and self._seq[shard] == seq:
                            yield shard, seq, json.loads(rec)
        for shard, entry in self._tail_records.items():
            if self._seq[shard] == entry["seq"]:
                yield shard, entry["seq"], entry["record"]

    # -- building ------------------------------------------------------------------------------------

    def _apply_part(self, part: "_Part", table) -> None:
        start = self.last_seq + 1  # rows before it were applied from an earlier part of the chain
        seq = table.column("seq").to_numpy()
        kind = table.column("kind")
        keep = seq >= start
        claims = keep & _is(kind, "claim")
        if claims.any():
            self.epoch = max(self.epoch, int(table.column("epoch").to_numpy()[claims].max()))
        runs = np.flatnonzero(keep & _is(kind, "run"))
        if len(runs):
            records = _read_part(self.loc, part, ["record"]).column("record")
            self.runs.extend(json.loads(records[int(i)].as_py()) for i in runs)
        commits = np.flatnonzero(keep & _is(kind, "commit"))
        if len(commits):
            shards = table.column("shard").to_numpy(zero_copy_only=False)[commits].astype(np.int64)
            self._grow(int(shards.max()) + 1)
            self._seq[shards] = seq[commits]
            for j, name in enumerate(_COUNTS):
                if name in table.column_names:  # a part written before the column existed: 0
                    self._counts[shards, j] = table.column(name).fill_null(0).to_numpy()[commits]
            self._device_s[shards] = table.column("device_seconds").fill_null(0.0).to_numpy()[commits]
            if len(self._codes):
                self._reason_counts[shards] = 0
            reasons = table.column("reasons").to_pylist()
            some = [i for i in commits if reasons[i] is not None]
            if some:  # one JSON document for the whole part: per-row json.loads dominates otherwise
                parsed = json.loads("[" + ",".join(reasons[i] for i in some) + "]")
                for shard, per in zip(table.column("shard").take(some).to_pylist(), parsed):
                    self._set_reasons(shard, per)
            if self._damaged:
                for shard in shards.tolist():
                    self._damaged.pop(shard, None)
        retracts = np.flatnonzero(keep & _is(kind, "retract"))
        if len(retracts):  # rare: read their records (commit_seq, reason) only when a part has some
            records = _read_part(self.loc, part, ["record"]).column("record")
            shards = table.column("shard").to_numpy(zero_copy_only=False)
            for i in retracts.tolist():  # after the part's commits: a retract follows the commit it names
                self._retract(int(shards[i]), int(seq[i]), json.loads(records[i].as_py()))
        self.last_seq = part.last

    def _apply_tail(self, tail: "_Delta") -> None:
        self.epoch = max(self.epoch, tail.epoch)
        self.ignored += tail.ignored
        self.runs.extend(e["record"] for e in tail.others if e["kind"] == "run")
        for shard, entry in tail.commits.items():
            self._grow(shard + 1)
            rec = entry["record"]
            self._seq[shard] = entry["seq"]
            self._counts[shard] = [int(rec.get(k, 0) or 0) for k in _COUNTS]
            self._device_s[shard] = float(rec.get("device_seconds", 0.0) or 0.0)
            self._set_reasons(shard, rec.get("reasons"))
            self._tail_records[shard] = entry
            self._damaged.pop(shard, None)
        for shard, entry in tail.retracts.items():
            self._retract(shard, entry["seq"], entry["record"])
        self.last_seq += tail.count

    def _retract(self, shard: int, seq: int, rec: dict[str, Any]) -> None:
        """Apply a retract entry: only while the commit it names is still the shard's effective one (a
        compacted part carries a retracted shard as a retract naming seq -1, i.e. "not committed")."""
        self._grow(shard + 1)
        if self._seq[shard] != rec.get("commit_seq"):
            return  # committed again after the check found it damaged
        self._seq[shard] = -1
        self._set_reasons(shard, None)
        self._tail_records.pop(shard, None)
        self._damaged[shard] = {"seq": seq, "reason": rec.get("reason"), "message": rec.get("message"),
                                "commit_seq": rec.get("commit_seq")}

    def _set_reasons(self, shard: int, reasons: dict[str, int] | None) -> None:
        if len(self._codes):
            self._reason_counts[shard] = 0
        for code, n in (reasons or {}).items():
            if code not in self._codes:
                self._codes.append(code)
                self._reason_counts = np.concatenate(
                    [self._reason_counts, np.zeros((len(self._reason_counts), 1), np.int32)], axis=1)
            self._reason_counts[shard, self._codes.index(code)] = n

    def _grow(self, n: int) -> None:
        self._n = max(self._n, n)
        if n <= len(self._seq):
            return
        size = max(n, 2 * len(self._seq), 1024)
        self._seq = np.concatenate([self._seq, np.full(size - len(self._seq), -1, dtype=np.int64)])
        self._counts = np.concatenate([self._counts, np.zeros((size - len(self._counts), len(_COUNTS)), np.int64)])
        self._device_s = np.concatenate([self._device_s, np.zeros(size - len(self._device_s))])
        self._reason_counts = np.concatenate(
            [self._reason_counts, np.zeros((size - len(self._reason_counts), len(self._codes)), np.int32)])

    def _trim(self) -> None:
        """Drop the arrays' spare capacity once the state is read (growth doubles them)."""
        n = self._n
        self._seq, self._counts, self._device_s = self._seq[:n].copy(), self._counts[:n].copy(), self._device_s[:n].copy()
        self._reason_counts = self._reason_counts[:n].copy()


def read_records(loc: Location, commits: Iterable[tuple[int, int]]) -> dict[int, dict[str, Any]]:
    """shard -> record of each ``(shard, seq)`` in ``commits``: the records of those very commits, read
    where a task runs, from the parts' row groups that hold their seqs (each read once) or else from the
    entries themselves (after the parts, or a commit a compaction left out because the shard was committed
    again since: entries are never deleted, so the commits a task was sent stay readable). What a task
    carries instead of records: shard numbers and seqs (from :meth:`State.seqs_of`), so no process holds
    every record. A seq that is no commit of its shard is a :class:`ManifestError`."""
    chain = _chain(loc)
    end = chain[-1].last if chain else -1
    lookup = _Lookup(loc, chain)
    out: dict[int, dict[str, Any]] = {}
    for shard, seq in sorted(((int(s), int(q)) for s, q in commits), key=lambda c: c[1]):
        rec = lookup.record(shard, seq) if seq <= end else None
        if rec is None:
            entry = _read_entry(loc, seq) if seq >= 0 else None
            ok = entry is not None and entry["kind"] == "commit" and entry.get("shard") == shard
            rec = entry["record"] if ok else None
        if rec is None:
            raise ManifestError(f"{loc.display(LOG_DIR, _entry_name(seq))}: no commit of shard {shard} at seq "
                                f"{seq}; the commit log does not match the shards a task was given: run again")
        out[shard] = rec
    return out


class _Lookup:
    """Records by seq from a chain of parts: the one row group of the part that holds a seq (by its seq
    statistics); the row group read last is kept, so seqs looked up in order cost one read per row group."""

    def __init__(self, loc: Location, chain: list["_Part"]):
        self.loc = loc
        self.chain = chain
        self.lasts = [p.last for p in chain]
        self.cached: tuple | None = None

    def record(self, shard: int, seq: int) -> dict[str, Any] | None:
        i = int(np.searchsorted(self.lasts, seq))  # the first part reaching seq; parts overlap only at a compaction
        if i >= len(self.chain) or self.chain[i].first > seq:
            return None
        seqs, kinds, shards, records = self._row_group_of(self.chain[i], seq)
        hit = np.flatnonzero((seqs == seq) & (shards == shard) & kinds)
        if not len(hit):
            return None
        return json.loads(records[int(hit[-1])].as_py())

    def _row_group_of(self, part: "_Part", seq: int):
        """``(seqs, is_commit, shards, records)`` of the row group of ``part`` whose seq statistics hold
        ``seq``; the last one read is kept."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        cached = self.cached
        if cached is not None and cached[0] == part.name and cached[1] <= seq <= cached[2]:
            return cached[3]
        with self.loc.fs.open_input_file(self.loc.path(LOG_DIR, CHECKPOINTS, part.name)) as f:
            pf = pq.ParquetFile(f)
            si = pf.schema_arrow.get_field_index("seq")
            for g in range(pf.metadata.num_row_groups):
                st = pf.metadata.row_group(g).column(si).statistics
                if st is not None and st.has_min_max and not st.min <= seq <= st.max:
                    continue
                t = pf.read_row_group(g, columns=["seq", "kind", "shard", "record"])
                got = (t.column("seq").to_numpy(), pc.equal(t.column("kind"), "commit").to_numpy(zero_copy_only=False),
                       t.column("shard").fill_null(-1).to_numpy(), t.column("record").combine_chunks())
                if (got[0] == seq).any():
                    lo, hi = (st.min, st.max) if st is not None and st.has_min_max else (seq, seq)
                    self.cached = (part.name, lo, hi, got)
                    return got
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty.astype(bool), empty, None


# -- replay ---------------------------------------------------------------------------------------------


@dataclass
class _Delta:
    """The effect of consecutive entries: the last effective commit per shard, claims and runs in order.

    A commit or run whose epoch is below the latest claim applied so far is ignored (a fenced job's).
    """

    epoch: int = 0
    count: int = 0
    ignored: int = 0
    commits: dict[int, dict[str, Any]] = field(default_factory=dict)
    retracts: dict[int, dict[str, Any]] = field(default_factory=dict)  # the last retract per shard since its commit
    others: list[dict[str, Any]] = field(default_factory=list)

    def apply(self, entry: dict[str, Any]) -> bool:
        self.count += 1
        kind, epoch = entry["kind"], entry["epoch"]
        if kind == "claim":
            if epoch <= self.epoch:  # only possible on a store without create-only writes
                self.ignored += 1
                return False
            self.epoch = epoch
            self.others.append(entry)
            return True
        if epoch < self.epoch:
            self.ignored += 1
            log.debug("seq %d: %s of epoch %d after the claim of epoch %d: ignored", entry["seq"], kind, epoch,
                      self.epoch)
            return False
        if kind == "commit":
            self.commits.pop(entry["shard"], None)  # keep dict order = order of the effective commits
            self.commits[entry["shard"]] = entry
            self.retracts.pop(entry["shard"], None)  # a commit after a retract supersedes it
        elif kind == "retract":
            # Kept beside the commit it may name: replay applies commits, then retracts (see State._retract).
            self.retracts[entry["shard"]] = entry
        else:
            self.others.append(entry)
        return True

    def table(self):
        """This delta as a checkpoint part's rows, in seq order."""
        rows = sorted([*self.others, *self.commits.values(), *self.retracts.values()], key=lambda e: e["seq"])
        return _rows_table(rows)


def _state_tables(state: State, batch: int = 10_000) -> Iterator[Any]:
    """A whole :class:`State` as one part's rows, ``batch`` rows at a time (for :meth:`CommitLog.compact`).
    Claims collapse to one row with the latest epoch and runs keep their order; both take seq 0 (the first
    claim's), ahead of every commit, which is right because a part starting at seq 0 always heads the
    chain. Commits come in seq order, as :meth:`State.iter_records` yields them; a damaged (retracted) shard
    becomes a retract naming commit seq -1, which keeps it damaged and uncommitted."""
    rows = [{"seq": 0, "kind": "claim", "epoch": state.epoch}] if state.epoch else []
    rows += [{"seq": 0, "kind": "run", "epoch": state.epoch, "record": r} for r in state.runs]
    for shard, rec in state.iter_records():
        rows.append({"seq": int(state._seq[shard]), "kind": "commit", "epoch": state.epoch, "shard": shard,
                     "record": rec})
        if len(rows) >= batch:
            yield _rows_table(rows)
            rows = []
    rows += [{"seq": d["seq"], "kind": "retract", "epoch": state.epoch, "shard": shard,
              "record": {"commit_seq": -1, "reason": d["reason"], "message": d["message"]}}
             for shard, d in sorted(state._damaged.items())]
    if rows:
        yield _rows_table(rows)


_PART_COLUMNS = ("seq", "kind", "epoch", "at", "writer", "shard", *_COUNTS, "device_seconds", "reasons", "record")


def _rows_table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    def rec(e: dict[str, Any]) -> dict[str, Any]:
        return e.get("record") or {}

    commit = [e["kind"] == "commit" for e in rows]
    cols: dict[str, Any] = {
        "seq": pa.array([e["seq"] for e in rows], pa.int64()),
        "kind": pa.array([e["kind"] for e in rows], pa.string()),
        "epoch": pa.array([e["epoch"] for e in rows], pa.int64()),
        "at": pa.array([e.get("at", "") for e in rows], pa.string()),
        "writer": pa.array([e.get("writer", "") for e in rows], pa.string()),
        "shard": pa.array([e.get("shard") if e["kind"] in ("commit", "retract") else None for e in rows], pa.int64()),
    }
    for name in _COUNTS:
        cols[name] = pa.array([int(rec(e).get(name, 0) or 0) if c else None for e, c in zip(rows, commit)], pa.int64())
    cols["device_seconds"] = pa.array([float(rec(e).get("device_seconds", 0.0) or 0.0) if c else None
                                       for e, c in zip(rows, commit)], pa.float64())
    cols["reasons"] = pa.array([json.dumps(rec(e)["reasons"]) if c and rec(e).get("reasons") else None
                                for e, c in zip(rows, commit)], pa.string())
    cols["record"] = pa.array([json.dumps(e["record"], separators=(",", ":")) if "record" in e else None
                               for e in rows], pa.string())
    return pa.Table.from_arrays(list(cols.values()), names=list(cols))


# -- storage helpers ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Part:
    name: str
    first: int
    last: int


def _entry_name(seq: int) -> str:
    return f"{seq:012d}.json"


def _part_name(first: int, last: int) -> str:
    return f"{first:012d}-{last:012d}.parquet"


def _parts(loc: Location) -> list[_Part]:
    out = []
    for info in loc.list(LOG_DIR, CHECKPOINTS):
        name = posixpath.basename(info.path)
        stem, dot, ext = name.partition(".")
        first, dash, last = stem.partition("-")
        if ext == "parquet" and dash and first.isdigit() and last.isdigit() and int(first) <= int(last):
            out.append(_Part(name, int(first), int(last)))
    return out


def attempts(loc: Location) -> list[dict[str, Any]]:
    """One summary per attempt (epoch) of the job on ``loc``, oldest first: when it claimed the output,
    its last entry, the shards / rows / tokens / device seconds its commits recorded, and whether it
    recorded a run (an attempt that did not was interrupted: killed, crashed or fenced).

    Streams the log with :func:`read_state`'s reads (a few columns of the parts, then the entries), holding
    one small dict per epoch. Parts keep a shard's last commit only, so an attempt whose commits were all
    superseded by a later attempt's counts the commits that survive; the entries after the parts count
    every commit, fenced ones included (they cost what they cost).
    """
    per: dict[int, dict[str, Any]] = {}

    def note(epoch: int, kind: str, at: str, rows: int = 0, tokens: int = 0, device_s: float = 0.0) -> None:
        a = per.setdefault(epoch, {"epoch": epoch, "claimed_at": None, "last_at": None, "shards": 0, "rows": 0,
                                   "tokens": 0, "device_seconds": 0.0, "run": False})
        if kind == "claim" and a["claimed_at"] is None:
            a["claimed_at"] = at
        a["last_at"] = max(a["last_at"] or at, at) if at else a["last_at"]
        if kind == "commit":
            a["shards"] += 1
            a["rows"] += rows
            a["tokens"] += tokens
            a["device_seconds"] += device_s
        elif kind == "run":
            a["run"] = True

    chain = _chain(loc)
    last = -1
    for part, t in _part_tables(loc, chain, ["seq", "kind", "epoch", "at", "rows", "tokens", "device_seconds"]):
        cols = t.to_pydict()
        for seq, kind, epoch, at, rows, tokens, ds in zip(*cols.values()):
            if seq > last:
                note(epoch, kind, at, rows or 0, tokens or 0, ds or 0.0)
        last = part.last
    for e in _read_from(loc, last + 1):
        rec = e.get("record") or {}
        note(e["epoch"], e["kind"], e.get("at", ""), int(rec.get("rows", 0) or 0), int(rec.get("tokens", 0) or 0),
             float(rec.get("device_seconds", 0.0) or 0.0))
    return [per[k] for k in sorted(per)]


def _chain(loc: Location) -> list[_Part]:
    """The parts that cover seqs 0..n without a gap, taking at each step the part reaching furthest."""
    parts = _parts(loc)
    chain: list[_Part] = []
    pos = 0
    while True:
        reach = [p for p in parts if p.first <= pos <= p.last]
        if not reach:
            return chain
        best = max(reach, key=lambda p: p.last)
        chain.append(best)
        pos = best.last + 1


def _part_bytes(tables, first: int, last: int, epoch: int) -> bytes:
    """A checkpoint part: ``tables`` (one table, or an iterable of tables with its schema) as Parquet, with
    the seqs it covers and the latest epoch at its end in the footer."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    meta = {b"reembed.first": str(first).encode(), b"reembed.last": str(last).encode(),
            b"reembed.epoch": str(epoch).encode()}
    buf = io.BytesIO()
    writer = None
    for table in [tables] if isinstance(tables, pa.Table) else tables:
        if writer is None:
            writer = pq.ParquetWriter(buf, table.schema.with_metadata(meta), compression="zstd")
        writer.write_table(table.replace_schema_metadata(meta))
    writer.close()
    return buf.getvalue()


def _read_part(loc: Location, part: _Part, columns: list[str]):
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(loc.path(LOG_DIR, CHECKPOINTS, part.name)) as f:
        pf = pq.ParquetFile(f)
        have = set(pf.schema_arrow.names)  # parts written before a count column existed lack it
        return pf.read(columns=[c for c in columns if c in have])


def _part_tables(loc: Location, chain: list[_Part], columns: list[str]):
    """(part, table of ``columns``) along ``chain``; on an object store a few parts are fetched at once."""
    if not loc.is_object_store:
        for part in chain:
            yield part, _read_part(loc, part, columns)
        return
    with concurrent.futures.ThreadPoolExecutor(_PROBE_THREADS) as pool:
        for i in range(0, len(chain), _PROBE_THREADS):
            window = chain[i:i + _PROBE_THREADS]
            yield from zip(window, pool.map(lambda p: _read_part(loc, p, columns), window))


def _read_part_epoch(loc: Location, part: _Part) -> int:
    """The latest epoch as of the end of ``part`` (from its footer: no row is read)."""
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(loc.path(LOG_DIR, CHECKPOINTS, part.name)) as f:
        meta = pq.ParquetFile(f).schema_arrow.metadata or {}
    try:
        return int(meta[b"reembed.epoch"])
    except (KeyError, ValueError) as e:
        raise ManifestError(f"{loc.display(LOG_DIR, CHECKPOINTS, part.name)}: not a commit-log checkpoint "
                            "(no epoch in its metadata); move it away and reopen") from e


def create_only(loc: Location, body: bytes, *parts: str, tag: str = "") -> bool:
    """Write ``body`` at ``parts`` only if nothing is there yet; False if something is. On S3 a
    conditional PUT (``If-None-Match: *``); on a local disk a complete temporary file hard-linked to the
    name (no reader ever sees half an object); elsewhere check-then-write (best effort)."""
    if loc.conditional_writes:
        try:
            loc.write_if(body, *parts, version=None)
            return True
        except storage.VersionConflict:
            return False
    if loc.fs.type_name == "local":
        return _create_local(loc.path(*parts), body, tag or uuid.uuid4().hex[:12])
    if loc.exists(*parts):
        return False
    loc.write_bytes(body, *parts)
    return True


def _create_local(target: str, body: bytes, tag: str) -> bool:
    tmp_dir = posixpath.join(posixpath.dirname(target), "_tmp")
    os.makedirs(tmp_dir, exist_ok=True)
    tmp = posixpath.join(tmp_dir, f"{posixpath.basename(target)}.{tag}")
    fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o644)
    try:
        try:
            if os.write(fd, body) != len(body):
                raise ManifestError(f"{target}: short write (disk full?)")
        finally:
            os.close(fd)
        os.link(tmp, target)
        return True
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
            raise
        return _create_exclusive(target, body)  # a filesystem without hard links
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass


def _create_exclusive(target: str, body: bytes) -> bool:
    """O_CREAT | O_EXCL, then the bytes: create-only, but a crash mid-write leaves a short entry (which
    readers then report as not an entry), so only where hard links are not available."""
    try:
        fd = os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        return False
    try:
        os.write(fd, body)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def _read_entry(loc: Location, seq: int) -> dict[str, Any] | None:
    """Entry ``seq``, or None if it does not exist."""
    name = _entry_name(seq)
    if loc.conditional_writes:
        got = loc.read_versioned(LOG_DIR, name)
        if got is None:
            return None
        raw = got[0]
    else:
        try:
            raw = loc.read_bytes(LOG_DIR, name)
        except FileNotFoundError:
            return None
    try:
        entry = json.loads(raw)
        if entry.get("seq") != seq or entry.get("kind") not in KINDS or not isinstance(entry.get("epoch"), int):
            raise ValueError("missing or wrong seq, kind or epoch")
    except ValueError as e:
        raise ManifestError(f"{loc.display(LOG_DIR, name)}: not a commit-log entry ({e}); restore it from a "
                            "backup or start a fresh output") from e
    return entry


def _read_from(loc: Location, seq: int, stop: int | None = None) -> Iterator[dict[str, Any]]:
    """Entries ``seq``, ``seq + 1``, ... up to the first missing one (or ``stop``, exclusive).

    The log has no gaps, so its end is found by reading, not listing. On an object store a growing batch
    of entries is read in parallel (one GET each); locally they are read one by one.
    """
    if not loc.is_object_store:
        while stop is None or seq < stop:
            entry = _read_entry(loc, seq)
            if entry is None:
                return
            yield entry
            seq += 1
        return
    batch = 1
    with concurrent.futures.ThreadPoolExecutor(_PROBE_THREADS) as pool:
        while stop is None or seq < stop:
            n = batch if stop is None else min(batch, stop - seq)
            for entry in pool.map(lambda s: _read_entry(loc, s), range(seq, seq + n)):
                if entry is None:
                    return
                yield entry
                seq += 1
            batch = min(2 * batch, _PROBE_BATCH_MAX)


def _is(column, value: str) -> np.ndarray:
    import pyarrow.compute as pc

    return pc.equal(column, value).to_numpy(zero_copy_only=False)


def _same_entry(a: dict[str, Any], b: dict[str, Any]) -> bool:
    """Whether ``a`` is ``b`` written earlier by the same writer (only the time may differ)."""
    return {k: v for k, v in a.items() if k != "at"} == {k: v for k, v in b.items() if k != "at"}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="milliseconds")
