"""``reembed tune``: the OOM back-off, the choice, profiles, and the job picking a profile up."""

from __future__ import annotations

import json
import logging

import pytest

from reembed import tune
from reembed.embed import Embedder
from reembed.tune import Point

from conftest import make_docs, write_parquet


@pytest.fixture()
def tune_dir(tmp_path, monkeypatch):
    folder = tmp_path / "tuning"
    monkeypatch.setenv(tune.TUNE_DIR_ENV, str(folder))
    return folder


@pytest.mark.parametrize("limit, largest", [(5000, 4608), (3000, 2816), (20000, 16384)])
def test_oom_backoff_picks_largest_fitting_budget(tiny_model, limit, largest):
    """Out-of-memory simulated above ``limit`` padded tokens: the sweep stops at the first failing budget
    and bisects (3 steps, multiples of 64) towards the largest budget that still fits."""
    emb = Embedder({"name": str(tiny_model), "device": "cpu"})  # max_seq_length 128
    texts = tune.synthetic_sample(64, emb.max_seq_length)
    points = tune.sweep(emb, texts, [1024, 2048, 4096, 8192, 16384], min_seconds=0.0, oom_above=limit)
    fits = [p.budget for p in points if p.fits]
    assert max(fits) == largest
    assert all(p.budget <= limit for p in points if p.fits)
    # the worst-case probe is rows x 128 tokens: every budget that failed really was over the limit
    assert all((p.budget // 128) * 128 > limit for p in points if not p.fits)
    assert all(p.docs_per_s and p.docs_per_s > 0 for p in points if p.fits)
    assert tune.choose(points).budget <= largest


def test_choose_takes_largest_budget_within_tolerance():
    pts = [Point(1024, True, 100.0), Point(2048, True, 150.0), Point(4096, True, 149.0), Point(8192, True, 120.0),
           Point(16384, False)]
    assert tune.choose(pts).budget == 4096
    with pytest.raises(RuntimeError, match="no token budget fitted"):
        tune.choose([Point(1024, False)])


def test_choice_uses_medians_and_warns_when_rounds_vary_more_than_the_tolerance():
    """Each budget's figure is the median of its timed rounds. Rounds spread wider than the 2% that
    separates budgets make the choice uncertain: a warning says so (it used to pass in silence)."""
    steady = [Point(1024, True, 100.0, docs_per_s_min=99.5, docs_per_s_max=100.4),
              Point(2048, True, 150.0, docs_per_s_min=149.0, docs_per_s_max=151.0),
              Point(4096, True, 120.0, docs_per_s_min=119.0, docs_per_s_max=121.0)]
    assert tune.choose(steady).budget == 2048
    assert tune.noise_warnings(steady, tune.choose(steady)) == []
    noisy = steady[:1] + [Point(2048, True, 150.0, docs_per_s_min=90.0, docs_per_s_max=190.0)] + steady[2:]
    [warning] = tune.noise_warnings(noisy, tune.choose(noisy))
    assert "varied by up to 67%" in warning and "budget 2048" in warning and "uncertain" in warning
    assert Point(1, True, 100.0, docs_per_s_min=90.0, docs_per_s_max=110.0).spread == pytest.approx(0.2)


def test_sweep_times_several_rounds_per_budget(tiny_model):
    emb = Embedder({"name": str(tiny_model), "device": "cpu"})
    [p] = tune.sweep(emb, tune.synthetic_sample(16, emb.max_seq_length), [1024], min_seconds=0.0)
    assert p.docs_per_s_min <= p.docs_per_s <= p.docs_per_s_max and p.spread is not None


def test_tune_dir_follows_reembed_cache_dir(tmp_path, monkeypatch):
    monkeypatch.delenv(tune.TUNE_DIR_ENV, raising=False)
    monkeypatch.setenv("REEMBED_CACHE_DIR", str(tmp_path / "cache"))
    assert tune.tune_dir() == tmp_path / "cache" / "tuning"
    monkeypatch.setenv(tune.TUNE_DIR_ENV, str(tmp_path / "mine"))
    assert tune.tune_dir() == tmp_path / "mine"


def test_profile_saved_and_looked_up_by_model_device_and_seq_len(tiny_model, tune_dir):
    profile = tune.tune({"name": str(tiny_model), "device": "cpu", "backend": "torch"}, tune.synthetic_sample(32, 128),
                        [512, 1024], min_seconds=0.0)
    path = tune.save_profile(profile)
    assert path.parent == tune_dir and path.name.endswith("--cpu--L128.json")
    saved = json.loads(path.read_text())
    assert saved["batch_tokens"] in (512, 1024) and saved["max_fitting_budget"] == 1024
    assert saved["backend"] == "torch"
    assert tune.lookup_budget(str(tiny_model), "cpu", None, None) == saved["batch_tokens"]
    assert tune.lookup_budget(str(tiny_model), "cpu", None, 128) == saved["batch_tokens"]
    assert tune.lookup_budget(str(tiny_model), "cpu", None, 64) is None  # another max_seq_len
    assert tune.lookup_budget(str(tiny_model), "cuda", "H100", None) is None  # another device
    assert tune.lookup_budget(str(tiny_model), "cpu", None, None, "onnx") is None  # another backend
    assert tune.lookup_budget(str(tiny_model) + "-other", "cpu", None, None) is None
    path.write_text("{not json")
    assert tune.lookup_budget(str(tiny_model), "cpu", None, None) is None

    # The ONNX Runtime backend gets a profile of its own, next to the torch one.
    onnx = tune.save_profile(tune.tune({"name": str(tiny_model), "device": "cpu", "backend": "onnx"},
                                       tune.synthetic_sample(32, 128), [256, 512], min_seconds=0.0))
    assert onnx.name.endswith("--cpu-onnx--L128.json") and json.loads(onnx.read_text())["backend"] == "onnx"
    assert tune.lookup_budget(str(tiny_model), "cpu", None, None, "onnx") in (256, 512)


def test_tune_cli_prints_table_writes_profile_and_chart(tiny_model, tune_dir, tmp_path, capsys):
    from reembed.cli import main

    report = tmp_path / "tune.html"
    rc = main(["tune", "--model", str(tiny_model), "--device", "cpu", "--budgets", "1024,2048,4096",
               "--simulate-oom-above", "3000", "--sample-rows", "48", "--min-seconds", "0", "--report", str(report)])
    assert rc == 0
    out = capsys.readouterr().out
    assert "out of memory" in out and "chosen budget" in out and "largest that fits: 2816" in out
    assert len(list(tune_dir.glob("*--cpu-onnx--L128.json"))) == 1  # auto on CPU: the ONNX Runtime backend
    html = report.read_text()
    assert "<polyline" in html and "Throughput vs token budget" in html
    # a setting that is off reads "no"; only verdicts read pass/FAIL, and tuning has none
    assert "FAIL" not in html and "<td>compile</td><td>no</td>" in html


def test_tune_report_names_the_int8_precision(tiny_model, tmp_path):
    profile = tune.tune({"name": str(tiny_model), "device": "cpu", "backend": "onnx-int8"},
                        tune.synthetic_sample(16, 128), [512], min_seconds=0.0)
    assert profile["precision"] == "int8-w7"
    html = tune.write_report(profile, tmp_path / "t.html").read_text()
    assert "<td>precision</td><td>int8-w7</td>" in html and "<td>backend</td><td>onnx-int8</td>" in html


def test_tune_all_json_is_one_document(tiny_model, tune_dir, capsys):
    from reembed.cli import main

    rc = main(["tune", "--model", str(tiny_model), "--device", "cpu", "--backend", "all", "--budgets", "512",
               "--sample-rows", "16", "--min-seconds", "0", "--json", "--no-save"])
    assert rc == 0
    profiles = json.loads(capsys.readouterr().out)  # fails on concatenated documents
    assert isinstance(profiles, list) and {p["backend"] for p in profiles} >= {"torch", "onnx", "onnx-int8"}


def test_tune_all_cpu_backends_side_by_side(tiny_model, tune_dir, capsys):
    from reembed.cli import main
    from reembed.embed import cpu_supports_bf16

    rc = main(["tune", "--model", str(tiny_model), "--device", "cpu", "--backend", "all", "--budgets", "512,1024",
               "--sample-rows", "32", "--min-seconds", "0"])
    assert rc == 0
    out = capsys.readouterr().out
    keys = ["cpu", "cpu-onnx", "cpu-onnx-int8"] + (["cpu-bfloat16"] if cpu_supports_bf16() else [])
    for key in keys:  # a profile (and a report) per setting, each where `reembed run` with it looks
        [path] = tune_dir.glob(f"*--{key}--L128.json")
        profile = json.loads(path.read_text())
        assert path.with_suffix(".html").exists()
        budget = tune.lookup_budget(str(tiny_model), "cpu", None, None, profile["backend"], profile["dtype"])
        assert budget == profile["batch_tokens"]
    table = out[out.index("backend     dtype"):].splitlines()
    assert len(table) == len(keys) + 2  # header, one row per setting, the note
    rates = [float(line.split()[3]) for line in table[1:-1]]
    assert rates == sorted(rates, reverse=True) and "--backend onnx-int8" in out
    from reembed.cli.tune import _settings
    from reembed.errors import UsageError

    with pytest.raises(UsageError, match="compares the CPU backends"):
        _settings(type("A", (), {"backend": "all", "dtype": "auto"})(), "cuda")


@pytest.mark.ray
def test_run_picks_up_profile_and_logs_it(tiny_model, tune_dir, tmp_path, ray_local, caplog):
    from reembed import pipeline
    from reembed.config import load_config
    from reembed.manifest import Manifest
    from reembed.storage import Location

    profile = tune.tune({"name": str(tiny_model), "device": "cpu"}, tune.synthetic_sample(32, 128), [640, 768],
                        min_seconds=0.0)
    tune.save_profile(profile)
    docs = write_parquet(tmp_path / "docs" / "a.parquet", make_docs(60))
    out = tmp_path / "out"
    cfg = load_config(None, [f"input.uri={docs.parent}", f"output.uri={out}", f"model.name={tiny_model}",
                             "plan.shard_rows=30"])
    with caplog.at_level(logging.INFO, logger="reembed.tune"):
        summary = pipeline.run(cfg)
    assert summary["complete"] and summary["embedded"] == 60
    assert any("using tuned batch budget" in r.getMessage() for r in caplog.records)
    run = Manifest.load(Location.from_uri(str(out))).data["runs"][-1]
    assert run["batch_tokens"] == profile["batch_tokens"] in (640, 768)
    assert run["backend"] == profile["backend"] == "onnx"


def test_read_sample_from_parquet_and_jsonl(tmp_path):
    from conftest import write_jsonl

    write_parquet(tmp_path / "docs" / "a.parquet", [{"id": i, "body": f"text {i}"} for i in range(30)])
    write_jsonl(tmp_path / "docs" / "b.jsonl", [{"id": 100 + i, "body": f"line {i}"} for i in range(30)] + ["{bad", {"body": ""}])
    texts = tune.read_sample(str(tmp_path / "docs"), "body", rows=40)
    assert len(texts) == 40 and set(texts) <= {f"text {i}" for i in range(30)} | {f"line {i}" for i in range(30)}
    assert len(tune.read_sample(str(tmp_path / "docs"), "body", rows=1000)) == 60
    with pytest.raises(ValueError, match="no column 'text'"):
        tune.read_sample(str(tmp_path / "docs" / "a.parquet"), "text")
