"""Delta tables by path or catalog name: existence, pinned reads, the one save helper.

A location with '/' or a URI scheme is a Delta path; anything else is a catalog table name. Every
write in bcemb goes through `save` so paths and catalog tables behave the same.
"""

from __future__ import annotations

import logging
import random
import re
import time
from typing import Callable, Optional, TypeVar

from bclib.errors import MissingColumnError, MissingTableError

log = logging.getLogger(__name__)

T = TypeVar("T")


def is_path(location: str) -> bool:
    """A location with '/' or a URI scheme is a Delta path; otherwise a catalog table name."""
    return "/" in location or "://" in location or location.startswith(".")


def delta_table(spark, location: str):
    """`delta.tables.DeltaTable` for a path or a catalog name."""
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, location) if is_path(location) else DeltaTable.forName(spark, location)


def table_exists(spark, location: str) -> bool:
    """True when `location` is a Delta table (path) or an existing catalog table (name)."""
    from delta.tables import DeltaTable

    if is_path(location):
        return DeltaTable.isDeltaTable(spark, location)
    return spark.catalog.tableExists(location)


def require_table(spark, location: str, what: str, hint: str = "") -> None:
    """Raise MissingTableError ('<what> table not found: ...<hint>') unless `location` is a Delta table."""
    if not table_exists(spark, location):
        raise MissingTableError(f"{what} table not found: '{location}' is not a Delta table{hint}")


def current_delta_version(spark, location: str) -> int:
    """The table's latest commit version (pinned for reproducible reads and lineage)."""
    return int(delta_table(spark, location).history(1).select("version").first()[0])


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


def retry_on_conflict(action: Callable[[], T], what: str, attempts: int = 3, backoff_s: float = 1.0) -> T:
    """Run `action`; on a Delta concurrent-modification exception, wait and run it again (it re-plans).

    Only Delta's typed conflict exceptions (ConcurrentAppendException, ConcurrentWriteException,
    MetadataChangedException, ProtocolChangedException, ...; `conflict_exceptions`) are retried,
    `attempts` times in all with exponential backoff plus jitter; then ConcurrentRunError names `what`.
    """
    from bclib.errors import ConcurrentRunError

    kinds = conflict_exceptions()
    for attempt in range(1, attempts + 1):
        try:
            return action()
        except kinds as exc:
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
