"""`bcemb maintain`: keep the output table small on disk without breaking what analysts were promised.

* OPTIMIZE (Delta's bin-packing compaction) each space whose files are mostly small;
* VACUUM files no version younger than `maintenance.vacuum_retention_hours` needs. The retention never
  goes below `maintenance.time_travel_hours` (what analysts are promised for time travel and the change
  data feed; checked at config load) nor below Delta's own 7-day check unless the config says so.

Every commit carries the output's lineage forward (userMetadata {"bcemb": "maintain", "spaces": ...}),
so the next `run` still sees the spaces as up to date.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

from bclib.config import JobConfig
from bclib.errors import OutputLocationError
from bclib.spark import commit_conf, session_conf
from bclib.tables.delta import delta_table, table_exists
from bclib.tables.output import LINEAGE_FORMAT, read_output_state

log = logging.getLogger(__name__)


@dataclass
class MaintainResult:
    run_id: str
    optimized: dict[int, dict] = field(default_factory=dict)  # space -> Delta's OPTIMIZE metrics
    vacuumed_files: int = 0
    vacuumed_bytes: int = 0
    retention_hours: float = 0.0
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


def run_maintain(spark, cfg: JobConfig, run_id: Optional[str] = None) -> MaintainResult:
    """OPTIMIZE small-file spaces, then VACUUM with the configured retention; every commit keeps the lineage."""
    started = time.time()
    result = MaintainResult(run_id or uuid.uuid4().hex[:12])
    m = cfg.maintenance
    loc = cfg.output_location
    if not table_exists(spark, loc):
        raise OutputLocationError(f"output table '{loc}' does not exist; nothing to maintain")
    small = m.optimize_small_file_mb * 2**20
    for j, sizes in sorted(_files_per_space(spark, loc).items()):
        if len(sizes) < m.optimize_min_files or sum(s < small for s in sizes) * 2 <= len(sizes):
            continue
        state = read_output_state(spark, loc)
        meta = {"bcemb": "maintain", "format": LINEAGE_FORMAT, "run_id": result.run_id, "action": "optimize",
                "space": j, "source": (state.lineage or {}).get("source"), "spaces": state.spaces}
        if state.lineage is None:
            meta = {"bcemb": "maintain-foreign", "run_id": result.run_id, "action": "optimize", "space": j}
        with session_conf(spark, commit_conf(json.dumps(meta, sort_keys=True))):
            metrics = delta_table(spark, loc).optimize().where(f"space_version = {int(j)}").executeCompaction()
        row = metrics.select("metrics.numFilesRemoved", "metrics.numFilesAdded").first()
        result.optimized[j] = {"numRemovedFiles": int(row[0] or 0), "numAddedFiles": int(row[1] or 0)}
        log.info("maintain: OPTIMIZE space %d: %d small files -> %d", j, result.optimized[j]["numRemovedFiles"],
                 result.optimized[j]["numAddedFiles"])
    result.retention_hours = m.vacuum_retention_hours
    state = read_output_state(spark, loc)
    meta = {"bcemb": "maintain", "format": LINEAGE_FORMAT, "run_id": result.run_id, "action": "vacuum",
            "source": (state.lineage or {}).get("source"), "spaces": state.spaces}
    if state.lineage is None:
        meta = {"bcemb": "maintain-foreign", "run_id": result.run_id, "action": "vacuum"}
    confs = commit_conf(json.dumps(meta, sort_keys=True))
    if m.vacuum_retention_hours < 168:  # allowed by the config (>= time_travel_hours, checked at load)
        confs["spark.databricks.delta.retentionDurationCheck.enabled"] = "false"
    before = _latest_version(spark, loc)
    with session_conf(spark, confs):
        delta_table(spark, loc).vacuum(m.vacuum_retention_hours)
    for row in delta_table(spark, loc).history().where(f"version > {before}").collect():
        metrics = row.operationMetrics or {}
        if row.operation == "VACUUM START":
            result.vacuumed_bytes += int(metrics.get("sizeOfDataToDelete", 0))
        if row.operation == "VACUUM END":
            result.vacuumed_files += int(metrics.get("numDeletedFiles", 0))
    result.seconds = time.time() - started
    log.info(result.summary())
    return result


def _latest_version(spark, location: str) -> int:
    return int(delta_table(spark, location).history(1).select("version").first()[0])
