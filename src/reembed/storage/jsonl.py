"""The one JSON Lines reader for small files read whole (queries, pairs, docstores, export parts)."""

from __future__ import annotations


def json_lines(data: bytes, where: str, error: type[Exception] = ValueError):
    """Yield (line number, object) for each non-blank line of a JSON Lines file (gzip when ``where``
    ends in .gz). A line that is not a JSON object raises ``error`` naming ``where:line``."""
    import gzip
    import json

    if where.endswith(".gz"):
        data = gzip.decompress(data)
    for n, line in enumerate(data.decode().splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except ValueError as e:
            raise error(f"{where}:{n}: not valid JSON ({e})") from e
        if not isinstance(obj, dict):
            raise error(f"{where}:{n}: expected a JSON object per line")
        yield n, obj
