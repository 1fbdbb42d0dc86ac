"""Old name of :mod:`reembed.migrate`'s export side, kept only for modules that still import it
(``reembed.validate``); new code imports from :mod:`reembed.migrate`. Delete once nothing does."""

from __future__ import annotations

from typing import Iterator

from reembed.errors import ExportError  # noqa: F401 (re-exported)
from reembed.migrate.export import EXPORT_META, PartWriter, export  # noqa: F401 (re-exported)
from reembed.migrate.stores import STORES, Batch, StoreURI, is_store_uri  # noqa: F401 (re-exported)
from reembed.migrate.stores import parse_uri as parse_source  # noqa: F401 (re-exported)
from reembed.migrate.stores.base import OLD_EMBEDDING, TEXT  # noqa: F401 (re-exported)


def iter_batches(uri: str | StoreURI, page_size: int = 1000) -> Iterator[Batch]:
    """Every document of a store, one page at a time (the store is closed when the pages run out)."""
    src = uri if isinstance(uri, StoreURI) else parse_source(uri)
    with STORES[src.kind].from_uri(src) as store:
        yield from store.batches(page_size)
