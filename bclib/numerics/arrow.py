"""Arrow <-> numpy for embedding vectors (pure pyarrow/numpy; the executor kernel and the driver share it).

list<float> -> (rows, dim) float32 on the flat values buffer (zero-copy for float32 without nulls), and
back as a ListArray with explicit int32 offsets (Spark 4.0's mapInArrow rejects FixedSizeList).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import pyarrow as pa

from bclib.errors import InvalidVectorError


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

    vectors: list<float32|float64> of `rows` entries; ids: the same rows' ids, used in messages only.
    Returns float32 (rows, dim), a view of Arrow's values buffer for float32 without nulls.
    Raises InvalidVectorError naming the first offending id for a null vector, a wrong length (every
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
    """A (rows, dim) matrix as list<float> with explicit int32 offsets (Spark rejects FixedSizeList).

    The values buffer is the matrix's own memory when it is C-contiguous float32 (no copy).
    """
    rows, dim = matrix.shape
    if rows * dim > 2**31 - 1:
        raise ValueError(f"{rows} rows x {dim} values = {rows * dim} exceed the 2^31 - 1 values int32 list offsets "
                         "can address in one array; split the batch (the backfill kernel slices batches in values)")
    flat = np.ascontiguousarray(matrix, dtype=np.float32).reshape(-1)
    offsets = pa.array(np.arange(0, (rows + 1) * dim, dim, dtype=np.int32) if rows else np.zeros(1, np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(flat, type=pa.float32()))


def usable_rows(vectors: pa.Array | pa.ChunkedArray) -> tuple[np.ndarray, int]:
    """(mask, dim): rows whose vector is non-null, of the majority length `dim`, with finite non-null elements.

    For samples taken where bad rows are set aside (quarantine configured): the expected dimension is
    the majority's, never the first row's.
    """
    if isinstance(vectors, pa.ChunkedArray):
        vectors = vectors.combine_chunks()
    n = len(vectors)
    if n == 0:
        return np.zeros(0, dtype=bool), 0
    valid = np.asarray(vectors.is_valid())
    lengths = np.diff(np.asarray(vectors.offsets))
    values, counts = np.unique(lengths[valid], return_counts=True) if valid.any() else (np.array([0]), np.array([1]))
    dim = int(values[np.argmax(counts)])
    mask = valid & (lengths == dim)
    flat = vectors.flatten()
    elem_ok = np.asarray(flat.is_valid()) & np.isfinite(flat.to_numpy(zero_copy_only=False).astype(np.float64,
                                                                                                     copy=False))
    # per row: all elements fine (flatten() holds the elements of the non-null rows only, in order)
    bad_elem_rows = np.zeros(n, dtype=bool)
    if (~elem_ok).any():
        row_of = np.repeat(np.flatnonzero(valid), lengths[valid])
        bad_elem_rows[np.unique(row_of[~elem_ok])] = True
    return mask & ~bad_elem_rows, dim


VECTOR_ENCODINGS = ("array", "float32_le", "json")


def decode_vectors(encoded: pa.Array | pa.ChunkedArray, encoding: str) -> pa.ListArray:
    """list<float32> vectors from a column that stores them encoded (`embeddings.vector_encoding`).

    encoding 'float32_le': binary, each row the vector's float32 values as little-endian bytes (4 * d bytes,
    as numpy's `astype('<f4').tobytes()`, feature-store exports and pgvector's binary format write them);
    'json': string, each row a JSON array of numbers (e.g. "[0.1, -2.5e-3]"), each parsed as a float64 and
    rounded once to float32. 'array': returned as list<float32> (cast when float64).
    Lossless for float32_le; a row that cannot be decoded (byte length not a multiple of 4, text that is not a
    JSON array of finite-or-not numbers, a null element) becomes a null vector, which the readers then refuse
    or quarantine by id like any null vector. Shape: rows in = rows out. Pure (numpy/pyarrow only).
    Raises ValueError for an unknown encoding or a column of the wrong Arrow type for it.
    """
    import json

    if isinstance(encoded, pa.ChunkedArray):
        encoded = encoded.combine_chunks() if encoded.num_chunks != 1 else encoded.chunk(0)
    if encoding == "array":
        return encoded if encoded.type == pa.list_(pa.float32()) else encoded.cast(pa.list_(pa.float32()))
    if encoding == "float32_le":
        if not (pa.types.is_binary(encoded.type) or pa.types.is_large_binary(encoded.type)):
            raise ValueError(f"vector_encoding float32_le needs a binary column, found {encoded.type}")
        if pa.types.is_binary(encoded.type) and encoded.null_count == 0 and len(encoded):
            offsets = np.frombuffer(encoded.buffers()[1], np.int32)[encoded.offset:encoded.offset + len(encoded) + 1]
            if not np.any(offsets % 4 - offsets[0] % 4):  # every row whole floats: one view of the data buffer
                values = np.frombuffer(encoded.buffers()[2], np.uint8)[offsets[0]:offsets[-1]].view("<f4")
                return pa.ListArray.from_arrays(pa.array((offsets - offsets[0]) // 4, pa.int32()),
                                                pa.array(values.astype(np.float32, copy=False), pa.float32()))
        rows = encoded.to_pylist()
        vectors = [np.frombuffer(b, dtype="<f4").astype(np.float32) if b is not None and len(b) % 4 == 0
                   else None for b in rows]
    elif encoding == "json":
        if not (pa.types.is_string(encoded.type) or pa.types.is_large_string(encoded.type)):
            raise ValueError(f"vector_encoding json needs a string column, found {encoded.type}")

        def parse(text: Optional[str]) -> Optional[np.ndarray]:
            if text is None:
                return None
            try:
                value = json.loads(text)
            except ValueError:
                return None
            if not isinstance(value, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in value):
                return None
            return np.asarray(value, dtype=np.float64).astype(np.float32)

        vectors = [parse(t) for t in encoded.to_pylist()]
    else:
        raise ValueError(f"unknown vector_encoding {encoding!r}; one of {VECTOR_ENCODINGS}")
    lengths = np.array([0 if v is None else len(v) for v in vectors], dtype=np.int64)
    offsets = np.zeros(len(vectors) + 1, dtype=np.int32)
    np.cumsum(lengths, out=offsets[1:])
    values = np.concatenate([v for v in vectors if v is not None]) if lengths.sum() else np.zeros(0, np.float32)
    mask = pa.array([v is None for v in vectors], pa.bool_())
    return pa.ListArray.from_arrays(pa.array(offsets, pa.int32()), pa.array(values, pa.float32()), mask=mask)
