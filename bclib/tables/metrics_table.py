"""The metrics Delta table: one append per evaluate run.

Schema (METRICS_DDL): run_id, source_version, space_version, metric, value, sample_size, chain_id,
computed_at (UTC).
"""

from __future__ import annotations

import logging
from datetime import datetime, timezone
from typing import Iterable

from bclib.tables.delta import save

log = logging.getLogger(__name__)

METRICS_DDL = (
    "run_id STRING, source_version INT, space_version INT, metric STRING, value DOUBLE, "
    "sample_size BIGINT, chain_id STRING, computed_at TIMESTAMP"
)


def append_metrics(spark, location: str, run_id: str, rows: Iterable[tuple[int, int, str, float, int, str]]) -> int:
    """Append (source_version, space_version, metric, value, sample_size, chain_id) rows in one commit.

    Every row gets `run_id` and one computed_at (naive UTC); returns the number of rows appended.
    """
    now = datetime.now(timezone.utc).replace(tzinfo=None)
    data = [(run_id, int(s), int(j), str(m), float(v), int(n), str(c), now) for s, j, m, v, n, c in rows]
    save(spark.createDataFrame(data, METRICS_DDL).write.format("delta").mode("append"), location)
    log.info("metrics: %d rows appended to %s (run %s)", len(data), location, run_id)
    return len(data)
