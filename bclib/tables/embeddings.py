"""Embedding versions as Delta tables: pinned reads and deterministic hash sampling.

A version is selected either by its own table (`location` with '{version}') or by a version column of
one table. Sampling keeps the rows whose salted xxhash64 of the id falls in a window [lo, hi): the
same ids in every version and every run, the filter inside the scan, no shuffle; disjoint windows
give disjoint samples (fit vs evaluation).

Ids follow one type rule (`bclib.tables.ids`), checked across every configured version on each read:
int/smallint/tinyint and decimal(p <= 18, 0) ids are read (and hashed) as bigint, string ids as they are,
anything else is refused with IdTypeError before any step writes.
"""

from __future__ import annotations

import logging
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Optional, Sequence

import numpy as np
import pyarrow as pa

from bclib.errors import BcembError, DuplicateIdError, IdTypeError, MissingTableError, NullIdError, \
    VectorTypeError, VersionFilesMissingError, VersionTableEmptyError
from bclib.numerics.arrow import list_to_matrix, usable_rows
from bclib.numerics.samples import Sample
from bclib.tables.delta import current_delta_version, log_row_count, read_delta, require_columns, require_table, \
    table_exists
from bclib.tables.ids import check_id_kinds, refused_message, spark_read_type

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
    storage_options: Optional[dict] = None  # for reading the table's log directly (`cfg.object_store_options`)
    whole_table: bool = True  # the version is the whole table (False: rows of embeddings.version_column)


def select_version(df, cfg, version: int, location: str, extra: Sequence[str] = ()):
    """(id, vector array<float>, *extra) of one version from a raw table DataFrame, columns checked.

    The id is read as the id rule says (`bclib.tables.ids`): int/smallint/tinyint and decimal(p <= 18, 0)
    cast to bigint, bigint and string as they are.

    The vector is read as `embeddings.vector_encoding` says: array<float|double> as it is (double cast to
    float), binary little-endian float32 bytes or JSON text decoded (`decode_vectors`; undecodable rows
    become null vectors, refused or quarantined by id downstream).

    Raises MissingColumnError naming the missing column (and the available ones); VectorTypeError naming the
    vector column's actual type and a conversion when the encoding cannot read it (`check_vector_type`);
    IdTypeError when the id column's type is refused (decimal(20, 0), double, binary, ...).
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import DoubleType, LongType

    emb = cfg.embeddings
    needed = [emb.id_column, emb.vector_column] + ([emb.version_column] if emb.version_column else [])
    require_columns(df, needed, location)
    vtype = df.schema[emb.vector_column].dataType
    check_vector_type(vtype, emb.vector_encoding, emb.vector_column, location)
    id_type = df.schema[emb.id_column].dataType
    id_kind = spark_read_type(id_type)
    if id_kind is None:
        raise IdTypeError(refused_message(version, location, emb.id_column, id_type))
    if emb.version_column:
        df = df.where(F.col(emb.version_column) == F.lit(version))
    ids = F.col(emb.id_column)
    if id_kind == "bigint" and not isinstance(id_type, LongType):
        ids = ids.cast("bigint")
    vec = F.col(emb.vector_column)
    if emb.vector_encoding != "array":
        vec = _decoder(emb.vector_encoding)(vec)
    elif isinstance(vtype.elementType, DoubleType):
        vec = vec.cast("array<float>")
    return df.select(ids.alias("id"), vec.alias("vector"), *extra)


def check_vector_type(vtype, encoding: str, column: str, location: str) -> None:
    """VectorTypeError unless the vector column's Spark type `vtype` is one `embeddings.vector_encoding` reads:
    array<float|double> for "array", binary for "float32_le", string for "json". The message names the found
    type and the conversion for the common ones (binary float32 bytes, JSON text, a Spark ML vector)."""
    from pyspark.sql.types import ArrayType, BinaryType, DoubleType, FloatType, StringType

    wanted = {"array": "array<float>", "float32_le": "binary", "json": "string"}[encoding]
    if encoding == "array" and isinstance(vtype, ArrayType) and isinstance(vtype.elementType, (FloatType, DoubleType)):
        return
    if (encoding == "float32_le" and isinstance(vtype, BinaryType)) or (
            encoding == "json" and isinstance(vtype, StringType)):
        return
    hint = ""
    if type(vtype).__name__ == "VectorUDT":
        hint = ("; it is a Spark ML vector: convert it with pyspark.ml.functions.vector_to_array("
                f"'{column}', 'float32') into an array<float> column")
    elif isinstance(vtype, BinaryType):
        hint = ("; if each value is the vector's float32 values as little-endian bytes (4 bytes a value), set "
                "embeddings.vector_encoding: float32_le (decoded on read, lossless), or convert it to "
                "array<float> (numpy: np.frombuffer(value, '<f4'))")
    elif isinstance(vtype, StringType):
        hint = ("; if each value is a JSON array of numbers, set embeddings.vector_encoding: json (decoded on "
                f"read), or convert it with from_json({column}, 'array<float>')")
    elif isinstance(vtype, ArrayType):
        hint = f"; cast its elements: {column}.cast('array<float>')"
    raise VectorTypeError(f"table '{location}' column '{column}' must be {wanted} (embeddings.vector_encoding: "
                          f"{encoding}), found {vtype.simpleString()}{hint}")


def _decoder(encoding: str):
    """A pandas UDF (one Arrow batch at a time) decoding an encoded vector column with `decode_vectors`: the
    same function the arrow engine runs, so both engines read the same float32 values."""
    import pandas as pd
    from pyspark.sql.functions import pandas_udf

    def decode(col):
        from bclib.numerics.arrow import decode_vectors

        arrow_type = pa.binary() if encoding == "float32_le" else pa.string()
        return decode_vectors(pa.array(col, arrow_type, from_pandas=True), encoding).to_pandas()

    decode.__annotations__ = {"col": pd.Series, "return": pd.Series}  # real types: this module's hints are strings
    return pandas_udf(decode, "array<float>")


def check_version_ids(spark, cfg) -> dict[int, str]:
    """The id rule across every configured version whose table exists (current schemas; no rows read).

    Per version its read type ('bigint' | 'string'). Raises IdTypeError naming the version, table, column
    and type when one is refused, or a numeric and a string version when they disagree. A version whose
    table or id column is missing is skipped here (its own read names that).
    """
    emb = cfg.embeddings
    schemas: dict[str, object] = {}
    found = {}
    for v in sorted(emb.versions):
        location = cfg.version_location(v)
        if location not in schemas:
            schemas[location] = read_delta(spark, location).schema if table_exists(spark, location) else None
        schema = schemas[location]
        if schema is not None and emb.id_column in schema.fieldNames():
            found[v] = (location, schema[emb.id_column].dataType)
    return check_id_kinds(found, emb.id_column)


def read_embedding_version(spark, cfg, version: int, delta_version: Optional[int] = None) -> VersionRead:
    """Select one version as (id, vector array<float>), pinned to a Delta version (the current one if None).

    Raises MissingTableError if the table does not exist, MissingColumnError if the id/vector/version
    column is missing or the vector column is not array<float|double>, IdTypeError when any configured
    version's id type is refused or the versions disagree on it (`check_version_ids`): every step reads
    through here before it writes anything.
    """
    location = cfg.version_location(version)
    require_table(spark, location, f"embedding version {version}")
    check_version_ids(spark, cfg)
    if delta_version is None:
        delta_version = current_delta_version(spark, location, cfg.object_store_options or None)
    df = select_version(read_delta(spark, location, delta_version), cfg, version, location)
    return VersionRead(version, location, delta_version, df, cfg.object_store_options or None,
                       not cfg.embeddings.version_column)


def read_versions(spark, cfg) -> dict[int, VersionRead]:
    """Every configured version, each pinned to its current Delta version."""
    return {v: read_embedding_version(spark, cfg, v) for v in sorted(cfg.embeddings.versions)}


# --------------------------------------------------------------------------- deterministic sampling


def hash_unit(id_column: str, salt: str, id_type=None):
    """A Column: deterministic pseudo-uniform double in [0, 1) per id (same id -> same value, any table).

    pmod(xxhash64(salt, id), 2^52) / 2^52, Spark's `xxhash64` (stable across versions and clusters), on
    the id's read type (`bclib.tables.ids`): given the column's Spark type `id_type`, an int/smallint/
    tinyint or decimal(p <= 18, 0) id is hashed as the bigint it is read as (xxhash64 hashes an int in 4
    bytes, a bigint in 8), so the same entity falls in the same slice whichever of these types a table has.
    Bigint and string ids hash as they always did.
    """
    from pyspark.sql import functions as F
    from pyspark.sql.types import LongType

    ids = F.col(id_column)
    if id_type is not None and spark_read_type(id_type) == "bigint" and not isinstance(id_type, LongType):
        ids = ids.cast("bigint")
    h = F.xxhash64(F.lit(salt), ids)
    return F.pmod(h, F.lit(_HASH_MODULUS)).cast("double") / F.lit(float(_HASH_MODULUS))


def hash_window(df, id_column: str, salt: str, lo: float, hi: float):
    """Rows whose hash lies in [lo, hi), with the hash kept as HASH_COLUMN.

    Disjoint windows give disjoint samples (fit vs evaluation) without any
    shuffle; the filter runs inside the scan, before any join.
    """
    from pyspark.sql import functions as F

    return df.withColumn(HASH_COLUMN, hash_unit(id_column, salt, df.schema[id_column].dataType)).where(
        (F.col(HASH_COLUMN) >= F.lit(lo)) & (F.col(HASH_COLUMN) < F.lit(hi))
    )


def collect_sample(df, column: str = "vector", expected_dim: Optional[int] = None, table: str = "",
                   drop_invalid: bool = False) -> Sample:
    """Collect (id, vector, hash) as Arrow (not pandas rows), validated, sorted by id.

    Ids never pass through float: a null id raises NullIdError, a repeated id DuplicateIdError (both name
    `table`, the count and a few ids), before any pairing. With `drop_invalid` (quarantine configured)
    rows with a null id or an unusable vector are left out of the sample (and counted in the log)
    instead of failing it.
    """
    table_arrow = df.select("id", "vector", HASH_COLUMN).toArrow()
    if drop_invalid and table_arrow.num_rows:
        mask, _ = usable_rows(table_arrow.column("vector"))
        mask &= np.asarray(table_arrow.column("id").combine_chunks().is_valid())
        if not mask.all():
            log.info("sample: %d unusable row(s) of %s left out (quarantine configured)", int((~mask).sum()),
                     table or column)
            table_arrow = table_arrow.filter(pa.array(mask))
    ids_arrow = table_arrow.column("id").combine_chunks()
    where = f" in {table}" if table else ""
    if ids_arrow.null_count:
        raise NullIdError(f"{ids_arrow.null_count} row(s) with a null id{where} ({column}); "
                          "ids must be non-null (filter them out upstream)")
    matrix = list_to_matrix(table_arrow.column("vector"), expected_dim, ids_arrow, column=column)
    ids = ids_arrow.to_numpy(zero_copy_only=False)
    hashes = table_arrow.column(HASH_COLUMN).to_numpy()
    order = np.argsort(ids, kind="stable")
    ids = ids[order]
    repeated = ids[1:][ids[1:] == ids[:-1]]
    if len(repeated):
        shown = [x.item() if hasattr(x, "item") else x for x in np.unique(repeated)[:5]]
        raise DuplicateIdError(f"{len(np.unique(repeated))} id(s) occur more than once{where} ({column}), "
                               f"e.g. {shown}; every id must be unique within a version")
    return Sample(ids, np.ascontiguousarray(matrix[order]), hashes[order])


def collect_window(df, salt: str, lo: float, hi: float, label: str = "vector", table: str = "",
                   drop_invalid: bool = False) -> Sample:
    """One scan of an (id, vector) DataFrame: the rows whose id hash lies in [lo, hi), on the driver."""
    return collect_sample(hash_window(df, "id", salt, lo, hi), column=label, table=table, drop_invalid=drop_invalid)


def window_fraction(wanted: int, available: int, cap: float = 0.5, slack: float = 1.25) -> float:
    """Hash-window width that yields about `wanted` rows out of `available` (with slack for churn)."""
    return min(cap, slack * wanted / max(available, 1))


_FILE_GONE = ("FILE_NOT_EXIST", "FileNotFoundException", "No such file or directory")


@contextmanager
def version_files_guard(read: VersionRead) -> Iterator[None]:
    """Run a Spark action on one version's rows: a data file its log lists but the storage lacks becomes
    VersionFilesMissingError naming the version, the table, its Delta version and the file (not a Py4J trace)."""
    try:
        yield
    except BcembError:
        raise
    except Exception as exc:  # Spark's FAILED_READ_FILE.FILE_NOT_EXIST (a Py4JJavaError or a captured error)
        text = str(exc)
        if not any(words in text for words in _FILE_GONE):
            raise
        found = re.search(r"(?:file|File|path)\s+(\S+?\.parquet)", text)
        raise _files_gone(read.version, read.location, read.delta_version,
                          found.group(1) if found else None) from exc


def _files_gone(version: int, location: str, delta_version: Optional[int],
                path: Optional[str]) -> VersionFilesMissingError:
    pinned = f" (Delta v{delta_version})" if delta_version is not None else ""
    return VersionFilesMissingError(
        f"embedding version {version} at '{location}'{pinned}: its log lists a data file that is gone "
        f"({path or 'file not found'}): files were deleted outside Delta (a VACUUM with a short retention "
        "elsewhere, a manual delete). Restore the files, or rewrite the version's table; nothing was written")


def files_missing_error(exc: BaseException, cfg) -> Optional[VersionFilesMissingError]:
    """VersionFilesMissingError when `exc` (any Spark or pyarrow failure) says a data file under one of the
    configured version tables is gone; None otherwise. For the CLI: a failure outside a guarded read still
    names the version instead of ending in a Py4J trace."""
    text = str(exc)
    if not any(words in text for words in _FILE_GONE):
        return None
    for v in cfg.embeddings.versions:
        location = cfg.version_location(v)
        bare = location.split("://", 1)[-1].removeprefix("file:").rstrip("/")
        if bare and bare in text:
            found = re.search(re.escape(bare) + r"/?(\S*?\.parquet)", text)
            return _files_gone(v, location, None, found.group(0) if found else None)
    return None


def read_rows(read: VersionRead) -> int:
    """The version's row count at its pinned Delta version: from the table's log where it answers
    (`bclib.tables.delta.log_row_count`: no Spark job), else Delta's metadata-only `count()` through Spark."""
    n = log_row_count(read.df.sparkSession, read.location, read.delta_version, read.storage_options) \
        if read.whole_table else None
    if n is None:
        with version_files_guard(read):
            n = int(read.df.count())
    return n


def version_rows(read: VersionRead) -> int:
    """The version's row count (`read_rows`); VersionTableEmptyError when it has none."""
    n = read_rows(read)
    if n == 0:
        raise VersionTableEmptyError(
            f"embedding version {read.version} at '{read.location}' (Delta v{read.delta_version}) has no rows "
            "(every row deleted, or an empty table): it cannot serve as a source or as a space's truth; restore "
            "it (time travel: RESTORE TABLE ... TO VERSION AS OF <n>) or drop the version from embeddings.versions")
    return n


UNREADABLE = (MissingTableError, VersionTableEmptyError, VersionFilesMissingError)


def tolerant_counts(reads: dict[int, VersionRead], tolerate: Sequence[int] = (),
                    unreadable: Optional[dict[int, str]] = None) -> dict[int, int]:
    """`version_rows` of each read; a version in `tolerate` that is empty or has files missing is left out and
    named in `unreadable` (error class and message), any other one raises."""
    counts = {}
    for v, read in reads.items():
        try:
            counts[v] = version_rows(read)
        except UNREADABLE as exc:
            if v not in tolerate or unreadable is None:
                raise
            unreadable[v] = f"{type(exc).__name__}: {exc}"
    return counts


def sample_versions(
    reads: dict[int, VersionRead], salt: str, wanted: int, lo: float, cap: float, drop_invalid: bool = False,
    tolerate: Sequence[int] = (), unreadable: Optional[dict[int, str]] = None,
    counts: Optional[dict[int, int]] = None,
) -> tuple[dict[int, Sample], float]:
    """The same hash window of every version (same ids wherever present), one scan each; and the window's end.

    A version in `tolerate` whose rows cannot be read (VersionTableEmptyError, VersionFilesMissingError) is left
    out of the samples and its error text put in `unreadable`; any other version's such error is raised.
    `counts`: the versions' row counts when the caller has them (`version_rows`), else counted here."""
    if counts is None:
        counts = tolerant_counts(reads, tolerate, unreadable)
    width = window_fraction(wanted, min(counts.values()) if counts else 1, cap=cap)
    samples = {}
    for v in counts:
        read, started = reads[v], time.time()
        try:
            with version_files_guard(read):
                samples[v] = collect_window(read.df, salt, lo, lo + width, f"vector of version {v}", read.location,
                                            drop_invalid)
        except UNREADABLE as exc:
            if v not in tolerate or unreadable is None:
                raise
            unreadable[v] = f"{type(exc).__name__}: {exc}"
            continue
        log.info("sample: version %d: %d rows (hash window [%.4f, %.4f)) in %.1fs",
                 v, len(samples[v]), lo, lo + width, time.time() - started)
    return samples, lo + width


def check_unique_ids(df, location: str, version: int, only_ids=None) -> None:
    """One aggregation over the id column: NullIdError / DuplicateIdError naming the table, count and ids.

    `only_ids` (a DataFrame with an `id` column, small) restricts the check to those ids (a broadcast
    semi-join: the incremental path checks only the ids its changes touch).
    """
    from pyspark.sql import functions as F

    ids = df.select("id")
    if only_ids is not None:
        ids = ids.join(F.broadcast(only_ids.select("id").distinct()), "id", "left_semi")
    # one aggregation answers both: null ids form one group (its count is theirs), a repeated id a group of > 1
    flagged = ids.groupBy("id").count().where(F.col("id").isNull() | (F.col("count") > 1))
    found = flagged.orderBy(F.col("id").isNull().desc(), F.col("count").desc(), F.col("id")).limit(6).collect()
    if found and found[0].id is None:
        n = found[0]["count"]
        raise NullIdError(f"version {version} at '{location}' has {n} row(s) with a null id; ids must be non-null "
                          "(filter them out upstream, or set backfill.quarantine_location to set them aside)")
    if found:
        found = found[:5]
        total = flagged.count()  # only on the way to an error: no null-id group here
        raise DuplicateIdError(
            f"version {version} at '{location}' holds {total} id(s) more than once, e.g. "
            + ", ".join(f"{r.id!r} x{r['count']}" for r in found)
            + "; every id must be unique within a version (deduplicate upstream)"
        )
