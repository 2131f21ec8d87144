"""The one commit rule of every bcemb write into the output, both engines (DESIGN.md, "Shared lakehouses").

A step plans on a snapshot of the output (Delta version `read_version`: its state, which spaces to
rewrite or merge, which files it will replace), does its work, and commits only if nothing that
touches the spaces it replaces landed after `read_version`. "Touches" is what Delta's own
ConflictChecker reads from the winning commits, made strict for a writer that replaces whole
partitions by a file list:

    add / remove / cdc of a file in a replaced space   -> conflict (dataChange = false too: a compaction;
                                                          an insert-only commit; a deletion-vector update)
    a file action without a space_version value        -> conflict (the layout is not ours)
    metaData (schema, properties, partitioning)         -> conflict (table rules may have changed)
    protocol                                             -> conflict
    commitInfo, txn, domainMetadata, files of other spaces, VACUUM START/END -> no conflict

The winning commits are read once, as Delta's ConflictChecker does (delta-io/delta
`ConflictChecker`, delta-rs `conflict_checker`): the `_delta_log/<version>.json` entries between the
read version and the latest, through Spark's own reader (so every filesystem Spark reads works). The
classification is pure (`classify`). `check_commit` raises `ConcurrentCommitError`, one of the typed
conflicts `retry_on_conflict` re-plans on, and returns the version it checked: the arrow engine commits
against exactly that version through delta-rs with no retry of its own (any commit after it fails the
put-if-absent of the next log entry), the spark engine hands the rest of the window to Delta's
ConflictChecker (replaceWhere and MERGE read the spaces they replace, INSERT REPLACE ON the whole table).

Tests drive interleavings through `commit_seam`: a callback that runs at a named stage between plan
and commit, no sleeps.
"""

from __future__ import annotations

import json
import logging
from contextlib import contextmanager
from typing import Callable, Iterator, Optional, Sequence

from bclib.errors import ConcurrentCommitError

log = logging.getLogger(__name__)

# stages where a seam callback runs: before the rule reads the log, and (arrow engine) after the rule
# passed and before delta-rs writes the commit
BEFORE_CHECK = "before-check"
BEFORE_COMMIT = "before-commit"

_seams: list[Callable[[str, str, int], None]] = []


@contextmanager
def commit_seam(callback: Callable[[str, str, int], None]) -> Iterator[None]:
    """Run `callback(stage, location, read_version)` at each commit stage while the block runs (tests).

    The callback may commit to the table itself (another writer between plan and commit); it is not
    called again for commits made inside it (nested bcemb steps run without it).
    """
    _seams.append(callback)
    try:
        yield
    finally:
        _seams.remove(callback)


def run_seams(stage: str, location: str, read_version: int) -> None:
    """Call the registered seam callbacks (none outside tests); each is off while it runs."""
    for callback in list(_seams):
        _seams.remove(callback)
        try:
            callback(stage, location, read_version)
        finally:
            _seams.append(callback)


def classify(actions: Sequence[dict], spaces: Sequence[int]) -> Optional[str]:
    """Why one winning commit conflicts with a commit replacing `spaces`, or None when it does not.

    actions: the commit's Delta actions, one dict per line of its log entry ({"add": {...}}, ...).
    Pure: no I/O.
    """
    wanted = {str(int(s)) for s in spaces}
    touched = []  # (kind, body, space) of the file actions in replaced spaces
    for action in actions:
        if "metaData" in action:
            return "it changed the table's metadata (schema, properties or partitioning)"
        if "protocol" in action:
            return "it changed the table's protocol"
        for kind in ("add", "remove", "cdc"):
            body = action.get(kind)
            if body is None:
                continue
            space = (body.get("partitionValues") or {}).get("space_version")
            if space is None:
                return f"it wrote a file without a space_version partition ({kind} {body.get('path')})"
            if space in wanted:
                touched.append((kind, body, space))
    if not touched:
        return None
    # the most telling description: a deletion vector, a compaction, else the first file action
    for kind, body, space in touched:
        if kind == "add" and body.get("deletionVector"):
            return f"it added a deletion vector to a file of space {space} (a DELETE, UPDATE or MERGE)"
    for kind, body, space in touched:
        if body.get("dataChange") is False:
            return f"it rewrote files of space {space} with dataChange=false (a compaction or reorg)"
    kind, body, space = touched[0]
    what = {"add": "added", "remove": "removed", "cdc": "wrote change data for"}[kind]
    return f"it {what} a file of space {space}"


def _log_dir(spark, location: str) -> str:
    from bclib.tables.delta import detail, is_path

    if is_path(location):
        root = location
    else:
        root = detail(spark, location).location
    return root.rstrip("/") + "/_delta_log"


def winning_commits(spark, location: str, read_version: int, latest: int) -> dict[int, list[dict]]:
    """{version: actions} of the commits after `read_version` up to `latest`, read through Spark."""
    if latest <= read_version:
        return {}
    from pyspark.sql import functions as F

    log_dir = _log_dir(spark, location)
    paths = [f"{log_dir}/{v:020d}.json" for v in range(read_version + 1, latest + 1)]
    rows = spark.read.text(paths).select("value", F.col("_metadata.file_path").alias("f")).collect()
    out: dict[int, list[dict]] = {v: [] for v in range(read_version + 1, latest + 1)}
    for row in rows:
        if not row.value.strip():
            continue
        version = int(row.f.rsplit("/", 1)[-1].split(".", 1)[0])
        out[version].append(json.loads(row.value))
    return out


def check_commit(spark, location: str, read_version: Optional[int], spaces: Sequence[int], what: str) -> int:
    """Apply the commit rule before a commit replacing `spaces` of the table at `location`.

    read_version: the Delta version the work was planned on (None: the table did not exist then).
    Returns the latest version, checked (commit against it). Raises ConcurrentCommitError naming the
    first winning commit that touches `spaces`, its version and why, and LeaseLostError when this
    process held a run lease and lost it. Sources: Delta protocol (actions), delta-io/delta ConflictChecker.
    """
    from bclib.tables import lease
    from bclib.tables.delta import current_delta_version, table_exists

    run_seams(BEFORE_CHECK, location, -1 if read_version is None else read_version)
    lease.verify_held()
    if read_version is None:
        if table_exists(spark, location):
            raise ConcurrentCommitError(f"{what}: the output table at {location} was created by another writer "
                                        "after this run planned; re-planning")
        return -1
    latest = current_delta_version(spark, location)
    for version, actions in sorted(winning_commits(spark, location, read_version, latest).items()):
        why = classify(actions, spaces) if actions else "its log entry could not be read"
        if why:
            op = next((a["commitInfo"].get("operation") for a in actions if "commitInfo" in a), "unknown")
            raise ConcurrentCommitError(
                f"{what}: another writer committed Delta v{version} ({op}) after this run planned on v{read_version}, "
                f"and {why}; re-planning", version=version)
    if latest > read_version:
        log.info("%s: commits v%d..v%d after the plan touch none of spaces %s", what, read_version + 1, latest,
                 list(spaces))
    return latest
