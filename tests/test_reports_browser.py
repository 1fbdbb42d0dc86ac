"""The HTML reports as a person sees them: rendered by headless Chromium, read back as text.

Marked ``browser``; skipped where no Chromium is installed (``apt-get install chromium``; CI installs it).
"""

from __future__ import annotations

import numpy as np
import pytest

from browser import needs_browser, render
from migrate_fixtures import QUERIES, model_info, write_export, write_output
from migrate_fixtures import proj, space  # noqa: F401  (fixtures)
from reembed import cost, tune
from reembed import validation as V

pytestmark = [pytest.mark.browser, needs_browser()]


def _output(path, space, proj, vectors):
    return write_output(path, space["ids"], vectors, model_info(proj, vectors.shape[1]), columns={"text": space["texts"]})


def test_validate_report_names_the_comparison_and_draws_thresholds(tmp_path, space, proj, minilm):
    old = str(write_export(tmp_path / "old-export", space["ids"], space["texts"], space["old"]))
    out = _output(tmp_path / "new", space, proj, space["new"])
    report = V.validate(out, queries=str(QUERIES), old=old, old_model=str(minilm), settings=V.Settings(sample=30))
    assert report["passed"]
    seen = render(tmp_path / "new" / "validation" / "report.html", tmp_path)
    text = seen["all_text"]
    assert "PASSED" in seen["text"] and "FAIL" not in text  # a passing run shows no FAIL anywhere
    assert f"Compared against the old store {old}" in seen["text"] and str(minilm) in seen["text"]
    # thresholds drawn as lines with their values, the A/B as old/new bars with the tolerance band
    assert "paraphrase min 0.55" in text and "unrelated max 0.45" in text and "tolerance band (0.02 below old)" in text
    assert "tolerance 0.001" in text and "max |norm - 1|" in text
    assert seen["svgs"] >= 4 and not seen["page_overflows"]

    # The same page of a failing run marks what failed: vectors shuffled against their ids.
    bad = _output(tmp_path / "bad", space, proj, space["new"][np.random.default_rng(3).permutation(len(space["ids"]))])
    report = V.validate(bad, queries=str(QUERIES), old=old, old_model=str(minilm), settings=V.Settings(sample=30))
    assert not report["passed"]
    seen = render(tmp_path / "bad" / "validation" / "report.html", tmp_path)
    assert "FAILED" in seen["text"] and "\u2717 FAIL" in seen["all_text"]


def test_cost_report_table_fits_the_page_with_model_and_precision(tmp_path):
    run = {"device": "cuda", "accelerator": "H100", "device_count": 8, "cpus": 128, "wall_seconds": 5400.0,
           "device_seconds": 40000.0, "rows": 50_000_000, "tokens": 6_400_000_000, "backend": "torch",
           "dtype": "float16"}
    cpu = {"device": "cpu", "cpus": 64, "wall_seconds": 86400.0, "rows": 50_000_000, "tokens": 6_400_000_000,
           "backend": "onnx-int8", "dtype": "float32"}
    rows = [cost.price_run(run, cost.load_prices(), "s3://bucket/outputs/bge-large-2026-11-30/h100", "BAAI/bge-large-en-v1.5"),
            cost.price_run(cpu, cost.load_prices(), "s3://bucket/outputs/bge-large-2026-11-30/cpu", "BAAI/bge-large-en-v1.5")]
    path = cost.write_report(rows, cost.load_prices(), tmp_path / "cost.html")
    seen = render(path, tmp_path, width=1024)
    assert seen["tables_wider_than_page"] == 0 and not seen["page_overflows"]
    assert "precision" in seen["text"] and "int8-w7" in seen["text"] and "float16" in seen["text"]
    assert "BAAI/bge-large-en-v1.5" not in seen["text"] and "bge-large-en-v1.5" in seen["text"]


def test_tune_report_reads_settings_not_verdicts(tmp_path, tiny_model):
    profile = tune.tune({"name": str(tiny_model), "device": "cpu", "backend": "onnx-int8"},
                        tune.synthetic_sample(16, 128), [512, 1024], min_seconds=0.0)
    seen = render(tune.write_report(profile, tmp_path / "tune.html"), tmp_path)
    assert "FAIL" not in seen["all_text"]
    assert "compile\tno" in seen["text"] and "precision\tint8-w7" in seen["text"]
