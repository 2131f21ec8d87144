"""The session builder adds Delta's jars exactly once, and never under spark-submit."""

from pathlib import Path

import pytest

from bclib.config import SparkSettings
from bclib.errors import ConfigError
from bclib.spark import delta_jar_names, session_builder


def _options(builder):
    return dict(builder._options)


@pytest.fixture(autouse=True)
def _clean_builder_state():
    # SparkSession.builder is a shared object; keep this module's options from leaking into others
    from pyspark.sql import SparkSession

    saved = dict(SparkSession.builder._options)
    yield
    SparkSession.builder._options.clear()
    SparkSession.builder._options.update(saved)


def test_under_spark_submit_no_jars_and_no_master(monkeypatch, tmp_path):
    monkeypatch.setenv("PYSPARK_GATEWAY_PORT", "12345")
    opts = _options(session_builder(SparkSettings(master="local[4]", jar_cache_dir=str(tmp_path))))
    assert "spark.jars" not in opts and "spark.jars.packages" not in opts
    assert opts.get("spark.master") != "local[4]"
    assert opts["spark.sql.extensions"] == "io.delta.sql.DeltaSparkSessionExtension"


def test_cached_jars_are_used_without_ivy(monkeypatch, tmp_path):
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    for name in delta_jar_names():
        (tmp_path / name).write_bytes(b"jar")
    opts = _options(session_builder(SparkSettings(master="local[1]", jar_cache_dir=str(tmp_path))))
    assert opts["spark.jars"].split(",") == [str(tmp_path / n) for n in delta_jar_names()]
    assert "spark.jars.packages" not in opts or "io.delta" not in opts.get("spark.jars.packages", "")


def test_a_users_jars_and_packages_are_kept_beside_deltas(monkeypatch, tmp_path):
    """`--conf spark.jars=<S3A connector>` (or packages) stays: Delta's jars are added after the user's, once."""
    from bclib.spark import delta_maven_coordinates

    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    for name in delta_jar_names():
        (tmp_path / name).write_bytes(b"jar")
    delta_jar = str(tmp_path / delta_jar_names()[0])
    user = f"/opt/jars/hadoop-aws.jar, {delta_jar},/opt/jars/s3-2.35.4.jar"
    opts = _options(session_builder(SparkSettings(master="local[1]", jar_cache_dir=str(tmp_path),
                                                  conf={"spark.jars": user})))
    assert opts["spark.jars"].split(",") == ["/opt/jars/hadoop-aws.jar", delta_jar, "/opt/jars/s3-2.35.4.jar",
                                             str(tmp_path / delta_jar_names()[1])]
    opts = _options(session_builder(SparkSettings(master="local[1]", jar_cache_dir=str(tmp_path / "empty"),
                                                  conf={"spark.jars.packages": "org.apache.hadoop:hadoop-aws:3.5.0"})))
    assert opts["spark.jars.packages"].split(",") == ["org.apache.hadoop:hadoop-aws:3.5.0",
                                                      delta_maven_coordinates()[0]]


def test_without_cache_ivy_resolves_the_matching_version(monkeypatch, tmp_path):
    from bclib.spark import delta_artifact, delta_version

    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    opts = _options(session_builder(SparkSettings(master="local[1]", jar_cache_dir=str(tmp_path / "empty"))))
    assert f"io.delta:{delta_artifact()}:{delta_version()}" in opts["spark.jars.packages"]


def test_cache_mode_without_jars_is_a_named_error(monkeypatch, tmp_path):
    monkeypatch.delenv("PYSPARK_GATEWAY_PORT", raising=False)
    with pytest.raises(ConfigError, match="run `make jars`"):
        session_builder(SparkSettings(delta_jars="cache", jar_cache_dir=str(tmp_path)))


def test_warehouse_dir_is_made_absolute(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    opts = _options(session_builder(SparkSettings(master="local[1]", warehouse_dir="./wh", jar_cache_dir=str(tmp_path))))
    assert Path(opts["spark.sql.warehouse.dir"]) == tmp_path / "wh"


@pytest.mark.parametrize("delta, spark, artifact", [
    ("4.0.1", "4.0.1", "delta-spark_2.13"),
    ("4.1.0", "4.1.2", "delta-spark_4.1_2.13"),
    ("4.4.0", "4.2.0", "delta-spark_4.2_2.13"),
])
def test_jar_coordinates_follow_deltas_own_naming(delta, spark, artifact):
    """Delta >= 4.1 names its jar per Spark minor version, as delta-spark's pip_utils derives it."""
    from bclib.spark import delta_artifact

    assert delta_artifact(delta, spark) == artifact


def test_the_session_module_imports_without_delta():
    """`import delta` is needed only for Ivy resolution, and bclib.spark no longer needs it at all."""
    import ast

    tree = ast.parse((Path(__file__).resolve().parents[1] / "bclib" / "spark.py").read_text())
    imported = {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert not any(m == "delta" or m.startswith("delta.") for m in imported)


def test_progress_logs_a_heartbeat_while_a_stage_runs(spark, caplog):
    import logging
    import time

    from bclib.spark import progress

    with caplog.at_level(logging.INFO, logger="bclib.spark"):
        with progress(spark, "bcemb test", every_s=0.2):
            spark.range(2_000_000, numPartitions=4).selectExpr("sum(id * id)").collect()
            time.sleep(0.5)
    beats = [r.getMessage() for r in caplog.records if "still running after" in r.getMessage()]
    assert beats and all(b.startswith("bcemb test: still running after") for b in beats)


def test_catalog_names_with_the_in_memory_catalog_are_warned_about(spark):
    from bclib.spark import ephemeral_catalog_warning

    assert spark.conf.get("spark.sql.catalogImplementation", "in-memory") == "in-memory"
    from bclib.tables.delta import is_path

    locations = ["./warehouse/reg", "default.bc_embeddings", "/data/reg", "s3://b/out"]
    warning = ephemeral_catalog_warning(spark, [loc for loc in locations if not is_path(loc)])
    assert warning and "['default.bc_embeddings']" in warning and "persistent metastore" in warning
    assert ephemeral_catalog_warning(spark, [loc for loc in ["/data/reg", "s3://b/out", "./w/m"] if not is_path(loc)]) is None


def test_the_cli_quiets_the_loggers_that_print_a_failed_tasks_traceback(spark):
    """A refused run prints its one named line, not pages of task tracebacks (newcomer trial: 265 stderr lines
    for a spark-engine InvalidVectorError, 10 after, all of them Spark's start-up notices)."""
    from bclib.spark import TASK_FAILURE_LOGGERS, quiet_task_failure_logs

    assert quiet_task_failure_logs(spark)
    manager = spark.sparkContext._jvm.org.apache.logging.log4j.LogManager
    assert {str(manager.getLogger(name).getLevel()) for name in TASK_FAILURE_LOGGERS} == {"FATAL"}


def test_logger_level_holds_inside_the_block_and_restores_the_previous_level(spark):
    """The MERGE quiets Spark's hint warnings for its own queries only (bclib.spark.logger_level)."""
    from bclib.spark import logger_level
    from bclib.tables.output import HINT_LOGGER

    def level():
        return str(spark.sparkContext._jvm.org.apache.logging.log4j.LogManager.getLogger(HINT_LOGGER).getLevel())

    log4j = spark.sparkContext._jvm.org.apache.logging.log4j

    def configured():  # a logger of its own in log4j's configuration (else it follows the root level)
        return bool(log4j.core.LoggerContext.getContext(False).getConfiguration().getLoggers().containsKey(HINT_LOGGER))

    before, own = level(), configured()
    with logger_level(spark, HINT_LOGGER, "FATAL"):
        assert level() == "FATAL"
    assert level() == before and configured() == own
    if not own:  # an inherited level stays inherited: the root level set later still applies to it
        root = str(log4j.LogManager.getRootLogger().getLevel())
        spark.sparkContext.setLogLevel("INFO")
        try:
            assert level() == "INFO"
        finally:
            spark.sparkContext.setLogLevel(root)
    with pytest.raises(RuntimeError):
        with logger_level(spark, HINT_LOGGER, "FATAL"):
            raise RuntimeError("the block's own error")
    assert level() == before
