"""The transform registry: a Delta table with one row per transform ever registered.

Exactly one transform per edge (source_version -> target_version) is active. Every change is one Delta
commit whose userMetadata names the action, the actor and the reason (`DESCRIBE HISTORY` shows them):

* register: activate records; the edge's previous active transform is retired in the same MERGE; a
  record that is already active changes nothing (idempotent reruns);
* retire: the transform becomes retired (its edge then has no active transform);
* activate: roll back (or forward) to another transform of the same edge; the current one is retired in
  the same UPDATE.

Parameters are pickle-free npz bytes with a SHA-256 checksum, verified on every load. `origin` says
where a transform came from: posthoc (bcemb fit), joint (AlignmentLoss.export), import (a file).
"""

from __future__ import annotations

import getpass
import json
import logging
import socket
from datetime import datetime, timezone
from typing import Optional, Sequence

from bclib.errors import ChecksumError, RegistryError, TransformFormatError
from bclib.numerics.records import ORIGINS, TransformRecord
from bclib.numerics.serialization import FORMAT_VERSION, checksum, transform_from_bytes
from bclib.spark import commit_conf, session_conf
from bclib.tables.delta import merge, quoted_column, read_delta, retry_on_conflict, save, sql_string, table_exists, \
    update

log = logging.getLogger(__name__)

REGISTRY_DDL = (
    "transform_id STRING NOT NULL, source_version INT NOT NULL, target_version INT NOT NULL, "
    "kind STRING NOT NULL, objective STRING NOT NULL, dim_in INT NOT NULL, dim_out INT NOT NULL, "
    "parameters BINARY NOT NULL, checksum STRING NOT NULL, format_version INT NOT NULL, "
    "fit_config STRING, sample_size BIGINT, input_delta_versions MAP<STRING, BIGINT>, "
    "fit_metrics MAP<STRING, DOUBLE>, created_at TIMESTAMP, library_version STRING, "
    "status STRING NOT NULL, retired_at TIMESTAMP, origin STRING"
)


def default_actor() -> str:
    """Who is acting: $BCEMB_ACTOR, else user@host of this process."""
    import os

    if os.environ.get("BCEMB_ACTOR"):
        return os.environ["BCEMB_ACTOR"]
    try:
        user = getpass.getuser()
    except (KeyError, OSError):
        user = "unknown"
    return f"{user}@{socket.gethostname()}"


def _metadata(action: str, actor: Optional[str], reason: Optional[str], **extra) -> str:
    return json.dumps({"bcemb": "registry", "action": action, "actor": actor or default_actor(),
                       "reason": reason or "", **extra}, sort_keys=True)


def _utc_now() -> datetime:
    """Now as a time-zone-aware UTC datetime: PySpark converts aware values to the true instant, whereas a
    naive one is read as wall time of the process's local zone (`TZ`), whatever the session time zone."""
    return datetime.now(timezone.utc)


def _row(record: TransformRecord) -> tuple:
    """The record as a tuple in REGISTRY_DDL's column order (created_at: naive UTC)."""
    params = record.parameters
    return (
        record.transform_id, record.source_version, record.target_version, record.kind, record.objective,
        record.transform.dim_in, record.transform.dim_out, bytearray(params), checksum(params), FORMAT_VERSION,
        json.dumps(record.fit_config, sort_keys=True), int(record.sample_size),
        {k: int(v) for k, v in record.input_delta_versions.items()},
        {k: float(v) for k, v in record.fit_metrics.items()},
        record.created_at or _utc_now(), record.library_version, record.status, None, record.origin,
    )


def ensure_registry(spark, location: str) -> None:
    """Create the registry table if it does not exist; add the `origin` column to an older registry.

    Creation and the column addition are empty appends (Delta creates the table / merges the schema).
    """
    if table_exists(spark, location):
        if "origin" not in read_delta(spark, location).columns:
            log.info("registry: adding column 'origin' to %s (registry written by an older bcemb)", location)
            with session_conf(spark, commit_conf(_metadata("add origin column", None, "schema upgrade"))):
                save(spark.createDataFrame([], REGISTRY_DDL).write.format("delta").mode("append")
                     .option("mergeSchema", "true"), location)
        return
    with session_conf(spark, commit_conf(_metadata("create", None, "first registration"))):
        save(spark.createDataFrame([], REGISTRY_DDL).write.format("delta").mode("append"), location)


def register(
    spark, location: str, records: Sequence[TransformRecord], actor: Optional[str] = None,
    reason: Optional[str] = None, attempts: int = 3,
) -> list[str]:
    """Activate `records` (one per edge) in one commit; returns the ids that changed the registry.

    Raises ValueError for two records of one edge; ConcurrentRunError when other writers keep winning
    the commit race (`attempts` tries, each re-reading the active set).
    """
    edges = [r.edge for r in records]
    if len(set(edges)) != len(edges):
        raise ValueError(f"register takes at most one transform per edge, found {edges}")
    for r in records:
        if r.origin not in ORIGINS:
            raise ValueError(f"transform {r.transform_id}: origin {r.origin!r} is not one of {list(ORIGINS)}")

    def attempt() -> list[str]:
        ensure_registry(spark, location)
        active = {r.edge: r.transform_id for r in read_records(spark, location, "active", verify=False)}
        fresh = [r for r in records if active.get(r.edge) != r.transform_id]
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
        meta = _metadata("register", actor, reason, transforms=[
            {"id": r.transform_id, "edge": list(r.edge), "origin": r.origin} for r in fresh])
        cols = [quoted_column(c) for c in columns]
        with session_conf(spark, commit_conf(meta)):
            merge(spark, location, staged, condition, [
                "WHEN MATCHED AND s._merge_kind = 'retire' THEN UPDATE SET status = 'retired', "
                "retired_at = current_timestamp()",
                "WHEN MATCHED AND s._merge_kind = 'upsert' THEN UPDATE SET status = 'active', retired_at = NULL",
                f"WHEN NOT MATCHED AND s._merge_kind = 'upsert' THEN INSERT ({', '.join(cols)}) "
                f"VALUES ({', '.join('s.' + c for c in cols)})"])
        log.info("registry: activated %d transform(s) %s in one commit",
                 len(fresh), [(r.source_version, r.target_version, r.transform_id) for r in fresh])
        return [r.transform_id for r in fresh]

    return retry_on_conflict(attempt, f"registry {location}", attempts)


def _record_from_row(row, verify: bool) -> TransformRecord:
    data = bytes(row.parameters)
    if verify:
        transform = transform_from_bytes(data, row.checksum)
    else:
        transform = transform_from_bytes(data)  # still pickle-free and shape-checked, checksum not compared
    fields = row.asDict()
    return TransformRecord(
        row.transform_id, row.source_version, row.target_version, row.kind, row.objective, transform,
        json.loads(row.fit_config or "{}"), row.sample_size, dict(row.input_delta_versions or {}),
        dict(row.fit_metrics or {}), row.created_at, row.library_version, row.status,
        stored_checksum=row.checksum, origin=fields.get("origin") or "posthoc", retired_at=row.retired_at,
    )


def read_records(spark, location: str, status: Optional[str] = None, verify: bool = True) -> list[TransformRecord]:
    """Every registry row (or those with `status`), parsed; checksums verified unless `verify=False`."""
    from pyspark.sql import functions as F

    if not table_exists(spark, location):
        return []
    df = read_delta(spark, location)
    if status:
        df = df.where(F.col("status") == F.lit(status))
    return [_record_from_row(row, verify) for row in df.collect()]


def active_transforms(spark, location: str) -> dict[tuple[int, int], TransformRecord]:
    """The active transform of every edge, checksums verified.

    Raises RegistryError if an edge has two active transforms, ChecksumError if stored bytes were altered.
    """
    out: dict[tuple[int, int], TransformRecord] = {}
    for rec in read_records(spark, location, "active"):
        if rec.edge in out:
            raise RegistryError(f"registry '{location}' has two active transforms for edge {rec.edge}")
        out[rec.edge] = rec
    return out


def get_record(spark, location: str, transform_id: str, verify: bool = True) -> TransformRecord:
    """One transform by id (RegistryError names the id when it is not there)."""
    from pyspark.sql import functions as F

    if not table_exists(spark, location):
        raise RegistryError(f"registry '{location}' does not exist; run `bcemb fit` first")
    rows = read_delta(spark, location).where(F.col("transform_id") == F.lit(transform_id)).collect()
    if not rows:
        raise RegistryError(f"no transform with id {transform_id!r} in registry '{location}' "
                            "(`bcemb registry list` shows the ids)")
    return _record_from_row(rows[0], verify)


def retire(spark, location: str, transform_id: str, actor: Optional[str] = None, reason: Optional[str] = None) -> bool:
    """Retire one transform (one UPDATE commit); returns False when it was not active (nothing committed)."""
    rec = get_record(spark, location, transform_id, verify=False)
    if rec.status != "active":
        log.info("registry: %s is already %s, nothing to commit", transform_id, rec.status)
        return False
    meta = _metadata("retire", actor, reason, transforms=[{"id": transform_id, "edge": list(rec.edge)}])

    def attempt() -> bool:
        with session_conf(spark, commit_conf(meta)):
            update(spark, location, {"status": "'retired'", "retired_at": "current_timestamp()"},
                   f"transform_id = {sql_string(transform_id)} AND status = 'active'")
        return True

    done = retry_on_conflict(attempt, f"registry {location}")
    log.info("registry: retired %s (edge %d -> %d)", transform_id, *rec.edge)
    return done


def activate(spark, location: str, transform_id: str, actor: Optional[str] = None,
             reason: Optional[str] = None) -> bool:
    """Make `transform_id` its edge's active transform, retiring the current one, in one UPDATE commit.

    The checksum is verified first (ChecksumError names the id). Returns False when already active.
    """

    rec = get_record(spark, location, transform_id, verify=False)
    try:
        transform_from_bytes(rec.parameters, rec.stored_checksum)
    except (ChecksumError, TransformFormatError) as exc:
        raise type(exc)(f"transform {transform_id}: {exc}") from None
    if rec.status == "active":
        log.info("registry: %s is already active, nothing to commit", transform_id)
        return False
    same_edge = f"source_version = {int(rec.source_version)} AND target_version = {int(rec.target_version)}"
    this = f"transform_id = {sql_string(transform_id)}"
    meta = _metadata("activate", actor, reason, transforms=[{"id": transform_id, "edge": list(rec.edge)}])

    def attempt() -> bool:
        with session_conf(spark, commit_conf(meta)):
            update(spark, location,
                   {"status": f"CASE WHEN {this} THEN 'active' ELSE 'retired' END",
                    "retired_at": f"CASE WHEN {this} THEN CAST(NULL AS TIMESTAMP) ELSE current_timestamp() END"},
                   f"{same_edge} AND ({this} OR status = 'active')")
        return True

    done = retry_on_conflict(attempt, f"registry {location}")
    log.info("registry: activated %s for edge %d -> %d (the previous active transform retired)", transform_id, *rec.edge)
    return done


def verify_registry(spark, location: str) -> list[tuple[str, str]]:
    """Every row's parameters against its checksum: [(transform_id, problem)] for the rows that fail."""
    bad = []
    if not table_exists(spark, location):
        raise RegistryError(f"registry '{location}' does not exist")
    for row in read_delta(spark, location).select("transform_id", "parameters", "checksum").collect():
        try:
            transform_from_bytes(bytes(row.parameters), row.checksum)
        except (ChecksumError, TransformFormatError) as exc:
            bad.append((row.transform_id, f"{type(exc).__name__}: {exc}"))
    return bad
