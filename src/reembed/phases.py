"""What a person reads while a run goes on. Where a run's time goes: the phases of ``reembed run`` (Ray start, model check, planning, actor start,
embedding, index, ...), each announced by a log line when it starts and timed, for the table the CLI
prints at the end and the ``phases`` list of the run's summary (``--json``).

A phase may run inside another (Ray starts inside planning on a new output): the inner phase's time is
its own, and the outer phase is charged only the rest, so the rows add up to the wall time. :class:`Progress` is reembed's own progress for a long phase, and
:func:`human_bytes` the one way byte counts are shown.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Iterator

log = logging.getLogger(__name__)


class Phases:
    """Seconds per phase, in the order the phases first started."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.seconds: dict[str, float] = {}
        self._inner: list[float] = []  # per open phase: seconds spent in phases inside it

    @contextlib.contextmanager
    def phase(self, name: str, doing: str | None = None) -> Iterator[None]:
        """Time the block as ``name``; log ``doing`` (what the phase does, for a person watching) first."""
        if doing:
            log.info("%s", doing)
        self.seconds.setdefault(name, 0.0)  # rows in the order the phases first started
        t0 = self.clock()
        self._inner.append(0.0)
        try:
            yield
        finally:
            spent = self.clock() - t0
            inner = self._inner.pop()
            self.add(name, spent - inner)
            if self._inner:
                self._inner[-1] += spent

    def add(self, name: str, seconds: float) -> None:
        """Charge ``seconds`` measured elsewhere (e.g. inside a loop) to ``name``, and to no open phase."""
        self.seconds[name] = self.seconds.get(name, 0.0) + max(0.0, seconds)

    def take(self, name: str, seconds: float) -> None:
        """Move ``seconds`` of the innermost open phase to ``name`` (a part of it measured from inside)."""
        self.add(name, seconds)
        if self._inner:
            self._inner[-1] += max(0.0, seconds)

    def as_list(self) -> list[dict[str, Any]]:
        """``[{"phase", "seconds", "share"}]``: the run summary's ``phases``."""
        total = sum(self.seconds.values())
        return [{"phase": name, "seconds": round(secs, 3), "share": round(secs / total, 4) if total else 0.0}
                for name, secs in self.seconds.items()]


class Progress:
    """reembed's own progress for a long phase: a bar on a terminal (stderr), and elsewhere (CI, a log file)
    a plain log line every :data:`LOG_EVERY_S` seconds, never ANSI codes or bar frames. Nothing at ``-q``."""

    LOG_EVERY_S = 30.0

    def __init__(self, total: int, desc: str, unit: str = "doc", clock=time.monotonic) -> None:
        self.total, self.desc, self.unit, self.clock = total, desc, unit, clock
        self.done = 0
        self.t0 = self.last_log = clock()
        self.first: tuple[float, int] | None = None  # (time, done) of the first update: the rate starts there
        shown = log.isEnabledFor(logging.INFO)
        self.bar = None
        if shown and _isatty(sys.stderr):
            from tqdm import tqdm

            self.bar = tqdm(total=total, unit=unit, desc=desc, smoothing=0.1, file=sys.stderr)
        self.log_lines = shown and self.bar is None

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
            return
        t = self.clock()
        if self.first is None:
            self.first = (t, self.done)
        if self.log_lines and t - self.last_log >= self.LOG_EVERY_S and self.done < self.total:
            self.last_log = t
            log.info("%s", self.line(t))

    def line(self, t: float | None = None) -> str:
        """``embedded: 1200/6000 docs (20%), 40.1 docs/s, about 2 min left``."""
        t = t if t is not None else self.clock()
        # After the first rows the rate is taken from there on: the wait for the first (actors starting,
        # the model loading) does not stretch the estimate of what is left.
        if self.first is not None and t > self.first[0] and self.done > self.first[1]:
            rate = (self.done - self.first[1]) / (t - self.first[0])
        else:
            rate = self.done / (t - self.t0) if t > self.t0 else 0.0
        share = f" ({self.done / self.total:.0%})" if self.total else ""
        left = f", about {human_seconds((self.total - self.done) / rate)} left" if rate > 0 and self.total else ""
        return f"{self.desc}: {self.done}/{self.total} {self.unit}s{share}, {rate:.1f} {self.unit}s/s{left}"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def human_bytes(n: float | None) -> str:
    """A byte count as a person reads it: ``512 B``, ``93.2 KiB``, ``1.4 GiB`` (binary units, as ``ls -h``)."""
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if abs(n) < 1024 or unit == "PiB":
            return f"{int(n)} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_seconds(seconds: float) -> str:
    """A duration as a person reads it: ``42 s``, ``3 min 20 s``, ``2 h 05 min``, ``3.5 days``."""
    s = int(round(seconds))
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min {s % 60:02d} s"
    if s < 3 * 86400:
        return f"{s // 3600} h {s % 3600 // 60:02d} min"
    return f"{seconds / 86400:.1f} days"


def _isatty(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):
        return False
