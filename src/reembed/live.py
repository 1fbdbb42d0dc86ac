"""A run's heartbeat: ``OUTPUT/_live.json``, one small record the driver rewrites every few seconds.

The record says who holds the output (run id, host, pid, Ray job), since when, what the run is doing, how
far it got and how fast (rows and shards so far, rows/s over the last minute, ETA, the last commit), and,
once the run ends, how it ended. Its size is fixed: nothing in it grows with the corpus or the cluster.
Per-shard facts stay in the commit log; this is only the answer to "is anyone working on this, and how is
it going", which the log cannot give (a run between commits looks exactly like a dead one).

:func:`state` reads it the way ``ray job status`` reports a job:

* ``RUNNING``: not final, and the last beat is younger than the lease (``LEASE_BEATS`` beats). On the host
  that holds the run the process itself is checked instead, so a killed driver is seen at once there.
* ``SUCCEEDED``: the run ended with every shard committed (an output without a record: it is complete).
* ``FAILED``: the run ended with an error; the record keeps its one-line message.
* ``INTERRUPTED``: the run stopped without finishing: Ctrl-C, or a lease that expired without a final
  mark (killed, node lost), or no record at all on an incomplete output.

**Holding.** A run takes the record when it starts (:meth:`Heartbeat.acquire`), refused with
:class:`LiveRunError` while another run is RUNNING there, unless ``take_over``. A beat rewrites the record
only while it is still this run's: on S3 ``If-Match`` on the ETag this run last wrote, on a local disk
under the output's lock (the one manifest.json saves take); a run that was taken over stops beating and
leaves the new holder's record alone. What keeps the data exact is the commit log's epoch (the taken-over
run fails at its next commit); the record is what people, ``status`` and a second ``run`` read. Other
object stores get read-compare-write: best effort, as for the commit log there.

``REEMBED_HEARTBEAT_S`` sets the beat (default 10 s; read when a run starts, so set it before); the
record carries its beat and lease, so a reader needs no setting. Clocks of the writer and the reader are
compared (UTC): a skew of a few seconds is harmless against a 30 s lease.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any

from reembed import storage
from reembed.errors import ConcurrentWriteError, ConfigError, LiveRunError, ReembedError, VersionConflict  # noqa: F401
from reembed.storage import Location

log = logging.getLogger(__name__)

LIVE = "_live.json"
HEARTBEAT_ENV = "REEMBED_HEARTBEAT_S"
DEFAULT_BEAT_S = 10.0
LEASE_BEATS = 3  # a record whose last beat is older than this many beats is no longer held
RATE_WINDOW_S = 60.0  # rows/s is measured over the last minute of commits

RUNNING, SUCCEEDED, FAILED, INTERRUPTED = "RUNNING", "SUCCEEDED", "FAILED", "INTERRUPTED"
FORMAT = 1


def beat_interval() -> float:
    """Seconds between beats: ``$REEMBED_HEARTBEAT_S``, else 10."""
    raw = os.environ.get(HEARTBEAT_ENV)
    if not raw:
        return DEFAULT_BEAT_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.05 <= value <= 3600:
        raise ConfigError(f"{HEARTBEAT_ENV}={raw!r}: expected seconds between heartbeats, from 0.05 to 3600; "
                          "unset it for the default (10)")
    return value


def read(loc: Location) -> dict[str, Any] | None:
    """The output's live record, or None if it has none (or one this version cannot read: a warning)."""
    return _read(loc)[0]


def refuse_if_live(loc: Location, take_over: bool = False) -> None:
    """A read-only look before any work: :class:`LiveRunError` if another run is live on the output (and
    ``take_over`` is not given). :meth:`Heartbeat.acquire` decides for good, under the output's lock."""
    current = read(loc)
    if not take_over and current is not None and state(current, complete=False) == RUNNING:
        raise _live_error(loc, current)


def _live_error(loc: Location, current: dict[str, Any]) -> LiveRunError:
    return LiveRunError(f"{loc.display(LIVE)}: a run is live on this output ({holder(current)}); follow it with "
                        f"`reembed status {loc.uri} --follow`, or pass --take-over to fence it and continue from "
                        "its last commit")


def state(record: dict[str, Any] | None, complete: bool, now: float | None = None) -> str:
    """RUNNING, SUCCEEDED, FAILED or INTERRUPTED for an output whose live record is ``record`` and whose
    shards are all committed or not (``complete``)."""
    if record is None:
        return SUCCEEDED if complete else INTERRUPTED
    if record.get("final"):
        ended = {"succeeded": SUCCEEDED, "failed": FAILED}.get(record.get("state"), INTERRUPTED)
        # Shards retracted since (reembed repair) make a run that succeeded one to finish again.
        return INTERRUPTED if ended == SUCCEEDED and not complete else ended
    return RUNNING if holder_alive(record, now) else INTERRUPTED


def holder_alive(record: dict[str, Any], now: float | None = None) -> bool:
    """Whether the run that wrote ``record`` still holds it: on its own host (same name, kernel boot and pid
    namespace), whether its process lives (a live driver whose beats stall, say on an unreachable store,
    still holds it); from anywhere else, whether its last beat is younger than its lease."""
    if _on_this_host(record):
        return _process_alive(record.get("pid"), record.get("pid_start"))
    return beat_age(record, now) <= float(record.get("lease_s") or LEASE_BEATS * DEFAULT_BEAT_S)


def beat_age(record: dict[str, Any], now: float | None = None) -> float:
    """Seconds since the record's last beat (by this machine's clock)."""
    return max(0.0, (time.time() if now is None else now) - _unix(record.get("last_beat")))


def describe(loc: Location, complete: bool, now: float | None = None) -> dict[str, Any]:
    """``{"state": ..., "live": {...}}``: the fields ``reembed status`` adds to an output's summary."""
    record = read(loc)
    s = state(record, complete, now)
    if record is None:
        return {"state": s, "live": None}
    age = beat_age(record, now)
    eta = record.get("eta_seconds")
    if s == RUNNING and eta is not None:
        eta = max(0.0, round(eta - age, 1))  # as of now, not of the last beat
    live = {k: record.get(k) for k in ("run_id", "phase", "host", "pid", "ray_job", "epoch", "started_at",
                                       "last_beat", "lease_s", "rows_total", "rows_done", "shards_total",
                                       "shards_done", "last_commit_at", "rows_per_second", "finished_at",
                                       "error")}
    live.update(beat_age_s=round(age, 1), eta_seconds=eta if s == RUNNING else None)
    return {"state": s, "live": live}


def holder(record: dict[str, Any], now: float | None = None) -> str:
    """``host gpu-0 pid 123, Ray job raysubmit_x, started ..., last beat 4 s ago``: who holds a record."""
    job = f", Ray job {record['ray_job']}" if record.get("ray_job") else ""
    return (f"host {record.get('host')} pid {record.get('pid')}{job}, started {record.get('started_at')}, "
            f"last beat {beat_age(record, now):.0f} s ago")


class Heartbeat:
    """This run's hold on ``OUTPUT/_live.json``: :meth:`acquire` takes it and starts a thread that rewrites
    the record every ``beat_s`` seconds; the driver reports its phase (:meth:`phase`), its epoch
    (:meth:`held`) and each commit (:meth:`committed`); :meth:`finish` writes the final mark and stops.
    As a context manager it finishes by itself: FAILED on an error, INTERRUPTED on Ctrl-C, SUCCEEDED
    otherwise (unless :meth:`finish` was called)."""

    def __init__(self, loc: Location, beat_s: float | None = None):
        self.loc = loc
        self.beat_s = beat_interval() if beat_s is None else beat_s
        self.lease_s = round(LEASE_BEATS * self.beat_s, 3)
        self.taken_over: dict[str, Any] | None = None  # the record that replaced ours, once seen
        self._lock = threading.Lock()  # the record, between the driver and the beat thread
        self._io = threading.Lock()  # one write at a time (a beat and a phase change must not race)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="reembed-heartbeat", daemon=True)
        self._version: str | None = None  # S3: the ETag of our last write
        self._window: collections.deque[tuple[float, int]] = collections.deque()
        self._t_done = 0.0
        self._failed_writes = 0
        self.record: dict[str, Any] = {
            "format": FORMAT, "run_id": uuid.uuid4().hex[:16], "state": "running", "final": False,
            "phase": "starting", "host": socket.gethostname(), "boot_id": _boot_id(), "pid_ns": _pid_ns(),
            "pid": os.getpid(), "pid_start": _process_start(os.getpid()), "ray_job": _ray_job(), "epoch": None,
            "started_at": _iso(time.time()), "last_beat": None, "beat_s": self.beat_s, "lease_s": self.lease_s,
            "rows_total": None, "rows_done": 0, "shards_total": None, "shards_done": 0, "last_commit_at": None,
            "rows_per_second": None, "eta_seconds": None, "finished_at": None, "error": None,
        }

    @classmethod
    def acquire(cls, loc: Location, take_over: bool = False, beat_s: float | None = None) -> "Heartbeat":
        """Take ``loc``'s live record for a new run and start beating. Refused with :class:`LiveRunError`
        while another run holds it, unless ``take_over`` (that run is then fenced at its next commit)."""
        beat = cls(loc, beat_s)
        beat._take(take_over)
        beat._thread.start()
        return beat

    def __enter__(self) -> "Heartbeat":
        return self

    def __exit__(self, kind, err, tb) -> None:
        if err is None:
            self.finish(SUCCEEDED)
        elif isinstance(err, KeyboardInterrupt):
            self.finish(INTERRUPTED, "interrupted (Ctrl-C)")
        else:
            self.finish(FAILED, _one_line(err))

    # -- what the driver reports ---------------------------------------------------------------------

    def phase(self, name: str, rows_total: int | None = None, shards_total: int | None = None) -> None:
        """The run moved to phase ``name`` (``preparing``, ``embedding``, ``indexing``); written at once."""
        with self._lock:
            self.record["phase"] = name
            self.record["ray_job"] = _ray_job()
            if rows_total is not None:
                self.record.update(rows_total=rows_total, rows_done=0, shards_total=shards_total, shards_done=0)
                self._window.clear()
        self._beat()

    def held(self, epoch: int | None) -> None:
        """The commit-log epoch this run claimed (shown in the record)."""
        with self._lock:
            self.record["epoch"] = epoch

    def check(self) -> None:
        """Beat now, and raise :class:`ConcurrentWriteError` if another run has taken the output over: a run
        checks before it claims the output, so a run taken over while it planned never claims it back."""
        if self._beat():
            return
        taker = f" ({holder(self.taken_over)})" if self.taken_over else ""
        raise ConcurrentWriteError(f"{self.loc.display(LIVE)}: another run took this output over{taker}; this run "
                                   "stops before claiming it (two jobs must not write the same output at once)")

    def committed(self, rows: int, shards: int = 1) -> None:
        """``rows`` more input rows (embedded or dead-lettered) in ``shards`` more committed shards."""
        now = time.monotonic()
        with self._lock:
            r = self.record
            r["rows_done"] += rows
            r["shards_done"] += shards
            r["last_commit_at"] = _iso(time.time())
            self._window.append((now, r["rows_done"]))
            while len(self._window) > 2 and now - self._window[1][0] >= RATE_WINDOW_S:
                self._window.popleft()

    def finish(self, outcome: str, error: str | None = None) -> None:
        """Stop beating and mark the record final (SUCCEEDED, FAILED with ``error``, INTERRUPTED), unless
        another run took it over. Idempotent; a failed write is logged, never raised over the run's own
        outcome."""
        if self._stop.is_set():
            return
        self._stop.set()
        if self._thread.is_alive() and self._thread is not threading.current_thread():
            self._thread.join(timeout=max(5.0, 2 * self.beat_s))
        with self._lock:
            self.record.update(state=outcome.lower(), final=True, phase="done", finished_at=_iso(time.time()),
                               error=error, eta_seconds=None)
        try:
            with self._io:
                self._write_if_mine()
        except _TakenOver:
            pass  # the run that took over owns the record now
        except (OSError, ReembedError) as e:
            log.warning("%s: could not record how this run ended (%s)", self.loc.display(LIVE), _one_line(e))
            self._drop_if_mine()

    # -- internals ------------------------------------------------------------------------------------

    def _loop(self) -> None:
        while not self._stop.wait(self.beat_s):
            if not self._beat():
                return

    def _beat(self) -> bool:
        """Write the record once; False once another run has taken it over."""
        if self.taken_over is not None:
            return False
        try:
            with self._io:
                self._write_if_mine()
        except _TakenOver as e:
            self.taken_over = e.record
            log.warning("%s: another run took this output over (%s); this run stops at its next commit",
                        self.loc.display(LIVE), holder(e.record) if e.record else "its record is gone")
            return False
        except (OSError, ReembedError) as e:
            self._failed_writes += 1
            if self._failed_writes in (1, 10) or self._failed_writes % 100 == 0:
                log.warning("%s: heartbeat not written (%s); the run goes on", self.loc.display(LIVE), _one_line(e))
            return True
        self._failed_writes = 0
        return True

    def _snapshot(self) -> bytes:
        with self._lock:
            r = self.record
            now = time.time()
            r["last_beat"] = _iso(now)
            rate = self._rate(time.monotonic())
            r["rows_per_second"] = None if rate is None else round(rate, 1)
            left = (r["rows_total"] or 0) - r["rows_done"]
            known = rate and r["rows_total"] is not None and not r["final"]
            r["eta_seconds"] = round(left / rate, 1) if known else None
            return json.dumps(r, separators=(",", ":")).encode()

    def _rate(self, now: float) -> float | None:
        """Rows/s between the first commit of the window and now (None before two commits)."""
        if len(self._window) < 2:
            return None
        t0, rows0 = self._window[0]
        rows = self._window[-1][1]
        return (rows - rows0) / (now - t0) if now > t0 and rows > rows0 else None

    def _take(self, take_over: bool) -> None:
        for _ in range(3):
            with _output_lock(self.loc):
                current, version = _read(self.loc)
                if current is not None and current.get("run_id") != self.record["run_id"] and \
                        state(current, complete=False) == RUNNING:
                    if not take_over:
                        raise _live_error(self.loc, current)
                    log.warning("%s: taking over from the live run (%s); it stops at its next commit",
                                self.loc.display(LIVE), holder(current))
                try:
                    self._write(version)  # S3: over exactly what was read
                    return
                except VersionConflict:
                    continue  # someone else wrote it meanwhile: look again
                except OSError as e:  # a full or read-only disk: one line, before any work is done
                    from reembed.manifest import write_failed

                    raise write_failed(e, self.loc.display(LIVE)) from e
        raise LiveRunError(f"{self.loc.display(LIVE)}: the live record keeps changing under this run: another run "
                           "is starting on this output at the same moment; wait for it, or use --take-over")

    def _write_if_mine(self) -> None:
        with _output_lock(self.loc):
            if self.loc.conditional_writes:
                try:
                    self._write(self._version)
                    return
                except VersionConflict:
                    raise _TakenOver(read(self.loc)) from None
            current = read(self.loc)
            if current is None or current.get("run_id") != self.record["run_id"]:
                raise _TakenOver(current)
            self._write(None)

    def _drop_if_mine(self) -> None:
        """The final record could not be written (a full disk, say): take ours away, which needs no space, so
        the output does not read as live after this run has ended (no record reads as no live run)."""
        try:
            with self._io, _output_lock(self.loc):
                current = read(self.loc)
                if current is not None and current.get("run_id") == self.record["run_id"]:
                    self.loc.delete(LIVE)
        except (OSError, ReembedError) as e:
            log.warning("%s: could not remove this ended run's record either (%s); the next run may need "
                        "--take-over", self.loc.display(LIVE), _one_line(e))

    def _write(self, version: str | None) -> None:
        """Write the record: on S3 only over the object at ``version`` (None: only if there is none);
        elsewhere the caller holds the output's lock, or it is best effort."""
        body = self._snapshot()
        if self.loc.conditional_writes:
            self._version = self.loc.write_if(body, LIVE, version=version)
        else:
            self.loc.write_bytes(body, LIVE)


class Progress:
    """A progress bar (tqdm) that also reports to the heartbeat: the commit loop calls ``update(rows)``
    once per committed shard."""

    def __init__(self, bar: Any, beat: Heartbeat):
        self.bar = bar
        self.beat = beat

    def update(self, rows: int) -> None:
        self.bar.update(rows)
        self.beat.committed(rows)

    def close(self) -> None:
        self.bar.close()


class _TakenOver(Exception):
    def __init__(self, record: dict[str, Any] | None):
        super().__init__("taken over")
        self.record = record


def _read(loc: Location) -> tuple[dict[str, Any] | None, str | None]:
    """(record, S3 ETag) of the output's live record; (None, None) if there is none, (None, ETag) if it cannot
    be read as one (a warning: it is then treated as absent, so it never blocks a run)."""
    try:
        if loc.conditional_writes:
            got = loc.read_versioned(LIVE)
            if got is None:
                return None, None
            raw, version = got
        else:
            raw, version = loc.read_bytes(LIVE), None
    except FileNotFoundError:
        return None, None
    except OSError as e:
        raise storage.explain(e, loc.display(LIVE), "read", loc.settings) from e
    try:
        record = json.loads(raw)
        if not isinstance(record, dict) or record.get("format") != FORMAT or not record.get("run_id"):
            raise ValueError("not a live record of this reembed version")
        _unix(record.get("last_beat"))
    except ValueError as e:
        log.warning("%s: ignored (%s)", loc.display(LIVE), e)
        return None, version
    return record, version


def _output_lock(loc: Location):
    """The output's advisory lock on a local disk (shared with manifest.json saves); nothing elsewhere."""
    from reembed.manifest import _lock

    return _lock(loc)


def _on_this_host(record: dict[str, Any]) -> bool:
    if record.get("host") != socket.gethostname():
        return False
    # Same name, same kernel and same pid namespace (a container sharing the host's name and network has
    # its own pids): only then is the pid this machine's to look up.
    for key, mine in (("boot_id", _boot_id()), ("pid_ns", _pid_ns())):
        if mine != record.get(key):
            return False
    return True


def _process_alive(pid: Any, started: Any) -> bool:
    """Whether process ``pid`` runs and is the one that started at ``started`` (not a reused pid)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    now_start = _process_start(pid)
    if now_start is not None:
        return started is None or now_start == started
    if os.path.isdir("/proc"):
        return False  # no /proc/<pid>: gone (or a zombie)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _process_start(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (Linux ``/proc/<pid>/stat``); None if it is gone,
    a zombie, or there is no /proc."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
    except OSError:
        return None
    fields = stat[stat.rfind(")") + 2:].split()  # after "pid (comm) ": state is field 3, starttime field 22
    if not fields or fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def _boot_id() -> str | None:
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return f.read().strip() or None
    except OSError:
        return None


def _pid_ns() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _ray_job() -> str | None:
    """The Ray job this driver runs as: the submission id ``ray job status`` takes, else Ray's job id."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    if raw:
        try:
            sub = (json.loads(raw).get("metadata") or {}).get("job_submission_id")
        except (ValueError, AttributeError):
            sub = None
        if sub:
            return str(sub)
    ray = sys.modules.get("ray")
    if ray is not None and getattr(ray, "is_initialized", lambda: False)():
        try:
            return ray.get_runtime_context().get_job_id()
        except Exception as e:  # noqa: BLE001 - the job id is a courtesy; the record is written without it
            log.debug("no Ray job id: %s", e)
    return None


def _iso(t: float) -> str:
    return dt.datetime.fromtimestamp(t, dt.timezone.utc).isoformat(timespec="milliseconds")


def _unix(iso: Any) -> float:
    if iso is None:
        return 0.0
    if not isinstance(iso, str):
        raise ValueError(f"last_beat {iso!r} is not a time")
    return dt.datetime.fromisoformat(iso).timestamp()


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) <= 500 else text[:500] + " ..."
