"""The backfill step: decide per space, gate, transform on the executors, commit exactly once.

    plan_backfill(spark, cfg)        registry -> verified chains -> MultiSpaceKernel (driver)
    decide(state, desired, ...)      per space: skip (up to date) | incremental (source changed) | full
    run_gate(...)                    spaces whose chain changed are measured first (steps/gate.py)
    make_batch_fn(kernel)            the pure function executors run (bclib.numerics.kernel)
    df.transform(to_spaces(plan))    DataFrame(id, vector) -> DataFrame(output schema), mapInArrow
    write_full / merge_changes       one Delta commit each, lineage + transaction id (tables/output.py)

A space is up to date when the output's last bcemb commit (VACUUM, OPTIMIZE and property changes after
it are looked through) says it holds the current source Delta version
through the current chain; then nothing is read or written. Only the source changed: the change data
feed between the two Delta versions is transformed and MERGEd (`backfill.incremental`). Otherwise the
space is rewritten (replaceWhere). Side tables (quarantine, gate verdicts) are written after the output
commit, so a failed run changes no table; a rerun converges.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from bclib.config import JobConfig
from bclib.errors import DimensionMismatchError, EmptySourceError, IncrementalUnavailableError, NullIdError, \
    ShrinkGuardError, reraise_executor_errors
from bclib.numerics.kernel import MultiSpaceKernel, arrow_batch_rows, make_batch_fn
from bclib.numerics.records import TransformRecord, chain_id, chain_records
from bclib.spark import backfill_write_conf, session_conf
from bclib.steps.gate import GateResult, raise_if_rejected, record_verdicts, run_gate
from bclib.tables.changes import ChangesUnavailable, read_changes
from bclib.tables.delta import is_path, retry_on_conflict
from bclib.tables.embeddings import VersionRead, check_unique_ids, read_embedding_version
from bclib.tables.output import OutputState, check_output_schema, create_output, merge_changes, others_with_values, \
    output_layout, quarantine_rows, quarantine_state, read_output_state, remove_orphan_part_files, space_rows, \
    space_state, validity_filter, write_full, write_quarantine
from bclib.tables.lease import leased
from bclib.tables.retention import retention_properties
from bclib.tables.registry import active_transforms

log = logging.getLogger(__name__)

SKIP, INCREMENTAL, FULL = "skip", "incremental", "full"


@dataclass(frozen=True)
class BackfillPlan:
    """Everything the write needs, decided on the driver: the source version, the spaces and their chains."""

    source_version: int
    spaces: list[int]
    chains: dict[int, list[TransformRecord]]
    kernel: MultiSpaceKernel

    @property
    def chain_ids(self) -> dict[int, str]:
        return {s: chain_id(c) for s, c in self.chains.items()}

    @property
    def dims_out(self) -> list[int]:
        return [self.kernel.dims[s] for s in self.spaces]

    def restricted(self, spaces: list[int]) -> "BackfillPlan":
        """The same plan for a subset of its spaces (its own fused kernel)."""
        chains = {s: self.chains[s] for s in spaces}
        kernel = MultiSpaceKernel(self.kernel.dim_in, {s: [r.transform for r in c] for s, c in chains.items()})
        return BackfillPlan(self.source_version, sorted(spaces), chains, kernel)


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


def plan_backfill(spark, cfg: JobConfig) -> BackfillPlan:
    """Load and verify the active chains from the registry; build the kernel."""
    active = active_transforms(spark, cfg.registry_location)
    source = cfg.source_version
    chains = {s: chain_records(active, cfg.embeddings.versions, source, s) for s in cfg.target_spaces}
    dim_in = chains[max(chains)][0].transform.dim_in
    kernel = MultiSpaceKernel(dim_in, {s: [r.transform for r in c] for s, c in chains.items()})
    return BackfillPlan(source, sorted(chains), chains, kernel)


def to_spaces(plan: BackfillPlan) -> Callable:
    """DataFrame(id, vector) -> DataFrame(id, vector, space_version, source_version, chain_id, produced_at).

    The executors run `make_batch_fn(plan.kernel)` through `mapInArrow`; use as `df.transform(to_spaces(plan))`.
    """
    from pyspark.sql import functions as F

    batch_fn = make_batch_fn(plan.kernel)
    chain_map = F.create_map(*[x for s in plan.spaces for x in (F.lit(s), F.lit(plan.chain_ids[s]))])

    def transform(df):
        id_type = df.schema["id"].dataType.simpleString()
        return (
            df.select("id", "vector").mapInArrow(batch_fn, f"id {id_type}, vector array<float>, space_version int")
            .withColumn("source_version", F.lit(plan.source_version).cast("int"))
            .withColumn("chain_id", F.element_at(chain_map, F.col("space_version")))
            .withColumn("produced_at", F.current_timestamp())
        )

    return transform


def decide(state: OutputState, desired: dict[int, dict], incremental: str, force: bool) -> dict[int, tuple[str, str]]:
    """Per space: (skip | incremental | full, why). Pure: the output's state against what it should hold."""
    out = {}
    for j, want in sorted(desired.items()):
        cur = state.space(j)
        if not state.exists:
            out[j] = (FULL, "the output table does not exist yet")
        elif state.foreign:
            out[j] = (FULL, f"the output's last commit that changed rows ({state.operation or 'unknown'}; table "
                            f"at Delta v{state.delta_version}) was not written by bcemb")
        elif cur is None:
            out[j] = (FULL, "the space is not in the output yet")
        elif force:
            out[j] = (FULL, "backfill.force")
        elif cur == want:
            out[j] = (SKIP, f"up to date (source Delta v{want['source_delta_version']}, chain {want['chain_id']})")
        elif cur.get("chain_id") != want["chain_id"] or cur.get("transforms") != want["transforms"]:
            out[j] = (FULL, f"chain changed: {cur.get('chain_id')} -> {want['chain_id']}")
        elif (cur.get("source_location"), cur.get("source_version")) != (want["source_location"], want["source_version"]):
            out[j] = (FULL, f"source changed: version {cur.get('source_version')} -> {want['source_version']}")
        elif int(cur.get("source_delta_version", -1)) > want["source_delta_version"]:
            out[j] = (FULL, f"the source table went back from Delta v{cur['source_delta_version']} to "
                            f"v{want['source_delta_version']}")
        elif incremental == "off":
            out[j] = (FULL, "source changed and backfill.incremental is off")
        else:
            out[j] = (INCREMENTAL, f"source Delta v{cur['source_delta_version']} -> v{want['source_delta_version']}")
    return out


def _txn(location: str, mode: str, plan: BackfillPlan, state: OutputState, delta_version: int) -> tuple[str, int]:
    """Delta transaction id of one commit: (app id of output + spaces + chains + base version, source version)."""
    key = json.dumps([location, mode, plan.spaces, plan.chain_ids, state.delta_version], sort_keys=True, default=str)
    return "bcemb-" + hashlib.sha256(key.encode()).hexdigest()[:32], int(delta_version)


def _check_dimension(source: VersionRead, plan: BackfillPlan, probe_rows: int = 10_000) -> None:
    """Before any write: the first `probe_rows` rows' dimension against the registry's (majority, not first row)."""
    from pyspark.sql import functions as F

    sizes = (source.df.limit(probe_rows).where(F.col("vector").isNotNull())
             .groupBy(F.size("vector").alias("n")).count().collect())
    if not sizes:
        return
    majority = max(sizes, key=lambda r: r["count"])
    if majority.n != plan.kernel.dim_in:
        total = sum(r["count"] for r in sizes)
        raise DimensionMismatchError(
            f"version {plan.source_version} at '{source.location}': {majority['count']} of the first {total} vectors "
            f"have {majority.n} elements but the active transform {plan.source_version} -> {plan.spaces[-1]} expects "
            f"dimension {plan.kernel.dim_in}; the table's vectors changed dimension: register a transform for the "
            "new model (`bcemb fit --refit`) or point embeddings.location at the right table"
        )


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
    started = time.time()
    out_location = cfg.output_location
    plan = plan_backfill(spark, cfg)
    source = read_embedding_version(spark, cfg, plan.source_version)
    state = read_output_state(spark, out_location)
    if state.exists:
        check_output_schema(spark, out_location, source.df.schema["id"].dataType.simpleString())
    desired = {j: space_state(source.location, plan.source_version, source.delta_version, plan.chains[j])
               for j in plan.spaces}
    actions = decide(state, desired, cfg.backfill.incremental, cfg.backfill.force)
    for j, (action, why) in actions.items():
        log.info("backfill: space %d: %s (%s)", j, action, why)
    result = BackfillResult(run_id, False, 0, plan.spaces, actions, source_delta_version=source.delta_version)
    quarantine = cfg.backfill.quarantine_location
    if dry_run:
        result.dry_run = True
        return result
    if all(a == SKIP for a, _ in actions.values()):
        if quarantine and not _quarantine_current(spark, quarantine, state.lineage):
            _write_full_quarantine(spark, cfg, source, plan, run_id)
            result.commits = 1
        result.skipped = True
        result.seconds = time.time() - started
        log.info("backfill: %s already holds version %d (Delta v%d) in spaces %s through the same chains; "
                 "nothing to do (backfill.force rewrites)", out_location, plan.source_version,
                 source.delta_version, plan.spaces)
        return result

    _check_dimension(source, plan)
    # the gate: every space whose chain is new to the output is measured before anything is written
    gated = {j: plan.chains[j] for j, (a, _) in actions.items()
             if a != SKIP and (state.space(j) or {}).get("chain_id") != plan.chain_ids[j]} if cfg.gate.enabled else {}
    if gated:
        result.gate = run_gate(spark, cfg, plan.source_version, gated)
        if result.gate.rejected and cfg.gate.enforce:
            record_verdicts(spark, cfg, run_id, result.gate)  # the verdict is the only thing this run writes
        raise_if_rejected(result.gate)  # GateRejectedError when enforced; otherwise logs and goes on
        for j, why in sorted(result.gate.unreadable.items()):  # one space's trouble stays with that space
            actions[j] = (SKIP, f"not published: version {j}'s table cannot be read for the gate ({why})")
            result.unreadable[j] = why
        if all(a == SKIP for a, _ in actions.values()):
            record_verdicts(spark, cfg, run_id, result.gate)
            result.seconds = time.time() - started
            log.warning("backfill: nothing published: every space to write has an unreadable version table")
            return result

    n_source = source.df.count()
    if n_source == 0:
        raise EmptySourceError(f"version {plan.source_version} at '{source.location}' (Delta v{source.delta_version}) "
                               "has no rows; nothing was written (an empty source never replaces published spaces)")
    changes = None
    incremental = [j for j, (a, _) in actions.items() if a == INCREMENTAL]
    if incremental:
        changes = _changes_or_fallback(spark, cfg, source, state, incremental, actions, n_source)
        if changes is not None and cfg.backfill.incremental == "auto":
            _full_if_merge_rewrites_most_files(spark, out_location, state, changes, incremental, actions)
            if not any(actions[j][0] == INCREMENTAL for j in incremental):
                changes = None
    full = [j for j, (a, _) in actions.items() if a == FULL]
    incremental = [j for j, (a, _) in actions.items() if a == INCREMENTAL]
    current_rows = space_rows(spark, out_location) if state.exists else {}

    # validation before any write: ids, dimension, quarantine count, shrink guard
    bad = None
    df = source.df
    if quarantine:
        bad = _bad_rows(df, plan)
        df = df.where(_good(plan))
    if full:
        check_unique_ids(df, source.location, plan.source_version)
        n_bad = bad.count() if bad is not None else 0
        result.quarantined = n_bad
        if n_bad == n_source:
            raise EmptySourceError(f"version {plan.source_version} at '{source.location}': all {n_source} rows are "
                                   f"unusable (see the quarantine reasons); nothing was written")
        _shrink_guard(cfg, full, current_rows, n_source - n_bad, allow_shrink, "rewrite")
    if incremental:
        upserts = changes.df.where("_op = 'upsert'")
        check_unique_ids(df, source.location, plan.source_version, only_ids=upserts)
        if not quarantine and changes.df.where("id IS NULL").limit(1).count():
            raise NullIdError(f"version {plan.source_version} at '{source.location}': the changes since Delta "
                              f"v{changes.from_delta_version - 1} hold rows with a null id")
        for j in incremental:
            if current_rows.get(j, 0) and changes.deletes > cfg.backfill.max_shrink * current_rows[j] \
                    and not allow_shrink:
                raise ShrinkGuardError(
                    f"space {j} would lose up to {changes.deletes} of its {current_rows[j]} rows "
                    f"(> backfill.max_shrink = {cfg.backfill.max_shrink:.0%}) from deletes in version "
                    f"{plan.source_version}'s changes; nothing was written. If intended, run with --allow-shrink")

    # the commits: full rewrites, then merged changes; each carries the state of every space after it
    spaces_state = dict(state.spaces) if not state.foreign else {}
    written_rows = 0
    write_started = time.time()
    batch_rows = cfg.backfill.arrow_batch_rows or arrow_batch_rows(plan.kernel.dim_in, plan.dims_out,
                                                                   cfg.backfill.target_batch_mb)
    out_row_bytes = 4 * max(plan.dims_out) + 48  # vector plus id, space, chain id, timestamp
    file_rows = max(10_000, cfg.backfill.target_file_mb * 2**20 // out_row_bytes)
    gate_note = {str(v.space): "passed" if v.passed else "rejected (gate.enforce false)"
                 for v in (result.gate.verdicts if result.gate else [])}
    base = state
    if full:  # before anything is written: engine: arrow where it cannot run fails here (EngineUnavailableError)
        held = others_with_values(spark, out_location, full) if state.exists and cfg.backfill.engine != "spark" \
            else []
        result.engine, result.engine_reason = choose_engine(cfg, source, out_location, held)
    if not state.exists:  # a failed or killed first run's leftovers (this run holds the lease)
        remove_orphan_part_files(spark, out_location)
    if not state.exists and cfg.backfill.deletion_vectors:
        create_output(spark, out_location, source.df.schema["id"].dataType.simpleString(), deletion_vectors=True,
                      properties=retention_properties(cfg))
        log.info("backfill: created %s with deletion vectors (backfill.deletion_vectors)", out_location)
        base = read_output_state(spark, out_location)
    if full:
        sub = plan.restricted(full)
        spaces_state.update({str(j): desired[j] for j in full})
        lineage = _lineage(run_id, "full", full, source, None, spaces_state, gate_note, quarantine)
        txn = _txn(out_location, FULL, sub, base, source.delta_version)
        lineage["txn"] = list(txn)
        lineage["engine"] = result.engine
        log.info("backfill: version %d (Delta v%d, dim %d) -> spaces %s (%s kernel): full rewrite, %s engine (%s)",
                 plan.source_version, source.delta_version, plan.kernel.dim_in, full,
                 "fused one-GEMM" if sub.kernel.fused else "sequential", result.engine, result.engine_reason)
        if result.engine == "arrow":
            with reraise_executor_errors():
                n = _write_full_arrow(spark, cfg, sub, source, out_location, lineage, txn, base,
                                      quarantine is not None, file_rows)
        else:
            src = df.repartition(cfg.backfill.output_partitions) if cfg.backfill.output_partitions else df
            with session_conf(spark, backfill_write_conf(batch_rows, len(full))), reraise_executor_errors():
                n = write_full(spark, src.transform(to_spaces(sub)), out_location, full, lineage, file_rows, txn,
                               base.delta_version if base.exists else None, retention_properties(cfg))
        written_rows += n or 0
        result.commits += 0 if n is None else 1  # None: Delta skipped the commit (transaction id recorded)
        base = read_output_state(spark, out_location)
    if incremental:
        sub = plan.restricted(incremental)
        spaces_state.update({str(j): desired[j] for j in incremental})
        lineage = _lineage(run_id, "incremental", incremental, source, changes, spaces_state, gate_note, quarantine)
        txn = _txn(out_location, INCREMENTAL, sub, base, source.delta_version)
        lineage["txn"] = list(txn)
        log.info("backfill: version %d Delta v%d..v%d: %d upserts, %d deletes -> spaces %s (one MERGE)",
                 plan.source_version, changes.from_delta_version, changes.to_delta_version, changes.upserts,
                 changes.deletes, incremental)
        change_rows = _change_rows(changes.df, sub, quarantine is not None)
        with session_conf(spark, backfill_write_conf(batch_rows, len(incremental))), reraise_executor_errors():
            n = merge_changes(spark, change_rows, out_location, incremental, lineage, txn, base.delta_version)
        written_rows += n or 0
        result.commits += 0 if n is None else 1
    result.write_seconds = time.time() - write_started

    # side tables, after the output commit(s): quarantine, gate verdicts, per-space views
    if quarantine:
        if full or not _quarantine_current(spark, quarantine, {"source": {"delta_version": source.delta_version}}):
            result.quarantined = _write_full_quarantine(spark, cfg, source, plan, run_id)
            result.commits += 1
    if result.gate is not None:
        record_verdicts(spark, cfg, run_id, result.gate)
    if not is_path(out_location):
        create_space_views(spark, out_location, plan.spaces)
    result.rows = written_rows
    result.seconds = time.time() - started
    log.info("backfill: %d rows written in %d commit(s) in %.1fs", written_rows, result.commits, result.seconds)
    return result


def arrow_blockers(cfg: JobConfig, source: VersionRead, out_location: str) -> list[str]:
    """Why the arrow engine cannot serve this backfill (empty: it can)."""
    from bclib.tables import delta_rs

    missing = delta_rs.available()
    if missing:
        return [missing]
    if not is_path(source.location) or not is_path(out_location):
        return ["a catalog table name (the arrow engine reads and writes Delta paths)"]
    if cfg.backfill.output_partitions:
        return ["backfill.output_partitions is set (a Spark repartition; the arrow engine writes one file "
                "per task of backfill.arrow_task_mb)"]
    from deltalake.exceptions import DeltaError, TableNotFoundError

    from bclib.tables.parquet_files import filesystem_and_path

    opts = cfg.backfill.storage_options or None
    try:
        src = delta_rs.open_table(source.location, source.delta_version, opts)
        reasons = delta_rs.source_blockers(src) + _source_layout_blockers(cfg, src)
        filesystem_and_path(out_location, opts)
        if delta_rs_table_exists(out_location, opts):
            reasons += delta_rs.target_blockers(delta_rs.open_table(out_location, storage_options=opts))
    except (OSError, ValueError, DeltaError, TableNotFoundError) as exc:  # a filesystem or table they cannot open
        return [f"pyarrow/delta-rs cannot open the tables ({type(exc).__name__}: {exc})"]
    return reasons


def _source_layout_blockers(cfg: JobConfig, src) -> list[str]:
    """Source layouts Spark reads but the arrow engine's raw Parquet reads would get wrong."""
    emb = cfg.embeddings
    wanted = [c for c in (emb.id_column, emb.vector_column, emb.version_column) if c]
    partitioned = [c for c in (src.metadata().partition_columns or []) if c in wanted]
    out = []
    if partitioned:
        out.append(f"the source table is partitioned by {partitioned} (its files do not hold those columns)")
    if emb.version_column:
        types = {f.name: str(f.type) for f in src.schema().fields}
        found = types.get(emb.version_column, "missing")
        if not any(t in found for t in ("integer", "long", "short", "byte")):
            out.append(f"the version column '{emb.version_column}' is {found}, not an integer type (Spark compares "
                       "it with its own casts)")
    return out


def delta_rs_table_exists(location: str, storage_options: Optional[dict]) -> bool:
    from deltalake import DeltaTable

    from bclib.tables import delta_rs

    return DeltaTable.is_deltatable(delta_rs.table_uri(location), storage_options=storage_options)


def choose_engine(cfg: JobConfig, source: VersionRead, out_location: str,
                  others_with_values: Sequence[str] = ()) -> tuple[str, str]:
    """(spark | arrow, why) for a full rewrite; EngineUnavailableError names why `engine: arrow` cannot run.

    `others_with_values`: the output's columns bcemb does not own that hold values in the spaces to rewrite
    (`output.others_with_values`): only the spark engine carries them through."""
    from bclib.errors import EngineUnavailableError

    mode = cfg.backfill.engine
    if mode == "spark":
        return "spark", "backfill.engine: spark"
    reasons = arrow_blockers(cfg, source, out_location)
    if others_with_values:
        reasons.append(f"the output table has column(s) bcemb does not own holding values "
                       f"({', '.join(others_with_values)}): the spark engine carries them through a rewrite, the "
                       "arrow engine would leave them null")
    if not reasons:
        return "arrow", "plain Delta paths that pyarrow reads and delta-rs commits to"
    if mode == "arrow":
        raise EngineUnavailableError("backfill.engine is 'arrow' but " + "; ".join(reasons)
                                     + "; use backfill.engine: auto (or spark)")
    return "spark", "auto: " + "; ".join(reasons)


def _arrow_id_type(df):
    """The output's Arrow id type: the id rule's read type (int64 or string; `bclib.tables.ids`)."""
    from bclib.tables.ids import arrow_output_type

    return arrow_output_type(df.schema["id"].dataType)


def _write_full_arrow(spark, cfg: JobConfig, plan: BackfillPlan, source: VersionRead, out_location: str,
                      lineage: dict, txn: tuple[str, int], base: OutputState, drop_invalid: bool,
                      file_rows: int) -> Optional[int]:
    """The arrow engine: executors read row groups and write Parquet with pyarrow; one delta-rs commit.
    Returns the rows written, None when the commit was skipped (its transaction id already recorded)."""
    from datetime import datetime, timezone

    from bclib.tables import delta_rs
    from bclib.tables.parquet_files import make_task_fn, plan_tasks

    from bclib.tables.commits import BEFORE_COMMIT, check_commit, run_seams

    opts = cfg.backfill.storage_options or None
    src = delta_rs.open_table(source.location, source.delta_version, opts)
    tasks = plan_tasks(delta_rs.snapshot_files(src), cfg.backfill.arrow_task_mb * 2**20, opts)
    produced_at = int(datetime.now(timezone.utc).timestamp() * 1_000_000)
    emb = cfg.embeddings
    root = delta_rs.table_uri(out_location)
    batch_rows = cfg.backfill.arrow_batch_rows or arrow_batch_rows(plan.kernel.dim_in, plan.dims_out,
                                                                   cfg.backfill.target_batch_mb)
    fn = make_task_fn(plan.kernel, plan.chain_ids, plan.source_version, produced_at, root, emb.id_column,
                      emb.vector_column, emb.version_column, source.version, drop_invalid, file_rows, opts,
                      batch_rows, emb.vector_encoding)
    log.info("backfill: arrow engine: %d task(s) over %d row groups of Delta v%d", len(tasks),
             sum(len(g) for t in tasks for _, g in t.parts), source.delta_version)
    texts = [t.to_json() for t in tasks]
    adds = [json.loads(a) for a in (spark.sparkContext.parallelize(texts, len(texts)).mapPartitions(fn).collect()
                                    if texts else [])]
    # the commit rule, then one delta-rs commit against exactly the version checked (no retry of its own);
    # a new output is created by that commit, only now that every task succeeded
    checked = check_commit(spark, out_location, base.delta_version if base.exists else None, plan.spaces,
                           f"arrow full rewrite of spaces {plan.spaces}")
    run_seams(BEFORE_COMMIT, out_location, checked)
    meta = json.dumps(lineage, sort_keys=True)
    if not base.exists:
        delta_rs.create_output_with_files(out_location, _arrow_id_type(source.df), adds, meta, txn, opts,
                                          retention_properties(cfg))
        committed = True
    else:
        committed = delta_rs.commit_replace(out_location, checked, adds, plan.spaces, meta, txn, opts)
    return sum(int(a["rows"]) for a in adds) if committed else None


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
                         actions: dict, n_source: int):
    """The change set for the incremental spaces, or (auto) their actions turned into full rewrites."""
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
    changed = changes.upserts + changes.deletes
    if cfg.backfill.incremental == "auto" and changed > cfg.backfill.incremental_max_fraction * n_source:
        for j in spaces:
            actions[j] = (FULL, f"{changed} changed rows > backfill.incremental_max_fraction of {n_source}: "
                                "a full rewrite is cheaper")
        log.info("backfill: %d changed rows of %d: full rewrite of %s", changed, n_source, spaces)
        return None
    return changes


# auto: rewrite in full when a MERGE into an output without deletion vectors would rewrite more than this
# share of the spaces' files anyway (it would then cost more than a full rewrite: it also joins)
MERGE_MAX_TOUCHED_SHARE = 0.5


def merge_touched_share(changed_ids: int, files: float) -> float:
    """Expected share of `files` equal files holding at least one of `changed_ids` ids spread over them.

    1 - (1 - 1/F)^c ~= 1 - exp(-c / F) (each id falls in one of F files uniformly: ids are not clustered by
    arrival in an embedding table). Pure; F < 1 counts as 1.
    """
    files = max(1.0, float(files))
    return -math.expm1(-max(0, changed_ids) / files)


def _full_if_merge_rewrites_most_files(spark, out_location: str, state: OutputState, changes, spaces: list[int],
                                       actions: dict) -> None:
    """auto: turn incremental spaces into full rewrites when the output has no deletion vectors and the
    changes would touch most of its files (a copy-on-write MERGE rewrites every touched file, and joins)."""
    deletion_vectors, n_files = output_layout(spark, out_location)
    if deletion_vectors:
        return
    per_space = n_files / max(1, len(state.spaces))
    changed = changes.upserts + changes.deletes
    share = merge_touched_share(changed, per_space)
    if share <= MERGE_MAX_TOUCHED_SHARE:
        return
    why = (f"the output has no deletion vectors, so a MERGE would rewrite ~{share:.0%} of the ~{per_space:.0f} "
           f"files per space for {changed} changed ids: a full rewrite is cheaper "
           "(backfill.deletion_vectors: true lets a MERGE cost what changed)")
    for j in spaces:
        actions[j] = (FULL, why)
    log.info("backfill: spaces %s: %s", spaces, why)


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


def _change_rows(changes, plan: BackfillPlan, quarantine: bool):
    """The MERGE source: transformed upserts per space, and a delete per space for deleted (or now bad) ids."""
    from pyspark.sql import functions as F

    upserts = changes.where(F.col("_op") == F.lit("upsert"))
    deletes = changes.where(F.col("_op") == F.lit("delete"))
    if quarantine:  # a row that became unusable leaves the output (a full rewrite would not hold it either)
        deletes = deletes.unionByName(upserts.where(~_good(plan)))
        upserts = upserts.where(_good(plan))
    transformed = upserts.select("id", "vector").transform(to_spaces(plan)).withColumn("_op", F.lit("upsert"))
    spaces = F.explode(F.array(*[F.lit(s) for s in plan.spaces]))
    removed = deletes.select(
        "id", F.lit(None).cast("array<float>").alias("vector"), spaces.alias("space_version"),
        F.lit(plan.source_version).cast("int").alias("source_version"), F.lit(None).cast("string").alias("chain_id"),
        F.current_timestamp().alias("produced_at"), F.lit("delete").alias("_op"))
    return transformed.unionByName(removed)


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
