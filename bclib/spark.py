"""The SparkSession builder: the only module that knows Spark and Delta conf.

It returns a configured *builder*; only jobs and the test fixture call
`getOrCreate()`. Delta's jars are added in one of three ways:

* under spark-submit (the JVM already runs, the cluster provides the jars):
  nothing is added, and no master is forced;
* a local jar cache (filled by `make jars` with `mvn dependency:copy`):
  `spark.jars`, no network needed;
* otherwise Ivy, through delta-spark's `configure_spark_with_delta_pip`
  (downloads once into ~/.ivy2*, then works from that cache).
"""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import delta
from pyspark.sql import SparkSession

from bclib.config import SparkSettings

log = logging.getLogger(__name__)

SCALA_VERSION = "2.13"


def delta_version() -> str:
    """The delta-spark pip package's version; the jars must match it."""
    from importlib.metadata import version

    return version("delta-spark")


def delta_jar_names() -> list[str]:
    """File names `mvn dependency:copy` gives the two Delta jars."""
    v = delta_version()
    return [f"delta-spark_{SCALA_VERSION}-{v}.jar", f"delta-storage-{v}.jar"]


def delta_maven_coordinates() -> list[str]:
    v = delta_version()
    return [f"io.delta:delta-spark_{SCALA_VERSION}:{v}", f"io.delta:delta-storage:{v}"]


def running_under_spark_submit() -> bool:
    """True when spark-submit launched this Python driver (its JVM is already up)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def cached_delta_jars(jar_cache_dir: str) -> list[str] | None:
    """Paths of both Delta jars in the cache, or None if either is missing."""
    cache = Path(os.path.expanduser(jar_cache_dir))
    paths = [cache / name for name in delta_jar_names()]
    return [str(p) for p in paths] if all(p.is_file() for p in paths) else None


def session_builder(settings: SparkSettings) -> SparkSession.Builder:
    """A builder with the Delta extensions, Arrow and sane local defaults."""
    builder = SparkSession.builder.appName(settings.app_name)
    submitted = running_under_spark_submit()
    if settings.master and not submitted:
        builder = builder.master(settings.master)
    warehouse = settings.warehouse_dir
    if "://" not in warehouse:
        warehouse = str(Path(warehouse).expanduser().absolute())
    defaults = {
        "spark.sql.extensions": "io.delta.sql.DeltaSparkSessionExtension",
        "spark.sql.catalog.spark_catalog": "org.apache.spark.sql.delta.catalog.DeltaCatalog",
        "spark.sql.warehouse.dir": warehouse,
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.ui.showConsoleProgress": "false",
        "spark.python.worker.reuse": "true",
        # One BLAS thread per Python worker: several workers share the cores.
        "spark.executorEnv.OPENBLAS_NUM_THREADS": "1",
        "spark.executorEnv.OMP_NUM_THREADS": "1",
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
    }
    if not submitted and settings.master and settings.master.startswith("local"):
        defaults["spark.driver.memory"] = "4g"
        defaults["spark.ui.enabled"] = "false"
        # local-mode Python workers inherit the driver's environment
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for key, value in {**defaults, **settings.conf}.items():
        builder = builder.config(key, value)
    return _with_delta_jars(builder, settings, submitted)


def _with_delta_jars(builder: SparkSession.Builder, settings: SparkSettings, submitted: bool) -> SparkSession.Builder:
    mode = settings.delta_jars
    if mode == "provided" or (mode == "auto" and submitted):
        log.info("Delta jars: provided by the cluster / spark-submit")
        return builder
    jars = cached_delta_jars(settings.jar_cache_dir)
    if mode == "cache" and jars is None:
        from bclib.errors import ConfigError

        raise ConfigError(
            f"spark.delta_jars is 'cache' but {delta_jar_names()} are not all in {settings.jar_cache_dir}; "
            "run `make jars` (mvn dependency:copy) first"
        )
    if jars is not None and mode in ("auto", "cache"):
        log.info("Delta jars: local cache %s", settings.jar_cache_dir)
        return builder.config("spark.jars", ",".join(jars))
    log.info("Delta jars: Ivy (%s)", ", ".join(delta_maven_coordinates()))
    return delta.configure_spark_with_delta_pip(builder)


def get_or_create(settings: SparkSettings) -> SparkSession:
    """Build the session (for jobs and the CLI only; library code takes `spark`)."""
    spark = session_builder(settings).getOrCreate()
    spark.sparkContext.setLogLevel(settings.log_level)
    return spark


# --------------------------------------------------------------------------- per-write session settings


def backfill_write_conf(arrow_batch_rows: int, n_spaces: int) -> dict[str, str]:
    """SQL confs for one backfill write.

    Arrow batches of `arrow_batch_rows` rows reach the Python workers
    (`spark.sql.execution.arrow.maxRecordsPerBatch`); one open Parquet writer per space per task
    (`spark.sql.maxConcurrentOutputFileWriters`) so the partitioned write needs no sort by space.
    """
    return {
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(int(arrow_batch_rows)),
        "spark.sql.maxConcurrentOutputFileWriters": str(int(n_spaces) + 1),
    }


@contextmanager
def session_conf(spark, settings: dict[str, str]) -> Iterator[None]:
    """Set SQL confs for one write and restore the caller's values afterwards (also on error)."""
    previous = {k: spark.conf.get(k, None) for k in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            spark.conf.unset(key) if value is None else spark.conf.set(key, value)
