"""The generate step: synthetic embedding versions (and a label table) written as Delta tables.

The drift model and the per-block generator are pure numpy (`bclib.numerics.synthetic`); here Spark maps
block numbers to rows on the executors (`mapInArrow`) and writes one Delta table per version.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

from bclib.config import JobConfig
from bclib.errors import ConfigError, ForeignTableError
from bclib.numerics.arrow import matrix_to_list
from bclib.numerics.synthetic import DriftModel, block_labels, generate_block, make_drift_model
from bclib.spark import default_parallelism
from bclib.tables.delta import create_table, read_delta, save, table_exists
from bclib.tables.retention import table_properties

log = logging.getLogger(__name__)


@dataclass
class GenerateResult:
    """Rows written per version."""

    counts: dict[int, int]
    seconds: float = 0.0

    def summary(self) -> str:
        return f"generate: rows per version {self.counts} in {self.seconds:.1f}s"


def check_demo_config(cfg: JobConfig) -> None:
    if len(cfg.demo.dims) != len(cfg.embeddings.versions):
        raise ConfigError(
            f"config key 'demo.dims' has {len(cfg.demo.dims)} entries but embeddings.versions has "
            f"{len(cfg.embeddings.versions)}"
        )
    if cfg.embeddings.version_column is not None:
        raise ConfigError("the demo generator writes one table per version; unset 'embeddings.version_column'")


GENERATED_PROPERTY = "bcemb.generated"


def _prepare_table(spark, cfg: JobConfig, location: str, schema, what: str) -> bool:
    """Create `location` marked as generate's own (CDF on), or decide about an existing table; True = write it.

    An existing table that generate did not create (no `bcemb.generated` table property) is never
    overwritten unless demo.overwrite is true (ForeignTableError); demo.overwrite false keeps any table.
    """
    if table_exists(spark, location):
        props = table_properties(spark, location)
        ours = props.get(GENERATED_PROPERTY) == "true"
        if cfg.demo.overwrite is False:
            return False
        if not ours and cfg.demo.overwrite is not True:
            raise ForeignTableError(
                f"{what} table '{location}' exists and was not created by `bcemb generate` (no table property "
                f"{GENERATED_PROPERTY}); generate never overwrites data it does not own. Point the config at "
                "another location, or pass --set demo.overwrite=true to replace it"
            )
        return True
    create_table(spark, location, {f.name: f.dataType.simpleString() for f in schema.fields},
                 properties={GENERATED_PROPERTY: "true", "delta.enableChangeDataFeed": "true"})
    return True


def run_generate(spark, cfg: JobConfig) -> GenerateResult:
    """Write every configured version as a Delta table (and the label table); returns rows per version.

    Tables are created with the change data feed on (incremental backfills read it) and marked with
    the `bcemb.generated` table property; raises ForeignTableError rather than overwrite another table.
    """
    import pyarrow as pa
    from pyspark.sql.types import ArrayType, FloatType, LongType, StructField, StructType

    t0 = time.time()
    check_demo_config(cfg)
    model = make_drift_model(cfg.demo)
    id_col, vec_col = cfg.embeddings.id_column, cfg.embeddings.vector_column
    # schemas as objects, never DDL strings built from config names
    schema = StructType([StructField(id_col, LongType()), StructField(vec_col, ArrayType(FloatType()))])
    counts: dict[int, int] = {}
    for index, version in enumerate(sorted(cfg.embeddings.versions)):
        location = cfg.version_location(version)
        if not _prepare_table(spark, cfg, location, schema, f"embedding version {version}"):
            counts[version] = read_delta(spark, location).count()
            log.info("generate: version %d exists at %s (%d rows), kept (demo.overwrite false)",
                     version, location, counts[version])
            continue
        started = time.time()

        def blocks_to_rows(batches, _version=index):
            for batch in batches:
                for block in batch.column(0).to_numpy():
                    ids, vectors, _ = generate_block(model, int(block), _version)
                    yield pa.RecordBatch.from_arrays([pa.array(ids), matrix_to_list(vectors)], names=[id_col, vec_col])

        n_parts = max(1, min(model.n_blocks, 2 * default_parallelism(spark)))
        df = spark.range(0, model.n_blocks, numPartitions=n_parts).mapInArrow(blocks_to_rows, schema)
        save(df.write.format("delta").mode("overwrite").option("overwriteSchema", "true"), location)
        counts[version] = read_delta(spark, location).count()
        log.info(
            "generate: version %d (dim %d) -> %s: %d rows in %.1fs",
            version, cfg.demo.dims[index], location, counts[version], time.time() - started,
        )
    if cfg.evaluate.label_location:
        _write_labels(spark, cfg, model)
    return GenerateResult(counts, time.time() - t0)


def _write_labels(spark, cfg: JobConfig, model: DriftModel) -> None:
    import pyarrow as pa
    from pyspark.sql.types import IntegerType, LongType, StructField, StructType

    label_col = cfg.evaluate.label_column
    schema = StructType([StructField("id", LongType()), StructField(label_col, IntegerType())])

    def blocks_to_labels(batches):
        for batch in batches:
            for block in batch.column(0).to_numpy():
                ids, labels = block_labels(model, int(block))
                yield pa.RecordBatch.from_arrays([pa.array(ids), pa.array(labels)], names=["id", label_col])

    loc = cfg.evaluate.label_location
    if not _prepare_table(spark, cfg, loc, schema, "label"):
        return
    df = spark.range(0, model.n_blocks, numPartitions=max(1, min(model.n_blocks, 4))).mapInArrow(
        blocks_to_labels, schema)
    save(df.write.format("delta").mode("overwrite").option("overwriteSchema", "true"), loc)
    log.info("generate: labels for %d entities -> %s", model.pool_size, loc)
