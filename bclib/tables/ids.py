"""The one id type rule, for both engines: which id types are accepted and what each is read as.

Accepted: bigint and string as they are; int, smallint and tinyint widened to bigint; decimal(p, 0) with
p <= 18 converted losslessly to bigint. Refused (IdTypeError naming the version, table, column and type,
and how to convert): decimal with p > 18 or a scale, float/double, binary, anything else. Every version
of an edge must agree on the kind (numeric or string): the same entity must have the same id.

Ids are hashed (sampling, evaluation slices, the gate) after this normalisation, so an int id and the
same value as bigint fall in the same slice; bigint (and decimal(p <= 18, 0)) ids hash as they always did.

The rule is written on Arrow types (`read_type`); Spark types are mapped onto them (`spark_read_type`).
Executors (the arrow engine) use `normalise_ids`, the driver `spark_read_type`; neither imports the other.
"""

from __future__ import annotations

from typing import Optional

import pyarrow as pa

from bclib.errors import IdTypeError

ACCEPTED = ("bigint, string; int, smallint and tinyint (read as bigint); decimal(p, 0) with p <= 18 "
            "(read as bigint)")
_MAX_LONG_DIGITS = 18  # every decimal(18, 0) value fits in a bigint


def read_type(t: pa.DataType) -> Optional[pa.DataType]:
    """The Arrow type ids of type `t` are read as (int64 or string), None when the rule refuses `t`."""
    if pa.types.is_integer(t) and not (pa.types.is_unsigned_integer(t) and t.bit_width == 64):
        return pa.int64()
    if pa.types.is_decimal(t) and t.scale == 0 and t.precision <= _MAX_LONG_DIGITS:
        return pa.int64()
    if pa.types.is_string(t) or pa.types.is_large_string(t):
        return pa.string()
    return None


def normalise_ids(ids):
    """An Arrow id array (or chunked array) cast to its read type (the arrow engine, per file part).

    A table whose id column was widened (int -> bigint, Delta type widening) holds int32 and int64 files:
    every part comes out int64, as the table's current type. Raises IdTypeError for a refused type.
    """
    target = read_type(ids.type)
    if target is None:
        raise IdTypeError(f"an id column of Arrow type {ids.type} is not accepted; accepted id types: {ACCEPTED}")
    return ids if ids.type == target else ids.cast(target)  # safe cast: lossless by the rule


def _spark_as_arrow(dtype) -> Optional[pa.DataType]:
    from pyspark.sql import types as T

    simple = {T.LongType: pa.int64(), T.IntegerType: pa.int32(), T.ShortType: pa.int16(), T.ByteType: pa.int8(),
              T.StringType: pa.string()}
    if isinstance(dtype, T.DecimalType):
        return pa.decimal128(dtype.precision, dtype.scale)
    return simple.get(type(dtype))


def spark_read_type(dtype) -> Optional[str]:
    """'bigint' or 'string': the Spark type ids of Spark type `dtype` are read as; None when refused."""
    source = _spark_as_arrow(dtype)
    target = read_type(source) if source is not None else None
    if target is None:
        return None
    return "string" if target == pa.string() else "bigint"


def arrow_output_type(dtype) -> pa.DataType:
    """The Arrow id type of an output written from ids of Spark type `dtype` (int64 or string)."""
    target = spark_read_type(dtype)
    if target is None:
        raise IdTypeError(f"ids of type {dtype.simpleString()} are not accepted; accepted id types: {ACCEPTED}")
    return pa.string() if target == "string" else pa.int64()


def _how_to_convert(dtype, column: str) -> str:
    from pyspark.sql import types as T

    fits = f"CAST({column} AS BIGINT) if every id is a whole number that fits in a bigint (|id| < 2^63)"
    if isinstance(dtype, (T.DecimalType, T.FloatType, T.DoubleType)):
        return f"convert the column upstream: {fits}, else CAST({column} AS STRING)"
    if isinstance(dtype, T.BinaryType):
        return f"convert the column upstream: hex({column}) (a string)"
    return f"convert the column upstream: CAST({column} AS STRING), or {fits}"


def refused_message(version: int, location: str, column: str, dtype) -> str:
    """IdTypeError's text for one version whose id column has a refused type."""
    return (f"version {version} at '{location}': id column '{column}' has type {dtype.simpleString()}, which bcemb "
            f"does not accept as an id; accepted id types: {ACCEPTED}. {_how_to_convert(dtype, column)}; "
            "nothing was written")


def check_id_kinds(found: dict[int, tuple[str, object]], column: str) -> dict[int, str]:
    """Per version its read type ('bigint' | 'string'), from (location, Spark id type) per version.

    Raises IdTypeError for the first version whose type the rule refuses, or naming a numeric and a
    string version (with their tables and types) when the versions disagree on the kind.
    """
    kinds: dict[int, str] = {}
    for v in sorted(found):
        location, dtype = found[v]
        kind = spark_read_type(dtype)
        if kind is None:
            raise IdTypeError(refused_message(v, location, column, dtype))
        kinds[v] = kind
    if len(set(kinds.values())) > 1:
        num = next(v for v in sorted(kinds) if kinds[v] == "bigint")
        txt = next(v for v in sorted(kinds) if kinds[v] == "string")
        (nloc, ntype), (sloc, stype) = found[num], found[txt]
        raise IdTypeError(
            f"id column '{column}' holds numeric ids in version {num} at '{nloc}' ({ntype.simpleString()}) but "
            f"string ids in version {txt} at '{sloc}' ({stype.simpleString()}): the same entity must have the same "
            f"id in every version. Convert one side upstream, e.g. CAST({column} AS STRING) in version {num} "
            "(if the strings are those numbers); nothing was written"
        )
    return kinds
