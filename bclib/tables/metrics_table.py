"""The metrics Delta table: one append per evaluate run or gate decision.

Schema (METRICS_DDL): run_id, source_version, space_version, metric, value, sample_size, chain_id,
computed_at (UTC), detail (JSON, gate rows only). Each append is one commit whose userMetadata names
the step and run id.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Iterable, Optional

from bclib.spark import commit_conf, session_conf
from bclib.tables.delta import read_delta, save, table_exists

log = logging.getLogger(__name__)

METRICS_DDL = (
    "run_id STRING, source_version INT, space_version INT, metric STRING, value DOUBLE, "
    "sample_size BIGINT, chain_id STRING, computed_at TIMESTAMP, detail STRING"
)


def append_metrics(spark, location: str, run_id: str, rows: Iterable[tuple], step: str = "evaluate") -> int:
    """Append (source_version, space_version, metric, value, sample_size, chain_id[, detail]) rows in one commit.

    Every row gets `run_id` and one computed_at (the UTC instant, whatever `TZ` and the session zone); an older
    metrics table without `detail` gains the column (schema merge). Returns the number of rows.
    """
    now = datetime.now(timezone.utc)  # aware: PySpark reads a naive datetime as the process's local time
    data = []
    for row in rows:
        s, j, m, v, n, c, *rest = row
        data.append((run_id, int(s), int(j), str(m), float(v), int(n), str(c), now, rest[0] if rest else None))
    meta = json.dumps({"bcemb": step, "run_id": run_id, "rows": len(data)}, sort_keys=True)
    with session_conf(spark, commit_conf(meta)):
        save(spark.createDataFrame(data, METRICS_DDL).write.format("delta").mode("append")
             .option("mergeSchema", "true"), location)
    log.info("metrics: %d rows appended to %s (run %s)", len(data), location, run_id)
    return len(data)


def _rows_of_metric(spark, location: str, metric: str, *columns: str) -> list:
    """The metrics table's rows of one `metric` (those columns), [] when there is no table or no `detail` column
    yet (a table written before gate rows had one)."""
    from pyspark.sql import functions as F

    if not table_exists(spark, location):
        return []
    df = read_delta(spark, location)
    if "detail" not in df.columns:
        return []
    return df.where(F.col("metric") == F.lit(metric)).select(*columns).collect()


def gate_verdicts(spark, location: str) -> dict[str, dict]:
    """Per transform id, the latest gate verdict of a chain holding it: {passed, space, run_id, computed_at, why}.

    A transform in several chains judged in the same run is 'rejected' if any of them was.
    """
    rows = _rows_of_metric(spark, location, "gate", "run_id", "space_version", "computed_at", "detail")
    out: dict[str, dict] = {}
    for row in sorted(rows, key=lambda r: (r.computed_at, r.run_id)):
        detail = json.loads(row.detail or "{}")
        for tid in detail.get("transforms", []):
            prev = out.get(tid)
            same_run = prev is not None and prev["run_id"] == row.run_id
            passed = bool(detail.get("passed")) and (prev["passed"] if same_run else True)
            why = detail.get("why", "") if not detail.get("passed") else (prev["why"] if same_run else "")
            out[tid] = {"passed": passed, "space": row.space_version, "run_id": row.run_id,
                        "computed_at": row.computed_at, "why": why}
    return out


def unreadable_spaces(spark, location: str) -> dict[int, dict]:
    """Per space, the latest `gate.unreadable` row (a run could not read the space's version table and left the
    space as it was): {chain_id, run_id, computed_at, why}."""
    rows = _rows_of_metric(spark, location, "gate.unreadable", "run_id", "space_version", "chain_id",
                           "computed_at", "detail")
    out: dict[int, dict] = {}
    for row in sorted(rows, key=lambda r: (r.computed_at, r.run_id)):
        out[int(row.space_version)] = {"chain_id": row.chain_id, "run_id": row.run_id,
                                       "computed_at": row.computed_at,
                                       "why": json.loads(row.detail or "{}").get("why", "")}
    return out


def scored_chains(spark, location: str) -> set[tuple[int, int, str]]:
    """(source_version, space_version, chain_id) of every pair an evaluate run has scored (its rows, not the
    gate's); empty when there is no table. One aggregation over the metrics table (small: a row per metric per
    pair per run)."""
    from pyspark.sql import functions as F

    if not table_exists(spark, location):
        return set()
    rows = (read_delta(spark, location).where(~F.col("metric").startswith("gate"))
            .select("source_version", "space_version", "chain_id").distinct().collect())
    return {(int(r.source_version), int(r.space_version), str(r.chain_id)) for r in rows}


def last_metric_run(spark, location: str) -> Optional[tuple[str, datetime]]:
    """(run_id, computed_at) of the newest evaluate rows, if any."""
    from pyspark.sql import functions as F

    if not table_exists(spark, location):
        return None
    row = (read_delta(spark, location).where(~F.col("metric").startswith("gate"))
           .orderBy(F.col("computed_at").desc()).select("run_id", "computed_at").first())
    return (row.run_id, row.computed_at) if row else None
