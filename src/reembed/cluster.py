"""Connecting to Ray: the one ``init_ray`` every stage calls (the embedding run, the index builds), and
what Ray may print on this process's console.

A node that does not come up, or a cluster that cannot be reached, is a one-line :class:`RayStartError`
saying what to do, not Ray's traceback.

Ray's console output stays off unless the user asks for it (``reembed -v``, :func:`configure_console`):
Ray Data's progress bars and progress log blocks, its INFO lines, the token-auth notice of a fresh local
Ray, Hugging Face's "Loading weights" bars in the driver and in a local Ray's workers, and the one known
harmless ``E core_worker`` line Ray logs for every Ray Data actor (ray-project/ray#57733). Warnings and
errors from Ray and from reembed's own actors still show; everything still goes to Ray's session logs.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from typing import Any, Callable, Iterable

from reembed.errors import ReembedError

log = logging.getLogger(__name__)

# Ray's C++ core worker logs this at ERROR for every Ray Data actor (its constructor gets Ray Data's context
# by reference, ray-project/ray#57733): nothing is wrong, and Ray has no setting that turns it off.
HARMLESS_RAY_LINES = (
    re.compile(r"^\[[^\]]*\bE\b[^\]]*\] core_worker\.cc:\d+: Actor with class name: .* has constructor arguments "
               r"in the object store and max_restarts > 0"),
)
TOKEN_AUTH_LOGGER = "ray._private.authentication.authentication_token_setup"
# Ray Data logs these because reembed turned its progress bars off on purpose.
HARMLESS_RAY_DATA_MESSAGES = ("Progress bars disabled", "Progress bars for operators disabled")

_console = {"ray_verbose": False, "filter_stderr": False}
HOLD_S = 0.5  # how long the stderr filter holds the start of a line that may be one of HARMLESS_RAY_LINES

# Ray waits this long for a freshly started local node to register (ray/_private/node.py, not configurable).
NODE_START_TIMEOUT_S = 30
LOCAL_START_RETRIES = 1  # further tries of a local start that missed that limit


class RayStartError(ReembedError):
    """Ray could not be started or reached; the message says what to do."""


def init_ray(address: str | None) -> None:
    """Connect to a cluster (``address``, or ``RAY_ADDRESS`` as set by ``ray job submit``) or start a local Ray."""
    import ray

    if ray.is_initialized():
        return
    address = address or os.environ.get("RAY_ADDRESS")
    level = logging.INFO if _console["ray_verbose"] else logging.WARNING
    log.info("starting Ray: %s", f"connecting to {address}" if address else "a local Ray on this machine")
    try:
        if address:
            ray.init(address=address, log_to_driver=True, logging_level=level)
        else:
            if not _console["ray_verbose"]:
                # A fresh local Ray turns token auth on and says so, inviting the user to switch it off.
                logging.getLogger(TOKEN_AUTH_LOGGER).addFilter(_drop_token_auth_notice)
            _start_local(ray, level)
    except Exception as e:  # whatever stopped Ray from starting, the user gets one line and the next step
        _shutdown_quietly(ray)
        raise start_failed(e, address) from e
    if _console["filter_stderr"]:
        _StderrFilter.install(HARMLESS_RAY_LINES)


def configure_console(verbose: int) -> None:
    """What Ray and Hugging Face may print on this process's console, from the CLI's ``-v``/``-q``; call it
    before anything imports transformers or starts Ray. At ``-v`` Ray's output is left as Ray makes it.

    Sets (unless already set) environment variables that this process and a local Ray's workers read at
    start: ``HF_HUB_DISABLE_PROGRESS_BARS`` (transformers' "Loading weights" bars) and, when stderr is not
    a terminal, ``RAY_COLOR_PREFIX=0`` (no ANSI colour around the worker prefix of forwarded log lines).
    """
    _console["ray_verbose"] = verbose > 0
    _console["filter_stderr"] = verbose <= 0
    if verbose <= 0:
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if not _isatty(sys.stderr):
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")


def ray_data_console() -> int:
    """Quiet Ray Data in this driver unless the console is verbose, and return the lowest level its console
    handler should pass: its progress bars and progress log blocks off, and its INFO lines (the execution
    plan, "Starting execution ...") only at ``-v``. Call it before a dataset runs."""
    from ray.data import DataContext

    ctx = DataContext.get_current()
    verbose = _console["ray_verbose"]
    ctx.enable_progress_bars = verbose
    ctx.enable_operator_progress_bars = verbose
    return logging.INFO if verbose else logging.WARNING


def harmless_ray_data_record(record: logging.LogRecord) -> bool:
    """A Ray Data log record that only reports what reembed chose (its progress bars are off)."""
    return not _console["ray_verbose"] and str(record.msg).startswith(HARMLESS_RAY_DATA_MESSAGES)


def start_failed(e: BaseException, address: str | None) -> RayStartError:
    """The one-line error for a failed ``ray.init``: what happened and what to do."""
    detail = " ".join(str(e).split())[:300] or type(e).__name__
    if "timed out during startup" in detail:
        return RayStartError(
            f"Ray's local node did not start within its {NODE_START_TIMEOUT_S} s limit (the machine is "
            f"overloaded, or a Ray process failed: see {_session_logs()}); free CPUs and memory, stop "
            "stale Ray processes (`ray stop`), or run on a started cluster with --address / RAY_ADDRESS, then rerun"
        )
    if address:
        return RayStartError(
            f"cannot connect to the Ray cluster at {address} ({detail}); check --address / RAY_ADDRESS and that "
            "the cluster's head is running, or leave both unset to start a local Ray"
        )
    return RayStartError(
        f"Ray did not start ({detail}); free CPUs, memory and /tmp space, stop stale Ray processes (`ray stop`), "
        "or run on a started cluster with --address / RAY_ADDRESS, then rerun"
    )


def _start_local(ray, level: int) -> None:
    """A fresh local Ray (``address="local"``: never some other cluster found on this machine). On a busy
    machine its node may miss Ray's fixed start-up limit once: that start is cleaned up and tried again."""
    for attempt in range(1 + LOCAL_START_RETRIES):
        try:
            ray.init(address="local", include_dashboard=False, log_to_driver=True, logging_level=level)
            return
        except Exception as e:
            if attempt == LOCAL_START_RETRIES or "timed out during startup" not in str(e):
                _shutdown_quietly(ray)  # the node processes a failed start left behind must not outlive it
                raise
            log.warning("Ray's local node did not start within %d s (a busy machine?); trying once more",
                        NODE_START_TIMEOUT_S)
            _shutdown_quietly(ray)


def _drop_token_auth_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Token authentication is enabled for this Ray cluster")


def _session_logs() -> str:
    """Where a local Ray keeps the logs of its latest session (``RAY_TMPDIR`` moves them)."""
    return os.path.join(os.environ.get("RAY_TMPDIR") or "/tmp", "ray", "session_latest", "logs")


def _shutdown_quietly(ray) -> None:
    """Stop what a failed start left running, so a retry in this process begins clean."""
    try:
        ray.shutdown()
    except Exception as e:  # nothing more to do: the start already failed
        log.debug("ray.shutdown after a failed start: %s", e)


def _file_id(fd: int) -> tuple[int, int] | None:
    try:
        st = os.fstat(fd)
    except OSError:
        return None
    return st.st_dev, st.st_ino


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False


class _StderrFilter:
    """Drops known harmless lines that Ray's C++ core worker writes straight to file descriptor 2 (no Python
    logger carries them) and passes every other byte through, in order. Installed once per process, after
    Ray has started its node processes (so none of them inherits the pipe); restored at exit."""

    _installed: "_StderrFilter | None" = None

    @classmethod
    def install(cls, patterns) -> None:
        if cls._installed is not None:
            return
        try:
            cls._installed = cls(patterns)
        except OSError as e:  # no fd 2 to filter (a daemon, a closed stderr): nothing to hide then
            log.debug("stderr filter not installed: %s", e)

    def __init__(self, patterns) -> None:
        self.patterns = patterns
        sys.stderr.flush()
        self.original = os.dup(2)
        read_end, write_end = os.pipe()
        os.dup2(write_end, 2)
        os.close(write_end)
        self.pipe_id = _file_id(2)
        self.reader = threading.Thread(target=self._pump, args=(read_end,), name="reembed-stderr-filter", daemon=True)
        self.reader.start()
        atexit.register(self.restore)

    def restore(self) -> None:
        """fd 2 back to the real stderr; the pump drains what is left in the pipe and stops."""
        try:
            sys.stderr.flush()
        except (OSError, ValueError):
            pass
        if _file_id(2) == self.pipe_id:  # not replaced meanwhile by someone else (a test harness's capture)
            os.dup2(self.original, 2)
        self.reader.join(timeout=2)
        type(self)._installed = None

    def _pump(self, read_end: int) -> None:
        import select

        pending = b""  # the start of a line that may still turn out harmless
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            while True:
                if pending and not select.select([read_end], [], [], HOLD_S)[0]:
                    self._write(pending)  # no more of it came: not one of Ray's log lines
                    pending = b""
                chunk = pipe.read(65536)
                if not chunk:
                    break
                lines = (pending + chunk).split(b"\n")
                pending = lines.pop()
                kept = [line for line in lines if not self._harmless(line)]
                if kept:
                    self._write(b"\n".join(kept) + b"\n")
                if pending and not pending.startswith(b"["):  # a progress bar's frame, a prompt: at once
                    self._write(pending)
                    pending = b""
        if pending and not self._harmless(pending):
            self._write(pending)

    def _harmless(self, line: bytes) -> bool:
        text = line.decode("utf-8", "replace")
        return any(p.search(text) for p in self.patterns)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.original, view):]


def get(refs: Any) -> Any:
    """``ray.get(refs)``, with a :class:`ReembedError` raised in a task coming out as itself (see
    :func:`surface`) instead of inside Ray's ``RayTaskError``; any other error is raised as Ray raised it."""
    import ray

    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        found = surface(e)
        if isinstance(found, ReembedError):
            raise found from None
        raise


def on_this_node(cls: type, args: tuple, batches: Iterable[Any], call: Callable[[Any, Any], Any],
                 num_cpus: float, ray_address: str | None) -> list[Any]:
    """Run ``cls(*args)`` as one Ray actor pinned to this node (for a store that allows one writing process
    and lives in a folder here: embedded Qdrant, a local Chroma folder), ``call(actor, batch)`` for each of
    ``batches`` in turn, then its ``close()``; the actor is killed whatever happens. Returns each call's
    small result."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    init_ray(ray_address)
    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    actor = ray.remote(cls).options(num_cpus=num_cpus, scheduling_strategy=here, max_restarts=0).remote(*args)
    try:
        results = [get(call(actor, batch)) for batch in batches]
        get(actor.close.remote())
    finally:
        ray.kill(actor)
    return results


def worker_name() -> str:
    """``host:pid`` of this process: how a result or a marker names the worker that wrote it."""
    import socket

    return f"{socket.gethostname()}:{os.getpid()}"


def surface(e: BaseException) -> BaseException:
    """The :class:`ReembedError` behind Ray's wrappers, or ``e`` itself if there is none.

    Ray re-raises a task's exception as a ``RayTaskError`` (whose ``cause`` is the original, and which with
    ``as_instanceof_cause`` also *is* an instance of the original's class, with Ray's whole coloured
    traceback as its message); Ray Data chains its own exceptions on top. This walks ``cause`` /
    ``__cause__`` / ``__context__`` to the error the task raised, and returns it with ANSI escapes and
    any traceback text taken out of its message.
    """
    seen: set[int] = set()
    node: BaseException | None = e
    while node is not None and id(node) not in seen:
        seen.add(id(node))
        cause = getattr(node, "cause", None)
        if isinstance(node, ReembedError) and not isinstance(cause, BaseException):
            return _clean(node)
        node = cause if isinstance(cause, BaseException) else (node.__cause__ or node.__context__)
    return e


def _clean(e: ReembedError) -> ReembedError:
    # Our messages are one line; Ray Data appends lines of its own ("Failed to ... after 1/1 attempts").
    text = str(e)
    lines = [line.strip() for line in _ANSI.sub("", text).splitlines() if line.strip()]
    line = lines[0] if lines else ""
    if line == text or not line:
        return e
    try:
        clean = type(e)(line)
    except Exception:  # a class with another constructor: keep it as it is
        return e
    clean.__cause__ = e.__cause__
    return clean


_ANSI = re.compile(r"\x1b\[[0-9;?]*[ -/]*[@-~]")
