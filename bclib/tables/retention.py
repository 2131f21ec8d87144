"""How long a bcemb table keeps old versions readable: the VACUUM retention and the table properties.

Delta 4.4 rounds a VACUUM retention to the nearest whole hour (`math.round`: 0.1 h -> 0, every unreferenced
file goes at once; 1.4 h -> 1), and by default ignores any other retention than 0 given to VACUUM
(`spark.databricks.delta.vacuum.retentionWindowIgnore.enabled`, internal, default true): it uses the table's
`delta.deletedFileRetentionDuration` (7 days when unset) instead. So bcemb rounds up, and sets the property. The retention VACUUM uses is the largest of `maintenance.vacuum_retention_hours`,
`maintenance.time_travel_hours` (what analysts are promised for `VERSION AS OF` and the change feed) and,
unless `maintenance.allow_short_retention` is true, `maintenance.min_retention_hours` (a floor longer than
a backfill, so VACUUM never deletes the files of a backfill still in flight), rounded up to whole hours.

The tables carry that promise themselves, so that anyone's VACUUM and Delta's log cleanup keep it too:
`delta.deletedFileRetentionDuration` = that retention, `delta.logRetentionDuration` = at least
`time_travel_hours` (never below Delta's 30-day default).
"""

from __future__ import annotations

import math
import re
from typing import Optional

from bclib.config import JobConfig, MaintenanceSettings
from bclib.tables.delta import detail, log_detail, sql_table

DELTA_LOG_RETENTION_HOURS = 720  # Delta's default delta.logRetentionDuration (30 days)
DELTA_FILE_RETENTION_HOURS = 168  # Delta's default delta.deletedFileRetentionDuration (7 days)
LOG_RETENTION = "delta.logRetentionDuration"
FILE_RETENTION = "delta.deletedFileRetentionDuration"


def whole_hours(hours: float) -> int:
    """`hours` rounded up to whole hours (Delta keeps whole hours only and would round down)."""
    return int(math.ceil(hours))


def vacuum_retention_hours(m: MaintenanceSettings) -> int:
    """The retention VACUUM uses, in whole hours: the largest of vacuum_retention_hours, time_travel_hours and
    (unless allow_short_retention) min_retention_hours, rounded up."""
    floor = 0.0 if m.allow_short_retention else m.min_retention_hours
    return whole_hours(max(m.vacuum_retention_hours, m.time_travel_hours, floor))


def retention_properties(cfg: JobConfig) -> dict[str, str]:
    """The Delta table properties that keep `cfg`'s retention promise, for every table bcemb creates.

    delta.logRetentionDuration: max(720 h, time_travel_hours rounded up); delta.deletedFileRetentionDuration:
    the whole-hour VACUUM retention (`vacuum_retention_hours`).
    """
    m = cfg.maintenance
    log_hours = max(DELTA_LOG_RETENTION_HOURS, whole_hours(m.time_travel_hours))
    return {LOG_RETENTION: f"interval {log_hours} hours",
            FILE_RETENTION: f"interval {vacuum_retention_hours(m)} hours"}


def table_properties(spark, location: str, storage_options: Optional[dict] = None) -> dict[str, str]:
    """A Delta table's properties now: from its log (`log_detail`, no Spark job) where this process reads it
    directly, else `DESCRIBE DETAIL`."""
    from_log = log_detail(spark, location, storage_options)
    if from_log is not None:
        return dict(from_log.properties)
    return dict(detail(spark, location).properties or {})


_INTERVAL = re.compile(r"^\s*interval\s+(\d+(?:\.\d+)?)\s+(week|day|hour|minute|second)s?\s*$", re.IGNORECASE)
_HOURS_PER = {"week": 168.0, "day": 24.0, "hour": 1.0, "minute": 1 / 60, "second": 1 / 3600}


def interval_hours(value: Optional[str]) -> Optional[float]:
    """'interval N hours' (or weeks, days, minutes, seconds) -> hours; None for anything else or unset."""
    match = _INTERVAL.match(value or "")
    return float(match.group(1)) * _HOURS_PER[match.group(2).lower()] if match else None


def set_table_properties(spark, location: str, properties: dict[str, str]) -> None:
    """ALTER TABLE ... SET TBLPROPERTIES: one commit ('SET TBLPROPERTIES'). Keys and values are bcemb's own
    (checked here: letters, digits, dots, spaces), never text from a config."""
    for text in (*properties, *properties.values()):
        if not re.fullmatch(r"[A-Za-z0-9_. ]+", text):
            raise ValueError(f"table property {text!r} is not a plain key or value")
    assignments = ", ".join(f"'{k}' = '{v}'" for k, v in sorted(properties.items()))
    spark.sql(f"ALTER TABLE {sql_table(location)} SET TBLPROPERTIES ({assignments})")
