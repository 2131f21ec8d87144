"""Delta tables by path or catalog name: existence, pinned reads, the one save helper.

A location with '/' or a URI scheme is a Delta path; anything else is a catalog table name. Every
write in bcemb goes through `save` so paths and catalog tables behave the same.
"""

from __future__ import annotations

import logging
from typing import Optional

from bclib.errors import MissingColumnError, MissingTableError

log = logging.getLogger(__name__)


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


def save(writer, location: str) -> None:
    """Run a configured `DataFrameWriter` into a Delta path (`save`) or a catalog table (`saveAsTable`)."""
    if is_path(location):
        writer.save(location)
    else:
        writer.saveAsTable(location)
