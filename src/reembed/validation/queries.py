"""The validation gate's text inputs: the built-in sanity pairs, ``--pairs`` files and labelled queries."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from reembed.errors import ValidationError
from reembed.storage import Location, json_lines

# Pairs whose meaning every sentence embedding model should get right. all-MiniLM-L6-v2 scores the
# paraphrases 0.7-0.97 and the unrelated pairs -0.07-0.11.
PARAPHRASES = [
    ("How do I reset my password?", "What are the steps to change a forgotten password?"),
    ("The cat is sleeping on the sofa.", "A cat is asleep on the couch."),
    ("The meeting has been moved to Friday.", "The meeting was rescheduled for Friday."),
    ("Where is the nearest train station?", "How do I get to the closest railway station?"),
    ("The price of petrol went up again this week.", "Gas prices rose once more this week."),
    ("She bought a new laptop for work.", "She purchased a new notebook computer for her job."),
    ("The film was boring and far too long.", "The movie was dull and much too long."),
    ("Turn off the lights when you leave the room.", "Switch the lights off when you go out of the room."),
    ("The company reported record profits this year.", "This year the company announced record profits."),
    ("Drink plenty of water when it is hot outside.", "Stay hydrated in hot weather by drinking lots of water."),
    ("The children played football in the park.", "The kids were playing soccer in the park."),
    ("How long does it take to boil an egg?", "How many minutes should an egg be boiled?"),
]
UNRELATED = [
    ("How do I reset my password?", "Penguins live in the southern hemisphere."),
    ("The cat is sleeping on the sofa.", "Interest rates rose by half a percent."),
    ("The meeting has been moved to Friday.", "Volcanoes erupt when magma reaches the surface."),
    ("Where is the nearest train station?", "Photosynthesis converts light into chemical energy."),
    ("The price of petrol went up again this week.", "She plays the violin in a string quartet."),
    ("She bought a new laptop for work.", "The recipe needs two cups of flour."),
    ("The film was boring and far too long.", "Mount Everest is the highest mountain on Earth."),
    ("Turn off the lights when you leave the room.", "The treaty was signed in 1648."),
    ("The company reported record profits this year.", "Frogs lay their eggs in ponds."),
    ("Drink plenty of water when it is hot outside.", "The compiler reported a syntax error."),
    ("The children played football in the park.", "Quantum computers use qubits."),
    ("How long does it take to boil an egg?", "The museum is closed on Mondays."),
]


@dataclass
class Pair:
    a: str
    b: str
    label: str  # "paraphrase" | "unrelated"
    threshold: float | None = None
    source: str = "built-in"


@dataclass
class LabelledQuery:
    query: str
    relevant: dict[str, float]  # id -> graded relevance (> 0)


def builtin_pairs() -> list[Pair]:
    return ([Pair(a, b, "paraphrase") for a, b in PARAPHRASES] + [Pair(a, b, "unrelated") for a, b in UNRELATED])


def load_pairs(path: str) -> list[Pair]:
    """JSON Lines: ``{"a": ..., "b": ..., "label": "paraphrase"|"unrelated", "threshold": optional}``."""
    out = []
    for n, obj in _jsonl(path):
        a, b, label = obj.get("a"), obj.get("b"), obj.get("label")
        if not isinstance(a, str) or not isinstance(b, str) or label not in ("paraphrase", "unrelated"):
            raise ValidationError(f"{path}:{n}: expected {{\"a\": text, \"b\": text, \"label\": \"paraphrase\"|\"unrelated\"}}")
        th = obj.get("threshold")
        if th is not None and not isinstance(th, (int, float)):
            raise ValidationError(f"{path}:{n}: threshold must be a number, got {th!r}")
        out.append(Pair(a, b, label, None if th is None else float(th), source=f"{Path(path).name}:{n}"))
    return out


def load_queries(path: str) -> list[LabelledQuery]:
    """JSON Lines: ``{"query": text, "relevant": [id, ...]}`` or ``{"query": ..., "relevant": {id: grade}}``."""
    out = []
    for n, obj in _jsonl(path):
        q, rel = obj.get("query"), obj.get("relevant")
        if not isinstance(q, str) or not q.strip():
            raise ValidationError(f"{path}:{n}: \"query\" must be a non-empty string")
        if isinstance(rel, list) and rel and all(isinstance(r, (str, int)) for r in rel):
            grades = {str(r): 1.0 for r in rel}
        elif isinstance(rel, dict) and rel and all(isinstance(g, (int, float)) for g in rel.values()):
            grades = {str(r): float(g) for r, g in rel.items()}
        else:
            raise ValidationError(f"{path}:{n}: \"relevant\" must be a non-empty list of ids or an {{id: grade}} object")
        out.append(LabelledQuery(q, grades))
    if not out:
        raise ValidationError(f"{path}: no queries")
    return out


def _jsonl(path: str) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        data = Location.from_uri(path).read_bytes()
    except FileNotFoundError as e:
        raise ValidationError(f"{path}: no such file") from e
    return json_lines(data, path, ValidationError)


# ---------------------------------------------------------------------------------------------------
# Labels that name the app's own ids


POINT_ID_FIELDS = ("point_id", "_point_id")  # --label-id-field for labels naming the store's point ids


def relabel(labelled: list[LabelledQuery], loc: Location, field: str, workers: int | None = 0,
            ray_address: str | None = None) -> list[LabelledQuery]:
    """``labelled`` with each relevant id rewritten from the app's own id (``field`` of each output row: a
    passthrough column, ``metadata.doc_id`` inside a nested or JSON column or the exported ``_payload``, or
    ``point_id`` for the store's point ids) to the output's id. An app id several rows share (the chunks of
    one document) makes all of them relevant; an id no row has stays as it is, so the A/B gate counts it
    as not found. Reads the shards once, holding only the labelled ids: in Ray tasks (``workers`` at once,
    None: every CPU Ray has), or with ``workers=0`` in this process, one shard at a time."""
    wanted = {r for q in labelled for r in q.relevant}
    found = ids_by_field(loc, field, wanted, workers, ray_address)
    out = []
    for q in labelled:
        grades: dict[str, float] = {}
        for app_id, grade in q.relevant.items():
            for out_id in found.get(app_id, [app_id]):
                grades[out_id] = max(grade, grades.get(out_id, 0.0))
        out.append(LabelledQuery(q.query, grades))
    return out


def ids_by_field(loc: Location, field: str, wanted: set[str], workers: int | None = 0,
                 ray_address: str | None = None) -> dict[str, list[str]]:
    """app id -> output ids (in shard order), for the app ids in ``wanted``, reading ``field`` from the
    committed shards: tasks of :func:`reembed.repair.map_shards`, each reading its own shards' records from
    the commit log, so no record and no row passes through this process."""
    from reembed.manifest import Manifest
    from reembed.repair import map_shards

    manifest = Manifest.load(loc)
    if manifest is None:
        raise ValidationError(f"{loc.display('manifest.json')}: no manifest here; validate a reembed output")
    columns = list(manifest.plan.get("passthrough", []))
    source = _field_source(field, columns)
    if source is None:
        raise ValidationError(f"--label-id-field {field}: the output has no such field (its columns: id, "
                              f"{', '.join(columns) or 'no passthrough'}); pass the column through the job "
                              "(--passthrough) or name one it has, e.g. metadata.doc_id with _payload passed through")
    refs = manifest.refs()
    parts = map_shards(_ids_batch, loc, refs, source, frozenset(wanted), total=len(refs), workers=workers,
                       ray_address=ray_address)
    out: dict[str, list[str]] = {}
    for _, pairs in sorted(parts, key=lambda p: p[0]):  # shard order, whatever order the tasks ended in
        for app_id, doc_id in pairs:
            out.setdefault(app_id, []).append(doc_id)
    return out


def _ids_batch(loc: Location, batch: Any, source: tuple[str, list[str]], wanted: frozenset
               ) -> tuple[int, list[tuple[str, str]]]:
    """A task: ``(first shard, [(app id, output id), ...])`` of the rows of ``batch`` whose field is wanted."""
    from reembed.manifest import commits_of
    from reembed.write import read_shard_table

    first, pairs = None, []
    for shard, _, rec in commits_of(loc, batch):
        first = shard if first is None else first
        table = read_shard_table(loc, rec, columns=["id", source[0]], verify=True, key=f"shards.{shard:05d}")
        for doc_id, value in zip(table.column("id").to_pylist(), table.column(source[0]).to_pylist()):
            app_id = _walk(value, source[1])
            if app_id is not None and str(app_id) in wanted:
                pairs.append((str(app_id), str(doc_id)))
    return (first if first is not None else -1), pairs


def _field_source(field: str, columns: list[str]) -> tuple[str, list[str]] | None:
    """(column, path inside it) where ``field`` lives."""
    if field in POINT_ID_FIELDS:
        return ("_point_id", []) if "_point_id" in columns else None
    if field in columns:
        return field, []
    head, _, rest = field.partition(".")
    if rest and head in columns:
        return head, rest.split(".")
    if "_payload" in columns:
        return "_payload", field.split(".")
    return None


def _walk(value: Any, path: list[str]) -> Any:
    import json

    for key in path:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return None
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value
