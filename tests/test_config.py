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


def test_a_float_in_exponent_notation_is_a_float_from_yaml_and_from_set():
    """YAML 1.1 (PyYAML) reads `1e-2` (no dot) as a string; a float key takes it as the number it reads as, from
    the file or from --set; a word stays refused by type and an unset value stays unset."""
    from bclib.cli import resolve_config

    local = str(REPO / "conf" / "local.yaml")
    cfg = resolve_config(local, ["backfill.incremental_max_fraction=1e-2", "backfill.retry_backoff_seconds=2E1"])
    assert cfg.backfill.incremental_max_fraction == 0.01 and cfg.backfill.retry_backoff_seconds == 20.0
    assert resolve_config(local, ["backfill.incremental_max_fraction=null"]).backfill.incremental_max_fraction is None
    with pytest.raises(ConfigError, match=r"incremental_max_fraction.*expected float, found str 'abc'"):
        resolve_config(local, ["backfill.incremental_max_fraction=abc"])
    with pytest.raises(ConfigError, match=r"incremental_max_fraction' = 2.0 is out of range"):
        resolve_config(local, ["backfill.incremental_max_fraction=2e0"])


# --------------------------------------------------------------------------- table locations


def _locations(**top):
    """A config mapping with every table on local disk under /w (labels and quarantine included)."""
    data = {"embeddings": {"location": "/w/emb/v{version}", "versions": [0, 1, 2]},
            "registry_location": "/w/registry", "output_location": "/w/out", "metrics_location": "/w/metrics",
            "evaluate": {"label_location": "/w/labels"}, "backfill": {"quarantine_location": "/w/quarantine"}}
    for key, value in top.items():
        section, _, name = key.partition("__")
        if name:
            data[section] = {**data[section], name: value}
        else:
            data[key] = value
    return data


def test_distinct_locations_load():
    cfg = config_from_dict(_locations())
    assert cfg.output_location == "/w/out"


@pytest.mark.parametrize(
    "override, pattern",
    [
        ({"metrics_location": "/w/emb/v2"},
         r"config keys 'metrics_location' = '/w/emb/v2' and 'embeddings.location' \(version 2\) = '/w/emb/v2' "
         r"point at the same table \(/w/emb/v2\)"),
        ({"backfill__quarantine_location": "/w/out"},
         r"config keys 'output_location' = '/w/out' and 'backfill.quarantine_location' = '/w/out' point at the same"),
        ({"evaluate__label_location": "/w/./registry/"},
         r"'registry_location' = '/w/registry' and 'evaluate.label_location' = '/w/./registry/' point at the same "
         r"table \(/w/registry\)"),
        ({"metrics_location": "file:///w//out"}, r"'output_location' = '/w/out' and 'metrics_location' = "
                                                  r"'file:///w//out' point at the same table \(/w/out\)"),
        ({"metrics_location": "file:/w/x/../out"}, r"'output_location'.*'metrics_location'.*same table \(/w/out\)"),
        # nested, both directions
        ({"metrics_location": "/w/out/metrics"},
         r"config key 'metrics_location' = '/w/out/metrics' \(/w/out/metrics\) is inside the table of "
         r"'output_location' = '/w/out' \(/w/out\)"),
        ({"registry_location": "/w/emb"},
         r"config key 'embeddings.location' \(version 0\) = '/w/emb/v0' \(/w/emb/v0\) is inside the table of "
         r"'registry_location' = '/w/emb' \(/w/emb\)"),
        ({"output_location": "/w"}, r"'registry_location' = '/w/registry' \(/w/registry\) is inside the table of "
                                    r"'output_location' = '/w' \(/w\)"),
    ],
)
def test_equal_or_nested_table_locations_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        config_from_dict(_locations(**override))


def test_relative_and_absolute_spellings_of_one_place_are_equal(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {"embeddings": {"location": "./warehouse/emb/v{version}", "versions": [0, 1]},
            "evaluate": {"label_location": None}}
    for output, metrics in (("./warehouse/out", "warehouse/out"), ("warehouse/out/", "./warehouse//out"),
                            (str(tmp_path / "warehouse" / "out"), "file:warehouse/out"),
                            ("./warehouse/out", f"file://{tmp_path}/warehouse/x/../out/")):
        with pytest.raises(ConfigError, match=rf"point at the same table \({tmp_path}/warehouse/out\)"):
            config_from_dict({**data, "output_location": output, "metrics_location": metrics})
    with pytest.raises(ConfigError, match=rf"'metrics_location' = '../{tmp_path.name}/warehouse/out/m' "
                                          rf"\({tmp_path}/warehouse/out/m\) is inside the table of 'output_location'"):
        config_from_dict({**data, "output_location": "./warehouse/out",
                          "metrics_location": f"../{tmp_path.name}/warehouse/out/m"})
    # a prefix of the string, not of the path: siblings
    cfg = config_from_dict({**data, "output_location": "./warehouse/out", "metrics_location": "./warehouse/out2",
                            "registry_location": "./warehouse/ou"})
    assert cfg.metrics_location == "./warehouse/out2"


def test_object_store_locations_compare_by_store_and_path():
    data = {"embeddings": {"location": "s3a://bucket/emb", "version_column": "v", "versions": [0, 1]},
            "registry_location": "s3a://bucket/registry", "output_location": "gs://bucket/out",
            "evaluate": {"label_location": None}}
    with pytest.raises(ConfigError, match=r"'registry_location' = 's3a://bucket/registry' and 'metrics_location' = "
                                          r"'s3://bucket//registry/' point at the same table \(s3://bucket/registry\)"):
        config_from_dict({**data, "metrics_location": "s3://bucket//registry/"})
    with pytest.raises(ConfigError, match=r"'metrics_location' = 'S3://Bucket/emb/metrics' \(s3://bucket/emb/metrics\) "
                                          r"is inside the table of 'embeddings.location' = 's3a://bucket/emb'"):
        config_from_dict({**data, "metrics_location": "S3://Bucket/emb/metrics"})
    # the same path in another bucket, another store, or on local disk is another place
    for other in ("s3a://other/registry", "gs://bucket/registry", "abfss://bucket@acct.dfs.core.windows.net/registry",
                  "/registry", "gs://bucket/out2"):
        assert config_from_dict({**data, "metrics_location": other}).metrics_location == other


def test_catalog_names_compare_case_insensitively_by_name():
    data = {"embeddings": {"location": "ml.item_embeddings", "version_column": "v", "versions": [0, 1]},
            "output_location": "ml.compat", "registry_location": "/w/registry", "evaluate": {"label_location": None}}
    with pytest.raises(ConfigError, match=r"config keys 'output_location' = 'ml.compat' and 'metrics_location' = "
                                          r"'ML.Compat' point at the same table \(ml.compat\)"):
        config_from_dict({**data, "metrics_location": "ML.Compat"})
    with pytest.raises(ConfigError, match=r"'embeddings.location' = 'ml.item_embeddings'.*same table"):
        config_from_dict({**data, "metrics_location": "ml.compat", "output_location": "ML.ITEM_EMBEDDINGS"})
    # a name that starts like another is another table; names never nest
    assert config_from_dict({**data, "metrics_location": "ml.compat_metrics"}).metrics_location == "ml.compat_metrics"
    assert config_from_dict({**data, "metrics_location": "ml"}).metrics_location == "ml"


def test_version_tables_are_checked_against_each_other_and_the_lease_is_not_a_table():
    data = {"embeddings": {"location": "/w/emb{version}", "versions": [1, 10]}, "output_location": "/w/out",
            "lease": {"location": "/w/out/_bcemb/lease"}}
    assert config_from_dict(data).embeddings.versions == [1, 10]  # /w/emb1 and /w/emb10 are siblings
    with pytest.raises(ConfigError, match=r"'output_location' = '/w/emb1/out' \(/w/emb1/out\) is inside the table of "
                                          r"'embeddings.location' \(version 1\) = '/w/emb1'"):
        config_from_dict({**data, "output_location": "/w/emb1/out"})


def test_tables_bcemb_only_reads_may_coincide_but_never_with_a_table_it_writes():
    data = {"embeddings": {"location": "/w/emb/v{version}", "versions": [0, 1]}, "output_location": "/w/out"}
    labels_in_v1 = config_from_dict({**data, "evaluate": {"label_location": "/w/emb/v1"}})
    assert labels_in_v1.evaluate.label_location == "/w/emb/v1"  # labels kept in an embedding table: read only
    with pytest.raises(ConfigError, match=r"'metrics_location' = '/w/emb/v1'.*same table"):
        config_from_dict({**data, "metrics_location": "/w/emb/v1"})


def test_the_config_reference_page_is_current_and_every_key_is_described():
    """docs/config.md is generated from config.py (`python -m bclib.config_reference`): stale or a key without a
    comment beside its field fails here."""
    from bclib.config_reference import keys, main, undocumented

    assert undocumented() == []
    assert main(["--check"]) == 0, "docs/config.md is stale: run python -m bclib.config_reference"
    dotted = {k for k, *_ in keys()}
    assert {"embeddings.vector_encoding", "backfill.storage_options", "maintenance.vacuum_listing_parallelism",
            "lease.wait_seconds", "output_location"} <= dotted and len(dotted) == len(keys())


def test_the_report_dir_is_a_local_path_or_a_file_uri(tmp_path):
    """evaluate writes its report from this process: a file: URI is this machine's path (it was once taken as
    the relative folder './file:/...'), any other URI is refused by name before anything runs."""
    from bclib.steps.report import write_report

    with pytest.raises(ConfigError, match=r"'evaluate.report_dir' = 's3a://bucket/reports' is not on this machine"):
        config_from_dict({"evaluate": {"report_dir": "s3a://bucket/reports"}})
    cfg = config_from_dict({"evaluate": {"report_dir": f"file:{tmp_path}/reports"}})
    pytest.importorskip("matplotlib")
    out = write_report([], cfg.evaluate.report_dir, "r1")
    assert out == tmp_path / "reports" / "r1" and (out / "report.md").exists()
