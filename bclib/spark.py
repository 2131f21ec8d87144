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
from typing import Iterator, Optional

from pyspark.sql import SparkSession

from bclib.config import SparkSettings

log = logging.getLogger(__name__)

SCALA_VERSION = "2.13"


def delta_version() -> str:
    """The delta-spark pip package's version; the jars must match it."""
    from importlib.metadata import version

    return version("delta-spark")


def spark_version() -> str:
    """The pyspark pip package's version (the driver's Spark)."""
    import pyspark

    return pyspark.__version__


def delta_artifact(delta: str | None = None, spark: str | None = None) -> str:
    """Delta's Maven artifact name, derived the way delta-spark's own `pip_utils` derives it.

    Delta >= 4.1 publishes one artifact per Spark minor version, `delta-spark_<spark major.minor>_2.13`
    (e.g. delta-spark_4.2_2.13 for Delta 4.4 on Spark 4.2); earlier releases `delta-spark_2.13`.
    """
    delta = delta or delta_version()
    spark = spark or spark_version()
    major, minor = (int(x) for x in delta.split(".")[:2])
    if (major, minor) >= (4, 1):
        return f"delta-spark_{'.'.join(spark.split('.')[:2])}_{SCALA_VERSION}"
    return f"delta-spark_{SCALA_VERSION}"


def delta_jar_names() -> list[str]:
    """File names `mvn dependency:copy` gives the two Delta jars."""
    v = delta_version()
    return [f"{delta_artifact(v)}-{v}.jar", f"delta-storage-{v}.jar"]


def delta_maven_coordinates() -> list[str]:
    """group:artifact:version of the Delta jars matching the installed delta-spark and pyspark."""
    v = delta_version()
    return [f"io.delta:{delta_artifact(v)}:{v}", f"io.delta:delta-storage:{v}"]


def running_under_spark_submit() -> bool:
    """True when spark-submit launched this Python driver (its JVM is already up)."""
    return "PYSPARK_GATEWAY_PORT" in os.environ


def cached_delta_jars(jar_cache_dir: str) -> list[str] | None:
    """Paths of both Delta jars in the cache, or None if either is missing."""
    cache = Path(os.path.expanduser(jar_cache_dir))
    paths = [cache / name for name in delta_jar_names()]
    return [str(p) for p in paths] if all(p.is_file() for p in paths) else None


# confs a Spark Connect client may set on its session: SQL and Delta runtime confs. Everything else (master,
# jars, spark.sql.extensions and catalogs, warehouse, spark.hadoop.*, driver/executor settings) belongs to the
# server and is set where it starts (static SQL confs among the sent ones are ignored by the server)
CONNECT_CLIENT_CONF_PREFIXES = ("spark.sql.", "spark.databricks.delta.")
CONNECT_SERVER_CONFS = ("spark.sql.extensions", "spark.sql.catalog.", "spark.sql.warehouse.dir",
                        "spark.sql.catalogImplementation")


def connect_client_conf(key: str) -> bool:
    """Whether a conf can be set from a Spark Connect client (a session's runtime SQL or Delta conf)."""
    return key.startswith(CONNECT_CLIENT_CONF_PREFIXES) and not key.startswith(CONNECT_SERVER_CONFS)


def connect_builder(settings: SparkSettings) -> SparkSession.Builder:
    """A Spark Connect builder for `settings.connect_url` (`spark.remote` or $SPARK_REMOTE).

    No master and no jars: the server has them (Delta's jars and its SQL extension/catalog are server
    settings). The session's runtime confs (UTC, Arrow, shuffle partitions, the user's `spark.sql.*` and
    `spark.databricks.delta.*`) are sent; the user's other `spark.conf` keys are named in a warning as the
    server's to set."""
    url = settings.connect_url
    runtime = {
        "spark.sql.session.timeZone": "UTC",
        "spark.sql.execution.arrow.pyspark.enabled": "true",
        "spark.sql.shuffle.partitions": str(settings.shuffle_partitions),
        "spark.databricks.delta.schema.autoMerge.enabled": "false",
    }
    server = sorted(k for k in settings.conf if not connect_client_conf(k))
    if server:
        log.warning("Spark Connect: spark.conf %s belong to the server (set them where it starts: spark-submit "
                    "--conf, the cluster's Spark config); they are not sent", server)
    if settings.master and settings.master != "local[*]":
        log.warning("Spark Connect: spark.master %s is ignored (the server's master runs the work)", settings.master)
    builder = SparkSession.builder.remote(url)
    for key, value in {**runtime, **{k: v for k, v in settings.conf.items() if connect_client_conf(k)}}.items():
        builder = builder.config(key, value)
    return builder


def session_builder(settings: SparkSettings) -> SparkSession.Builder:
    """A builder with the Delta extensions, Arrow and sane local defaults (`connect_builder` when
    `settings.connect_url` names a Spark Connect server)."""
    if settings.connect_url:
        return connect_builder(settings)
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
        # local tables are small: Delta's default of 50 partitions to rebuild a snapshot costs seconds per read
        defaults["spark.databricks.delta.snapshotPartitions"] = "4"
        # ... and 10,000 tasks to list a table's directories in parallel (VACUUM, large path lists): ~30 s each
        defaults["spark.sql.sources.parallelPartitionDiscovery.parallelism"] = "8"
        # local-mode Python workers inherit the driver's environment
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    for key, value in {**defaults, **settings.conf}.items():
        builder = builder.config(key, value)
    return _with_delta_jars(builder, settings, submitted)


def joined_list_conf(user: Optional[str], ours: list[str]) -> str:
    """A comma-separated Spark list conf (`spark.jars`, `spark.jars.packages`) holding the user's entries
    first, then ours not already there: bcemb adds Delta's jars, never replaces the user's (an S3A or
    cloud-storage connector given as `--conf spark.jars=...` stays on the class path)."""
    entries = [e.strip() for e in (user or "").split(",") if e.strip()]
    return ",".join(entries + [e for e in ours if e not in entries])


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
        return builder.config("spark.jars", joined_list_conf(settings.conf.get("spark.jars"), jars))
    log.info("Delta jars: Ivy (%s)", ", ".join(delta_maven_coordinates()))
    # Ivy resolves both jars from the coordinates (delta-spark's pom depends on delta-storage); the same
    # coordinates delta's configure_spark_with_delta_pip would add, without importing delta here
    return builder.config("spark.jars.packages",
                          joined_list_conf(settings.conf.get("spark.jars.packages"), delta_maven_coordinates()[:1]))


def is_connect(spark) -> bool:
    """True for a Spark Connect session (`pyspark.sql.connect`): no SparkContext, RDDs or JVM handle, and no
    `delta.tables.DeltaTable` unless the server runs Delta's Connect plugin, so every Delta operation below
    goes through SQL."""
    return type(spark).__module__.startswith("pyspark.sql.connect")


def default_parallelism(spark, fallback: int = 8) -> int:
    """The session's default parallelism (classic: `SparkContext.defaultParallelism`, the cores); on Spark
    Connect, which has no SparkContext, the server's `spark.default.parallelism` when it is set, else
    `fallback`."""
    if not is_connect(spark):
        return int(spark.sparkContext.defaultParallelism)
    try:
        return int(spark.conf.get("spark.default.parallelism", None) or fallback)
    except Exception:  # noqa: BLE001 - a conf the server will not show is the fallback
        return fallback


SPLIT_BYTES = 128 * 2**20  # Spark's file split size (spark.sql.files.maxPartitionBytes' default)


def max_partition_num(units: int, units_per_partition: int, parallelism: int) -> int:
    """A cap on a file scan's partitions for `spark.sql.files.maxPartitionNum` (Spark merges splits down to about
    this count, never splits more): the partitions `units` need at `units_per_partition` each (rows per output
    file, bytes per split), rounded up, or the cluster's `parallelism` when that is more (every core works).
    Spark counts 4 MiB of opening per file (`spark.sql.files.openCostInBytes`), so a source of 20,000 one-row
    files otherwise scans in ~600 splits, and a rewrite writes a file per split per space."""
    return max(1, int(parallelism), -(-int(units) // max(1, int(units_per_partition))))


def get_or_create(settings: SparkSettings) -> SparkSession:
    """Build the session (for jobs and the CLI only; library code takes `spark`)."""
    if settings.connect_url:
        check_connect_server(settings)
    spark = session_builder(settings).getOrCreate()
    if is_connect(spark):
        log.info("Spark Connect session on %s (Spark %s)", settings.connect_shown, spark.version)
        if settings.ship_bclib:
            ship_bclib(spark)
    else:
        spark.sparkContext.setLogLevel(settings.log_level)
    return spark


def check_connect_server(settings: SparkSettings, timeout_s: float = 10.0) -> None:
    """ConnectServerUnreachableError unless something accepts a TCP connection at the Spark Connect URL's host and
    port (default 15002) within `timeout_s`: pyspark's client otherwise retries for minutes without a word. The
    message shows the URL without its parameters (a token). A TLS or authentication mismatch is not caught here."""
    import socket
    from urllib.parse import urlsplit

    from bclib.errors import ConnectServerUnreachableError

    url = settings.connect_url or ""
    parts = urlsplit(url.split(";", 1)[0])
    host, port = parts.hostname or "localhost", parts.port or 15002
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            return
    except OSError as exc:
        raise ConnectServerUnreachableError(
            f"no Spark Connect server answers at {settings.connect_shown} ({host}:{port}: "
            f"{exc.strerror or type(exc).__name__}); start it, or fix spark.remote / $SPARK_REMOTE") from None


_shipped: set[int] = set()


def ship_bclib(spark) -> bool:
    """Send this bclib to a Spark Connect session's Python workers (`spark.addArtifacts(zip, pyfile=True)`):
    the server's workers then import the client's bclib (mapInArrow tasks), so only its dependencies (numpy,
    pyarrow, pyyaml) must be installed there. Once per session: returns False when it was sent before.
    """
    import tempfile
    import zipfile

    import bclib

    if id(spark) in _shipped:
        return False
    root = Path(bclib.__file__).resolve().parent
    with tempfile.TemporaryDirectory(prefix="bcemb-artifacts-") as tmp:
        target = Path(tmp) / "bclib.zip"
        with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as z:
            for path in sorted(root.rglob("*.py")):
                z.write(path, str(Path("bclib") / path.relative_to(root)))
        spark.addArtifacts(str(target), pyfile=True)  # uploaded before it returns
        size = target.stat().st_size
    _shipped.add(id(spark))
    log.info("Spark Connect: bclib sent to the server's Python workers (bclib.zip, %d KiB)", size // 1024)
    return True


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


def commit_conf(user_metadata: Optional[str] = None, txn_app_id: Optional[str] = None,
                txn_version: Optional[int] = None) -> dict[str, str]:
    """Session confs that label the next Delta commits of this session (MERGE, UPDATE, DELETE, writes).

    `spark.databricks.delta.commitInfo.userMetadata` is the commit's userMetadata (shown by DESCRIBE
    HISTORY); `spark.databricks.delta.write.txnAppId` / `txnVersion` make the commit idempotent: Delta
    skips it when the table already recorded that application id at that version or later (Delta's
    "idempotent writes", docs.delta.io: "Idempotent writes").
    """
    out: dict[str, str] = {}
    if user_metadata is not None:
        out["spark.databricks.delta.commitInfo.userMetadata"] = user_metadata
    if txn_app_id is not None:
        out["spark.databricks.delta.write.txnAppId"] = txn_app_id
        out["spark.databricks.delta.write.txnVersion"] = str(int(txn_version or 0))
    return out


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


# --------------------------------------------------------------------------- hints for failures of the environment

_CONNECTOR_JARS = {
    "s3a": "org.apache.hadoop:hadoop-aws:<Spark's Hadoop version> (plus its AWS SDK bundle)",
    "gs": "com.google.cloud.bigdataoss:gcs-connector:hadoop3-<version>-shaded",
    "abfs": "org.apache.hadoop:hadoop-azure:<Spark's Hadoop version>",
    "abfss": "org.apache.hadoop:hadoop-azure:<Spark's Hadoop version>",
    "wasbs": "org.apache.hadoop:hadoop-azure:<Spark's Hadoop version>",
}


def java_hint() -> str:
    """Why the JVM did not start: no Java, or one older than Spark 4 needs (17)."""
    import re
    import shutil
    import subprocess

    home = os.environ.get("JAVA_HOME")
    java = str(Path(home) / "bin" / "java") if home else shutil.which("java")
    if not java or not Path(java).exists():
        return ("Spark needs Java 17 or newer and none was found: install a JDK 17 "
                "(e.g. apt-get install openjdk-17-jre-headless) or set JAVA_HOME")
    try:
        out = subprocess.run([java, "-version"], capture_output=True, text=True, timeout=30).stderr
    except OSError as exc:
        return f"{java} could not run ({exc}); Spark needs Java 17 or newer"
    found = re.search(r'version "(\d+)(?:\.(\d+))?', out)
    major = int(found.group(1)) if found else 0
    if major == 1 and found and found.group(2):
        major = int(found.group(2))
    if major and major < 17:
        return f"{java} is Java {major}; Spark 4 needs Java 17 or newer (set JAVA_HOME to a JDK 17+)"
    return f"Java at {java} did not start Spark; the lines above say why"


def missing_class_hint(text: str) -> str:
    """Which jar to add for a ClassNotFoundException / unknown filesystem scheme in `text`."""
    import re

    scheme = re.search(r'No FileSystem for scheme "?(\w+)', text)
    if scheme:
        jar = _CONNECTOR_JARS.get(scheme.group(1), "the Hadoop connector for that filesystem")
        return f"the cluster lacks the '{scheme.group(1)}' filesystem: add {jar} with --packages or --jars"
    cls = re.search(r"ClassNotFoundException:?\s*(?:Class\s+)?([\w.$]+)", text)
    name = cls.group(1) if cls else ""
    if "S3AFileSystem" in name:
        return f"{name} is missing: add {_CONNECTOR_JARS['s3a']} with --packages or --jars"
    if "GoogleHadoopFileSystem" in name:
        return f"{name} is missing: add {_CONNECTOR_JARS['gs']} with --packages or --jars"
    if "azure" in name.lower():
        return f"{name} is missing: add {_CONNECTOR_JARS['abfs']} with --packages or --jars"
    if name.startswith("io.delta") or "delta" in name.lower():
        return (f"{name} is missing: the Delta jars are not on the classpath; add them with "
                f"--packages {','.join(delta_maven_coordinates())} (or run `make jars` for a local cache)")
    return f"{name or 'a class'} is missing from the classpath: add its jar with --packages or --jars"


@contextmanager
def progress(spark, stage: str, every_s: float = 30.0) -> Iterator[None]:
    """Log a heartbeat for a long stage at least every `every_s` seconds while the block runs.

    Each line names the stage, the seconds elapsed and, when Spark jobs are running, their tasks done /
    total (`SparkContext.statusTracker()`: active jobs -> stages -> numCompletedTasks / numTasks; on Spark
    Connect the progress the server streams, `registerProgressHandler`); with no
    Spark job active it says the driver is working (numpy fits, metrics). A daemon thread; it stops with
    the block and never raises into it.
    """
    import threading
    import time

    done = threading.Event()
    started = time.time()
    connect = is_connect(spark)
    latest: dict[str, tuple[int, int]] = {}  # Spark Connect: operation id -> (tasks done, tasks) of its stages

    def on_progress(**event) -> None:  # Spark Connect's handler: stages, inflight_tasks, operation_id, done
        key, stages = event.get("operation_id") or "", event.get("stages")
        if event.get("done") or not stages:
            latest.pop(key, None)
        else:
            latest[key] = (sum(s.num_completed_tasks for s in stages), sum(s.num_tasks for s in stages))

    def tasks() -> tuple[int, int]:
        if connect:
            counts = list(latest.values())
            return sum(c[0] for c in counts), sum(c[1] for c in counts)
        tracker = spark.sparkContext.statusTracker()
        finished = total = 0
        for job_id in tracker.getActiveJobsIds():
            job = tracker.getJobInfo(job_id)
            for stage_id in (job.stageIds if job else []):
                info = tracker.getStageInfo(stage_id)
                if info:
                    finished += info.numCompletedTasks
                    total += info.numTasks
        return finished, total

    def beat() -> None:
        while not done.wait(every_s):
            try:
                finished, total = tasks()
                what = f"Spark tasks {finished}/{total}" if total else "driver-side work (no Spark job running)"
                log.info("%s: still running after %.0fs: %s", stage, time.time() - started, what)
            except Exception:  # noqa: BLE001 - a heartbeat must never break the stage it reports on
                log.info("%s: still running after %.0fs", stage, time.time() - started)

    if connect:
        spark.registerProgressHandler(on_progress)
    thread = threading.Thread(target=beat, name=f"bcemb-progress-{stage}", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        if connect:
            spark.removeProgressHandler(on_progress)


def ephemeral_catalog_warning(spark, names) -> Optional[str]:
    """A warning when catalog table `names` (not paths: `bclib.tables.delta.is_path` sorts them) are used
    with Spark's in-memory catalog, else None.

    `spark.sql.catalogImplementation = in-memory` (pyspark's default without Hive) forgets table names when the
    session ends: the next run finds no table under the name and rewrites everything (or fails on the
    existing directory). Paths, or a persistent metastore (Hive, Unity, Glue), keep reruns incremental.
    """
    names = [n for n in names if n]
    if not names:
        return None
    try:
        impl = spark.conf.get("spark.sql.catalogImplementation", "in-memory")
    except Exception:  # noqa: BLE001 - a conf we cannot read is not worth failing a run for
        return None
    if impl != "in-memory":
        return None
    if is_connect(spark):
        return (f"catalog table names {names} live in the Spark Connect server's in-memory catalog: they last until "
                "the server restarts, then the next run finds no table and rewrites everything; use Delta paths or a "
                "persistent metastore on the server (Hive, Unity Catalog, Glue)")
    return (f"catalog table names {names} with Spark's in-memory catalog do not persist after this session: the "
            "next run will not find them and rewrites everything; use Delta paths or a persistent metastore "
            "(spark.sql.catalogImplementation=hive, Unity Catalog, Glue)")


# Spark's loggers that print a failed task's whole traceback (Python worker and JVM frames) at ERROR: the CLI
# names the same failure in one line, and `--debug` (or spark.log_level INFO/DEBUG) keeps them
TASK_FAILURE_LOGGERS = ("org.apache.spark.executor.Executor", "org.apache.spark.scheduler.TaskSetManager",
                        "org.apache.spark.util.Utils", "org.apache.spark.sql.delta.files.DeltaFileFormatWriter",
                        "org.apache.spark.sql.execution.datasources.FileFormatWriter")


def quiet_task_failure_logs(spark) -> bool:
    """Raise TASK_FAILURE_LOGGERS to FATAL in this driver (log4j2 `Configurator.setLevel`), so a refused run
    prints its one named line instead of pages of task tracebacks. Classic sessions only (no JVM handle on
    Spark Connect): returns whether it applied."""
    try:
        jvm = spark.sparkContext._jvm
        configurator = jvm.org.apache.logging.log4j.core.config.Configurator
        fatal = jvm.org.apache.logging.log4j.Level.FATAL
        for name in TASK_FAILURE_LOGGERS:
            configurator.setLevel(name, fatal)
        return True
    except Exception:  # Spark Connect, or another logging backend: leave Spark's logging as it is
        return False


@contextmanager
def logger_level(spark, name: str, level: str):
    """Set the driver's log4j2 logger `name` to `level` (ERROR, FATAL, ...) inside the block, then undo it
    (`Configurator.setLevel`): a logger configured before gets its level back, one that only inherited its
    level loses the setting again, so it follows the root level (`sc.setLogLevel`) as before. Classic sessions
    only: on Spark Connect (no JVM handle) or another logging backend the block runs with logging as it is."""
    undo = None
    try:
        jvm = spark.sparkContext._jvm
        log4j = jvm.org.apache.logging.log4j
        context = log4j.core.LoggerContext.getContext(False)
        config = context.getConfiguration()
        if config.getLoggers().containsKey(name):
            previous = log4j.LogManager.getLogger(name).getLevel()
            undo = lambda: log4j.core.config.Configurator.setLevel(name, previous)  # noqa: E731
        else:
            def undo():
                config.removeLogger(name)
                context.updateLoggers()
        log4j.core.config.Configurator.setLevel(name, log4j.Level.toLevel(level))
    except Exception:  # noqa: BLE001 - Spark Connect, or another logging backend: logging stays as it is
        undo = None
    try:
        yield
    finally:
        if undo is not None:
            undo()
