"""FAISS: one index over every committed shard, built by streaming the shards one at a time.

Inner product on L2-normalized vectors (cosine), so scores mean the same as in Qdrant. Index types:

* ``flat``  exact search (``IndexFlatIP``);
* ``hnsw``  ``HNSW{M}``, no training;
* ``ivf``   ``IVF{nlist},Flat``, or ``IVF{nlist},PQ{m}x{bits}`` re-ranked by a refine stage (``Refine(SQ8)``)
  when full vectors do not fit the memory budget (or ``pq=True``);
* ``auto``  picks one of those from the corpus size and the memory budget, as autofaiss does;
* ``sq8``   ``SQ8``: 8-bit scalar codes (a quarter of float32), searched exhaustively, trained on a sample;
* ``pq``    ``PQ{m}x{bits}``: product-quantizer codes of ``m`` bytes (a sixteenth of float32 or less),
  searched exhaustively, trained on a sample. Both are lossy by explicit choice only (``auto`` never picks
  them); ``reembed validate --quantization`` reports their bytes per vector and recall@10.

IVF indexes are trained on a uniform sample (one streaming pass), then every index is filled shard by shard.
After building, the search setting (``efSearch``, ``nprobe``, refine ``k_factor``) is tuned on sampled
vectors until recall@10 against exact search reaches the target, and stored in the index file, so a plain
``index.search`` uses it. The exact neighbours of the sampled queries are accumulated while the shards
stream past (:class:`reembed.indexes.exact.KnnHeap`, the same exact kNN the validation gate uses), never from
a second copy of the data.

Files: ``OUTPUT/indexes/faiss/index-vN.faiss`` and ``index-vN.ids.parquet`` (row i holds the document id
of vector i); an IVF index, built by many workers (:mod:`reembed.indexes.faiss_dist`), keeps its inverted
lists on disk in ``index-vN.ivfdata`` beside them, memory-mapped when searched. Their sha256 values, hashed
once when published, and a fingerprint (size, mtime, sha256 of the first and last MiB) go into the manifest;
every load and ``reembed index``'s up-to-date check compare the fingerprint (faiss's reader trusts its input,
and a corrupt file can crash the process instead of raising) and hash a file whole only when it differs,
or with ``reembed index --verify``. The id map is read by row group (:class:`IdMap`). Large files go to S3
as multipart uploads (:func:`publish_file`).
"""

from __future__ import annotations

import hashlib
import io
import logging
import math
import os
import posixpath
import re
import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from reembed.phases import human_bytes  # noqa: F401 (re-exported: build.py logs with it)
from reembed import schema as S
from reembed.errors import ChecksumError, ManifestError, StorageError
from reembed.indexes.exact import DEPTH, KnnHeap, normalize, recall
from reembed.manifest import inside_output
from reembed.storage import Location

log = logging.getLogger(__name__)

KINDS = ("auto", "flat", "ivf", "hnsw", "sq8", "pq")
SQ8_TRAIN = 65_536  # vectors an SQ8 codec's per-dimension ranges are trained on (at most)
PQ_TRAIN = 100_000  # vectors PQ's k-means is trained on (at most)
FOLDER = "indexes/faiss"
K = 10  # recall@K is what the search setting is tuned for
# what the tuned recall@10 is measured on (:func:`tuning_queries`), recorded in the build's params
TUNED_ON = "held-out sampled documents, half moved by their nearest-neighbour distance"
OFF_CORPUS = "Gaussian draws with the documents' mean and spread"  # what the recorded off-corpus recall is measured on
SATURATED = 0.01  # a widening step that raises the off-corpus queries' recall by less than this no longer helps them
IDS_ROW_GROUP = 65_536  # ids per row group of an id map: a lookup decodes ~1.3 MB per result row group
_EF_SEARCH = (16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048)
_NPROBE = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024, 2048, 4096, 8192)
# re-ranking depth: at 1M x 1024 (1,000 clusters of ~1,000) PQ64 candidates re-ranked 32 deep reached 0.73 of
# the exact top 10 at every list; within a cluster the neighbours sit at nearly equal distances
_K_FACTORS = (4, 8, 16, 32, 64, 128, 256)
_VERSION_RE = re.compile(r"^index-v(\d+)\.faiss$")


@dataclass(frozen=True)
class FaissPlan:
    """What to build: the faiss factory string and the numbers behind it."""

    kind: str  # flat | hnsw | ivf | sq8 | pq
    factory: str
    dim: int
    rows: int
    nlist: int = 0
    pq_m: int = 0
    pq_bits: int = 0
    refine: str = ""  # "" | "SQ8" | "Flat"
    hnsw_m: int = 0
    train_size: int = 0
    train_bytes: int = 0  # what training holds (sample, its copy, centroids): within the budget
    estimated_bytes: int = 0
    budget_bytes: int = 0
    reason: str = ""  # why this index: logged and recorded with the build
    refine_budget_bytes: int = 0  # PQ without re-ranking: the budget at which SQ8 re-ranking codes would fit

    @property
    def needs_training(self) -> bool:
        return self.kind in ("ivf", "sq8", "pq")


@dataclass
class FaissBuild:
    """A built index, its position -> document id map, and what was measured while building it."""

    index: Any
    ids: pa.ChunkedArray  # chunked: a single string array overflows past 2 GiB of ids
    params: dict[str, Any] = field(default_factory=dict)

    @property
    def ntotal(self) -> int:
        return int(self.index.ntotal)


# ---------------------------------------------------------------------------------------------------
# Choosing the index


def plan_index(rows: int, dim: int, kind: str = "auto", memory: str | int = "16G", pq: bool | None = None,
               hnsw_m: int = 32) -> FaissPlan:
    """Pick the index for ``rows`` vectors of ``dim`` under a memory budget; ``reason`` says why.

    ``auto`` follows autofaiss's ``get_optimal_index_keys_v2``: exact search under 1,000 vectors; HNSW
    under 10,000, or while an HNSW graph with M >= 8 fits the budget; IVF-Flat below a million vectors if
    it fits; IVF-PQ (with SQ8 re-ranking when that fits too) otherwise.

    The budget is what one process may hold: the index for the single-process types; for IVF, also the
    training (the sample, a copy of it while k-means runs, and the centroids: :func:`train_bytes`). When
    the sample that ``nlist`` centroids need (39 points each) does not fit, ``nlist`` is halved until it does.
    """
    if kind not in KINDS:
        raise ValueError(f"FAISS index type must be one of {', '.join(KINDS)}, got {kind!r}")
    if rows < 1:
        raise ValueError("cannot build a FAISS index over 0 vectors")
    budget = parse_memory(memory)
    hb = human_bytes
    if kind == "auto":
        fit_m = int(((budget / (4 * rows)) - dim) / 2)  # HNSW costs about 4 * (dim + 2M) bytes per vector
        if rows < 1_000:
            kind, why = "flat", f"auto: {rows:,} vectors (under 1,000): exact search is as fast as an index"
        elif rows < 10_000 or fit_m >= 8:
            kind, hnsw_m = "hnsw", max(8, min(fit_m, hnsw_m))
            why = (f"auto: {rows:,} vectors (under 10,000): an HNSW graph, no training" if rows < 10_000 else
                   f"auto: an HNSW{hnsw_m} graph over {rows:,} vectors (~{hb(rows * (4 * dim + 8 * hnsw_m))}) "
                   f"fits the {hb(budget)} budget; built in one process")
        else:
            hnsw8 = hb(rows * (4 * dim + 64))
            flat = _ivf_bytes(rows, dim, _nlist(rows), 0, 0, "")
            if rows < 1_000_000 and flat <= budget:
                kind, pq = "ivf", False
                why = f"auto: an HNSW8 graph needs ~{hnsw8}, over the {hb(budget)} budget; IVF-Flat (~{hb(flat)}) fits"
            else:
                kind, pq = "ivf", True
                size = f"IVF-Flat needs ~{hb(flat)}" if flat > budget else f"{rows:,} vectors (a million or more)"
                why = f"auto: an HNSW8 graph needs ~{hnsw8}, over the {hb(budget)} budget; {size}: IVF with PQ codes"
    else:
        why = f"index.faiss={kind} requested"
    if kind == "flat":
        return FaissPlan("flat", "Flat", dim, rows, estimated_bytes=4 * dim * rows, budget_bytes=budget, reason=why)
    if kind == "sq8":
        train = min(rows, SQ8_TRAIN)
        return FaissPlan("sq8", "SQ8", dim, rows, train_size=train, train_bytes=train_bytes(train, 0, dim),
                         estimated_bytes=rows * dim, budget_bytes=budget,
                         reason=why + f": 8-bit scalar codes, {dim} bytes a vector, ranges trained on {train:,} vectors")
    if kind == "pq":
        m, bits = pq_shape(dim, rows)
        train = min(rows, PQ_TRAIN)
        return FaissPlan("pq", f"PQ{m}x{bits}", dim, rows, pq_m=m, pq_bits=bits, train_size=train,
                         train_bytes=train_bytes(train, 0, dim), estimated_bytes=rows * math.ceil(m * bits / 8),
                         budget_bytes=budget, reason=why + f": PQ{m}x{bits} codes, {math.ceil(m * bits / 8)} bytes a "
                         f"vector, trained on {train:,} vectors")
    if kind == "hnsw":
        est = rows * (4 * dim + 8 * hnsw_m)
        return FaissPlan("hnsw", f"HNSW{hnsw_m}", dim, rows, hnsw_m=hnsw_m, estimated_bytes=est, budget_bytes=budget,
                         reason=why)
    nlist = _nlist(rows)
    while nlist > 1 and train_bytes(39 * nlist, nlist, dim) > budget:
        nlist //= 2
    if nlist != _nlist(rows):
        why += (f"; nlist {_nlist(rows):,} -> {nlist:,} so that training (39 points per centroid, "
                f"~{hb(train_bytes(39 * nlist, nlist, dim))} with the sample's copy) fits the budget")
    if pq is None:
        pq = _ivf_bytes(rows, dim, nlist, 0, 0, "") > budget
        if pq:
            why += f"; IVF-Flat needs ~{hb(_ivf_bytes(rows, dim, nlist, 0, 0, ''))}, over the budget: PQ codes"
    if not pq:
        train = _train_size(rows, nlist, 0, dim, budget)
        return FaissPlan("ivf", f"IVF{nlist},Flat", dim, rows, nlist=nlist, train_size=train,
                         train_bytes=train_bytes(train, nlist, dim),
                         estimated_bytes=_ivf_bytes(rows, dim, nlist, 0, 0, ""), budget_bytes=budget,
                         reason=why + f"; {nlist:,} lists, trained on {train:,} vectors")
    bits = 8 if rows >= 39 * 256 else 6 if rows >= 39 * 64 else 4
    choices = [m for m in (96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and m <= max(1, dim // 2)]
    pick = None
    for refine in ("SQ8", ""):  # re-ranking with 8-bit scalar codes first, if it fits
        for m in choices:
            if _ivf_bytes(rows, dim, nlist, m, bits, refine) <= budget:
                pick = (m, refine)
                break
        if pick:
            break
    if pick is None:
        pick = (choices[-1], "")
        log.warning("FAISS: even IVF-PQ%d needs %s, over the %s budget; building it anyway", pick[0],
                    hb(_ivf_bytes(rows, dim, nlist, pick[0], bits, "")), hb(budget))
        why += f"; even PQ{pick[0]} codes need ~{hb(_ivf_bytes(rows, dim, nlist, pick[0], bits, ''))}, over budget"
    m, refine = pick
    factory = f"IVF{nlist},PQ{m}x{bits}" + (f",Refine({refine})" if refine else "")
    train = _train_size(rows, nlist, bits, dim, budget)
    est = _ivf_bytes(rows, dim, nlist, m, bits, refine)
    why += (f"; PQ{m}x{bits}" + (" re-ranked by SQ8 codes" if refine else "") + f" (~{hb(est)}), {nlist:,} lists, "
            f"trained on {train:,} vectors")
    need = 0
    if not refine:
        # PQ codes alone order near neighbours coarsely: on tight clusters of 1024-d vectors PQ64 reached
        # recall@10 0.10 (bench/RESULTS.md). Say so now, with the budget that lets re-ranking in.
        need = _ivf_bytes(rows, dim, nlist, m, bits, "SQ8")
        why += (f"; NO re-ranking: SQ8 codes would need a budget of ~{hb(need)} (this one is {hb(budget)}), and "
                f"PQ codes alone may stay below the recall target (the build reports what it reached)")
        log.warning("FAISS %s over %s vectors: no re-ranking within the %s budget, so recall@10 may stay below "
                    "the target; index.faiss_memory >= %s (--faiss-memory) re-ranks with SQ8 codes", factory,
                    f"{rows:,}", hb(budget), hb(need))
    return FaissPlan("ivf", factory, dim, rows, nlist=nlist, pq_m=m, pq_bits=bits, refine=refine,
                     train_size=train, train_bytes=train_bytes(train, nlist, dim), estimated_bytes=est,
                     budget_bytes=budget, reason=why, refine_budget_bytes=need)


def recall_shortfall(plan: FaissPlan, got: float, target: float) -> str:
    """"" when ``got`` reaches ``target``; else the loud one-line message a build below target carries (its
    log line, ``params.recall_warning`` in the manifest, and what ``reembed index`` prints), with the fix."""
    if got >= target:
        return ""
    hb = human_bytes
    if plan.refine_budget_bytes:
        fix = (f"re-ranking by SQ8 codes needs index.faiss_memory >= {hb(plan.refine_budget_bytes)} (--faiss-memory; "
               f"this build had {hb(plan.budget_bytes)})")
    elif plan.kind == "ivf" and plan.pq_m:
        fix = (f"IVF-Flat needs index.faiss_memory >= {hb(_ivf_bytes(plan.rows, plan.dim, plan.nlist, 0, 0, ''))}; "
               "or lower index.recall_target")
    else:
        fix = "raise index.faiss_memory or lower index.recall_target"
    return (f"FAISS {plan.factory}: recall@10 {got:.3f} at its widest search setting is BELOW the target "
            f"{target:.2f}: searches will miss neighbours; {fix}")


def pq_shape(dim: int, rows: int) -> tuple[int, int]:
    """(sub-quantizers, bits) of an explicit ``pq`` index: the most sub-quantizers dividing ``dim`` whose codes
    take at most a sixteenth of the float32 vector, 8 bits each when there are 39 training points per
    centroid (fewer bits below that: faiss's k-means needs them)."""
    bits = 8 if rows >= 39 * 256 else 6 if rows >= 39 * 64 else 4
    m = next(m for m in (96, 64, 48, 32, 24, 16, 12, 8, 4, 2, 1) if dim % m == 0 and m * bits <= max(8, 2 * dim))
    return m, bits


def train_bytes(sample: int, nlist: int, dim: int) -> int:
    """What training holds: the sample, one copy of it (gathered from the workers' parts), the centroids."""
    return 2 * sample * dim * 4 + nlist * dim * 4


def parse_memory(value: str | int | float) -> int:
    """``"16G"``, ``"512MB"``, ``"1.5GiB"`` or a number of bytes -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(i?[bB])?\s*", str(value))
    if not m:
        raise ValueError(f"memory budget {value!r}: expected a size like 16G, 512M or 1.5GiB")
    scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}[m.group(2).lower()]
    return int(float(m.group(1)) * scale)


def _nlist(rows: int) -> int:
    """Inverted lists: about 4 * sqrt(n) as a power of two (autofaiss), with at least 39 training points
    per centroid (faiss warns below that)."""
    if rows < 1_000_000:
        n = 2 ** round(math.log2(4 * math.sqrt(rows)))
    elif rows < 10_000_000:
        n = 16_384
    elif rows < 300_000_000:
        n = 65_536
    else:
        n = 2**17
    return max(1, min(n, rows // 39))


def _ivf_bytes(rows: int, dim: int, nlist: int, m: int, bits: int, refine: str) -> int:
    code = 4 * dim if m == 0 else math.ceil(m * bits / 8)
    extra = {"": 0, "SQ8": dim, "Flat": 4 * dim}[refine]
    return rows * (code + 8 + extra) + nlist * dim * 4


def _train_size(rows: int, nlist: int, bits: int, dim: int, budget: int) -> int:
    """64 points per centroid (and 39 per PQ centroid), as many as the budget allows (:func:`train_bytes`);
    plan_index has made ``nlist`` small enough that 39 per centroid fit."""
    want = max(64 * nlist, 39 * 2**bits if bits else 0)
    cap = (budget - nlist * dim * 4) // (8 * dim)
    return int(max(min(rows, 39 * nlist), min(rows, want, cap)))


# ---------------------------------------------------------------------------------------------------
# Building


def sample_vectors(tables: Iterable[pa.Table], rows: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A uniform sample of ``size`` of the ``rows`` vectors streamed from ``tables``, normalized, and the
    sampled rows' positions in that stream (the positions they get in the index)."""
    size = min(size, rows)
    picks = np.sort(np.random.default_rng(seed).choice(rows, size=size, replace=False))
    parts, offset = [], 0
    for table in tables:
        n = table.num_rows
        lo, hi = np.searchsorted(picks, [offset, offset + n])
        if hi > lo:
            x = S.embedding_matrix(table.column(S.EMBEDDING))
            parts.append(x[picks[lo:hi] - offset])
        offset += n
    if offset != rows:
        raise ValueError(f"the shards hold {offset} vectors, the manifest says {rows}")
    sample = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    return normalize(sample), picks


def build(tables: Iterable[pa.Table], plan: FaissPlan, train: tuple[np.ndarray, np.ndarray] | None = None,
          recall_target: float = 0.95, queries: int = 600, seed: int = 0, use_gpu: bool | None = None,
          exact_fallback: bool = False) -> FaissBuild:
    """Build the index of ``plan`` from ``tables`` (each with ``id`` and ``embedding`` columns), added in order.

    ``train`` is ``sample_vectors``'s (vectors, positions), required for IVF. Returns the index with its
    search setting tuned to ``recall_target`` (see :func:`tuning_queries`). ``exact_fallback``: an HNSW
    graph that misses the target even at its widest setting is replaced by exact search (the graph's own
    vectors in an ``IndexFlatIP``, smaller than the graph) instead of being published below target.
    """
    import faiss

    t0 = time.monotonic()
    dim = plan.dim
    index = new_index(plan)
    gpus = faiss.get_num_gpus() if use_gpu is not False else 0
    device = "cpu"
    rng = np.random.default_rng(seed + 1)
    heap = xq = exclude = None
    if plan.needs_training:
        if train is None:
            raise ValueError(f"{plan.factory} needs a training sample (sample_vectors)")
        x_train, pos = train
        if gpus and plan.kind == "ivf":
            # k-means on the GPU (the costly part); the index itself stays on the CPU for writing.
            faiss.extract_index_ivf(index).clustering_index = faiss.index_cpu_to_all_gpus(faiss.IndexFlatL2(dim))
            device = "cuda"
        xq, exclude = tuning_queries(x_train, pos, queries, rng)
        index.train(held_out(x_train, pos, exclude))
        heap = KnnHeap(xq, DEPTH * K + 1)
    train_s = time.monotonic() - t0

    ids: list[pa.Array] = []
    offset = 0
    for table in tables:
        x = normalize(S.embedding_matrix(table.column(S.EMBEDDING)))
        if x.shape[1] != dim:
            raise ValueError(f"shard vectors have dimension {x.shape[1]}, the index expects {dim}")
        index.add(x)
        if heap is not None:  # exact neighbours of the tuning queries, accumulated as the shards pass
            heap.add(np.arange(offset, offset + len(x)), x)
        ids.extend(table.column(S.ID).chunks)
        offset += len(x)
    if offset == 0:
        raise ValueError("no vectors to index")
    add_s = time.monotonic() - t0 - train_s

    if plan.kind == "hnsw":  # tuning queries and their exact neighbours from the graph's own flat storage
        storage = faiss.downcast_index(faiss.downcast_index(index).storage)
        pos = np.sort(rng.choice(offset, size=min(4 * queries, offset), replace=False))  # 4x: nearer neighbours
        xq, exclude = tuning_queries(storage.reconstruct_batch(pos), pos, queries, rng)
        heap = KnnHeap(xq, DEPTH * K + 1)
        for lo in range(0, offset, 65_536):
            n = min(65_536, offset - lo)
            heap.add(np.arange(lo, lo + n), storage.reconstruct_n(lo, n))
    setting, got, off = tune(index, plan, xq, exclude, heap, recall_target)
    factory = plan.factory
    if plan.kind == "hnsw" and exact_fallback and got < recall_target:
        log.warning("FAISS %s: recall@10 %.3f at its widest setting, below the target %.2f; publishing exact "
                    "search (Flat) instead", plan.factory, got, recall_target)
        flat = faiss.IndexFlatIP(dim)
        storage = faiss.downcast_index(faiss.downcast_index(index).storage)
        for lo in range(0, offset, 65_536):
            flat.add(storage.reconstruct_n(lo, min(65_536, offset - lo)))
        index, factory, setting, got, off = flat, "Flat", {}, 1.0, 1.0
    params = {
        **asdict(plan), "factory": factory, "planned_factory": plan.factory, "metric": "inner_product",
        "normalized": True, "device": device, "search": setting, "recall_at_10": got, "recall_target": recall_target,
        "recall_met": got >= recall_target, **_shortfall(plan, got, recall_target, factory),
        "tuning_queries": 0 if xq is None else len(xq), **_tuned_on(xq, off),
        "train_seconds": round(train_s, 3),
        "add_seconds": round(add_s, 3), "seconds": round(time.monotonic() - t0, 3),
    }
    return FaissBuild(index, pa.chunked_array(ids), params)


def _tuned_on(xq, off: float | None) -> dict[str, Any]:
    """What the recorded recall@10 was measured on, and the off-corpus queries' recall (build params)."""
    if xq is None or off is None:
        return {"tuned_on": "exact search (nothing to tune)"}
    return {"tuned_on": f"{len(xq) - len(xq) // 3} {TUNED_ON}", "recall_off_corpus": off,
            "off_corpus": f"{len(xq) // 3} {OFF_CORPUS}"}


def _shortfall(plan: FaissPlan, got: float, target: float, factory: str | None = None) -> dict[str, str]:
    """``{"recall_warning": ...}`` for a published build below target (none for an exact fallback)."""
    msg = recall_shortfall(plan, got, target) if factory != "Flat" else ""
    return {"recall_warning": msg} if msg else {}


def new_index(plan: FaissPlan):
    """The empty index of ``plan``: inner product; HNSW with efConstruction 80; PQ without polysemous
    training (faiss's factory turns it on; it only serves polysemous search, never used here, and at 64
    sub-quantizers it costs minutes)."""
    import faiss

    index = faiss.index_factory(plan.dim, plan.factory, faiss.METRIC_INNER_PRODUCT)
    if plan.kind == "hnsw":
        faiss.downcast_index(index).hnsw.efConstruction = 80
    if plan.pq_m:
        inner = index if plan.kind == "pq" else faiss.extract_index_ivf(index)
        faiss.downcast_index(inner).do_polysemous_training = False
    return index


def tuning_queries(pool: np.ndarray, positions: np.ndarray, n: int, rng) -> tuple[np.ndarray, np.ndarray]:
    """Queries to tune the search setting on, and for each the index position to leave out of its answers
    (-1: none). Three equal parts, in this order:

    * sampled documents, each held out (its own position left out of its exact neighbours and of the
      index's answers), as autofaiss tunes and reports recall on the indexed embeddings themselves;
    * more held-out documents, each moved in a random direction by its distance to its nearest neighbour in
      the sample, so it sits where a fresh document of the corpus would, not on an indexed point;
    * off-corpus queries: Gaussian draws with the documents' mean and per-dimension spread, stand-ins for a
      text query that lands where no document is (issue 11: tuned on documents alone, an HNSW graph over a
      few tight topics looked perfect at efSearch 16 while text queries got 0.66 of their neighbours).

    The first two (:data:`TUNED_ON`) are what the recorded recall@10 is measured on; the third only keeps
    :func:`tune` widening while widening still helps it (:data:`OFF_CORPUS`). Gaussian draws and mixes of two
    documents fall between 1024-d clusters: counted in the figure they measured 0.834 on a build whose recall
    on fresh documents is 0.970, and swept the search to every list.
    """
    pool = normalize(pool)
    m = len(pool)
    if m == 0:
        return pool, np.zeros(0, np.int64)
    third = max(1, min(n, m) // 3)
    pick = rng.choice(m, size=2 * third, replace=2 * third > m)
    docs, moved = pool[pick[:third]], pool[pick[third:]]
    nearest = KnnHeap(moved, 2)  # itself and its nearest neighbour in the sample
    for lo in range(0, m, 16_384):
        nearest.add(np.arange(lo, min(lo + 16_384, m)), pool[lo:lo + 16_384])
    step = np.sqrt(np.maximum(0.0, 2.0 - 2.0 * nearest.scores[:, 1].astype(np.float64)))[:, None]
    step[~np.isfinite(step)] = 0.0  # a one-vector sample: no neighbour, the document as it is
    direction = normalize(rng.standard_normal(moved.shape).astype(np.float32))
    spread = pool.std(axis=0) + 1e-6
    off = normalize(pool.mean(axis=0) + rng.standard_normal((third, pool.shape[1])).astype(np.float32) * spread)
    xq = np.vstack([docs, normalize(moved + (step * direction).astype(np.float32)), off]).astype(np.float32)
    exclude = np.concatenate([np.asarray(positions)[pick], np.full(third, -1)]).astype(np.int64)
    return xq, exclude


def held_out(x: np.ndarray, positions: np.ndarray, exclude: np.ndarray) -> np.ndarray:
    """The training sample without the tuning queries' documents, so they are held out of the codebooks too
    (trained on, PQ codes fit them better than the corpus: the recall measured on them read high); the whole
    sample when that would take more than a tenth of it (a small corpus: training needs its points).

    Reorders ``x`` in place (the held rows swapped to its end) and returns a view of the rest: a copy of the
    sample would double what training holds (8 GiB more at 1B in 16G).
    """
    held = np.isin(positions, exclude[exclude >= 0])
    count = int(held.sum())
    if not count or len(x) - count < 0.9 * len(x):
        return x
    keep = len(x) - count
    if not x.flags.writeable:
        x = x.copy()
    out, into = np.flatnonzero(held[:keep]), np.flatnonzero(~held[keep:]) + keep  # as many of each
    rows = x[out].copy()
    x[out] = x[into]
    x[into] = rows
    return x[:keep]


def tune(index, plan: FaissPlan, xq, exclude, heap, target: float) -> tuple[dict[str, Any], float, float | None]:
    """The cheapest search setting whose recall@10 on the held-out documents reaches ``target`` and past which
    widening no longer helps the off-corpus queries (:func:`tuning_queries`).

    The documents pass when, for each half (as they are, moved), the lower end of the estimate's ~95%
    interval (mean - 2 standard errors) reaches the target, not just the mean. The off-corpus queries pass
    when theirs does too, or when the last step of the sweep raised their recall by less than
    :data:`SATURATED` (the index's codes, not its search setting, limit them: the 200k x 1024 IVF-PQ build
    swept to every list for them). Returns (setting, recall on the documents, recall on the off-corpus
    queries). ``heap`` holds the exact neighbours (``ids``, ``scores``: a :class:`KnnHeap`, or the merged
    heaps of the workers that filled an IVF index).
    """
    import faiss

    if plan.kind == "flat" or xq is None or not len(xq):
        return {}, 1.0, None

    parts = np.array_split(np.arange(len(xq)), 3)  # documents, moved documents, off-corpus (tuning_queries)
    docs = np.concatenate(parts[:2])

    def low(per_query: np.ndarray, g: np.ndarray) -> float:
        return float(per_query[g].mean()) - 2 * float(per_query[g].std()) / math.sqrt(len(g)) if len(g) else 1.0

    def measure() -> tuple[bool, float, float, bool]:
        _, I = index.search(xq, K + 1)
        per_query = recall(I, heap.ids, heap.scores, K, exclude=exclude)
        off = float(per_query[parts[2]].mean()) if len(parts[2]) else 1.0
        return (min(low(per_query, g) for g in parts[:2]) >= target, round(float(per_query[docs].mean()), 4),
                round(off, 4), low(per_query, parts[2]) >= target)

    def sweep(settings, deeper_next: bool = False) -> tuple[dict[str, Any], float, float] | None:
        """The first setting that passes; None when none does, or (``deeper_next``: a deeper re-ranking
        follows) as soon as a step stops raising the documents' recall (the re-ranking depth limits it)."""
        nonlocal best, widest_ok
        before = before_docs = None
        for setting in settings:
            apply(setting)
            ok, r, off, off_ok = measure()
            best, widest_ok = (setting, r, off), ok
            if ok and (off_ok or (before is not None and off - before < SATURATED)):
                return best
            if not ok and deeper_next and before_docs is not None and r - before_docs < SATURATED:
                return None
            before, before_docs = off, r
        return None

    best: tuple[dict[str, Any], float, float] = ({}, 0.0, 0.0)
    widest_ok = False
    if plan.kind in ("sq8", "pq"):  # exhaustive over codes: no setting to tune, the recall is what it is
        ok, r, off, _ = measure()
        if not ok:
            log.warning("FAISS %s: recall@10 %.3f, below the target %.2f (its codes lose that much; no search "
                        "setting changes it)", plan.factory, r, target)
        return {}, r, off
    if plan.kind == "hnsw":
        hnsw = faiss.downcast_index(index).hnsw

        def apply(setting):
            hnsw.efSearch = setting["efSearch"]

        found = sweep({"efSearch": ef} for ef in _EF_SEARCH)
    else:
        ivf = faiss.extract_index_ivf(index)
        refine = faiss.downcast_index(index) if plan.refine else None

        def apply(setting):
            ivf.nprobe = setting["nprobe"]
            if refine is not None:
                refine.k_factor = float(setting["k_factor"])

        nprobes = [p for p in _NPROBE if p < plan.nlist] + [plan.nlist]
        found = None
        factors = _K_FACTORS if refine is not None else (None,)
        for kf in factors:
            found = sweep(({"nprobe": p, **({"k_factor": kf} if kf else {})} for p in nprobes),
                          deeper_next=kf != factors[-1])
            if found:
                break
    if found or widest_ok:  # widest_ok: the documents pass; the off-corpus queries gained up to the widest setting
        return found or best
    log.warning("%s (widest setting tried: %s)", recall_shortfall(plan, best[1], target), best[0])
    return best


# ---------------------------------------------------------------------------------------------------
# Files


def next_version(loc: Location, recorded: Sequence[int] = ()) -> int:
    """One more than the highest version written under ``indexes/faiss/`` or recorded in the manifest."""
    seen = list(recorded)
    for info in loc.list(FOLDER):
        m = _VERSION_RE.match(posixpath.basename(info.path))
        if m:
            seen.append(int(m.group(1)))
    return max(seen, default=0) + 1


def write(loc: Location, built: FaissBuild, version: int) -> dict[str, Any]:
    """Publish ``index-vN.faiss`` and its id map under ``indexes/faiss/``; returns their manifest record.

    Both go through a local file (never a second copy of the index in memory) and :func:`publish_file`:
    a rename on a local output, a multipart upload on S3 (a single PUT stops at 5 GB)."""
    import faiss

    loc.clean_tmp(FOLDER)
    name = f"index-v{version}"
    with local_scratch(loc) as tmp:
        ids_tmp = os.path.join(tmp, f"{name}.ids.parquet")
        pq.write_table(pa.table({S.ID: built.ids}), ids_tmp, compression="zstd", row_group_size=IDS_ROW_GROUP)
        ids = publish_file(loc, ids_tmp, f"{FOLDER}/{name}.ids.parquet")
        index_tmp = os.path.join(tmp, f"{name}.faiss")
        faiss.write_index(built.index, index_tmp)
        files = publish_file(loc, index_tmp, f"{FOLDER}/{name}.faiss")
    return {"version": version, **file_record("", files), **file_record("ids_", ids), "ntotal": built.ntotal}


def file_record(prefix: str, published: dict[str, Any]) -> dict[str, Any]:
    """A published file (:func:`publish_file`'s answer) as the manifest's ``{prefix}path``, ``{prefix}bytes``,
    ``{prefix}sha256`` and the cheap fingerprint an open checks (``{prefix}mtime_ns``, ``{prefix}edges_sha256``)."""
    return {f"{prefix}{k}": published[k] for k in ("path", "bytes", "sha256", *FINGERPRINT) if k in published}


def read_index(loc: Location, record: dict[str, Any], verify: bool = False) -> tuple[Any, "IdMap"]:
    """The index and id map a manifest records (``stages.index.faiss``), each opened only once its path is
    known to stay inside the output (:class:`ManifestError` otherwise) and the file is the one recorded
    (:class:`ChecksumError`): faiss's reader trusts its input.

    "The one recorded" is checked cheaply on every open: size, modification time and the sha256 of the
    file's first and last MiB (:func:`check_file`); the whole file is hashed only when that fingerprint
    differs (or is not recorded), or with ``verify``. The build hashed every file once; ``reembed index
    --verify`` hashes them again. The id map is not read whole (:class:`IdMap`: row groups on demand).

    An index built by many workers keeps its inverted lists in ``index-vN.ivfdata`` beside the index file
    (``ivfdata_path`` in the record); they are memory-mapped, read-only, never loaded whole. On S3 the files
    are downloaded first into a local cache (``REEMBED_CACHE``, else the temporary folder), keyed by sha256.
    """
    import faiss

    where = loc.display("manifest.json")
    for key in ("path", "ids_path", "sha256", "ids_sha256"):
        if not isinstance(record.get(key), str):
            raise ManifestError(f"{where}: the FAISS record has no {key}; rebuild with `reembed index`")
    ids_rel = inside_output(loc, record["ids_path"], "stages.index.faiss.ids_path")
    rel = inside_output(loc, record["path"], "stages.index.faiss.path")
    if loc.fs.type_name == "local":
        check_file(loc, ids_rel, record, "ids_", verify)
        ids = IdMap(loc, ids_rel)
    else:
        ids = IdMap(Location.from_uri(os.path.dirname(_local_copy(loc, ids_rel, record, "ids_", verify))),
                    posixpath.basename(ids_rel))
    ondisk = record.get("ivfdata_path")
    if ondisk is not None:
        if not isinstance(record.get("ivfdata_sha256"), str):
            raise ManifestError(f"{where}: the FAISS record has no ivfdata_sha256; rebuild with `reembed index`")
        data_rel = inside_output(loc, ondisk, "stages.index.faiss.ivfdata_path")
        local = _local_copy(loc, rel, record, "", verify)
        local_data = _local_copy(loc, data_rel, record, "ivfdata_", verify)
        index = faiss.read_index(local, faiss.IO_FLAG_SKIP_IVF_DATA | faiss.IO_FLAG_READ_ONLY)
        lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
        lists.filename = local_data  # the file records only its own name: the data is wherever it was copied
        lists.do_mmap()
    elif loc.fs.type_name == "local":
        index = faiss.read_index(_local_copy(loc, rel, record, "", verify))
    else:
        data = _read(loc, rel)
        _check(hashlib.sha256(data).hexdigest(), record["sha256"], loc.display(rel))
        index = faiss.deserialize_index(np.frombuffer(data, dtype=np.uint8))
    if index.ntotal != len(ids):
        raise ChecksumError(f"{loc.display(rel)}: {index.ntotal} vectors but {len(ids)} ids")
    return index, ids


class IdMap:
    """The id map of a FAISS build (row i: the document id of faiss id i), read by row group on demand:
    opening reads the Parquet footer, :meth:`take` decodes only the row groups holding the asked rows
    (the last few kept). At 1B vectors the map is ~20 GB; a search result touches ~k row groups of it."""

    CACHED = 16  # decoded row groups kept (IDS_ROW_GROUP ids each)

    def __init__(self, loc: Location, rel: str):
        self._where = loc.display(rel)
        try:
            self._file = pq.ParquetFile(loc.fs.open_input_file(loc.path(rel)))
        except (OSError, pa.ArrowInvalid) as e:
            raise StorageError(f"{self._where}: not a readable id map ({e}); rebuild with `reembed index`") from e
        meta = self._file.metadata
        self._starts = np.cumsum([0] + [meta.row_group(i).num_rows for i in range(meta.num_row_groups)])
        self._cache: dict[int, pa.Array] = {}
        self.row_groups_read = 0

    def __len__(self) -> int:
        return int(self._starts[-1])

    def take(self, positions: Sequence[int] | np.ndarray) -> list[str]:
        """The document ids at ``positions`` (faiss ids), in that order."""
        pos = np.asarray(positions, dtype=np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= len(self)):
            raise IndexError(f"{self._where}: position out of range 0..{len(self) - 1}")
        groups = np.searchsorted(self._starts, pos, side="right") - 1
        out: list[str] = [""] * len(pos)
        for g in np.unique(groups).tolist():
            column = self._group(g)
            where = np.flatnonzero(groups == g)
            for i, v in zip(where.tolist(), column.take(pa.array(pos[where] - self._starts[g])).to_pylist()):
                out[i] = v
        return out

    def to_pylist(self) -> list[str]:
        """Every id (reads the whole map: for small indexes and tests)."""
        return self.take(np.arange(len(self)))

    def _group(self, g: int) -> pa.Array:
        if g not in self._cache:
            if len(self._cache) >= self.CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[g] = self._file.read_row_group(g, columns=[S.ID]).column(0).combine_chunks()
            self.row_groups_read += 1
        return self._cache[g]


def check_file(loc: Location, rel: str, record: dict[str, Any], prefix: str = "", verify: bool = False) -> str:
    """Check that ``rel`` is the file recorded under ``{prefix}*`` in ``record``: its fingerprint (size,
    mtime, sha256 of its first and last MiB) when recorded and ``verify`` is off, else (or when the
    fingerprint differs) its whole sha256. Returns how ("fingerprint" or "sha256"); raises
    :class:`StorageError` for a missing file and :class:`ChecksumError` for another one."""
    if not loc.exists(rel):
        raise StorageError(f"{loc.display(rel)}: missing, although {loc.display('manifest.json')} records it; "
                           "rebuild with `reembed index`")
    if not verify and _fingerprint_matches(loc, rel, record, prefix):
        return "fingerprint"
    digest, size = file_sha256(loc, rel)
    _check(digest, record[f"{prefix}sha256"], loc.display(rel))
    return "sha256"


FINGERPRINT = ("mtime_ns", "edges_sha256")
EDGE = 1 << 20  # bytes hashed at each end of a file for its fingerprint


def fingerprint(loc: Location, rel: str) -> dict[str, Any]:
    """What an open compares instead of hashing a whole file: ``bytes``, ``mtime_ns`` (None where the store
    gives none) and ``edges_sha256``, the sha256 of the first and last MiB (the whole file up to 2 MiB)."""
    info = loc.fs.get_file_info(loc.path(rel))
    size = int(info.size)
    h = hashlib.sha256()
    with loc.fs.open_input_file(loc.path(rel)) as f:
        if size <= 2 * EDGE:
            h.update(f.read_at(size, 0) if size else b"")
        else:
            h.update(f.read_at(EDGE, 0))
            h.update(f.read_at(EDGE, size - EDGE))
    return {"bytes": size, "mtime_ns": info.mtime_ns, "edges_sha256": h.hexdigest()}


def _fingerprint_matches(loc: Location, rel: str, record: dict[str, Any], prefix: str) -> bool:
    want = {k: record.get(f"{prefix}{k}") for k in ("bytes", *FINGERPRINT)}
    if None in want.values():
        return False  # recorded by an older build: hash the whole file
    return fingerprint(loc, rel) == want


def damaged_files(loc: Location, record: dict[str, Any], verify: bool = False) -> list[str]:
    """The files of a recorded FAISS build that are missing or differ from the record (empty when all are
    intact): by their fingerprint (size, mtime, first and last MiB: :func:`check_file`), by their whole
    sha256 when that differs, when none was recorded, or with ``verify`` (streamed, nothing held)."""
    return [bad for key in file_keys(record) if (bad := damaged_file(loc, record, key, verify)) is not None]


def file_keys(record: dict[str, Any]) -> list[str]:
    """The prefixes of the files a FAISS record names: the index, its ids, and its ``.ivfdata`` if on disk."""
    return [key for key in ("", "ids_", "ivfdata_") if key != "ivfdata_" or record.get("ivfdata_path") is not None]


def damaged_file(loc: Location, record: dict[str, Any], key: str, verify: bool = False) -> str | None:
    """The file ``record[key + "path"]`` shown as a URI if it is missing or differs from the record, else
    None (see :func:`damaged_files`; one file, so a task can check it alone)."""
    path = record.get(f"{key}path")
    rel, _ = loc.contain(path)
    try:
        if rel is None or loc.size(rel) != record.get(f"{key}bytes", loc.size(rel)):
            raise ChecksumError("size")
        check_file(loc, rel, record, key, verify)
    except (ChecksumError, StorageError, FileNotFoundError, KeyError):
        return loc.display(rel) if rel else str(path)
    return None


# ---------------------------------------------------------------------------------------------------
# Large files: through local disk, multipart to S3

MULTIPART_THRESHOLD = 64 * 2**20  # above this a file goes to S3 in parts (S3 refuses one PUT above 5 GB)
MULTIPART_CHUNK = 64 * 2**20


def publish_file(loc: Location, local: str, rel: str, threshold: int | None = None,
                 chunk: int | None = None) -> dict[str, Any]:
    """Move the finished local file ``local`` to ``rel`` in ``loc``: a rename on a local output (the file
    must be on the same filesystem: see :func:`local_scratch`), an upload otherwise, in parts above
    ``threshold`` on S3 (boto3's managed transfer through the Location's own client and retries).
    Returns ``{"path", "bytes", "sha256", "mtime_ns", "edges_sha256"}``: the sha256 read from the local file
    before it leaves, the fingerprint (:func:`fingerprint`) from the stored one."""
    digest, size = _file_sha256(local)
    if loc.fs.type_name == "local":
        target = loc.path(rel)
        os.makedirs(os.path.dirname(target), exist_ok=True)
        os.replace(local, target)
    elif loc.fs.type_name == "s3":
        upload_file(loc, local, rel, threshold, chunk)
    else:
        with open(local, "rb") as src, loc.fs.open_output_stream(loc.path(rel)) as dst:
            while block := src.read(1 << 22):
                dst.write(block)
    stored = fingerprint(loc, rel)
    if stored["bytes"] != size:
        raise StorageError(f"{loc.display(rel)}: stored {stored['bytes']} bytes of {size}")
    return {"path": rel, "sha256": digest, **stored}


def upload_file(loc: Location, local: str, rel: str, threshold: int | None = None, chunk: int | None = None) -> None:
    """Upload ``local`` to ``rel`` on an S3 Location, as a multipart upload above ``threshold`` bytes."""
    from boto3.s3.transfer import TransferConfig

    from reembed.storage.s3 import _s3_call, _split, explain

    bucket, key = _split(loc.path(rel))
    config = TransferConfig(multipart_threshold=threshold or MULTIPART_THRESHOLD,
                            multipart_chunksize=chunk or MULTIPART_CHUNK, use_threads=True)
    try:
        _s3_call("upload_file", loc.display(rel), loc.settings, Bucket=bucket, Key=key, Filename=local, Config=config)
    except Exception as e:
        raise explain(e, loc.display(rel), "write", loc.settings) from e


def download_file(loc: Location, rel: str, local: str) -> None:
    """Copy ``rel`` to the local file ``local`` (ranged GETs in parallel on S3), via a temporary name."""
    tmp = f"{local}.{uuid.uuid4().hex[:12]}"
    try:
        if loc.fs.type_name == "s3":
            from reembed.storage.s3 import _s3_call, _split, explain

            bucket, key = _split(loc.path(rel))
            try:
                _s3_call("download_file", loc.display(rel), loc.settings, Bucket=bucket, Key=key, Filename=tmp)
            except Exception as e:
                if "404" in str(e) or "Not Found" in str(e):
                    raise StorageError(f"{loc.display(rel)}: no such file; rebuild with `reembed index`") from e
                raise explain(e, loc.display(rel), "read", loc.settings) from e
        else:
            with loc.fs.open_input_stream(loc.path(rel)) as src, open(tmp, "wb") as dst:
                while block := src.read(1 << 22):
                    dst.write(block)
        os.replace(tmp, local)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def file_sha256(loc: Location, rel: str) -> tuple[str, int]:
    """sha256 and size of ``rel``, streamed."""
    if loc.fs.type_name == "local":
        return _file_sha256(loc.path(rel))
    h, size = hashlib.sha256(), 0
    with loc.fs.open_input_stream(loc.path(rel)) as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size


class local_scratch:
    """A local scratch folder for files on their way to ``loc``: ``indexes/faiss/_tmp/<random>`` inside a
    local output (same filesystem, so publishing is a rename), else a temporary folder. Removed on exit."""

    def __init__(self, loc: Location):
        self.loc = loc

    def __enter__(self) -> str:
        import tempfile

        if self.loc.fs.type_name == "local":
            self.path = self.loc.path(FOLDER, "_tmp", uuid.uuid4().hex[:12])
            os.makedirs(self.path)
        else:
            self.path = tempfile.mkdtemp(prefix="reembed-faiss-", dir=os.environ.get("REEMBED_TMP"))
        return self.path

    def __exit__(self, *exc) -> None:
        import shutil

        shutil.rmtree(self.path, ignore_errors=True)


def _local_copy(loc: Location, rel: str, record: dict[str, Any], prefix: str, verify: bool = False) -> str:
    """A local path holding ``rel``'s bytes, checked against the record (:func:`check_file`): the file itself
    on a local output, else a copy in the cache folder (downloaded once per sha256; a cached copy is reused
    while the stored file keeps its recorded size and mtime and the copy its size and edges)."""
    sha256 = record[f"{prefix}sha256"]
    if loc.fs.type_name == "local":
        check_file(loc, rel, record, prefix, verify)
        return loc.path(rel)
    import tempfile

    folder = os.path.join(os.environ.get("REEMBED_CACHE") or tempfile.gettempdir(), "reembed-faiss", sha256[:32])
    os.makedirs(folder, exist_ok=True)
    local = os.path.join(folder, posixpath.basename(rel))
    cache = Location.from_uri(folder)
    name = posixpath.basename(rel)
    if os.path.isfile(local) and not verify and record.get(f"{prefix}mtime_ns") is not None:
        stored = loc.fs.get_file_info(loc.path(rel))
        mine = fingerprint(cache, name)
        if (stored.size, stored.mtime_ns) == (record.get(f"{prefix}bytes"), record[f"{prefix}mtime_ns"]) \
                and (mine["bytes"], mine["edges_sha256"]) == (record.get(f"{prefix}bytes"), record.get(f"{prefix}edges_sha256")):
            return local
    if not os.path.isfile(local) or _file_sha256(local)[0] != sha256:
        download_file(loc, rel, local)
        _check(_file_sha256(local)[0], sha256, loc.display(rel))
    return local


load = read_index  # the name reembed.migrate imports until it moves to read_index


def read_index_file(uri: str):
    """A FAISS index a user names (a local path or any storage URI), with no manifest to check it against."""
    import faiss

    loc = Location.from_uri(uri)
    try:
        if loc.fs.type_name == "local":
            if not os.path.isfile(loc.root):
                raise StorageError(f"{uri}: no FAISS index file here")
            return faiss.read_index(loc.root)
        return faiss.deserialize_index(np.frombuffer(_read(loc, None), dtype=np.uint8))
    except RuntimeError as e:
        raise StorageError(f"{uri}: not a FAISS index faiss can read ({str(e).splitlines()[0]})") from e


def read_ids_file(uri: str, column: str = S.ID) -> list[str]:
    """Document ids in index-position order from a Parquet file (column ``id``), a .npy array, or a text /
    JSON Lines file (one id, or one object with ``id``, per line)."""
    import json

    data = _read(Location.from_uri(uri), None)
    if uri.endswith(".parquet"):
        table = pq.read_table(pa.BufferReader(data))
        if column not in table.column_names:
            raise StorageError(f"{uri}: no {column!r} column (has {', '.join(table.column_names)})")
        return [str(x) for x in table.column(column).to_pylist()]
    if uri.endswith(".npy"):
        return [str(x) for x in np.load(io.BytesIO(data), allow_pickle=False)]
    out = []
    for n, line in enumerate(data.decode().splitlines(), 1):
        if line.strip():
            try:
                out.append(str(json.loads(line)[column]) if line.lstrip().startswith("{") else line.strip())
            except (ValueError, KeyError) as e:
                raise StorageError(f"{uri}:{n}: expected an id or a JSON object with {column!r} ({e})") from e
    return out


def _read(loc: Location, rel: str | None) -> bytes:
    try:
        return loc.read_bytes(rel) if rel else loc.read_bytes()
    except FileNotFoundError as e:
        raise StorageError(f"{loc.display(rel) if rel else loc.uri}: no such file") from e


def _check(actual: str, expected: str, where: str) -> None:
    if actual != expected:
        raise ChecksumError(
            f"{where}: sha256 {actual[:16]}... does not match the manifest's {expected[:16]}... (corrupt or "
            "replaced); not loading it. Rebuild with `reembed index`."
        )


def _file_sha256(path: str) -> tuple[str, int]:
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return h.hexdigest(), size
