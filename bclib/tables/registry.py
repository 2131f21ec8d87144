"""The transform registry: a Delta table with one row per fitted transform.

Exactly one transform per edge (source_version -> target_version) is
active. Registering a refit retires the previous active transform and
inserts the new one in a single MERGE, i.e. one Delta commit; registering a
transform that is already active changes nothing (idempotent reruns).
Parameters are pickle-free npz bytes with a SHA-256 checksum, verified on
every load.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime, timezone
from typing import Optional, Sequence

from bclib.errors import RegistryError
from bclib.numerics.records import TransformRecord
from bclib.numerics.serialization import FORMAT_VERSION, checksum, transform_from_bytes
from bclib.tables.delta import delta_table, read_delta, save, table_exists

log = logging.getLogger(__name__)

REGISTRY_DDL = (
    "transform_id STRING NOT NULL, source_version INT NOT NULL, target_version INT NOT NULL, "
    "kind STRING NOT NULL, objective STRING NOT NULL, dim_in INT NOT NULL, dim_out INT NOT NULL, "
    "parameters BINARY NOT NULL, checksum STRING NOT NULL, format_version INT NOT NULL, "
    "fit_config STRING, sample_size BIGINT, input_delta_versions MAP<STRING, BIGINT>, "
    "fit_metrics MAP<STRING, DOUBLE>, created_at TIMESTAMP, library_version STRING, "
    "status STRING NOT NULL, retired_at TIMESTAMP"
)


def _row(record: TransformRecord) -> tuple:
    """The record as a tuple in REGISTRY_DDL's column order (created_at: naive UTC)."""
    params = record.parameters
    return (
        record.transform_id, record.source_version, record.target_version, record.kind, record.objective,
        record.transform.dim_in, record.transform.dim_out, bytearray(params), checksum(params), FORMAT_VERSION,
        json.dumps(record.fit_config, sort_keys=True), int(record.sample_size),
        {k: int(v) for k, v in record.input_delta_versions.items()},
        {k: float(v) for k, v in record.fit_metrics.items()},
        record.created_at or datetime.now(timezone.utc).replace(tzinfo=None), record.library_version,
        record.status, None,
    )


def ensure_registry(spark, location: str) -> None:
    """Create the registry table if it does not exist (an empty append creates a Delta table)."""
    if table_exists(spark, location):
        return
    save(spark.createDataFrame([], REGISTRY_DDL).write.format("delta").mode("append"), location)


def register(spark, location: str, records: Sequence[TransformRecord]) -> list[str]:
    """Activate `records` (one per edge) in one commit; returns the ids that changed the registry."""
    from pyspark.sql import functions as F

    edges = [(r.source_version, r.target_version) for r in records]
    if len(set(edges)) != len(edges):
        raise ValueError(f"register takes at most one transform per edge, found {edges}")
    ensure_registry(spark, location)
    active = {(r.source_version, r.target_version): r.transform_id for r in _read_records(spark, location, "active")}
    fresh = [r for r in records if active.get((r.source_version, r.target_version)) != r.transform_id]
    if not fresh:
        log.info("registry: all %d transforms already active, nothing to commit", len(records))
        return []
    # one local relation (deterministic on every scan MERGE makes): each new row once to retire, once to upsert
    rows = [_row(r) for r in fresh]
    staged = spark.createDataFrame(
        [row + (kind,) for kind in ("retire", "upsert") for row in rows], REGISTRY_DDL + ", _merge_kind STRING"
    )
    columns = [c for c in staged.columns if c != "_merge_kind"]
    condition = (
        "(s._merge_kind = 'retire' AND t.status = 'active' AND t.source_version = s.source_version "
        "AND t.target_version = s.target_version AND t.transform_id <> s.transform_id) OR "
        "(s._merge_kind = 'upsert' AND t.transform_id = s.transform_id)"
    )
    now = F.current_timestamp()
    (
        delta_table(spark, location).alias("t")
        .merge(staged.alias("s"), condition)
        .whenMatchedUpdate("s._merge_kind = 'retire'", {"status": F.lit("retired"), "retired_at": now})
        .whenMatchedUpdate("s._merge_kind = 'upsert'", {"status": F.lit("active"), "retired_at": F.lit(None)})
        .whenNotMatchedInsert(
            "s._merge_kind = 'upsert'",
            {c: F.col(f"s.{c}") for c in columns},
        )
        .execute()
    )
    log.info("registry: activated %d transform(s) %s in one commit", len(fresh),
             [(r.source_version, r.target_version, r.transform_id) for r in fresh])
    return [r.transform_id for r in fresh]


def _read_records(spark, location: str, status: Optional[str] = None) -> list[TransformRecord]:
    if not table_exists(spark, location):
        return []
    df = read_delta(spark, location)
    if status:
        df = df.where(df.status == status)
    records = []
    for row in df.collect():
        transform = transform_from_bytes(bytes(row.parameters), row.checksum)
        records.append(TransformRecord(
            row.transform_id, row.source_version, row.target_version, row.kind, row.objective, transform,
            json.loads(row.fit_config or "{}"), row.sample_size, dict(row.input_delta_versions or {}),
            dict(row.fit_metrics or {}), row.created_at, row.library_version, row.status,
            stored_checksum=row.checksum,
        ))
    return records


def active_transforms(spark, location: str) -> dict[tuple[int, int], TransformRecord]:
    """The active transform of every edge, checksums verified."""
    out: dict[tuple[int, int], TransformRecord] = {}
    for rec in _read_records(spark, location, "active"):
        edge = (rec.source_version, rec.target_version)
        if edge in out:
            raise RegistryError(f"registry '{location}' has two active transforms for edge {edge}")
        out[edge] = rec
    return out
