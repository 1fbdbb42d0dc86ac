"""The validation report as HTML (``OUTPUT/validation/report.html``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from reembed import report as R


def render_html(r: dict[str, Any]) -> str:
    g = r["gates"]
    st = r.get("settings", {})
    verdict = "PASSED" if r["passed"] else "FAILED"
    summary = R.table([{"gate": n, "result": gate["status"], "message": gate.get("message", "")} for n, gate in g.items()],
                      ["gate", "result", "message"], failing=[(i, "result") for i, gate in enumerate(g.values())
                                                            if gate["status"] == "fail"])
    old = r.get("old") or {}
    compared = (f"Compared against the old store {old['source']}"
                + (f", queried with the old model {old['model']}" if old.get("model") else ", no old model given")
                if old.get("source") else "No old store given: the old-vs-new gates were skipped")
    sections = [
        R.paragraph(f"{verdict}: {r['output']} - model {r['model']['name']} ({r['model']['dimension']}-d, fingerprint "
                    f"{r['fingerprint']}), {r['rows']} rows, validated {r['created_at']}", "pass" if r["passed"] else "fail"),
        R.paragraph(compared + "."),
        R.section("Gates", summary),
    ]
    integ = g["integrity"]
    sections.append(_integrity(integ, st.get("norm_tol")))
    if integ.get("damaged"):
        sections.append(R.section(
            "Damaged shards", R.paragraph(f"{len(integ['damaged'])} committed shard(s) missing, not matching their "
                                          "sha256, or unreadable: `reembed repair OUTPUT` re-embeds exactly these"),
            R.table(integ["damaged"], ["shard", "reason", "path", "message"])))
    sp = g["sanity_pairs"]
    if sp.get("pairs"):
        bars = {f"{'P' if p['label'] == 'paraphrase' else 'U'}{i}: {p['a'][:22]}": max(p["cosine"], 0.0) for i, p in enumerate(sp["pairs"])}
        failing = [label for label, p in zip(bars, sp["pairs"]) if p.get("passed") is False]
        lines = {"paraphrase min": st.get("paraphrase_min"), "unrelated max": st.get("unrelated_max")}
        sections.append(R.section("Sanity pairs", R.paragraph(sp["message"] + " (P: paraphrase, must reach the "
                                                              "paraphrase line; U: unrelated, must stay under its line)"),
                                  R.bar_chart(bars, thresholds=lines, failing=failing, top=1.0),
                                  R.table(sp["pairs"], ["label", "a", "b", "cosine", "threshold", "passed", "source"],
                                          verdicts=["passed"],
                                          failing=[(i, "cosine") for i, p in enumerate(sp["pairs"]) if p.get("passed") is False])))
    ann = g["ann_recall"]
    recall = ann.get("recall") or {}
    floor = st.get("min_ann_recall")
    sections.append(R.section(f"ANN recall@{ann.get('k', '')}", R.paragraph(ann["message"]),
                              R.bar_chart(recall, thresholds={"minimum": floor}, top=1.0,
                                          failing=[n for n, v in recall.items() if floor is not None and v < floor])
                              if recall else ""))
    ov = g["overlap"]
    parts = [R.paragraph(ov["message"])]
    if ov.get("histogram"):
        parts.append(R.bar_chart({f"{i / 10:.1f}-{(i + 1) / 10:.1f}": float(c) for i, c in enumerate(ov["histogram"])}, unit=" docs"))
    sections.append(R.section("Old vs new neighbour overlap", *parts))
    sections.append(_ab(g["ab"], st.get("ab_tolerance")))
    if r.get("quantization"):
        sections.append(_storage(r["quantization"]))
    if r.get("adapter"):
        sections.append(_adapter(r["adapter"]))
    return R.page(f"reembed validation: {verdict}", sections)


def _integrity(integ: dict[str, Any], tol: float | None) -> str:
    """Counts, then each shard's largest distance of a vector norm from 1 (the unit norm every vector of
    a normalizing model must have, within ``tol``): a chart of norms on a 0-1.1 axis would show nothing."""
    shards = [s for s in integ.get("per_shard", []) if s.get("norm_mean") is not None]
    parts = [R.paragraph(integ["message"]),
             R.table([{k: integ.get(k) for k in ("rows", "shards", "non_finite", "zero", "bad_norm", "bad_dimension",
                                                 "row_mismatch", "corrupt")}])]
    if shards:
        dev = [(s["shard"], max(abs(s["norm_max"] - 1.0), abs(1.0 - s["norm_min"]))) for s in shards]
        parts.append(R.line_chart({"max |norm - 1|": dev}, x_label="shard", y_label="largest |norm - 1| in the shard",
                                  thresholds={"tolerance": tol}))
    else:
        parts.append(R.paragraph("(no readable shards)"))
    return R.section("Integrity", *parts)


def _storage(q: dict[str, Any]) -> str:
    """The storage options' table: bytes per vector and recall@10 against float32 exact search, and a bar each."""
    rows = [{"option": o["label"], "bytes / vector": o["bytes_per_vector"], "x smaller": o["compression"],
             f"recall@{q['k']}": o["recall_at_10"], "how": o["how"]} for o in q["options"]]
    bars = {o["label"]: o["recall_at_10"] for o in q["options"] if o["recall_at_10"] is not None}
    return R.section(f"Storage options: bytes per vector and recall@{q['k']}",
                     R.paragraph(f"Each option against {q['reference']} on the same {q['queries']} queries "
                                 f"(a sampled document left out of its own results). {q['note']}."),
                     R.bar_chart(bars, top=1.0), R.table(rows))


def _adapter(a: dict[str, Any]) -> str:
    """The saved drift adapter's recovery, from its fit record."""
    if a.get("error"):
        return R.section("Drift adapter", R.paragraph(adapter_line(a), "fail"))
    r = a.get("recall") or {}
    bars = {name: r[key] for name, key in (("old query -> old store", "old"), ("new query -> adapter -> old store", "adapter"),
                                           ("new query -> new store", "new")) if r.get(key) is not None}
    return R.section(f"Drift adapter: recall@{a.get('k')} and recovery", R.paragraph(adapter_line(a)),
                     R.bar_chart(bars, top=1.0))


def adapter_line(a: dict[str, Any]) -> str:
    """One line on the saved drift adapter's recovery (or why its record could not be read)."""
    if a.get("error"):
        return f"adapter v{a['version']}: {a['error']} ({a['record']})"
    r = a.get("recall") or {}
    rec = a.get("recovery")
    return (f"adapter v{a['version']} ({a['kind']}): recall@{a.get('k')} {r.get('adapter')} through the adapter, new "
            f"{r.get('new')}, old {r.get('old')}: recovery {'-' if rec is None else f'{100 * rec:.1f}%'} "
            f"({a.get('basis')}, {a.get('held_out')} held-out pairs; {a['record']})")


def _ab(ab: dict[str, Any], tol: float | None) -> str:
    parts = [R.paragraph(ab["message"])]
    if ab.get("new") and ab.get("old"):
        parts.append(R.grouped_bars({m: (ab["old"][m], ab["new"][m]) for m in ab["new"]}, tolerance=tol))
    elif ab.get("new"):
        parts.append(R.bar_chart({f"new {m}": v for m, v in ab["new"].items()}, top=1.0))
    rows = ab.get("per_query") or []
    if rows:
        worse = [(i, f"new_{m}") for i, q in enumerate(rows) for m in ("recall", "ndcg@10")
                 if f"old_{m}" in q and tol is not None and q[f"new_{m}"] < q[f"old_{m}"] - tol]
        if worse:
            parts.append(R.paragraph(f"{len({i for i, _ in worse})} of {len(rows)} queries rank worse with the new "
                                     f"model by more than {tol} (marked)."))
        parts.append(R.table(rows, failing=worse))
    return R.section("Labelled queries: old vs new", *parts)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
