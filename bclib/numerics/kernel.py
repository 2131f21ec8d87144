"""The executor kernel: source vectors -> every target space in one pass (pure numpy + pyarrow).

Driver side, `MultiSpaceKernel` collapses each chain (a run of affine links becomes one matrix) and,
when every chain is affine, concatenates the target matrices so one GEMM per Arrow batch serves all
spaces (DESIGN.md, "The executor kernel"); the rows of the spaces whose last link renormalises
(meta output_norm 'unit') are renormalised in their slice of that GEMM's output. `make_batch_fn`
wraps it into the function executors run inside `mapInArrow`: zero-copy list<float> -> (rows, d)
float32, vectorised validation, the kernel, and list<float> back with int32 offsets. It is tested
with numpy and pyarrow alone; the kernel itself needs numpy only (`bclib.serving` runs it without pyarrow).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable, Iterator, Sequence

import numpy as np

from bclib.errors import DimensionMismatchError, InvalidVectorError
from bclib.numerics.transforms import Transform, check_chain, check_input, collapse, normalize_rows

if TYPE_CHECKING:  # pragma: no cover  (pyarrow is imported where batches are made: the kernel itself is numpy)
    import pyarrow as pa

BatchFn = Callable[[Iterator["pa.RecordBatch"]], Iterator["pa.RecordBatch"]]

MAX_LIST_VALUES = 2**31 - 1  # int32 list offsets (Spark's array<float> in Arrow)

# What bcemb promises about the vectors of two computations of the same row (the two engines, any Arrow
# batch size, an incremental MERGE against a full rewrite, another CPU): ||a - b||_2 <= VECTOR_RTOL * ||b||_2
# per vector. Not bitwise: a float32 GEMM rounds a row differently with the batch it sits in (BLAS picks
# GEMV for one row and other kernels for other row counts) and with the CPU's kernel (issue 22 reported up
# to 3.9e-7 of the vector's norm at d = 256). Ids, spaces, row counts and chain ids are exactly equal.
VECTOR_RTOL = 1e-6


class MultiSpaceKernel:
    """Maps a batch of source vectors into several target spaces at once.

    If every chain collapses to one affine map, all targets are one GEMM on
    the column-concatenated matrices (then, per space whose collapsed map renormalises, its column
    slice is renormalised row by row); otherwise targets are produced nearest first, each continuing
    from the previous one so no link runs twice. A link that renormalises in the middle of a chain
    ends a collapsible run (`collapse`), so such a chain is not fused. Built on the driver, shipped to
    executors as plain arrays. Calling it maps x (rows, dim_in) to {space: (rows, dim_space) float32}.
    """

    def __init__(self, dim_in: int, chains: dict[int, Sequence[Transform]], dtype=np.float32) -> None:
        if not chains:
            raise ValueError("MultiSpaceKernel needs at least one target space")
        self.dim_in = dim_in
        self.spaces = sorted(chains, reverse=True)  # nearest (largest) first
        for space, chain in chains.items():
            if chain and chain[0].dim_in != dim_in:
                raise DimensionMismatchError(
                    f"chain to space {space} expects input dimension {chain[0].dim_in}, source has {dim_in}"
                )
            check_chain(chain)
        collapsed = {s: collapse(chains[s]) for s in self.spaces}
        self.dims = {s: (chains[s][-1].dim_out if chains[s] else dim_in) for s in self.spaces}
        self.fused = all(len(c) == 1 and c[0].is_affine for c in collapsed.values())
        if self.fused:
            self.weight = np.concatenate([collapsed[s][0].weight for s in self.spaces], axis=1).astype(dtype)
            has_bias = any(collapsed[s][0].bias is not None for s in self.spaces)
            self.bias = (
                np.concatenate([
                    collapsed[s][0].bias if collapsed[s][0].bias is not None else np.zeros(self.dims[s])
                    for s in self.spaces
                ]).astype(dtype)
                if has_bias else None
            )
            bounds = np.cumsum([0] + [self.dims[s] for s in self.spaces])
            self.slices = {s: slice(int(bounds[i]), int(bounds[i + 1])) for i, s in enumerate(self.spaces)}
            self.unit_spaces = [s for s in self.spaces if collapsed[s][0].unit_output]
        else:
            # each step continues from the previous target's output
            self.steps: list[tuple[int, list[Transform]]] = []
            done = 0
            for s in self.spaces:
                chain = list(chains[s])
                self.steps.append((s, collapse(chain[done:])))
                done = len(chain)
            self._check_prefixes(chains)

    def _check_prefixes(self, chains: dict[int, Sequence[Transform]]) -> None:
        prev: Sequence[Transform] = []
        for s in self.spaces:
            chain = chains[s]
            if list(chain[: len(prev)]) != list(prev):
                raise ValueError(f"chain to space {s} does not extend the chain to the nearer space")
            prev = chain

    def __call__(self, x: np.ndarray) -> dict[int, np.ndarray]:
        check_input(x, self.dim_in, "backfill kernel")
        if self.fused:
            y = x @ self.weight
            if self.bias is not None:
                y += self.bias
            for s in self.unit_spaces:
                normalize_rows(y[:, self.slices[s]])
            return {s: np.ascontiguousarray(y[:, sl]) for s, sl in self.slices.items()}
        out: dict[int, np.ndarray] = {}
        cur = x
        for s, links in self.steps:
            for link in links:
                cur = link.apply(cur).astype(np.float32, copy=False)
            out[s] = cur
        return out


def make_batch_fn(kernel: MultiSpaceKernel, check_finite: bool = True) -> BatchFn:
    """The function executors run: (id, vector) batches -> (id, vector, space_version) batches.

    Input batches: column 0 the ids (any Arrow type), column 1 list<float> of length `kernel.dim_in`.
    Output: one batch per input batch and target space, nearest space first, `space_version` int32.
    Raises InvalidVectorError naming the id of a null, wrong-length or non-finite vector, and of a
    finite input the transform maps to NaN/Inf (past float32's range): outputs are validated like inputs.
    """
    import pyarrow as pa

    from bclib.numerics.arrow import list_to_matrix, matrix_to_list

    spaces = list(kernel.spaces)
    # list<float> offsets are int32: one output batch may hold at most 2^31 - 1 values, so a batch is
    # processed in slices of at most this many rows (sized in values, not rows)
    rows_per_slice = max(1, MAX_LIST_VALUES // max([kernel.dim_in, *kernel.dims.values()]))

    def backfill_batches(batches: Iterator[pa.RecordBatch]) -> Iterator[pa.RecordBatch]:
        for whole in batches:
            for start in range(0, whole.num_rows, rows_per_slice):
                batch = whole.slice(start, rows_per_slice)
                ids = batch.column(0)
                x = list_to_matrix(batch.column(1), kernel.dim_in, ids, column="vector", check_finite=check_finite)
                outputs = kernel(x)
                for space in spaces:
                    check_output_finite(outputs[space], ids, space)
                for space in spaces:
                    space_col = pa.array(np.full(batch.num_rows, space, dtype=np.int32))
                    yield pa.RecordBatch.from_arrays(
                        [ids, matrix_to_list(outputs[space]), space_col], names=["id", "vector", "space_version"]
                    )

    return backfill_batches


def check_output_finite(y: np.ndarray, ids: "pa.Array", space: int) -> None:
    """InvalidVectorError naming the first id whose transformed vector (rows, dim) holds NaN or Inf."""
    finite = np.isfinite(y).all(axis=1)
    if finite.all():
        return
    bad = np.flatnonzero(~finite)
    row = int(bad[0])
    raise InvalidVectorError(
        f"column 'vector': id={ids[row].as_py()!r} has a finite vector that the transform maps to NaN or Inf in "
        f"space {space} (beyond float32's range; {bad.size} row(s) of this batch); nothing was written. Check the "
        "transform (`bcemb registry show`) and the input's scale")


def arrow_batch_rows(dim_in: int, dims_out: Sequence[int], target_mb: int) -> int:
    """Rows per Arrow batch so one batch's input plus outputs is about `target_mb` MiB (clipped to [1024, 200000])."""
    bytes_per_row = 4 * (dim_in + sum(dims_out)) + 16 * (1 + len(dims_out))
    return int(np.clip(target_mb * 2**20 // bytes_per_row, 1024, 200_000))
