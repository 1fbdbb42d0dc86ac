"""The cost report's arithmetic on recorded runs, and the command on a real output."""

import json

import pytest

from reembed import cost
from reembed.cli import main


def manifest_with(*runs):
    return {"runs": list(runs)}


GPU_RUN = {"device": "cuda", "accelerator": "H100", "device_count": 2, "wall_seconds": 1800.0,
           "device_seconds": 3240.0, "rows": 9_000_000, "tokens": 1_152_000_000}
CPU_RUN = {"device": "cpu", "accelerator": None, "device_count": 1, "vcpus": 16, "wall_seconds": 3600.0,
           "device_seconds": 3500.0, "rows": 180_000, "tokens": 23_040_000}


def test_gpu_run_arithmetic():
    c = cost.run_cost("gpu-out", manifest_with(GPU_RUN), cost.DEFAULT_PRICES)
    # 0.5 h x 2 GPUs x $12.29 = $12.29
    assert c.dollars == pytest.approx(12.29)
    assert c.per_million_docs == pytest.approx(12.29 / 9)
    assert c.per_million_tokens == pytest.approx(12.29 / 1152)
    assert c.docs_per_second_per_device == pytest.approx(9_000_000 / 3600)
    assert c.busy_share == pytest.approx(3240 / 3600)


def test_cpu_run_is_priced_per_vcpu_and_resumed_runs_add_up():
    first = {**CPU_RUN, "wall_seconds": 1200.0, "rows": 60_000, "tokens": 7_680_000}
    second = {**CPU_RUN, "wall_seconds": 2400.0, "rows": 120_000, "tokens": 15_360_000}
    c = cost.run_cost("cpu-out", manifest_with(first, second), cost.DEFAULT_PRICES)
    assert c.devices == 16 and c.wall_seconds == 3600.0 and c.docs == 180_000
    assert c.dollars == pytest.approx(1.0 * 16 * 0.0504)
    assert c.per_million_docs == pytest.approx(16 * 0.0504 / 0.18)
    assert c.busy_share is None


def test_price_override_and_refusals(tmp_path):
    p = tmp_path / "prices.yaml"
    p.write_text("date: 2026-01-01\nsource: our contract\nper_hour:\n  H100: 2.0\n")
    prices = cost.load_prices(str(p))
    assert prices["per_hour"]["H100"] == 2.0 and prices["per_hour"]["cpu"] == cost.DEFAULT_PRICES["per_hour"]["cpu"]
    assert cost.run_cost("o", manifest_with(GPU_RUN), prices).dollars == pytest.approx(0.5 * 2 * 2.0)
    p.write_text("per_hour:\n  H100: cheap\n")
    with pytest.raises(cost.CostError, match="per_hour.H100 must be a non-negative number"):
        cost.load_prices(str(p))
    with pytest.raises(cost.CostError, match="no recorded run"):
        cost.run_cost("empty", manifest_with(), cost.DEFAULT_PRICES)


def test_cost_command_on_a_real_output(tmp_path, tiny_model, ray_local, capsys):
    from conftest import make_docs, write_parquet
    from reembed import pipeline
    from reembed.config import load_config

    write_parquet(tmp_path / "in" / "a.parquet", make_docs(40))
    out = tmp_path / "out"
    pipeline.run(load_config(None, [f"input.uri={tmp_path / 'in'}", f"output.uri={out}", f"model.name={tiny_model}"]))
    html = tmp_path / "cost.html"
    assert main(["cost", str(out), "--html", str(html), "--json"]) == 0
    [row] = json.loads(capsys.readouterr().out)
    assert row["device"] == "CPU" and row["docs"] == 40 and row["devices"] >= 1 and row["$/1M docs"] > 0
    page = html.read_text()
    assert "<svg" in page and "$ per 1M documents" in page and cost.DEFAULT_PRICES["date"] in page
