"""The two engines of a full rewrite, and the choice between them.

    choose_engine(cfg, source, out, held)  spark | arrow, and why (`backfill.engine`; auto falls back to spark)
    arrow_blockers(cfg, source, out)       why the arrow engine cannot serve this backfill (empty: it can)
    to_spaces(plan)                        DataFrame(id, vector) -> output rows, mapInArrow (the spark engine, and
                                           the incremental commit's rows)
    write_full_spark(...)                  the spark engine: one replaceWhere commit through Delta's writer
    write_full_arrow(...)                  the arrow engine: executors read row groups and write Parquet with
                                           pyarrow; one delta-rs commit after the commit rule

Both engines transform with the same kernel (`bclib.numerics.kernel.make_batch_fn`) and commit the same
lineage and transaction id; the choice never changes what the output holds.
"""

from __future__ import annotations

import json
import logging
from typing import Callable, Optional, Sequence

from bclib.config import JobConfig
from bclib.errors import one_line, reraise_executor_errors
from bclib.numerics.kernel import arrow_batch_rows, make_batch_fn
from bclib.spark import backfill_write_conf, default_parallelism, max_partition_num, session_conf
from bclib.tables.delta import is_path
from bclib.tables.embeddings import VersionRead
from bclib.tables.output import OutputState, write_full
from bclib.steps.backfill_plan import BackfillPlan
from bclib.tables.retention import retention_properties

log = logging.getLogger(__name__)


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


def batch_rows_for(cfg: JobConfig, plan: BackfillPlan) -> int:
    """Rows per Arrow batch through the kernel: `backfill.arrow_batch_rows`, else sized from the plan's dims to
    about `backfill.target_batch_mb` (`kernel.arrow_batch_rows`)."""
    b = cfg.backfill
    return b.arrow_batch_rows or arrow_batch_rows(plan.kernel.dim_in, plan.dims_out, b.target_batch_mb)


def write_full_spark(spark, cfg: JobConfig, plan: BackfillPlan, df, out_location: str, lineage: dict,
                     txn: tuple[str, int], base: OutputState, batch_rows: int, file_rows: int,
                     n_rows: int = 0) -> Optional[int]:
    """The spark engine: `df` (id, vector: the validated source rows) through `to_spaces(plan)` on the executors,
    one replaceWhere commit of `plan.spaces` (`tables.output.write_full`). Returns the rows written, None when
    Delta skipped the commit (its transaction id already recorded). Raises what `write_full` raises
    (ConcurrentCommitError, ...) and executor errors as bclib's named errors (`reraise_executor_errors`).

    Each input partition writes its own file per space, so the scan's partitions are capped by the output's
    bytes (`max_partition_num`: `n_rows` source rows at `file_rows` rows per output file) whatever the source's
    file layout; `backfill.output_partitions` (a repartition) overrides."""
    src = df.repartition(cfg.backfill.output_partitions) if cfg.backfill.output_partitions else df
    conf = backfill_write_conf(batch_rows, len(plan.spaces))
    if n_rows and not cfg.backfill.output_partitions:
        conf["spark.sql.files.maxPartitionNum"] = str(max_partition_num(n_rows, file_rows,
                                                                        default_parallelism(spark)))
    with session_conf(spark, conf), reraise_executor_errors():
        return write_full(spark, src.transform(to_spaces(plan)), out_location, plan.spaces, lineage, file_rows, txn,
                          base.delta_version if base.exists else None, retention_properties(cfg))


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

    opts = cfg.object_store_options or None
    try:
        src = delta_rs.open_table(source.location, source.delta_version, opts)
        reasons = delta_rs.source_blockers(src) + source_layout_blockers(cfg, src)
        filesystem_and_path(out_location, opts)
        if delta_rs_table_exists(out_location, opts):
            reasons += delta_rs.target_blockers(delta_rs.open_table(out_location, storage_options=opts))
    except (OSError, ValueError, DeltaError, TableNotFoundError) as exc:  # a filesystem or table they cannot open
        return [f"pyarrow/delta-rs cannot open the tables ({type(exc).__name__}: {one_line(exc, 200)})"]
    return reasons


def source_layout_blockers(cfg: JobConfig, src) -> list[str]:
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


def arrow_id_type(df):
    """The output's Arrow id type: the id rule's read type (int64 or string; `bclib.tables.ids`)."""
    from bclib.tables.ids import arrow_output_type

    return arrow_output_type(df.schema["id"].dataType)


def run_tasks(spark, texts: list[str], fn) -> list[str]:
    """Run `fn` (an iterator of task texts -> an iterator of result texts) once per task on the executors, one
    Spark task per text, and collect the results in task order.

    `spark.range(n, numPartitions=n).mapInArrow`: no RDD, so it runs the same on a classic session and on Spark
    Connect (the texts travel inside the function, each task picks its own by index)."""
    import pyarrow as pa

    if not texts:
        return []
    tasks = list(texts)

    def per_partition(batches):
        for batch in batches:
            for index in batch.column(0).to_pylist():
                out = list(fn(iter([tasks[index]])))
                yield pa.RecordBatch.from_arrays([pa.array([index] * len(out), pa.int64()),
                                                  pa.array(out, pa.string())], names=["task", "result"])

    rows = (spark.range(0, len(tasks), numPartitions=len(tasks))
            .mapInArrow(per_partition, "task bigint, result string").collect())
    return [r.result for r in sorted(rows, key=lambda r: r.task)]


def write_full_arrow(spark, cfg: JobConfig, plan: BackfillPlan, source: VersionRead, out_location: str,
                      lineage: dict, txn: tuple[str, int], base: OutputState, drop_invalid: bool,
                      file_rows: int) -> Optional[int]:
    """The arrow engine: executors read row groups and write Parquet with pyarrow; one delta-rs commit.
    Returns the rows written, None when the commit was skipped (its transaction id already recorded)."""
    from datetime import datetime, timezone

    from bclib.tables import delta_rs
    from bclib.tables.parquet_files import make_task_fn, plan_tasks

    from bclib.tables.commits import BEFORE_COMMIT, check_commit, run_seams

    opts = cfg.object_store_options or None
    src = delta_rs.open_table(source.location, source.delta_version, opts)
    tasks = plan_tasks(delta_rs.snapshot_files(src), cfg.backfill.arrow_task_mb * 2**20, opts,
                       parallelism=default_parallelism(spark))
    produced_at = int(datetime.now(timezone.utc).timestamp() * 1_000_000)
    emb = cfg.embeddings
    root = delta_rs.table_uri(out_location)
    batch_rows = batch_rows_for(cfg, plan)
    fn = make_task_fn(plan.kernel, plan.chain_ids, plan.source_version, produced_at, root, emb.id_column,
                      emb.vector_column, emb.version_column, source.version, drop_invalid, file_rows, opts,
                      batch_rows, emb.vector_encoding)
    log.info("backfill: arrow engine: %d task(s) over %d row groups of Delta v%d", len(tasks),
             sum(len(g) for t in tasks for _, g in t.parts), source.delta_version)
    texts = [t.to_json() for t in tasks]
    with reraise_executor_errors():  # an executor's or the commit's failure as bclib's named error
        adds = [json.loads(a) for a in run_tasks(spark, texts, fn)]
        # the commit rule, then one delta-rs commit against exactly the version checked (no retry of its own);
        # a new output is created by that commit, only now that every task succeeded
        checked = check_commit(spark, out_location, base.delta_version if base.exists else None, plan.spaces,
                               f"arrow full rewrite of spaces {plan.spaces}")
        run_seams(BEFORE_COMMIT, out_location, checked)
        meta = json.dumps(lineage, sort_keys=True)
        if not base.exists:
            delta_rs.create_output_with_files(out_location, arrow_id_type(source.df), adds, meta, txn, opts,
                                              retention_properties(cfg))
            committed = True
        else:
            committed = delta_rs.commit_replace(out_location, checked, adds, plan.spaces, meta, txn, opts)
        return sum(int(a["rows"]) for a in adds) if committed else None
