"""A credential given in the config or with --set never shows: not in a log line (bclib's or the JVM's), an error
message, a table (commits' userMetadata, rows), the report or `status`. One set of storage options reaches
Spark, pyarrow and delta-rs, checked at load (unknown keys named, values never)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import yaml

from bclib.cli import main
from bclib.config import config_from_dict
from bclib.errors import ConfigError
from bclib.storage import Secret, pyarrow_s3_options, spark_hadoop_conf, store_options, with_secrets_hidden

from conftest import generated_and_fitted

SENTINEL = "SENTINEL-7f3a9c-do-not-print"
TOKEN = "TOKEN-55e1b0-do-not-print"


def test_one_set_of_options_reaches_spark_pyarrow_and_delta_rs_with_their_names():
    opts = with_secrets_hidden({"aws_endpoint": "http://127.0.0.1:9000", "aws_region": "eu-west-1",
                                "aws_access_key_id": "AKID", "aws_secret_access_key": SENTINEL,
                                "aws_allow_http": "true"})
    h = "spark.hadoop.fs.s3a."
    spark = spark_hadoop_conf(opts)
    assert spark[h + "endpoint"] == "http://127.0.0.1:9000" and spark[h + "endpoint.region"] == "eu-west-1"
    assert spark[h + "path.style.access"] == "true" and spark[h + "connection.ssl.enabled"] == "false"
    assert spark[h + "access.key"] == "AKID" and spark[h + "secret.key"] == SENTINEL
    assert spark[h + "aws.credentials.provider"].endswith("SimpleAWSCredentialsProvider")
    arrow = pyarrow_s3_options(opts)
    assert arrow["endpoint_override"] == "127.0.0.1:9000" and arrow["scheme"] == "http"
    assert arrow["secret_key"] == SENTINEL and arrow["access_key"] == "AKID" and arrow["region"] == "eu-west-1"
    config, client = store_options("s3a://b/t", opts)
    assert config["aws_secret_access_key"] == SENTINEL and config["aws_endpoint"] == "http://127.0.0.1:9000"
    assert client == {"allow_http": True}
    # the value is the secret where a library takes it, and <redacted> wherever it is shown
    for shown in (repr(opts), repr(spark), repr(arrow), repr(config), str([opts]), "%r" % (spark,)):
        assert SENTINEL not in shown
    assert isinstance(arrow["secret_key"], Secret) and f"{arrow['secret_key']}" == SENTINEL
    token = spark_hadoop_conf(with_secrets_hidden({"aws_access_key_id": "A", "aws_secret_access_key": "S",
                                                   "aws_session_token": TOKEN}))
    assert token[h + "session.token"] == TOKEN and token[h + "aws.credentials.provider"].endswith("Temporary"
                                                                                               "AWSCredentialsProvider")
    assert spark_hadoop_conf({}) == {}  # nothing given: Spark's own provider chain


def test_unknown_storage_keys_are_named_at_load_and_a_users_spark_conf_wins():
    with pytest.raises(ConfigError) as err:
        config_from_dict({"storage": {"options": {"aws_endpont": "x", "aws_secret_access_key": SENTINEL}}})
    assert "aws_endpont" in str(err.value) and "storage.options" in str(err.value) and SENTINEL not in str(err.value)
    with pytest.raises(ConfigError, match="backfill.storage_options.*endpont"):
        config_from_dict({"backfill": {"storage_options": {"endpont": "x"}}})
    cfg = config_from_dict({"storage": {"options": {"aws_endpoint": "http://a:1", "aws_access_key_id": "A",
                                                    "aws_secret_access_key": SENTINEL}},
                            "spark": {"conf": {"spark.hadoop.fs.s3a.endpoint": "http://mine:2"}},
                            "backfill": {"storage_options": {"aws_region": "r"}}})
    assert cfg.spark.conf["spark.hadoop.fs.s3a.endpoint"] == "http://mine:2"  # the user's key wins
    assert cfg.spark.conf["spark.hadoop.fs.s3a.secret.key"] == SENTINEL
    assert cfg.object_store_options["aws_region"] == "r" and cfg.object_store_options["aws_endpoint"] == "http://a:1"
    assert SENTINEL not in repr(cfg)


def _files_holding(root: Path, needles: list[bytes]) -> list[str]:
    found = []
    for path in root.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            found += [f"{path.relative_to(root)} holds {n!r}" for n in needles if n in data]
    return found


def test_a_planted_secret_appears_in_no_output_table_log_report_or_status(spark, tmp_path, capfd, caplog,
                                                                            request):
    """The daily job, status (text and --json), a failing step and the registry listing, with a secret in
    the config file and another given with --set, logs at INFO: neither appears anywhere."""
    cfg = generated_and_fitted(spark, tmp_path, evaluate={"label_location": None,
                                                          "report_dir": str(tmp_path / "reports")})
    data = {"spark": {"master": "local[2]"},
            "embeddings": {"location": cfg.embeddings.location, "versions": list(cfg.embeddings.versions)},
            "registry_location": cfg.registry_location, "output_location": cfg.output_location,
            "metrics_location": cfg.metrics_location,
            "fit": {"sample_size": 100_000, "min_pairs": 50, "holdout": 0.25}, "transform": {"bias": False},
            "gate": {"min_heldout_ids": 50},
            "evaluate": {"label_location": None, "report_dir": str(tmp_path / "reports"), "neighbours_k": 5,
                         "neighbours_sample": 200},
            "storage": {"options": {"aws_region": "us-east-1", "aws_access_key_id": "AKID",
                                    "aws_secret_access_key": SENTINEL}}}
    conf = tmp_path / "job.yaml"
    conf.write_text(yaml.safe_dump(data))
    # the in-process CLI sets the S3A settings on the suite's shared session: unset them after this test
    keys = ("access.key", "secret.key", "session.token", "endpoint.region", "aws.credentials.provider")
    request.addfinalizer(lambda: [spark.conf.unset("spark.hadoop.fs.s3a." + k) for k in keys])
    secret_set = ["--set", f"storage.options.aws_session_token={TOKEN}", "--log-level", "INFO"]
    caplog.set_level(logging.INFO)
    assert main(["run", "--config", str(conf), *secret_set]) == 0
    assert main(["status", "--config", str(conf), *secret_set]) == 0
    assert main(["status", "--json", "--config", str(conf), *secret_set]) == 0
    assert main(["registry", "list", "--config", str(conf), *secret_set]) == 0
    # a step that fails (a version table that is not there) prints its error line: no secret in it either
    assert main(["backfill", "--config", str(conf), *secret_set, "--set", "backfill.force=true",
                 "--set", f"embeddings.location={tmp_path / 'nowhere' / 'v{version}'}"]) != 0
    out, err = capfd.readouterr()
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "run " in out and "status:" in out and "bcemb backfill:" in err  # the outputs were really captured
    for needle in (SENTINEL, TOKEN):
        assert needle not in out and needle not in err and needle not in logged, needle
    assert list((tmp_path / "reports").rglob("report.*")), "the run wrote its report"
    assert _files_holding(tmp_path, [SENTINEL.encode(), TOKEN.encode()]) == [str(conf.relative_to(tmp_path)) +
                                                                              f" holds {SENTINEL.encode()!r}"]
    meta = [json.loads(r.userMetadata) for r in spark.sql(f"DESCRIBE HISTORY delta.`{cfg.output_location}`")
            .collect() if r.userMetadata]
    assert meta and not any(SENTINEL in json.dumps(m) or TOKEN in json.dumps(m) for m in meta)
