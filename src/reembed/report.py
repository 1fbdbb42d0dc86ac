"""Self-contained HTML reports with inline SVG charts: no plotting library, no network, one file.

    page = report.page("Validation", [report.section("Norms", report.bar_chart({"v1": 1.0, "v2": 0.98})),
                                      report.table(rows, columns)])
    report.write(loc_or_path, page)
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Iterable, Sequence

_COLORS = ("#3b6fb6", "#e07b39", "#4a9a5b", "#b84a4a", "#7d5ba6", "#8c6d31")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:960px;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}.fail{color:#b00;font-weight:bold}
.pass{color:#070;font-weight:bold}svg text{font-size:11px;fill:#333}
"""


def page(title: str, sections: Iterable[str]) -> str:
    body = "\n".join(sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>\n{body}\n</body></html>\n")


def section(title: str, *parts: str) -> str:
    return f"<h2>{_e(title)}</h2>\n" + "\n".join(parts)


def paragraph(text: str, cls: str = "") -> str:
    return f"<p class='{cls}'>{_e(text)}</p>" if cls else f"<p>{_e(text)}</p>"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)
    body = "".join("<tr>" + "".join(f"<td>{_fmt(r.get(c))}</td>" for c in columns) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def bar_chart(values: dict[str, float], unit: str = "", width: int = 640, bar_height: int = 22) -> str:
    """Horizontal bars, one per label."""
    if not values:
        return "<p>(no data)</p>"
    top = max(max(values.values()), 1e-12)
    label_w, pad = 180, 70
    h = bar_height * len(values) + 10
    parts = [f"<svg width='{width}' height='{h}' role='img'>"]
    for i, (label, v) in enumerate(values.items()):
        y = 5 + i * bar_height
        w = max(0.0, (width - label_w - pad) * v / top)
        parts.append(f"<text x='{label_w - 6}' y='{y + bar_height * 0.65:.0f}' text-anchor='end'>{_e(label)}</text>")
        parts.append(f"<rect x='{label_w}' y='{y + 3}' width='{w:.1f}' height='{bar_height - 6}' fill='{_COLORS[i % len(_COLORS)]}'/>")
        parts.append(f"<text x='{label_w + w + 4:.1f}' y='{y + bar_height * 0.65:.0f}'>{_fmt(v)}{_e(unit)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def line_chart(series: dict[str, Sequence[tuple[float, float]]], x_label: str = "", y_label: str = "",
               width: int = 640, height: int = 320, log_x: bool = False) -> str:
    """One polyline per series of (x, y) points, with axes and a legend."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return "<p>(no data)</p>"
    import math

    fx = (lambda x: math.log2(max(x, 1e-12))) if log_x else (lambda x: x)
    xs, ys = [fx(p[0]) for p in pts], [p[1] for p in pts]
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y0, y1 = 0.0, max(ys) * 1.1 if max(ys) > 0 else 1.0
    left, right, top, bottom = 60, 20, 20, 40
    sx = lambda x: left + (fx(x) - x0) / (x1 - x0) * (width - left - right)  # noqa: E731
    sy = lambda y: height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)  # noqa: E731
    parts = [f"<svg width='{width}' height='{height}' role='img'>",
             f"<line x1='{left}' y1='{height - bottom}' x2='{width - right}' y2='{height - bottom}' stroke='#888'/>",
             f"<line x1='{left}' y1='{top}' x2='{left}' y2='{height - bottom}' stroke='#888'/>",
             f"<text x='{(width + left) / 2:.0f}' y='{height - 6}' text-anchor='middle'>{_e(x_label)}</text>",
             f"<text x='14' y='{(height - bottom + top) / 2:.0f}' transform='rotate(-90 14 {(height - bottom + top) / 2:.0f})' "
             f"text-anchor='middle'>{_e(y_label)}</text>",
             f"<text x='{left - 4}' y='{top + 4}' text-anchor='end'>{_fmt(y1)}</text>",
             f"<text x='{left - 4}' y='{height - bottom}' text-anchor='end'>0</text>"]
    for i, (name, s) in enumerate(series.items()):
        color = _COLORS[i % len(_COLORS)]
        s = sorted(s)
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in s)
        parts.append(f"<polyline fill='none' stroke='{color}' stroke-width='2' points='{path}'/>")
        for x, y in s:
            parts.append(f"<circle cx='{sx(x):.1f}' cy='{sy(y):.1f}' r='3' fill='{color}'><title>{_e(name)}: "
                         f"{_fmt(x)} -> {_fmt(y)}</title></circle>")
            parts.append(f"<text x='{sx(x):.1f}' y='{height - bottom + 14}' text-anchor='middle'>{_fmt(x)}</text>")
        parts.append(f"<text x='{width - right - 4}' y='{top + 14 * (i + 1)}' text-anchor='end' fill='{color}'>{_e(name)}</text>")
    parts.append("</svg>")
    return "".join(parts)


def write(target: str | Path, html_text: str) -> Path | None:
    """Write a report to a local path (a ``storage.Location`` is also accepted: ``(loc, 'rel/path.html')``)."""
    if isinstance(target, tuple):
        loc, rel = target
        loc.write_bytes(html_text.encode(), rel)
        return None
    path = Path(target)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(html_text)
    return path


def _e(s: Any) -> str:
    return html.escape(str(s))


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return _e(f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}")
    if isinstance(v, bool):
        return "<span class='pass'>pass</span>" if v else "<span class='fail'>FAIL</span>"
    return _e("" if v is None else v)
