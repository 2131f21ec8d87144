"""The backfill step: plan on the driver, transform on the executors, one commit.

    plan_backfill(spark, cfg)        registry -> verified chains -> MultiSpaceKernel (driver)
    make_batch_fn(kernel)            the pure function executors run (bclib.numerics.kernel)
    source.df.transform(to_spaces)   DataFrame(id, vector) -> DataFrame(output schema), mapInArrow
    write_spaces(...)                the one Delta commit (bclib.tables.output)
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass, field
from typing import Callable, Optional

from bclib.config import JobConfig
from bclib.errors import DimensionMismatchError, reraise_executor_errors
from bclib.numerics.kernel import MultiSpaceKernel, arrow_batch_rows, make_batch_fn
from bclib.numerics.records import TransformRecord, chain_id, chain_records
from bclib.spark import backfill_write_conf, session_conf
from bclib.tables.embeddings import read_embedding_version
from bclib.tables.output import backfill_lineage, last_lineage, same_lineage, write_quarantine, write_spaces, \
    validity_filter
from bclib.tables.registry import active_transforms

log = logging.getLogger(__name__)


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


@dataclass
class BackfillResult:
    """What `run_backfill` did: rows written (all spaces), the spaces, and whether it had nothing to do."""

    run_id: str
    skipped: bool
    rows: int
    spaces: list[int]
    seconds: float = 0.0
    write_seconds: float = 0.0
    quarantined: int = 0
    details: dict = field(default_factory=dict)

    def summary(self) -> str:
        if self.skipped:
            return f"backfill: nothing to do, spaces {self.spaces} are up to date (run {self.run_id})"
        return (f"backfill: {self.rows} rows into spaces {self.spaces} in one commit in {self.seconds:.1f}s "
                f"(run {self.run_id}" + (f", {self.quarantined} quarantined)" if self.quarantined else ")"))


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
            df.mapInArrow(batch_fn, f"id {id_type}, vector array<float>, space_version int")
            .withColumn("source_version", F.lit(plan.source_version).cast("int"))
            .withColumn("chain_id", F.element_at(chain_map, F.col("space_version")))
            .withColumn("produced_at", F.current_timestamp())
        )

    return transform


def _check_dimension(source, plan: BackfillPlan) -> None:
    """Fail before writing when the source's vectors do not have the chain's input dimension."""
    from pyspark.sql import functions as F

    first = source.df.select(F.size("vector").alias("n"), "id").where(F.col("vector").isNotNull()).first()
    if first is not None and first.n != plan.kernel.dim_in:
        raise DimensionMismatchError(
            f"version {plan.source_version} at '{source.location}': id={first.id!r} has {first.n} elements but "
            f"the active transform {plan.source_version} -> {plan.spaces[-1]} expects dimension {plan.kernel.dim_in}"
        )


def run_backfill(spark, cfg: JobConfig, run_id: Optional[str] = None) -> BackfillResult:
    """Rewrite the source version into every target space in one pass and one Delta commit."""
    started = time.time()
    run_id = run_id or uuid.uuid4().hex[:12]
    plan = plan_backfill(spark, cfg)
    source = read_embedding_version(spark, cfg, plan.source_version)
    lineage = backfill_lineage(source.location, plan.source_version, source.delta_version, plan.chains, run_id)
    out_location = cfg.output_location
    if not cfg.backfill.force and same_lineage(last_lineage(spark, out_location), lineage):
        log.info("backfill: %s already holds version %d (Delta v%d) in spaces %s with the same chains; "
                 "nothing to do (backfill.force rewrites)", out_location, plan.source_version,
                 source.delta_version, plan.spaces)
        return BackfillResult(run_id, True, 0, plan.spaces, time.time() - started)
    df = source.df
    quarantined = 0
    if cfg.backfill.quarantine_location:
        loc = cfg.backfill.quarantine_location
        quarantined = write_quarantine(spark, df, loc, plan.source_version, plan.kernel.dim_in)
        log.info("backfill: %d unusable row(s) of version %d quarantined in %s", quarantined, plan.source_version, loc)
        df = df.where(validity_filter(plan.kernel.dim_in))
    else:
        _check_dimension(source, plan)
    if cfg.backfill.output_partitions:
        df = df.repartition(cfg.backfill.output_partitions)
    batch_rows = cfg.backfill.arrow_batch_rows or arrow_batch_rows(plan.kernel.dim_in, plan.dims_out,
                                                                   cfg.backfill.target_batch_mb)
    out_row_bytes = 4 * max(plan.dims_out) + 48  # vector plus id, space, chain id, timestamp
    file_rows = max(10_000, cfg.backfill.target_file_mb * 2**20 // out_row_bytes)
    log.info("backfill: version %d (Delta v%d, dim %d) -> spaces %s (%s kernel, %d rows/Arrow batch) into %s",
             plan.source_version, source.delta_version, plan.kernel.dim_in, plan.spaces,
             "fused one-GEMM" if plan.kernel.fused else "sequential", batch_rows, out_location)
    write_started = time.time()
    with session_conf(spark, backfill_write_conf(batch_rows, len(plan.spaces))), reraise_executor_errors():
        rows = write_spaces(spark, df.transform(to_spaces(plan)), out_location, plan.spaces, lineage, file_rows)
    result = BackfillResult(run_id, False, rows, plan.spaces, time.time() - started, time.time() - write_started,
                            quarantined)
    log.info("backfill: wrote %d rows (%d per space x %d spaces) in one commit in %.1fs",
             rows, rows // max(len(plan.spaces), 1), len(plan.spaces), result.seconds)
    return result
