"""`bcemb maintain`: keep the output table small on disk without breaking what analysts were promised.

* SET TBLPROPERTIES `delta.logRetentionDuration` / `delta.deletedFileRetentionDuration` when they differ from
  `bclib.tables.retention.retention_properties` (the promise kept by the table itself, for anyone's VACUUM);
* OPTIMIZE (Delta's bin-packing compaction) each space whose files are mostly small;
* VACUUM with the retention of `bclib.tables.retention.vacuum_retention_hours`: whole hours rounded up, never
  below `maintenance.time_travel_hours` (what analysts are promised for time travel and the change data
  feed) nor below `maintenance.min_retention_hours` unless `maintenance.allow_short_retention` is true (both
  checked at config load). Delta 4.4 ignores a non-zero retention given to VACUUM and uses the table's
  delta.deletedFileRetentionDuration, which was just set to that retention; Delta's own retention check
  stays on; the retention the VACUUM START commit recorded is read back and checked.

Every commit carries the output's lineage forward (userMetadata {"bcemb": "maintain", "spaces": ...}),
so the next `run` still sees the spaces as up to date.
"""

from __future__ import annotations

import json
import math
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from bclib.config import JobConfig
from bclib.errors import MaintenanceError, OutputLocationError
from bclib.spark import commit_conf, default_parallelism, session_conf
from bclib.tables.delta import commits, current_delta_version, optimize, table_exists, vacuum
from bclib.tables.lease import leased
from bclib.tables.output import LINEAGE_FORMAT, read_output_state
from bclib.tables.retention import (FILE_RETENTION, interval_hours, retention_properties, set_table_properties,
                                    table_properties, vacuum_retention_hours)

log = logging.getLogger(__name__)


@dataclass
class MaintainResult:
    run_id: str
    optimized: dict[int, dict] = field(default_factory=dict)  # space -> Delta's OPTIMIZE metrics
    vacuumed_files: int = 0
    vacuumed_bytes: int = 0
    retention_hours: float = 0.0  # as the VACUUM START commit recorded it (whole hours)
    properties_set: dict[str, str] = field(default_factory=dict)  # retention properties changed by this run
    seconds: float = 0.0

    def summary(self) -> str:
        opt = ", ".join(f"space {j}: {m.get('numRemovedFiles', 0)} -> {m.get('numAddedFiles', 0)} files"
                        for j, m in sorted(self.optimized.items())) or "nothing to compact"
        return (f"maintain: OPTIMIZE {opt}; VACUUM (retain {self.retention_hours:g} h) removed "
                f"{self.vacuumed_files} file(s), {self.vacuumed_bytes / 2**20:.1f} MiB, in {self.seconds:.1f}s")


def _files_per_space(spark, location: str) -> dict[int, list[int]]:
    """Sizes (bytes) of the current data files of each space (from the Delta snapshot's file list)."""
    from pyspark.sql import functions as F

    df = spark.read.format("delta").load(location) if "/" in location else spark.read.table(location)
    files = df.select(F.col("space_version"), F.col("_metadata.file_size").alias("size"),
                      F.col("_metadata.file_path").alias("path")).distinct().collect()
    out: dict[int, list[int]] = {}
    for r in files:
        out.setdefault(int(r.space_version), []).append(int(r.size))
    return out


def _commit_meta(spark, loc: str, run_id: str, action: str, **extra) -> str:
    """userMetadata of one maintain commit: the output's lineage carried forward (or 'maintain-foreign')."""
    state = read_output_state(spark, loc)
    if state.lineage is None:
        return json.dumps({"bcemb": "maintain-foreign", "run_id": run_id, "action": action, **extra}, sort_keys=True)
    return json.dumps({"bcemb": "maintain", "format": LINEAGE_FORMAT, "run_id": run_id, "action": action, **extra,
                       "source": state.lineage.get("source"), "spaces": state.spaces}, sort_keys=True)


@leased("maintain")
def run_maintain(spark, cfg: JobConfig, run_id: Optional[str] = None) -> MaintainResult:
    """Align the retention properties, OPTIMIZE small-file spaces, then VACUUM with the whole-hour retention and
    check what Delta recorded; every commit keeps the lineage."""
    started = time.time()
    result = MaintainResult(run_id or uuid.uuid4().hex[:12])
    m = cfg.maintenance
    loc = cfg.output_location
    if not table_exists(spark, loc):
        raise OutputLocationError(f"output table '{loc}' does not exist; nothing to maintain")
    wanted = retention_properties(cfg)
    current = table_properties(spark, loc)
    # raised, never lowered: a longer retention someone set on the output keeps more than bcemb promises
    changed = {k: v for k, v in wanted.items() if (interval_hours(current.get(k)) or 0.0) < interval_hours(v)}
    if changed:
        with session_conf(spark, commit_conf(_commit_meta(spark, loc, result.run_id, "properties"))):
            set_table_properties(spark, loc, changed)
        result.properties_set = changed
        log.info("maintain: SET TBLPROPERTIES %s (were %s)", changed, {k: current.get(k) for k in changed})
    small = m.optimize_small_file_mb * 2**20
    for j, sizes in sorted(_files_per_space(spark, loc).items()):
        if len(sizes) < m.optimize_min_files or sum(s < small for s in sizes) * 2 <= len(sizes):
            continue
        with session_conf(spark, commit_conf(_commit_meta(spark, loc, result.run_id, "optimize", space=j))):
            metrics = optimize(spark, loc, f"space_version = {int(j)}")
        result.optimized[j] = {"numRemovedFiles": int(metrics["numFilesRemoved"] or 0),
                               "numAddedFiles": int(metrics["numFilesAdded"] or 0)}
        log.info("maintain: OPTIMIZE space %d: %d small files -> %d", j, result.optimized[j]["numRemovedFiles"],
                 result.optimized[j]["numAddedFiles"])
    _vacuum(spark, cfg, result)
    result.seconds = time.time() - started
    log.info(result.summary())
    return result


LISTING_PARALLELISM = "spark.sql.sources.parallelPartitionDiscovery.parallelism"


def vacuum_listing_parallelism(spark, configured: int) -> int:
    """Tasks for VACUUM's listing of the table's directories: `configured` when > 0, else twice the session's
    default parallelism (its cores), at least 2. Delta lists with spark.sql.sources.parallelPartitionDiscovery
    .parallelism tasks (10,000 by default); on a table of a few space directories that alone took ~30 s of a
    VACUUM on 2 local cores (2 s with 2 tasks). Without a SparkContext (Spark Connect): twice the server's spark.default.parallelism, else 200."""
    if configured > 0:
        return configured
    return max(2, 2 * default_parallelism(spark, fallback=100))


def _vacuum(spark, cfg: JobConfig, result: MaintainResult) -> None:
    """VACUUM with the whole-hour retention, Delta's retention check on, then check the recorded retention.

    Delta refuses a VACUUM shorter than the table's delta.deletedFileRetentionDuration while
    spark.databricks.delta.retentionDurationCheck.enabled is true. maintain never turns that check off: it set
    the property to the retention the rules allow (above) and runs its VACUUM with the check on, so Delta
    accepts exactly that retention and refuses anything shorter (a table owner who raised the property since
    wins: the VACUUM fails and deletes nothing).
    """
    m, loc = cfg.maintenance, cfg.output_location
    table_hours = interval_hours(table_properties(spark, loc).get(FILE_RETENTION))
    # a longer retention the table's owner set wins (Delta's check would refuse a shorter VACUUM anyway)
    hours = max(vacuum_retention_hours(m), int(math.ceil(table_hours or 0)))
    log.info("maintain: VACUUM retaining %d h (vacuum_retention_hours %g, time_travel_hours %g, min_retention_hours "
             "%g%s; whole hours rounded up) with Delta's retention check on (table's %s: %s h)", hours,
             m.vacuum_retention_hours, m.time_travel_hours, m.min_retention_hours,
             " waived by allow_short_retention" if m.allow_short_retention else "", FILE_RETENTION, table_hours)
    meta = _commit_meta(spark, loc, result.run_id, "vacuum")
    # the check on, and logging on so that VACUUM writes the START / END commits checked below
    confs = {**commit_conf(meta), "spark.databricks.delta.retentionDurationCheck.enabled": "true",
             "spark.databricks.delta.vacuum.logging.enabled": "true",
             LISTING_PARALLELISM: str(vacuum_listing_parallelism(spark, m.vacuum_listing_parallelism))}
    before = current_delta_version(spark, loc)
    with session_conf(spark, confs):
        vacuum(spark, loc, hours)
    starts = []
    for row in commits(spark, loc):
        if row.version <= before:
            break
        metrics = row.operation_metrics
        if row.operation == "VACUUM START" and row.user_metadata == meta:
            starts.append(row)
            result.vacuumed_bytes += int(metrics.get("sizeOfDataToDelete", 0))
        if row.operation == "VACUUM END" and row.user_metadata == meta:
            result.vacuumed_files += int(metrics.get("numDeletedFiles", 0))
    result.retention_hours = check_recorded_retention(starts, hours, m.time_travel_hours, loc)


def check_recorded_retention(starts: list, asked_hours: int, promised_hours: float, loc: str) -> float:
    """The retention (hours) the VACUUM START commit recorded; MaintenanceError when there is none or it is below
    the retention asked for or the promised time_travel_hours."""
    if len(starts) != 1:
        raise MaintenanceError(f"VACUUM of '{loc}' wrote {len(starts)} VACUUM START commit(s) with this run's "
                               "userMetadata, expected 1: its retention cannot be checked")
    params = starts[0].operation_parameters
    # Delta 4.4 records a specified retention only when it used it (0, or any with retentionWindowIgnore off);
    # otherwise it used the table's delta.deletedFileRetentionDuration, recorded as the default
    recorded = params.get("specifiedRetentionMillis") or params.get("defaultRetentionMillis")
    if recorded in (None, "", "null"):
        raise MaintenanceError(f"VACUUM START (version {starts[0].version}) of '{loc}' recorded no retention "
                               f"(operationParameters {dict(params)}): cannot check it")
    recorded_hours = int(recorded) / 3_600_000
    if recorded_hours < max(asked_hours, promised_hours):
        raise MaintenanceError(
            f"VACUUM START (version {starts[0].version}) of '{loc}' recorded a retention of {recorded_hours:g} h; "
            f"maintain asked for {asked_hours} h and maintenance.time_travel_hours promises {promised_hours:g} h: "
            "files of versions inside that window may have been deleted")
    return recorded_hours
