"""Moving an alias between collection versions: ``swap`` (gated) and ``rollback``.

Where the Qdrant server is: ``qdrant`` (a URL or embedded folder the caller names), else the target the
output's manifest records, else ``QDRANT_URL``. The API key goes only to a server the user named
(``qdrant``, or ``QDRANT_URL``): a target read from a manifest gets it only when it is the server
``QDRANT_URL`` names (see :func:`reembed.indexes.qdrant.connect`).
"""

from __future__ import annotations

import os
from typing import Any

from reembed.config import ConfigError
from reembed.indexes import build as stage
from reembed.indexes import qdrant as Q
from reembed.manifest import Manifest, ManifestError
from reembed.storage import Location
from reembed.validation import check_validation

URL_ENV = "QDRANT_URL"


def swap(alias: str, to: str, qdrant: str | None = None, output: str | Location | None = None,
         dimension: int | None = None, force: bool = False) -> dict[str, Any]:
    """Point ``alias`` at collection ``to`` in one atomic call, keeping the old collection.

    Refused (:class:`SwapRefused`, nothing changed) unless ``to`` finished loading, holds the manifest's row
    count and the query model's dimension (``dimension``, default the output's), and - unless ``force`` -
    the output's latest validation report passed. ``output`` defaults to the one recorded with ``to``.
    """
    manifest = open_manifest(output) if output is not None else None
    target, named = target_of(qdrant_target(qdrant), manifest, required=True)
    client = Q.connect(target, named_by_user=named)
    try:
        if manifest is None:  # the manifest of the output the collection was built from
            if to not in Q.collections(client):
                raise Q.SwapRefused(f"no collection {to!r} at {Q.describe(target)}")
            meta = Q.metadata(client, to).get(Q.META)
            if not meta or not meta.get("output"):
                raise Q.SwapRefused(f"{to}: no output recorded with this collection; pass --output to give the "
                                    "manifest its point count is checked against")
            recorded = str(meta["output"])
            if "://" in recorded:  # a URI read from the store must not receive this machine's credentials
                raise Q.SwapRefused(f"{to}: the collection names its output as {recorded!r}; a remote output read "
                                    "from the store is not followed: pass --output to name it yourself")
            manifest = open_manifest(recorded)
        if alias in Q.collections(client):  # checked first: the app's own collection, the common first try
            raise Q.SwapRefused(f"{alias!r} at {Q.describe(target)} is a collection, not an alias, and a Qdrant alias "
                                f"cannot shadow a collection; adopt it first: `reembed adopt --store "
                                f"\"qdrant://...?collection={alias}\"` (or let `reembed migrate` do it)")
        if not force:
            ok, why = check_validation(manifest.loc)
            if not ok:
                raise Q.SwapRefused(f"validation gate: {why}")
        dim = dimension if dimension is not None else int(manifest.model["dimension"])
        result = Q.swap(client, alias, to, rows=stage.rows_of(manifest), dim=dim,
                        fingerprint=manifest.model.get("fingerprint"))
        return with_query_model(client, result)
    finally:
        client.close()


def rollback(alias: str, qdrant: str | None = None, output: str | Location | None = None) -> dict[str, Any]:
    """Point ``alias`` back at the collection it left in the last swap."""
    manifest = open_manifest(output) if output is not None else None
    target, named = target_of(qdrant_target(qdrant), manifest, required=True)
    client = Q.connect(target, named_by_user=named)
    try:
        return with_query_model(client, Q.rollback(client, alias))
    finally:
        client.close()


def with_query_model(client, result: dict[str, Any]) -> dict[str, Any]:
    """``result`` of a swap or rollback with the model the alias's users must now embed queries with, as
    the collection it points at records it (``model``, ``revision``, ``dimension``): a 384-d app querying a
    768-d collection fails, so the caller says it."""
    meta = Q.metadata(client, result["to"]).get(Q.META) or {}
    return {**result, "model": meta.get("model"), "revision": meta.get("revision"),
            "dimension": Q.dimension(client, result["to"])}


def qdrant_target(value: str | None) -> str | None:
    """A ``--qdrant`` value as :func:`reembed.indexes.qdrant.connect` takes it: a server URL or a folder as
    given, and a store URI (``qdrant:///path?collection=...``, ``qdrant://host:6333``) turned into one, so
    every command takes the same store syntax."""
    if not value or not value.startswith(("qdrant://", "qdrants://")):
        return value
    from reembed.migrate.stores.base import parse_uri
    from reembed.migrate.stores.qdrant import target_of_uri

    return target_of_uri(parse_uri(value))


def collection_of(value: str | None) -> str | None:
    """The ``collection=`` of a store URI, else None."""
    if not value or "://" not in value or "?" not in value:
        return None
    from urllib.parse import parse_qsl, urlsplit

    return dict(parse_qsl(urlsplit(value).query)).get("collection") or None


def target_of(qdrant: str | None, manifest: Manifest | None, required: bool) -> tuple[str | None, bool]:
    """(target, named by the user): ``qdrant``, else the manifest's recorded target, else QDRANT_URL."""
    if qdrant:
        return qdrant, True
    env = os.environ.get(URL_ENV) or None
    if manifest is not None:
        rec = stage.state_of(manifest).get("qdrant")
        if rec and rec.get("target"):
            target = rec["target"]
            return target, bool(env) and Q.describe(env) == Q.describe(target)
    if env:
        return env, True
    if required:
        raise ConfigError("--qdrant URL_OR_PATH is required (or --output of a job whose manifest records a Qdrant "
                          "target, or QDRANT_URL)")
    return None, False


def open_manifest(output: str | Location) -> Manifest:
    loc = output if isinstance(output, Location) else Location.from_uri(output)
    m = Manifest.load(loc)
    if m is None:
        raise ManifestError(f"{loc.uri}: no manifest.json here (not a reembed output)")
    return m
