from pathlib import Path

import pytest

from bclib.cli import main
from bclib.config import JobConfig, config_from_dict, load_config
from bclib.errors import ConfigError

from conftest import REPO


@pytest.mark.parametrize("path", sorted((REPO / "conf").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_config_loads(path):
    cfg = load_config(path)
    assert isinstance(cfg, JobConfig)
    assert cfg.target_spaces and all(s < cfg.source_version for s in cfg.target_spaces)


def test_local_yaml_is_the_embedded_default():
    assert load_config(REPO / "conf" / "local.yaml") == JobConfig()


def test_unknown_key_is_named_with_the_valid_keys():
    with pytest.raises(ConfigError, match=r"unknown config key 'fit\.sampel_size' in fit; valid keys: sample_size"):
        config_from_dict({"fit": {"sampel_size": 10}})


def test_unknown_top_level_key():
    with pytest.raises(ConfigError, match=r"unknown config key 'registry' in top level; valid keys: spark, embeddings"):
        config_from_dict({"registry": "x"})


@pytest.mark.parametrize(
    "data, pattern",
    [
        ({"fit": {"sample_size": "many"}}, r"'fit\.sample_size': expected int, found str 'many'"),
        ({"fit": {"sample_size": True}}, r"'fit\.sample_size': expected int, found bool"),
        ({"transform": {"kind": "quadratic"}}, r"'transform\.kind': 'quadratic' is not one of \['linear'"),
        ({"embeddings": {"versions": "0,1"}}, r"'embeddings\.versions': expected a list"),
        ({"embeddings": {"versions": [0, "1"]}}, r"'embeddings\.versions\[1\]': expected int"),
        ({"embeddings": {"location": "/t/emb"}}, r"must contain '\{version\}'"),
        ({"embeddings": {"location": "/t/emb/v{version}", "version_column": "v"}}, r"must not contain"),
        ({"backfill": {"source_version": 9}}, r"'backfill\.source_version' = 9 is not among"),
        ({"backfill": {"target_spaces": [4]}}, r"'backfill\.target_spaces': \[4\] must be configured versions older"),
        ({"transform": {"kind": "lowrank"}}, r"'transform\.rank' is required"),
        ({"spark": []}, r"config section 'spark': expected a mapping"),
    ],
)
def test_bad_values_are_named(data, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(data)


def test_int_widens_to_float():
    assert config_from_dict({"transform": {"ridge": 1}}).transform.ridge == 1.0


def test_missing_and_invalid_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(bad)


def test_cli_bad_config_is_one_line_and_nonzero(tmp_path: Path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("fit:\n  sample_size: 10\n  bogus: 1\n")
    assert main(["fit", "--config", str(bad)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1
    assert "unknown config key 'fit.bogus'" in err[0] and err[0].startswith("bcemb fit: ConfigError")
    assert not (tmp_path / "warehouse").exists()


def test_cli_override_reaches_the_config():
    from bclib.cli import resolve_config

    cfg = resolve_config(str(REPO / "conf" / "local.yaml"), ["fit.sample_size=123", "transform.kind=orthogonal"])
    assert cfg.fit.sample_size == 123 and cfg.transform.kind == "orthogonal"
