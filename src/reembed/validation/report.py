"""The validation report as HTML (``OUTPUT/validation/report.html``)."""

from __future__ import annotations

from typing import Any

import numpy as np

from reembed import report as R


def render_html(r: dict[str, Any]) -> str:
    g = r["gates"]
    verdict = "PASSED" if r["passed"] else "FAILED"
    summary = R.table([{"gate": n, "result": gate["status"], "message": gate.get("message", "")} for n, gate in g.items()],
                      ["gate", "result", "message"])
    sections = [
        R.paragraph(f"{verdict}: {r['output']} - model {r['model']['name']} ({r['model']['dimension']}-d, fingerprint "
                    f"{r['fingerprint']}), {r['rows']} rows, validated {r['created_at']}", "pass" if r["passed"] else "fail"),
        R.section("Gates", summary),
    ]
    integ = g["integrity"]
    norms = [s for s in integ.get("per_shard", []) if s.get("norm_mean") is not None]
    sections.append(R.section(
        "Integrity", R.paragraph(integ["message"]),
        R.table([{k: integ.get(k) for k in ("rows", "shards", "non_finite", "zero", "bad_norm", "bad_dimension", "row_mismatch", "corrupt")}]),
        R.line_chart({"min norm": [(s["shard"], s["norm_min"]) for s in norms],
                      "mean norm": [(s["shard"], s["norm_mean"]) for s in norms],
                      "max norm": [(s["shard"], s["norm_max"]) for s in norms]}, x_label="shard", y_label="vector norm")
        if norms else R.paragraph("(no readable shards)")))
    if integ.get("damaged"):
        sections.append(R.section(
            "Damaged shards", R.paragraph(f"{len(integ['damaged'])} committed shard(s) missing, not matching their "
                                          "sha256, or unreadable: `reembed repair OUTPUT` re-embeds exactly these"),
            R.table(integ["damaged"], ["shard", "reason", "path", "message"])))
    sp = g["sanity_pairs"]
    if sp.get("pairs"):
        bars = {f"{'P' if p['label'] == 'paraphrase' else 'U'}{i}: {p['a'][:22]}": max(p["cosine"], 0.0) for i, p in enumerate(sp["pairs"])}
        sections.append(R.section("Sanity pairs", R.paragraph(sp["message"]), R.bar_chart(bars),
                                  R.table(sp["pairs"], ["label", "a", "b", "cosine", "threshold", "passed", "source"])))
    ann = g["ann_recall"]
    sections.append(R.section(f"ANN recall@{ann.get('k', '')}", R.paragraph(ann["message"]),
                              R.bar_chart(ann["recall"]) if ann.get("recall") else ""))
    ov = g["overlap"]
    parts = [R.paragraph(ov["message"])]
    if ov.get("histogram"):
        parts.append(R.bar_chart({f"{i / 10:.1f}-{(i + 1) / 10:.1f}": float(c) for i, c in enumerate(ov["histogram"])}, unit=" docs"))
    sections.append(R.section("Old vs new neighbour overlap", *parts))
    ab = g["ab"]
    parts = [R.paragraph(ab["message"])]
    if ab.get("new"):
        bars = {f"new {m}": v for m, v in ab["new"].items()}
        if ab.get("old"):
            bars = {x: y for m in ab["new"] for x, y in ((f"old {m}", ab["old"][m]), (f"new {m}", ab["new"][m]))}
        parts.append(R.bar_chart(bars))
        parts.append(R.table(ab["per_query"]))
    sections.append(R.section("Labelled queries: old vs new", *parts))
    return R.page(f"reembed validation: {verdict}", sections)


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serializable: {type(o).__name__}")
