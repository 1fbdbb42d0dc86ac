"""Self-contained HTML reports with inline SVG charts: no plotting library, no network, one file.

    page = report.page("Validation", [report.section("Norms", report.bar_chart({"v1": 1.0, "v2": 0.98})),
                                      report.table(rows, columns)])
    report.write(loc_or_path, page)

A boolean cell reads ``yes`` / ``no``; only a verdict (``table(..., verdicts=["passed"])`` or
:func:`verdict`) reads ``pass`` / ``FAIL``. Charts take thresholds, drawn as lines, and mark failing bars.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any, Iterable, Sequence

_COLORS = ("#3b6fb6", "#e07b39", "#4a9a5b", "#b84a4a", "#7d5ba6", "#8c6d31")
_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;margin:2em auto;max-width:1100px;padding:0 1em;color:#222}
h1{font-size:1.5em}h2{font-size:1.15em;margin-top:1.6em;border-bottom:1px solid #ddd}
.wide{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;margin:.5em 0;font-size:.85em}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left;overflow-wrap:anywhere;max-width:18em}.fail{color:#b00;font-weight:bold}
td.failcell{background:#fbe3e3}.pass{color:#070;font-weight:bold}svg text{font-size:11px;fill:#333}
svg{max-width:100%;height:auto}
"""
OLD_COLOR, NEW_COLOR, FAIL_COLOR, LINE_COLOR = "#9a9a9a", "#3b6fb6", "#b84a4a", "#b00"
FAIL_MARK = " \u2717 FAIL"


def page(title: str, sections: Iterable[str]) -> str:
    body = "\n".join(sections)
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>\n{body}\n</body></html>\n")


def section(title: str, *parts: str) -> str:
    return f"<h2>{_e(title)}</h2>\n" + "\n".join(parts)


def paragraph(text: str, cls: str = "") -> str:
    return f"<p class='{cls}'>{_e(text)}</p>" if cls else f"<p>{_e(text)}</p>"


def table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None, verdicts: Sequence[str] = (),
          failing: Sequence[tuple[int, str]] = ()) -> str:
    """Rows as a table. Columns named in ``verdicts`` hold pass/fail booleans (shown ``pass`` / ``FAIL``);
    ``failing`` lists ``(row index, column)`` cells to mark."""
    if not rows:
        return "<p>(none)</p>"
    columns = list(columns or rows[0].keys())
    marked = set(failing)
    head = "".join(f"<th>{_e(c)}</th>" for c in columns)

    def cell(i: int, r: dict[str, Any], c: str) -> str:
        v = r.get(c)
        text = verdict(v) if c in verdicts and isinstance(v, bool) else _fmt(v)
        return f"<td class='failcell'>{text}</td>" if (i, c) in marked else f"<td>{text}</td>"

    body = "".join("<tr>" + "".join(cell(i, r, c) for c in columns) + "</tr>" for i, r in enumerate(rows))
    return f"<div class='wide'><table><tr>{head}</tr>{body}</table></div>"


def verdict(passed: bool | None) -> str:
    """A gate's or a row's outcome: ``pass`` / ``FAIL`` (``-`` when not judged)."""
    if passed is None:
        return "-"
    return "<span class='pass'>pass</span>" if passed else "<span class='fail'>FAIL</span>"


def bar_chart(values: dict[str, float], unit: str = "", width: int = 640, bar_height: int = 22,
              thresholds: dict[str, float] | None = None, failing: Iterable[str] = (), top: float | None = None) -> str:
    """Horizontal bars, one per label. ``thresholds`` ({name: value}) are drawn as labelled vertical lines;
    bars whose label is in ``failing`` are drawn red and marked with a cross."""
    if not values:
        return "<p>(no data)</p>"
    thresholds = {k: v for k, v in (thresholds or {}).items() if v is not None}
    bad = set(failing)
    top = top or max(max(values.values()), *thresholds.values(), 1e-12)
    label_w, pad, head = 180, 80, 16 if thresholds else 0
    span = width - label_w - pad
    h = bar_height * len(values) + 10 + head
    parts = [f"<svg width='{width}' height='{h}' viewBox='0 0 {width} {h}' role='img'>"]
    for i, (label, v) in enumerate(values.items()):
        y = head + 5 + i * bar_height
        w = max(0.0, span * v / top)
        color = FAIL_COLOR if label in bad else _COLORS[i % len(_COLORS)]
        mark = FAIL_MARK if label in bad else ""
        parts.append(f"<text x='{label_w - 6}' y='{y + bar_height * 0.65:.0f}' text-anchor='end'>{_e(label)}</text>")
        parts.append(f"<rect x='{label_w}' y='{y + 3}' width='{w:.1f}' height='{bar_height - 6}' fill='{color}'/>")
        parts.append(f"<text x='{label_w + w + 4:.1f}' y='{y + bar_height * 0.65:.0f}'>{_fmt(v)}{_e(unit)}{mark}</text>")
    for j, (name, t) in enumerate(thresholds.items()):
        x = label_w + span * t / top
        parts.append(f"<line x1='{x:.1f}' y1='{head}' x2='{x:.1f}' y2='{h}' stroke='{LINE_COLOR}' stroke-dasharray='4 3'/>")
        parts.append(f"<text x='{x:.1f}' y='{11 + 0 * j}' text-anchor='{'end' if j % 2 else 'start'}' "
                     f"fill='{LINE_COLOR}'>{_e(name)} {_fmt(float(t))}</text>")
    parts.append("</svg>")
    return "".join(parts)


def grouped_bars(metrics: dict[str, tuple[float, float]], tolerance: float | None = None, labels=("old", "new"),
                 width: int = 640, bar_height: int = 18) -> str:
    """Per metric, an ``old`` and a ``new`` bar side by side (the same two colours throughout), the delta
    new - old, and when ``tolerance`` is given the band [old - tolerance, old] shaded: a new bar that ends
    left of the band fails."""
    if not metrics:
        return "<p>(no data)</p>"
    top = max(1e-12, *(max(a, b) for a, b in metrics.values()))
    label_w, pad, legend = 120, 150, 18
    span = width - label_w - pad
    group = 2 * bar_height + 12
    h = legend + group * len(metrics) + 6
    parts = [f"<svg width='{width}' height='{h}' viewBox='0 0 {width} {h}' role='img'>",
             f"<rect x='{label_w}' y='3' width='10' height='10' fill='{OLD_COLOR}'/>"
             f"<text x='{label_w + 14}' y='12'>{_e(labels[0])}</text>",
             f"<rect x='{label_w + 70}' y='3' width='10' height='10' fill='{NEW_COLOR}'/>"
             f"<text x='{label_w + 84}' y='12'>{_e(labels[1])}</text>"]
    if tolerance is not None:
        parts.append(f"<rect x='{label_w + 140}' y='3' width='10' height='10' fill='#f4c7c7'/>"
                     f"<text x='{label_w + 154}' y='12'>tolerance band ({_fmt(float(tolerance))} below {_e(labels[0])})</text>")
    for i, (name, (old, new)) in enumerate(metrics.items()):
        y = legend + i * group
        delta = new - old
        worse = tolerance is not None and new < old - tolerance
        parts.append(f"<text x='{label_w - 6}' y='{y + bar_height + 4}' text-anchor='end'>{_e(name)}</text>")
        if tolerance is not None:
            x0 = label_w + span * max(old - tolerance, 0.0) / top
            x1 = label_w + span * old / top
            parts.append(f"<rect x='{x0:.1f}' y='{y}' width='{max(x1 - x0, 1):.1f}' height='{2 * bar_height + 2}' fill='#f4c7c7'/>")
        for j, (v, color) in enumerate(((old, OLD_COLOR), (new, FAIL_COLOR if worse else NEW_COLOR))):
            w = max(0.0, span * v / top)
            yy = y + j * (bar_height + 2)
            parts.append(f"<rect x='{label_w}' y='{yy + 2}' width='{w:.1f}' height='{bar_height - 3}' fill='{color}'/>")
            note = f"  ({delta:+.3f}{FAIL_MARK if worse else ''})" if j else ""
            parts.append(f"<text x='{label_w + w + 4:.1f}' y='{yy + bar_height * 0.7:.0f}'>{_e(labels[j])} "
                         f"{_fmt(float(v))}{note}</text>")
    parts.append("</svg>")
    return "".join(parts)


def line_chart(series: dict[str, Sequence[tuple[float, float]]], x_label: str = "", y_label: str = "",
               width: int = 640, height: int = 320, log_x: bool = False, thresholds: dict[str, float] | None = None) -> str:
    """One polyline per series of (x, y) points, with axes and a legend; ``thresholds`` are horizontal lines."""
    pts = [p for s in series.values() for p in s]
    if not pts:
        return "<p>(no data)</p>"
    import math

    fx = (lambda x: math.log2(max(x, 1e-12))) if log_x else (lambda x: x)
    xs, ys = [fx(p[0]) for p in pts], [p[1] for p in pts]
    thresholds = {k: v for k, v in (thresholds or {}).items() if v is not None}
    x0, x1 = min(xs), max(xs) if max(xs) > min(xs) else min(xs) + 1
    y_top = max([*ys, *thresholds.values()])
    y0, y1 = 0.0, y_top * 1.1 if y_top > 0 else 1.0
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
    for name, t in thresholds.items():
        parts.append(f"<line x1='{left}' y1='{sy(t):.1f}' x2='{width - right}' y2='{sy(t):.1f}' stroke='{LINE_COLOR}' "
                     f"stroke-dasharray='4 3'/><text x='{left + 4}' y='{sy(t) - 3:.1f}' fill='{LINE_COLOR}'>"
                     f"{_e(name)} {_fmt(float(t))}</text>")
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
        return "yes" if v else "no"
    return _e("" if v is None else v)
