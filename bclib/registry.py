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
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Optional, Sequence

from bclib import __version__
from bclib.errors import RegistryError
from bclib.io import delta_table, is_path, read_delta, table_exists
from bclib.transforms import FORMAT_VERSION, Transform, checksum, transform_from_bytes, transform_to_bytes

log = logging.getLogger(__name__)

REGISTRY_DDL = (
    "transform_id STRING NOT NULL, source_version INT NOT NULL, target_version INT NOT NULL, "
    "kind STRING NOT NULL, objective STRING NOT NULL, dim_in INT NOT NULL, dim_out INT NOT NULL, "
    "parameters BINARY NOT NULL, checksum STRING NOT NULL, format_version INT NOT NULL, "
    "fit_config STRING, sample_size BIGINT, input_delta_versions MAP<STRING, BIGINT>, "
    "fit_metrics MAP<STRING, DOUBLE>, created_at TIMESTAMP, library_version STRING, "
    "status STRING NOT NULL, retired_at TIMESTAMP"
)


@dataclass
class TransformRecord:
    """One registry row, with its parsed transform."""

    transform_id: str
    source_version: int
    target_version: int
    kind: str
    objective: str
    transform: Transform
    fit_config: dict = field(default_factory=dict)
    sample_size: int = 0
    input_delta_versions: dict = field(default_factory=dict)
    fit_metrics: dict = field(default_factory=dict)
    created_at: Optional[datetime] = None
    library_version: str = __version__
    status: str = "active"

    @property
    def parameters(self) -> bytes:
        return transform_to_bytes(self.transform)

    def row(self) -> tuple:
        params = self.parameters
        return (
            self.transform_id, self.source_version, self.target_version, self.kind, self.objective,
            self.transform.dim_in, self.transform.dim_out, bytearray(params), checksum(params), FORMAT_VERSION,
            json.dumps(self.fit_config, sort_keys=True), int(self.sample_size),
            {k: int(v) for k, v in self.input_delta_versions.items()},
            {k: float(v) for k, v in self.fit_metrics.items()},
            self.created_at or datetime.now(timezone.utc).replace(tzinfo=None), self.library_version,
            self.status, None,
        )


def ensure_registry(spark, location: str) -> None:
    """Create the registry table if it does not exist (an empty append creates a Delta table)."""
    if table_exists(spark, location):
        return
    writer = spark.createDataFrame([], REGISTRY_DDL).write.format("delta").mode("append")
    writer.save(location) if is_path(location) else writer.saveAsTable(location)


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
    rows = [r.row() for r in fresh]
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


def chain_records(
    active: dict[tuple[int, int], TransformRecord], versions: Sequence[int], source: int, target: int,
) -> list[TransformRecord]:
    """Records of the chain source -> target over consecutive configured versions, in application order."""
    ordered = sorted(versions)
    if source not in ordered or target not in ordered or target >= source:
        raise RegistryError(f"no chain from version {source} to {target} among versions {ordered}")
    chain = []
    i = ordered.index(source)
    while ordered[i] != target:
        edge = (ordered[i], ordered[i - 1])
        if edge not in active:
            raise RegistryError(
                f"no active transform for edge {edge[0]} -> {edge[1]} in the registry; run `bcemb fit` first"
            )
        chain.append(active[edge])
        i -= 1
    return chain


def chain_id(records: Sequence[TransformRecord]) -> str:
    """A stable id for a chain: the hash of its transform ids in order."""
    import hashlib

    return hashlib.sha256("|".join(r.transform_id for r in records).encode()).hexdigest()[:16]
