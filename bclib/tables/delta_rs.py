"""The arrow engine's driver side: Delta snapshots and the one commit, through delta-rs (`deltalake`).

Why delta-rs: it is the maintained non-JVM Delta implementation, its Python API commits externally
written files (`DeltaTable.create_write_transaction`: add actions, partition overwrite with the matching
remove actions, commitInfo.userMetadata, a `txn` application transaction) in one atomic commit with
conflict checks against the read version, and Spark reads what it writes (protocol 1/2 tables). We do
not write `_delta_log` JSON by hand.

What it cannot do safely is checked first (`source_blockers`, `target_blockers`): deletion vectors and
column mapping on the source (raw Parquet would return deleted rows or physical names), and the writer
features delta-rs 1.6 refuses or does not maintain on the output.
"""

from __future__ import annotations

import json
import logging
from typing import Optional, Sequence
from urllib.parse import unquote

from bclib.storage import local_path

log = logging.getLogger(__name__)

# writer features delta-rs 1.6 commits to correctly for our append-of-new-files + remove pattern
SAFE_WRITER_FEATURES = {"appendOnly", "invariants", "changeDataFeed", "timestampNtz", "checkConstraints",
                        "deletionVectors", "v2Checkpoint"}


def available() -> Optional[str]:
    """None when `deltalake` can be imported, else why not (the extra to install)."""
    try:
        import deltalake  # noqa: F401
    except ImportError:
        return "the arrow engine needs the deltalake package (pip install 'bcemb[arrow]')"
    return None


def table_uri(location: str) -> str:
    """delta-rs takes absolute local paths or URIs: a local path or file: URI as an absolute path
    (`bclib.storage.local_path`), Spark's s3a:// as s3://, other URIs as they are."""
    path = local_path(location)
    if path is not None:
        return path
    if location.startswith("s3a://"):
        return "s3://" + location[len("s3a://"):]
    return location


def open_table(location: str, version: Optional[int] = None, storage_options: Optional[dict] = None):
    """A pinned delta-rs DeltaTable (a DeltaTable object never advances by itself: reopen to see new commits)."""
    from deltalake import DeltaTable

    return DeltaTable(table_uri(location), version=version, storage_options=storage_options)


def source_blockers(dt) -> list[str]:
    """Why the snapshot's Parquet files cannot be read as they are (empty: they can)."""
    out = []
    conf = dt.metadata().configuration or {}
    proto = dt.protocol()
    if conf.get("delta.columnMapping.mode", "none") != "none":
        out.append("the source table uses column mapping (its files hold physical column names)")
    if "deletionVectors" in (proto.reader_features or []):
        out.append("the source table has deletion vectors (its files still hold deleted rows)")
    return out


# table properties bcemb itself sets on an output (backfill.deletion_vectors; the retention `maintain` keeps):
# any other `delta.*` property is a rule or behaviour of someone else's that only Spark's writer is trusted with
BCEMB_PROPERTIES = {"delta.enableDeletionVectors", "delta.logRetentionDuration", "delta.deletedFileRetentionDuration"}
# column metadata through which Delta enforces a rule at write time, in Spark's writer, not at commit
_WRITE_TIME_RULES = {"delta.generationExpression": "a generated column", "delta.invariants": "a column invariant",
                     "CURRENT_DEFAULT": "a column default", "delta.identity.start": "an identity column"}


def target_blockers(dt) -> list[str]:
    """Why delta-rs must not commit to the output table (empty: it may): writer features it does not maintain,
    and table rules Delta enforces only in Spark's write path (CHECK constraints, generated and identity
    columns, invariants, defaults) or `delta.*` properties bcemb did not set. Pure on the delta-rs table."""
    out = []
    conf = dt.metadata().configuration or {}
    proto = dt.protocol()
    constraints = sorted(k[len("delta.constraints."):] for k in conf if k.startswith("delta.constraints."))
    if constraints:
        out.append(f"the output table has CHECK constraint(s) {constraints}, which Delta enforces in Spark's writer")
    for f in dt.schema().fields:
        for key, what in _WRITE_TIME_RULES.items():
            if key in (f.metadata or {}):
                out.append(f"column '{f.name}' of the output table is {what}, which Delta enforces in Spark's writer")
    foreign = sorted(k for k in conf if k.startswith("delta.") and not k.startswith("delta.constraints.")
                     and k not in BCEMB_PROPERTIES)
    if foreign:
        out.append(f"the output table has properties bcemb did not set ({', '.join(foreign)}): only Spark's writer "
                   "is trusted to keep them")
    if conf.get("delta.columnMapping.mode", "none") != "none":
        out.append("the output table uses column mapping")
    if conf.get("delta.appendOnly", "false").lower() == "true":
        out.append("the output table is append-only (delta.appendOnly)")
    for feature in proto.writer_features or []:
        if feature not in SAFE_WRITER_FEATURES:
            out.append(f"the output table has writer feature '{feature}', which delta-rs does not maintain")
    if not proto.writer_features and proto.min_writer_version >= 5:
        out.append(f"the output table needs writer version {proto.min_writer_version} (column mapping / identity)")
    return out


def snapshot_files(dt) -> list[tuple[str, int]]:
    """(absolute URI or path, size in bytes) of every data file of the pinned snapshot."""
    import pyarrow as pa

    root = dt.table_uri.rstrip("/")
    if root.startswith("file://"):
        root = root[len("file://"):]
    actions = pa.table(dt.get_add_actions(flatten=True)).select(["path", "size_bytes"]).to_pylist()
    out = []
    for a in actions:
        rel = unquote(a["path"])
        out.append((rel if "://" in rel or rel.startswith("/") else f"{root}/{rel}", int(a["size_bytes"])))
    return out


def _add_actions(adds: Sequence[dict]) -> list:
    from deltalake.transaction import AddAction

    return [AddAction(path=a["path"], size=a["size"], partition_values=a["partition_values"],
                      modification_time=a["modification_time"], data_change=True, stats=a["stats"]) for a in adds]


def _commit_properties(adds: Sequence[dict], user_metadata: str, txn: tuple[str, int], read_version: int):
    """userMetadata, operation metrics, the txn id; no retries: a commit after `read_version` fails ours."""
    from deltalake import CommitProperties, Transaction

    rows = sum(int(a["rows"]) for a in adds)
    meta = {"userMetadata": user_metadata, "operationMetrics": {"numFiles": str(len(adds)), "numOutputRows": str(rows)}}
    if read_version >= 0:  # a table's first commit reads no version
        meta["readVersion"] = int(read_version)
    return CommitProperties(
        custom_metadata=meta,
        app_transactions=[Transaction(txn[0], int(txn[1]))],
        # delta-rs would otherwise run its own conflict check and retry on a newer version, and that check
        # lets a concurrent compaction or insert-only commit through (tables/commits.py does the checking)
        max_commit_retries=0,
    )


def _lost_race(location: str, exc: Exception):
    from bclib.errors import ConcurrentCommitError

    return ConcurrentCommitError(f"arrow engine: another writer committed to {location} between the commit rule's "
                                 f"check and this commit ({type(exc).__name__}: {exc}); re-planning")


def create_output_with_files(location: str, id_type, adds: Sequence[dict], user_metadata: str, txn: tuple[str, int],
                             storage_options: Optional[dict] = None, configuration: Optional[dict] = None) -> None:
    """Create the output table (protocol 1/2, partitioned by space_version, as Spark would) with `adds` in its
    first commit: a failed backfill leaves no table behind. Raises ConcurrentCommitError when another writer
    created the table first (version 0 is put-if-absent)."""
    import pyarrow as pa
    from deltalake import PostCommitHookProperties, Schema
    from deltalake.exceptions import CommitFailedError, DeltaError
    from deltalake.transaction import create_table_with_add_actions

    from bclib.tables.parquet_files import output_file_schema

    wanted = {a["partition_values"].get("space_version") for a in adds}
    schema = output_file_schema(id_type).append(pa.field("space_version", pa.int32()))
    try:
        create_table_with_add_actions(
            table_uri(location), Schema.from_arrow(schema), _add_actions(adds), mode="error",
            partition_by=["space_version"], configuration=configuration,
            storage_options=storage_options, commit_properties=_commit_properties(adds, user_metadata, txn, -1),
            post_commithook_properties=PostCommitHookProperties(create_checkpoint=False, cleanup_expired_logs=False))
    except (CommitFailedError, DeltaError) as exc:
        from deltalake import DeltaTable

        if not DeltaTable.is_deltatable(table_uri(location), storage_options=storage_options):
            raise
        raise _lost_race(location, exc) from exc
    log.info("arrow engine: created %s with %d file(s) in spaces %s", location, len(adds), sorted(wanted))


def commit_replace(location: str, read_version: int, adds: Sequence[dict], spaces: Sequence[int],
                   user_metadata: str, txn: tuple[str, int], storage_options: Optional[dict] = None) -> bool:
    """One commit: remove every file of `spaces` in the read snapshot, add `adds`, userMetadata, txn.

    Returns False (nothing committed) when the table already recorded `txn` at that version or later:
    the same work was committed by an earlier attempt. `read_version` is the version the commit rule
    checked (`tables/commits.py`); any commit after it fails this one's put-if-absent of the next log
    entry, raised as ConcurrentCommitError (the step re-plans): delta-rs does not retry it.
    """
    from deltalake import PostCommitHookProperties
    from deltalake.exceptions import CommitFailedError

    latest = open_table(location, storage_options=storage_options)
    done = latest.transaction_version(txn[0])
    if done is not None and done >= txn[1]:
        log.info("arrow engine: transaction %s already at version %s: an earlier attempt committed this work", *txn)
        return False
    wanted = {str(int(s)) for s in spaces}
    bad = [a["path"] for a in adds if a["partition_values"].get("space_version") not in wanted]
    if bad:
        raise ValueError(f"files outside the replaced spaces {sorted(wanted)}: {bad[:3]}")
    dt = open_table(location, version=read_version, storage_options=storage_options)
    try:
        dt.create_write_transaction(
            _add_actions(adds), mode="overwrite", schema=dt.schema(), partition_by=["space_version"],
            partition_filters=[("space_version", "in", sorted(wanted, key=int))],
            commit_properties=_commit_properties(adds, user_metadata, txn, read_version),
            # checkpoints are left to Spark's own commits (MERGE, maintain), the format every reader knows
            post_commithook_properties=PostCommitHookProperties(create_checkpoint=False, cleanup_expired_logs=False),
        )
    except CommitFailedError as exc:
        raise _lost_race(location, exc) from exc
    return True


def history_user_metadata(location: str, storage_options: Optional[dict] = None) -> Optional[str]:
    """userMetadata of the latest commit, as delta-rs reads it (tests: Spark and delta-rs agree)."""
    entries = open_table(location, storage_options=storage_options).history(1)
    return entries[0].get("userMetadata") if entries else None


def json_dumps(meta: dict) -> str:
    return json.dumps(meta, sort_keys=True)
