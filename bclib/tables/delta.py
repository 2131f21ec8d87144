"""Delta tables by path or catalog name: existence, pinned reads, the one save helper.

A location with '/' or a URI scheme is a Delta path; anything else is a catalog table name. Every
write in bcemb goes through `save` so paths and catalog tables behave the same.
"""

from __future__ import annotations

import logging
import os
import random
import re
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Callable, Optional, TypeVar
from urllib.parse import unquote

from bclib.errors import MissingColumnError, MissingTableError, error_class
from bclib.spark import is_connect

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_path(location: str) -> bool:
    """A location with '/' or a URI scheme is a Delta path; otherwise a catalog table name."""
    return "/" in location or "://" in location or location.startswith(".")


def delta_table(spark, location: str):
    """`delta.tables.DeltaTable` for a path or a catalog name (classic sessions only: tests use it as another
    writer would; bcemb's own code goes through the SQL functions below, which also run on Spark Connect)."""
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, location) if is_path(location) else DeltaTable.forName(spark, location)


def sql_table(location: str) -> str:
    """A table reference for Spark SQL: delta.`<path>` (backticks doubled) or a validated, quoted catalog name.

    A relative path is made absolute here (Delta resolves only absolute paths in delta.`...`); on Spark Connect
    config checks refuse relative paths first (the client's working directory is not the server's)."""
    if is_path(location):
        if "://" not in location and ":" not in location.split("/", 1)[0]:
            location = os.path.abspath(location)
        return "delta.`" + location.replace("`", "``") + "`"
    return quoted_identifier(location)


def sql_string(value: str) -> str:
    """A Spark SQL string literal for `value` (backslashes and single quotes escaped)."""
    return "'" + str(value).replace("\\", "\\\\").replace("'", "\\'") + "'"


# Delta's errors for "no Delta table here" on a path (DESCRIBE DETAIL / a read), by error class
_NOT_A_TABLE = ("DELTA_MISSING_DELTA_TABLE", "DELTA_PATH_DOES_NOT_EXIST", "PATH_NOT_FOUND", "DELTA_TABLE_NOT_FOUND",
                "DELTA_MISSING_TRANSACTION_LOG", "TABLE_OR_VIEW_NOT_FOUND", "DELTA_NOT_A_DELTA_TABLE")


def table_exists(spark, location: str) -> bool:
    """True when `location` is a Delta table (path) or an existing catalog table (name).

    Classic: `DeltaTable.isDeltaTable`. Spark Connect: `DESCRIBE DETAIL` answers with format 'delta', or fails
    with one of Delta's "no table here" error classes (False); any other failure is raised."""
    if not is_path(location):
        return spark.catalog.tableExists(location)
    if not is_connect(spark):
        from delta.tables import DeltaTable

        return DeltaTable.isDeltaTable(spark, location)
    try:
        row = spark.sql(f"DESCRIBE DETAIL {sql_table(location)}").select("format").first()
    except Exception as exc:  # noqa: BLE001 - sorted by Delta's error class below
        if error_class(exc) in _NOT_A_TABLE:
            return False
        raise
    return row is not None and (row[0] or "").lower() == "delta"


def require_table(spark, location: str, what: str, hint: str = "") -> None:
    """Raise MissingTableError ('<what> table not found: ...<hint>') unless `location` is a Delta table."""
    if not table_exists(spark, location):
        raise MissingTableError(f"{what} table not found: '{location}' is not a Delta table{hint}")


def history(spark, location: str, limit: Optional[int] = None):
    """A Delta table's history, newest first, as a DataFrame (version, timestamp, operation,
    operationParameters, userMetadata, operationMetrics, ...).

    Classic sessions: `DeltaTable.history` (measured 0.18 s a call on a warm local session, where the same
    `DESCRIBE HISTORY ... LIMIT 1` through `spark.sql` and `.first()` took 0.35-0.55 s); Spark Connect:
    `DESCRIBE HISTORY` (no DeltaTable there without Delta's server plugin)."""
    if not is_connect(spark):
        table = delta_table(spark, location)
        return table.history(int(limit)) if limit is not None else table.history()
    limit_sql = f" LIMIT {int(limit)}" if limit is not None else ""
    return spark.sql(f"DESCRIBE HISTORY {sql_table(location)}{limit_sql}")


@dataclass(frozen=True)
class Commit:
    """One entry of a Delta table's history (its commitInfo), as `commits` returns it."""

    version: int
    timestamp: datetime  # naive, UTC (the commit's timestamp)
    operation: str  # WRITE, MERGE, OPTIMIZE, VACUUM START, ...
    user_metadata: Optional[str] = None
    operation_metrics: dict = field(default_factory=dict)  # name -> value (strings from Spark, numbers from delta-rs)
    operation_parameters: dict = field(default_factory=dict)  # name -> value as the writer recorded it


def _log_reader(spark, location: str, storage_options: Optional[dict], version: Optional[int] = None):
    """A delta-rs table over `location` when this process can read its log directly, else None (read it through
    Spark): a local path (not on Spark Connect, where local paths are the server's), or a remote URI with the
    storage options delta-rs needs. A table delta-rs cannot open (a reader feature it lacks, no table) is None."""
    from bclib.storage import local_path

    if not is_path(location):
        return None
    local = local_path(location)
    if (local is None and not storage_options) or (local is not None and is_connect(spark)):
        return None
    try:
        from bclib.tables.delta_rs import open_table

        return open_table(location, version, storage_options=None if local is not None else storage_options)
    except Exception as exc:  # noqa: BLE001 - any failure: Spark reads the log instead (and raises its own error)
        log.debug("delta-rs cannot open %s (%s): reading its log through Spark", location, exc)
        return None


def _utc(value) -> datetime:
    """A commit timestamp as a naive UTC datetime: delta-rs gives epoch milliseconds, Spark a datetime in the
    session time zone (UTC in every bcemb session)."""
    if isinstance(value, datetime):
        return value.astimezone(timezone.utc).replace(tzinfo=None) if value.tzinfo else value
    return datetime.fromtimestamp(int(value) / 1000.0, timezone.utc).replace(tzinfo=None)


def commits(spark, location: str, limit: Optional[int] = None,
            storage_options: Optional[dict] = None) -> list[Commit]:
    """The table's history, newest first, at most `limit` entries (None: all the log holds).

    Read from the Delta log by delta-rs where this process can read it directly (`_log_reader`): no Spark job
    (Delta's own `history()` runs one per call, 0.12-0.18 s on a warm local session, more on a cold one);
    else through Spark (`history`). Both read the same commitInfo actions of the same log."""
    reader = _log_reader(spark, location, storage_options)
    if reader is not None:
        entries = reader.history(int(limit) if limit is not None else None)
        return [Commit(int(e["version"]), _utc(e["timestamp"]), str(e.get("operation") or ""),
                       e.get("userMetadata"), dict(e.get("operationMetrics") or {}),
                       dict(e.get("operationParameters") or {}))
                for e in sorted(entries, key=lambda e: -int(e["version"]))]
    rows = history(spark, location, limit).select("version", "timestamp", "operation", "userMetadata",
                                                   "operationMetrics", "operationParameters").collect()
    return [Commit(int(r.version), _utc(r.timestamp), r.operation, r.userMetadata, dict(r.operationMetrics or {}),
                   dict(r.operationParameters or {}))
            for r in sorted(rows, key=lambda r: -int(r.version))]


def log_row_count(spark, location: str, delta_version: Optional[int] = None,
                  storage_options: Optional[dict] = None) -> Optional[int]:
    """The table's rows at `delta_version` (None: the latest) from its log: the sum of the live files'
    `numRecords` statistics, as Delta's own metadata-only `count()` answers it, read by delta-rs where this
    process reads the log directly (`_log_reader`): no Spark job. A table with deletion vectors: each file's
    `numRecords` less the rows its deletion vector removes (`_deleted_rows`). None when the log cannot answer so
    (no direct reader, a file without statistics, deletion vectors delta-rs cannot read): count through Spark
    then."""
    rows = log_partition_rows(spark, location, None, delta_version, storage_options)
    return None if rows is None else sum(rows.values())


def log_size(spark, location: str, delta_version: Optional[int] = None,
             storage_options: Optional[dict] = None) -> Optional[tuple[int, int]]:
    """(live data files, their bytes) of the table at `delta_version` (None: the latest) from its log's add
    actions, read by delta-rs where this process reads the log directly (`_log_reader`): no Spark job. None
    when it cannot (a catalog name, a path local to a Spark Connect server, a table delta-rs cannot open)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    reader = _log_reader(spark, location, storage_options, delta_version)
    if reader is None:
        return None
    sizes = pa.table(reader.get_add_actions(flatten=True)).column("size_bytes")
    return len(sizes), int(pc.sum(sizes).as_py() or 0)


def log_partition_rows(spark, location: str, column: Optional[str], delta_version: Optional[int] = None,
                       storage_options: Optional[dict] = None) -> Optional[dict]:
    """{value of the partition column `column`: rows} of the table at `delta_version` from its log's per-file
    `numRecords` (`column` None: {None: all rows}); None when the log cannot answer (see `log_row_count`)."""
    import pyarrow as pa

    reader = _log_reader(spark, location, storage_options, delta_version)
    if reader is None:
        return None
    adds = pa.table(reader.get_add_actions(flatten=True))
    if not adds.num_rows:
        return {}
    if "num_records" not in adds.column_names or adds.column("num_records").null_count:
        return None
    if column is not None and f"partition.{column}" not in adds.column_names:
        return None
    records = adds.column("num_records").to_pylist()
    if "deletionVectors" in (reader.protocol().reader_features or []):
        deleted = _deleted_rows(reader)
        if deleted is None:
            return None
        base = reader.table_uri.rstrip("/") + "/"
        uris = [unquote(base + p) for p in adds.column("path").to_pylist()]
        if not set(deleted) <= set(uris):  # a vector whose file this listing does not name: let Spark count
            log.debug("deletion vectors of %s name files its add actions do not: counting through Spark",
                      reader.table_uri)
            return None
        records = [n - deleted.get(uri, 0) for n, uri in zip(records, uris)]
    if column is None:
        return {None: int(sum(records))}
    out: dict = {}
    for key, n in zip(adds.column(f"partition.{column}").to_pylist(), records):
        out[key] = out.get(key, 0) + int(n)
    return out


def _deleted_rows(reader) -> Optional[dict]:
    """{data file URI (percent-decoded): rows its deletion vector removes} of a delta-rs table: each live file's
    deletion vector read as delta-rs exposes it (`DeltaTable.deletion_vectors()`, a selection vector per file
    that has one, False for a deleted row). None when delta-rs cannot read them (count through Spark then)."""
    import pyarrow as pa
    import pyarrow.compute as pc

    try:
        dvs = pa.table(reader.deletion_vectors())
    except Exception as exc:  # noqa: BLE001 - any failure: the caller counts through Spark instead
        log.debug("delta-rs cannot read the deletion vectors of %s (%s): counting through Spark", reader.table_uri, exc)
        return None
    out: dict = {}
    # per file: its selection vector's length less its True (kept) entries; the vectors stay bit-packed booleans
    # (one bit a row of a file with a vector), nothing is widened per row
    for uri, selection in zip(dvs.column("filepath").to_pylist(), dvs.column("selection_vector")):
        kept = selection.values
        out[unquote(uri)] = len(kept) - int(pc.sum(kept).as_py() or 0)
    return out


@dataclass(frozen=True)
class LogDetail:
    """What `DESCRIBE DETAIL` says of a table that its log's metadata and protocol actions answer (`log_detail`)."""

    partition_columns: list
    properties: dict  # metaData.configuration
    num_files: int
    writer_features: frozenset


def log_detail(spark, location: str, storage_options: Optional[dict] = None) -> Optional[LogDetail]:
    """The table's partition columns, properties and file count from its log, read by delta-rs where this process
    reads the log directly (`_log_reader`): no Spark job (`DESCRIBE DETAIL` runs one or two to compute the
    snapshot's size). None when it cannot (read `detail` then)."""
    reader = _log_reader(spark, location, storage_options)
    if reader is None:
        return None
    meta, proto = reader.metadata(), reader.protocol()
    return LogDetail(list(meta.partition_columns or []), dict(meta.configuration or {}), len(reader.file_uris()),
                     frozenset(proto.writer_features or []))


def detail(spark, location: str):
    """`DESCRIBE DETAIL` of a Delta table: one Row (format, location, numFiles, partitionColumns,
    clusteringColumns, properties, ...)."""
    return spark.sql(f"DESCRIBE DETAIL {sql_table(location)}").first()


def current_delta_version(spark, location: str, storage_options: Optional[dict] = None) -> int:
    """The table's latest commit version (pinned for reproducible reads and lineage): from the log by delta-rs
    where this process reads it directly (`_log_reader`, no Spark job), else Delta's history through Spark."""
    reader = _log_reader(spark, location, storage_options)
    if reader is not None:
        return int(reader.version())
    return int(history(spark, location, 1).select("version").first()[0])


def read_delta(spark, location: str, delta_version: Optional[int] = None):
    """Read a Delta table by path or name, optionally at a pinned version (time travel)."""
    reader = spark.read.format("delta")
    if delta_version is not None:
        reader = reader.option("versionAsOf", int(delta_version))
    if is_path(location):
        return reader.load(location)
    return reader.table(location)


def require_columns(df, columns: list[str], table: str) -> None:
    """Raise MissingColumnError naming the missing and the available columns of `table`."""
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MissingColumnError(
            f"table '{table}' lacks column(s) {missing}; available columns: {df.columns}"
        )


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def quoted_identifier(name: str) -> str:
    """A catalog name (table, db.table, catalog.db.table) quoted for Spark SQL, each part validated.

    Raises ConfigError unless every part is a plain identifier ([A-Za-z_][A-Za-z0-9_]*): names from a
    config never reach SQL unchecked.
    """
    from bclib.errors import ConfigError

    parts = name.split(".")
    if not 1 <= len(parts) <= 3 or not all(_IDENTIFIER.match(p) for p in parts):
        raise ConfigError(f"{name!r} is not a catalog table name: expected up to three dot-separated identifiers "
                          "of letters, digits and underscores")
    return ".".join(f"`{p}`" for p in parts)


def save(writer, location: str) -> None:
    """Run a configured `DataFrameWriter` into a Delta path (`save`) or a catalog table (`saveAsTable`)."""
    if is_path(location):
        writer.save(location)
    else:
        writer.saveAsTable(location)


_SQL_TYPE = re.compile(r"^[a-z][a-z0-9_<>,:() ]*$")


def create_table(spark, location: str, columns: dict[str, str], partitioned_by: tuple[str, ...] = (),
                 properties: Optional[dict[str, str]] = None) -> None:
    """CREATE TABLE IF NOT EXISTS for a Delta path or catalog name (one commit, operation CREATE TABLE).

    columns: {name: Spark SQL type ('int', 'array<float>', ...)} in table order; `properties` become
    TBLPROPERTIES (escaped literals). Column names are quoted; a type that is not a plain SQL type name raises
    ValueError (they come from bcemb's code or a Spark schema, never from text in a config)."""
    for name, dtype in columns.items():
        if not _SQL_TYPE.match(dtype):
            raise ValueError(f"column {name!r}: {dtype!r} is not a Spark SQL type name")
    cols = ", ".join(f"{quoted_column(n)} {t}" for n, t in columns.items())
    sql = f"CREATE TABLE IF NOT EXISTS {sql_table(location)} ({cols}) USING DELTA"
    if partitioned_by:
        sql += " PARTITIONED BY (" + ", ".join(quoted_column(c) for c in partitioned_by) + ")"
    if properties:
        sql += " TBLPROPERTIES (" + ", ".join(f"{sql_string(k)} = {sql_string(v)}"
                                              for k, v in sorted(properties.items())) + ")"
    spark.sql(sql)


def quoted_column(name: str) -> str:
    """A column name quoted for Spark SQL (backticks doubled)."""
    return "`" + name.replace("`", "``") + "`"


def merge(spark, location: str, source, condition: str, clauses: list[str]) -> None:
    """MERGE INTO the Delta table at `location` (alias t) USING `source` (a DataFrame, alias s) ON `condition`,
    then `clauses` in order ('WHEN MATCHED AND ... THEN UPDATE SET ...', ...). One commit.

    The source is a temporary view of a unique name, dropped afterwards; `condition` and `clauses` are bcemb's
    own SQL (column names and constants from code). Runs on classic sessions and on Spark Connect alike."""
    import uuid

    view = f"bcemb_merge_source_{uuid.uuid4().hex}"
    source.createOrReplaceTempView(view)
    try:
        spark.sql(f"MERGE INTO {sql_table(location)} AS t USING {view} AS s ON {condition} " + " ".join(clauses))
    finally:
        spark.catalog.dropTempView(view)


def update(spark, location: str, assignments: dict[str, str], where: str) -> None:
    """UPDATE the Delta table at `location` SET column = expression ... WHERE `where` (one commit; none when no
    row matches). Expressions and the predicate are bcemb's own SQL; values from users go through `sql_string`."""
    sets = ", ".join(f"{quoted_column(c)} = {e}" for c, e in assignments.items())
    spark.sql(f"UPDATE {sql_table(location)} SET {sets} WHERE {where}")


def optimize(spark, location: str, where: str):
    """OPTIMIZE the Delta table at `location` WHERE `where` (a partition predicate; bin-packing compaction, one
    commit with dataChange = false). Returns the result row's `metrics` struct (numFilesAdded, numFilesRemoved,
    ...), as `DeltaTable.optimize().where(...).executeCompaction()` gives it."""
    return spark.sql(f"OPTIMIZE {sql_table(location)} WHERE {where}").select("metrics").first()[0]


def vacuum(spark, location: str, retain_hours: float) -> None:
    """VACUUM the Delta table at `location` RETAIN `retain_hours` HOURS (Delta's retention check applies)."""
    spark.sql(f"VACUUM {sql_table(location)} RETAIN {float(retain_hours)!r} HOURS")


# --------------------------------------------------------------------------- concurrent writers


def conflict_exceptions() -> tuple[type, ...]:
    """Delta's typed concurrent-modification exceptions (`delta.exceptions`), as py4j raises them in Python.

    Named one by one: in delta-spark 4.4 they no longer share the DeltaConcurrentModificationException
    base class in Python (each subclasses PySparkException; the raised objects are
    delta.exceptions.captured.* subclasses of these).
    """
    from delta import exceptions as dx

    from bclib.errors import ConcurrentCommitError

    kinds: tuple[type, ...] = (ConcurrentCommitError,
        dx.DeltaConcurrentModificationException, dx.ConcurrentWriteException, dx.MetadataChangedException,
        dx.ProtocolChangedException, dx.ConcurrentAppendException, dx.ConcurrentDeleteReadException,
        dx.ConcurrentDeleteDeleteException, dx.ConcurrentTransactionException)
    try:  # the arrow engine commits through delta-rs, which names a lost commit race CommitFailedError
        from deltalake.exceptions import CommitFailedError

        kinds += (CommitFailedError,)
    except ImportError:
        pass
    return kinds


# Delta's error classes for a lost commit race (the Spark Connect client raises them as generic exceptions)
_CONFLICT_CLASSES = ("DELTA_CONCURRENT_APPEND", "DELTA_CONCURRENT_DELETE_READ", "DELTA_CONCURRENT_DELETE_DELETE",
                     "DELTA_CONCURRENT_TRANSACTION", "DELTA_CONCURRENT_WRITE", "DELTA_METADATA_CHANGED",
                     "DELTA_PROTOCOL_CHANGED")


def is_conflict(exc: BaseException) -> bool:
    """Whether `exc` is Delta's (or delta-rs's, or bcemb's commit rule's) "another writer committed first":
    one of `conflict_exceptions`, or, on Spark Connect, an error whose class is one of Delta's conflict classes
    (DELTA_CONCURRENT_APPEND, DELTA_METADATA_CHANGED, ...)."""
    if isinstance(exc, conflict_exceptions()):
        return True
    return error_class(exc).split(".", 1)[0] in _CONFLICT_CLASSES


def retry_on_conflict(action: Callable[[], T], what: str, attempts: int = 3, backoff_s: float = 1.0) -> T:
    """Run `action`; on a Delta concurrent-modification exception, wait and run it again (it re-plans).

    Only Delta's typed conflict exceptions (ConcurrentAppendException, ConcurrentWriteException,
    MetadataChangedException, ProtocolChangedException, ...; `conflict_exceptions`) are retried,
    `attempts` times in all with exponential backoff plus jitter; then ConcurrentRunError names `what`.
    """
    from bclib.errors import ConcurrentRunError

    for attempt in range(1, attempts + 1):
        try:
            return action()
        except Exception as exc:
            if not is_conflict(exc):
                raise
            name = type(exc).__name__
            if attempt == attempts:
                raise ConcurrentRunError(
                    f"{what}: another writer committed first {attempts} time(s) in a row (last: {name}); "
                    "the table is consistent (Delta rejected this run's commit); run again when the other run ends"
                ) from exc
            wait = backoff_s * 2 ** (attempt - 1) * (1 + random.random())
            reason = (str(exc).strip().splitlines() or [""])[0][:500]
            log.warning("%s: %s on attempt %d of %d (%s); retrying in %.1fs (re-planning first)",
                        what, name, attempt, attempts, reason, wait)
            time.sleep(wait)
    raise AssertionError("unreachable")
