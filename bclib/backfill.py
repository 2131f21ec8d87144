"""The backfill: the executor kernel (mapInArrow) and the one-commit Delta write.

Driver side: read the active chains from the registry, collapse them into a
MultiSpaceKernel (one GEMM for all target spaces when every chain is
linear), and return a pure function Arrow batches -> Arrow batches that the
executors run. Executor side: zero-copy list<float> -> (rows, d) float32,
vectorised validation, the kernel, and list<float> back with int32 offsets.
The output is written once per run, all spaces in one Delta commit that
replaces exactly the spaces this run owns, with lineage in userMetadata.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np
import pyarrow as pa

from bclib.config import JobConfig
from bclib.errors import DimensionMismatchError
from bclib.io import delta_table, is_path, list_to_matrix, matrix_to_list, read_embedding_version, table_exists
from bclib.registry import TransformRecord, active_transforms, chain_id, chain_records
from bclib.transforms import MultiSpaceKernel

log = logging.getLogger(__name__)

BatchFn = Callable[[Iterator[pa.RecordBatch]], Iterator[pa.RecordBatch]]


# --------------------------------------------------------------------------- executor side (pure)


def make_batch_fn(kernel: MultiSpaceKernel, check_finite: bool = True) -> BatchFn:
    """The function executors run: (id, vector) batches -> (id, vector, space_version) batches."""
    spaces = list(kernel.spaces)

    def backfill_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for batch in batches:
            if batch.num_rows == 0:
                continue
            ids = batch.column(0)
            x = list_to_matrix(batch.column(1), kernel.dim_in, ids, column="vector", check_finite=check_finite)
            outputs = kernel(x)
            for space in spaces:
                space_col = pa.array(np.full(batch.num_rows, space, dtype=np.int32))
                yield pa.RecordBatch.from_arrays(
                    [ids, matrix_to_list(outputs[space]), space_col], names=["id", "vector", "space_version"]
                )

    return backfill_batches


def arrow_batch_rows(dim_in: int, dims_out: list[int], target_mb: int) -> int:
    """Rows per Arrow batch so one batch's input plus outputs is about `target_mb` MiB."""
    bytes_per_row = 4 * (dim_in + sum(dims_out)) + 16 * (1 + len(dims_out))
    return int(np.clip(target_mb * 2**20 // bytes_per_row, 1024, 200_000))


# --------------------------------------------------------------------------- driver side


@dataclass(frozen=True)
class BackfillPlan:
    """Everything the write needs, decided on the driver."""

    source_version: int
    spaces: list[int]
    chains: dict[int, list[TransformRecord]]
    kernel: MultiSpaceKernel

    @property
    def chain_ids(self) -> dict[int, str]:
        return {s: chain_id(c) for s, c in self.chains.items()}


def plan_backfill(spark, cfg: JobConfig) -> BackfillPlan:
    """Load and verify the active chains from the registry; build the kernel."""
    active = active_transforms(spark, cfg.registry_location)
    source = cfg.source_version
    chains = {s: chain_records(active, cfg.embeddings.versions, source, s) for s in cfg.target_spaces}
    dim_in = chains[max(chains)][0].transform.dim_in
    kernel = MultiSpaceKernel(dim_in, {s: [r.transform for r in c] for s, c in chains.items()})
    return BackfillPlan(source, sorted(chains), chains, kernel)


def _lineage(plan: BackfillPlan, location: str, delta_version: int, run_id: str) -> dict:
    return {
        "bcemb": "backfill",
        "run_id": run_id,
        "source": {"location": location, "version": plan.source_version, "delta_version": delta_version},
        "spaces": {
            str(s): {
                "chain_id": plan.chain_ids[s],
                "transforms": [{"id": r.transform_id, "checksum": _record_checksum(r)} for r in plan.chains[s]],
            }
            for s in plan.spaces
        },
    }


def _record_checksum(record: TransformRecord) -> str:
    from bclib.transforms import checksum

    return checksum(record.parameters)


def last_lineage(spark, location: str) -> Optional[dict]:
    """userMetadata of the newest bcemb backfill commit on the output table, if any."""
    if not table_exists(spark, location):
        return None
    for row in delta_table(spark, location).history(50).select("userMetadata").collect():
        if row.userMetadata:
            try:
                meta = json.loads(row.userMetadata)
            except json.JSONDecodeError:
                continue
            if meta.get("bcemb") == "backfill":
                return meta
    return None


def _same_lineage(a: Optional[dict], b: dict) -> bool:
    return a is not None and a.get("source") == b["source"] and a.get("spaces") == b["spaces"]


def validity_filter(dim: int):
    """Spark SQL predicate for a usable vector: not null, right length, no null/NaN/Inf element."""
    from pyspark.sql import functions as F

    return (
        F.col("vector").isNotNull()
        & (F.size("vector") == F.lit(dim))
        & F.forall("vector", lambda x: x.isNotNull() & ~F.isnan(x) & (F.abs(x) != F.lit(float("inf"))))
    )


def run_backfill(spark, cfg: JobConfig, run_id: Optional[str] = None) -> dict:
    """Rewrite the source version into every target space in one pass and one Delta commit."""
    from pyspark.sql import functions as F

    started = time.time()
    run_id = run_id or uuid.uuid4().hex[:12]
    plan = plan_backfill(spark, cfg)
    source = read_embedding_version(spark, cfg, plan.source_version)
    lineage = _lineage(plan, source.location, source.delta_version, run_id)
    out_location = cfg.output_location
    if not cfg.backfill.force and _same_lineage(last_lineage(spark, out_location), lineage):
        log.info("backfill: %s already holds version %d (Delta v%d) in spaces %s with the same chains; "
                 "nothing to do (backfill.force rewrites)", out_location, plan.source_version,
                 source.delta_version, plan.spaces)
        return {"run_id": run_id, "skipped": True, "rows": 0, "spaces": plan.spaces}
    first = source.df.select(F.size("vector").alias("n"), "id").where(F.col("vector").isNotNull()).first()
    if first is not None and first.n != plan.kernel.dim_in and cfg.backfill.quarantine_location is None:
        raise DimensionMismatchError(
            f"version {plan.source_version} at '{source.location}': id={first.id!r} has {first.n} elements but "
            f"the active transform {plan.source_version} -> {plan.spaces[-1]} expects dimension {plan.kernel.dim_in}"
        )
    df = source.df
    if cfg.backfill.quarantine_location:
        df = _quarantine(spark, cfg, df, plan)
    dims_out = [plan.kernel.dims[s] for s in plan.spaces]
    batch_rows = cfg.backfill.arrow_batch_rows or arrow_batch_rows(plan.kernel.dim_in, dims_out,
                                                                   cfg.backfill.target_batch_mb)
    session_conf = {
        "spark.sql.execution.arrow.maxRecordsPerBatch": str(batch_rows),
        # one open Parquet writer per space per task instead of a local sort by space_version
        "spark.sql.maxConcurrentOutputFileWriters": str(len(plan.spaces) + 1),
    }
    if cfg.backfill.output_partitions:
        df = df.repartition(cfg.backfill.output_partitions)
    id_type = df.schema["id"].dataType.simpleString()
    chain_map = F.create_map(*[x for s in plan.spaces for x in (F.lit(s), F.lit(plan.chain_ids[s]))])
    out = (
        df.mapInArrow(make_batch_fn(plan.kernel), f"id {id_type}, vector array<float>, space_version int")
        .withColumn("source_version", F.lit(plan.source_version).cast("int"))
        .withColumn("chain_id", F.element_at(chain_map, F.col("space_version")))
        .withColumn("produced_at", F.current_timestamp())
    )
    spaces_sql = ", ".join(str(s) for s in plan.spaces)
    out_row_bytes = 4 * max(dims_out) + 48  # vector plus id, space, chain id, timestamp
    writer = (
        out.write.format("delta").mode("overwrite")
        .option("maxRecordsPerFile", max(10_000, cfg.backfill.target_file_mb * 2**20 // out_row_bytes))
        .option("replaceWhere", f"space_version IN ({spaces_sql})")
        .option("userMetadata", json.dumps(lineage, sort_keys=True))
        .partitionBy("space_version")
    )
    log.info("backfill: version %d (Delta v%d, dim %d) -> spaces %s (%s kernel, %d rows/Arrow batch) into %s",
             plan.source_version, source.delta_version, plan.kernel.dim_in, plan.spaces,
             "fused one-GEMM" if plan.kernel.fused else "sequential", batch_rows, out_location)
    write_started = time.time()
    with _session_conf(spark, session_conf):
        writer.save(out_location) if is_path(out_location) else writer.saveAsTable(out_location)
    write_seconds = time.time() - write_started
    metrics = delta_table(spark, out_location).history(1).select("operationMetrics").first()[0] or {}
    rows = int(metrics.get("numOutputRows", 0))
    seconds = time.time() - started
    log.info("backfill: wrote %d rows (%d per space x %d spaces) in one commit in %.1fs",
             rows, rows // max(len(plan.spaces), 1), len(plan.spaces), seconds)
    return {"run_id": run_id, "skipped": False, "rows": rows, "spaces": plan.spaces, "seconds": seconds,
            "write_seconds": write_seconds}


@contextmanager
def _session_conf(spark, settings: dict[str, str]):
    """Set SQL confs for one write and restore the caller's values afterwards."""
    previous = {k: spark.conf.get(k, None) for k in settings}
    for key, value in settings.items():
        spark.conf.set(key, value)
    try:
        yield
    finally:
        for key, value in previous.items():
            spark.conf.unset(key) if value is None else spark.conf.set(key, value)


def _quarantine(spark, cfg: JobConfig, df, plan: BackfillPlan):
    """Write unusable rows to the quarantine table (replacing this source's earlier ones); return the rest."""
    from pyspark.sql import functions as F

    valid = validity_filter(plan.kernel.dim_in)
    bad = df.where(~F.coalesce(valid, F.lit(False))).select(
        "id", "vector", F.lit(plan.source_version).cast("int").alias("source_version"),
        F.when(F.col("vector").isNull(), "null vector")
        .when(F.size("vector") != plan.kernel.dim_in,
              F.concat(F.lit("expected dimension %d, found " % plan.kernel.dim_in), F.size("vector").cast("string")))
        .otherwise("null, NaN or Inf element").alias("reason"),
        F.current_timestamp().alias("quarantined_at"),
    )
    writer = (bad.write.format("delta").mode("overwrite")
              .option("replaceWhere", f"source_version = {plan.source_version}").partitionBy("source_version"))
    loc = cfg.backfill.quarantine_location
    writer.save(loc) if is_path(loc) else writer.saveAsTable(loc)
    n_bad = read_quarantine_count(spark, loc, plan.source_version)
    log.info("backfill: %d unusable row(s) of version %d quarantined in %s", n_bad, plan.source_version, loc)
    return df.where(valid)


def read_quarantine_count(spark, location: str, source_version: int) -> int:
    from bclib.io import read_delta

    return read_delta(spark, location).where(f"source_version = {int(source_version)}").count()
