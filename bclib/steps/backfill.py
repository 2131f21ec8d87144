"""The backfill step: decide per space, gate, validate, transform on the executors, commit exactly once.

One attempt (`_backfill`, retried whole by `run_backfill` on a concurrent commit) is a row of stages, each a
function with one job over the attempt's `_Attempt`:

    _survey            registry -> chains and kernel (`backfill_plan.plan_backfill`); the output's state; per space
                       skip | incremental | full (`backfill_plan.decide`)
    _gate              spaces whose chain is new to the output are measured first (`steps/gate.py`)
    _settle_changes    incremental spaces: the source's change data feed, or (auto) a full rewrite when that is
                       cheaper or the feed is unavailable
    _validate          before any write: ids unique and non-null, dimension, quarantine count, shrink guard
    _commit_full       the full rewrite, on the engine `engines.choose_engine` picks (one commit)
    _commit_changes    the changes into the incremental spaces: INSERT REPLACE ON, or the MERGE (one commit)
    _write_side_tables quarantine, gate verdicts, per-space views: after the output commit(s)

A space is up to date when the output's last bcemb commit (VACUUM, OPTIMIZE and property changes after
it are looked through) says it holds the current source Delta version through the current chain; then
nothing is read or written. Side tables are written after the output commit, so a failed run changes no
table; a rerun converges.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from bclib.config import JobConfig
from bclib.errors import DimensionMismatchError, EmptySourceError, IncrementalUnavailableError, NullIdError, \
    ShrinkGuardError, reraise_executor_errors
from bclib.spark import SPLIT_BYTES, backfill_write_conf, default_parallelism, max_partition_num, session_conf
from bclib.steps.backfill_plan import FULL, INCREMENTAL, SKIP, BackfillPlan, auto_choice, decide, plan_backfill, \
    txn_id
from bclib.steps.engines import batch_rows_for, choose_engine, to_spaces, write_full_arrow, write_full_spark
from bclib.steps.gate import GateResult, raise_if_rejected, record_verdicts, run_gate
from bclib.tables.changes import ChangeSet, ChangesUnavailable, read_changes
from bclib.tables.delta import is_path, log_size, retry_on_conflict
from bclib.tables.embeddings import VersionRead, check_unique_ids, read_embedding_version, read_rows
from bclib.tables.lease import leased
from bclib.tables.output import OutputState, check_output_schema, create_output, merge_changes, others_columns, \
    others_with_values, output_layout, quarantine_rows, quarantine_state, read_output_state, remove_orphan_part_files, \
    replace_changes, replace_on_supported, space_rows, space_state, validity_filter, write_quarantine
from bclib.tables.retention import retention_properties, table_properties

log = logging.getLogger(__name__)


@dataclass
class BackfillResult:
    """What `run_backfill` did: per space the action and why, rows written, commits made."""

    run_id: str
    skipped: bool
    rows: int
    spaces: list[int]
    actions: dict[int, tuple[str, str]] = field(default_factory=dict)
    commits: int = 0
    seconds: float = 0.0
    write_seconds: float = 0.0
    quarantined: int = 0
    gate: Optional[GateResult] = None
    source_delta_version: Optional[int] = None
    dry_run: bool = False
    engine: str = ""  # the engine of the full rewrite (spark | arrow), and why
    engine_reason: str = ""
    # spaces left as they were because their version's table could not be read for the gate -> why (exit 4)
    unreadable: dict[int, str] = field(default_factory=dict)

    def summary(self) -> str:
        if self.dry_run:
            return "backfill (dry run): " + "; ".join(f"space {j}: {a} ({why})" for j, (a, why) in
                                                     sorted(self.actions.items()))
        if self.skipped:
            return f"backfill: nothing to do, spaces {self.spaces} are up to date (run {self.run_id})"
        done = {a: [j for j, (x, _) in self.actions.items() if x == a and j not in self.unreadable]
                for a in (FULL, INCREMENTAL, SKIP)}
        engine = f" ({self.engine} engine)" if done[FULL] and self.engine else ""
        left = f", NOT published {sorted(self.unreadable)} (version table unreadable)" if self.unreadable else ""
        return (f"backfill: {self.rows} rows in {self.commits} commit(s) in {self.seconds:.1f}s: rewrote "
                f"{done[FULL] or 'none'}{engine}, merged changes into {done[INCREMENTAL] or 'none'}, up to date "
                f"{done[SKIP] or 'none'}{left} (run {self.run_id}" + (f", {self.quarantined} quarantined)" if
                                                                     self.quarantined else ")"))


PROBE_FILES = 256  # the dimension probe opens about this many source files at most


def probe_rows_for(size: Optional[tuple[int, int]], dim: int, most: int = 10_000) -> int:
    """How many rows the dimension probe reads: `most`, or fewer where the source's files are small (`size`: its
    live files and their bytes, `log_size`), so that the probe opens about PROBE_FILES files at most (a
    streaming ingestion's one-row files: 256 rows, not 10,000 file opens). Rows per file are estimated as
    the files' mean bytes over a float32 vector of `dim` elements and its id (4 * dim + 8 bytes)."""
    if not size or not size[0]:
        return most
    rows_per_file = max(1.0, size[1] / size[0] / (4 * max(1, dim) + 8))
    return int(min(most, max(PROBE_FILES, PROBE_FILES * rows_per_file)))


def _check_dimension(source: VersionRead, plan: BackfillPlan, probe_rows: int = 10_000) -> None:
    """Before any write: the first `probe_rows` rows' dimension against the registry's (majority, not first row);
    one Spark job (a collect-limit of the sizes), counted on the driver."""
    from pyspark.sql import functions as F

    column = source.df.where(F.col("vector").isNotNull()).select(F.size("vector").alias("n")) \
        .limit(probe_rows).toArrow().column("n")
    if not len(column):
        return
    values, counts = np.unique(column.to_numpy(zero_copy_only=False), return_counts=True)
    n, count = int(values[np.argmax(counts)]), int(counts.max())
    if n != plan.kernel.dim_in:
        total = int(counts.sum())
        raise DimensionMismatchError(
            f"version {plan.source_version} at '{source.location}': {count} of the first {total} vectors "
            f"have {n} elements but the active transform {plan.source_version} -> {plan.spaces[-1]} expects "
            f"dimension {plan.kernel.dim_in}; the table's vectors changed dimension: register a transform for the "
            "new model (`bcemb fit --refit`) or point embeddings.location at the right table"
        )


def _check_change_dimension(source: VersionRead, plan: BackfillPlan, changes: ChangeSet) -> None:
    """Before a MERGE: the upserted vectors' dimension (majority, from the change set's one counting job) against
    the registry's, as `_check_dimension` checks a full rewrite's source."""
    if not changes.sizes:
        return
    n, count = max(changes.sizes.items(), key=lambda kv: (kv[1], -kv[0]))
    if n != plan.kernel.dim_in:
        raise DimensionMismatchError(
            f"version {plan.source_version} at '{source.location}': {count} of the {sum(changes.sizes.values())} "
            f"vectors changed since Delta v{changes.from_delta_version - 1} have {n} elements but the active "
            f"transform {plan.source_version} -> {plan.spaces[-1]} expects dimension {plan.kernel.dim_in}; the "
            "table's vectors changed dimension: register a transform for the new model (`bcemb fit --refit`) or "
            "point embeddings.location at the right table")


@dataclass
class _Attempt:
    """One attempt's working state, handed from stage to stage (rebuilt from scratch on a retry)."""

    spark: object
    cfg: JobConfig
    run_id: str
    plan: BackfillPlan
    source: VersionRead
    state: OutputState  # the output as planned on
    desired: dict  # space -> the state it should hold (tables.output.space_state)
    actions: dict  # space -> (skip | incremental | full, why); stages may turn an action into another
    result: BackfillResult
    started: float
    changes: Optional[ChangeSet] = None  # incremental spaces' change set (_settle_changes)
    replace_blocker: Optional[str] = None  # why the change set is MERGEd, not REPLACEd ON (None: REPLACE ON)
    rows: object = None  # the validated source DataFrame (quarantined rows filtered out)
    base: Optional[OutputState] = None  # the output before the next commit
    n_source: int = 0  # the source version's rows (`read_rows`)
    source_size: Optional[tuple[int, int]] = None  # the source's live files and bytes (`log_size`; None: unknown)

    @property
    def out(self) -> str:
        return self.cfg.output_location

    @property
    def quarantine(self) -> Optional[str]:
        return self.cfg.backfill.quarantine_location

    def spaces(self, action: str) -> list[int]:
        return [j for j, (a, _) in sorted(self.actions.items()) if a == action]

    def done(self) -> BackfillResult:
        self.result.seconds = time.time() - self.started
        return self.result


@leased("backfill")
def run_backfill(spark, cfg: JobConfig, run_id: Optional[str] = None, allow_shrink: bool = False,
                 dry_run: bool = False) -> BackfillResult:
    """Bring every target space of the output up to date with the source version, exactly once.

    Raises GateRejectedError (nothing written) when a changed chain fails the gate, ShrinkGuardError,
    EmptySourceError, DuplicateIdError/NullIdError, InvalidVectorError (a bad row, unless quarantined),
    IncrementalUnavailableError (`incremental: require`), ConcurrentRunError after bounded retries.
    """
    run_id = run_id or uuid.uuid4().hex[:12]
    return retry_on_conflict(lambda: _backfill(spark, cfg, run_id, allow_shrink, dry_run),
                             f"backfill of {cfg.output_location}", cfg.backfill.max_retries,
                             cfg.backfill.retry_backoff_seconds)


def _backfill(spark, cfg: JobConfig, run_id: str, allow_shrink: bool, dry_run: bool) -> BackfillResult:
    """One attempt: the stages in order; each may end the attempt (nothing to do) or raise (nothing written)."""
    at = _survey(spark, cfg, run_id)
    at.source_size = log_size(at.spark, at.source.location, at.source.delta_version, at.source.storage_options)
    with session_conf(spark, _scan_conf(at)):
        return _stages(at, allow_shrink, dry_run)


def _scan_conf(at: _Attempt) -> dict:
    """The attempt's cap on file-scan partitions (`spark.sql.files.maxPartitionNum`): the source's bytes in
    Spark's splits, or the cores when that is more, so that every Spark job over a fragmented source (a
    streaming ingestion's many small files) runs a task per core, not one per ~32 files. Empty (Spark's
    own splits) where the source's log is not read directly (`log_size`)."""
    if at.source_size is None:
        return {}
    return {"spark.sql.files.maxPartitionNum": str(max_partition_num(at.source_size[1], SPLIT_BYTES,
                                                                     default_parallelism(at.spark)))}


def _stages(at: _Attempt, allow_shrink: bool, dry_run: bool) -> BackfillResult:
    """The attempt's stages after its survey, in order."""
    if dry_run:
        at.result.dry_run = True
        return at.result
    if not at.spaces(FULL) and not at.spaces(INCREMENTAL):
        return _nothing_to_do(at)
    # an all-incremental attempt checks its change set's vectors instead (with quarantine: the source's, as a
    # few bad vectors can be most of a small change set)
    probed = bool(at.spaces(FULL)) or bool(at.quarantine)
    if probed:
        _check_dimension(at.source, at.plan, probe_rows_for(at.source_size, at.plan.kernel.dim_in))
    if not _gate(at):
        return at.done()
    n_source = at.n_source = read_rows(at.source)
    if n_source == 0:
        raise EmptySourceError(f"version {at.plan.source_version} at '{at.source.location}' (Delta "
                               f"v{at.source.delta_version}) has no rows; nothing was written (an empty source never "
                               "replaces published spaces)")
    _settle_changes(at, n_source)
    if at.changes is not None and not probed:
        _check_change_dimension(at.source, at.plan, at.changes)
    if at.spaces(FULL) and not probed:  # incremental spaces turned into full rewrites
        _check_dimension(at.source, at.plan, probe_rows_for(at.source_size, at.plan.kernel.dim_in))
    _validate(at, n_source, allow_shrink)
    write_started = time.time()
    _prepare_output(at)
    if at.spaces(FULL):
        _commit_full(at)
    if at.spaces(INCREMENTAL):
        _commit_changes(at)
    at.result.write_seconds = time.time() - write_started
    _write_side_tables(at)
    result = at.done()
    log.info("backfill: %d rows written in %d commit(s) in %.1fs", result.rows, result.commits, result.seconds)
    return result


def _survey(spark, cfg: JobConfig, run_id: str) -> _Attempt:
    """The plan, the source, the output's state and per space what to do and why (logged)."""
    started = time.time()
    plan = plan_backfill(spark, cfg)
    source = read_embedding_version(spark, cfg, plan.source_version)
    state = read_output_state(spark, cfg.output_location, cfg.object_store_options or None)
    if state.exists:
        check_output_schema(spark, cfg.output_location, source.df.schema["id"].dataType.simpleString(),
                            cfg.object_store_options or None)
    desired = {j: space_state(source.location, plan.source_version, source.delta_version, plan.chains[j])
               for j in plan.spaces}
    actions = decide(state, desired, cfg.backfill.incremental, cfg.backfill.force)
    for j, (action, why) in actions.items():
        log.info("backfill: space %d: %s (%s)", j, action, why)
    result = BackfillResult(run_id, False, 0, plan.spaces, actions, source_delta_version=source.delta_version)
    return _Attempt(spark, cfg, run_id, plan, source, state, desired, actions, result, started)


def _nothing_to_do(at: _Attempt) -> BackfillResult:
    """Every space is up to date: only a quarantine table behind the output's source version is rewritten."""
    if at.quarantine and not _quarantine_current(at.spark, at.quarantine, at.state.lineage):
        _write_full_quarantine(at.spark, at.cfg, at.source, at.plan, at.run_id)
        at.result.commits = 1
    at.result.skipped = True
    log.info("backfill: %s already holds version %d (Delta v%d) in spaces %s through the same chains; "
             "nothing to do (backfill.force rewrites)", at.out, at.plan.source_version, at.source.delta_version,
             at.plan.spaces)
    return at.done()


def _gate(at: _Attempt) -> bool:
    """Measure every space whose chain is new to the output before anything is written; False when nothing is
    left to publish. Raises GateRejectedError (enforced; the verdicts are the only thing written). A space whose
    version table cannot be read is left as it was (`result.unreadable`, exit 4), the others go on."""
    if not at.cfg.gate.enabled:
        return True
    gated = {j: at.plan.chains[j] for j, (a, _) in at.actions.items()
             if a != SKIP and (at.state.space(j) or {}).get("chain_id") != at.plan.chain_ids[j]}
    if not gated:
        return True
    gate = at.result.gate = run_gate(at.spark, at.cfg, at.plan.source_version, gated)
    if gate.rejected and at.cfg.gate.enforce:
        record_verdicts(at.spark, at.cfg, at.run_id, gate)
    raise_if_rejected(gate)  # GateRejectedError when enforced; otherwise logs and goes on
    for j, why in sorted(gate.unreadable.items()):  # one space's trouble stays with that space
        at.actions[j] = (SKIP, f"not published: version {j}'s table cannot be read for the gate ({why})")
        at.result.unreadable[j] = why
    if all(a == SKIP for a, _ in at.actions.values()):
        record_verdicts(at.spark, at.cfg, at.run_id, gate)
        log.warning("backfill: nothing published: every space to write has an unreadable version table")
        return False
    return True


def _settle_changes(at: _Attempt, n_source: int) -> None:
    """Incremental spaces: read their change set, or turn them into full rewrites (feed unavailable, or — auto —
    a full rewrite estimated cheaper, `_auto_by_cost`)."""
    incremental = at.spaces(INCREMENTAL)
    if not incremental:
        return
    changes = _changes_or_fallback(at.spark, at.cfg, at.source, at.state, incremental, at.actions)
    if changes is not None:
        at.replace_blocker = _replace_blocker(at, at.plan, changes)
    if changes is not None and at.cfg.backfill.incremental == "auto":
        _auto_by_cost(at, changes, incremental, n_source)
        if not at.spaces(INCREMENTAL):
            changes = None
    at.changes = changes


def _validate(at: _Attempt, n_source: int, allow_shrink: bool) -> None:
    """Before any write: ids, quarantine count, shrink guard; sets `at.rows` (the usable source rows).
    Raises DuplicateIdError, NullIdError, EmptySourceError (every row unusable), ShrinkGuardError."""
    plan, source, cfg = at.plan, at.source, at.cfg
    full, incremental = at.spaces(FULL), at.spaces(INCREMENTAL)
    current_rows = space_rows(at.spark, at.out, cfg.object_store_options or None) if at.state.exists else {}
    df, bad = source.df, None
    if at.quarantine:
        bad = _bad_rows(df, plan)
        df = df.where(_good(plan))
    at.rows = df
    if full:
        check_unique_ids(df, source.location, plan.source_version)
        n_bad = bad.count() if bad is not None else 0
        at.result.quarantined = n_bad
        if n_bad == n_source:
            raise EmptySourceError(f"version {plan.source_version} at '{source.location}': all {n_source} rows are "
                                   f"unusable (see the quarantine reasons); nothing was written")
        _shrink_guard(cfg, full, current_rows, n_source - n_bad, allow_shrink, "rewrite")
    if incremental:
        changes = at.changes
        check_unique_ids(df, source.location, plan.source_version, only_ids=changes.df.where("_op = 'upsert'"))
        if not at.quarantine and changes.null_ids:
            raise NullIdError(f"version {plan.source_version} at '{source.location}': the changes since Delta "
                              f"v{changes.from_delta_version - 1} hold rows with a null id")
        for j in incremental:
            if current_rows.get(j, 0) and changes.deletes > cfg.backfill.max_shrink * current_rows[j] \
                    and not allow_shrink:
                raise ShrinkGuardError(
                    f"space {j} would lose up to {changes.deletes} of its {current_rows[j]} rows "
                    f"(> backfill.max_shrink = {cfg.backfill.max_shrink:.0%}) from deletes in version "
                    f"{plan.source_version}'s changes; nothing was written. If intended, run with --allow-shrink")


def _prepare_output(at: _Attempt) -> None:
    """Before the first commit: the engine of a full rewrite (EngineUnavailableError for a forced arrow that
    cannot run), a killed first run's leftovers removed, an output with deletion vectors created; sets `at.base`."""
    cfg, spark = at.cfg, at.spark
    at.base = at.state
    if at.spaces(FULL):
        held = others_with_values(spark, at.out, at.spaces(FULL)) \
            if at.state.exists and cfg.backfill.engine != "spark" else []
        at.result.engine, at.result.engine_reason = choose_engine(cfg, at.source, at.out, held)
    if not at.state.exists:  # a failed or killed first run's leftovers (this run holds the lease)
        remove_orphan_part_files(spark, at.out, cfg.object_store_options or None)
        if cfg.backfill.deletion_vectors:
            create_output(spark, at.out, at.source.df.schema["id"].dataType.simpleString(), deletion_vectors=True,
                          properties=retention_properties(cfg))
            log.info("backfill: created %s with deletion vectors (backfill.deletion_vectors)", at.out)
            at.base = read_output_state(spark, at.out, cfg.object_store_options or None)


def _commit_lineage(at: _Attempt, mode: str, spaces: list[int]) -> tuple[dict, tuple[str, int], BackfillPlan]:
    """The commit's lineage (the state of every space after it), its transaction id, and the plan for `spaces`."""
    sub = at.plan.restricted(spaces)
    after = dict(at.base.spaces) if not at.base.foreign else {}
    after.update({str(j): at.desired[j] for j in spaces})
    gate_note = {str(v.space): "passed" if v.passed else "rejected (gate.enforce false)"
                 for v in (at.result.gate.verdicts if at.result.gate else [])}
    lineage = _lineage(at.run_id, mode, spaces, at.source, at.changes if mode == INCREMENTAL else None, after,
                       gate_note, at.quarantine)
    txn = txn_id(at.out, mode, sub, at.base, at.source.delta_version)
    lineage["txn"] = list(txn)
    return lineage, txn, sub


def _count_commit(at: _Attempt, n: Optional[int]) -> None:
    at.result.rows += n or 0
    at.result.commits += 0 if n is None else 1  # None: Delta skipped the commit (transaction id recorded)


def _commit_full(at: _Attempt) -> None:
    """Rewrite the full spaces in one commit on the chosen engine; `at.base` becomes the output after it."""
    full = at.spaces(FULL)
    lineage, txn, sub = _commit_lineage(at, FULL, full)
    lineage["engine"] = at.result.engine
    out_row_bytes = 4 * max(at.plan.dims_out) + 48  # vector plus id, space, chain id, timestamp
    file_rows = max(10_000, at.cfg.backfill.target_file_mb * 2**20 // out_row_bytes)
    log.info("backfill: version %d (Delta v%d, dim %d) -> spaces %s (%s kernel): full rewrite, %s engine (%s)",
             at.plan.source_version, at.source.delta_version, at.plan.kernel.dim_in, full,
             "fused one-GEMM" if sub.kernel.fused else "sequential", at.result.engine, at.result.engine_reason)
    if at.result.engine == "arrow":
        n = write_full_arrow(at.spark, at.cfg, sub, at.source, at.out, lineage, txn, at.base,
                             at.quarantine is not None, file_rows)
    else:
        n = write_full_spark(at.spark, at.cfg, sub, at.rows, at.out, lineage, txn, at.base,
                             batch_rows_for(at.cfg, at.plan), file_rows, at.n_source)
    _count_commit(at, n)
    at.base = read_output_state(at.spark, at.out, at.cfg.object_store_options or None)


def _commit_changes(at: _Attempt) -> None:
    """The change set into the incremental spaces in one commit: Delta's INSERT REPLACE ON
    (`tables.output.replace_changes`) unless `_replace_blocker` names a reason, else the MERGE
    (`tables.output.merge_changes`)."""
    incremental, changes = at.spaces(INCREMENTAL), at.changes
    lineage, txn, sub = _commit_lineage(at, INCREMENTAL, incremental)
    blocker = at.replace_blocker
    log.info("backfill: version %d Delta v%d..v%d: %d upserts, %d deletes -> spaces %s (one %s commit%s)",
             at.plan.source_version, changes.from_delta_version, changes.to_delta_version, changes.upserts,
             changes.deletes, incremental, "MERGE" if blocker else "INSERT REPLACE ON",
             f"; not REPLACE ON: {blocker}" if blocker else "")
    batch_rows = batch_rows_for(at.cfg, at.plan)
    keys_rows, bound = (changes.upserts + changes.deletes) * len(incremental), at.cfg.backfill.merge_broadcast_rows
    with session_conf(at.spark, backfill_write_conf(batch_rows, len(incremental))), reraise_executor_errors():
        if blocker is None:
            upserts, _ = _upserts_and_deletes(changes.df, sub, at.quarantine is not None)
            keys = changes.df.where("id IS NOT NULL").select(_each_space(sub).alias("space_version"), "id")
            n = replace_changes(at.spark, upserts, keys, at.out, incremental, lineage, txn, at.base.delta_version,
                                keys_rows=keys_rows, broadcast_rows=bound)
        else:
            n = merge_changes(at.spark, _change_rows(changes.df, sub, at.quarantine is not None), at.out, incremental,
                              lineage, txn, at.base.delta_version, source_rows=keys_rows, broadcast_rows=bound)
    _count_commit(at, n)


def _replace_blocker(at: _Attempt, plan: BackfillPlan, changes: ChangeSet) -> Optional[str]:
    """Why the change set is MERGEd rather than committed with INSERT REPLACE ON, or None. REPLACE ON removes
    the changed rows and appends the new ones: that is the MERGE's result only while no row keeps anything of
    its old self (columns bcemb does not own keep their values through a MERGE update), nothing records the
    difference between an update and a delete plus an insert (the output's own change data feed, row
    tracking's row ids), and at least one row is written (Delta removes rows only where the write has some).
    An output without deletion vectors is MERGEd too: Delta 4.4's copy-on-write removal under REPLACE ON fails."""
    from pyspark.sql import functions as F

    cfg = at.cfg
    if cfg.backfill.incremental_commit == "merge":
        return "backfill.incremental_commit is merge"
    if not changes.upserts:
        return "the change set holds deletes only"
    if at.quarantine is not None and not changes.df.where(
            (F.col("_op") == F.lit("upsert")) & _good(plan)).limit(1).count():
        return "every upserted row is unusable (quarantined), so the change set deletes only"
    if not replace_on_supported(at.spark):
        return "this session's Delta does not take the replaceOn write option (Delta >= 4.3 does)"
    if str(at.spark.conf.get("spark.databricks.delta.delete.deletionVectors.persistent", "true")).lower() == "false":
        return "spark.databricks.delta.delete.deletionVectors.persistent is false (a copy-on-write removal)"
    others = others_columns(at.spark, at.out)
    if others:
        return f"the output has column(s) {others} that bcemb does not own; a MERGE update keeps their values"
    props = table_properties(at.spark, at.out, cfg.object_store_options or None)
    if str(props.get("delta.enableDeletionVectors", "false")).lower() != "true":
        # Delta 4.4 fails REPLACE ON's copy-on-write removal (DELTA_FILE_TO_OVERWRITE_NOT_FOUND naming the table's
        # root; delta-io/delta#7577, open); and there both commits rewrite every touched file anyway
        return "the output has no deletion vectors (backfill.deletion_vectors)"
    recorded = [k for k in ("delta.enableChangeDataFeed", "delta.enableRowTracking")
                if str(props.get(k, "false")).lower() == "true"]
    if recorded:
        return f"the output sets {', '.join(recorded)}; a MERGE records updated rows as updates"
    return None


def _write_side_tables(at: _Attempt) -> None:
    """After the output commit(s): the quarantine table, the gate's verdicts, a catalog output's space views."""
    if at.quarantine:
        if at.spaces(FULL) or not _quarantine_current(at.spark, at.quarantine,
                                                     {"source": {"delta_version": at.source.delta_version}}):
            at.result.quarantined = _write_full_quarantine(at.spark, at.cfg, at.source, at.plan, at.run_id)
            at.result.commits += 1
    if at.result.gate is not None:
        record_verdicts(at.spark, at.cfg, at.run_id, at.result.gate)
    if not is_path(at.out):
        create_space_views(at.spark, at.out, at.plan.spaces)


def _lineage(run_id: str, mode: str, written: list[int], source: VersionRead, changes, spaces_state: dict,
             gate: dict, quarantine: Optional[str]) -> dict:
    from bclib.tables.output import LINEAGE_FORMAT

    src = {"location": source.location, "version": source.version, "delta_version": source.delta_version}
    if changes is not None:
        src["from_delta_version"] = changes.from_delta_version
    return {"bcemb": "backfill", "format": LINEAGE_FORMAT, "run_id": run_id, "mode": mode, "written": written,
            "source": src, "spaces": dict(sorted(spaces_state.items())), "gate": gate,
            "quarantine": quarantine}


def _changes_or_fallback(spark, cfg: JobConfig, source: VersionRead, state: OutputState, spaces: list[int],
                         actions: dict):
    """The change set for the incremental spaces, or (auto, no feed for the range) their actions turned into
    full rewrites."""
    start = min(int(state.space(j)["source_delta_version"]) for j in spaces) + 1
    try:
        changes = read_changes(spark, cfg, source.version, source.location, start, source.delta_version)
    except ChangesUnavailable as exc:
        if cfg.backfill.incremental == "require":
            raise IncrementalUnavailableError(
                f"backfill.incremental is 'require' but {exc.reason}; nothing was written. Enable the change "
                "data feed on the source table, or set backfill.incremental: auto to rewrite in full") from None
        for j in spaces:
            actions[j] = (FULL, f"{exc.reason}: full rewrite instead")
        log.warning("backfill: %s; spaces %s are rewritten in full", exc.reason, spaces)
        return None
    return changes


def _auto_by_cost(at: _Attempt, changes: ChangeSet, spaces: list[int], n_source: int) -> None:
    """auto: commit the changes, or turn the incremental spaces into full rewrites (`backfill_plan.auto_choice`:
    the cost model over rows, changed ids, spaces, dimension and the output's deletion vectors and files),
    logged with both estimates."""
    deletion_vectors, n_files = output_layout(at.spark, at.out, at.cfg.object_store_options or None)
    choice, why = auto_choice(n_source, len(spaces), at.plan.kernel.dim_in, changes.upserts + changes.deletes,
                              deletion_vectors, n_files / max(1, len(at.state.spaces)),
                              at.cfg.backfill.incremental_max_fraction, replace=at.replace_blocker is None)
    if choice == INCREMENTAL:
        log.info("backfill: auto: spaces %s incremental: %s", spaces, why)
        return
    for j in spaces:
        at.actions[j] = (FULL, why)
    log.info("backfill: auto: spaces %s rewritten in full: %s", spaces, why)


def _good(plan: BackfillPlan):
    from pyspark.sql import functions as F

    return F.col("id").isNotNull() & validity_filter(plan.kernel.dim_in)


def _bad_rows(df, plan: BackfillPlan):
    """Unusable rows (null id, null/short/long/non-finite vector) with the reason, for the quarantine table."""
    from pyspark.sql import functions as F

    null_ids = df.where(F.col("id").isNull()).select(
        "id", "vector", F.lit(plan.source_version).cast("int").alias("source_version"),
        F.lit("null id").alias("reason"), F.current_timestamp().alias("quarantined_at"))
    return quarantine_rows(df.where(F.col("id").isNotNull()), plan.source_version, plan.kernel.dim_in) \
        .unionByName(null_ids)


def _quarantine_current(spark, location: str, lineage: Optional[dict]) -> bool:
    """True when the quarantine table already reflects the source Delta version the output holds."""
    q = quarantine_state(spark, location)
    if lineage is None or q is None:
        return lineage is None
    return q.get("source_delta_version") == (lineage.get("source") or {}).get("delta_version")


def _write_full_quarantine(spark, cfg: JobConfig, source: VersionRead, plan: BackfillPlan, run_id: str) -> int:
    """Replace this source version's quarantine rows with the bad rows of the pinned source (one commit)."""
    loc = cfg.backfill.quarantine_location
    bad = _bad_rows(source.df, plan)
    meta = {"bcemb": "quarantine", "run_id": run_id, "source_version": plan.source_version,
            "source_delta_version": source.delta_version, "source_location": source.location}
    write_quarantine(spark, bad, loc, plan.source_version, meta)
    from bclib.tables.output import quarantine_count

    n = quarantine_count(spark, loc, plan.source_version)
    log.info("backfill: %d unusable row(s) of version %d (Delta v%d) in quarantine %s", n, plan.source_version,
             source.delta_version, loc)
    return n


def _upserts_and_deletes(changes, plan: BackfillPlan, quarantine: bool):
    """The change set split: (the upserted ids' output rows in every space of `plan`, the deleted ids' change
    rows). With a quarantine, an upserted row that became unusable is a delete (a full rewrite would not hold it)."""
    from pyspark.sql import functions as F

    upserts = changes.where(F.col("_op") == F.lit("upsert"))
    deletes = changes.where(F.col("_op") == F.lit("delete"))
    if quarantine:
        deletes = deletes.unionByName(upserts.where(~_good(plan)))
        upserts = upserts.where(_good(plan))
    return upserts.select("id", "vector").transform(to_spaces(plan)), deletes


def _each_space(plan: BackfillPlan):
    """A column exploding each row into one per space of `plan` (the space's number)."""
    from pyspark.sql import functions as F

    return F.explode(F.array(*[F.lit(int(s)) for s in plan.spaces]))


def _change_rows(changes, plan: BackfillPlan, quarantine: bool):
    """The MERGE source: transformed upserts per space, and a delete per space for deleted (or now bad) ids."""
    from pyspark.sql import functions as F

    transformed, deletes = _upserts_and_deletes(changes, plan, quarantine)
    removed = deletes.select(
        "id", F.lit(None).cast("array<float>").alias("vector"), _each_space(plan).alias("space_version"),
        F.lit(plan.source_version).cast("int").alias("source_version"), F.lit(None).cast("string").alias("chain_id"),
        F.current_timestamp().alias("produced_at"), F.lit("delete").alias("_op"))
    return transformed.withColumn("_op", F.lit("upsert")).unionByName(removed)


def _shrink_guard(cfg: JobConfig, spaces: list[int], current: dict[int, int], new_rows: int, allow: bool,
                  what: str) -> None:
    for j in spaces:
        before = current.get(j, 0)
        if before and new_rows < (1 - cfg.backfill.max_shrink) * before and not allow:
            raise ShrinkGuardError(
                f"space {j} would shrink from {before} to {new_rows} rows (-{1 - new_rows / before:.1%}, more than "
                f"backfill.max_shrink = {cfg.backfill.max_shrink:.0%}) by this {what}; nothing was written. "
                "If the source really lost those rows, run with --allow-shrink")


def create_space_views(spark, output_name: str, spaces: list[int]) -> list[str]:
    """For a catalog output table, `<output>_space_<j>` views (id, vector of one space); returns their names."""
    from bclib.tables.delta import quoted_identifier

    names = []
    for j in spaces:
        view = f"{output_name}_space_{int(j)}"
        spark.sql(f"CREATE OR REPLACE VIEW {quoted_identifier(view)} AS SELECT id, vector FROM "
                  f"{quoted_identifier(output_name)} WHERE space_version = {int(j)}")
        names.append(view)
    log.info("backfill: views %s", names)
    return names
