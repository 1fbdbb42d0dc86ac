"""A real local filesystem that counts what is opened and read: pyarrow's PyFileSystem over fsspec's local
filesystem, each opened file wrapped to count its bytes. For tests that must prove an access pattern
(a footer-only read, a gzip file decompressed once, a plan shard reading a few KB)."""

from __future__ import annotations

from collections import Counter

import pyarrow as pa
import pyarrow.fs as pafs


class _CountingFile:
    def __init__(self, f, path: str, counts: "CountingFS") -> None:
        self._f, self._path, self._counts = f, path, counts

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self._counts.bytes_read[self._path] += len(data)
        return data

    def readinto(self, buf) -> int:
        n = self._f.readinto(buf)
        self._counts.bytes_read[self._path] += n or 0
        return n

    def __getattr__(self, name):
        return getattr(self._f, name)


class _Handler(pafs.FSSpecHandler):
    def __init__(self, counts: "CountingFS") -> None:
        import fsspec

        super().__init__(fsspec.filesystem("file"))
        self._counts = counts

    def _open(self, path: str):
        self._counts.opens[path] += 1
        return pa.PythonFile(_CountingFile(self.fs.open(path, mode="rb"), path, self._counts), mode="r")

    def open_input_stream(self, path):
        return self._open(path)

    def open_input_file(self, path):
        return self._open(path)


class CountingFS:
    """``fs`` is a pyarrow FileSystem; ``opens`` and ``bytes_read`` are keyed by path."""

    def __init__(self) -> None:
        self.opens: Counter[str] = Counter()
        self.bytes_read: Counter[str] = Counter()
        self.fs = pafs.PyFileSystem(_Handler(self))

    def reset(self) -> None:
        self.opens.clear()
        self.bytes_read.clear()


def counting_location(root) -> tuple["CountingFS", object]:
    """A :class:`reembed.storage.Location` on ``root`` whose filesystem counts opens and bytes."""
    from reembed.storage import Location

    counts = CountingFS()
    return counts, Location(counts.fs, str(root), str(root))
