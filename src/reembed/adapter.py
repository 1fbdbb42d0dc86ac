"""Drift adapter: serve the new model before the re-embedding has finished.

A small map from the new model's space into the old one (Drift-Adapter, EMNLP 2025, arXiv 2509.23471),
fitted on paired vectors of the same documents: the old vector (an export's ``old_embedding``, or an old
store) and the new vector (a committed shard of the output, even of a partial run). A query is then
embedded once, with the new model, and searches

* the new store directly, for the documents already migrated, and
* the old store through the adapter, for the rest,

and the two ranked lists are fused (:func:`reembed.migrate.dual.fuse`). One embedding per query instead of
two models, and the old store keeps serving until the swap.

Four kinds are fitted and compared on held-out pairs; the best is kept:

* ``procrustes`` - orthogonal Procrustes: ``W`` with orthonormal rows (``d_new x d_old``) maximizing the
  agreement of ``x W`` with ``y``; no bias. The SVD of ``X^T Y``.
* ``lowrank`` - an affine map of rank ``r`` (reduced-rank ridge regression): the least-squares map, then
  projected on the top ``r`` directions of its fitted values.
* ``mlp`` - the Procrustes map plus a small residual MLP trained with a cosine loss (torch, CPU, seconds).
* ``listwise`` - an affine map (from the Procrustes one) plus a residual ReLU layer (``LISTWISE_HIDDEN``
  units; tuning also tries the affine map alone) trained to reproduce the **new model's neighbour
  ranking** rather than the old vector: KL(softmax(q_new . D_new / t) || softmax(s * A(q_new) . D_old)) over
  the fit documents D (both vectors known), for fit queries q (the query-log pairs and the documents
  themselves, each left out of its own list), plus ``alpha`` times the cosine loss to the old vector
  (torch, CPU, one thread).

Query-like pairs: the pairs are documents, but the adapter serves queries (often a few words). A query log
(``reembed adapter fit --query-log FILE``), embedded by both models, gives ``fit(..., queries=(q_new,
q_old))`` pairs of the served distribution: added to the pairs of the vector-loss kinds, and the
listwise kind's training queries.

``reembed adapter fit`` tunes each kind on pairs held out of its training pairs (``fit(..., tune=True)``):
Procrustes with or without centring, the low-rank map's ridge and rank, the MLP's weight decay and the
epoch it stops at. Each is then judged, on pairs held out of the fit, by recall@k of ``new query -> adapter -> old index`` against
``new query -> new index`` (the full re-embedding) and ``old query -> old index`` (no migration): on
labelled queries when given (their texts embedded by both models), else on neighbour overlap with the new
model's own neighbours (held-out documents as queries). ``recovery`` is the adapter's recall over the new
model's.

The fitted adapter is saved with the output, versioned and create-only::

    OUTPUT/adapters/weights-<sha256>.npz   the weights
    OUTPUT/adapters/v0001.json             kind, both models and fingerprints, the figures, the weights' sha256

and refused at load when the output's model or the old model differs from the ones it was fitted for.

Memory: the fit holds ``sample`` pairs (default 20,000; seconds for 100k on a CPU). The pairs come from a
seeded random subset of committed shards; when the shards do not carry ``old_embedding`` the old vectors
of the sampled ids are looked up in the export's parts by Ray tasks, one per part (each returns only the
matches), so no process reads the whole old corpus.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from reembed import schema as S
from reembed.errors import ValidationError
from reembed.storage import Location

log = logging.getLogger(__name__)

KINDS = ("procrustes", "lowrank", "mlp", "listwise")
ADAPTERS = "adapters"
OLD_EMBEDDING = "old_embedding"
DEFAULT_SAMPLE = 20_000
HOLDOUT = 0.2
K = 10


class AdapterError(ValidationError):
    """An adapter cannot be fitted, found, or used with these models."""


@dataclass
class Adapter:
    """A fitted map from new-model vectors to old-model vectors (unit-normalized on the way out)."""

    kind: str
    weights: dict[str, np.ndarray]
    new_model: dict[str, Any] = field(default_factory=dict)  # name, dimension, fingerprint
    old_model: dict[str, Any] = field(default_factory=dict)  # name, dimension, fingerprint (or the source)
    figures: dict[str, Any] = field(default_factory=dict)
    version: int | None = None

    def apply(self, x: np.ndarray) -> np.ndarray:
        """New-model vectors (n, d_new) -> old-space vectors (n, d_old), unit length."""
        x = np.asarray(x, dtype=np.float32)
        w = self.weights
        y = x @ w["W"] + (w["b"] if "b" in w else 0.0)
        if "W1" in w:  # the residual MLP (mlp; listwise with a hidden layer)
            h = np.maximum(x @ w["W1"] + w["b1"], 0.0)
            y = y + h @ w["W2"] + w["b2"]
        return _normalize(y.astype(np.float32))

    def check(self, new_fingerprint: str | None, old_fingerprint: str | None = None) -> None:
        """Refuse an adapter fitted for other models."""
        if new_fingerprint and new_fingerprint != self.new_model.get("fingerprint"):
            raise AdapterError(f"adapter v{self.version} was fitted for the new model {self.new_model.get('name')} "
                               f"({self.new_model.get('fingerprint')}), not this output's ({new_fingerprint}); "
                               "refit it with `reembed adapter fit`")
        if old_fingerprint and self.old_model.get("fingerprint") and old_fingerprint != self.old_model["fingerprint"]:
            raise AdapterError(f"adapter v{self.version} was fitted for the old model {self.old_model.get('name')}, "
                               f"not the one given ({old_fingerprint}); refit it with `reembed adapter fit`")


# ---------------------------------------------------------------------------------------------------
# Fitting


def fit(x_new: np.ndarray, y_old: np.ndarray, kind: str, rank: int = 128, seed: int = 0,
        epochs: int = 60, hidden: int | None = None, tune: bool = False,
        queries: tuple[np.ndarray, np.ndarray] | None = None) -> Adapter:
    """Fit one ``kind`` of adapter on paired rows (the same document in both spaces).

    With ``tune`` the kind's settings are chosen on pairs held out of the fit (``TUNE_HOLDOUT`` of them,
    never any labelled query): for ``procrustes`` whether to centre both sides (a bias), for ``lowrank``
    the ridge and the rank (full rank is plain ridge regression), for ``mlp`` the weight decay and the epoch
    to stop at. The held-out figure is :func:`evaluate`'s neighbour overlap; the choice and every candidate's
    figure are kept in ``adapter.figures["tuning"]``, and the chosen settings are refitted on all pairs
    (the MLP and the listwise map keep their early-stopped weights).

    ``queries`` = (new, old) vectors of query-like texts (a query log embedded by both models): more pairs
    for the vector-loss kinds, the training queries of ``listwise``; with ``tune``, a tenth of them is held
    out too, and the held-out figure becomes theirs (their new-model neighbours among the fit documents,
    kept by the adapted query among the old vectors), the distribution the adapter serves."""
    x, y = _normalize(np.asarray(x_new, np.float32)), _normalize(np.asarray(y_old, np.float32))
    if len(x) != len(y) or len(x) < 2:
        raise AdapterError(f"need at least 2 paired vectors, got {len(x)} new and {len(y)} old")
    if kind not in KINDS:
        raise AdapterError(f"unknown adapter kind {kind!r}; use one of {', '.join(KINDS)}")
    qx, qy = _query_pairs(queries, x.shape[1], y.shape[1])
    if hidden is None:  # the MLP's hidden layer; the listwise kind's residual layer
        hidden = LISTWISE_HIDDEN if kind == "listwise" else 256
    if tune and len(x) >= 20:
        return _tuned(x, y, kind, rank, seed, epochs, hidden, qx, qy)
    if kind == "listwise":
        return Adapter(kind, _listwise(x, y, qx, qy, seed=seed, epochs=epochs, hidden=hidden))
    x, y = np.vstack([x, qx]), np.vstack([y, qy])
    if kind == "procrustes":
        return Adapter(kind, {"W": _procrustes(x, y)})
    if kind == "lowrank":
        return Adapter(kind, _lowrank(x, y, rank))
    return Adapter(kind, _mlp(x, y, hidden, epochs, seed))


def _query_pairs(queries, d_new: int, d_old: int) -> tuple[np.ndarray, np.ndarray]:
    if queries is None:
        return np.zeros((0, d_new), np.float32), np.zeros((0, d_old), np.float32)
    qx, qy = (_normalize(np.asarray(q, np.float32)) for q in queries)
    if len(qx) != len(qy) or qx.shape[1] != d_new or qy.shape[1] != d_old:
        raise AdapterError(f"query pairs must be (n, {d_new}) new and (n, {d_old}) old vectors, "
                           f"got {qx.shape} and {qy.shape}")
    return qx, qy


TUNE_HOLDOUT = 0.1
RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0)
WEIGHT_DECAYS = (1e-4, 1e-2)


def _tuned(x: np.ndarray, y: np.ndarray, kind: str, rank: int, seed: int, epochs: int, hidden: int,
           qx: np.ndarray, qy: np.ndarray) -> Adapter:
    order = np.random.default_rng(seed + 1).permutation(len(x))
    cut = max(2, int(len(x) * TUNE_HOLDOUT))
    val, train = order[:cut], order[cut:]
    q_order = np.random.default_rng(seed + 2).permutation(len(qx))
    q_cut = int(len(qx) * TUNE_HOLDOUT) if len(qx) >= 20 else 0
    q_val, q_train = q_order[:q_cut], q_order[q_cut:]
    ids = np.arange(cut).astype(str).astype(object)
    k = max(1, min(K, cut // 20))  # top-10 of a dozen held-out pairs would be nearly all of them

    def score(weights: dict[str, np.ndarray]) -> tuple[float, float]:
        a = Adapter(kind, weights)
        fig = evaluate(a, x[val], y[val], ids, k=k)
        if q_cut:  # the served distribution: held-out queries' new-model neighbours among the fit documents
            return query_overlap(a, qx[q_val], x[train], y[train], K), fig["mean_cosine_to_old"]
        return fig["recall"]["adapter"], fig["mean_cosine_to_old"]

    # the vector-loss kinds fit on documents and query pairs together
    fx, fy = np.vstack([x[train], qx[q_train]]), np.vstack([y[train], qy[q_train]])
    ax, ay = np.vstack([x, qx]), np.vstack([y, qy])
    tried: dict[str, tuple[float, float]] = {}
    if kind == "procrustes":
        for centre in (False, True):
            tried[f"centre={centre}"] = score(_procrustes_affine(fx, fy, centre))
        best = max(tried, key=tried.get)
        weights = _procrustes_affine(ax, ay, best == "centre=True")
    elif kind == "lowrank":
        ranks = sorted({r for r in (32, 64, rank, 256, min(x.shape[1], y.shape[1])) if r <= min(x.shape[1], y.shape[1])})
        for ridge in RIDGES:
            for r, w in _lowrank_ranks(fx, fy, ranks, ridge):
                tried[f"ridge={ridge:g},rank={r}"] = score(w)
        best = max(tried, key=tried.get)
        ridge, r = (float(v.split("=")[1]) for v in best.split(","))
        weights = _lowrank(ax, ay, int(r), ridge)
    elif kind == "mlp":
        runs = {}
        for wd in WEIGHT_DECAYS:
            w, stop = _mlp(fx, fy, hidden, epochs, seed, weight_decay=wd, val=(x[val], y[val]))
            tried[f"weight_decay={wd:g},epochs={stop}"] = score(w)
            runs[f"weight_decay={wd:g},epochs={stop}"] = w
        best = max(tried, key=tried.get)
        weights = runs[best]
    else:
        runs = {}
        vq = qx[q_val] if q_cut else x[val]  # early stop on the held-out queries (or held-out documents)
        for t, alpha, hidden_units in LISTWISE_GRID:
            w, stop = _listwise(x[train], y[train], qx[q_train], qy[q_train], t, alpha, seed,
                                min(epochs, LISTWISE_EPOCHS), val=vq, hidden=int(hidden_units))
            name = f"temperature={t:g},alpha={alpha:g},hidden={int(hidden_units)},epochs={stop}"
            tried[name], runs[name] = score(w), w
        best = max(tried, key=tried.get)
        weights = runs[best]
    basis = "held-out queries" if q_cut else "held-out pairs"
    log.info("adapter %s tuned on %d %s: %s (neighbour overlap %.3f)", kind, q_cut or cut, basis, best, tried[best][0])
    figures = {"tuning": {"held_out_pairs": int(cut), "held_out_queries": int(q_cut), "basis": basis,
                          "k": K if q_cut else k, "chosen": best,
                          "tried": {k: {"neighbour_overlap": v[0], "mean_cosine": v[1]} for k, v in tried.items()}}}
    return Adapter(kind, weights, figures=figures)


def query_overlap(adapter: Adapter, q_new: np.ndarray, x_docs: np.ndarray, y_docs: np.ndarray, k: int = K) -> float:
    """How much of the new model's top-``k`` documents (``q_new`` over ``x_docs``) the adapted queries find
    among the same documents' old vectors ``y_docs``: the neighbour overlap of query-like texts."""
    kk = min(k, len(x_docs))
    truth = _top(_normalize(q_new), _normalize(x_docs), kk)
    got = _top(adapter.apply(q_new), _normalize(y_docs), kk)
    return float(np.mean([len(set(a) & set(t)) / kk for a, t in zip(got, truth)]))


def _procrustes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    u, _, vt = np.linalg.svd(x.T @ y, full_matrices=False)  # (d_new, r) (r,) (r, d_old), r = min(d_new, d_old)
    return (u @ vt).astype(np.float32)


def _procrustes_affine(x: np.ndarray, y: np.ndarray, centre: bool) -> dict[str, np.ndarray]:
    """Procrustes on the pairs, or on both sides centred (then a bias carries the old side's mean back)."""
    if not centre:
        return {"W": _procrustes(x, y)}
    mx, my = x.mean(axis=0), y.mean(axis=0)
    w = _procrustes(x - mx, y - my)
    return {"W": w, "b": (my - mx @ w).astype(np.float32)}


def _lowrank(x: np.ndarray, y: np.ndarray, rank: int, ridge: float = 1e-2) -> dict[str, np.ndarray]:
    return next(_lowrank_ranks(x, y, [rank], ridge))[1]


def _lowrank_ranks(x: np.ndarray, y: np.ndarray, ranks, ridge: float):
    """(rank, weights) of the reduced-rank ridge map for each rank: one solve and one SVD for all."""
    mx, my = x.mean(axis=0), y.mean(axis=0)
    xc, yc = x - mx, y - my
    a = np.linalg.solve(xc.T @ xc + ridge * len(x) / x.shape[1] * np.eye(x.shape[1], dtype=np.float32), xc.T @ yc)
    _, _, vt = np.linalg.svd(xc @ a, full_matrices=False)  # reduced-rank regression: top r output directions
    for rank in ranks:
        r = max(1, min(rank, *a.shape))
        w = (a @ (vt[:r].T @ vt[:r])).astype(np.float32)
        yield r, {"W": w, "b": (my - mx @ w).astype(np.float32)}


def _mlp(x: np.ndarray, y: np.ndarray, hidden: int, epochs: int, seed: int, weight_decay: float = 1e-5,
         val: tuple[np.ndarray, np.ndarray] | None = None, patience: int = 5):
    """The Procrustes map plus a residual MLP (cosine loss). With ``val`` pairs, training stops once their
    mean cosine has not improved for ``patience`` epochs and the best epoch's weights are returned, with
    that epoch: ``(weights, epoch)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a small model: more threads only add synchronisation (5x slower on a busy host)
    try:
        return _train_mlp(torch, x, y, hidden, epochs, seed, weight_decay, val, patience)
    finally:
        torch.set_num_threads(threads)


def _train_mlp(torch, x, y, hidden, epochs, seed, weight_decay, val, patience):
    torch.manual_seed(seed)
    base = torch.from_numpy(_procrustes(x, y))
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    l1 = torch.nn.Linear(x.shape[1], hidden)
    l2 = torch.nn.Linear(hidden, y.shape[1])
    torch.nn.init.zeros_(l2.weight)
    torch.nn.init.zeros_(l2.bias)  # starts as the Procrustes map: the residual only learns what it misses
    opt = torch.optim.AdamW([*l1.parameters(), *l2.parameters()], lr=1e-3, weight_decay=weight_decay)
    batch = 256

    def weights() -> dict[str, np.ndarray]:
        with torch.no_grad():
            return {"W": base.numpy().copy(), "W1": l1.weight.T.contiguous().numpy().copy(),
                    "b1": l1.bias.numpy().copy(), "W2": l2.weight.T.contiguous().numpy().copy(),
                    "b2": l2.bias.numpy().copy()}

    best, best_epoch, best_cos = weights(), 0, -np.inf
    if val is not None:
        best_cos = float(np.mean(np.sum(Adapter("mlp", best).apply(val[0]) * val[1], axis=1)))
    for epoch in range(1, epochs + 1):
        order = torch.randperm(len(xt))
        for i in range(0, len(xt), batch):
            idx = order[i:i + batch]
            pred = xt[idx] @ base + l2(torch.relu(l1(xt[idx])))
            loss = 1 - torch.nn.functional.cosine_similarity(pred, yt[idx]).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        if val is None:
            continue
        cos = float(np.mean(np.sum(Adapter("mlp", weights()).apply(val[0]) * val[1], axis=1)))
        if cos > best_cos:
            best, best_epoch, best_cos = weights(), epoch, cos
        elif epoch - best_epoch >= patience:
            break
    if val is None:
        return weights()
    return best, best_epoch


# (temperature, alpha, hidden units) tried by fit(tune=True): on MiniLM -> MPNet (bench/RESULTS.md) the
# residual layer keeps 0.56 of held-out queries' new-model top-10 against 0.52 for the affine map alone
LISTWISE_GRID = ((0.05, 0.0, 512), (0.05, 0.0, 0), (0.05, 0.5, 512))
LISTWISE_HIDDEN = 512
LISTWISE_EPOCHS = 16  # the most a tuned fit trains (it stops earlier once the held-out queries stop improving)
LISTWISE_DOCS = 16384  # the documents each query is ranked over (a seeded subset of the pairs; 3.7k -> 10.7k: +2.2 points)


def _listwise(x: np.ndarray, y: np.ndarray, qx: np.ndarray, qy: np.ndarray, temperature: float = 0.05,
              alpha: float = 0.0, seed: int = 0, epochs: int = LISTWISE_EPOCHS, val: np.ndarray | None = None,
              patience: int = 3, lr: float = 1e-3, batch: int = 256, hidden: int = LISTWISE_HIDDEN):
    """An affine map, started at Procrustes, trained so that the adapted query ranks the documents' old
    vectors as the new model ranks their new vectors: KL(softmax(q_new . D_new / t) || softmax(s A(q) . D_old))
    with a learnt scale ``s`` (the old model's cosines spread differently), plus ``alpha`` x the cosine loss
    to the pair's old vector. D is up to ``LISTWISE_DOCS`` of the pairs; the queries are ``qx`` and every
    pair's new vector (left out of its own list). With ``hidden`` > 0 the map is residual, affine plus a
    ReLU layer of ``hidden`` units (``W1``, ``b1``, ``W2``, ``b2``; ``W2`` starts at zero, so training starts
    from the Procrustes map): the ranking target is not linear in the query. With ``val`` (new-model vectors
    of held-out queries) the epoch with the best :func:`query_overlap` among D is kept: ``(weights, epoch)``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        docs = np.sort(rng.choice(len(x), min(len(x), LISTWISE_DOCS), replace=False))
        dn, do = torch.from_numpy(x[docs]), torch.from_numpy(y[docs])
        slot = np.full(len(x), -1)
        slot[docs] = np.arange(len(docs))  # a document query's own column, to leave it out
        qn = torch.from_numpy(np.vstack([qx, x]))
        qo = torch.from_numpy(np.vstack([qy, y]))
        own = torch.from_numpy(np.concatenate([np.full(len(qx), -1), slot]))
        w0 = _procrustes(x, y)
        w = torch.nn.Parameter(torch.from_numpy(w0.copy()))
        b = torch.nn.Parameter(torch.zeros(y.shape[1]))
        scale = torch.nn.Parameter(torch.tensor(1.0 / temperature))
        layer = {}
        if hidden:
            layer = {"W1": torch.randn(x.shape[1], hidden) / np.sqrt(x.shape[1]), "b1": torch.zeros(hidden),
                     "W2": torch.zeros(hidden, y.shape[1]), "b2": torch.zeros(y.shape[1])}
            layer = {k: torch.nn.Parameter(v) for k, v in layer.items()}
        opt = torch.optim.Adam([w, b, scale, *layer.values()], lr=lr)

        def mapped_of(q):
            m = q @ w + b
            if layer:
                m = m + torch.relu(q @ layer["W1"] + layer["b1"]) @ layer["W2"] + layer["b2"]
            return torch.nn.functional.normalize(m, dim=1)

        def weights() -> dict[str, np.ndarray]:
            with torch.no_grad():
                return {"W": w.numpy().copy(), "b": b.numpy().copy(), **{k: v.numpy().copy() for k, v in layer.items()}}

        def overlap() -> float:
            return query_overlap(Adapter("listwise", weights()), val, x[docs], y[docs])

        best, best_epoch = weights(), 0
        best_score = overlap() if val is not None else -np.inf
        for epoch in range(1, epochs + 1):
            order = torch.randperm(len(qn))
            for i in range(0, len(qn), batch):
                idx = order[i:i + batch]
                q = qn[idx]
                mapped = mapped_of(q)
                teacher = q @ dn.T / temperature
                student = scale * (mapped @ do.T)
                mine = own[idx]
                rows = torch.nonzero(mine >= 0).squeeze(1)
                if len(rows):
                    teacher[rows, mine[rows]] = -1e9
                    student = student.index_put((rows, mine[rows]), torch.tensor(-1e9))
                loss = torch.nn.functional.kl_div(torch.log_softmax(student, 1), torch.log_softmax(teacher, 1),
                                                  log_target=True, reduction="batchmean")
                if alpha:
                    loss = loss + alpha * (1 - torch.nn.functional.cosine_similarity(mapped, qo[idx]).mean())
                opt.zero_grad()
                loss.backward()
                opt.step()
            if val is None:
                continue
            score = overlap()
            if score > best_score:
                best, best_epoch, best_score = weights(), epoch, score
            elif epoch - best_epoch >= patience:
                break
        return weights() if val is None else (best, best_epoch)
    finally:
        torch.set_num_threads(threads)


# ---------------------------------------------------------------------------------------------------
# Judging


def evaluate(adapter: Adapter, x_new: np.ndarray, y_old: np.ndarray, ids: Sequence[str], k: int = K,
             queries: tuple[np.ndarray, np.ndarray, list[dict[str, float]]] | None = None) -> dict[str, Any]:
    """Recall@k of the three ways to answer a query over the held-out documents (both spaces of the
    same ids): ``adapter`` (new query -> adapter -> old index), ``new`` (new query -> new index) and
    ``old`` (old query -> old index). With ``queries`` = (new-model query vectors, old-model query
    vectors, relevant {id: grade} per query) recall is against the labels; without, the held-out
    documents are the queries, each left out of its own results, and the truth is the new model's own
    neighbours (so ``new`` is 1 by definition and ``adapter`` measures how much of it the adapter keeps)."""
    new_index, old_index = _normalize(x_new), _normalize(y_old)
    ids = np.asarray(ids, dtype=object)
    if queries is not None:
        q_new, q_old, relevant = queries
        got = {"adapter": _top(adapter.apply(q_new), old_index, k), "new": _top(_normalize(q_new), new_index, k),
               "old": _top(_normalize(q_old), old_index, k)}
        recall = {name: float(np.mean([_recall(ids[r], rel, k) for r, rel in zip(rows, relevant)]))
                  for name, rows in got.items()}
        basis = f"{len(relevant)} labelled queries"
    else:
        truth = _top(new_index, new_index, k, self_excluded=True)
        got = {"adapter": _top(adapter.apply(x_new), old_index, k, self_excluded=True),
               "new": truth, "old": _top(old_index, old_index, k, self_excluded=True)}
        recall = {name: float(np.mean([len(set(a) & set(t)) / k for a, t in zip(rows, truth)]))
                  for name, rows in got.items()}
        basis = f"neighbour overlap with the new model's top-{k} on {len(ids)} held-out documents"
    cos = float(np.mean(np.sum(adapter.apply(x_new) * old_index, axis=1)))
    out = {"k": k, "basis": basis, "recall": {n: round(v, 4) for n, v in recall.items()},
           "mean_cosine_to_old": round(cos, 4)}
    out["recovery"] = round(recall["adapter"] / recall["new"], 4) if recall["new"] else None
    return out


def _top(queries: np.ndarray, index: np.ndarray, k: int, self_excluded: bool = False) -> np.ndarray:
    scores = queries @ index.T
    if self_excluded:
        np.fill_diagonal(scores, -np.inf)
    kk = min(k, index.shape[0] - (1 if self_excluded else 0))
    part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
    order = np.take_along_axis(scores, part, axis=1).argsort(axis=1)[:, ::-1]
    return np.take_along_axis(part, order, axis=1)


def _recall(found: Sequence[str], relevant: dict[str, float], k: int) -> float:
    rel = {d for d, g in relevant.items() if g > 0}
    return len(rel & set(list(found)[:k])) / min(len(rel), k) if rel else 0.0


# ---------------------------------------------------------------------------------------------------
# The command: pairs from an output, fit every kind, keep the best


def fit_output(output: str | Location, old: str | None = None, old_model: str | None = None,
               queries: str | None = None, kinds: Sequence[str] = KINDS, sample: int = DEFAULT_SAMPLE,
               rank: int = 128, seed: int = 0, save: bool = True, query_log: str | None = None) -> dict[str, Any]:
    """Fit the adapters of ``kinds`` on up to ``sample`` pairs of ``output`` and ``old`` (an export
    folder or store URI; default: the shards' own ``old_embedding`` column), judge them on held-out
    pairs, and save the best with the output. Returns the report (every kind's figures, the chosen one).

    ``query_log``: a file of query texts (one a line, or JSON Lines with a ``text`` field; the first
    ``sample`` distinct ones are read), embedded by the output's model and by ``old_model``: query-like
    pairs added to every kind's fit (:func:`fit`'s ``queries``)."""
    from reembed.manifest import Manifest

    t0 = time.monotonic()
    loc = output if isinstance(output, Location) else Location.from_uri(output)
    manifest = Manifest.load(loc)
    if manifest is None:
        raise AdapterError(f"{loc.display()}: no manifest.json here (not a reembed output)")
    for kind in kinds:
        if kind not in KINDS:
            raise AdapterError(f"unknown adapter kind {kind!r}; use one of {', '.join(KINDS)}")
    if query_log and not old_model:
        raise AdapterError("--query-log needs --old-model: the old model embeds the logged queries for the old side")
    logged = read_query_log(query_log, sample) if query_log else None  # a bad file fails before the pairs are read
    ids, x_new, y_old = pairs(loc, manifest, old, sample, seed)
    if len(ids) < 50:
        raise AdapterError(f"{loc.display()}: only {len(ids)} documents are both committed and in the old store; "
                           "an adapter needs at least 50 pairs (commit more shards, or check --old)")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(ids))
    cut = max(1, int(len(ids) * HOLDOUT))
    test, train = order[:cut], order[cut:]
    labelled = _labelled(queries, manifest, old_model, ids[test], x_new.shape[1], y_old.shape[1]) if queries else None
    query_pairs = _embed_both(logged, manifest, old_model, x_new.shape[1], y_old.shape[1]) if logged else None
    figures, fitted = {}, {}
    for kind in kinds:
        t = time.monotonic()
        a = fit(x_new[train], y_old[train], kind, rank=rank, seed=seed, tune=True, queries=query_pairs)
        fit_s = time.monotonic() - t
        figures[kind] = evaluate(a, x_new[test], y_old[test], ids[test], queries=labelled)
        if "tuning" in a.figures:
            figures[kind]["tuning"] = a.figures["tuning"]
        figures[kind]["fit_seconds"] = round(fit_s, 3)
        figures[kind]["us_per_query"] = _query_cost(a, x_new[test])
        fitted[kind] = a
        log.info("adapter %s: recall@%d %.3f (new %.3f, old %.3f), recovery %s, fit %.1f s", kind, K,
                 figures[kind]["recall"]["adapter"], figures[kind]["recall"]["new"], figures[kind]["recall"]["old"],
                 figures[kind]["recovery"], fit_s)
    best = max(kinds, key=lambda k: (figures[k]["recall"]["adapter"], -KINDS.index(k)))
    chosen = fitted[best]
    chosen.new_model = {k: manifest.model.get(k) for k in ("name", "dimension", "fingerprint")}
    chosen.old_model = _old_identity(old, old_model, y_old.shape[1])
    chosen.figures = figures[best]
    report = {"output": loc.uri, "pairs": len(ids), "train": len(train), "held_out": len(test),
              "query_pairs": len(logged) if logged else 0, "kinds": figures,
              "chosen": best, "new_model": chosen.new_model, "old_model": chosen.old_model,
              "seconds": round(time.monotonic() - t0, 3)}
    if save:
        chosen.version = save_adapter(loc, chosen, report)
        report["version"] = chosen.version
    return report


def pairs(loc: Location, manifest, old: str | None, sample: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Up to ``sample`` (ids, new vectors, old vectors) of committed documents, from a seeded random
    subset of shards (read until enough rows): O(sample), whatever the size of the output."""
    from reembed.write import read_shard_table

    committed = manifest.committed
    shards = list(committed)
    if not shards:
        raise AdapterError(f"{loc.display()}: no committed shard yet; run the job first (a partial run is enough)")
    rng = np.random.default_rng(seed)
    rng.shuffle(shards)
    ids, new, olds, rows = [], [], [], 0
    for shard in shards:
        rec = committed[shard]
        names = _shard_columns(loc, rec)
        cols = [S.ID, S.EMBEDDING] + ([OLD_EMBEDDING] if old is None and OLD_EMBEDDING in names else [])
        if old is None and OLD_EMBEDDING not in names:
            raise AdapterError(f"{loc.display()}: the shards carry no {OLD_EMBEDDING} column; pass the old store or "
                               "export with --old")
        t = read_shard_table(loc, rec, cols, key=f"shards.{shard:05d}")
        ids.extend(S.id_strings(t.column(S.ID))[0].to_pylist())
        new.append(S.embedding_matrix(t.column(S.EMBEDDING)))
        if old is None:
            olds.append(S.embedding_matrix(t.column(OLD_EMBEDDING)))
        rows += t.num_rows
        if rows >= sample:
            break
    ids_arr, x = np.asarray(ids, dtype=object), np.vstack(new)
    if old is None:
        y = np.vstack(olds)
    else:
        found = lookup_old(old, loc.settings, ids_arr.tolist())
        keep = np.array([i in found for i in ids_arr.tolist()], dtype=bool)
        ids_arr, x = ids_arr[keep], x[keep]
        y = np.vstack([found[i] for i in ids_arr.tolist()]) if keep.any() else np.zeros((0, 1), np.float32)
    if len(ids_arr) > sample:
        pick = np.sort(rng.choice(len(ids_arr), sample, replace=False))
        ids_arr, x, y = ids_arr[pick], x[pick], y[pick]
    return ids_arr, x, y


def lookup_old(old: str, settings: Any, ids: list[str]) -> dict[str, np.ndarray]:
    """The old vectors of ``ids`` (a bounded sample) from an export folder (Ray tasks, one per Parquet
    part, each returning only its matches) or a vector store URI (paged through in this process: export a
    large store first)."""
    from reembed.migrate.stores import is_store_uri

    if is_store_uri(old):
        from reembed.migrate.stores import open_store

        want, out = set(ids), {}
        with open_store(old) as store:
            for b in store.batches():
                for i, v in zip(b.ids, b.vectors):
                    if str(i) in want:
                        out[str(i)] = np.asarray(v, np.float32)
        return out
    import ray

    from reembed.cluster import get, init_ray
    from reembed.storage import list_inputs

    old_loc, files = list_inputs(Location.from_uri(old, settings), "*.parquet")
    if not files:
        raise AdapterError(f"{old}: no Parquet parts here (expected an export folder with id and {OLD_EMBEDDING})")
    init_ray(None)
    wanted = ray.put(sorted(set(ids)))
    found: dict[str, np.ndarray] = {}
    for got in get([_part_matches.remote(old_loc, f.path, wanted) for f in files]):
        found.update(got)
    return found


def _part_matches_fn(loc: Location, path: str, wanted: list[str]) -> dict[str, np.ndarray]:
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    with loc.fs.open_input_file(path) as f:
        pf = pq.ParquetFile(f)
        if S.ID not in pf.schema_arrow.names or OLD_EMBEDDING not in pf.schema_arrow.names:
            raise AdapterError(f"{path}: an export part needs columns id and {OLD_EMBEDDING} "
                               f"(has {', '.join(pf.schema_arrow.names)})")
        out = {}
        for batch in pf.iter_batches(columns=[S.ID, OLD_EMBEDDING], batch_size=65_536):
            ids = S.id_strings(batch.column(0))[0]
            mask = pc.is_in(ids, value_set=_arrow_strings(wanted))
            if not pc.any(mask).as_py():
                continue
            hit = np.flatnonzero(mask.to_numpy(zero_copy_only=False))
            vecs = S.embedding_matrix(batch.column(1).take(hit))
            for i, v in zip(ids.take(hit).to_pylist(), vecs):
                out[i] = v
        return out


def _arrow_strings(values: list[str]):
    import pyarrow as pa

    return pa.array(values, pa.string())


def _remote(fn: Callable) -> Any:
    """``fn`` as a Ray task, made on first use (Ray is imported only when an export is read)."""
    class _Lazy:
        _task = None

        def remote(self, *args):
            if _Lazy._task is None:
                import ray

                _Lazy._task = ray.remote(num_cpus=1, max_retries=3)(fn)
            return _Lazy._task.remote(*args)

    return _Lazy()


_part_matches = _remote(_part_matches_fn)


def _shard_columns(loc: Location, rec: dict[str, Any]) -> list[str]:
    import pyarrow.parquet as pq

    from reembed.manifest import inside_output

    with loc.fs.open_input_file(loc.path(inside_output(loc, rec.get("path"), "shard path"))) as f:
        return pq.ParquetFile(f).schema_arrow.names


def _labelled(path: str, manifest, old_model: str | None, held_ids: np.ndarray, d_new: int, d_old: int):
    """The labelled queries whose relevant documents are held out, embedded by both models."""
    from reembed.indexes.search import query_embedder, text_embedder
    from reembed.validation.queries import load_queries

    if not old_model:
        raise AdapterError("--queries needs --old-model: the old model embeds the queries for the old side")
    held = set(held_ids.tolist())
    qs = [q for q in load_queries(path) if any(d in held for d in q.relevant)]
    if not qs:
        raise AdapterError(f"{path}: none of the labelled documents is among the {len(held)} held-out pairs; "
                           "raise --sample or check that the labels use the output's ids")
    texts = [q.query for q in qs]
    q_new = query_embedder(manifest.model, expect_dim=d_new)(texts)
    q_old = text_embedder(old_model, None, "cpu", expect_dim=d_old)(texts)
    return q_new, q_old, [q.relevant for q in qs]


def read_query_log(path: str, limit: int = DEFAULT_SAMPLE) -> list[str]:
    """The first ``limit`` distinct texts of a query log: one query a line, or JSON Lines (the file starts
    with ``{``) with a ``text`` field. Blank lines are skipped."""
    from reembed.storage import json_lines

    try:
        data = Location.from_uri(path).read_bytes()
    except (FileNotFoundError, IsADirectoryError) as e:
        raise AdapterError(f"{path}: no such query log; give a file of query texts (one a line, or JSON Lines "
                           "with a \"text\" field)") from e
    texts: dict[str, None] = {}
    if data.lstrip()[:1] == b"{":
        for n, obj in json_lines(data, path, AdapterError):
            text = obj.get("text")
            if not isinstance(text, str) or not text.strip():
                raise AdapterError(f"{path}:{n}: \"text\" must be a non-empty string (a JSON Lines query log "
                                   "has one {\"text\": ...} a line)")
            texts[text.strip()] = None
            if len(texts) >= limit:
                break
    else:
        try:
            lines = data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise AdapterError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start}); a query log is one query "
                               "a line, or JSON Lines with a \"text\" field") from e
        for line in lines:
            if line.strip():
                texts[line.strip()] = None
                if len(texts) >= limit:
                    break
    if not texts:
        raise AdapterError(f"{path}: no queries in this query log (empty file)")
    return list(texts)


def _embed_both(texts: list[str], manifest, old_model: str, d_new: int, d_old: int) -> tuple[np.ndarray, np.ndarray]:
    """The query log's texts embedded by the output's model and by the old model: query-like pairs."""
    from reembed.indexes.search import query_embedder, text_embedder

    t = time.monotonic()
    q_new = query_embedder(manifest.model, expect_dim=d_new)(texts)
    q_old = text_embedder(old_model, None, "cpu", expect_dim=d_old)(texts)
    log.info("query log: %d texts embedded by both models in %.1f s", len(texts), time.monotonic() - t)
    return np.asarray(q_new, np.float32), np.asarray(q_old, np.float32)


def _query_cost(adapter: Adapter, x: np.ndarray, n: int = 1000) -> float:
    """Microseconds to map one query (a batch of one, as a server would)."""
    q = x[:1]
    adapter.apply(q)
    t = time.perf_counter()
    for _ in range(n):
        adapter.apply(q)
    return round((time.perf_counter() - t) / n * 1e6, 2)


def _old_identity(old: str | None, old_model: str | None, dim: int) -> dict[str, Any]:
    from reembed.migrate.stores.base import redact

    source = redact(old) if old else f"the shards' {OLD_EMBEDDING} column"
    return {"name": old_model, "dimension": dim, "fingerprint": old_fingerprint(old_model, dim) if old_model else None,
            "source": source}


def old_fingerprint(old_model: str, dim: int) -> str:
    """How an adapter names the old model it was fitted for (``name|dimension``)."""
    return hashlib.sha256(f"{old_model}|{dim}".encode()).hexdigest()[:16]


# ---------------------------------------------------------------------------------------------------
# Saving and loading, next to the output


def save_adapter(loc: Location, adapter: Adapter, report: dict[str, Any]) -> int:
    """Publish ``adapter`` as the next version under ``OUTPUT/adapters/`` and return it. The weights go
    under their own sha256 (rewriting them is harmless); the version is taken by a create-only write of
    its ``adapter.json``, so two fits never share one."""
    from reembed.commits import create_only

    buf = io.BytesIO()
    np.savez(buf, **adapter.weights)
    data = buf.getvalue()
    digest = hashlib.sha256(data).hexdigest()
    weights = f"weights-{digest[:16]}.npz"
    loc.publish(data, ADAPTERS, weights)
    for _ in range(20):
        version = max(versions(loc), default=0) + 1
        meta = {"format": 1, "kind": adapter.kind, "version": version, "new_model": adapter.new_model,
                "old_model": adapter.old_model, "figures": adapter.figures, "report": report,
                "weights": weights, "sha256": digest}
        if create_only(loc, json.dumps(meta, indent=1).encode(), ADAPTERS, f"v{version:04d}.json"):
            log.info("adapter v%d (%s) saved under %s", version, adapter.kind, loc.display(ADAPTERS))
            return version
    raise AdapterError(f"{loc.display(ADAPTERS)}: could not take a new version (concurrent fits?); retry")


def versions(loc: Location) -> list[int]:
    if not loc.exists(ADAPTERS):
        return []
    names = [i.base_name for i in loc.list(ADAPTERS)]
    return sorted(int(n[1:5]) for n in names if len(n) == 10 and n.startswith("v") and n[1:5].isdigit()
                  and n.endswith(".json"))


def saved_figures(loc: Location) -> dict[str, Any] | None:
    """The newest saved adapter's recovery figures, from its fit record (``adapters/vNNNN.json``; the weights
    are not read): version, kind, models, recall@k of adapter / new / old, recovery, basis, microseconds a
    query. None when the output has no adapter; ``{"error": ...}`` for a record that cannot be read."""
    have = versions(loc)
    if not have:
        return None
    name = f"v{have[-1]:04d}.json"
    try:
        meta = json.loads(loc.read_bytes(ADAPTERS, name))
        fig = meta["figures"]
        return {"version": meta["version"], "kind": meta["kind"], "record": f"{ADAPTERS}/{name}",
                "new_model": (meta.get("new_model") or {}).get("name"), "old_model": meta.get("old_model") or {},
                "k": fig.get("k"), "basis": fig.get("basis"), "recall": fig.get("recall") or {},
                "recovery": fig.get("recovery"), "us_per_query": fig.get("us_per_query"),
                "pairs": (meta.get("report") or {}).get("pairs"), "held_out": (meta.get("report") or {}).get("held_out")}
    except (ValueError, KeyError, TypeError, OSError) as e:
        return {"version": have[-1], "record": f"{ADAPTERS}/{name}", "error": f"unreadable fit record ({e})"}


def load_adapter(output: str | Location, version: int | None = None) -> Adapter:
    """The latest (or ``version``) adapter saved with ``output``; its weights are checked by sha256 and
    their file name must stay inside the output."""
    from reembed.manifest import inside_output

    loc = output if isinstance(output, Location) else Location.from_uri(output)
    have = versions(loc)
    if not have:
        raise AdapterError(f"{loc.display()}: no adapter here; fit one with `reembed adapter fit {loc.display()} --old ...`")
    version = version or have[-1]
    if version not in have:
        raise AdapterError(f"{loc.display()}: no adapter v{version} (have {', '.join(f'v{v}' for v in have)})")
    name = f"v{version:04d}.json"
    try:
        meta = json.loads(loc.read_bytes(ADAPTERS, name))
        rel = inside_output(loc, f"{ADAPTERS}/{meta['weights']}", f"{ADAPTERS}/{name}: weights")
        data = loc.read_bytes(rel)
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
        raise AdapterError(f"{loc.display(ADAPTERS, name)}: not a readable adapter record ({e}); fit again") from e
    if hashlib.sha256(data).hexdigest() != meta.get("sha256"):
        raise AdapterError(f"{loc.display(rel)}: sha256 does not match {name} (damaged); fit again with "
                           "`reembed adapter fit`")
    with np.load(io.BytesIO(data), allow_pickle=False) as z:
        weights = {k: z[k] for k in z.files}
    return Adapter(meta["kind"], weights, meta["new_model"], meta["old_model"], meta.get("figures", {}), version)


def adapted_query(text: str, adapter: Adapter, new_store, old_store, k: int = K, method: str = "rrf",
                  depth: int | None = None, weights: dict[str, float] | None = None, rrf_k: int | None = None) -> list:
    """One embedding of ``text`` with the new model: the new store is searched with it, the old store
    with its adapted vector, and the two lists are fused (:func:`reembed.migrate.dual.fuse`)."""
    from reembed.migrate.dual import RRF_K, fuse

    depth = depth or max(2 * k, 20)
    q = new_store.embed([text])
    results = {new_store.name: new_store.search(q, depth)[0],
               old_store.name: old_store.search(adapter.apply(q), depth)[0]}
    return fuse(results, method, weights, rrf_k or RRF_K)[:k]


def _normalize(m: np.ndarray) -> np.ndarray:
    m = np.asarray(m, dtype=np.float32)
    n = np.linalg.norm(m, axis=1, keepdims=True)
    return m / np.where(n > 0, n, 1.0)
