import pytest

from reembed.cli import main
from reembed.config import ConfigError, JobConfig, load_config


def test_yaml_and_overrides(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("input:\n  uri: /data\n  passthrough: [text, lang]\nmodel:\n  dtype: bfloat16\nplan:\n  shard_rows: 500\n")
    cfg = load_config(p, ["compute.max_actors=4", "model.name=/models/x"])
    assert cfg.input.uri == "/data"
    assert cfg.input.passthrough == ("text", "lang")
    assert cfg.model.dtype == "bfloat16"
    assert cfg.plan.shard_rows == 500
    assert cfg.compute.max_actors == 4
    assert cfg.model.name == "/models/x"
    assert isinstance(cfg, JobConfig)


def test_unknown_key_names_key_and_file(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("model:\n  nmae: foo\n")
    with pytest.raises(ConfigError) as e:
        load_config(p)
    assert "model.nmae" in str(e.value) and str(p) in str(e.value)


def test_unknown_section_refused(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("modle:\n  name: foo\n")
    with pytest.raises(ConfigError, match="unknown key 'modle'"):
        load_config(p)


def test_wrong_type_refused(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("plan:\n  shard_rows: many\n")
    with pytest.raises(ConfigError, match=r"plan.shard_rows must be an integer.*'many'"):
        load_config(p)
    p.write_text("model:\n  dtype: float8\n")
    with pytest.raises(ConfigError, match="model.dtype must be one of"):
        load_config(p)


def test_secret_keys_refused_with_hint(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text("output:\n  aws_secret_access_key: abc\n")
    with pytest.raises(ConfigError, match="secrets never go in config files"):
        load_config(p)


def test_bad_override_refused():
    with pytest.raises(ConfigError, match="unknown key 'nope'"):
        load_config(None, ["model.nope=1"])
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(None, ["model.name"])


def test_cli_refuses_unknown_key_with_exit_2(tmp_path, capsys):
    p = tmp_path / "job.yaml"
    p.write_text("compute:\n  max_actorz: 2\n")
    rc = main(["run", "--input", str(tmp_path), "--output", str(tmp_path / "o"), "--config", str(p)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "compute.max_actorz" in err and str(p) in err


def test_help_lists_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    out = capsys.readouterr().out
    for opt in ("--input", "--output", "--model", "--config", "--set", "--on-bad-file", "--fresh", "--passthrough"):
        assert opt in out
