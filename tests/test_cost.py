"""``reembed cost``: the arithmetic on a recorded run, price files, the report."""

from __future__ import annotations

import json

import pytest

from reembed import cost
from reembed.manifest import Manifest
from reembed.storage import Location

from conftest import make_docs, write_parquet


@pytest.fixture(scope="module")
def recorded_run(tiny_model, ray_local, tmp_path_factory):
    """A real job output: 80 documents on the local Ray, CPU."""
    from reembed import pipeline
    from reembed.config import load_config

    root = tmp_path_factory.mktemp("cost")
    docs = write_parquet(root / "docs" / "a.parquet", make_docs(80))
    out = root / "cpu-run"
    pipeline.run(load_config(None, [f"input.uri={docs.parent}", f"output.uri={out}", f"model.name={tiny_model}",
                                    "plan.shard_rows=40"]))
    return out


def write_prices(path, **values) -> str:
    import yaml

    path.write_text(yaml.safe_dump(values))
    return str(path)


@pytest.mark.ray
def test_cost_arithmetic_on_recorded_run(recorded_run, tmp_path):
    run = Manifest.load(Location.from_uri(str(recorded_run))).data["runs"][-1]
    assert run["device"] == "cpu" and run["cpus"] == 2 and run["rows"] == 80 and run["tokens"] > 0
    prices = cost.load_prices(write_prices(tmp_path / "p.yaml", as_of="2026-11-25", source="test", cpu=0.36))
    [row] = cost.price_runs([str(recorded_run)], prices)
    hours = run["wall_seconds"] / 3600
    assert row["cost_usd"] == pytest.approx(hours * 2 * 0.36)
    assert row["usd_per_1m_docs"] == pytest.approx(hours * 2 * 0.36 / 80 * 1e6)
    assert row["usd_per_1m_tokens"] == pytest.approx(hours * 2 * 0.36 / run["tokens"] * 1e6)
    assert row["docs_per_s_per_device"] == pytest.approx(80 / run["wall_seconds"] / 2)
    assert row["docs"] == 80 and row["count"] == 2 and row["device"] == "CPU" and row["run"] == "cpu-run"
    assert row["backend"] == run["backend"] == "onnx"  # auto on CPU: ONNX Runtime, recorded with the run
    assert "cpu-run" in (table := cost.format_table([row], prices)) and " onnx " in table


def test_gpu_run_is_priced_per_device_hour(tmp_path):
    """A run record as a 2-GPU H100 job writes it (hand-made: no GPU here)."""
    run = {"device": "cuda", "accelerator": "H100", "device_count": 2, "cpus": 32, "wall_seconds": 1800.0,
           "device_seconds": 2880.0, "rows": 10_000_000, "tokens": 1_280_000_000}
    row = cost.price_run(run, cost.load_prices(), "h100")
    assert row["cost_usd"] == pytest.approx(0.5 * 2 * 3.9492)
    assert row["usd_per_1m_docs"] == pytest.approx(3.9492 / 10)
    assert row["usd_per_1m_tokens"] == pytest.approx(3.9492 / 1280)
    assert row["docs_per_s_per_device"] == pytest.approx(10_000_000 / 1800 / 2)
    assert row["utilisation"] == pytest.approx(0.8)
    a100 = cost.price_run({**run, "accelerator": "A100-80G"}, cost.load_prices(), "a100")
    assert a100["usd_per_device_hour"] == pytest.approx(2.4984)  # Ray's A100-80G label -> the A100 price
    with pytest.raises(cost.PriceError, match=r"h100: no price for GPU type 'MI300X'.*--prices"):
        cost.price_run({**run, "accelerator": "MI300X"}, cost.load_prices(), "h100")


def test_price_file_overrides_and_is_checked(tmp_path):
    prices = cost.load_prices(write_prices(tmp_path / "p.yaml", as_of="2026-11-01", source="contract",
                                           devices={"H100": 2.1, "MI300X": 3.0}))
    assert prices["devices"]["H100"] == 2.1 and prices["devices"]["MI300X"] == 3.0
    assert prices["devices"]["L4"] == cost.DEFAULT_PRICES["devices"]["L4"]  # the rest stays
    assert prices["as_of"] == "2026-11-01" and prices["source"] == "contract"
    assert cost.DEFAULT_PRICES["as_of"] and "modal.com/pricing" in cost.DEFAULT_PRICES["source"]
    with pytest.raises(cost.PriceError, match="'H100' must be a number"):
        cost.load_prices(write_prices(tmp_path / "bad.yaml", devices={"H100": "cheap"}))
    with pytest.raises(cost.PriceError, match="unknown key"):
        cost.load_prices(write_prices(tmp_path / "bad2.yaml", gpu=1.0))


@pytest.mark.ray
def test_cost_cli_table_json_and_bar_charts(recorded_run, tmp_path, capsys):
    from reembed.cli import main

    report = tmp_path / "cost.html"
    assert main(["cost", str(recorded_run), "--report", str(report)]) == 0
    out = capsys.readouterr().out
    assert "cpu-run" in out and "$/1M docs" in out and "as of 2026-06-27" in out
    html = report.read_text()
    assert html.count("<svg") == 3 and "<rect" in html and "$ per 1M documents" in html
    assert main(["cost", str(recorded_run), "--json", "--report", ""]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"][0]["docs"] == 80 and data["prices"]["currency"] == "USD"
    assert main(["cost", str(tmp_path / "nothing-here")]) == 1


@pytest.mark.ray
def test_cost_json_writes_no_report_unless_asked(recorded_run, tmp_path, monkeypatch, capsys):
    from reembed.cli import main

    monkeypatch.chdir(tmp_path)
    assert main(["cost", str(recorded_run), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["report"] is None
    assert not (tmp_path / "reembed-cost.html").exists()  # it used to be overwritten in silence
    assert main(["cost", str(recorded_run)]) == 0  # the table's default writes it, and says so
    out = capsys.readouterr().out
    assert "report: reembed-cost.html" in out and (tmp_path / "reembed-cost.html").exists()
    head = out.splitlines()[0].split()
    assert head[:5] == ["run", "model", "device", "backend", "precision"]


@pytest.mark.ray
def test_interrupted_attempts_are_counted_and_priced(recorded_run, tmp_path):
    """An attempt that claimed the output, committed shards and died without recording a run (here: a
    claim and two commits appended to a copy of a real output's log, as a killed resume leaves them) is a
    row of its own, priced from its claim to its last commit on the recorded runs' device."""
    import shutil
    import time

    from reembed.commits import CommitLog, attempts

    out = tmp_path / "copy"
    shutil.copytree(recorded_run, out)
    loc = Location.from_uri(str(out))
    log = CommitLog.open(loc)
    epoch = log.claim()
    log.commit(0, {"rows": 40, "tokens": 400, "device_seconds": 1.5})
    time.sleep(0.2)
    log.commit(1, {"rows": 40, "tokens": 380, "device_seconds": 1.0})
    *_, lost = attempts(loc)
    assert lost["epoch"] == epoch and not lost["run"] and lost["shards"] == 2 and lost["rows"] == 80
    assert lost["tokens"] == 780 and lost["device_seconds"] == pytest.approx(2.5)
    assert any(a["run"] for a in attempts(loc)), attempts(loc)  # the recorded run's attempt

    prices = cost.load_prices(write_prices(tmp_path / "p.yaml", as_of="2026-11-25", source="test", cpu=0.36))
    rows = cost.price_runs([str(out)], prices)
    [done] = [r for r in rows if not r["interrupted"]]
    [cut] = [r for r in rows if r["interrupted"]]
    import datetime as dt

    wall = (dt.datetime.fromisoformat(lost["last_at"]) - dt.datetime.fromisoformat(lost["claimed_at"])).total_seconds()
    assert wall >= 0.2 and cut["wall_seconds"] == pytest.approx(wall, abs=1e-3)
    assert cut["count"] == done["count"] == 2 and cut["cost_usd"] == pytest.approx(wall / 3600 * 2 * 0.36)
    assert cut["docs"] == 80 and f"epoch {epoch}" in cut["run"] and "lower bound" in cut["note"]
    table = cost.format_table(rows, prices)
    assert "1 interrupted attempt(s)" in table


def test_an_incremental_run_shows_the_seconds_and_dollars_it_saved():
    prices = cost.load_prices()
    run = {"device": "cpu", "cpus": 2, "wall_seconds": 100.0, "embed_seconds": 60.0, "rows": 200, "tokens": 3000,
           "rows_embedded": 30, "rows_reused": 150, "rows_deduplicated": 20}
    row = cost.price_run(run, prices, "out2")
    per_row = 60.0 / 30  # the run's measured embedding seconds per embedded row
    assert row["saved_seconds"] == pytest.approx(170 * per_row)
    assert row["saved_usd"] == pytest.approx(170 * per_row / 3600 * 2 * prices["cpu"])
    assert "30 rows embedded, 150 reused and 20 copied" in cost.format_table([row], prices)
    plain = cost.price_run({**run, "rows_embedded": 200, "rows_reused": 0, "rows_deduplicated": 0}, prices, "full")
    assert plain["saved_seconds"] == 0 and "reused" not in cost.format_table([plain], prices)
    nothing = cost.price_run({**run, "rows_embedded": 0, "rows_reused": 200, "rows_deduplicated": 0}, prices, "all")
    assert nothing["saved_usd"] is None  # nothing embedded: no seconds per row to go by
