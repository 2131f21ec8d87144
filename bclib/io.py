"""Reading embedding versions, deterministic hash sampling, Arrow <-> numpy.

The Arrow helpers are pure (no Spark) so the executor kernel and the driver
share one validated conversion: list<float> -> (rows, dim) float32 on the
flat values buffer, and back as a ListArray with explicit int32 offsets.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Optional

import numpy as np
import pyarrow as pa

from bclib.errors import InvalidVectorError, MissingColumnError, MissingTableError

log = logging.getLogger(__name__)

HASH_COLUMN = "_bc_hash"
_HASH_MODULUS = 1 << 52


# --------------------------------------------------------------------------- Arrow <-> numpy (pure)


def _row_id(ids: Optional[pa.Array], row: int) -> str:
    if ids is None:
        return f"row {row}"
    return f"id={ids[row].as_py()!r}"


def list_to_matrix(
    vectors: pa.Array | pa.ChunkedArray,
    expected_dim: Optional[int] = None,
    ids: Optional[pa.Array] = None,
    column: str = "vector",
    check_finite: bool = True,
) -> np.ndarray:
    """View a list<float> column as a (rows, dim) float32 matrix, validating every row.

    Zero-copy for float32 values without nulls. Raises InvalidVectorError
    naming the first offending id for a null vector, a wrong length (every
    offset difference is checked, not only the total) or a NaN/Inf element.
    """
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks() if vectors.num_chunks != 1 else vectors.chunk(0)
    if isinstance(ids, pa.ChunkedArray):
        ids = ids.combine_chunks()
    n = len(vectors)
    if n == 0:
        return np.zeros((0, expected_dim or 0), dtype=np.float32)
    if vectors.null_count:
        row = int(np.flatnonzero(~np.asarray(vectors.is_valid()))[0])
        raise InvalidVectorError(f"column '{column}': {_row_id(ids, row)} has a null vector")
    offsets = np.asarray(vectors.offsets)
    lengths = np.diff(offsets)
    dim = int(lengths[0]) if expected_dim is None else int(expected_dim)
    wrong = np.flatnonzero(lengths != dim)
    if wrong.size:
        row = int(wrong[0])
        raise InvalidVectorError(
            f"column '{column}': {_row_id(ids, row)} has {int(lengths[row])} elements, expected dimension {dim}"
            + (f" ({wrong.size} rows affected)" if wrong.size > 1 else "")
        )
    values = vectors.flatten()
    if values.null_count:
        flat = int(np.flatnonzero(~np.asarray(values.is_valid()))[0])
        raise InvalidVectorError(f"column '{column}': {_row_id(ids, flat // max(dim, 1))} has a null element")
    if values.type == pa.float32():
        flat_np = values.to_numpy(zero_copy_only=True)
    else:
        flat_np = values.to_numpy(zero_copy_only=False).astype(np.float32)
    matrix = flat_np.reshape(n, dim)
    if check_finite and dim:
        finite_rows = np.isfinite(matrix).all(axis=1)
        if not finite_rows.all():
            row = int(np.flatnonzero(~finite_rows)[0])
            raise InvalidVectorError(f"column '{column}': {_row_id(ids, row)} holds NaN or Inf")
    return matrix


def matrix_to_list(matrix: np.ndarray) -> pa.ListArray:
    """A (rows, dim) matrix as list<float> with explicit int32 offsets (Spark rejects FixedSizeList)."""
    rows, dim = matrix.shape
    flat = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32) if rows else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.float32()))


# --------------------------------------------------------------------------- Delta tables


def is_path(location: str) -> bool:
    """A location with '/' or a URI scheme is a Delta path; otherwise a catalog table name."""
    return "/" in location or "://" in location or location.startswith(".")


def delta_table(spark, location: str):
    """DeltaTable for a path or a catalog name."""
    from delta.tables import DeltaTable

    return DeltaTable.forPath(spark, location) if is_path(location) else DeltaTable.forName(spark, location)


def table_exists(spark, location: str) -> bool:
    from delta.tables import DeltaTable

    if is_path(location):
        return DeltaTable.isDeltaTable(spark, location)
    return spark.catalog.tableExists(location)


def require_table(spark, location: str, what: str, hint: str = "") -> None:
    if not table_exists(spark, location):
        raise MissingTableError(f"{what} table not found: '{location}' is not a Delta table{hint}")


def current_delta_version(spark, location: str) -> int:
    """The table's latest commit version (pinned for reproducible reads and lineage)."""
    return int(delta_table(spark, location).history(1).select("version").first()[0])


def read_delta(spark, location: str, delta_version: Optional[int] = None):
    """Read a Delta table by path or name, optionally at a pinned version (time travel)."""
    reader = spark.read.format("delta")
    if delta_version is not None:
        reader = reader.option("versionAsOf", delta_version)
    if is_path(location):
        return reader.load(location)
    return reader.table(location) if delta_version is None else spark.sql(
        f"SELECT * FROM {location} VERSION AS OF {int(delta_version)}"
    )


def require_columns(df, columns: list[str], table: str) -> None:
    missing = [c for c in columns if c not in df.columns]
    if missing:
        raise MissingColumnError(
            f"table '{table}' lacks column(s) {missing}; available columns: {df.columns}"
        )


@dataclass(frozen=True)
class VersionRead:
    """One embedding version as a DataFrame(id, vector) plus the Delta version it was read at."""

    version: int
    location: str
    delta_version: int
    df: object  # pyspark DataFrame with columns (id, vector)


def read_embedding_version(spark, cfg, version: int, delta_version: Optional[int] = None) -> VersionRead:
    """Select one version as (id, vector float array), pinned to a Delta version."""
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


# --------------------------------------------------------------------------- deterministic sampling


def hash_unit(id_column: str, salt: str):
    """A deterministic pseudo-uniform value in [0, 1) per id (same id -> same value, any table)."""
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


@dataclass
class Sample:
    """A sample collected to the driver, sorted by id."""

    ids: np.ndarray
    vectors: np.ndarray
    hashes: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


def collect_sample(df, column: str = "vector", expected_dim: Optional[int] = None) -> Sample:
    """Collect (id, vector, hash) as Arrow (not pandas rows), validated, sorted by id."""
    table = df.select("id", "vector", HASH_COLUMN).toArrow()
    ids_arrow = table.column("id").combine_chunks()
    matrix = list_to_matrix(table.column("vector"), expected_dim, ids_arrow, column=column)
    ids = ids_arrow.to_numpy(zero_copy_only=False)
    hashes = table.column(HASH_COLUMN).to_numpy()
    order = np.argsort(ids, kind="stable")
    return Sample(ids[order], np.ascontiguousarray(matrix[order]), hashes[order])


def align_samples(a: Sample, b: Sample) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Rows of a and b for ids present in both: (ids, Xa, Xb, hashes)."""
    ids, ia, ib = np.intersect1d(a.ids, b.ids, assume_unique=True, return_indices=True)
    return ids, a.vectors[ia], b.vectors[ib], a.hashes[ia]


def collect_window(df, salt: str, lo: float, hi: float, label: str = "vector") -> Sample:
    """One scan of an (id, vector) DataFrame: the rows whose id hash lies in [lo, hi), on the driver."""
    return collect_sample(hash_window(df, "id", salt, lo, hi), column=label)


def window_fraction(wanted: int, available: int, cap: float = 0.5, slack: float = 1.25) -> float:
    """Hash-window width that yields about `wanted` rows out of `available` (with slack for churn)."""
    return min(cap, slack * wanted / max(available, 1))
