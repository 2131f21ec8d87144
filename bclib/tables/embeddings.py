"""Embedding versions as Delta tables: pinned reads and deterministic hash sampling.

A version is selected either by its own table (`location` with '{version}') or by a version column of
one table. Sampling keeps the rows whose salted xxhash64 of the id falls in a window [lo, hi): the
same ids in every version and every run, the filter inside the scan, no shuffle; disjoint windows
give disjoint samples (fit vs evaluation).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from bclib.errors import MissingColumnError
from bclib.numerics.arrow import list_to_matrix
from bclib.numerics.samples import Sample
from bclib.tables.delta import current_delta_version, read_delta, require_columns, require_table

log = logging.getLogger(__name__)

HASH_COLUMN = "_bc_hash"
_HASH_MODULUS = 1 << 52


@dataclass(frozen=True)
class VersionRead:
    """One embedding version as a DataFrame(id, vector array<float>) plus the Delta version it was read at."""

    version: int
    location: str
    delta_version: int
    df: object  # pyspark DataFrame with columns (id, vector)


def read_embedding_version(spark, cfg, version: int, delta_version: Optional[int] = None) -> VersionRead:
    """Select one version as (id, vector array<float>), pinned to a Delta version (the current one if None).

    Raises MissingTableError if the table does not exist, MissingColumnError if the id/vector/version
    column is missing or the vector column is not array<float|double>.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import ArrayType, DoubleType, FloatType

    emb = cfg.embeddings
    location = cfg.version_location(version)
    require_table(spark, location, f"embedding version {version}")
    if delta_version is None:
        delta_version = current_delta_version(spark, location)
    df = read_delta(spark, location, delta_version)
    needed = [emb.id_column, emb.vector_column] + ([emb.version_column] if emb.version_column else [])
    require_columns(df, needed, location)
    vtype = df.schema[emb.vector_column].dataType
    if not (isinstance(vtype, ArrayType) and isinstance(vtype.elementType, (FloatType, DoubleType))):
        raise MissingColumnError(
            f"table '{location}' column '{emb.vector_column}' must be array<float>, found {vtype.simpleString()}"
        )
    if emb.version_column:
        df = df.where(F.col(emb.version_column) == F.lit(version))
    vec = F.col(emb.vector_column)
    if isinstance(vtype.elementType, DoubleType):
        vec = vec.cast("array<float>")
    df = df.select(F.col(emb.id_column).alias("id"), vec.alias("vector"))
    return VersionRead(version, location, delta_version, df)


def read_versions(spark, cfg) -> dict[int, VersionRead]:
    """Every configured version, each pinned to its current Delta version."""
    return {v: read_embedding_version(spark, cfg, v) for v in sorted(cfg.embeddings.versions)}


# --------------------------------------------------------------------------- deterministic sampling


def hash_unit(id_column: str, salt: str):
    """A Column: deterministic pseudo-uniform double in [0, 1) per id (same id -> same value, any table).

    pmod(xxhash64(salt, id), 2^52) / 2^52, Spark's `xxhash64` (stable across versions and clusters).
    """
    from pyspark.sql import functions as F

    h = F.xxhash64(F.lit(salt), F.col(id_column))
    return F.pmod(h, F.lit(_HASH_MODULUS)).cast("double") / F.lit(float(_HASH_MODULUS))


def hash_window(df, id_column: str, salt: str, lo: float, hi: float):
    """Rows whose hash lies in [lo, hi), with the hash kept as HASH_COLUMN.

    Disjoint windows give disjoint samples (fit vs evaluation) without any
    shuffle; the filter runs inside the scan, before any join.
    """
    from pyspark.sql import functions as F

    return df.withColumn(HASH_COLUMN, hash_unit(id_column, salt)).where(
        (F.col(HASH_COLUMN) >= F.lit(lo)) & (F.col(HASH_COLUMN) < F.lit(hi))
    )


def collect_sample(df, column: str = "vector", expected_dim: Optional[int] = None) -> Sample:
    """Collect (id, vector, hash) as Arrow (not pandas rows), validated, sorted by id."""
    table = df.select("id", "vector", HASH_COLUMN).toArrow()
    ids_arrow = table.column("id").combine_chunks()
    matrix = list_to_matrix(table.column("vector"), expected_dim, ids_arrow, column=column)
    ids = ids_arrow.to_numpy(zero_copy_only=False)
    hashes = table.column(HASH_COLUMN).to_numpy()
    order = np.argsort(ids, kind="stable")
    return Sample(ids[order], np.ascontiguousarray(matrix[order]), hashes[order])


def collect_window(df, salt: str, lo: float, hi: float, label: str = "vector") -> Sample:
    """One scan of an (id, vector) DataFrame: the rows whose id hash lies in [lo, hi), on the driver."""
    return collect_sample(hash_window(df, "id", salt, lo, hi), column=label)


def window_fraction(wanted: int, available: int, cap: float = 0.5, slack: float = 1.25) -> float:
    """Hash-window width that yields about `wanted` rows out of `available` (with slack for churn)."""
    return min(cap, slack * wanted / max(available, 1))


def sample_versions(
    reads: dict[int, VersionRead], salt: str, wanted: int, lo: float, cap: float,
) -> tuple[dict[int, Sample], float]:
    """The same hash window of every version (same ids wherever present), one scan each; and the window's end."""
    smallest = min(r.df.count() for r in reads.values())  # Delta answers counts from its log
    width = window_fraction(wanted, smallest, cap=cap)
    samples = {}
    for v, read in reads.items():
        started = time.time()
        samples[v] = collect_window(read.df, salt, lo, lo + width, f"vector of version {v}")
        log.info("sample: version %d: %d rows (hash window [%.4f, %.4f)) in %.1fs",
                 v, len(samples[v]), lo, lo + width, time.time() - started)
    return samples, lo + width
