"""The compatible-embeddings output table: lineage, the up-to-date check, the one commit, quarantine.

Schema: id, vector array<float>, space_version int (partition column), source_version int, chain_id,
produced_at timestamp. A backfill replaces exactly the spaces it owns (`replaceWhere`) in one Delta
commit whose `userMetadata` holds the lineage JSON (source table and Delta version, transform ids and
checksums per space, run id); `DESCRIBE HISTORY` shows it per commit.
"""

from __future__ import annotations

import json
import logging
from typing import Optional, Sequence

from bclib.numerics.records import TransformRecord, chain_id
from bclib.tables.delta import delta_table, read_delta, save, table_exists

log = logging.getLogger(__name__)




def backfill_lineage(
    source_location: str, source_version: int, source_delta_version: int,
    chains: dict[int, Sequence[TransformRecord]], run_id: str,
) -> dict:
    """The lineage JSON a backfill commit carries in userMetadata (keys sorted when serialised)."""
    return {
        "bcemb": "backfill",
        "run_id": run_id,
        "source": {"location": source_location, "version": source_version, "delta_version": source_delta_version},
        "spaces": {
            str(s): {
                "chain_id": chain_id(chain),
                "transforms": [{"id": r.transform_id, "checksum": r.checksum} for r in chain],
            }
            for s, chain in sorted(chains.items())
        },
    }


def last_lineage(spark, location: str) -> Optional[dict]:
    """userMetadata of the newest bcemb backfill commit on the output table, if any."""
    if not table_exists(spark, location):
        return None
    for row in delta_table(spark, location).history(50).select("userMetadata").collect():
        if row.userMetadata:
            try:
                meta = json.loads(row.userMetadata)
            except json.JSONDecodeError:
                continue
            if meta.get("bcemb") == "backfill":
                return meta
    return None


def same_lineage(a: Optional[dict], b: dict) -> bool:
    """True when lineage `a` covers the same source (table, version, Delta version) and chains as `b`."""
    return a is not None and a.get("source") == b["source"] and a.get("spaces") == b["spaces"]


def write_spaces(spark, df, location: str, spaces: Sequence[int], lineage: dict, max_records_per_file: int) -> int:
    """Replace `spaces` of the output with `df` in one Delta commit (replaceWhere); returns rows written.

    df: (id, vector, space_version, source_version, chain_id, produced_at), partitioned on write by
    space_version; the commit's userMetadata is `lineage` as JSON.
    """
    spaces_sql = ", ".join(str(int(s)) for s in spaces)
    writer = (
        df.write.format("delta").mode("overwrite")
        .option("maxRecordsPerFile", int(max_records_per_file))
        .option("replaceWhere", f"space_version IN ({spaces_sql})")
        .option("userMetadata", json.dumps(lineage, sort_keys=True))
        .partitionBy("space_version")
    )
    save(writer, location)
    metrics = delta_table(spark, location).history(1).select("operationMetrics").first()[0] or {}
    return int(metrics.get("numOutputRows", 0))


# --------------------------------------------------------------------------- quarantine


def validity_filter(dim: int):
    """Spark SQL predicate for a usable vector: not null, right length, no null/NaN/Inf element."""
    from pyspark.sql import functions as F

    return (
        F.col("vector").isNotNull()
        & (F.size("vector") == F.lit(dim))
        & F.forall("vector", lambda x: x.isNotNull() & ~F.isnan(x) & (F.abs(x) != F.lit(float("inf"))))
    )


def write_quarantine(spark, df, location: str, source_version: int, dim: int) -> int:
    """Replace this source version's rows of the quarantine table with df's unusable rows; returns their count."""
    from pyspark.sql import functions as F

    valid = validity_filter(dim)
    bad = df.where(~F.coalesce(valid, F.lit(False))).select(
        "id", "vector", F.lit(source_version).cast("int").alias("source_version"),
        F.when(F.col("vector").isNull(), "null vector")
        .when(F.size("vector") != dim,
              F.concat(F.lit("expected dimension %d, found " % dim), F.size("vector").cast("string")))
        .otherwise("null, NaN or Inf element").alias("reason"),
        F.current_timestamp().alias("quarantined_at"),
    )
    writer = (bad.write.format("delta").mode("overwrite")
              .option("replaceWhere", f"source_version = {int(source_version)}").partitionBy("source_version"))
    save(writer, location)
    return quarantine_count(spark, location, source_version)


def quarantine_count(spark, location: str, source_version: int) -> int:
    """Rows of `source_version` in the quarantine table."""
    from pyspark.sql import functions as F

    return read_delta(spark, location).where(F.col("source_version") == F.lit(int(source_version))).count()
