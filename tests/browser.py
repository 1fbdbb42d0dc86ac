"""Render an HTML report in a real headless browser (Debian's Chromium) and read back what it shows.

The report is copied next to a probe script that, once the page is laid out, records the page's rendered
text (``innerText``, which follows layout and CSS, plus the text drawn by the SVG charts) and whether
any table is wider than the page; ``chromium --dump-dom`` hands the result back.
"""

from __future__ import annotations

import html
import json
import shutil
import subprocess
from pathlib import Path

import pytest

_PROBE = """<script>
window.addEventListener('load', () => {
  const tables = [...document.querySelectorAll('table')];
  const out = {
    text: document.body.innerText,
    svg_text: [...document.querySelectorAll('svg text')].map(t => t.textContent),
    page_overflows: document.documentElement.scrollWidth > window.innerWidth,
    tables_wider_than_page: tables.filter(t => t.getBoundingClientRect().right > window.innerWidth + 1).length,
    svgs: document.querySelectorAll('svg').length,
  };
  const pre = document.createElement('pre');
  pre.id = '__probe';
  pre.textContent = JSON.stringify(out);
  document.body.appendChild(pre);
});
</script>"""


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def needs_browser():
    return pytest.mark.skipif(chromium() is None, reason="no Chromium (apt-get install chromium)")


def render(report: Path, tmp: Path, width: int = 1280) -> dict:
    """What a browser window ``width`` pixels wide shows of ``report``."""
    page = tmp / f"probe-{report.name}"
    page.write_text(report.read_text().replace("</body>", _PROBE + "</body>"))
    done = subprocess.run([chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                           f"--window-size={width},900", "--virtual-time-budget=5000", "--dump-dom",
                           page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    start = done.stdout.index('<pre id="__probe">') + len('<pre id="__probe">')
    probe = json.loads(html.unescape(done.stdout[start:done.stdout.index("</pre>", start)]))
    probe["all_text"] = probe["text"] + "\n" + "\n".join(probe["svg_text"])
    return probe
