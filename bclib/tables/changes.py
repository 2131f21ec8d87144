"""What changed in a version table between two Delta versions: its Change Data Feed, last change per id.

Delta's CDF (`readChangeFeed`, `startingVersion`/`endingVersion`, docs.delta.io "Change data feed")
gives one row per inserted, deleted and updated row (pre- and post-image) with `_change_type` and
`_commit_version`. Per id the last change wins (ordered by commit version; inside one commit an
insert or post-image wins over a delete, as an overwrite emits both): 'upsert' with the new vector,
or 'delete'.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Optional

from bclib.errors import error_class
from bclib.tables.delta import read_delta
from bclib.tables.embeddings import select_version
from bclib.tables.retention import table_properties

log = logging.getLogger(__name__)

# error conditions Delta raises when the feed cannot serve a range (not enabled at some version, the
# range's files vacuumed, the log cleaned up); matched on the exception's error class, not its text
_UNAVAILABLE = ("DELTA_MISSING_CHANGE_DATA", "DELTA_CHANGE_DATA_FEED_NOT_ENABLED", "DELTA_CHANGE_TABLE_FEED_DISABLED",
                "DELTA_VERSIONS_NOT_CONTIGUOUS", "DELTA_FILE_NOT_FOUND_DETAILED", "DELTA_LOG_FILE_NOT_FOUND",
                "DELTA_CANNOT_RECONSTRUCT_PATH_FROM_URI", "FAILED_READ_FILE.FILE_NOT_EXIST", "FAILED_READ_FILE",
                "DELTA_VERSION_NOT_FOUND", "DELTA_TRUNCATED_TRANSACTION_LOG", "DELTA_SCHEMA_CHANGED_WITH_VERSION",
                "DELTA_CHANGE_DATA_FILE_NOT_FOUND", "DELTA_EMPTY_DIRECTORY")


@dataclass
class ChangeSet:
    """The last change per id between two source Delta versions, as a DataFrame(id, vector, _op)."""

    df: object
    from_delta_version: int  # first version included
    to_delta_version: int  # last version included
    upserts: int
    deletes: int
    null_ids: int = 0  # change rows with a null id
    sizes: dict = field(default_factory=dict)  # upserted vectors' element count -> rows (null vectors left out)


class ChangesUnavailable(Exception):
    """The change data feed cannot serve the range; `reason` says why (internal: the step decides)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def read_changes(spark, cfg, version: int, location: str, start: int, end: int) -> ChangeSet:
    """The last change per id of one version's table for Delta versions [start, end], materialised.

    Raises ChangesUnavailable (with the reason) when CDF is not enabled on the table or cannot serve
    the range; every other error propagates.
    """
    from pyspark.errors import AnalysisException, PySparkException
    from pyspark.sql import Window
    from pyspark.sql import functions as F

    props = table_properties(spark, location, cfg.object_store_options or None)
    if props.get("delta.enableChangeDataFeed", "false").lower() != "true":
        raise ChangesUnavailable(f"change data feed is not enabled on '{location}' "
                                 "(ALTER TABLE ... SET TBLPROPERTIES (delta.enableChangeDataFeed = true))")
    try:
        raw = (spark.read.format("delta").option("readChangeFeed", "true")
               .option("startingVersion", int(start)).option("endingVersion", int(end)))
        raw = raw.load(location) if "/" in location or "://" in location else raw.table(location)
        changes = select_version(raw, cfg, version, location, extra=["_change_type", "_commit_version"])
        changes = changes.where(F.col("_change_type") != F.lit("update_preimage"))
        rank = F.when(F.col("_change_type") == F.lit("delete"), F.lit(0)).otherwise(F.lit(1))
        w = Window.partitionBy("id").orderBy(F.col("_commit_version").desc(), rank.desc())
        last = (changes.withColumn("_rn", F.row_number().over(w)).where(F.col("_rn") == 1)
                .select("id", F.when(F.col("_change_type") == F.lit("delete"), F.lit(None).cast("array<float>"))
                        .otherwise(F.col("vector")).alias("vector"),
                        F.when(F.col("_change_type") == F.lit("delete"), F.lit("delete"))
                        .otherwise(F.lit("upsert")).alias("_op")))
        last = last.localCheckpoint(eager=True)  # pinned: the MERGE and the counts see the same rows
        # one job over the pinned rows: counts per change, null ids, and the upserts' vector sizes
        groups = last.groupBy("_op", F.col("id").isNull().alias("null_id"),
                              F.size("vector").alias("n")).count().collect()
    except (AnalysisException, PySparkException) as exc:
        cls = error_class(exc)
        if any(cls.startswith(u) for u in _UNAVAILABLE):
            raise ChangesUnavailable(f"the change data feed of '{location}' cannot serve versions {start}..{end} "
                                     f"({cls})") from exc
        raise
    counts: dict = {}
    sizes: dict = {}
    for g in groups:
        counts[g._op] = counts.get(g._op, 0) + g["count"]
        if g._op == "upsert" and g.n is not None and g.n >= 0:  # size(null) is -1 (or null, ANSI)
            sizes[int(g.n)] = sizes.get(int(g.n), 0) + g["count"]
    null_ids = sum(g["count"] for g in groups if g.null_id)
    return ChangeSet(last, start, end, int(counts.get("upsert", 0)), int(counts.get("delete", 0)), int(null_ids),
                     sizes)


def source_rows(spark, location: str, delta_version: Optional[int] = None) -> int:
    """Rows of a version table at a Delta version (Delta answers an unfiltered count from its log)."""
    return read_delta(spark, location, delta_version).count()
