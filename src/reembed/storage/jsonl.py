"""The one JSON Lines reader for small files read whole (queries, pairs, docstores, export parts)."""

from __future__ import annotations

import gzip
import json
from typing import Iterator

GZIP_MAGIC = b"\x1f\x8b"


def json_lines(data: bytes, where: str, error: type[Exception] = ValueError) -> Iterator[tuple[int, dict]]:
    """Yield (line number, object) for each non-blank line of a JSON Lines file. Gzip is recognised by its
    magic bytes, not the name: pyarrow's ``open_input_stream`` (so ``Location.read_bytes``) already
    decompresses a ``.gz`` file, and those bytes must not be decompressed twice. A line that is not a JSON
    object, or bytes that are not UTF-8, raise ``error`` naming ``where:line``."""
    if data[:2] == GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError) as e:
            raise error(f"{where}: not a readable gzip file ({e})") from e
    for n, raw in enumerate(data.splitlines(), 1):
        if not raw.strip():
            continue
        try:
            obj = json.loads(raw)
        except UnicodeDecodeError as e:
            raise error(f"{where}:{n}: not UTF-8 text ({e.reason} at byte {e.start})") from e
        except ValueError as e:
            raise error(f"{where}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise error(f"{where}:{n}: expected a JSON object per line")
        yield n, obj
