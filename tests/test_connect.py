"""Spark Connect: the scheduled job through a real Spark Connect server on 127.0.0.1.

The server is the installed pyspark's own (`spark-submit --class ...SparkConnectServer`) with the Delta jars
and Delta's SQL extension and catalog, and without Delta's server-side Connect plugin (an open-source
server, as on a Spark 4 cluster): bcemb must not need `DeltaTable`, a SparkContext, RDDs or a JVM handle on
the client. The client is the `bcemb` CLI with $SPARK_REMOTE set and every location a file: URI:
generate -> run -> a second run commits nothing -> status -> maintain. The same config run in process on a
classic session gives the same transform ids and the same vectors (within VECTOR_RTOL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from bclib.spark import cached_delta_jars, delta_maven_coordinates

from conftest import REPO, assert_same_vectors, free_port, spark_submit_test_conf, wait_port

SPARK_HOME = Path(__import__("pyspark").__file__).parent
CONNECT_SERVER = "org.apache.spark.sql.connect.service.SparkConnectServer"


# --------------------------------------------------------------------------- no server needed


def test_connect_mode_refuses_relative_locations_and_hides_the_token(tmp_path):
    from bclib.errors import ConfigError

    base = {"spark": {"remote": "sc://127.0.0.1:15002/;token=SENTINEL-TOKEN-123"},
            "embeddings": {"location": "file:" + str(tmp_path / "emb" / "v{version}")},
            "registry_location": "file:" + str(tmp_path / "registry"),
            "metrics_location": "file:" + str(tmp_path / "metrics"),
            "evaluate": {"label_location": "file:" + str(tmp_path / "labels")}}
    with pytest.raises(ConfigError) as err:
        load_config_dict(tmp_path, {**base, "output_location": "./out"})
    text = str(err.value)
    assert "'output_location'" in text and "./out" in text and "absolute URIs" in text
    assert "SENTINEL-TOKEN-123" not in text and "<parameters hidden>" in text
    cfg = load_config_dict(tmp_path, {**base, "output_location": "file:" + str(tmp_path / "out")})
    assert cfg.spark.connect_url.endswith("token=SENTINEL-TOKEN-123")
    assert "SENTINEL" not in repr(cfg) and "SENTINEL" not in cfg.spark.connect_shown


def load_config_dict(tmp_path: Path, data: dict):
    from bclib.config import load_config

    path = tmp_path / "connect.yaml"
    path.write_text(yaml.safe_dump(data))
    return load_config(path)


def test_connect_builder_sends_session_confs_and_names_the_servers(caplog):
    from bclib.config import SparkSettings
    from bclib.spark import connect_builder

    settings = SparkSettings(remote="sc://127.0.0.1:1", conf={
        "spark.sql.shuffle.partitions": "3", "spark.databricks.delta.optimize.maxFileSize": "1048576",
        "spark.executor.memory": "4g", "spark.sql.extensions": "x", "spark.hadoop.fs.s3a.endpoint": "http://h"})
    with caplog.at_level("WARNING", logger="bclib.spark"):
        builder = connect_builder(settings)
    sent = builder._options
    assert sent["spark.remote"] == "sc://127.0.0.1:1" and "spark.master" not in sent
    assert sent["spark.sql.shuffle.partitions"] == "3" and sent["spark.sql.session.timeZone"] == "UTC"
    assert sent["spark.databricks.delta.optimize.maxFileSize"] == "1048576"
    assert not {"spark.executor.memory", "spark.sql.extensions", "spark.hadoop.fs.s3a.endpoint", "spark.jars",
                "spark.jars.packages"} & set(sent)
    warned = " ".join(r.getMessage() for r in caplog.records)
    assert "spark.executor.memory" in warned and "spark.sql.extensions" in warned and "belong to the server" in warned


def test_an_unreachable_server_is_one_named_error_at_once(tmp_path):
    """pyspark's client retries a dead address for minutes without a word: bcemb checks the port first."""
    import time

    from bclib.config import SparkSettings
    from bclib.errors import ConnectServerUnreachableError
    from bclib.spark import get_or_create

    port = free_port()  # nothing listens there
    started = time.time()
    with pytest.raises(ConnectServerUnreachableError) as err:
        get_or_create(SparkSettings(remote=f"sc://127.0.0.1:{port}/;token=SENTINEL-TOKEN-9"))
    assert time.time() - started < 15
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "SENTINEL" not in text and "<parameters hidden>" in text


def test_a_location_that_is_neither_a_path_nor_a_name_is_refused_at_load(tmp_path):
    from bclib.config import config_from_dict
    from bclib.errors import ConfigError

    for bad in ("file:rel_out", "bad-name", "a.b.c.d"):
        with pytest.raises(ConfigError, match=rf"'output_location' = '{bad}' is neither a path .* nor a catalog"):
            config_from_dict({"output_location": bad})


# --------------------------------------------------------------------------- a real server


@pytest.fixture(scope="module")
def connect_server(tmp_path_factory, subprocess_jvm_options):
    """sc://127.0.0.1:<port>: pyspark's Spark Connect server (local[2]) with the Delta jars; stopped by process
    group at the end of the module."""
    tmp = tmp_path_factory.mktemp("connect")
    port = free_port()
    jars = cached_delta_jars("~/.cache/bcemb/jars")
    deps = ["--jars", ",".join(jars)] if jars else ["--packages", delta_maven_coordinates()[0]]
    jvm = subprocess_jvm_options
    cmd = [str(SPARK_HOME / "bin" / "spark-submit"), "--master", "local[2]", "--class", CONNECT_SERVER, *deps,
           "--conf", f"spark.connect.grpc.binding.port={port}",
           "--conf", "spark.sql.extensions=io.delta.sql.DeltaSparkSessionExtension",
           "--conf", "spark.sql.catalog.spark_catalog=org.apache.spark.sql.delta.catalog.DeltaCatalog",
           "--conf", f"spark.sql.warehouse.dir=file:{tmp / 'warehouse'}",
           "--conf", "spark.driver.memory=2g", "--conf", "spark.ui.enabled=false",
           "--conf", "spark.databricks.delta.snapshotPartitions=4",
           "--conf", "spark.sql.sources.parallelPartitionDiscovery.parallelism=8",
           "--conf", f"spark.driver.extraJavaOptions={jvm}", *spark_submit_test_conf()]
    env = {**os.environ, "SPARK_HOME": str(SPARK_HOME), "PYSPARK_PYTHON": sys.executable,
           "SPARK_LOCAL_IP": "127.0.0.1", "OPENBLAS_NUM_THREADS": "1"}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    env.pop("SPARK_REMOTE", None)
    log = tmp / "server.log"
    server = subprocess.Popen(cmd, cwd=tmp, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                              stderr=open(log, "w"))
    try:
        try:
            wait_port(port, server, timeout=180)
        except (RuntimeError, TimeoutError) as exc:
            raise AssertionError(f"{exc}: {log.read_text()[-3000:]}") from None
        yield f"sc://127.0.0.1:{port}", tmp
    finally:
        try:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(server.pid, signal.SIGKILL)


# which bclib the server's Python workers import after `get_or_create` shipped it
WORKER_BCLIB = """
import pyarrow as pa
from bclib.config import SparkSettings
from bclib.spark import get_or_create
spark = get_or_create(SparkSettings())
def where(batches):
    import bclib
    for _ in batches:
        yield pa.RecordBatch.from_arrays([pa.array([bclib.__file__])], names=["f"])
print(spark.range(1).mapInArrow(where, "f string").first().f)
"""


def _config(tmp: Path, name: str, emb: Path) -> Path:
    uri = lambda p: "file:" + str(p)  # noqa: E731 - every location absolute, with its scheme
    data = {
        "spark": {"shuffle_partitions": 4},
        "embeddings": {"location": uri(emb / "v{version}"), "versions": [0, 1, 2]},
        "registry_location": uri(tmp / name / "registry"), "output_location": uri(tmp / name / "out"),
        "metrics_location": uri(tmp / name / "metrics"),
        "fit": {"min_pairs": 50, "holdout": 0.25},
        "backfill": {"engine": "arrow"},
        "evaluate": {"label_location": uri(emb / "labels"), "report_dir": str(tmp / name / "reports"),
                     "neighbours_k": 5},
        "demo": {"n_entities": 1500, "dims": [12, 16, 20], "block_rows": 512},
    }
    path = tmp / f"{name}.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _cli(url: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "SPARK_REMOTE": url, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    env.pop("PYSPARK_GATEWAY_PORT", None)
    return subprocess.run([sys.executable, "-m", "bclib.cli", *args, "--log-level", "INFO"], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)


def _space(spark, location: str, space: int):
    t = spark.read.format("delta").load(location).where(f"space_version = {space}").orderBy("id") \
        .select("id", "vector").toArrow()
    return t.column("id").to_numpy(), np.array(t.column("vector").to_pylist(), dtype=np.float64)


def _versions(spark, location: str) -> int:
    return spark.sql(f"DESCRIBE HISTORY delta.`{location}` LIMIT 1").first().version


@pytest.mark.slow
def test_scheduled_job_through_spark_connect_matches_a_classic_run(spark, connect_server):
    from bclib.config import load_config
    from bclib.steps.run import run_scheduled
    from bclib.tables.registry import active_transforms

    url, tmp = connect_server
    emb = tmp / "emb"
    conf = _config(tmp, "remote", emb)
    cwd = tmp / "client"  # the client's working directory is not the server's
    cwd.mkdir()
    steps = {}
    for step in (("generate",), ("run",)):
        out = _cli(url, *step, "--config", str(conf), cwd=cwd)
        steps[step[0]] = out
        assert out.returncode == 0, (step, out.stdout[-2000:], out.stderr[-4000:])
    assert "Spark Connect session on sc://127.0.0.1" in steps["run"].stderr
    assert "bclib sent to the server's Python workers (bclib.zip" in steps["run"].stderr
    cfg = load_config(conf)
    tables = (cfg.output_location, cfg.registry_location, cfg.metrics_location)
    before = {t: _versions(spark, t) for t in tables}
    again = _cli(url, "run", "--config", str(conf), cwd=cwd)
    assert again.returncode == 0, again.stderr[-4000:]
    assert {t: _versions(spark, t) for t in tables} == before, "a second run committed"
    status = _cli(url, "status", "--config", str(conf), "--json", cwd=cwd)
    assert status.returncode == 0, status.stderr[-4000:]
    report = json.loads(status.stdout)
    assert [s["state"] for s in report["spaces"]] == ["current", "current"], report
    maintain = _cli(url, "maintain", "--config", str(conf), cwd=cwd)
    assert maintain.returncode == 0, maintain.stderr[-4000:]
    assert not any(cwd.iterdir()), list(cwd.iterdir())  # nothing landed in the client's working directory
    shipped = subprocess.run([sys.executable, "-c", WORKER_BCLIB], cwd=cwd, capture_output=True, text=True,
                             timeout=300, env={**os.environ, "SPARK_REMOTE": url, "PYTHONPATH": str(REPO)})
    assert shipped.returncode == 0, shipped.stderr[-3000:]
    assert "/bclib.zip/bclib/__init__.py" in shipped.stdout, shipped.stdout  # the workers import the shipped zip

    # the same inputs on a classic session, in process: same transforms, same vectors
    local = load_config(_config(tmp, "classic", emb))
    run_scheduled(spark, local)
    remote_ids = {e: r.transform_id for e, r in active_transforms(spark, cfg.registry_location).items()}
    local_ids = {e: r.transform_id for e, r in active_transforms(spark, local.registry_location).items()}
    assert len(remote_ids) == 2 and remote_ids == local_ids
    for j in (0, 1):
        ids_r, v_r = _space(spark, cfg.output_location, j)
        ids_l, v_l = _space(spark, local.output_location, j)
        np.testing.assert_array_equal(ids_r, ids_l)
        assert_same_vectors(v_r, v_l, f"space {j}: Connect vs classic")

    # the source changes (an UPDATE and a DELETE, through the classic session): the incremental backfill over
    # Connect commits them into the output, given deletion vectors, with INSERT REPLACE ON (the probe of Delta's
    # confs answers there too), and both
    # outputs, brought up to date, still hold the same vectors
    src = str(emb / "v2")
    spark.sql(f"ALTER TABLE delta.`{cfg.output_location}` SET TBLPROPERTIES (delta.enableDeletionVectors = true)")
    spark.sql(f"UPDATE delta.`{src}` SET vector = transform(vector, x -> x * 2) WHERE id % 89 = 3")
    spark.sql(f"DELETE FROM delta.`{src}` WHERE id % 97 = 5")
    inc = _cli(url, "backfill", "--config", str(conf), "--set", "backfill.incremental=require", cwd=cwd)
    assert inc.returncode == 0, inc.stderr[-4000:]
    assert "(one INSERT REPLACE ON commit)" in inc.stderr, inc.stderr[-4000:]
    assert spark.sql(f"DESCRIBE HISTORY delta.`{cfg.output_location}` LIMIT 1").first().operation == "WRITE"
    run_scheduled(spark, local)
    for j in (0, 1):
        ids_r, v_r = _space(spark, cfg.output_location, j)
        ids_l, v_l = _space(spark, local.output_location, j)
        np.testing.assert_array_equal(ids_r, ids_l)
        assert_same_vectors(v_r, v_l, f"space {j} after the changes: Connect vs classic")
